"""Self-contained HTML pages with images inline: what the KFP UI renders from an `HTML` output.

The KFP UI shows an HTML artifact in the run's page, but fetches nothing the page links to, so
every image travels inside it as a JPEG data URI, scaled down so a page stays small.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Optional, Union

from PIL import Image

THUMBNAIL_WIDTH = 1024
STYLE = "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px}img{max-width:100%}"


def thumbnail_jpeg(source: Union[Path, Image.Image], width: int = THUMBNAIL_WIDTH) -> bytes:
    image = Image.open(source) if isinstance(source, Path) else source
    with image:
        image = image.convert("RGB")
        if image.width > width:
            image = image.resize((width, round(image.height * width / image.width)))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def inline_image(jpeg: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}">'


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>"
            f"</head><body><h2>{html.escape(title)}</h2>{body}</body></html>")


NOT_RUN = "This stage did not run for the subject (it failed or was skipped); the reason is on the subject's MLflow run."


def write_page(path: str, html_page: Optional[str], title: str) -> None:
    """An HTML output of a task: the page, or a note saying why there is none."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(html_page or page(title, f"<p>{html.escape(NOT_RUN)}</p>"))


def image_page(title: str, images: list[tuple[str, Path]], intro: str = "") -> str:
    """A page of captioned images (each file scaled to a thumbnail), under an optional intro paragraph."""
    sections = [f"<p>{html.escape(intro)}</p>"] if intro else []
    for caption, path in images:
        sections.append(f"<h3>{html.escape(caption)}</h3>{inline_image(thumbnail_jpeg(path), caption)}")
    return page(title, "".join(sections))

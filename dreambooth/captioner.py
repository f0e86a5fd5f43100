"""Captions drafted by an image-to-text model at ingest (ingest.captioner), for photos that have none.

A description becomes a caption template: its first mention of the class noun becomes `{identifier}
{class_noun}`, or without one the instance phrase leads it. Templates are written beside the photos
(NAME.txt), where people correct them; a photo with a caption file is never captioned again.
"""

from __future__ import annotations

import re

from PIL import Image

from dreambooth.errors import InputError
from dreambooth.models import load_failure_reason, resolve_model_source, weights_format


def describe_photos(reference: str, images: list[Image.Image], max_tokens: int) -> list[str]:
    """One description per image from the captioning model (BLIP and other AutoModelForImageTextToText models)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        source = resolve_model_source(reference, setting="ingest.captioner")
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(source, **weights_format()).eval()
    except (OSError, ValueError) as error:
        raise InputError(f"ingest.captioner: cannot load {reference!r} ({load_failure_reason(error)})") from None
    descriptions = []
    with torch.no_grad():
        for image in images:
            ids = model.generate(**processor(images=image, return_tensors="pt"), max_new_tokens=max_tokens)
            descriptions.append(" ".join(processor.batch_decode(ids, skip_special_tokens=True)[0].split()))
    return descriptions


def caption_template(description: str, class_noun: str) -> str:
    """`a dog on the grass` -> `a {identifier} {class_noun} on the grass`; with no mention of the noun,
    `a {identifier} {class_noun}, <description>`."""
    text = description.replace("{", "{{").replace("}", "}}")
    mention = re.search(rf"\b{re.escape(class_noun)}\b", text, flags=re.IGNORECASE) if class_noun else None
    if mention:
        return f"{text[: mention.start()]}{{identifier}} {{class_noun}}{text[mention.end():]}"
    return f"a {{identifier}} {{class_noun}}, {text}" if text else "a {identifier} {class_noun}"

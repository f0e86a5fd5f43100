"""The one image loader: any file Pillow reads, as an upright 8-bit RGB image, or a clear error."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from dreambooth.errors import InputError


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
MASK_SUFFIX = ".mask.png"  # NAME.mask.png: the mask of photo NAME, beside it
MIN_GRID_CELL = 160  # tiny models draw 64 px images; enlarge them so a grid stays readable
GRID_LABEL_HEIGHT = 18


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB, EXIF orientation applied
    original_size: tuple[int, int]  # (width, height) as stored, before orientation
    original_mode: str


def list_images(folder: Path) -> list[Path]:
    """The image files of a folder by name, hidden files and masks aside (a folder of training or class images)."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and not p.name.lower().endswith(MASK_SUFFIX))


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: Pillow's convert clips at 255, so rescale to 8 bits ourselves.
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") else max(float(pixels.max()), 1.0)
        image = Image.fromarray(np.clip(pixels / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        peak = max(float(pixels.max()), 1.0) if pixels.max() > 1.0 else 1.0
        image = Image.fromarray(np.clip(pixels / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent areas become white, the usual product-shot background.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Path, max_pixels: int) -> LoadedImage:
    """Decode `path` fully; raise InputError naming the file for anything unusable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise InputError(
                        f"{path}: {width}x{height} pixels exceeds the {max_pixels}-pixel limit "
                        "(possible decompression bomb; subject.max_image_pixels)"
                    )
                mode = opened.mode
                opened.load()  # decodes every byte: truncated data fails here, not later
                upright = ImageOps.exif_transpose(opened)
                rgb = _to_rgb(upright)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{path}: image too large to decode safely (decompression bomb)") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"{path}: corrupt or truncated image ({reason})") from None
    return LoadedImage(image=rgb, original_size=(width, height), original_mode=mode)


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the shorter side is `size`, keeping the aspect ratio."""
    scale = size / min(image.size)
    if scale == 1:
        return image
    return image.resize(
        (max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.Resampling.BICUBIC
    )


def center_crop(image: Image.Image, size: int) -> Image.Image:
    left = (image.width - size) // 2
    top = (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def resize_and_crop(image: Image.Image, size: int, centered: bool = True) -> Image.Image:
    """Shorter side to `size`, then a size x size crop (centred, or top-left): the training view."""
    resized = resize_shorter_side(image, size)
    return center_crop(resized, size) if centered else resized.crop((0, 0, size, size))


def labelled_grid(rows: list[tuple[str, list[tuple[str, Image.Image]]]]) -> Image.Image:
    """rows: (row title, [(column label, image), ...]); every row has the same columns."""
    first = rows[0][1][0][1]
    cell = max(first.width, MIN_GRID_CELL)
    columns = len(rows[0][1])
    font = ImageFont.load_default()
    row_height = GRID_LABEL_HEIGHT * 2 + cell
    grid = Image.new("RGB", (columns * cell, len(rows) * row_height), "white")
    draw = ImageDraw.Draw(grid)
    for r, (title, cells) in enumerate(rows):
        top = r * row_height
        draw.text((4, top + 3), title, fill="black", font=font)
        for c, (label, image) in enumerate(cells):
            draw.text((c * cell + 4, top + GRID_LABEL_HEIGHT + 3), label, fill="dimgray", font=font)
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (c * cell, top + GRID_LABEL_HEIGHT * 2))
    return grid

"""The invisible mark: read back from a PNG and after a JPEG re-save, at the tiny 64 px the tests draw
and at full size; never read from an unmarked image; `watermark check` exits 0 with the payload, 1 without."""

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from conftest import cli
from dreambooth.watermark import detect, embed

PAYLOAD = "3f2a9c1d"


def resaved(image: Image.Image, fmt: str, **options) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (512, 512)])
@pytest.mark.parametrize("photo", ["astronaut", "coffee", "flat"])
def test_the_mark_survives_png_and_a_jpeg_resave_and_is_not_seen_where_absent(photo, size):
    source = Image.new("RGB", (512, 512), (245, 245, 245)) if photo == "flat" else Image.fromarray(getattr(data, photo)())
    image = source.convert("RGB").resize(size)
    marked = embed(image, PAYLOAD)
    difference = np.asarray(marked, float) - np.asarray(image, float)
    assert 10 * np.log10(255**2 / np.mean(difference**2)) > 38  # PSNR: invisible
    assert detect(resaved(marked, "PNG")) == PAYLOAD
    assert detect(resaved(marked, "JPEG", quality=75)) == PAYLOAD
    assert detect(image) is None and detect(resaved(image, "JPEG", quality=75)) is None


def test_watermark_check_reads_the_payload_and_exits_1_on_an_unmarked_image(tmp_path):
    photo = Image.fromarray(data.chelsea()).resize((64, 64))
    embed(photo, PAYLOAD).save(tmp_path / "marked.png")
    resaved(embed(photo, PAYLOAD), "JPEG").save(tmp_path / "marked.jpg", quality=90)
    photo.save(tmp_path / "photo.png")
    for name in ("marked.png", "marked.jpg"):
        result = cli("watermark", "check", str(tmp_path / name), cwd=tmp_path)
        assert result.returncode == 0 and result.stdout.strip() == f"{tmp_path / name}: watermarked, payload {PAYLOAD}", result.stderr
    result = cli("watermark", "check", str(tmp_path / "photo.png"), cwd=tmp_path)
    assert result.returncode == 1 and result.stdout.strip() == f"{tmp_path / 'photo.png'}: no watermark"
    result = cli("watermark", "check", str(tmp_path / "missing.png"), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {tmp_path / 'missing.png'}: no such image file"


def test_watermark_check_says_an_image_under_64_px_is_too_small_to_carry_a_mark(tmp_path):
    Image.fromarray(data.chelsea()).resize((63, 200)).save(tmp_path / "thumb.png")
    result = cli("watermark", "check", str(tmp_path / "thumb.png"), cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (f"error: {tmp_path / 'thumb.png'}: 63x200 px is too small to carry a mark "
                                     "(marks are embedded from 64 px on the shorter side); check the full-size image")

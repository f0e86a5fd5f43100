"""An invisible mark on every image the project draws (samples, evaluation images, the registered
model's images; class priors excepted), so a generated image can be told apart from a photo.

The mark is 48 bits: a 16-bit signature and a 32-bit payload (the first 8 hex digits of the model's
fingerprint, so a marked image leads back to the run that made it). Each bit is carried many times by
quantisation index modulation of four mid-frequency DCT coefficients in every 8x8 block of the image's
luma (JPEG's own transform and colour space), each slot assigned to a bit and dithered by a fixed key;
reading takes a majority vote per bit. diffusers' SDXL watermarker skips images under 256 px; this one
works from 64 px (64 blocks x 4 slots: each bit about 5 times) up, and survives a JPEG re-save at
quality 75 (its quantisation error stays under a quarter of the step). A crop, resize or rotation
destroys it: it marks what the project writes, it is no defence against someone removing it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import IO, Optional

import numpy as np
from PIL import Image

SIGNATURE = 0xDB0B  # the first 16 bits of every mark
PAYLOAD_BITS = 32
MARK_BITS = 16 + PAYLOAD_BITS
BLOCK = 8
# Zig-zag positions 3-6 of a block: low enough to survive JPEG's quantisation, high enough to stay unseen.
SLOTS = ((0, 2), (1, 1), (2, 0), (0, 3))
STEP = 20.0  # the quantisation step (orthonormal DCT units): a slot moves at most STEP/2, about 2.5 grey levels
KEY = 0x5EED
MIN_AGREEMENT = 0.75  # mean share of a bit's votes that agree, below which an image holds no mark
MIN_SIDE = 64


def _dct_matrix() -> np.ndarray:
    """The orthonormal 8-point DCT-II matrix (JPEG's transform)."""
    n = np.arange(BLOCK)
    matrix = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * BLOCK)) * np.sqrt(2 / BLOCK)
    matrix[0] /= np.sqrt(2)
    return matrix


_DCT = _dct_matrix()


def _blocks(luma: np.ndarray) -> np.ndarray:
    """(rows, cols, 8, 8) DCT coefficients of the image's whole 8x8 blocks."""
    rows, cols = luma.shape[0] // BLOCK, luma.shape[1] // BLOCK
    tiles = luma[: rows * BLOCK, : cols * BLOCK].reshape(rows, BLOCK, cols, BLOCK).transpose(0, 2, 1, 3)
    return _DCT @ tiles @ _DCT.T


def _unblocks(coefficients: np.ndarray, luma: np.ndarray) -> np.ndarray:
    rows, cols = coefficients.shape[:2]
    tiles = _DCT.T @ coefficients @ _DCT
    out = luma.copy()
    out[: rows * BLOCK, : cols * BLOCK] = tiles.transpose(0, 2, 1, 3).reshape(rows * BLOCK, cols * BLOCK)
    return out


def _layout(slot_count: int) -> tuple[np.ndarray, np.ndarray]:
    """(which bit each slot carries, each slot's dither): a fixed keyed shuffle, so neighbouring blocks
    carry different bits and the pattern has no visible period."""
    generator = np.random.default_rng(KEY)
    bits = np.resize(np.arange(MARK_BITS), slot_count)
    generator.shuffle(bits)
    dither = generator.uniform(-STEP / 2, STEP / 2, slot_count)
    return bits, dither


def _bits_of(payload: int) -> np.ndarray:
    word = (SIGNATURE << PAYLOAD_BITS) | payload
    return np.array([(word >> (MARK_BITS - 1 - index)) & 1 for index in range(MARK_BITS)])


def _slots(coefficients: np.ndarray) -> np.ndarray:
    return np.stack([coefficients[:, :, u, v] for u, v in SLOTS], axis=-1).reshape(-1)


def can_carry_mark(image: Image.Image) -> bool:
    """Whether the image is large enough to hold a mark (MIN_SIDE on its shorter side): smaller ones are left unmarked."""
    return min(image.size) >= MIN_SIDE


def embed(image: Image.Image, payload: str) -> Image.Image:
    """The image with the mark of `payload` (8 hex digits); images under 64 px are returned as they are."""
    if not can_carry_mark(image):
        return image
    ycbcr = np.asarray(image.convert("RGB").convert("YCbCr"), dtype=np.float64)
    coefficients = _blocks(ycbcr[:, :, 0])
    slots = _slots(coefficients)
    carried, dither = _layout(slots.size)
    wanted = _bits_of(int(payload, 16))[carried]
    # QIM: move each slot to the nearest point of its bit's lattice (offset by half a step for a 1).
    offset = dither + wanted * STEP / 2
    slots = np.round((slots - offset) / STEP) * STEP + offset
    shaped = slots.reshape(*coefficients.shape[:2], len(SLOTS))
    for index, (u, v) in enumerate(SLOTS):
        coefficients[:, :, u, v] = shaped[:, :, index]
    ycbcr[:, :, 0] = _unblocks(coefficients, ycbcr[:, :, 0])
    return Image.fromarray(np.clip(np.round(ycbcr), 0, 255).astype(np.uint8), "YCbCr").convert("RGB")


def detect(image: Image.Image) -> Optional[str]:
    """The payload (8 hex digits) of the mark the image carries, or None."""
    if not can_carry_mark(image):
        return None
    luma = np.asarray(image.convert("RGB").convert("YCbCr"), dtype=np.float64)[:, :, 0]
    slots = _slots(_blocks(luma))
    carried, dither = _layout(slots.size)
    # Which lattice each slot sits nearer: distance to the 0-lattice modulo STEP, 1 when past a quarter step.
    phase = np.mod(slots - dither, STEP)
    read = ((phase > STEP / 4) & (phase < 3 * STEP / 4)).astype(int)
    votes = np.bincount(carried, weights=read, minlength=MARK_BITS)
    counts = np.bincount(carried, minlength=MARK_BITS)
    bits = (votes * 2 > counts).astype(int)
    agreement = np.mean(np.maximum(votes, counts - votes) / counts)
    word = int("".join(map(str, bits)), 2)
    if word >> PAYLOAD_BITS != SIGNATURE or agreement < MIN_AGREEMENT:
        return None
    return f"{word & (2**PAYLOAD_BITS - 1):08x}"


def payload_for(model: str | Path) -> str:
    """The payload of the images `model` draws: the first 8 hex digits of the training fingerprint its
    dreambooth.json records (the subject run's tag dreambooth.watermark holds the same), else of a digest
    of that metadata (a reference baseline), else of the reference itself (a base model)."""
    from dreambooth.models.loading import result_metadata

    metadata = result_metadata(model) if Path(str(model)).is_dir() else {}
    if metadata.get("fingerprint"):
        return metadata["fingerprint"][:8]
    described = json.dumps(metadata, sort_keys=True) if metadata else str(model)
    return hashlib.sha256(described.encode()).hexdigest()[:8]


def save_marked(image: Image.Image, target: Path | IO[bytes], payload: str, **options) -> None:
    """Write a generated image with its mark (to a file, or a buffer with options' format)."""
    embed(image, payload).save(target, **options)

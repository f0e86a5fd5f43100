"""Faces in a person's photos (subject.kind: person): found with OpenCV's frontal-face Haar cascade,
which installs with opencv-python-headless (no download), then a crop around the face."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DETECTION_SIDE = 1024  # photos are searched at most this large: phone photos take seconds otherwise
MIN_FACE_SHARE = 0.06  # a face narrower than this share of the shorter side is background, not the subject
MASK_GROWTH = 1.3  # the face box covers brow to chin; the mask takes in hair and ears too

Box = tuple[int, int, int, int]  # (left, top, right, bottom)


def _cascade():
    import cv2

    path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
    return cv2.CascadeClassifier(str(path))


def detect_faces(image: Image.Image) -> list[Box]:
    """The frontal faces in an RGB photo, as boxes in its own pixels."""
    import cv2

    scale = min(1.0, DETECTION_SIDE / max(image.size))
    small = image if scale == 1.0 else image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    gray = cv2.equalizeHist(cv2.cvtColor(np.asarray(small), cv2.COLOR_RGB2GRAY))
    smallest = max(24, int(min(small.size) * MIN_FACE_SHARE))
    found = _cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest))
    return [(round(x / scale), round(y / scale), round((x + w) / scale), round((y + h) / scale)) for x, y, w, h in found]


def crop_around(face: Box, size: tuple[int, int], scale: float) -> Box:
    """A crop of the photo's own shape whose shorter side is `scale` times the face's, centred on the face
    and moved (or shrunk) to stay inside the photo: a portrait stays a portrait for its bucket."""
    left, top, right, bottom = face
    width, height = size
    short = min(max(right - left, bottom - top) * scale, min(size))
    crop_width, crop_height = (round(short), round(short * height / width)) if width <= height else (round(short * width / height), round(short))
    crop_width, crop_height = min(crop_width, width), min(crop_height, height)
    centre_x, centre_y = (left + right) / 2, (top + bottom) / 2
    x = int(min(max(round(centre_x - crop_width / 2), 0), width - crop_width))
    y = int(min(max(round(centre_y - crop_height / 2), 0), height - crop_height))
    return (x, y, x + crop_width, y + crop_height)


def face_mask(face: Box, crop: Box) -> Image.Image:
    """The face box (grown by MASK_GROWTH) as a white-on-black mask of the crop."""
    from PIL import ImageDraw

    left, top, right, bottom = face
    grow_x, grow_y = (right - left) * (MASK_GROWTH - 1) / 2, (bottom - top) * (MASK_GROWTH - 1) / 2
    mask = Image.new("L", (crop[2] - crop[0], crop[3] - crop[1]), 0)
    ImageDraw.Draw(mask).rectangle(
        (left - grow_x - crop[0], top - grow_y - crop[1], right + grow_x - crop[0], bottom + grow_y - crop[1]), fill=255
    )
    return mask

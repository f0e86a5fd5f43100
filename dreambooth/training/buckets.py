"""Aspect-ratio buckets: where a photo of any shape trains, and which part of it.

A bucket is a (width, height) whose sides are multiples of the model's latent step and whose area is
close to resolution squared; a photo goes to the bucket nearest its aspect ratio, is resized just
enough to cover it and cropped by the least amount. Without buckets the one bucket is the square,
and the photo's shorter side is resized to it, as diffusers' DreamBooth scripts do; the crop offset is
rounded as theirs is, so SDXL's crop conditioning matches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class Placement:
    """How one photo becomes one training view."""

    bucket: tuple[int, int]  # (width, height) of the view
    resized: tuple[int, int]  # (width, height) the photo is resized to before the crop
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized photo

    def apply(self, image: Image.Image) -> Image.Image:
        resized = image if image.size == self.resized else image.resize(self.resized, Image.Resampling.BICUBIC)
        top, left = self.crop_top_left
        width, height = self.bucket
        return resized.crop((left, top, left + width, top + height))

    def box_in(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """The crop as a (left, top, right, bottom) box of the photo at `size`, before the resize."""
        scale_x, scale_y = size[0] / self.resized[0], size[1] / self.resized[1]
        top, left = self.crop_top_left
        return (round(left * scale_x), round(top * scale_y),
                round((left + self.bucket[0]) * scale_x), round((top + self.bucket[1]) * scale_y))

    def mirrored(self) -> "Placement":
        """The same view of the mirrored photo: its crop sits as far from the other edge."""
        top, left = self.crop_top_left
        return Placement(self.bucket, self.resized, (top, self.resized[0] - self.bucket[0] - left))


def bucket_sizes(resolution: int, step: int, max_aspect_ratio: float) -> list[tuple[int, int]]:
    """(width, height) buckets, sides multiples of `step`, area at most resolution squared, from the
    tallest to the widest; the square is one, and each tall bucket has its wide twin."""
    side = max(step, resolution // step * step)
    tall: dict[int, int] = {}  # height -> the widest width that fits it
    for width in range(step, side + 1, step):
        height = max(step, (resolution * resolution // width) // step * step)
        if height / width <= max_aspect_ratio:
            tall[height] = max(width, tall.get(height, 0))
    sizes = {(width, height) for height, width in tall.items()} | {(height, width) for height, width in tall.items()}
    return sorted(sizes | {(side, side)}, key=lambda size: size[0] / size[1])


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the photo's (in log ratio, so 2:1 and 1:2 are equally far from 1:1)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda bucket: (abs(math.log(bucket[0] / bucket[1]) - ratio), -bucket[0] * bucket[1]))


def place(size: tuple[int, int], bucket: tuple[int, int], centered: bool = True) -> Placement:
    """Resize (width, height) `size` to cover `bucket`, then crop the excess (centred, or from the top-left)."""
    width, height = size
    if bucket[0] == bucket[1]:  # the square: shorter side to the bucket, the longer truncated, as torchvision's Resize
        short = bucket[0]
        resized = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    else:
        scale = max(bucket[0] / width, bucket[1] / height)
        resized = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    if not centered:
        return Placement(bucket, resized, (0, 0))
    top = max(0, int(round((resized[1] - bucket[1]) / 2.0)))
    left = max(0, int(round((resized[0] - bucket[0]) / 2.0)))
    return Placement(bucket, resized, (top, left))


def share_out(paths: list, counts: dict[tuple[int, int], int]) -> tuple[list, list[tuple[int, int]]]:
    """`paths` (class images) spread over the buckets in proportion to `counts` (the subject's views per
    bucket), each bucket at least one (images repeat when there are fewer than buckets): (paths, bucket of each)."""
    if len(paths) < len(counts):
        paths = [paths[index % len(paths)] for index in range(len(counts))]
    total = sum(counts.values())
    shares = {bucket: len(paths) * count / total for bucket, count in counts.items()}
    given = {bucket: math.floor(share) for bucket, share in shares.items()}
    # Largest remainder: the images the floors leave go to the buckets closest to their next one.
    for bucket in sorted(shares, key=lambda bucket: given[bucket] - shares[bucket])[: len(paths) - sum(given.values())]:
        given[bucket] += 1
    for bucket in [bucket for bucket, count in given.items() if count == 0]:  # every bucket needs class images
        given[max(given, key=given.get)] -= 1
        given[bucket] = 1
    return paths, [bucket for bucket, count in given.items() for _ in range(count)]

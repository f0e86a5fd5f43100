"""Aspect-ratio buckets: a tall photo keeps its top and bottom, a batch keeps one size (its class images
at the same bucket), and SDXL is told each photo's real size and crop as diffusers' script tells it."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from dreambooth.config import DataSettings, TrainingSettings
from dreambooth.fine_tune import fine_tune
from dreambooth.ingest.photos import ingest_subject, read_manifest
from dreambooth.models.loading import load_pipeline
from dreambooth.training.buckets import bucket_sizes, share_out
from dreambooth.training.recipes import flux as flux_recipe
from dreambooth.training.recipes import recipe_class

RED, BLUE = (230, 20, 20), (20, 20, 230)


def tall_photo(path, size=(600, 800)):
    """Grey, a red square near the top edge and a blue one near the bottom (each 6-10% in)."""
    pixels = np.full((size[1], size[0], 3), 128, dtype=np.uint8)
    band = size[1] // 25
    pixels[2 * band : 3 * band, size[0] // 2 - band : size[0] // 2 + band] = RED
    pixels[-3 * band : -2 * band, size[0] // 2 - band : size[0] // 2 + band] = BLUE
    Image.fromarray(pixels).save(path)
    return path


def shows(image: Image.Image, colour) -> bool:
    return bool((np.abs(np.asarray(image, dtype=np.int16) - colour).sum(axis=-1) < 60).any())


@pytest.fixture(scope="module")
def sdxl():
    return load_pipeline("tiny://sdxl", device=torch.device("cpu"))


def _view(pipeline, family, photo, data, **training):
    recipe = recipe_class(family)(pipeline, TrainingSettings(random_flip=False, **training), torch.device("cpu"), 64, data=data)
    images = recipe.prepare_images([photo])
    return images.groups[0].views[0], images.groups[0].extras


def test_a_tall_photo_keeps_both_markers_in_its_bucket_and_loses_them_in_the_square(sdxl, tmp_path):
    photo = tall_photo(tmp_path / "tall.png")
    bucketed, _ = _view(sdxl, "sdxl", photo, DataSettings())  # buckets are on by default for sdxl
    assert bucketed.size[0] < bucketed.size[1] and shows(bucketed.image, RED) and shows(bucketed.image, BLUE)
    square, _ = _view(sdxl, "sdxl", photo, DataSettings(buckets=False))
    assert square.size == (64, 64) and not (shows(square.image, RED) and shows(square.image, BLUE))
    corner, _ = _view(sdxl, "sdxl", photo, DataSettings(buckets=False), center_crop=False)
    assert shows(corner.image, RED) and not shows(corner.image, BLUE)  # the top-left square: the bottom is cut


def diffusers_sdxl_time_ids(photo_size, resolution):
    """What diffusers' train_dreambooth_lora_sdxl.py computes for one photo with --center_crop: the
    photo's (height, width) before transforms.Resize(resolution) of its shorter side (torchvision
    truncates the longer), the crop's (y1, x1) = round of half the excess, and (resolution, resolution)."""
    width, height = photo_size
    if width <= height:
        resized = (resolution, int(resolution * height / width))
    else:
        resized = (int(resolution * width / height), resolution)
    y1 = max(0, int(round((resized[1] - resolution) / 2.0)))
    x1 = max(0, int(round((resized[0] - resolution) / 2.0)))
    return [height, width, y1, x1, resolution, resolution]


@pytest.mark.parametrize("size", [(600, 800), (803, 597), (640, 640)])
def test_sdxl_time_ids_match_diffusers_script_for_a_square_view_and_follow_the_bucket(sdxl, tmp_path, size):
    photo = tall_photo(tmp_path / "photo.png", size)
    _, extras = _view(sdxl, "sdxl", photo, DataSettings(buckets=False))
    expected = diffusers_sdxl_time_ids(size, 64)
    assert extras["time_ids"][0].tolist() == expected
    # in the layout the SDXL pipeline builds from the same three pairs
    built = sdxl._get_add_time_ids(tuple(expected[:2]), tuple(expected[2:4]), (64, 64), dtype=torch.float32,
                                   text_encoder_projection_dim=sdxl.text_encoder_2.config.projection_dim)
    assert torch.equal(extras["time_ids"], built)

    view, extras = _view(sdxl, "sdxl", photo, DataSettings())
    width, height = view.size  # the bucket: resized to cover it, cropped by the least amount
    scale = max(width / size[0], height / size[1])
    resized = (max(width, round(size[0] * scale)), max(height, round(size[1] * scale)))
    crop = (int(round((resized[1] - height) / 2.0)), int(round((resized[0] - width) / 2.0)))
    assert extras["time_ids"][0].tolist() == [size[1], size[0], *crop, height, width]
    assert max(resized[0] - width, resized[1] - height) <= 4  # the nearest bucket: at most one step cut


def test_buckets_keep_the_ratio_and_area_and_class_images_follow_the_photos():
    buckets = bucket_sizes(1024, 64, 2.0)
    assert (1024, 1024) in buckets and (832, 1216) in buckets and (1216, 832) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and 0.8 < w * h / 1024**2 <= 1 and max(w, h) / min(w, h) <= 2 for w, h in buckets)
    paths, placed = share_out(list(range(10)), {(56, 72): 6, (64, 64): 2, (72, 56): 2})
    assert len(paths) == 10 and [placed.count(bucket) for bucket in ((56, 72), (64, 64), (72, 56))] == [6, 2, 2]
    paths, placed = share_out(["only"], {(56, 72): 1, (64, 64): 1})  # fewer class images than buckets: they repeat
    assert paths == ["only", "only"] and sorted(placed) == [(56, 72), (64, 64)]


def test_each_batch_is_one_bucket_with_its_class_images_and_sdxl_gets_each_photo_time_ids(make_config, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, size in (("tall", (600, 800)), ("wide", (800, 600)), ("square", (640, 640))):
        tall_photo(photos / f"{name}.png", size)
    config = make_config(model={"base": "tiny://sdxl"}, subject={"min_image_size": 64},
                         training={"method": "lora", "learning_rate": 1e-4, "max_steps": 8, "batch_size": 2, "random_flip": False},
                         priors={"num_class_images": 6})
    ingested = ingest_subject(photos, tmp_path / "subject", config)
    manifest = {entry["source_file"]: tuple(entry["bucket"]) for entry in read_manifest(tmp_path / "subject")["images"]}
    assert manifest["tall.png"][0] < manifest["tall.png"][1] and manifest["wide.png"][0] > manifest["wide.png"][1]
    classes = tmp_path / "classes"
    classes.mkdir()
    for index in range(6):
        Image.new("RGB", (64, 64), (index * 30, 90, 90)).save(classes / f"{index}.png")

    seen = []  # (latent shape, time ids) of every UNet call
    original = UNet2DConditionModel.forward

    def forward(self, sample, *args, **kwargs):
        seen.append((sample.shape, kwargs["added_cond_kwargs"]["time_ids"].tolist()))
        return original(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    fine_tune(tmp_path / "subject", classes, ingested.identifier.identifier, config, tmp_path / "model")

    photo_sizes = [[800, 600], [600, 800], [640, 640]]  # (height, width) of each photo
    seen_sizes = set()
    for shape, time_ids in seen:
        height, width = shape[-2] * 2, shape[-1] * 2  # the tiny VAE halves each side
        seen_sizes.add((width, height))
        subject_rows, class_rows = time_ids[:2], time_ids[2:]
        assert all(row[4:] == [height, width] for row in time_ids)  # subject and class examples at one bucket
        assert all(row[:2] in photo_sizes for row in subject_rows)  # each photo's own size
        assert all(row[:2] == [64, 64] for row in class_rows)
    assert len(seen_sizes) >= 2  # more than one bucket trained


def test_flux_trains_tall_and_wide_buckets_as_packed_tokens_of_their_own_shape(make_config, tmp_path, monkeypatch):
    from diffusers import FluxTransformer2DModel

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, size in (("tall", (600, 800)), ("wide", (800, 600))):
        tall_photo(photos / f"{name}.png", size)
    config = make_config(model={"base": "tiny://flux", "resolution": 64}, subject={"min_image_size": 64},
                         training={"method": "lora", "learning_rate": 1e-4, "max_steps": 6, "random_flip": False},
                         priors={"enabled": False})
    ingested = ingest_subject(photos, tmp_path / "subject", config)
    buckets = {tuple(entry["bucket"]) for entry in read_manifest(tmp_path / "subject")["images"]}
    assert all(width % 4 == 0 and height % 4 == 0 for width, height in buckets) and len(buckets) == 2  # tiny VAE 2x, 2x2 packing
    latents, positions = [], []  # per step: the latents packed, and the largest (row, column) of the token ids
    original_forward, original_pack = FluxTransformer2DModel.forward, flux_recipe.pack_latents

    def forward(self, *args, **kwargs):
        positions.append(tuple(kwargs["img_ids"][:, 1:].max(dim=0).values.int().tolist()))
        return original_forward(self, *args, **kwargs)

    def pack(batch):
        latents.append(tuple(batch.shape[-2:]))
        return original_pack(batch)

    monkeypatch.setattr(FluxTransformer2DModel, "forward", forward)
    monkeypatch.setattr(flux_recipe, "pack_latents", pack)
    fine_tune(tmp_path / "subject", None, ingested.identifier.identifier, config, tmp_path / "model")
    # each step's token positions span its own latents' 2x2 patches: rows by height, columns by width
    assert [(height // 2 - 1, width // 2 - 1) for height, width in latents] == positions
    assert {(width * 2, height * 2) for height, width in latents} == buckets  # both buckets trained (the tiny VAE halves)

"""Ingest: every bad upload is refused with one line naming the file and the reason."""

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dreambooth.errors import InputError
from dreambooth.ingest.photos import MANIFEST_FILE, ingest_subject


def _photo(path, size=(96, 96), mode="RGB", color=(200, 30, 30), **save):
    Image.new(mode, size, color).save(path, **save)
    return path


def _noise_photo(path, size=(96, 96), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def config(make_config):
    return make_config()


def test_the_sample_subject_ingests_with_a_manifest(subject_dir, tmp_path, config):
    result = ingest_subject(subject_dir, tmp_path / "out", config)
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert [entry["source_file"] for entry in manifest["images"]] == ["00.jpg", "01.jpg", "02.jpg", "03.jpg"]
    assert all(len(entry["sha256"]) == 64 and entry["original_size"] == [320, 320] for entry in manifest["images"])
    assert manifest["identifier"]["identifier"] == result.identifier.identifier
    assert manifest["instance_prompt"] == f"a {result.identifier.identifier} dog"
    for entry in manifest["images"]:
        with Image.open(tmp_path / "out" / entry["normalised_file"]) as image:
            assert image.mode == "RGB"


@pytest.mark.parametrize(
    "write_bad_file, reason",
    [
        (lambda p: (p / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 20), "broken.jpg: "),
        (lambda p: (p / "notes.md").write_text("not a photo"), "notes.md: not an image"),
    ],
    ids=["corrupt", "non-image"],
)
def test_corrupt_and_non_image_files_are_named(subject_dir, tmp_path, config, write_bad_file, reason):
    write_bad_file(subject_dir)
    with pytest.raises(InputError, match=reason) as error:
        ingest_subject(subject_dir, tmp_path / "out", config)
    assert "\n" not in str(error.value)


def test_a_truncated_image_is_named(subject_dir, tmp_path, config):
    whole = (subject_dir / "00.jpg").read_bytes()
    (subject_dir / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match=r"cut\.jpg: corrupt or truncated image"):
        ingest_subject(subject_dir, tmp_path / "out", config)


def test_an_empty_folder_and_a_missing_folder(tmp_path, config):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no images in the subject folder"):
        ingest_subject(tmp_path / "empty", tmp_path / "out", config)
    with pytest.raises(InputError, match=r"absent: subject folder not found"):
        ingest_subject(tmp_path / "absent", tmp_path / "out", config)


def test_a_link_out_of_the_subject_folder_is_refused_and_one_inside_is_not(subject_dir, tmp_path, config):
    elsewhere = tmp_path / "private"
    elsewhere.mkdir()
    _noise_photo(elsewhere / "not-a-subject.png", size=(128, 128))
    (subject_dir / "extra.png").symlink_to(elsewhere / "not-a-subject.png")
    with pytest.raises(InputError, match=r"extra.png: links to .*not-a-subject.png, outside the subject folder"):
        ingest_subject(subject_dir, tmp_path / "out", config)
    (subject_dir / "extra.png").unlink()
    first = sorted(subject_dir.iterdir())[0]
    (subject_dir / "same-photo.jpg").symlink_to(first.name)  # inside: an ordinary (duplicate) photo
    result = ingest_subject(subject_dir, tmp_path / "out", config)
    assert "same-photo.jpg" in result.duplicates_dropped or first.name in result.duplicates_dropped


def test_a_too_small_image_is_named_with_the_limit(subject_dir, tmp_path, config):
    _photo(subject_dir / "tiny.png", size=(40, 300))
    with pytest.raises(InputError, match=r"tiny\.png: 40x300 is too small; .* at least 64 px \(subject\.min_image_size\)"):
        ingest_subject(subject_dir, tmp_path / "out", config)


def _png_claiming(path, width, height):
    """A valid PNG header that declares a huge canvas: the classic decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_refused_before_decoding(subject_dir, tmp_path, config):
    _png_claiming(subject_dir / "bomb.png", 60000, 60000)
    with pytest.raises(InputError, match=r"bomb\.png: .*decompression bomb"):
        ingest_subject(subject_dir, tmp_path / "out", config)


def test_the_pixel_limit_is_a_setting(subject_dir, tmp_path, make_config):
    config = make_config(subject={"max_image_pixels": 320 * 320 - 1})
    with pytest.raises(InputError, match=r"00\.jpg: 320x320 pixels exceeds the 102399-pixel limit"):
        ingest_subject(subject_dir, tmp_path / "out", config)


def test_bad_input_is_refused_before_any_model_is_loaded(subject_dir, tmp_path, make_config):
    (subject_dir / "notes.md").write_text("x")
    config = make_config(model={"base": str(tmp_path / "no-such-model")})
    with pytest.raises(InputError, match=r"notes\.md"):
        ingest_subject(subject_dir, tmp_path / "out", config)


def test_any_mode_becomes_rgb(tmp_path, config):
    folder = tmp_path / "modes"
    folder.mkdir()
    _photo(folder / "cmyk.jpg", mode="CMYK", color=(0, 255, 255, 0))
    _photo(folder / "gray.png", mode="L", color=100)
    palette = Image.new("P", (96, 96), 1)
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette.save(folder / "palette.png", transparency=0)
    clear = Image.new("RGBA", (96, 96), (255, 0, 0, 0))
    clear.paste((0, 0, 255, 255), (0, 0, 48, 96))
    clear.save(folder / "rgba.png")
    Image.fromarray(np.full((96, 96), 32768, dtype=np.uint16)).save(folder / "deep16.png")
    ingest_subject(folder, tmp_path / "out", config)

    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    by_source = {entry["source_file"]: entry for entry in manifest["images"]}
    assert by_source["cmyk.jpg"]["original_mode"] == "CMYK"
    assert by_source["deep16.png"]["original_mode"].startswith("I")

    def pixel(source, xy=(80, 10)):
        with Image.open(tmp_path / "out" / by_source[source]["normalised_file"]) as image:
            assert image.mode == "RGB"
            return image.getpixel(xy)

    assert pixel("rgba.png") == (255, 255, 255)  # transparent: composited over white
    assert pixel("rgba.png", (10, 10)) == (0, 0, 255)
    assert pixel("gray.png") == (100, 100, 100)
    assert pixel("deep16.png") == (128, 128, 128)  # 16-bit mid-gray stays mid-gray, not clipped white
    assert pixel("palette.png") == (10, 200, 10)
    red, green, blue = pixel("cmyk.jpg")
    assert red > 200 and green < 60 and blue < 60  # magenta + yellow ink = red


def test_exif_orientation_is_applied(tmp_path, config):
    folder = tmp_path / "rotated"
    folder.mkdir()
    image = Image.new("RGB", (120, 80), (10, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    image.save(folder / "sideways.jpg", exif=exif)
    result = ingest_subject(folder, tmp_path / "out", config)
    assert result.images[0].original_size == (120, 80)
    assert result.images[0].size == (80, 120)


def test_exact_duplicates_are_dropped_and_few_images_warn(tmp_path, config):
    folder = tmp_path / "dupes"
    folder.mkdir()
    _noise_photo(folder / "a.png")
    (folder / "b.png").write_bytes((folder / "a.png").read_bytes())
    result = ingest_subject(folder, tmp_path / "out", config)
    assert [entry.source_file for entry in result.images] == ["a.png"]
    assert result.duplicates_dropped == ["b.png"]
    assert any("only 1 distinct image" in warning for warning in result.warnings)


def test_too_many_images_are_refused(tmp_path, make_config):
    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(4):
        _noise_photo(folder / f"{index}.png", seed=index)
    with pytest.raises(InputError, match=r"many: 4 distinct images, at most 3 allowed \(subject\.max_images\)"):
        ingest_subject(folder, tmp_path / "out", make_config(subject={"max_images": 3}))



def test_a_mask_beside_a_photo_travels_with_it_and_a_wrong_sized_one_is_refused(subject_dir, tmp_path, make_config):
    import torch

    from dreambooth.models.loading import load_pipeline
    from dreambooth.training.data import mask_file
    from dreambooth.training.recipes import recipe_class

    photo = subject_dir / "00.jpg"
    width, height = Image.open(photo).size
    left_half = Image.new("L", (width, height), 0)
    left_half.paste(255, (0, 0, width // 2, height))
    left_half.save(subject_dir / "00.mask.png")
    config = make_config(training={"mask_weight": 0.0, "random_flip": False})
    result = ingest_subject(subject_dir, tmp_path / "out", config)
    assert len(result.images) == 4  # the mask is no photo
    [entry] = [entry for entry in result.images if entry.source_file == "00.jpg"]
    assert entry.mask and all(not other.mask for other in result.images if other is not entry)

    # the fine-tune's view of it: the photo's latent grid weighted on the left half only
    recipe = recipe_class("sd")(load_pipeline("tiny://sd"), config.training, torch.device("cpu"), 64)
    normalised = tmp_path / "out" / entry.normalised_file
    images = recipe.prepare_images([normalised], with_masks=True)
    mask = images.groups[0].extras["mask"][0, 0]
    assert mask[:, : mask.shape[1] // 2].min() > 0.9 and mask[:, mask.shape[1] // 2 :].max() < 0.1  # resampling softens the edge
    assert mask_file(normalised).is_file()

    Image.new("L", (width // 2, height), 255).save(subject_dir / "00.mask.png")
    with pytest.raises(InputError, match=rf"00\.mask\.png: {width // 2}x{height}, but its photo is {width}x{height}"):
        ingest_subject(subject_dir, tmp_path / "refused", config)


def test_the_evaluation_compares_with_the_photos_cut_as_they_trained(tmp_path, make_config):
    from dreambooth.ingest.photos import photos_as_trained

    folder = tmp_path / "tall"
    folder.mkdir()
    pixels = np.full((800, 600, 3), 128, dtype=np.uint8)
    pixels[:40] = (230, 20, 20)  # a red band along the top edge: a square crop cuts it away
    Image.fromarray(pixels).save(folder / "tall.png")
    for buckets, red_kept in ((True, True), (False, False)):
        out = tmp_path / f"buckets-{buckets}"
        ingest_subject(folder, out, make_config(model={"base": "tiny://sdxl"}, data={"buckets": buckets}))
        [photo] = photos_as_trained(out)
        ratio = photo.width / photo.height
        assert (ratio < 0.85) == buckets and (abs(ratio - 1) < 0.01) != buckets  # the bucket's shape, or the square
        assert bool((np.asarray(photo)[..., 0] > 200).any()) == red_kept

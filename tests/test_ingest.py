"""Ingest: every bad upload is refused with one line naming the file and the reason."""

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dreambooth.errors import InputError
from dreambooth.ingest import MANIFEST_FILE, ingest_subject


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


def test_captions_come_from_sidecars_or_the_subjects_file_and_must_name_the_subject(subject_dir, tmp_path, make_config):
    first, second, *_ = sorted(path for path in subject_dir.iterdir() if path.suffix == ".jpg")
    first.with_suffix(".txt").write_text("a photo of {identifier} {class_noun}\non a red sofa\n")
    config = make_config(subject={"captions": {second.name: "a {identifier} {class_noun} asleep in the grass"}})
    result = ingest_subject(subject_dir, tmp_path / "out", config)
    identifier = result.identifier.identifier
    captions = {entry.source_file: entry.caption for entry in result.images}
    assert captions[first.name] == f"a photo of {identifier} dog on a red sofa"  # whitespace tidied
    assert captions[second.name] == f"a {identifier} dog asleep in the grass"
    assert all(caption == "" for name, caption in captions.items() if name not in (first.name, second.name))
    beside = {entry.source_file: (tmp_path / "out" / entry.normalised_file).with_suffix(".txt") for entry in result.images}
    assert beside[first.name].read_text().strip() == captions[first.name]
    assert not any(path.exists() for name, path in beside.items() if not captions[name])  # no caption: no file

    first.with_suffix(".txt").write_text("a photo of a dog on a sofa")
    with pytest.raises(InputError, match=rf"{first.name}: caption 'a photo of a dog on a sofa' does not contain the identifier phrase"):
        ingest_subject(subject_dir, tmp_path / "refused", config)
    first.with_suffix(".txt").unlink()
    (subject_dir / "renamed.txt").write_text("a {identifier} {class_noun}")
    with pytest.raises(InputError, match=r"renamed\.txt: a caption file, but no photo of the folder is named renamed"):
        ingest_subject(subject_dir, tmp_path / "refused", config)
    (subject_dir / "renamed.txt").unlink()
    with pytest.raises(InputError, match=r"subject\.captions: typo\.jpg is not a photo of"):
        ingest_subject(subject_dir, tmp_path / "refused", make_config(subject={"captions": {"typo.jpg": "a {identifier} {class_noun}"}}))


def test_the_captioner_drafts_captions_beside_the_photos_and_an_edited_one_is_kept(subject_dir, tmp_path, make_config):
    config = make_config(ingest={"captioner": "tiny://captioner", "captioner_max_tokens": 8})
    first = ingest_subject(subject_dir, tmp_path / "first", config)
    identifier = first.identifier.identifier
    photos = sorted(path for path in subject_dir.iterdir() if path.suffix == ".jpg")
    assert first.drafted_captions == [path.name for path in photos]
    drafts = {path.name: path.with_suffix(".txt").read_text().strip() for path in photos}
    for entry in first.images:  # each draft, rendered, is the photo's caption: the model's words after the phrase
        assert "{identifier} {class_noun}" in drafts[entry.source_file]
        assert entry.caption == " ".join(drafts[entry.source_file].format(identifier=identifier, class_noun="dog").split())
        assert len(entry.caption.split()) > len(f"a {identifier} dog".split())

    photos[0].with_suffix(".txt").write_text("a {identifier} {class_noun} edited by hand")
    second = ingest_subject(subject_dir, tmp_path / "second", config)
    assert second.drafted_captions == []  # every photo has its caption now: nothing is drafted again
    captions = {entry.source_file: entry.caption for entry in second.images}
    assert captions[photos[0].name] == f"a {identifier} dog edited by hand"
    assert captions[photos[1].name] == first.images[1].caption


def test_a_caption_template_puts_the_identifier_at_the_class_noun():
    from dreambooth.captioner import caption_template

    assert caption_template("a brown dog lying on the grass", "dog") == "a brown {identifier} {class_noun} lying on the grass"
    assert caption_template("a sofa {with} cushions", "dog") == "a {identifier} {class_noun}, a sofa {{with}} cushions"


def test_drafts_of_a_bucket_photos_go_beside_them_in_the_bucket_and_the_next_run_keeps_them(gcs_emulator, subject_dir, tmp_path, make_config):
    from google.cloud import storage as gcs

    from dreambooth.storage import local_folder
    from dreambooth.tasks.stages import keep_drafted_captions

    bucket = gcs.Client(project="dreambooth-test").bucket(gcs_emulator)
    for photo in subject_dir.iterdir():
        bucket.blob(f"drafts/dog/{photo.name}").upload_from_filename(str(photo))
    uri = f"gs://{gcs_emulator}/drafts/dog"
    config = make_config(ingest={"captioner": "tiny://captioner", "captioner_max_tokens": 6})
    with local_folder(uri) as folder:
        first = ingest_subject(folder, tmp_path / "first", config)
        keep_drafted_captions(uri, folder, first.drafted_captions)
    stored = sorted(blob.name for blob in bucket.list_blobs(prefix="drafts/dog/") if blob.name.endswith(".txt"))
    assert stored == [f"drafts/dog/{name.rsplit('.', 1)[0]}.txt" for name in first.drafted_captions] and len(stored) == 4
    with local_folder(uri) as folder:
        second = ingest_subject(folder, tmp_path / "second", config)
    assert second.drafted_captions == [] and [entry.caption for entry in second.images] == [entry.caption for entry in first.images]

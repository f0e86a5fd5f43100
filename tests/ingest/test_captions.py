"""Captions: from the subjects file or a NAME.txt beside the photo, checked to name the subject; drafted by
ingest.captioner for the rest, beside the photos (in a bucket too), and kept once people edit them."""

import pytest

from dreambooth.ingest.captions import caption_template
from dreambooth.errors import InputError
from dreambooth.ingest.photos import ingest_subject


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
    assert caption_template("a brown dog lying on the grass", "dog") == "a brown {identifier} {class_noun} lying on the grass"
    assert caption_template("a sofa {with} cushions", "dog") == "a {identifier} {class_noun}, a sofa {{with}} cushions"


def test_drafts_of_a_bucket_photos_go_beside_them_in_the_bucket_and_the_next_run_keeps_them(gcs_emulator, subject_dir, tmp_path, make_config):
    from google.cloud import storage as gcs

    from dreambooth.storage import local_folder
    from dreambooth.tasks.subject import keep_drafted_captions

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

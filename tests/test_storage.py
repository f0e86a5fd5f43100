"""gs:// folders against a real GCS API emulator: resumable uploads, completion, and no half models."""

import os
import signal
import subprocess
import sys
import time

import pytest
from google.cloud import storage

from conftest import REPO
from dreambooth.errors import InputError
from dreambooth.storage import COMPLETE_MARKER, download_folder, is_complete, local_folder, upload_folder


def _blob_names(bucket, prefix):
    return sorted(b.name for b in storage.Client(project="dreambooth-test").list_blobs(bucket, prefix=prefix))


def test_a_folder_round_trips_with_resumable_uploads(gcs_emulator, tmp_path):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    big = os.urandom(20 * 1024 * 1024 + 123)  # larger than two 8 MiB chunks: a resumable upload
    (folder / "unet" / "weights.bin").write_bytes(big)
    (folder / "model_index.json").write_text("{}")
    uri = f"gs://{gcs_emulator}/roundtrip/model"
    upload_folder(folder, uri)

    assert is_complete(uri)
    assert _blob_names(gcs_emulator, "roundtrip/") == [
        f"roundtrip/model/{COMPLETE_MARKER}", "roundtrip/model/model_index.json", "roundtrip/model/unet/weights.bin"
    ]
    copy = download_folder(uri, tmp_path / "copy")
    assert (copy / "unet" / "weights.bin").read_bytes() == big
    assert not (copy / COMPLETE_MARKER).exists()


UPLOAD_SLOWLY = """
import sys
from pathlib import Path
from dreambooth.storage import upload_folder
upload_folder(Path(sys.argv[1]), sys.argv[2])
"""


def test_an_interrupted_upload_is_never_read_as_a_model(gcs_emulator, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for index in range(12):
        (folder / f"part-{index:02d}.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    uri = f"gs://{gcs_emulator}/interrupted/model"
    process = subprocess.Popen([sys.executable, "-c", UPLOAD_SLOWLY, str(folder), uri], env=os.environ.copy())
    deadline = time.time() + 120
    while not _blob_names(gcs_emulator, "interrupted/"):
        assert process.poll() is None, "the upload finished before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    assert 0 < len(_blob_names(gcs_emulator, "interrupted/")) < 12
    assert not is_complete(uri)
    with pytest.raises(InputError, match=r"interrupted/model: incomplete upload"):
        download_folder(uri, tmp_path / "copy")
    with pytest.raises(InputError, match="incomplete upload"):
        with local_folder(uri, require_complete=True):
            pass


def test_subject_photos_uploaded_by_a_user_need_no_marker(gcs_emulator, subject_dir, make_config, tmp_path):
    from dreambooth.ingest.photos import ingest_subject

    bucket = storage.Client(project="dreambooth-test").bucket(gcs_emulator)
    for photo in subject_dir.iterdir():
        bucket.blob(f"subjects/dog/{photo.name}").upload_from_filename(str(photo))
    with local_folder(f"gs://{gcs_emulator}/subjects/dog") as photos:
        result = ingest_subject(photos, tmp_path / "out", make_config())
    assert len(result.images) == 4


def test_a_subjects_file_and_its_photos_are_read_from_the_bucket(gcs_emulator, subject_dir, make_config):
    """The plan reads the file when a run starts, and fingerprints photos from their MD5s without downloading them."""
    from dreambooth.storage import content_digests
    from dreambooth.catalogue.subjects import read_subjects

    bucket = storage.Client(project="dreambooth-test").bucket(gcs_emulator)
    for photo in subject_dir.iterdir():
        bucket.blob(f"catalogue/photos/dog/{photo.name}").upload_from_filename(str(photo))
    bucket.blob("catalogue/photos/dog/.DS_Store").upload_from_string(b"finder noise")
    bucket.blob("catalogue/photos/dog/nested/other.jpg").upload_from_string(b"not this folder's")
    bucket.blob("catalogue/subjects.yaml").upload_from_string("subjects:\n  - {id: dog, photos: photos/dog, class_noun: dog}\n")

    (entry,) = read_subjects(f"gs://{gcs_emulator}/catalogue/subjects.yaml", make_config())
    assert entry.photos == f"gs://{gcs_emulator}/catalogue/photos/dog"
    assert content_digests(entry.photos) == content_digests(str(subject_dir))  # the same bytes, the same fingerprint
    with pytest.raises(InputError, match="catalogue/absent.yaml: file not found"):
        read_subjects(f"gs://{gcs_emulator}/catalogue/absent.yaml", make_config())


def test_a_catalogues_photo_folders_are_fingerprinted_from_one_listing_of_their_prefix(gcs_emulator, monkeypatch):
    """Folders side by side are read in one listing, with what each folder's own listing would give:
    nested, hidden and neighbouring objects left out, an empty folder empty."""
    from dreambooth import storage as our_storage
    from dreambooth.storage import content_digests, content_digests_of

    monkeypatch.setattr(our_storage, "ONE_LISTING_FROM", 10)  # 10 folders stand for a catalogue's hundreds

    bucket = storage.Client(project="dreambooth-test").bucket(gcs_emulator)
    for index in range(9):
        for photo in range(index % 3 + 1):
            bucket.blob(f"shelf/photos/s{index}/{photo}.jpg").upload_from_string(f"subject {index} photo {photo}".encode())
    bucket.blob("shelf/photos/s0/.DS_Store").upload_from_string(b"finder noise")
    bucket.blob("shelf/photos/s1/nested/deeper.jpg").upload_from_string(b"not this folder's")
    bucket.blob("shelf/photos/s1/_COMPLETE.json").upload_from_string(b"{}")
    bucket.blob("shelf/photos/unlisted/0.jpg").upload_from_string(b"another file's subject")
    bucket.blob("elsewhere/lone/0.jpg").upload_from_string(b"a subject on its own")
    uris = [f"gs://{gcs_emulator}/shelf/photos/s{index}" for index in range(9)]
    uris += [f"gs://{gcs_emulator}/shelf/photos/empty", f"gs://{gcs_emulator}/elsewhere/lone"]
    each = [content_digests(uri) for uri in uris]

    listings = []
    list_blobs = storage.Client.list_blobs
    monkeypatch.setattr(storage.Client, "list_blobs", lambda self, *args, **kwargs: listings.append(kwargs.get("prefix"))
                        or list_blobs(self, *args, **kwargs))
    assert content_digests_of(uris) == each
    assert sorted(listings) == ["elsewhere/lone/", "shelf/photos/"]  # the shelf's 10 folders in one listing
    assert each[1] == {"0.jpg": each[1]["0.jpg"], "1.jpg": each[1]["1.jpg"]} and each[9] == {}


def test_uploads_and_downloads_ride_out_503s_hangs_and_dropped_connections(faulty_gcs, gcs_emulator, tmp_path):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    big = os.urandom(9 * 1024 * 1024 + 7)  # two chunks of a resumable upload
    (folder / "unet" / "weights.safetensors").write_bytes(big)
    for index in range(4):
        (folder / f"part-{index}.json").write_text(f'{{"part": {index}}}')
    uri = f"gs://{gcs_emulator}/faulty/model"

    started = time.time()
    upload_folder(folder, uri)
    copy = download_folder(uri, tmp_path / "copy")
    assert time.time() - started < faulty_gcs.hang_seconds  # a hung request was given up on and retried, not waited out

    assert (copy / "unet" / "weights.safetensors").read_bytes() == big
    assert sorted(p.name for p in copy.glob("part-*.json")) == [f"part-{i}.json" for i in range(4)]
    assert all(count >= 3 for count in faulty_gcs.injected.values()), faulty_gcs.injected  # every kind of fault was met
    assert faulty_gcs.faults_left == 0


def test_the_model_loader_reads_only_a_complete_gs_folder(gcs_emulator, tiny_model_dir, tmp_path, monkeypatch):
    from dreambooth.models.loading import load_pipeline

    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))  # nothing fetched before
    uri = f"gs://{gcs_emulator}/models/tiny-sd"
    upload_folder(tiny_model_dir, uri)
    storage.Client(project="dreambooth-test").bucket(gcs_emulator).blob(f"models/tiny-sd/{COMPLETE_MARKER}").delete()
    with pytest.raises(InputError, match=f"{uri}: incomplete upload"):
        load_pipeline(uri)

    upload_folder(tiny_model_dir, uri)
    image = load_pipeline(uri)("a dog", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    [fetched] = (tmp_path / "cache" / "gcs").rglob(COMPLETE_MARKER)
    assert (fetched.parent / "model_index.json").is_file()


@pytest.mark.parametrize("command", [
    ("run", "--config", "tiny", "--subjects", str(REPO / "examples" / "subjects.yaml"), "--output-dir", "s3://bucket/x"),
    ("ingest", "--config", "tiny", "--subject-dir", str(REPO / "examples" / "subjects" / "dog"), "--class-noun", "dog",
     "--output-dir", "s3://bucket/x"),
])
def test_an_output_dir_under_another_scheme_is_refused_before_anything_starts(tmp_path, command):
    """Not a local folder named `s3:` and a run that starts: one line naming the option, exit 2, nothing written."""
    from conftest import cli

    result = cli(*command, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == ("error: --output-dir: 's3://bucket/x': s3:// is not supported; give a local folder or "
                                     "gs://bucket/prefix")
    assert list(tmp_path.iterdir()) == []

"""Photos uploaded as one archive: read safely, with limits, each refusal naming the entry."""

import io
import tarfile
import zipfile

import pytest
from google.cloud import storage

from conftest import SAMPLE_SUBJECT
from dreambooth import archives
from dreambooth.errors import InputError
from dreambooth.ingest.photos import ingest_subject
from dreambooth.storage import content_digests, local_folder


def _zip(path, entries: dict, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def _photos() -> dict:
    return {path.name: path.read_bytes() for path in sorted(SAMPLE_SUBJECT.glob("*.jpg"))}


def test_a_zip_of_photos_in_a_folder_ingests_like_the_folder(tmp_path, make_config):
    entries = {f"my dog/{name}": data for name, data in _photos().items()}
    entries["__MACOSX/my dog/._00.jpg"] = b"finder metadata"
    upload = _zip(tmp_path / "dog.zip", entries)
    with local_folder(str(upload)) as folder:
        assert sorted(p.name for p in folder.iterdir()) == sorted(_photos())
        result = ingest_subject(folder, tmp_path / "ingested", make_config())
    assert len(result.images) == 4
    assert list(content_digests(str(upload))) == ["dog.zip"]  # the archive's bytes fingerprint the subject


def test_a_tar_on_gcs_is_fetched_and_unpacked(gcs_emulator, tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in _photos().items():
            info = tarfile.TarInfo(f"dog/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    storage.Client(project="dreambooth-test").bucket(gcs_emulator).blob("uploads/dog.tar.gz").upload_from_string(buffer.getvalue())
    with local_folder(f"gs://{gcs_emulator}/uploads/dog.tar.gz") as folder:
        assert sorted(p.name for p in folder.iterdir()) == sorted(_photos())


@pytest.mark.parametrize("name, reason", [
    ("../../outside.jpg", "points outside the archive's folder"),
    ("/etc/cron.d/photo.jpg", "points outside the archive's folder"),
])
def test_paths_that_leave_the_folder_are_refused(tmp_path, name, reason):
    upload = _zip(tmp_path / "evil.zip", {**_photos(), name: b"x"})
    with pytest.raises(InputError, match=f"evil.zip: entry '{name}' {reason}"):
        with local_folder(str(upload)):
            pass
    assert not (tmp_path / "outside.jpg").exists()


def test_links_are_refused(tmp_path):
    with tarfile.open(tmp_path / "linked.tar", "w") as archive:
        link = tarfile.TarInfo("photos/01.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/home/someone/private.jpg"
        archive.addfile(link)
    with pytest.raises(InputError, match="linked.tar: entry 'photos/01.jpg' is a link or a device"):
        with local_folder(str(tmp_path / "linked.tar")):
            pass


def test_too_many_entries_a_bomb_and_too_much_data_are_refused(tmp_path, monkeypatch):
    many = _zip(tmp_path / "many.zip", {f"{i:03d}.jpg": b"x" for i in range(archives.MAX_ENTRIES + 1)})
    with pytest.raises(InputError, match=f"many.zip: {archives.MAX_ENTRIES + 1} entries; at most {archives.MAX_ENTRIES}"):
        with local_folder(str(many)):
            pass
    bomb = _zip(tmp_path / "bomb.zip", {**_photos(), "zeros.jpg": bytes(30 * 2**20)})
    with pytest.raises(InputError, match=r"bomb.zip: unpacks \d+ times its size \(largest entry 'zeros.jpg'\)"):
        with local_folder(str(bomb)):
            pass
    monkeypatch.setattr(archives, "MAX_UNPACKED_BYTES", 50_000)  # the limit itself, made small enough to reach
    big = _zip(tmp_path / "big.zip", _photos(), compression=zipfile.ZIP_STORED)
    with pytest.raises(InputError, match=r"big.zip: unpacks to more than 0 MiB \(at entry '\d\d.jpg'\)"):
        with local_folder(str(big)):
            pass

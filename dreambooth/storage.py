"""Local paths and `gs://bucket/prefix` URIs, one interface for both.

Folders are what the stages exchange (subject photos, class images, models, samples). A
folder uploaded to GCS becomes visible as complete only when its manifest (`_COMPLETE.json`,
file names and sizes) is written, last; readers that need a whole folder (a model) check it,
so an interrupted upload never passes for a model. Large files go up as resumable uploads in
8 MiB chunks; transient errors (429/5xx, dropped connections, requests that hang past
DREAMBOOTH_GCS_TIMEOUT seconds) are retried. With STORAGE_EMULATOR_HOST set (tests), the
client talks to that emulator with anonymous credentials.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from dreambooth.errors import InputError

GCS_SCHEME = "gs://"
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
COMPLETE_MARKER = "_COMPLETE.json"
CHUNK_SIZE = 8 * 1024 * 1024  # resumable uploads; a multiple of 256 KiB as GCS requires
FOLDER_LISTINGS = 16  # folders listed at once (content_digests_of)
# gs:// folders under one prefix from which one listing of the prefix reads them all: a listing's page holds
# 1,000 objects, so 100 folders of a few photos cost as many requests either way unless the prefix holds far
# more than the batch (a shard of a catalogue lists its own folders)
ONE_LISTING_FROM = 100


def is_gcs(uri: str) -> bool:
    return str(uri).startswith(GCS_SCHEME)


def unsupported_location(value: str) -> Optional[str]:
    """Why `value` is not a place this project reads or writes (None: a local path or gs://bucket/prefix).
    Any other scheme would otherwise be taken for a local folder named after it (`s3:/bucket/x`)."""
    scheme = _SCHEME.match(str(value))
    if scheme and not is_gcs(value):
        return f"{scheme[1]}:// is not supported; give a local folder or gs://bucket/prefix"
    return None


def check_location(value: str, setting: str) -> str:
    """`value` when it is a local path or gs:// URI; InputError naming `setting` otherwise."""
    if reason := unsupported_location(value):
        raise InputError(f"{setting}: {value!r}: {reason}")
    return value


def split_gcs(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[len(GCS_SCHEME) :].partition("/")
    if not bucket:
        raise InputError(f"{uri}: not a gs://bucket/prefix URI")
    return bucket, prefix.strip("/")


def _client():
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "local"))
    return storage.Client()


def _retry():
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_deadline(600)


def _timeout() -> float:
    """Seconds one request may take before it is retried (a hung connection, a stalled proxy)."""
    return float(os.environ.get("DREAMBOOTH_GCS_TIMEOUT", "120"))


def upload_folder(local_dir: Path, uri: str) -> str:
    """Upload every file under local_dir to uri, then the completion manifest; returns uri."""
    bucket_name, prefix = split_gcs(uri)
    bucket = _client().bucket(bucket_name)
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    for path in files:
        relative = path.relative_to(local_dir).as_posix()
        blob = bucket.blob(f"{prefix}/{relative}" if prefix else relative, chunk_size=CHUNK_SIZE)
        blob.upload_from_filename(str(path), retry=_retry(), timeout=_timeout())
    manifest = {"files": {p.relative_to(local_dir).as_posix(): p.stat().st_size for p in files}}
    marker = bucket.blob(f"{prefix}/{COMPLETE_MARKER}" if prefix else COMPLETE_MARKER)
    marker.upload_from_string(json.dumps(manifest), content_type="application/json", retry=_retry(), timeout=_timeout())
    return uri


def upload_file(path: Path, uri: str) -> str:
    """One file to a gs:// object; returns uri."""
    bucket_name, name = split_gcs(uri)
    _client().bucket(bucket_name).blob(name, chunk_size=CHUNK_SIZE).upload_from_filename(str(path), retry=_retry(), timeout=_timeout())
    return uri


def is_complete(uri: str) -> bool:
    bucket_name, prefix = split_gcs(uri)
    return _client().bucket(bucket_name).blob(f"{prefix}/{COMPLETE_MARKER}").exists(retry=_retry(), timeout=_timeout())


def download_folder(uri: str, local_dir: Path, require_complete: bool = True) -> Path:
    """Copy a gs:// folder to local_dir; with require_complete, only one whose upload finished."""
    bucket_name, prefix = split_gcs(uri)
    client = _client()
    bucket = client.bucket(bucket_name)
    marker = bucket.blob(f"{prefix}/{COMPLETE_MARKER}")
    expected = None
    if marker.exists(retry=_retry(), timeout=_timeout()):
        expected = json.loads(marker.download_as_bytes(retry=_retry(), timeout=_timeout()))["files"]
    elif require_complete:
        raise InputError(f"{uri}: incomplete upload (no {COMPLETE_MARKER}); it is not a finished folder")
    found = False
    for blob in client.list_blobs(bucket_name, prefix=f"{prefix}/" if prefix else None, retry=_retry(), timeout=_timeout()):
        relative = blob.name[len(prefix) + 1 :] if prefix else blob.name
        if not relative or relative == COMPLETE_MARKER or relative.endswith("/"):
            continue
        if expected is not None and relative not in expected:
            continue  # written after the manifest by someone else: not part of this folder
        target = Path(local_dir) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(target), retry=_retry(), timeout=_timeout())
        found = True
    if not found:
        raise InputError(f"{uri}: no files under this prefix")
    return Path(local_dir)


def cached_folder(uri: str, cache_root: Path) -> Path:
    """A complete gs:// folder (a model) as a local copy under cache_root, fetched once per upload:
    the copy is keyed by the folder's completion manifest, so a re-upload is fetched again."""
    bucket_name, prefix = split_gcs(uri)
    marker = _client().bucket(bucket_name).blob(f"{prefix}/{COMPLETE_MARKER}")
    if not marker.exists(retry=_retry(), timeout=_timeout()):
        raise InputError(f"{uri}: incomplete upload (no {COMPLETE_MARKER}); it is not a finished folder")
    manifest = marker.download_as_bytes(retry=_retry(), timeout=_timeout())
    target = cache_root / bucket_name / prefix / hashlib.sha256(manifest).hexdigest()[:16]
    if (target / COMPLETE_MARKER).is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=".fetching-", dir=cache_root))
    download_folder(uri, staging, require_complete=True)
    (staging / COMPLETE_MARKER).write_bytes(manifest)  # last: a half-fetched copy is never reused
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(target)
    except OSError:  # another process fetched it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


@contextmanager
def local_folder(uri: str, require_complete: bool = False) -> Iterator[Path]:
    """A local view of a folder: the path itself, or a temporary download of a gs:// folder; a .zip or
    .tar (local or gs://) is unpacked, safely, into a temporary folder (dreambooth.archives)."""
    from dreambooth.archives import extract_photos, is_archive

    if is_archive(uri):
        with tempfile.TemporaryDirectory(prefix="dreambooth-archive-") as scratch:
            yield extract_photos(_local_file(uri, Path(scratch)), Path(scratch) / "photos", uri)
        return
    if not is_gcs(uri):
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="dreambooth-gcs-") as scratch:
        yield download_folder(uri, Path(scratch) / "folder", require_complete=require_complete)


def _local_file(uri: str, scratch: Path) -> Path:
    """A file as a local path: itself, or downloaded from gs:// into scratch."""
    if not is_gcs(uri):
        if not Path(uri).is_file():
            raise InputError(f"{uri}: file not found")
        return Path(uri)
    bucket_name, name = split_gcs(uri)
    blob = _client().bucket(bucket_name).blob(name)
    if not blob.exists(retry=_retry(), timeout=_timeout()):
        raise InputError(f"{uri}: file not found")
    target = scratch / name.rsplit("/", 1)[-1]
    blob.download_to_filename(str(target), retry=_retry(), timeout=_timeout())
    return target


def read_text(uri: str) -> str:
    """A whole small text file (a config, a subjects list), local or gs://."""
    if not is_gcs(uri):
        path = Path(uri)
        if not path.is_file():
            raise InputError(f"{uri}: file not found")
        data = path.read_bytes()
    else:
        bucket_name, name = split_gcs(uri)
        blob = _client().bucket(bucket_name).blob(name)
        if not blob.exists(retry=_retry(), timeout=_timeout()):
            raise InputError(f"{uri}: file not found")
        data = blob.download_as_bytes(retry=_retry(), timeout=_timeout())
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{uri}: not a text file (byte {error.start} is not UTF-8)") from None


def _visible(relative: str) -> bool:
    return not any(part.startswith(".") for part in relative.split("/")) and relative != COMPLETE_MARKER


def content_digests(uri: str) -> dict[str, str]:
    """{file name: MD5 of its bytes} for the files directly in a folder, local or gs://.

    MD5 because GCS keeps it for every uploaded object: a bucket's photos are fingerprinted
    without downloading them. Hidden files and our completion marker do not count.
    """
    from dreambooth.archives import is_archive

    if is_archive(uri):  # the archive's own bytes: a changed photo changes them
        with tempfile.TemporaryDirectory() as scratch:
            return {uri.rsplit("/", 1)[-1]: hashlib.md5(_local_file(uri, Path(scratch)).read_bytes()).hexdigest()}
    if not is_gcs(uri):
        folder = Path(uri)
        if not folder.is_dir():
            return {}
        return {
            path.name: hashlib.md5(path.read_bytes()).hexdigest()
            for path in sorted(folder.iterdir())
            if path.is_file() and _visible(path.name)
        }
    bucket_name, prefix = split_gcs(uri)
    digests = {}
    for blob in _client().list_blobs(bucket_name, prefix=f"{prefix}/" if prefix else None, delimiter="/", retry=_retry()):
        relative = blob.name[len(prefix) + 1 :] if prefix else blob.name
        if relative and _visible(relative):
            digests[relative] = _blob_digest(blob)
    return dict(sorted(digests.items()))


def content_digests_of(uris: list[str]) -> list[dict[str, str]]:
    """content_digests of many folders, in their order (a batch's photos).

    A catalogue's photo folders sit side by side under one prefix (gs://bucket/photos/<subject>):
    from ONE_LISTING_FROM of them, that prefix is read in one paged listing (a thousand objects a
    request) instead of a listing per folder: 10,000 requests for 10,000 subjects. The rest are
    listed FOLDER_LISTINGS at a time.
    """
    from dreambooth.archives import is_archive

    siblings: dict[tuple[str, str], set[str]] = {}
    for uri in uris:
        bucket_name, prefix = split_gcs(uri) if is_gcs(uri) and not is_archive(uri) else ("", "")
        if prefix:
            siblings.setdefault((bucket_name, prefix.rpartition("/")[0]), set()).add(prefix)
    listed: dict[tuple[str, str], dict[str, str]] = {}
    for (bucket_name, parent), folders in siblings.items():
        if len(folders) >= ONE_LISTING_FROM:
            listed.update(_digests_of_folders_under(bucket_name, parent, folders))

    def digests(uri: str) -> dict[str, str]:
        key = split_gcs(uri) if is_gcs(uri) else None
        return listed[key] if key in listed else content_digests(uri)

    with ThreadPoolExecutor(max_workers=FOLDER_LISTINGS) as pool:
        return list(pool.map(digests, uris))


def _digests_of_folders_under(bucket_name: str, parent: str, folders: set[str]) -> dict[tuple[str, str], dict[str, str]]:
    """{(bucket, folder): content_digests} for folders directly under `parent`, from one listing of it."""
    start = f"{parent}/" if parent else ""
    # The glob keeps deeper objects (a subject's nested folders, other prefixes' trees) out of the
    # listing; a parent whose name would read as a glob is listed whole and filtered here.
    glob = None if any(character in start for character in "*?[]{}\\") else f"{start}*/*"
    found: dict[tuple[str, str], dict[str, str]] = {(bucket_name, folder): {} for folder in folders}
    blobs = _client().list_blobs(bucket_name, prefix=start or None, match_glob=glob,
                                 fields="items(name,md5Hash),nextPageToken", retry=_retry(), timeout=_timeout())
    for blob in blobs:
        folder, _, name = blob.name.rpartition("/")
        if (bucket_name, folder) in found and name and _visible(name):
            found[(bucket_name, folder)][name] = _blob_digest(blob)
    return {key: dict(sorted(digests.items())) for key, digests in found.items()}


def _blob_digest(blob) -> str:
    if blob.md5_hash:
        return base64.b64decode(blob.md5_hash).hex()
    return hashlib.md5(blob.download_as_bytes(retry=_retry())).hexdigest()  # composite objects carry no MD5: hash the bytes


def check_writable(uri: str) -> str:
    """Write and delete a small object under `uri` (preflight); InputError naming the reason if refused."""
    from google.api_core import exceptions
    from google.auth.exceptions import GoogleAuthError
    from google.cloud.storage.retry import DEFAULT_RETRY

    bucket_name, prefix = split_gcs(uri)
    name = f"{prefix}/.preflight-{uuid.uuid4().hex}" if prefix else f".preflight-{uuid.uuid4().hex}"
    quick = DEFAULT_RETRY.with_deadline(20)
    try:
        blob = _client().bucket(bucket_name).blob(name)
        blob.upload_from_string(b"preflight", retry=quick, timeout=10)
        blob.delete(retry=quick, timeout=10)
    except (exceptions.GoogleAPIError, GoogleAuthError, OSError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(f"{uri}: cannot write there ({reason[:300]})") from None
    return f"writable ({uri})"


def list_files(uri: str) -> list[str]:
    """Every file under a folder or prefix, local or gs://, as paths relative to it ([] when there is none)."""
    if not is_gcs(uri):
        root = Path(uri)
        return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()) if root.is_dir() else []
    bucket_name, prefix = split_gcs(uri)
    blobs = _client().list_blobs(bucket_name, prefix=f"{prefix}/" if prefix else None, retry=_retry(), timeout=_timeout())
    return sorted(blob.name[len(prefix) + 1 :] if prefix else blob.name for blob in blobs)


def read_bytes(uri: str) -> bytes:
    if not is_gcs(uri):
        return Path(uri).read_bytes()
    bucket_name, name = split_gcs(uri)
    return _client().bucket(bucket_name).blob(name).download_as_bytes(retry=_retry(), timeout=_timeout())


def write_bytes(uri: str, data: bytes) -> None:
    """Replace a file or object's contents."""
    if not is_gcs(uri):
        Path(uri).write_bytes(data)
        return
    bucket_name, name = split_gcs(uri)
    _client().bucket(bucket_name).blob(name).upload_from_string(data, retry=_retry(), timeout=_timeout())


def delete_file(uri: str) -> None:
    if not is_gcs(uri):
        Path(uri).unlink(missing_ok=True)
        return
    bucket_name, name = split_gcs(uri)
    _client().bucket(bucket_name).blob(name).delete(retry=_retry(), timeout=_timeout())

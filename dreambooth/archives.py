"""Subject photos uploaded as one .zip or .tar (.tar.gz, .tgz), as hosted trainers accept them.

An archive is untrusted input: it is unpacked without following its paths (every photo lands
flat in the target folder under its own base name, so `../` or an absolute name cannot write
elsewhere), links and devices are refused, and the number of entries, the unpacked size and the
compression ratio are bounded before anything is written. Each refusal names the entry.
"""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator

from dreambooth.errors import InputError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
MAX_ENTRIES = 200
MAX_UNPACKED_BYTES = 512 * 1024 * 1024
MAX_RATIO = 100  # unpacked / packed bytes: photos hardly compress, bombs compress a thousandfold
IGNORED_PREFIXES = ("__MACOSX/",)  # what macOS's Finder adds beside the photos


def is_archive(uri: str) -> bool:
    return str(uri).lower().endswith(ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class _Entry:
    name: str
    size: int
    open: Callable[[], BinaryIO]
    regular: bool


def _zip_entries(archive: zipfile.ZipFile) -> Iterator[_Entry]:
    for info in archive.infolist():
        if info.is_dir():
            continue
        # Unix mode in the high bits: a link is stored as a file whose content is its target.
        is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
        yield _Entry(info.filename, info.file_size, lambda info=info: archive.open(info), not is_link)


def _tar_entries(archive: tarfile.TarFile) -> Iterator[_Entry]:
    for member in archive.getmembers():
        if member.isdir():
            continue
        yield _Entry(member.name, member.size, lambda member=member: archive.extractfile(member), member.isfile())


def extract_photos(archive_path: Path, target: Path, label: str) -> Path:
    """Unpack the archive's files flat into target (created); `label` names the archive in errors."""
    packed = archive_path.stat().st_size
    try:
        if zipfile.is_zipfile(archive_path):
            with zipfile.ZipFile(archive_path) as archive:
                return _extract(list(_zip_entries(archive)), packed, target, label)
        with tarfile.open(archive_path) as archive:
            return _extract(list(_tar_entries(archive)), packed, target, label)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"{label}: not a readable zip or tar archive ({error})") from None


def _extract(entries: list[_Entry], packed: int, target: Path, label: str) -> Path:
    entries = [entry for entry in entries if not entry.name.startswith(IGNORED_PREFIXES)]
    if len(entries) > MAX_ENTRIES:
        raise InputError(f"{label}: {len(entries)} entries; at most {MAX_ENTRIES} are read from a photo archive")
    unpacked, names = 0, {}
    for entry in entries:
        path = PurePosixPath(entry.name)
        if not entry.regular:
            raise InputError(f"{label}: entry {entry.name!r} is a link or a device, not a photo")
        if path.is_absolute() or ".." in path.parts:
            raise InputError(f"{label}: entry {entry.name!r} points outside the archive's folder")
        if path.name in names:
            raise InputError(f"{label}: entries {names[path.name]!r} and {entry.name!r} have the same file name")
        names[path.name] = entry.name
        unpacked += entry.size
        if unpacked > MAX_UNPACKED_BYTES:
            raise InputError(f"{label}: unpacks to more than {MAX_UNPACKED_BYTES // 2**20} MiB (at entry {entry.name!r})")
    if packed and unpacked / packed > MAX_RATIO:
        largest = max(entries, key=lambda entry: entry.size)
        raise InputError(f"{label}: unpacks {unpacked / packed:.0f} times its size (largest entry {largest.name!r}); photos do not compress like that")
    target.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        name = PurePosixPath(entry.name).name
        if name.startswith("."):
            continue
        with entry.open() as source, open(target / name, "wb") as copy:
            # Read at most the declared size: a lying header cannot grow the file past the limit.
            shutil.copyfileobj(_bounded(source, entry.size), copy)
    return target


class _bounded:
    """A file-like reader that stops after `limit` bytes and refuses to have been lied to."""

    def __init__(self, source: BinaryIO, limit: int):
        self.source, self.left = source, limit

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        data = self.source.read(self.left if size < 0 else min(size, self.left))
        self.left -= len(data)
        return data

"""Where LPIPS weights come from: `lpips://alexnet-v0.1` (the default `evaluation.lpips_model`) names
them by their public sources; on first use both files are downloaded, checked and converted into the
model cache ($DREAMBOOTH_CACHE/lpips/alexnet-v0.1), where `dreambooth warm-cache` puts them on a
cluster. No torch here until the conversion (dreambooth.models.lpips): preflight asks where the
weights are without loading it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

from dreambooth.errors import InputError

LPIPS_SCHEME = "lpips://"
DOWNLOAD_SECONDS = 30
# name -> (torchvision AlexNet checkpoint, SHA-256 prefix torchvision checks it by, LPIPS v0.1 heads)
LPIPS_SOURCES = {
    "alexnet-v0.1": (
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        "7be5be79",
        "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth",
    ),
}


def _lpips_name(reference: str, setting: str) -> str:
    name = reference[len(LPIPS_SCHEME):]
    if name not in LPIPS_SOURCES:
        raise InputError(f"{setting}: unknown {reference!r}; known: {', '.join(LPIPS_SCHEME + n for n in LPIPS_SOURCES)}")
    return name


def lpips_cache_folder(name: str) -> Path:
    from dreambooth.models.cache import default_cache_dir

    return default_cache_dir() / "lpips" / name


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _download(url: str, target: Path, setting: str) -> Path:
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_SECONDS) as response, open(target, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except OSError as error:
        raise InputError(f"{setting}: cannot download {url} ({error}); run `dreambooth warm-cache` where it is reachable") from None
    return target


def fetch_lpips(reference: str, setting: str = "evaluation.lpips_model") -> Path:
    """The converted weights for an `lpips://` reference, downloaded into the model cache on first use."""
    name = _lpips_name(reference, setting)
    folder = lpips_cache_folder(name)
    if (folder / "model.safetensors").is_file():
        return folder
    if _offline():
        raise InputError(f"{setting}: {reference} is not in the model cache ({folder}) and HF_HUB_OFFLINE is set; "
                         "run `dreambooth warm-cache` where the network is reachable")
    alexnet_url, alexnet_sha, heads_url = LPIPS_SOURCES[name]
    with tempfile.TemporaryDirectory() as scratch:
        alexnet = _download(alexnet_url, Path(scratch) / "alexnet.pth", setting)
        digest = hashlib.sha256(alexnet.read_bytes()).hexdigest()
        if not digest.startswith(alexnet_sha):
            raise InputError(f"{setting}: {alexnet_url} has SHA-256 {digest[:8]}..., expected {alexnet_sha}...")
        heads = _download(heads_url, Path(scratch) / "alex.pth", setting)
        staging = folder.with_name(f".{folder.name}.partial")
        from dreambooth.models.lpips import convert_lpips_weights

        convert_lpips_weights(alexnet, heads, staging)
        shutil.rmtree(folder, ignore_errors=True)
        staging.replace(folder)  # whole or absent: a cut download never passes for weights
    return folder


def describe_lpips(reference: str, setting: str = "evaluation.lpips_model") -> str:
    """Preflight: in the cache, or both sources answer (HEAD, short timeout); InputError otherwise."""
    name = _lpips_name(reference, setting)
    folder = lpips_cache_folder(name)
    if (folder / "model.safetensors").is_file():
        return f"in the model cache ({folder})"
    if _offline():
        raise InputError(f"{setting}: {reference} is not in the model cache ({folder}) and HF_HUB_OFFLINE is set")
    alexnet_url, _, heads_url = LPIPS_SOURCES[name]
    for url in (alexnet_url, heads_url):
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10).close()
        except OSError as error:
            raise InputError(f"{setting}: {reference} is not in the model cache ({folder}) and {url} is unreachable ({error})") from None
    return "downloaded into the model cache on first use"

"""LPIPS (Zhang et al., 2018) on an AlexNet backbone in plain torch, without torchvision.

torchvision installs here only beside a 5.5 GB CUDA torch, so the backbone is rebuilt from
plain layers with torchvision's exact module indices: its `alexnet` state dict and the LPIPS
`alex.pth` linear heads load into it unchanged (see `convert_lpips_weights`). A folder holds
`config.json` and `model.safetensors`, like every other model here.

`lpips://alexnet-v0.1` (the default `evaluation.lpips_model`) names those weights by their public
sources: on first use both files are downloaded, checked and converted into the model cache
($DREAMBOOTH_CACHE/lpips/alexnet-v0.1), where `dreambooth warm-cache` puts them on a cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import torch
from torch import nn

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

# ImageNet-statistics shift and scale LPIPS applies to inputs in [-1, 1].
_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
TAPPED_LAYERS = (1, 4, 7, 9, 11)  # the ReLU after each convolution of alexnet.features
TAPPED_CHANNELS = (64, 192, 384, 256, 256)


class LpipsAlexNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
        )
        # One 1x1 convolution per tapped layer, weighting channel differences (non-negative).
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in TAPPED_CHANNELS)

    def _taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - _SHIFT.to(images)) / _SCALE.to(images)
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in TAPPED_LAYERS:
                taps.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return taps

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Distance per pair; inputs are RGB in [-1, 1], shape (N, 3, H, W)."""
        total = torch.zeros(first.shape[0], device=first.device)
        for lin, a, b in zip(self.lins, self._taps(first), self._taps(second)):
            total = total + lin((a - b).pow(2)).mean(dim=(1, 2, 3))
        return total


def save_lpips(model: LpipsAlexNet, folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "lpips", "backbone": "alexnet", "version": "0.1"}))
    return folder


def load_lpips(folder: Path) -> LpipsAlexNet:
    from safetensors.torch import load_file

    model = LpipsAlexNet()
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.eval().requires_grad_(False)


def convert_lpips_weights(alexnet_checkpoint: Path, lpips_heads: Path, folder: Path) -> Path:
    """torchvision's alexnet .pth + LPIPS' alex.pth (v0.1) -> a folder load_lpips reads."""
    model = LpipsAlexNet()
    backbone = torch.load(alexnet_checkpoint, map_location="cpu", weights_only=True)
    heads = torch.load(lpips_heads, map_location="cpu", weights_only=True)
    state = {k: v for k, v in backbone.items() if k.startswith("features.")}
    state.update({f"lins.{i}.weight": heads[f"lin{i}.model.1.weight"] for i in range(len(TAPPED_CHANNELS))})
    model.load_state_dict(state)
    return save_lpips(model, folder)


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


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Convert torchvision AlexNet + LPIPS heads into a model folder")
    parser.add_argument("--alexnet", type=Path, required=True, help="alexnet-owt-7be5be79.pth from torchvision")
    parser.add_argument("--lpips", type=Path, required=True, help="alex.pth (v0.1) from the lpips package")
    parser.add_argument("--out", type=Path, required=True)
    arguments = parser.parse_args()
    print(convert_lpips_weights(arguments.alexnet, arguments.lpips, arguments.out))

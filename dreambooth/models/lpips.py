"""LPIPS (Zhang et al., 2018) on an AlexNet backbone in plain torch, without torchvision.

torchvision installs here only beside a 5.5 GB CUDA torch, so the backbone is rebuilt from
plain layers with torchvision's exact module indices: its `alexnet` state dict and the LPIPS
`alex.pth` linear heads load into it unchanged (see `convert_lpips_weights`). A folder holds
`config.json` and `model.safetensors`, like every other model here.

Where the weights come from (`lpips://alexnet-v0.1`, downloaded and converted into the model cache)
is dreambooth.models.lpips_weights, which needs no torch until it converts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

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


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Convert torchvision AlexNet + LPIPS heads into a model folder")
    parser.add_argument("--alexnet", type=Path, required=True, help="alexnet-owt-7be5be79.pth from torchvision")
    parser.add_argument("--lpips", type=Path, required=True, help="alex.pth (v0.1) from the lpips package")
    parser.add_argument("--out", type=Path, required=True)
    arguments = parser.parse_args()
    print(convert_lpips_weights(arguments.alexnet, arguments.lpips, arguments.out))

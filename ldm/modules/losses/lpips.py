"""LPIPS perceptual distance (VGG16 features + learned linear heads), loaded only from local files.

The module layout gives the original keys (``net.slice1.0.weight`` ... ``lin4.model.1.weight``,
``scaling_layer.shift/scale``). Weights can come from one file holding all of them, or from two files: the
LPIPS heads (``vgg.pth``, keys ``lin*.model.1.weight``) and torchvision's VGG16 (keys ``features.<i>.*``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)
CHANNELS = (64, 128, 256, 512, 512)
# VGG16 ``features`` layout: conv widths with "M" for max-pooling; slices end after relu1_2 ... relu5_3.
_VGG_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_SLICE_BOUNDS = (0, 4, 9, 16, 23, 30)


class ScalingLayer(nn.Module):
    """Maps [-1, 1] images to the input statistics LPIPS was trained with."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 3, H, W]."""
        return (x - self.shift) / self.scale


class VGG16Features(nn.Module):
    """The first 30 layers of VGG16 ``features`` in five slices, returning the five relu activations."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in _VGG_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, int(item), 3, padding=1), nn.ReLU(inplace=False)]
                in_ch = int(item)
        for k in range(5):
            block = nn.Sequential()
            for i in range(_SLICE_BOUNDS[k], _SLICE_BOUNDS[k + 1]):
                block.add_module(str(i), layers[i])
            setattr(self, f"slice{k + 1}", block)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> five feature maps."""
        feats = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            feats.append(x)
        return feats


class NetLinLayer(nn.Module):
    """1x1 convolution to one channel (after dropout, as in the original layout ``model.1``)."""

    def __init__(self, chn_in: int, chn_out: int = 1, use_dropout: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout()] if use_dropout else []
        layers.append(nn.Conv2d(chn_in, chn_out, 1, stride=1, padding=0, bias=False))
        self.model = nn.Sequential(*layers)


def _normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + eps)


def _vgg_key(key: str) -> str:
    """torchvision ``features.<i>.<p>`` -> ``net.slice<k>.<i>.<p>``."""
    _, index, param = key.split(".")
    k = next(s for s in range(5) if _SLICE_BOUNDS[s] <= int(index) < _SLICE_BOUNDS[s + 1])
    return f"net.slice{k + 1}.{index}.{param}"


def read_lpips_weights(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """Merge LPIPS / VGG16 weight files (safely read) into this module's key layout."""
    from ldm.checkpoint import load_state_dict_file

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    merged: dict[str, torch.Tensor] = {}
    for path in paths:
        for key, value in load_state_dict_file(Path(path)).items():
            if key.startswith("features.") and key.count(".") == 2:
                if int(key.split(".")[1]) < _SLICE_BOUNDS[-1]:
                    merged[_vgg_key(key)] = value
            elif key.startswith(("net.", "lin", "scaling_layer.")):
                merged[key] = value
    return merged


class LPIPS(nn.Module):
    """Learned perceptual distance; inputs [B, 3, H, W] in [-1, 1] -> [B, 1, 1, 1]. Frozen, always in eval mode."""

    def __init__(self, weights: str | os.PathLike | Sequence[str | os.PathLike], use_dropout: bool = True) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features()
        for k, ch in enumerate(CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(ch, use_dropout=use_dropout))
        sd = read_lpips_weights(weights)
        own = self.state_dict()
        missing = [k for k in own if k not in sd and not k.startswith("scaling_layer.")]
        if missing:
            raise ValueError(f"LPIPS weights {weights} lack {len(missing)} tensors (e.g. {missing[:2]}): give the "
                             f"LPIPS heads (vgg.pth, keys lin*.model.1.weight) AND the VGG16 weights (torchvision "
                             f"vgg16 state_dict, keys features.*), or one file with both")
        self.load_state_dict({k: sd.get(k, v) for k, v in own.items()})
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        """Stays in eval mode: the heads' dropout belongs to LPIPS's own training, not to its use as a loss."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance between ``x`` and ``y`` [B, 3, H, W] -> [B, 1, 1, 1]."""
        fx, fy = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        total = 0
        for k, (a, b) in enumerate(zip(fx, fy)):
            diff = (_normalize(a) - _normalize(b)) ** 2
            total = total + getattr(self, f"lin{k}").model(diff).mean(dim=(2, 3), keepdim=True)
        return total

"""Evaluation maths of the default model: prompt adherence of pictures, CLIP scores, reconstruction PSNR."""
from __future__ import annotations

import copy
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldm.data.synthetic_shapes import combinations, plain_caption
from ldm.default_model.classify import read_picture

logger = logging.getLogger(__name__)
ATTRIBUTES = ("colour", "shape", "background", "all")


@dataclass
class Adherence:
    """Counts of pictures that show the prompted colour, shape, background and all three."""

    total: int = 0
    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ATTRIBUTES, 0))
    by_group: dict[str, dict[str, list[int]]] = field(default_factory=lambda: defaultdict(dict))
    misses: Counter = field(default_factory=Counter)  # "attribute: prompted -> read" of the wrong readings

    def add(self, picture: np.ndarray, colour: str, shape: str, background: str,
            seed: int | None = None) -> dict[str, bool]:
        """Classify one RGB uint8 picture [H, W, 3] generated for this combination (and ``seed``, counted as a
        group of its own when given); returns the agreement."""
        reading = read_picture(picture)
        match = reading.matches(colour, shape, background)
        for name, wanted, seen in (("colour", colour, reading.colour), ("shape", shape, reading.shape),
                                   ("background", background, reading.background)):
            if not match[name]:
                self.misses[f"{name}: {wanted} -> {seen}"] += 1
        self.total += 1
        for k in ATTRIBUTES:
            self.hits[k] += int(match[k])
        groups = [("colour", colour), ("shape", shape), ("background", background)]
        for group, value in groups + ([("seed", str(seed))] if seed is not None else []):
            counts = self.by_group[group].setdefault(value, [0, 0])
            counts[0] += int(match["all"])
            counts[1] += 1
        return match

    def rates(self) -> dict[str, float]:
        """Share of pictures right per attribute and for all three."""
        return {k: self.hits[k] / max(1, self.total) for k in ATTRIBUTES}

    def breakdown(self) -> dict[str, dict[str, float]]:
        """All-three rate per prompted colour, shape and background (and seed, when given)."""
        return {g: {v: c[0] / c[1] for v, c in sorted(values.items())} for g, values in self.by_group.items()}


def evaluation_prompts(seeds: Sequence[int]) -> list[tuple[str, tuple[str, str, str], int]]:
    """(prompt, (colour, shape, background), seed) for every combination and seed."""
    return [(plain_caption(*c), c, s) for s in seeds for c in combinations()]


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per picture of two batches [B, 3, H, W] in [0, 1]."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return 10.0 * torch.log10(1.0 / mse)


@torch.no_grad()
def reconstruct(autoencoder: nn.Module, pictures: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Encode (posterior mode) + decode pictures [N, 3, H, W] in [-1, 1]; float32 on the CPU, clamped."""
    param, out = next(autoencoder.parameters()), []
    for start in range(0, pictures.shape[0], batch_size):
        x = pictures[start:start + batch_size].to(param.device, param.dtype)
        out.append(autoencoder.decode(autoencoder.encode(x).mode()).float().clamp(-1, 1).cpu())
    return torch.cat(out)


def reconstruction_psnr(autoencoder: nn.Module, pictures: torch.Tensor, batch_size: int = 8) -> float:
    """Mean PSNR (dB) of encode (posterior mode) + decode over pictures [N, 3, H, W] in [-1, 1]."""
    recon = reconstruct(autoencoder, pictures, batch_size)
    return float(psnr((recon + 1) / 2, (pictures.float() + 1) / 2).mean())


def clip_from_parts(config: Mapping[str, Any], text_state: Mapping[str, torch.Tensor],
                    visual_state: Mapping[str, torch.Tensor]) -> nn.Module:
    """An open_clip CLIP from the shipped text tower (``cond_stage_model.model.*`` without the prefix) and the
    separately stored image tower (``visual.*``), in float32 and eval mode."""
    import open_clip

    if isinstance(config, DictConfig):  # open_clip needs plain dicts for vision_cfg/text_cfg
        config = OmegaConf.to_container(config, resolve=True)
    model = open_clip.CLIP(**copy.deepcopy(dict(config)))
    state = {k: v.float() for k, v in {**text_state, **visual_state}.items()}
    from ldm.checkpoint import load_weights

    load_weights(model, state, use_ema=False, source="state of the CLIP text and image towers")  # strict, readable
    return model.eval()


@torch.no_grad()
def clip_scores(clip: nn.Module, pictures: torch.Tensor, prompts: Sequence[str]) -> dict[str, Any]:
    """CLIP score 100*max(cos, 0) of each picture [N, 3, H, W] in [-1, 1] with its prompt, and whether its
    prompt is the best match among all 224 plain prompts (retrieval)."""
    from ldm.default_model.clip_pretrain import image_features, prompt_features

    device = next(clip.parameters()).device
    all_prompts = [plain_caption(*c) for c in combinations()]
    text = prompt_features(clip, all_prompts, device)
    index = {p: i for i, p in enumerate(all_prompts)}
    image = torch.cat([image_features(clip, pictures[i:i + 64].to(device)) for i in range(0, len(pictures), 64)])
    sims = image @ text.T
    own = torch.tensor([index[p] for p in prompts], device=device)
    score = 100.0 * sims[torch.arange(len(prompts), device=device), own].clamp_min(0)
    top1 = (sims.argmax(dim=1) == own).float()
    return {"clip_score": float(score.mean()), "clip_top1": float(top1.mean()), "per_image": score.tolist()}


def batched(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    """Consecutive slices of ``items`` of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start:start + size]

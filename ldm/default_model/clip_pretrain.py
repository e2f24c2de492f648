"""Contrastive pre-training of the default model's small CLIP (open_clip ``CLIP`` + ``ClipLoss``) on shapes.

The text tower becomes the frozen conditioning encoder of the diffusion model (``FrozenOpenCLIPEmbedder`` with
``arch_config=CLIP_CONFIG``); the image tower is kept only to measure CLIP scores of generated pictures.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ldm.data.synthetic_shapes import combinations, make_scene, plain_caption, render_scene
from ldm.modules.encoders.tokenizer import open_clip_tokenize

logger = logging.getLogger(__name__)

# The open_clip model config of the default model's CLIP (text width 64 = the UNet's context_dim).
CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 96, "layers": 3, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
TRAIN_TEXT_LENGTH = 24  # captions are shorter: causal attention makes the pooled feature identical at 77
CLIP_MEAN = (0.5, 0.5, 0.5)
CLIP_STD = (0.25, 0.25, 0.25)


def build_clip(config: dict[str, Any] | None = None) -> nn.Module:
    """An open_clip ``CLIP`` with random weights from ``config`` (default ``CLIP_CONFIG``)."""
    import open_clip

    return open_clip.CLIP(**copy.deepcopy(config or CLIP_CONFIG))


def clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """Pictures [B, 3, H, W] in [-1, 1] -> normalised CLIP input [B, 3, size, size] (area-resized)."""
    x = (images.float() + 1.0) / 2.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class Tokens:
    """Caches the token ids of the (few distinct) captions."""

    def __init__(self) -> None:
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids [B, 77]."""
        missing = [c for c in set(captions) if c not in self._cache]
        if missing:
            for caption, ids in zip(missing, open_clip_tokenize(missing, 77)):
                self._cache[caption] = ids
        return torch.stack([self._cache[c] for c in captions])


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Projected text features [B, embed_dim] of tokens [B, L] (any L <= 77; the pooled end-of-text token)."""
    length = tokens.shape[1]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
    x = model.ln_final(model.transformer(x, attn_mask=mask))
    pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    return pooled @ model.text_projection


def render_batch(seed: int, start: int, count: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """Items ``start .. start+count`` as pictures [B, 3, size, size] in [-1, 1] and their captions."""
    images, captions = [], []
    for index in range(start, start + count):
        scene = make_scene(seed, index)
        images.append(np.asarray(render_scene(scene, size), dtype=np.float32))
        captions.append(scene.caption)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return x, captions


@dataclass
class ClipTraining:
    """Settings of the contrastive pre-training."""

    steps: int = 1500
    batch_size: int = 112  # half of the 224 combinations: no repeated plain prompt within a batch
    lr: float = 1.0e-3
    weight_decay: float = 0.1
    warmup: int = 100
    seed: int = 1
    log_every: int = 100


def lr_at(step: int, settings: ClipTraining) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_clip(settings: ClipTraining, device: str | torch.device = "cpu", config: dict[str, Any] | None = None,
               progress: Callable[[int, float], None] | None = None) -> nn.Module:
    """Train a CLIP on freshly rendered shapes (a new picture every sample); returns the model in eval mode."""
    from open_clip.loss import ClipLoss

    torch.manual_seed(settings.seed)
    model = build_clip(config).to(device)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.98))
    loss_fn, tokens = ClipLoss(), Tokens()
    model.train()
    start, running = time.time(), 0.0
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        images, captions = render_batch(settings.seed, step * settings.batch_size, settings.batch_size, size)
        ids = tokens(captions)[:, :TRAIN_TEXT_LENGTH].to(device)
        image_features = nn.functional.normalize(model.encode_image(clip_pixels(images.to(device), size)), dim=-1)
        text_features = nn.functional.normalize(encode_text(model, ids), dim=-1)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running += loss.item()
        if (step + 1) % settings.log_every == 0:
            logger.info("clip step %d/%d loss %.4f (%.1f s)", step + 1, settings.steps, running / settings.log_every,
                        time.time() - start)
            if progress:
                progress(step + 1, running / settings.log_every)
            running = 0.0
    return model.eval()


@torch.no_grad()
def prompt_features(model: nn.Module, prompts: Sequence[str], device: str | torch.device = "cpu") -> torch.Tensor:
    """L2-normalised text features [N, embed_dim] of ``prompts``."""
    return torch.nn.functional.normalize(model.encode_text(Tokens()(prompts).to(device)).float(), dim=-1)


@torch.no_grad()
def image_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image features [B, embed_dim] of pictures [B, 3, H, W] in [-1, 1]."""
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    return torch.nn.functional.normalize(model.encode_image(clip_pixels(images, size)).float(), dim=-1)


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, count: int = 448, seed: int = 12345, device: str | torch.device = "cpu"
                       ) -> dict[str, float]:
    """Share of fresh pictures whose best-matching plain prompt (of all 224) names the right combination."""
    combos = combinations()
    texts = prompt_features(model, [plain_caption(*c) for c in combos], device)
    images, _ = render_batch(seed, 0, count, 64)
    truth = [make_scene(seed, i) for i in range(count)]
    best = (image_features(model, images.to(device)) @ texts.T).argmax(dim=1).tolist()
    hits = {"all": 0, "colour": 0, "shape": 0, "background": 0}
    for scene, b in zip(truth, best):
        colour, shape, background = combos[b]
        hits["colour"] += colour == scene.colour
        hits["shape"] += shape == scene.shape
        hits["background"] += background == scene.background
        hits["all"] += (colour, shape, background) == (scene.colour, scene.shape, scene.background)
    return {k: v / count for k, v in hits.items()}


def text_tower_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The text tower's weights (open_clip names without ``visual.*``), as FrozenOpenCLIPEmbedder's ``model``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("visual.")}


def image_tower_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The image tower's weights (``visual.*``), kept for CLIP scores."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("visual.")}

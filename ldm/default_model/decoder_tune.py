"""Fine-tune only the decoder of an exported default model (encoder frozen, so its latents and the diffusion
model trained on them stay valid): L1 loss on whole synthetic pictures decoded from posterior samples.

The shipped autoencoder's short training leaves systematic colour shifts (a black shape on yellow decoded dark
green, orange on yellow decoded red-orange); the strict reader (classify.py) counts those as "ambiguous".
Trained on random crops (the decoder is convolutional; its one attention block sees the crop).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ldm.data.synthetic_shapes import SyntheticShapes

logger = logging.getLogger(__name__)
DECODER_PREFIXES = ("first_stage_model.decoder.", "first_stage_model.post_quant_conv.")


@dataclass
class DecoderTuning:
    """Settings of the decoder fine-tuning."""

    steps: int = 300
    batch_size: int = 4
    learning_rate: float = 2e-4
    warmup: int = 50
    data_seed: int = 303  # pictures not in the diffusion model's training data
    seed: int = 0
    log_every: int = 50
    size: int = 256  # picture side
    crop: int | None = 128  # random crops of the pictures (the decoder is convolutional; None: whole pictures)


def decoder_parameters(autoencoder: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters: decoder and post_quant_conv (everything else stays frozen)."""
    autoencoder.requires_grad_(False)
    params = [*autoencoder.decoder.parameters(), *autoencoder.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def tune_decoder(autoencoder: nn.Module, cfg: DecoderTuning, device: str | torch.device = "cpu") -> list[float]:
    """Train ``autoencoder``'s decoder in place (float32) for ``cfg.steps`` on [B, 3, crop, crop] pictures;
    returns the logged mean losses."""
    torch.manual_seed(cfg.seed)
    autoencoder = autoencoder.to(device).float().train()
    params = decoder_parameters(autoencoder)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup) * max(0.1, 1.0 - s / max(1, cfg.steps)))
    data = SyntheticShapes(cfg.size, cfg.steps * cfg.batch_size, cfg.data_seed, crop=cfg.crop)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=False, num_workers=0)
    losses, running, start = [], 0.0, time.time()
    for step, batch in enumerate(loader, start=1):
        x = batch["jpg"].permute(0, 3, 1, 2).to(device)
        with torch.no_grad():
            z = autoencoder.encode(x).sample()
        loss = (autoencoder.decode(z) - x).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running += loss.item()
        if step % cfg.log_every == 0:
            losses.append(running / cfg.log_every)
            logger.info("decoder step %d/%d: L1 %.4f (%.0f s)", step, cfg.steps, losses[-1], time.time() - start)
            running = 0.0
    return losses


def tune_exported_decoder(model_dir: Path, out_dir: Path, cfg: DecoderTuning, device: str = "cpu") -> Path:
    """Tune the decoder of ``model_dir``'s model.safetensors and write the whole model (float16, as shipped)
    to ``out_dir/model.safetensors``, with the config and CLIP image tower copied; returns the weights' path."""
    import shutil

    from safetensors.torch import save_file

    from ldm.checkpoint import read_checkpoint
    from ldm.default_model.export import build, shipped_state
    from omegaconf import OmegaConf

    state = read_checkpoint(Path(model_dir) / "model.safetensors")[0]
    model = build(OmegaConf.load(Path(model_dir) / "config.yaml"))
    model.load_state_dict(state, strict=True)
    tune_decoder(model.first_stage_model, cfg, device)
    tuned = {k: v.detach().cpu() for k, v in model.state_dict().items() if k.startswith(DECODER_PREFIXES)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged = shipped_state({**state, **tuned})
    merged = {k: merged[k] for k in state}
    save_file(merged, str(out_dir / "model.safetensors"), metadata={"format": "pt", "source": "sd-shapes (EMA)"})
    for name in ("config.yaml", "clip_visual.safetensors"):
        if (Path(model_dir) / name).exists() and (Path(model_dir) / name).resolve() != (out_dir / name).resolve():
            shutil.copyfile(Path(model_dir) / name, out_dir / name)
    return out_dir / "model.safetensors"

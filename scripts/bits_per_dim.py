"""Report the negative log-likelihood bound of a pixel-space DDPM in bits/dim on a data set.

    python scripts/bits_per_dim.py --config configs/ddpm/shapes32-cond.yaml --ckpt logs/<run>/checkpoints/last.ckpt
    python scripts/bits_per_dim.py ... --split train --n_images 256 --batch_size 64 --json bpd.json

The bound sums the prior term, the KL term of every timestep and the discretized decoder term (8-bit data);
each image gets fresh noise per timestep, so the result is an unbiased estimate of the bound's mean. The data
set is the config's ``data.params.validation`` (or ``train``) entry.

``--timesteps N`` evaluates N model calls per image instead of all T: the decoder term exactly, and the KL sum
by stratified sampling (timesteps 1..T-1 cut into N-1 equal strata, one random timestep per stratum and image,
weighted by the stratum's size). The estimate stays unbiased; its error bar (the standard error over images)
then includes the timestep sampling noise.

    python scripts/bits_per_dim.py --config configs/ddpm/shapes32-cond.yaml --ckpt ... --timesteps 50
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ldm.models.diffusion.ddpm_tools import load_ddpm  # noqa: E402
from ldm.models.diffusion.likelihood import bits_per_dim, model_reverse_step, prior_bpd, vlb_terms  # noqa: E402
from ldm.models.diffusion.process import DiffusionSchedule  # noqa: E402

logger = logging.getLogger("bits_per_dim")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the model's training config (yaml, with a data: section)")
    p.add_argument("--ckpt", required=True, help="checkpoint: a training .ckpt or exported .safetensors")
    p.add_argument("--split", choices=("validation", "train"), default="validation",
                   help="which data set of the config (default: validation, else train)")
    p.add_argument("--n_images", type=int, default=64, help="images to evaluate (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=16, help="images per batch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.add_argument("--timesteps", type=int, default=None, metavar="N",
                   help="model calls per image: a stratified estimate over N timesteps (default: all of them)")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights, not the EMA ones")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.n_images < 1 or args.batch_size < 1:
        p.error("--n_images and --batch_size must be >= 1")
    if args.timesteps is not None and args.timesteps < 2:
        p.error("--timesteps must be >= 2 (the decoder term and at least one KL term)")
    return args


def strided_bits_per_dim(process: Any, model_fn: Any, x_start: torch.Tensor, cond: Any, n_steps: int,
                         clip_denoised: bool = True, generator: torch.Generator | None = None,
                         progress: Any = None) -> dict[str, torch.Tensor]:
    """Unbiased estimate of the bound of x_start [B, C, H, W] from ``n_steps`` model calls per image.

    The decoder term (t = 0) is exact; the KL terms of t = 1..T-1 come from one uniformly drawn timestep per
    stratum (n_steps - 1 equal strata) and image, times the stratum size. Returns {"total_bpd" [B], "prior_bpd"
    [B], "decoder_bpd" [B], "kl_bpd" [B]}.
    """
    n, T = x_start.shape[0], process.num_timesteps
    edges = torch.linspace(1, T, min(n_steps - 1, T - 1) + 1).round().long().tolist()
    strata = [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
    gen_device = x_start.device if generator is None else generator.device

    def term(t: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x_start.shape, generator=generator, device=gen_device, dtype=x_start.dtype)
        x_t = process.q_sample(x_start, t, noise.to(x_start.device))
        return vlb_terms(process, model_reverse_step(process, model_fn, x_t, t, cond, clip_denoised), x_start, x_t, t)

    kl = x_start.new_zeros(n)
    for lo, hi in (progress(strata) if progress is not None else strata):
        t = torch.randint(lo, hi, (n,), generator=generator, device=gen_device).to(x_start.device)
        kl += (hi - lo) * term(t)
    decoder = term(torch.zeros(n, dtype=torch.long, device=x_start.device))
    prior = prior_bpd(process, x_start)
    return {"total_bpd": prior + decoder + kl, "prior_bpd": prior, "decoder_bpd": decoder, "kl_bpd": kl}


def dataset_from_config(cfg: Any, split: str) -> Any:
    """The data set of ``data.params.<split>`` (falling back to ``train``) of a training config."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    params = OmegaConf.to_container(cfg.data.params, resolve=True) if "data" in cfg else {}
    section = params.get(split) or params.get("train")
    if not section:
        raise SystemExit("the config has no data.params.validation / train data set to evaluate on")
    if split not in params:
        logger.warning("the config has no '%s' data set: evaluating on 'train'", split)
    return instantiate_from_config(section)


def conditioning(model: Any, batch: dict[str, Any], x: torch.Tensor) -> Any:
    """The model's conditioning of a data batch (None for unconditional models)."""
    if model.cond_stage_model is None or model.model.conditioning_key is None:
        return None
    return model.get_learned_conditioning(model.get_raw_conditioning(batch, model.cond_stage_key, x))


@torch.no_grad()
def evaluate(model: Any, dataset: Any, n_images: int, batch_size: int, seed: int,
             progress: bool = True, timesteps: int | None = None) -> dict[str, float]:
    """Mean bits/dim (and its parts, with the standard error of the total) over the first ``n_images`` items;
    ``timesteps``: the stratified estimate from that many model calls per image."""
    from torch.utils.data import DataLoader, Subset, default_collate

    device = model.device
    schedule = DiffusionSchedule.from_model(model)
    subset = Subset(dataset, range(min(n_images, len(dataset))))
    generator = torch.Generator(device).manual_seed(seed)
    wrap = None
    if progress:
        from tqdm import tqdm
        wrap = lambda steps: tqdm(steps, desc="timesteps", leave=False)  # noqa: E731
    parts: dict[str, list[torch.Tensor]] = {"total": [], "prior": [], "decoder": [], "kl": []}
    for batch in DataLoader(subset, batch_size=batch_size, collate_fn=default_collate):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        x = model.get_input(batch, model.first_stage_key).to(device)
        cond = conditioning(model, batch, x)
        if timesteps is not None and timesteps < schedule.num_timesteps:
            out = strided_bits_per_dim(schedule, model.apply_model, x, cond, timesteps, model.clip_denoised,
                                       generator, wrap)
        else:
            out = bits_per_dim(schedule, model.apply_model, x, cond, clip_denoised=model.clip_denoised,
                               generator=generator, progress=wrap)
            out = {**out, "decoder_bpd": out["vb"][:, 0], "kl_bpd": out["vb"][:, 1:].sum(1)}
        for key in parts:
            parts[key].append(out[f"{key}_bpd"].cpu())
    values = {k: torch.cat(v).double() for k, v in parts.items()}
    n = values["total"].numel()
    result = {f"{k}_bpd": float(v.mean()) for k, v in values.items()}
    result["total_bpd_stderr"] = float(values["total"].std() / math.sqrt(n)) if n > 1 else float("nan")
    result["n_images"] = n
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg = load_ddpm(args.config, args.ckpt, use_ema=not args.no_ema, device=device)
    if getattr(model, "first_stage_model", None) is not None:
        raise SystemExit("bits/dim is defined here for pixel-space DDPMs on 8-bit images, not for latent models")
    result = evaluate(model, dataset_from_config(cfg, args.split), args.n_images, args.batch_size, args.seed,
                      progress=not args.no_progress, timesteps=args.timesteps)
    used = min(args.timesteps or model.num_timesteps, model.num_timesteps)
    result["timesteps"] = used
    print(f"bits/dim: {result['total_bpd']:.4f} +- {result['total_bpd_stderr']:.4f} (standard error) over "
          f"{result['n_images']} images, {used} of {model.num_timesteps} timesteps (prior {result['prior_bpd']:.4f}, "
          f"KL terms {result['kl_bpd']:.4f}, decoder {result['decoder_bpd']:.4f})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

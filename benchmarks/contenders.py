"""The benchmark's contenders: our models and diffusers' equivalents (same architecture, random weights).

diffusers is imported only inside the functions that build its models (a benchmark-only dependency).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "stable-diffusion"
PROMPT = "a painting of a virus monster playing guitar"


def sd_params(name: str, args: argparse.Namespace) -> Any:
    """``model.params`` of configs/stable-diffusion/<name>.yaml; UNet/VAE widths divided by width_div/vae_div."""
    params = OmegaConf.load(CONFIGS / f"{name}.yaml").model.params
    params.unet_config.params.use_checkpoint = False
    params.unet_config.params.model_channels //= args.width_div
    params.first_stage_config.params.ddconfig.ch //= args.vae_div
    return params


def diffusers_unet(p: Any) -> torch.nn.Module:
    """diffusers UNet2DConditionModel with the architecture of our UNet params ``p``."""
    from diffusers import UNet2DConditionModel

    channels = [p.model_channels * m for m in p.channel_mult]
    attn = [2 ** i in p.attention_resolutions for i in range(len(channels))]
    heads = ([c // p.num_head_channels for c in channels] if p.get("num_head_channels", -1) != -1
             else p.num_heads)  # diffusers' ``attention_head_dim`` holds the number of heads
    return UNet2DConditionModel(
        sample_size=64, in_channels=p.in_channels, out_channels=p.out_channels, block_out_channels=channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        layers_per_block=p.num_res_blocks, cross_attention_dim=p.context_dim, attention_head_dim=heads,
        use_linear_projection=bool(p.get("use_linear_in_transformer", False)))


def diffusers_vae(dd: Any) -> torch.nn.Module:
    """diffusers AutoencoderKL with the architecture of our ddconfig ``dd``."""
    from diffusers import AutoencoderKL

    n = len(dd.ch_mult)
    return AutoencoderKL(in_channels=dd.in_channels, out_channels=dd.out_ch, latent_channels=dd.z_channels,
                         block_out_channels=[dd.ch * m for m in dd.ch_mult], layers_per_block=dd.num_res_blocks,
                         down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)


def prepare(module: torch.nn.Module, args: argparse.Namespace, ours: bool) -> None:
    """In place: --channels-last, --attention (ours), --compile (both contenders alike)."""
    if args.channels_last:
        module.to(memory_format=torch.channels_last)
    if ours and args.attention:
        from ldm.modules.attention import set_attention_backend
        set_attention_backend(module, args.attention)
    if args.compile != "off":
        module.compile(mode=args.compile, dynamic=False)


def ours_txt2img(args: argparse.Namespace, latent: int) -> tuple[Any, Callable[[], torch.Tensor], dict]:
    """(model, call, {"latents": last latents}) for our whole txt2img: text encoding, ``args.sampler`` (default
    DDIM) with guidance, decoding; the call returns the images [1, 3, H, W] in [0, 1]."""
    from ldm.inference import pipeline
    from ldm.samplers import resolve

    params = sd_params("v1-inference", args)
    model = instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params})
    model = model.to(args.device).eval().requires_grad_(False)
    precision = pipeline.choose_precision(args.device, "autocast" if args.dtype != torch.float32 else "full",
                                          args.dtype == torch.bfloat16)
    sampler = resolve(getattr(args, "sampler", "DDIM"))
    job = pipeline.Job((PROMPT,), (42,))
    last: dict = {}

    def run() -> torch.Tensor:
        gens = pipeline.generators(job.seeds)
        with precision.scope():
            cond, uncond = pipeline.conditioning(model, job, "", args.scale, set())
            x_T = pipeline.draw(gens, (4, latent, latent), args.device)
            last["latents"] = pipeline.sample_txt2img(model, sampler, x_T, cond, uncond, args.steps, args.scale, gens)
        return pipeline.decode(model, last["latents"], precision)
    return model, run, last


# Our sampler (short name, schedule) -> the diffusers scheduler that runs the same method.
DIFFUSERS_SCHEDULERS = {
    ("ddim", "ddim"): ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
    ("dpmpp_2m", "karras"): ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                             "use_karras_sigmas": True}),
    ("euler", "normal"): ("EulerDiscreteScheduler", {}),
    ("euler_ancestral", "normal"): ("EulerAncestralDiscreteScheduler", {}),
    ("unipc", "normal"): ("UniPCMultistepScheduler", {}),
}


def diffusers_scheduler(sampler: str) -> Optional[Any]:
    """The diffusers scheduler matching our ``sampler`` name (SD 1 betas), or None when there is none in the table."""
    import diffusers

    from ldm.samplers import resolve

    choice = resolve(sampler)
    entry = DIFFUSERS_SCHEDULERS.get((choice.spec.name, choice.schedule))
    if entry is None:
        return None
    name, options = entry
    return getattr(diffusers, name)(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **options)


def diffusers_txt2img(args: argparse.Namespace, model: Any, latent: int) -> Optional[Callable[[], torch.Tensor]]:
    """The same job with diffusers' UNet, the matching scheduler and VAE (text encoded by our CLIP: same
    architecture); None when diffusers has no scheduler for ``args.sampler``."""
    scheduler = diffusers_scheduler(getattr(args, "sampler", "DDIM"))
    if scheduler is None:
        return None
    params = sd_params("v1-inference", args)
    unet = diffusers_unet(params.unet_config.params).to(args.device, args.dtype).eval().requires_grad_(False)
    prepare(unet, args, ours=False)
    vae = diffusers_vae(params.first_stage_config.params.ddconfig).to(args.device, args.dtype).eval()
    prepare(vae.decoder, args, ours=False)
    text = model.cond_stage_model.to(args.device, args.dtype)

    def run() -> torch.Tensor:
        context = text(["", PROMPT])
        scheduler.set_timesteps(args.steps)
        g = torch.Generator().manual_seed(42)
        x = (torch.randn(1, 4, latent, latent, generator=g) * scheduler.init_noise_sigma).to(args.device, args.dtype)
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([x, x]), t)
            out_uc, out_c = unet(inp, t, encoder_hidden_states=context).sample.chunk(2)
            x = scheduler.step(out_uc + args.scale * (out_c - out_uc), t, x).prev_sample
        return ((vae.decode(x / 0.18215).sample.float() + 1) / 2).clamp(0, 1)
    return run


def load_default_model(folder: Path) -> Any:
    """The embedded default model (config.yaml + model.safetensors) on the CPU, eval mode."""
    from ldm.checkpoint import load_weights, read_checkpoint

    config = OmegaConf.load(folder / "config.yaml")
    model = instantiate_from_config(OmegaConf.to_container(config.model, resolve=True))
    state_dict, _ = read_checkpoint(folder / "model.safetensors")
    load_weights(model, state_dict, use_ema=None, source=str(folder))
    return model.eval().requires_grad_(False)



"""The stages of retraining the default model from nothing (scripts/train_default_model.py runs them in order).

data -> (CLIP || autoencoder) -> latent cache + initial weights -> diffusion model -> min-SNR fine-tuning
rounds -> export -> decoder-only fine-tuning -> shape-weighted fine-tuning rounds (Polish, POLISH_ROUNDS). Every
stage writes its outputs into the work folder and is skipped when they are already there, so an interrupted run
continues. The autoencoder and the diffusion model are trained by the project's trainer (scripts/train.py) in
subprocesses.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs" / "default-model"
DEFAULT_OUT = ROOT / "models" / "ldm" / "sd-shapes"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PolishRound:
    """One shape-weighted fine-tuning round of a run from nothing: its steps and the emphasised pictures' draw."""

    steps: int
    emphasis: str
    emphasis_seed: int


# the rounds that made the shipped model (models/ldm/sd-shapes/README.md, stages 5-7), each from the last's output
POLISH_ROUNDS = (PolishRound(5000, "star=3,triangle=2.5,square=2.5", 5),
                 PolishRound(6000, "circle=2.5,star=2.2,square=2,triangle=1.5,purple=1.4,red=1.4", 6),
                 PolishRound(5500, "star=3,circle=1.5,square=1.5,triangle=1.5", 7))


@dataclass
class Recipe:
    """Settings of one retraining run (sizes, steps, device, where things go)."""

    workdir: Path
    out_dir: Path
    images: int = 4000
    data_seed: int = 0
    clip_steps: int = 1600
    ae_steps: int = 1200
    ae_full_steps: int = 400
    unet_steps: int = 5000
    # min-SNR rounds after the first diffusion stage (ldm-finetune.yaml), each from the previous round's EMA with a
    # fresh optimizer and learning-rate cycle; () skips them
    finetune_steps: tuple[int, ...] = (5000, 2500)
    # the last stages: Polish rounds (shape-weighted min-SNR fine-tuning) in order; () skips them
    polish_rounds: tuple[PolishRound, ...] = POLISH_ROUNDS
    decoder_steps: int = 300  # decoder-only fine-tuning of the exported model (decoder_tune.py); 0 skips it
    unet_procs: int = 2  # data-parallel processes for the diffusion model (torchrun, gloo on CPU)
    unet_batch: int = 24  # global batch, split over the processes
    device: str = "cpu"
    threads: int = 1
    # trainer.precision of the diffusion runs: "32", or "bf16" (autocast; the UNet's steps ran 1.8x faster on the
    # development machine's avx512_bf16 CPU, see models/ldm/sd-shapes/README.md)
    precision: str = "32"
    parallel: bool = True
    seed: int = 23
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        """The synthetic image folder (PNG + metadata.jsonl)."""
        return self.workdir / "data"


def _env(recipe: Recipe) -> dict[str, str]:
    env = dict(os.environ)
    if recipe.threads > 0:
        env["OMP_NUM_THREADS"] = str(recipe.threads)
        env["MKL_NUM_THREADS"] = str(recipe.threads)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run(cmd: list[str], recipe: Recipe, log: Path) -> None:
    """Run a stage's command with its output in ``log``; a failure raises with the log's tail."""
    logger.info("running %s (log: %s)", " ".join(cmd), log)
    with open(log, "w", encoding="utf-8") as f:
        result = subprocess.run(cmd, cwd=ROOT, env=_env(recipe), stdout=f, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        raise RuntimeError(f"stage command failed (exit {result.returncode}): {' '.join(cmd)}\n{tail}")


def _timed(recipe: Recipe, name: str, fn: Any, *args: Any) -> Any:
    start = time.time()
    result = fn(*args)
    recipe.timings[name] = round(time.time() - start, 1)
    logger.info("stage %s done in %.0f s", name, recipe.timings[name])
    return result


def make_data(recipe: Recipe) -> Path:
    """Write the picture folder (skipped when its metadata.jsonl lists ``images`` pictures)."""
    meta = recipe.data_dir / "metadata.jsonl"
    if meta.exists() and len(meta.read_text(encoding="utf-8").splitlines()) == recipe.images:
        return recipe.data_dir
    if recipe.data_dir.exists():
        shutil.rmtree(recipe.data_dir)  # a folder of another size: every picture in it would be read
    _run([sys.executable, "scripts/make_shapes_dataset.py", "--out", str(recipe.data_dir), "--count",
          str(recipe.images), "--seed", str(recipe.data_seed), "--workers", "2"], recipe,
         recipe.workdir / "data.log")
    return recipe.data_dir


def train_clip(recipe: Recipe) -> Path:
    """Contrastive CLIP pre-training (scripts/train_clip.py)."""
    out = recipe.workdir / "clip.safetensors"
    if not out.exists():
        _run([sys.executable, "scripts/train_clip.py", "--out", str(out), "--steps", str(recipe.clip_steps),
              "--device", recipe.device, "--threads", str(recipe.threads)], recipe, recipe.workdir / "clip.log")
    return out


def _trainer_run(recipe: Recipe, name: str, base: list[Path], overrides: list[str], procs: int = 1) -> Path:
    """Train with scripts/train.py (under torchrun when ``procs`` > 1) into ``workdir/name``; returns its
    checkpoints folder."""
    run_dir = recipe.workdir / name
    checkpoints = run_dir / "checkpoints"
    if not (checkpoints / "last.ckpt").exists():
        launcher = [sys.executable] if procs <= 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        "--nproc_per_node", str(procs)]
        # overrides first: --base takes every value that follows it
        cmd = launcher + ["scripts/train.py", *overrides, f"trainer.device={recipe.device}", "-t", "--logdir",
                          str(recipe.workdir), "--name", name, "--seed", str(recipe.seed), "--base",
                          *[str(b) for b in base]]
        _run(cmd, recipe, recipe.workdir / f"{name}.log")
        runs = sorted(recipe.workdir.glob(f"*_{name}"))
        if not runs:
            raise RuntimeError(f"scripts/train.py left no run folder '*_{name}' in {recipe.workdir}")
        if run_dir.exists() or run_dir.is_symlink():
            run_dir.unlink()
        run_dir.symlink_to(runs[-1].name)
    return checkpoints


def train_autoencoder(recipe: Recipe) -> Path:
    """AutoencoderKL training on crops, then on whole pictures; returns its weights (.safetensors)."""
    base = [CONFIG_DIR / "autoencoder.yaml"]
    crops = _trainer_run(recipe, "autoencoder", base, [f"trainer.max_steps={recipe.ae_steps}"])
    full = _trainer_run(recipe, "autoencoder-full", base + [CONFIG_DIR / "autoencoder-full.yaml"],
                        [f"model.params.ckpt_path={crops / 'last-weights.safetensors'}",
                         f"trainer.max_steps={recipe.ae_full_steps}"])
    return full / "last-weights.safetensors"


def pretrain(recipe: Recipe) -> tuple[Path, Path]:
    """CLIP and autoencoder, side by side on CPU when ``parallel`` (they are independent)."""
    if recipe.parallel:
        with ThreadPoolExecutor(2) as pool:
            clip = pool.submit(_timed, recipe, "clip", train_clip, recipe)
            ae = pool.submit(_timed, recipe, "autoencoder", train_autoencoder, recipe)
            return clip.result(), ae.result()
    return _timed(recipe, "clip", train_clip, recipe), _timed(recipe, "autoencoder", train_autoencoder, recipe)


def cache_latents(recipe: Recipe, clip: Path, autoencoder: Path) -> tuple[Path, Path, float]:
    """Encode the picture folder, write the initial LatentDiffusion weights; returns (cache, init, scale)."""
    import torch
    from safetensors.torch import load_file, save_file

    from ldm.data.folder import ImageCaptionFolder
    from ldm.default_model.export import initial_state
    from ldm.default_model.latents import encode_to_cache, latent_std
    from ldm.util import instantiate_from_config

    cache, init, info = (recipe.workdir / "latents.safetensors", recipe.workdir / "init.safetensors",
                         recipe.workdir / "latents-info.json")
    stamp = {"images": recipe.images, "autoencoder": str(autoencoder), "clip": str(clip)}
    recorded = json.loads(info.read_text(encoding="utf-8")) if info.exists() else {}
    if not (cache.exists() and init.exists() and all(recorded.get(k) == v for k, v in stamp.items())):
        if recipe.threads > 0:
            torch.set_num_threads(recipe.threads)
        ae_cfg = OmegaConf.load(CONFIG_DIR / "autoencoder.yaml").model
        ae_cfg.params.lossconfig = {"target": "torch.nn.Identity"}
        autoencoder_model = instantiate_from_config(OmegaConf.to_container(ae_cfg, resolve=True))
        ae_state = load_file(str(autoencoder))
        autoencoder_model.load_state_dict({k: v for k, v in ae_state.items() if not k.startswith("loss.")})
        dataset = ImageCaptionFolder(str(recipe.data_dir), size=256, image_key="jpg", caption_key="txt")
        encode_to_cache(autoencoder_model, dataset, cache, device=recipe.device)
        scale = 1.0 / latent_std(cache)
        save_file(initial_state(autoencoder_model.state_dict(), load_file(str(clip))), str(init))
        recorded = {"scale_factor": scale, **stamp}
        info.write_text(json.dumps(recorded), encoding="utf-8")
    return cache, init, recorded["scale_factor"]


def _diffusion_overrides(recipe: Recipe, cache: Path, init: Path, scale: float, steps: int) -> list[str]:
    return [f"model.params.ckpt_path={init}", f"model.params.scale_factor={scale:.6f}",
            f"data.params.train.params.path={cache}", f"trainer.max_steps={steps}",
            f"model.params.scheduler_config.params.cycle_lengths=[{steps}]",
            f"data.params.batch_size={max(1, recipe.unet_batch // max(1, recipe.unet_procs))}",
            f"trainer.checkpoint_every_n_steps={max(1, steps // 4)}", f"trainer.precision={recipe.precision}"]


def train_diffusion(recipe: Recipe, cache: Path, init: Path, scale: float) -> Path:
    """LatentDiffusion training on the cached latents; returns the EMA inference weights."""
    checkpoints = _trainer_run(recipe, "diffusion", [CONFIG_DIR / "ldm-train.yaml"],
                               _diffusion_overrides(recipe, cache, init, scale, recipe.unet_steps), recipe.unet_procs)
    return checkpoints / "last-ema.safetensors"


def finetune_diffusion(recipe: Recipe, cache: Path, ema: Path, scale: float) -> Path:
    """The min-SNR rounds (ldm-finetune.yaml), each started from the previous EMA weights; returns the last
    round's EMA weights, or ``ema`` unchanged when ``finetune_steps`` is empty."""
    for i, steps in enumerate(recipe.finetune_steps):
        if steps <= 0:
            raise ValueError(f"finetune_steps must be positive step counts, got {recipe.finetune_steps}")
        name = "diffusion-finetune" if i == 0 else f"diffusion-finetune{i + 1}"
        checkpoints = _trainer_run(recipe, name, [CONFIG_DIR / "ldm-train.yaml", CONFIG_DIR / "ldm-finetune.yaml"],
                                   _diffusion_overrides(recipe, cache, ema, scale, steps), recipe.unet_procs)
        ema = checkpoints / "last-ema.safetensors"
    return ema


def export(recipe: Recipe, ema: Path, clip: Path, scale: float) -> Path:
    """Write the shipped model (config.yaml, model.safetensors, clip_visual.safetensors) to ``out_dir``."""
    import torch
    from safetensors.torch import load_file, save_file

    from ldm.default_model.export import export_model, inference_config

    cfg = inference_config(OmegaConf.load(CONFIG_DIR / "ldm-train.yaml"), scale)
    config_path, _ = export_model(ema, cfg, recipe.out_dir)
    if recipe.out_dir.resolve() == DEFAULT_OUT.resolve():
        OmegaConf.save(cfg, CONFIG_DIR / "inference.yaml")  # the configs folder describes the shipped model
    visual = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(clip)).items()
              if k.startswith("visual.")}
    save_file(visual, str(recipe.out_dir / "clip_visual.safetensors"))
    return config_path


@dataclass
class Polish:
    """A short min-SNR fine-tuning of an exported model on plain pictures plus pictures drawn with ``emphasis``
    (more of the weak shapes and colours), every picture encoded by that model's own autoencoder."""

    model_dir: Path  # config.yaml + model.safetensors (+ clip_visual.safetensors) to start from
    steps: int = 5000
    plain_images: int = 4000  # the training data's first pictures (recipe data_seed)
    emphasis_images: int = 6000
    emphasis: str = "star=3,triangle=2.5,square=2.5"
    emphasis_seed: int = 5
    learning_rate: float | None = None  # base learning rate (per picture); None: the config's
    name: str = "polish"  # its files in the work folder: NAME/ (the trainer's run), NAME-latents.safetensors, ...


def _use_training_threads(recipe: Recipe) -> None:
    """In-process work that runs alone (encoding, decoder tuning) takes the threads of all training processes."""
    if recipe.threads > 0:
        import torch

        torch.set_num_threads(recipe.threads * max(1, recipe.unet_procs))


def polish_cache(recipe: Recipe, polish: Polish) -> tuple[Path, float]:
    """Latent cache of the polishing data encoded by ``polish.model_dir``'s autoencoder; (cache, scale_factor)."""
    from torch.utils.data import ConcatDataset

    from ldm.checkpoint import load_weights, read_checkpoint
    from ldm.data.synthetic_shapes import SyntheticShapes
    from ldm.default_model.export import build
    from ldm.default_model.latents import encode_to_cache

    config = OmegaConf.load(polish.model_dir / "config.yaml")
    cache = recipe.workdir / f"{polish.name}-latents.safetensors"
    info = recipe.workdir / f"{polish.name}-latents-info.json"
    stamp = {"model": str(polish.model_dir.resolve()), "plain": polish.plain_images, "seed": recipe.data_seed,
             "emphasis": polish.emphasis, "emphasis_images": polish.emphasis_images,
             "emphasis_seed": polish.emphasis_seed}
    if not (cache.exists() and info.exists() and json.loads(info.read_text(encoding="utf-8")) == stamp):
        _use_training_threads(recipe)
        model = build(config)
        load_weights(model, read_checkpoint(polish.model_dir / "model.safetensors")[0], use_ema=None,
                     source=str(polish.model_dir))
        data = ConcatDataset([SyntheticShapes(256, polish.plain_images, recipe.data_seed),
                              SyntheticShapes(256, polish.emphasis_images, polish.emphasis_seed,
                                              emphasis=polish.emphasis)])
        encode_to_cache(model.first_stage_model.float(), data, cache, device=recipe.device)
        info.write_text(json.dumps(stamp), encoding="utf-8")
    return cache, float(config.model.params.scale_factor)


def polish_model(recipe: Recipe, polish: Polish) -> dict[str, Any]:
    """Fine-tune ``polish.model_dir`` (ldm-train.yaml + ldm-finetune.yaml, from its weights) and export the result
    to ``recipe.out_dir``; returns the timings."""
    recipe.workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    name = polish.name
    cache, scale = _timed(recipe, f"{name}-latents", polish_cache, recipe, polish)
    overrides = _diffusion_overrides(recipe, cache, polish.model_dir / "model.safetensors", scale, polish.steps)
    if polish.learning_rate is not None:
        overrides.append(f"model.base_learning_rate={polish.learning_rate}")
    checkpoints = _timed(recipe, name, _trainer_run, recipe, name,
                         [CONFIG_DIR / "ldm-train.yaml", CONFIG_DIR / "ldm-finetune.yaml"], overrides,
                         recipe.unet_procs)
    ema = checkpoints / "last-ema.safetensors"
    from ldm.default_model.export import export_model, inference_config

    _timed(recipe, f"{name}-export", export_model, ema,
           inference_config(OmegaConf.load(CONFIG_DIR / "ldm-train.yaml"), scale), recipe.out_dir)
    visual = polish.model_dir / "clip_visual.safetensors"
    if visual.exists() and visual.resolve() != (recipe.out_dir / visual.name).resolve():
        recipe.out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(visual, recipe.out_dir / visual.name)
    recipe.timings["total"] = round(time.time() - start, 1)
    (recipe.workdir / f"{name}-timings.json").write_text(json.dumps(recipe.timings, indent=1), encoding="utf-8")
    return dict(recipe.timings)


def tune_decoder(recipe: Recipe) -> Path:
    """Decoder-only fine-tuning (decoder_tune.py) of the exported model, written over ``out_dir``'s weights
    (the encoder is unchanged, so the latents the UNet learnt stay valid); skipped when ``decoder_steps`` is 0."""
    weights = recipe.out_dir / "model.safetensors"
    if recipe.decoder_steps <= 0:
        return weights
    from ldm.default_model.decoder_tune import DecoderTuning, tune_exported_decoder

    tuned = recipe.workdir / "decoder-tuned" / "model.safetensors"
    if not tuned.exists():
        _use_training_threads(recipe)
        tuned = tune_exported_decoder(recipe.out_dir, tuned.parent, DecoderTuning(steps=recipe.decoder_steps),
                                      recipe.device)
    shutil.copyfile(tuned, weights)
    return weights


def polish_exported(recipe: Recipe) -> Path:
    """The recipe's last stages: the ``polish_rounds``, the first from the exported, decoder-tuned model (its files
    first copied to ``workdir/before-polish``), each next one from the last's output (``workdir/NAME-model``);
    the last round's result replaces ``out_dir``'s weights."""
    weights = recipe.out_dir / "model.safetensors"
    if not recipe.polish_rounds:
        return weights
    start = recipe.workdir / "before-polish"
    if not (recipe.workdir / "polish" / "checkpoints" / "last.ckpt").exists():  # else: a finished run's start
        shutil.copytree(recipe.out_dir, start, dirs_exist_ok=True)
    for i, r in enumerate(recipe.polish_rounds):
        if r.steps <= 0:
            raise ValueError(f"polish rounds need positive step counts, got {r}")
        name = "polish" if i == 0 else f"polish{i + 1}"
        out = recipe.out_dir if i == len(recipe.polish_rounds) - 1 else recipe.workdir / f"{name}-model"
        polish_model(replace(recipe, out_dir=out), Polish(model_dir=start, steps=r.steps, emphasis=r.emphasis,
                                                          emphasis_seed=r.emphasis_seed, name=name))
        start = out
    return weights


def run(recipe: Recipe) -> dict[str, Any]:
    """All stages; returns the timings (seconds) per stage and in total."""
    recipe.workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    _timed(recipe, "data", make_data, recipe)
    clip, autoencoder = pretrain(recipe)
    cache, init, scale = _timed(recipe, "latents", cache_latents, recipe, clip, autoencoder)
    ema = _timed(recipe, "diffusion", train_diffusion, recipe, cache, init, scale)
    ema = _timed(recipe, "finetune", finetune_diffusion, recipe, cache, ema, scale)
    _timed(recipe, "export", export, recipe, ema, clip, scale)
    _timed(recipe, "decoder", tune_decoder, recipe)
    _timed(recipe, "polish", polish_exported, recipe)
    recipe.timings["total"] = round(time.time() - start, 1)
    (recipe.workdir / "timings.json").write_text(json.dumps(recipe.timings, indent=1), encoding="utf-8")
    return dict(recipe.timings)

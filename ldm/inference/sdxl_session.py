"""An SDXL request: sampling per job with the refiner hand-off (models swapped on the device), and the few lines
``ldm.api`` and ``ldm.inference.run`` call for SDXL models (planning, the task's session, latents, parameters)."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ldm import samplers
from ldm.inference import inpaint
from ldm.inference.errors import UsageError
from ldm.inference.sdxl import (SDXL, EngineDenoiser, SdxlOptions, check_role, conditioning, decode,
                                default_options, encode, finish, free, inpaint_start, is_refiner_config,
                                is_sdxl_config, schedule, split, start, vp_start)
from ldm.samplers.run import run_schedule
from ldm.samplers.schedules import USER_SCHEDULES

logger = logging.getLogger(__name__)

__all__ = ["SDXL", "SdxlSession", "SdxlSettings", "check_refiner", "parameters", "plan_options", "refiner_loader",
           "session_for", "task_latents"]


def check_refiner(path: Path, allow_unsafe: bool = False) -> tuple[Any, Any]:
    """(source, config) of ``--refiner`` (a file's keys or its sidecar yaml); UsageError unless it is an SDXL
    refiner. Reads no weights."""
    from ldm.inference import loading

    source = loading.resolve_source(path, None)
    config = loading.read_config(source.config_path, allow_unsafe=allow_unsafe)
    if not (is_sdxl_config(config) and is_refiner_config(config)):
        kind = "an SDXL base model" if is_sdxl_config(config) else "not an SDXL model"
        raise UsageError(f"--refiner '{path}' is {kind}; --refiner takes an SDXL refiner checkpoint "
                         f"(e.g. sd_xl_refiner_1.0.safetensors)")
    return source, config


@dataclass(frozen=True)
class SdxlSettings:
    """What an SDXL request samples: mode, prompts' shared settings and the SDXL options."""

    mode: str  # txt2img, img2img or inpaint
    negative_prompt: str
    steps: int
    sampler: samplers.SamplerChoice
    scale: float
    width: int
    height: int
    eta: Optional[float] = None
    strength: float = 1.0
    options: SdxlOptions = SdxlOptions()
    canvas: Optional[inpaint.Canvas] = None  # inpaint: the picture and its mask


MODES = ("txt2img", "img2img", "inpaint")


class SdxlSession:
    """One SDXL request on a loaded base engine: encoded init image (or inpainting canvas), sampling per job and the
    refiner hand-off. Inpainting keeps the unmasked latents at every step of both models (``samplers.masked``, as
    for any regular SD model); the caller pastes the decoded pictures into the canvas (``inpaint.composite``).

    The refiner is loaded at the first hand-off and released by :meth:`close` (or with the session); on an
    accelerator the model that is not sampling waits on the CPU, so only one of the two occupies the device at a
    time (the base comes back at the next job, or the next request).
    """

    def __init__(self, engine: Any, s: SdxlSettings, device: str, channels: int, factor: int,
                 init_image: Optional[torch.Tensor] = None, vae_given: bool = False,
                 load_refiner: Optional[Callable[[], Any]] = None) -> None:
        self.base, self.s, self.device, self.vae_given = engine, s, device, vae_given
        self.shape = (channels, s.height // factor, s.width // factor)
        self.load_refiner, self.refiner, self.active = load_refiner, None, engine
        if torch.device(device).type != "cpu":  # a previous request's hand-off may have left it on the CPU
            engine.to(device)
        self.prepared: Optional[inpaint.Prepared] = None
        if s.mode == "inpaint":
            if s.canvas is None:
                raise UsageError("SDXL inpainting needs the picture and its mask (a canvas)")
            self.prepared = inpaint.prepare(engine, s.canvas, False, device,
                                            encode=lambda model, x: encode(model, x, vae_given))
            self.posterior = self.prepared.image
        else:
            img2img = s.mode == "img2img" and init_image is not None
            self.posterior = encode(engine, init_image, vae_given) if img2img else None
        self.partial = s.mode in ("img2img", "inpaint")  # strength applies
        self.sigmas = schedule(engine, s.sampler, s.steps, s.strength if self.partial else None)
        self.parts = split(self.sigmas, s.options.refiner_switch) if load_refiner else (self.sigmas,)
        self.steps_per_image = len(self.sigmas) - 1 if not (self.partial and s.strength <= 0) else 0

    def _use(self, engine: Any) -> Any:
        """Make ``engine`` the one on the device (the other one waits on the CPU)."""
        if engine is not self.active and torch.device(self.device).type != "cpu":
            free(self.active)
            engine.to(self.device)
        self.active = engine
        return engine

    def _refiner(self) -> Any:
        if self.refiner is None:
            if torch.device(self.device).type != "cpu":
                free(self.base)
            self.refiner = self.load_refiner()
            self.active = self.refiner
        return self._use(self.refiner)

    def _run(self, engine: Any, prompts: Sequence[str], x: torch.Tensor, sigmas: torch.Tensor,
             gens: Sequence[torch.Generator], callback: Any, known: Optional[torch.Tensor]) -> torch.Tensor:
        s = self.s
        c, uc = conditioning(engine, prompts, s.negative_prompt, s.width, s.height, s.options)
        denoise = EngineDenoiser(engine, uc, s.scale).bind(c)
        if known is not None:  # inpainting: the unmasked latents stay the input's
            denoise = samplers.masked(denoise, known, self.prepared.keep.to(known))
        return run_schedule(s.sampler, denoise, x, sigmas, s.eta, list(gens), callback)

    @torch.no_grad()
    def latents(self, prompts: Sequence[str], gens: Sequence[torch.Generator], callback: Any = None
                ) -> torch.Tensor:
        """Sampled latents [B, C, h, w] of B prompts, one generator per image (first draw: its noise)."""
        s = self.s
        noised_input = self.partial and s.strength < 1  # the start is the input with noise, not noise alone
        if self.partial and s.strength <= 0:
            return self.base.scale_factor * self.posterior[0].expand(len(prompts), *self.shape)
        vp = vp_start(s.sampler) and not noised_input
        known = None
        if s.mode == "inpaint":
            x, known = inpaint_start(self.posterior, self.base.scale_factor, self.sigmas, gens, self.shape,
                                     self.device, vp, noised_input)
        else:
            x = start(self.posterior, self.base.scale_factor, self.sigmas, gens, self.shape, self.device, vp,
                      noised_input)
        x = self._run(self._use(self.base), prompts, x, self.parts[0], gens, self._counted(callback, 0), known)
        if len(self.parts) > 1:
            done = len(self.parts[0]) - 1
            x = self._run(self._refiner(), prompts, x, self.parts[1], gens, self._counted(callback, done), known)
        return finish(x, self.sigmas)

    def _counted(self, callback: Any, offset: int) -> Any:
        """``callback`` with the steps of a part counted among all steps of the image."""
        if callback is None or len(self.parts) == 1:
            return callback
        return lambda info: callback(dataclasses.replace(info, i=info.i + offset, total=self.steps_per_image))

    def images(self, latents: torch.Tensor, reduced: bool) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] decoded by the model now on the device (the refiner after a hand-off)."""
        return decode(self.active, latents, reduced, self.vae_given)

    def close(self) -> None:
        """Release the refiner; the base engine goes back to the device."""
        if self.refiner is not None:
            free(self.refiner)
            self.refiner = None
            if torch.device(self.device).type != "cpu":
                self.base.to(self.device)
            self.active = self.base


# --- the hooks of ldm.api / ldm.inference.run: SDXL's part of a run is here, they call it in a line each ---------

def plan_options(opts: Any, config: Any, ckpt: Optional[Path]) -> Any:
    """Options of a planned run with an SDXL model: the original's sampler when none was chosen, the role of the
    checkpoint (a refiner is no base) and ``--refiner`` checked; UsageError for what SDXL cannot do here."""
    given = getattr(opts, "sdxl", None)
    check_fit(config, ckpt)
    if not is_sdxl_config(config):
        if given is not None and given.refiner is not None:
            raise UsageError("--refiner applies to SDXL base models only; this model is not SDXL: drop --refiner")
        return opts
    path = ckpt if ckpt is not None else Path("--config")
    if opts.mode not in MODES:
        raise UsageError(f"{opts.mode} is not available for SDXL models: use txt2img.py, img2img.py or inpaint.py")
    check_role(config, path, opts.mode, given.refiner if given is not None else None)
    if given is not None and given.refiner is not None:
        check_refiner(given.refiner, getattr(opts, "unsafe_config", False))
    if getattr(opts, "sampler_given", True):
        sampler, schedule = opts.sampler, opts.schedule
    else:  # the scripts' default DDIM (on its own grid) becomes the original's Euler; a --schedule stays
        sampler, schedule = default_options(None, opts.schedule if opts.schedule in USER_SCHEDULES else None)
    return dataclasses.replace(opts, sampler=sampler, schedule=schedule,
                               sdxl=given if given is not None else SdxlOptions())


_ROLES = {"sdxl": "an SDXL base model", "sdxl-refiner": "an SDXL refiner"}
_OTHERS = {"sd1": "an SD 1.x checkpoint", "sd2": "an SD 2.x checkpoint", "sd2-v": "an SD 2.x checkpoint",
           "sd1-inpainting": "an SD 1.x inpainting checkpoint", "sd2-inpainting": "an SD 2.x inpainting checkpoint"}


def check_fit(config: Any, ckpt: Optional[Path]) -> None:
    """UsageError before anything is built when a ``.safetensors`` checkpoint's keys say SDXL (base / refiner) and
    the config says otherwise, or the other way round (other files are checked when their weights load)."""
    if ckpt is None or ckpt.suffix.lower() != ".safetensors" or not ckpt.is_file():
        return
    from ldm.checkpoint import CheckpointError
    from ldm.inference.loading import _keys_and_shapes
    from ldm.model_family import detect_family

    try:
        family = detect_family(_keys_and_shapes(ckpt)[0], ckpt.name)
    except (ValueError, CheckpointError):  # not a full model, or unreadable: the loader says which
        return
    wanted = ("sdxl-refiner" if is_refiner_config(config) else "sdxl") if is_sdxl_config(config) else None
    found = family.name if family.name in _ROLES else None
    if wanted == found:
        return
    what = _ROLES.get(found) or _OTHERS.get(family.name, f"a '{family.name}' checkpoint")
    builds = _ROLES.get(wanted, "a Stable Diffusion 1/2 model")
    raise UsageError(f"'{ckpt.name}' is {what}, but the config builds {builds}: pass the config that fits "
                     f"({family.config}), or drop --config to have it chosen from the checkpoint's keys")


def refiner_loader(path: Path, device: str, vae: Optional[Path], allow_unsafe: bool = False) -> Callable[[], Any]:
    """A function that loads the ``--refiner`` checkpoint (with the same ``--vae``) onto ``device`` when called."""
    def load() -> Any:
        from ldm.inference import loading

        source, config = check_refiner(path, allow_unsafe)
        logger.info("loading the SDXL refiner %s", path.name)
        return loading.load_model(source, config, None, vae, device)
    return load


def session_for(m: Any, s: Any) -> SdxlSession:
    """The SDXL session of an ``ldm.api`` task: ``m`` a LoadedModel, ``s`` its Settings (``s.sdxl`` options)."""
    from ldm.inference.pipeline import image_tensor

    options = getattr(s, "sdxl", None) or SdxlOptions()
    refiner = Path(options.refiner) if options.refiner is not None else None
    check_role(m.config, Path(m.source.ckpt_path or m.source.config_path), s.mode, refiner)
    if s.mode not in MODES:
        raise UsageError(f"{s.mode} is not available for SDXL models: use txt2img, img2img or inpaint")
    if refiner is not None:
        check_refiner(refiner)  # before any work, not at the hand-off
        options = dataclasses.replace(options, refiner=refiner)
    settings = SdxlSettings(s.mode, s.negative_prompt, s.steps, s.sampler, s.scale, s.width, s.height, s.eta,
                            s.strength, options, canvas=s.canvas if s.mode == "inpaint" else None)
    init = image_tensor(s.init_image, m.device) if s.mode == "img2img" and s.init_image is not None else None
    vae = getattr(m, "vae_path", None)  # the refiner gets the same --vae
    load = refiner_loader(options.refiner, m.device, vae) if options.refiner is not None else None
    return SdxlSession(m.model, settings, m.device, m.geometry.channels, m.geometry.factor, init_image=init,
                       vae_given=m.vae_name is not None, load_refiner=load)


def task_latents(task: Any, job: Any, callback: Any) -> torch.Tensor:
    """``ldm.api.task.LATENTS`` entry of SDXL: latents [B, C, h, w] of one job."""
    from ldm.inference.pipeline import generators

    return task.sdxl.latents(job.prompts, generators(job.seeds), callback)


def parameters(text: str, options: Optional[SdxlOptions]) -> str:
    """A ``parameters`` text with the refiner settings appended as the web UI writes them."""
    if options is None or options.refiner is None:
        return text
    from ldm.inference.metadata import quote

    return f"{text}, Refiner: {quote(options.refiner.stem)}, Refiner switch at: {options.refiner_switch:g}"

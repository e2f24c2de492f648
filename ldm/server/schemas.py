"""Request bodies of the web UI's API (``/sdapi/v1/txt2img``, ``img2img``...), with its JSON field names.

Unknown fields are ignored, as the web UI does; wrong types and out-of-range values are 422 answers.
Fields the web UI has but this server does not use (``restore_faces``, ``hr_sampler_name``, scripts...) are ignored
too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from ldm.inference.errors import UsageError
from ldm.inference.hires import DEFAULT_STRENGTH, HiresOptions

MAX_CLIP_SKIP = 12  # the web UI's CLIP_stop_at_last_layers slider goes from 1 to 12

@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``scripts/serve.py`` flags)."""

    max_pixels: int = 1024 * 1024  # width x height
    max_steps: int = 150
    max_batch_size: int = 8
    max_n_iter: int = 16
    max_upload_bytes: int = 32 * 1024 * 1024  # a whole request body
    max_queue: int = 100  # jobs waiting behind the running one


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GenerationBody(_Body):
    """Fields shared by txt2img and img2img."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(20, ge=1)
    sampler_name: Optional[str] = None  # None: Euler a, the web UI's
    sampler_index: Optional[str] = None  # the older field name
    scheduler: Optional[str] = None  # "automatic" / None: the sampler's default
    cfg_scale: float = Field(7.0, ge=-50, le=50, allow_inf_nan=False)
    seed: int = Field(-1, ge=-1, lt=2 ** 63)
    width: Optional[int] = Field(None, ge=8)
    height: Optional[int] = Field(None, ge=8)
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    eta: Optional[float] = Field(None, ge=0, le=1, allow_inf_nan=False)
    send_images: bool = True
    save_images: bool = False
    override_settings: dict[str, Any] = Field(default_factory=dict)  # only sd_model_checkpoint is read
    override_settings_restore_afterwards: bool = True
    force_task_id: Optional[str] = Field(None, max_length=200)  # the client's id for POST /internal/progress

    def sampler(self) -> str:
        """The sampler name the client chose (``sampler_name``, else ``sampler_index``, else Euler a)."""
        return self.sampler_name or self.sampler_index or "Euler a"

    def check_limits(self, limits: Limits) -> Optional[str]:
        """A readable reason when the request exceeds the server's limits, else None."""
        if self.steps > limits.max_steps:
            return f"steps {self.steps} is more than this server allows ({limits.max_steps})"
        if self.batch_size > limits.max_batch_size:
            return f"batch_size {self.batch_size} is more than this server allows ({limits.max_batch_size})"
        if self.n_iter > limits.max_n_iter:
            return f"n_iter {self.n_iter} is more than this server allows ({limits.max_n_iter})"
        w, h = self.width or 0, self.height or 0
        if w * h > limits.max_pixels:
            return f"width x height {w}x{h} is more than this server allows ({limits.max_pixels} pixels)"
        return None

    def settings(self) -> dict[str, Any]:
        """Keywords of :class:`ldm.api.Request` (prompt, sizes, seed...; images are added by the caller)."""
        return dict(prompt=self.prompt, negative_prompt=self.negative_prompt, steps=self.steps,
                    sampler=self.sampler(), schedule=self.scheduler, cfg_scale=self.cfg_scale,
                    seed=None if self.seed == -1 else self.seed, width=self.width, height=self.height,
                    batch_size=self.batch_size, n_iter=self.n_iter, eta=self.eta)


class Txt2ImgBody(GenerationBody):
    """``POST /sdapi/v1/txt2img``, with the hires fix (``enable_hr`` and its ``hr_*`` fields)."""

    enable_hr: bool = False
    hr_scale: float = Field(2.0, ge=1, le=4, allow_inf_nan=False)
    hr_upscaler: Optional[str] = None  # None: Latent
    hr_second_pass_steps: int = Field(0, ge=0)
    hr_resize_x: int = Field(0, ge=0)
    hr_resize_y: int = Field(0, ge=0)
    denoising_strength: Optional[float] = Field(None, ge=0, le=1, allow_inf_nan=False)  # hires; None: 0.7
    # a second pass with its own prompt, sampler or model is not available: empty or the first pass's only
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_sampler_name: Optional[str] = None
    hr_checkpoint_name: Optional[str] = None

    def hires(self) -> Optional[HiresOptions]:
        """The hires fix asked for (None when ``enable_hr`` is off); UsageError for second-pass settings of its
        own (prompt, sampler, checkpoint), which this server does not run."""
        if not self.enable_hr:
            return None
        own = [name for name, value, first in (("hr_prompt", self.hr_prompt, self.prompt),
                                               ("hr_negative_prompt", self.hr_negative_prompt, self.negative_prompt),
                                               ("hr_sampler_name", self.hr_sampler_name, self.sampler()),
                                               ("hr_checkpoint_name", self.hr_checkpoint_name, None))
               if value and value not in (first, "Use same sampler", "Use same checkpoint")]
        if own:
            raise UsageError(f"{', '.join(own)}: a hires second pass with its own prompt, sampler or checkpoint is "
                             f"not available here; leave them empty (the first pass's are used)")
        strength = DEFAULT_STRENGTH if self.denoising_strength is None else self.denoising_strength
        return HiresOptions(self.hr_scale, self.hr_upscaler or "Latent", self.hr_second_pass_steps, strength,
                            self.hr_resize_x, self.hr_resize_y)

    def check_limits(self, limits: Limits) -> Optional[str]:
        """The shared limits, plus the hires pass's steps and size."""
        problem = super().check_limits(limits)
        if problem or not self.enable_hr:
            return problem
        if self.hr_second_pass_steps > limits.max_steps:
            return (f"hr_second_pass_steps {self.hr_second_pass_steps} is more than this server allows "
                    f"({limits.max_steps})")
        w, h = self.width or 512, self.height or 512
        if self.hr_resize_x or self.hr_resize_y:
            x = self.hr_resize_x or w * self.hr_resize_y / h
            y = self.hr_resize_y or h * self.hr_resize_x / w
        else:
            x, y = w * self.hr_scale, h * self.hr_scale
        if x * y > limits.max_pixels:
            return f"the hires size {int(x)}x{int(y)} is more than this server allows ({limits.max_pixels} pixels)"
        return None

    def settings(self) -> dict[str, Any]:
        """The shared keywords plus ``hires``."""
        return {**super().settings(), "hires": self.hires()}


class Img2ImgBody(GenerationBody):
    """``POST /sdapi/v1/img2img``: ``init_images`` (base64), with ``mask`` it inpaints."""

    init_images: list[str] = Field(min_length=1)
    denoising_strength: float = Field(0.75, ge=0, le=1, allow_inf_nan=False)
    resize_mode: int = Field(0, ge=0, le=3)  # 0 just resize, 1 crop and resize, 2 resize and fill (3: refused)
    mask: Optional[str] = None
    mask_blur: int = Field(4, ge=0, le=256)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = Field(32, ge=0, le=256)
    include_init_images: bool = False


class TaskProgressBody(_Body):
    """``POST /internal/progress`` (the web UI's page uses it): one task's progress and a newer preview."""

    id_task: Optional[str] = None
    id_live_preview: int = -1
    live_preview: bool = True


class PngInfoBody(_Body):
    """``POST /sdapi/v1/png-info``."""

    image: str


class OptionsBody(_Body):
    """``POST /sdapi/v1/options``: only ``sd_model_checkpoint`` and ``CLIP_stop_at_last_layers`` (Clip skip)
    change anything here."""

    model_config = ConfigDict(extra="allow")
    sd_model_checkpoint: Optional[str] = None
    CLIP_stop_at_last_layers: Optional[int] = Field(None, ge=1, le=MAX_CLIP_SKIP)

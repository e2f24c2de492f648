"""Samplers as functions over one denoiser ``D(x, sigma)``, their sigma schedules, and the table of names.

``resolve("DPM++ 2M Karras")`` picks a sampler; :func:`ldm.samplers.run.sample` runs it on a model seen through
:class:`~ldm.samplers.denoiser.SigmaDenoiser`. The functions (``sample_euler`` ... ``sample_unipc``) can also be
called directly with any ``model(x, sigma) -> denoised``.
"""
from ldm.samplers.denoiser import SigmaDenoiser, masked
from ldm.samplers.dpmpp import (sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral,
                                sample_dpmpp_3m_sde, sample_dpmpp_sde)
from ldm.samplers.euler import (sample_dpm_2, sample_dpm_2_ancestral, sample_euler, sample_euler_ancestral,
                                sample_heun, sample_lms)
from ldm.samplers.original import sample_ddim, sample_dpm_solver, sample_plms
from ldm.samplers.registry import SAMPLERS, SamplerChoice, SamplerSpec, UnknownSampler, help_table, resolve
from ldm.samplers.run import img2img_steps, sample, sigmas_for
from ldm.samplers.steps import StepInfo
from ldm.samplers.unipc import sample_unipc

__all__ = [
    "SAMPLERS", "SamplerChoice", "SamplerSpec", "SigmaDenoiser", "StepInfo", "UnknownSampler", "help_table",
    "img2img_steps", "masked", "resolve", "sample", "sample_ddim", "sample_dpm_2", "sample_dpm_2_ancestral",
    "sample_dpm_solver", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde", "sample_dpmpp_sde", "sample_euler", "sample_euler_ancestral", "sample_heun",
    "sample_lms", "sample_plms", "sample_unipc", "sigmas_for",
]

"""The ``sgm.*`` class paths of Stability-AI's SDXL configs and the project classes that implement them.

SDXL configs (``sd_xl_base.yaml``, ``sd_xl_refiner.yaml`` and users' copies) name ``sgm.*`` targets. They are not
imported from any ``sgm`` package: :func:`ldm.util.get_obj_from_str` and :mod:`ldm.config_policy` look them up in
this explicit table, so exactly these names resolve, each to one of our classes.
"""
from __future__ import annotations

_ENC = "ldm.modules.encoders.sdxl_conditioner"
_DEN = "ldm.modules.diffusionmodules.sdxl_denoiser"

SGM_ALIASES: dict[str, str] = {
    "sgm.models.diffusion.DiffusionEngine": "ldm.models.diffusion.sdxl.DiffusionEngine",
    "sgm.models.autoencoder.AutoencoderKL": "ldm.models.diffusion.sdxl.SGMAutoencoderKL",
    "sgm.modules.diffusionmodules.wrappers.OpenAIWrapper": "ldm.models.diffusion.sdxl.OpenAIWrapper",
    "sgm.modules.diffusionmodules.openaimodel.UNetModel": "ldm.modules.diffusionmodules.sdxl_unet.SDXLUNetModel",
    "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser": f"{_DEN}.DiscreteDenoiser",
    "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling": f"{_DEN}.EpsScaling",
    "sgm.modules.diffusionmodules.denoiser_scaling.VScaling": f"{_DEN}.VScaling",
    "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization": f"{_DEN}.LegacyDDPMDiscretization",
    "sgm.modules.GeneralConditioner": f"{_ENC}.GeneralConditioner",
    "sgm.modules.encoders.modules.GeneralConditioner": f"{_ENC}.GeneralConditioner",
    "sgm.modules.encoders.modules.FrozenCLIPEmbedder": f"{_ENC}.FrozenCLIPTextEmbedder",
    "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2": f"{_ENC}.FrozenOpenCLIPEmbedder2",
    "sgm.modules.encoders.modules.ConcatTimestepEmbedderND": f"{_ENC}.ConcatTimestepEmbedderND",
}


def resolve_target(target: str) -> str:
    """The project class path for an ``sgm.*`` alias; any other target unchanged."""
    return SGM_ALIASES.get(target, target)

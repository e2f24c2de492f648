"""NSFW safety checker of the SD1 txt2img script (the maths of diffusers 0.3.0's checker, on plain torch).

Nothing is downloaded: ``load_safety_checker(folder)`` reads a local folder (``config.json``,
``model.safetensors`` or ``pytorch_model.bin``, ``preprocessor_config.json``) and returns None
with a warning when it is missing.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.checkpoint import load_state_dict_file
from ldm.modules.encoders.clip_text import merged_sub_config
from ldm.modules.encoders.clip_vision import CLIPVisionConfig, CLIPVisionModel

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PreprocessConfig:
    """CLIPFeatureExtractor settings: shortest side ``size``, ``crop_size`` (h, w), PIL ``resample``, mean/std."""

    size: int = 224
    crop_size: tuple[int, int] = (224, 224)
    resample: int = 3
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    do_resize: bool = True
    do_center_crop: bool = True
    do_normalize: bool = True

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PreprocessConfig":
        """Read an HF ``preprocessor_config.json`` dict (int sizes or the newer dict form)."""
        size = values.get("size", 224)
        if isinstance(size, Mapping):
            size = size.get("shortest_edge", size.get("height"))
        crop = values.get("crop_size", 224)
        crop = (crop["height"], crop["width"]) if isinstance(crop, Mapping) else (int(crop), int(crop))
        return cls(size=int(size), crop_size=crop, resample=int(values.get("resample", 3)),
                   image_mean=tuple(values.get("image_mean", CLIP_MEAN)),
                   image_std=tuple(values.get("image_std", CLIP_STD)),
                   do_resize=bool(values.get("do_resize", True)),
                   do_center_crop=bool(values.get("do_center_crop", True)),
                   do_normalize=bool(values.get("do_normalize", True)))


def numpy_to_pil(images: np.ndarray) -> list:
    """Float images [B, H, W, 3] (or [H, W, 3]) in [0, 1] -> PIL images via ``(x * 255).round()`` as uint8."""
    from PIL import Image

    if images.ndim == 3:
        images = images[None, ...]
    return [Image.fromarray(image) for image in (images * 255).round().astype("uint8")]


def _resize_shortest(image, size: int, resample: int):
    """Resize so that the shorter side is ``size`` (longer side truncated to int), as transformers 4.19."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_long = int(size * long / short)
    return image.resize((size, new_long) if width <= height else (new_long, size), resample=resample)


def _center_crop(image, crop: tuple[int, int]):
    """Center crop to (height, width) with transformers 4.19's offsets (zero padding where the image is smaller)."""
    width, height = image.size
    top = int((height - crop[0] + 1) * 0.5)
    left = int((width - crop[1] + 1) * 0.5)
    return image.crop((left, top, left + crop[1], top + crop[0]))


def clip_preprocess(images: Sequence, config: PreprocessConfig) -> torch.Tensor:
    """PIL images -> CLIP pixel values [B, 3, crop_h, crop_w] float32, as transformers 4.19's CLIPFeatureExtractor."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if config.do_resize:
            image = _resize_shortest(image, config.size, config.resample)
        if config.do_center_crop:
            image = _center_crop(image, config.crop_size)
        array = (np.asarray(image).astype(np.float32) * (1 / 255.0)).transpose(2, 0, 1)
        if config.do_normalize:
            mean = np.asarray(config.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(config.image_std, dtype=np.float32)[:, None, None]
            array = (array - mean) / std
        arrays.append(array)
    return torch.from_numpy(np.stack(arrays))


def cosine_distance(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix [B, N] between image embeddings [B, D] and concept embeddings [N, D]."""
    return F.normalize(image_embeds) @ F.normalize(text_embeds).t()


def nsfw_flags(special_cos: np.ndarray, concept_cos: np.ndarray, special_thresholds: Sequence[float],
               concept_thresholds: Sequence[float]) -> list[bool]:
    """Per image: a special-care score above 0 adds 0.01 to the later scores; flagged if a concept score > 0.

    Scores are ``round(cos - threshold + adjustment, 3)`` with float32 cosines and Python-float thresholds,
    exactly as diffusers 0.3.0 computes them.
    """
    flags = []
    for special_row, concept_row in zip(special_cos, concept_cos):
        adjustment = 0.0
        for cos, threshold in zip(special_row, special_thresholds):
            if round(cos - threshold + adjustment, 3) > 0:
                adjustment = 0.01
        flags.append(any(round(cos - threshold + adjustment, 3) > 0
                         for cos, threshold in zip(concept_row, concept_thresholds)))
    return flags


class SafetyChecker(nn.Module):
    """CLIP ViT image embedding compared with 17 concept and 3 special-care embeddings (keys as diffusers)."""

    def __init__(self, vision_config: CLIPVisionConfig, projection_dim: int,
                 preprocess_config: Optional[PreprocessConfig] = None):
        super().__init__()
        self.vision_model = CLIPVisionModel(vision_config)
        self.visual_projection = nn.Linear(vision_config.hidden_size, projection_dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.ones(17, projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(3, projection_dim), requires_grad=False)
        self.register_buffer("concept_embeds_weights", torch.ones(17))
        self.register_buffer("special_care_embeds_weights", torch.ones(3))
        self.preprocess_config = preprocess_config or PreprocessConfig()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], preprocess: Optional[Mapping[str, Any]] = None) -> "SafetyChecker":
        """Build from an HF ``CLIPConfig`` dict (vision part + projection_dim) and a preprocessor dict."""
        vision = CLIPVisionConfig.from_dict(merged_sub_config(config, "vision"))
        return cls(vision, int(config.get("projection_dim", 512)),
                   PreprocessConfig.from_dict(preprocess) if preprocess is not None else None)

    @classmethod
    def from_files(cls, config_json: PathLike, weights_file: PathLike,
                   preprocessor_config_json: Optional[PathLike] = None) -> "SafetyChecker":
        """Build from ``config.json``; load ``weights_file`` (.safetensors, or .bin/.pt read weights-only) strictly."""
        config = json.loads(Path(config_json).read_text(encoding="utf-8"))
        preprocess = (json.loads(Path(preprocessor_config_json).read_text(encoding="utf-8"))
                      if preprocessor_config_json is not None else None)
        checker = cls.from_config(config, preprocess)
        checker.load_state_dict(load_state_dict_file(weights_file), strict=True)
        return checker.eval().requires_grad_(False)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """Float images [B, H, W, 3] in [0, 1] -> CLIP pixel values [B, 3, crop_h, crop_w] float32 (on CPU)."""
        return clip_preprocess(numpy_to_pil(np.asarray(images)), self.preprocess_config)

    @torch.no_grad()
    def image_embeds(self, clip_input: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings [B, projection_dim] of CLIP pixel values [B, 3, h, w]."""
        param = self.visual_projection.weight
        return self.visual_projection(self.vision_model(clip_input.to(param.device, param.dtype))[1])

    @torch.no_grad()
    def cosine_distances(self, clip_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(special_cos_dist [B, 3], cos_dist [B, 17]) of the images, float32 on CPU."""
        embeds = self.image_embeds(clip_input)
        special = cosine_distance(embeds, self.special_care_embeds).float().cpu()
        concept = cosine_distance(embeds, self.concept_embeds).float().cpu()
        return special, concept

    def forward(self, images: Any, clip_input: torch.Tensor) -> tuple[Any, list[bool]]:
        """(images with flagged ones replaced by zeros (a copy), has_nsfw_concept list[bool])."""
        special, concept = self.cosine_distances(clip_input)
        flags = nsfw_flags(special.numpy(), concept.numpy(), self.special_care_embeds_weights.tolist(),
                           self.concept_embeds_weights.tolist())
        checked = images.clone() if isinstance(images, torch.Tensor) else np.array(images, copy=True)
        for index, flagged in enumerate(flags):
            if flagged:
                checked[index] = 0
        if any(flags):
            logger.warning("Potential NSFW content was detected in %d of %d images; they were replaced by black "
                           "images.", sum(flags), len(flags))
        return checked, flags

    def check(self, images: np.ndarray) -> tuple[np.ndarray, list[bool]]:
        """Preprocess and check float images [B, H, W, 3] in [0, 1]: (checked images, flags)."""
        return self(images, self.preprocess(images))


def find_weights(folder: PathLike) -> Optional[Path]:
    """The first of ``model.safetensors`` / ``pytorch_model.bin`` present in ``folder``, else None."""
    for name in WEIGHT_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def load_safety_checker(folder: Optional[PathLike]) -> Optional[SafetyChecker]:
    """The checker stored in a local ``folder``, or None with one warning when it (or a file) is absent."""
    folder_path = Path(folder) if folder is not None else None
    weights = find_weights(folder_path) if folder_path is not None and folder_path.is_dir() else None
    missing = [] if weights is not None else [" or ".join(WEIGHT_FILES)]
    if folder_path is not None:
        missing += [n for n in ("config.json", "preprocessor_config.json") if not (folder_path / n).is_file()]
    if folder_path is None or missing:
        logger.warning("NSFW safety checker disabled: %s not found in '%s' (it is never downloaded; put the "
                       "CompVis/stable-diffusion-safety-checker files there to enable it)",
                       ", ".join(missing) or "folder", folder)
        return None
    return SafetyChecker.from_files(folder_path / "config.json", weights, folder_path / "preprocessor_config.json")

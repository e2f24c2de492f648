"""Inpainting and outpainting for the scripts: the mask, the grown canvas, the conditioning and the sampling call.

The mask is white where the picture is repainted. Inpainting models (9 UNet input channels) get the original
SD 2 inpainting conditioning (``ldm.models.diffusion.inpaint``); any other model keeps the known region with
:func:`ldm.samplers.masked` at every step (every sampler). After decoding, the result is composited with the
input through the blurred mask, so pixels outside it stay the input's.

Draws per image (its own generator): the start noise, then (inpainting models) the masked image's posterior
sample, then the input image's posterior sample when the run needs it.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ldm import samplers
from ldm.inference import limits, pipeline
from ldm.inference.errors import UsageError
from ldm.models.diffusion.inpaint import binarize_mask, concat_conditioning, masked_image
from ldm.samplers import SamplerChoice
from ldm.samplers.noise import draw

logger = logging.getLogger(__name__)

FILLS = ("edge", "noise")  # what fills the new area of an outpainted canvas before it is repainted
INPAINT_STRENGTH = 1.0  # default --strength for inpainting models and outpainting
IMG2IMG_STRENGTH = 0.75  # default --strength for inpainting with a regular model (the web UI's)


@dataclass(frozen=True)
class InpaintOptions:
    """The inpainting flags: mask file, blur, inversion, outpainting pads, fill, "only masked" area."""

    mask: Optional[Path] = None
    mask_blur: int = 4
    invert_mask: bool = False
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)  # left, right, top, bottom (pixels)
    fill: str = "edge"
    full_res: bool = False
    full_res_padding: int = 32
    strength_given: bool = False


def add_flags(p: Any) -> None:
    """The flags of scripts/inpaint.py besides img2img's (an ``argparse`` parser)."""
    g = p.add_argument_group("inpainting and outpainting")
    g.add_argument("--mask", type=Path, default=None,
                   help="mask image, white where the picture is repainted (any mode; resized to the image if needed)")
    g.add_argument("--mask_blur", "--mask-blur", dest="mask_blur", type=int, default=4,
                   help="soften the mask edge with a Gaussian of this standard deviation in pixels, cut off at 2.5 "
                        "times it (default 4; 0: a hard edge)")
    g.add_argument("--invert_mask", "--invert-mask", dest="invert_mask", action="store_true",
                   help="repaint the black part of the mask instead of the white part")
    g.add_argument("--outpaint", "--pad", dest="outpaint", default=None, metavar="LEFT,RIGHT,TOP,BOTTOM",
                   help="grow the canvas by these pixels (multiples of the model's factor, 8 for SD) and paint the "
                        "new area")
    g.add_argument("--outpaint_fill", choices=FILLS, default="edge",
                   help="what fills the new area before it is repainted: the image's edge pixels (default) or noise")
    g.add_argument("--inpaint_full_res", "--only_masked", dest="full_res", action="store_true",
                   help="repaint only the masked area (plus padding), at the full --W x --H resolution, and paste "
                        "it back (the web UI's Inpaint area: Only masked)")
    g.add_argument("--inpaint_full_res_padding", dest="full_res_padding", type=int, default=32, metavar="PIXELS",
                   help="with --inpaint_full_res: context around the masked area (default 32)")


def options_from(ns: Any, mask: Optional[Path]) -> InpaintOptions:
    """The checked inpainting options of parsed flags (``mask``: the checked --mask path)."""
    for flag, value in (("--mask_blur", ns.mask_blur), ("--inpaint_full_res_padding", ns.full_res_padding)):
        if not 0 <= value <= 256:
            raise UsageError(f"{flag} must be between 0 and 256 pixels, got {value}")
    pad = parse_pad(ns.outpaint) if ns.outpaint is not None else (0, 0, 0, 0)
    if mask is None and not any(pad):
        raise UsageError("inpainting needs a mask: pass --mask PATH (white = repaint) or --outpaint L,R,T,B")
    if ns.full_res and any(pad):
        raise UsageError("--inpaint_full_res and --outpaint do not go together (outpainting paints the new border "
                         "of the whole canvas): drop one")
    return InpaintOptions(mask, ns.mask_blur, ns.invert_mask, pad, ns.outpaint_fill, ns.full_res,
                          ns.full_res_padding, ns.strength is not None)


def config_is_inpainting(config: Any) -> bool:
    """True when a config builds a model whose UNet takes more input channels than the latents have (9 vs 4)."""
    params = config.model.get("params") or {}
    unet = (params.get("unet_config") or {}).get("params") or {}
    return int(unet.get("in_channels", 0)) > int(params.get("channels", 4))


def check_mode(mode: str, config: Any, source: Any) -> None:
    """UsageError when txt2img/img2img is asked of an inpainting model (it needs a mask and an image)."""
    if mode != "inpaint" and config_is_inpainting(config):
        what = (f"'{Path(source.ckpt_path).name}' is an inpainting checkpoint" if source.ckpt_path is not None else
                f"'{source.config_path}' describes an inpainting model")
        raise UsageError(f"{what} (its UNet also takes a mask and a masked image): use scripts/inpaint.py "
                         f"--init-img IMAGE --mask MASK, or a regular text-to-image checkpoint")


def with_default_strength(opts: Any, config: Any) -> Any:
    """``opts`` with the inpainting default --strength when none was given: 1 for inpainting models and for
    outpainting (the new area has nothing worth keeping), 0.75 for inpainting with a regular model."""
    inp = opts.inpaint
    if inp is None or inp.strength_given or config_is_inpainting(config) or any(inp.pad):
        return opts
    return dataclasses.replace(opts, strength=IMG2IMG_STRENGTH)


def parse_pad(text: str) -> tuple[int, int, int, int]:
    """``LEFT,RIGHT,TOP,BOTTOM`` pixels (one number: the same on every side) -> 4 non-negative ints."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise UsageError(f"--outpaint '{text}': give LEFT,RIGHT,TOP,BOTTOM in pixels, e.g. 64,64,0,0") from None
    if len(values) == 1:
        values *= 4
    if len(values) != 4 or min(values) < 0:
        raise UsageError(f"--outpaint '{text}': give four non-negative numbers LEFT,RIGHT,TOP,BOTTOM, e.g. 64,64,0,0")
    return values[0], values[1], values[2], values[3]


def check_pad(pad: Sequence[int], factor: int) -> None:
    """Every outpainting pad must be a multiple of the model's factor (the canvas stays latent-aligned)."""
    for side, value in zip(("left", "right", "top", "bottom"), pad):
        if value % factor:
            low = value - value % factor
            raise UsageError(f"--outpaint: {side} {value} is not a multiple of {factor} (the model's downsampling "
                             f"factor): use {low} or {low + factor}")


def load_mask(path: Path, size: tuple[int, int], invert: bool, allow_large: bool = False,
              image_file_size: Optional[tuple[int, int]] = None) -> Image.Image:
    """The mask file as an 8-bit grey image (white = repaint) of ``size``; any mode is converted. A mask of another
    size than the image file (``image_file_size``, default ``size``) is resized with a warning, one of the file's
    size silently (the image was resized too). Its size is checked from the header before any pixel is decoded."""
    try:
        with pipeline._own_size_limits(), Image.open(path) as image:
            if image.width * image.height > limits.MAX_READ_PIXELS and not allow_large:
                raise UsageError(f"--mask '{path}' is {image.width}x{image.height} pixels, too large to read (the "
                                 f"limit is {limits.MAX_READ_PIXELS / 1e6:.0f} megapixels): give a mask of the "
                                 f"image's size, or pass {limits.OVERRIDE}")
            image.load()
            grey = pipeline._rgb(image).convert("L")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UsageError(f"--mask: cannot read '{path}' as an image ({e}); give a PNG or JPEG file, white where "
                         f"the picture is repainted") from None
    if grey.size != (image_file_size or size):
        logger.warning("--mask '%s' is %dx%d, the image %dx%d: the mask was resized to fit", path, *grey.size,
                       *(image_file_size or size))
    if grey.size != size:
        grey = grey.resize(size, resample=Image.BILINEAR)
    return Image.fromarray(255 - np.asarray(grey)) if invert else grey


def grow_canvas(image: Image.Image, mask: Image.Image, pad: Sequence[int], fill: str,
                seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """(image, mask) grown by ``pad`` = left, right, top, bottom pixels: the new area is masked (255) and filled
    with the image's edge pixels (``edge``) or with noise around the image's mean colour (``noise``)."""
    left, right, top, bottom = pad
    if not any(pad):
        return image, mask
    pixels = np.asarray(image)
    grown = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    new = np.ones(grown.shape[:2], dtype=bool)
    new[top:top + pixels.shape[0], left:left + pixels.shape[1]] = False
    if fill == "noise":
        rng = np.random.default_rng(seed)
        noise = pixels.reshape(-1, 3).mean(0) + rng.normal(0.0, 64.0, grown.shape)
        grown = np.where(new[..., None], np.clip(noise, 0, 255).astype(np.uint8), grown)
    grown_mask = np.pad(np.asarray(mask), ((top, bottom), (left, right)), constant_values=255)
    return Image.fromarray(grown), Image.fromarray(grown_mask)


def blur(mask: Image.Image, radius: int) -> Image.Image:
    """The mask softened by a Gaussian of standard deviation ``radius`` pixels, cut off at 2.5 of them as the web UI
    does (pixels farther from the mask stay 0, so the input's pixels there are kept exactly); 0: unchanged."""
    if radius <= 0:
        return mask
    half = int(2.5 * radius + 0.5)
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    kernel = torch.exp(-x * x / (2.0 * radius * radius))
    kernel = (kernel / kernel.sum())[None, None]
    a = torch.from_numpy(np.asarray(mask, dtype=np.float64))[None, None]
    for dim in (2, 3):  # separable: rows, then columns (mirrored borders)
        pad = (0, 0, half, half) if dim == 2 else (half, half, 0, 0)
        padded = F.pad(a, pad, mode="reflect") if min(a.shape[2:]) > half else F.pad(a, pad, mode="replicate")
        k = kernel[..., None] if dim == 2 else kernel[:, :, None]
        a = F.conv2d(padded, k)
    return Image.fromarray(np.clip(np.rint(a[0, 0].numpy()), 0, 255).astype(np.uint8))


def _fit(lo: int, hi: int, length: int, limit: int) -> tuple[int, int]:
    """An interval of ``length`` (at most ``limit``) centred on [lo, hi), shifted to lie within [0, limit)."""
    length = min(length, limit)
    start = min(max((lo + hi - length) // 2, 0), limit - length)
    return start, start + length


def crop_box(mask: Image.Image, padding: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The masked area's bounding box grown by ``padding`` and widened to the aspect ratio of ``size``, within the
    mask (the web UI's "Only masked" area)."""
    x0, y0, x1, y1 = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    x0, y0, x1, y1 = x0 - padding, y0 - padding, x1 + padding, y1 + padding
    w, h = x1 - x0, y1 - y0
    if w * size[1] < h * size[0]:
        w = round(h * size[0] / size[1])
    else:
        h = round(w * size[1] / size[0])
    x0, x1 = _fit(x0, x1, w, mask.size[0])
    y0, y1 = _fit(y0, y1, h, mask.size[1])
    return x0, y0, x1, y1


@dataclass
class Canvas:
    """The picture to repaint: the whole (grown) canvas, its blurred mask, and the area that is generated."""

    image: Image.Image
    mask: Image.Image  # "L", 255 = repaint, blurred
    size: tuple[int, int]  # generation size (width, height)
    box: Optional[tuple[int, int, int, int]] = None  # "Only masked": the crop of the canvas that is generated

    def work(self) -> tuple[Image.Image, Image.Image]:
        """(image, mask) at the generation size: the whole canvas, or the crop box resized."""
        if self.box is None:
            return self.image, self.mask
        return (self.image.crop(self.box).resize(self.size, Image.LANCZOS),
                self.mask.crop(self.box).resize(self.size, Image.BILINEAR))

    def composite(self, generated: Image.Image) -> Image.Image:
        """The canvas with ``generated`` pasted in through the blurred mask (pixels outside it unchanged)."""
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            placed = self.image.copy()
            placed.paste(generated.resize((x1 - x0, y1 - y0), Image.LANCZOS), (x0, y0))
            generated = placed
        return Image.composite(generated, self.image, self.mask)


def plan_canvas(opts: Any, inp: InpaintOptions, factor: int, width: Optional[int],
                height: Optional[int], native: int) -> Canvas:
    """Read the image and the mask, grow the canvas, blur the mask, choose the generated area; UsageError for bad
    input, before anything is loaded or written."""
    check_pad(inp.pad, factor)
    image = pipeline.load_init_image(opts.init_img, factor, None if inp.full_res else width,
                                     None if inp.full_res else height, opts.allow_large)
    if inp.mask is not None:
        mask = load_mask(inp.mask, image.size, inp.invert_mask, opts.allow_large, _file_size(opts.init_img))
    elif any(inp.pad):
        mask = Image.new("L", image.size, 0)
    else:
        raise UsageError("inpainting needs a mask: pass --mask PATH (white = repaint) or --outpaint L,R,T,B")
    return build_canvas(image, mask, inp, width, height, native, opts.allow_large, opts.seed)


def build_canvas(image: Image.Image, mask: Image.Image, inp: InpaintOptions, width: Optional[int],
                 height: Optional[int], native: int, allow_large: bool = False, seed: int = 0) -> Canvas:
    """The canvas of an RGB image and its grey mask of the same size (white = repaint): grown, checked, blurred,
    cropped to the generated area ("only masked"); UsageError for bad input."""
    left, right, top, bottom = inp.pad
    limits.check_size(image.width + left + right, image.height + top + bottom, allow_large,
                      what="the outpainted canvas" if any(inp.pad) else "the image")
    image, mask = grow_canvas(image, mask, inp.pad, inp.fill, seed)
    check_mask(mask, inp.mask)
    mask = blur(mask, inp.mask_blur)
    if not inp.full_res:
        return Canvas(image, mask, image.size)
    size = (width or native, height or native)
    return Canvas(image, mask, size, crop_box(mask, inp.full_res_padding, size))


def _file_size(path: Path) -> Optional[tuple[int, int]]:
    """(width, height) of an image file from its header (None when it cannot be read)."""
    try:
        with pipeline._own_size_limits(), Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def check_mask(mask: Image.Image, path: Optional[Path]) -> None:
    """UsageError for a mask that repaints nothing; a warning for one that repaints everything."""
    binary = np.asarray(mask) >= 128
    name = f"--mask '{path}'" if path is not None else "the mask"
    if not binary.any():
        raise UsageError(f"{name} repaints nothing (it is black, or darker than middle grey, everywhere): paint "
                         f"the area to change white, or pass --invert_mask if it is drawn the other way round")
    if binary.all():
        logger.warning("%s repaints the whole picture: the result keeps nothing of the input's pixels", name)


@dataclass
class Prepared:
    """What every batch needs, encoded once: the input's and the masked input's posteriors and the masks."""

    canvas: Canvas
    image: tuple[torch.Tensor, torch.Tensor]  # (mean, std) [1, C, h, w] of the input
    masked: Optional[tuple[torch.Tensor, torch.Tensor]]  # same for the masked input (inpainting models)
    mask: torch.Tensor  # [1, 1, H, W] binary, 1 = repaint (the model's conditioning)
    keep: torch.Tensor  # [1, 1, h, w] 1 where the latents are kept (regular models)


def prepare(model: Any, canvas: Canvas, inpainting: bool, device: str,
            encode: Optional[Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None) -> Prepared:
    """Encode the generated area and its masked version (inpainting models) through the first stage (``encode``:
    model, image [1, 3, H, W] in [-1, 1] -> posterior (mean, std); default ``pipeline.encode_init``)."""
    encode = encode or pipeline.encode_init
    image, mask_image = canvas.work()
    x = pipeline.image_tensor(image, device)
    soft = torch.from_numpy(np.asarray(mask_image, dtype=np.float32) / 255.0)[None, None].to(device)
    mask = binarize_mask(soft)
    mean, std = encode(model, x)
    masked = encode(model, masked_image(x, mask)) if inpainting else None
    # a latent cell is regenerated when any pixel of it is touched by the blurred mask
    keep = 1.0 - F.adaptive_max_pool2d((soft > 0).float(), mean.shape[-2:])
    return Prepared(canvas, (mean.float(), std.float()), None if masked is None else tuple(t.float() for t in masked),
                    mask, keep)


def _posterior(model: Any, posterior: tuple[torch.Tensor, torch.Tensor], gens: Sequence[torch.Generator],
               device: Any) -> torch.Tensor:
    mean, std = posterior
    return model.scale_factor * (mean + std * draw(gens, mean.shape[1:], device))


@torch.inference_mode()
def sample_inpaint(model: Any, choice: SamplerChoice, prep: Prepared, cond: torch.Tensor,
                   uncond: Optional[torch.Tensor], steps: int, strength: float, scale: float,
                   gens: Sequence[torch.Generator], eta: Optional[float] = None,
                   callback: pipeline.StepCallback = None) -> torch.Tensor:
    """Latents [B, C, h, w] of the generated area; strength < 1 starts from the input noised to that level."""
    mean = prep.image[0]
    noise = draw(gens, mean.shape[1:], mean.device)
    if prep.masked is not None:  # the UNet sees [mask, masked latent]; so does the unconditional branch
        c_cat = concat_conditioning(prep.mask.expand(len(gens), -1, -1, -1),
                                    _posterior(model, prep.masked, gens, mean.device))
        cond = {"c_concat": [c_cat], "c_crossattn": [cond]}
        uncond = None if uncond is None else {"c_concat": [c_cat], "c_crossattn": [uncond]}
        z0 = _posterior(model, prep.image, gens, mean.device) if strength < 1 else None
        return samplers.sample(choice, pipeline.guided_denoiser(model, uncond, scale), noise, steps, cond, init=z0,
                               strength=strength, eta=eta, gens=list(gens), callback=callback)
    z0 = _posterior(model, prep.image, gens, mean.device)
    denoiser = pipeline.guided_denoiser(model, uncond, scale)
    keep = prep.keep.to(z0)
    return samplers.sample(choice, denoiser, noise, steps, cond, init=z0, strength=strength, eta=eta,
                           gens=list(gens), callback=callback, model=samplers.masked(denoiser.bind(cond), z0, keep))


def composite(prep: Prepared, images: Sequence[Image.Image]) -> list[Image.Image]:
    """Each generated image pasted into the canvas through the blurred mask."""
    return [prep.canvas.composite(image) for image in images]


def to_array(images: Sequence[Image.Image]) -> np.ndarray:
    """PIL RGB images -> float32 [B, H, W, 3] in [0, 1] (what the safety checker and the writer take)."""
    return np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])


def settings(inp: InpaintOptions) -> dict[str, str]:
    """The web UI's parameters keys for the mask settings (written after the others)."""
    items = {"Mask blur": str(inp.mask_blur)}
    if inp.invert_mask:
        items["Mask mode"] = "Inpaint not masked"
    if inp.full_res:
        items["Inpaint area"] = "Only masked"
        items["Masked area padding"] = str(inp.full_res_padding)
    if any(inp.pad):
        items["Outpaint"] = "{},{},{},{}".format(*inp.pad)
        items["Outpaint fill"] = inp.fill
    return items


def add_settings(parameters: str, inp: InpaintOptions) -> str:
    """A ``parameters`` text with the mask settings appended to its settings line."""
    from ldm.inference.metadata import quote

    extra = ", ".join(f"{key}: {quote(value)}" for key, value in settings(inp).items())
    return f"{parameters}, {extra}"

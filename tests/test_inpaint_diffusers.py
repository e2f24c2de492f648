"""The inpainting conditioning and sampling equal diffusers' StableDiffusionInpaintPipeline (test-only dependency)
on a tiny random inpainting model converted from ours (UNet and VAE through ldm.convert.diffusers_keys)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.convert import diffusers_keys as dk
from ldm.inference import inpaint, pipeline
from ldm.samplers import resolve
from ldm.util import instantiate_from_config
from tiny_model import PIXELS, TEXT_CONFIG, tiny_config

diffusers = pytest.importorskip("diffusers")


def _tiny_inpainting_model(tmp_path):
    """The tiny SD 1-style model as an inpainting model (9 UNet input channels), every weight random."""
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "config.json").write_text(json.dumps(TEXT_CONFIG), encoding="utf-8")
    cfg = OmegaConf.create(tiny_config(tmp_path / "text"))
    cfg.model.target = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
    cfg.model.params.conditioning_key = "hybrid"
    cfg.model.params.finetune_keys = None
    cfg.model.params.unet_config.params.in_channels = 9
    model = instantiate_from_config(cfg.model).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in list(model.model.parameters()) + list(model.first_stage_model.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    return model, cfg.model.params


def _their_pipeline(model, params):
    unet = diffusers.UNet2DConditionModel(**dk.unet_config(params.unet_config.params)).eval()
    prefix = "model.diffusion_model."
    ours = {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    unet.load_state_dict(dk.unet_to_diffusers(ours, params.unet_config.params), strict=True)
    vae = diffusers.AutoencoderKL(**dk.vae_config(params.first_stage_config.params),
                                  scaling_factor=float(params.scale_factor)).eval()
    ours = {k[len("first_stage_model."):]: v for k, v in model.state_dict().items()
            if k.startswith("first_stage_model.")}
    vae.load_state_dict(dk.vae_to_diffusers(ours, params.first_stage_config.params.ddconfig), strict=True)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        timestep_spacing="leading")
    return diffusers.StableDiffusionInpaintPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                                    scheduler=scheduler, safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False)


def _picture_and_mask():
    rng = np.random.default_rng(5)
    image = Image.fromarray((rng.random((PIXELS, PIXELS, 3)) * 255).astype(np.uint8))
    mask = np.zeros((PIXELS, PIXELS), np.uint8)
    mask[6:22, 10:30] = 200  # above the 0.5 threshold: repaint
    mask[22:26, 10:30] = 100  # below it: keep
    return image, Image.fromarray(mask)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_inpainting_model_equals_diffusers_pipeline(tmp_path, scale):
    model, params = _tiny_inpainting_model(tmp_path)
    theirs = _their_pipeline(model, params)
    image, mask = _picture_and_mask()
    cond, uncond = torch.randn(1, 77, 32) * 0.5, torch.randn(1, 77, 32) * 0.5
    canvas = inpaint.Canvas(image, mask, image.size)
    with torch.no_grad():
        prep = inpaint.prepare(model, canvas, inpainting=True, device="cpu")
        ours = inpaint.sample_inpaint(model, resolve("ddim"), prep, cond, uncond if scale != 1 else None, 5, 1.0,
                                      scale, pipeline.generators([11]))
    gen = torch.Generator().manual_seed(11)
    x_T = torch.randn((1, 4, PIXELS // 2, PIXELS // 2), generator=gen)  # our first draw; the VAE sample is next
    got = theirs(prompt_embeds=cond, negative_prompt_embeds=uncond, image=image, mask_image=mask, height=PIXELS,
                 width=PIXELS, strength=1.0, num_inference_steps=5, guidance_scale=scale, eta=0.0, generator=gen,
                 latents=x_T, output_type="latent").images
    assert ours.abs().mean() > 0.1 and not torch.allclose(ours, x_T, atol=0.1)
    torch.testing.assert_close(ours, got, atol=2e-4, rtol=1e-4)


def test_conditioning_equals_diffusers_mask_preparation(tmp_path):
    """c_concat = [mask at latent size, latent of the masked image], built as diffusers' pipeline builds it."""
    model, params = _tiny_inpainting_model(tmp_path)
    theirs = _their_pipeline(model, params)
    image, mask = _picture_and_mask()
    with torch.no_grad():
        prep = inpaint.prepare(model, inpaint.Canvas(image, mask, image.size), inpainting=True, device="cpu")
        c_cat = inpaint.concat_conditioning(prep.mask, inpaint._posterior(model, prep.masked, pipeline.generators([7]),
                                                                          "cpu"))
        init = theirs.image_processor.preprocess(image, height=PIXELS, width=PIXELS)
        m = theirs.mask_processor.preprocess(mask, height=PIXELS, width=PIXELS)
        m_lat, z = theirs.prepare_mask_latents(m, init * (m < 0.5), 1, PIXELS, PIXELS, torch.float32, "cpu",
                                               torch.Generator().manual_seed(7), False)
    assert c_cat[0, 0].sum() > 0 and torch.equal(c_cat[:, :1], m_lat)
    torch.testing.assert_close(c_cat[:, 1:], z, atol=1e-5, rtol=1e-5)

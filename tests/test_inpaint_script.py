"""scripts/inpaint.py end to end with tiny random models on the CPU: kept pixels, outpainting arithmetic, every
sampler with a regular model, an inpainting (9-channel) model, parameters, bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.checkpoint import load_model_from_config, save_safetensors
from ldm import samplers
from ldm.inference import inpaint, pipeline
from ldm.inference.metadata import parse_parameters
from ldm.inference.outputs import read_parameters
from ldm.samplers import SAMPLERS, resolve
from ldm.util import instantiate_from_config
from tiny_model import PIXELS, load_script, model_args, pixels, samples, write_tiny_model

script, txt2img = load_script("inpaint"), load_script("txt2img")
SIDE = 2 * PIXELS  # 64 x 64 pictures: room for a blurred mask edge and untouched pixels


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_inpainting(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny model as a 9-channel inpainting model (config + random weights)."""
    folder = tmp_path_factory.mktemp("tiny-inp")
    config_path, _ = write_tiny_model(folder)
    cfg = OmegaConf.load(config_path)
    cfg.model.target = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
    cfg.model.params.conditioning_key = "hybrid"
    cfg.model.params.finetune_keys = None
    cfg.model.params.unet_config.params.in_channels = 9
    path = folder / "inp.yaml"
    OmegaConf.save(cfg, path)
    torch.manual_seed(1)
    model = instantiate_from_config(cfg.model)
    with torch.no_grad():
        for param in model.model.parameters():
            if param.dim() > 1 and not param.abs().sum():
                param.normal_(0.0, 0.02)
    save_safetensors(model.state_dict(), folder / "inp.safetensors")
    return path, folder / "inp.safetensors"


def write_picture(path: Path, side: int = SIDE) -> Path:
    y, x = np.mgrid[0:side, 0:side]
    rgb = np.stack([x * 255 // (side - 1), y * 255 // (side - 1), (3 * x + y) % 256], -1)
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return path


def write_mask(path: Path, box: tuple[int, int, int, int], side: int = SIDE, mode: str = "L") -> Path:
    mask = np.zeros((side, side), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    Image.fromarray(mask).convert(mode).save(path)
    return path


def run(model, outdir: Path, init: Path, *extra: str) -> int:
    return script.main([*model_args(model), "--init-img", str(init), "--outdir", str(outdir), "--prompt", "a red circle",
                        "--n_iter", "1", "--n_samples", "1", "--skip_grid", *extra])


def untouched(mask_path: Path, blur: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """Pixels the blurred mask does not reach (boolean [H, W])."""
    with Image.open(mask_path) as m:
        mask = m.convert("L")
    if size is not None:
        mask = mask.resize(size)
    return np.asarray(inpaint.blur(mask, blur)) == 0


@pytest.mark.parametrize("which", ["regular", "inpainting"])
def test_unmasked_pixels_stay_and_masked_ones_change(tiny, tiny_inpainting, tmp_path, which):
    init = write_picture(tmp_path / "in.png")
    mask = write_mask(tmp_path / "mask.png", (16, 20, 44, 40))
    out = tmp_path / "out"
    model = tiny if which == "regular" else tiny_inpainting
    assert run(model, out, init, "--mask", str(mask), "--mask_blur", "3", "--seed", "5") == 0
    got, want = pixels(samples(out)[0]).astype(int), pixels(init).astype(int)
    keep = untouched(mask, 3)
    assert keep.sum() > 0.5 * keep.size
    assert np.abs(got - want)[keep].max() <= 1  # measured: 0 (composited through the mask)
    assert np.abs(got - want)[20:40, 16:44].mean() > 10  # the masked part was repainted
    meta = parse_parameters(read_parameters(samples(out)[0]))
    assert meta["Mask blur"] == "3" and meta["Size"] == f"{SIDE}x{SIDE}"
    assert meta["Denoising strength"] == ("0.75" if which == "regular" else "1")


def test_invert_mask_and_mask_of_another_size_and_mode(tiny, tmp_path, caplog):
    init = write_picture(tmp_path / "in.png")
    mask = write_mask(tmp_path / "mask.png", (0, 0, SIDE, SIDE // 2), mode="RGBA")  # top half white
    small = tmp_path / "small.png"
    with Image.open(mask) as m:
        m.resize((SIDE // 4, SIDE // 4), Image.NEAREST).save(small)
    out = tmp_path / "out"
    assert run(tiny, out, init, "--mask", str(small), "--invert_mask", "--mask_blur", "0") == 0
    assert "resized" in caplog.text
    got, want = pixels(samples(out)[0]).astype(int), pixels(init).astype(int)
    assert np.abs(got - want)[:SIDE // 2 - 4].max() <= 1  # inverted: the top half is kept (bilinear edge aside)
    assert np.abs(got - want)[SIDE // 2:].mean() > 10
    assert "Mask mode: Inpaint not masked" in read_parameters(samples(out)[0])


@pytest.mark.parametrize("fill", ["edge", "noise"])
def test_outpainting_grows_the_canvas(tiny, tmp_path, fill):
    init = write_picture(tmp_path / "in.png", PIXELS)
    out = tmp_path / "out"
    assert run(tiny, out, init, "--outpaint", "8,16,0,24", "--outpaint_fill", fill, "--mask_blur", "2") == 0
    got, want = pixels(samples(out)[0]).astype(int), pixels(init).astype(int)
    assert got.shape == (PIXELS + 24, PIXELS + 24, 3)  # width 8 + 32 + 16, height 0 + 32 + 24
    inner = got[:PIXELS - 5, 8 + 5:8 + PIXELS - 5]  # the old picture, away from the blurred edge
    assert np.abs(inner - want[:PIXELS - 5, 5:PIXELS - 5]).max() <= 1
    meta = parse_parameters(read_parameters(samples(out)[0]))
    assert meta["Outpaint"] == "8,16,0,24" and meta["Size"] == f"{PIXELS + 24}x{PIXELS + 24}"
    assert meta["Denoising strength"] == "1"


def test_grow_canvas_arithmetic():
    image = Image.new("RGB", (40, 24), (10, 200, 30))
    mask = Image.new("L", (40, 24), 0)
    grown, grown_mask = inpaint.grow_canvas(image, mask, (8, 0, 16, 32), "edge")
    assert grown.size == grown_mask.size == (48, 72)
    m = np.asarray(grown_mask)
    assert not m[16:40, 8:48].any() and m[:16].all() and m[40:].all() and m[:, :8].all()
    assert (np.asarray(grown) == (10, 200, 30)).all()  # edge-extended
    assert inpaint.parse_pad("8") == (8, 8, 8, 8)
    with pytest.raises(inpaint.UsageError, match="multiple of 8"):
        inpaint.check_pad((8, 12, 0, 0), 8)


@pytest.fixture(scope="module")
def tiny_model(tiny):
    config, ckpt = tiny
    return load_model_from_config(OmegaConf.load(config), str(ckpt), device="cpu").eval()


@pytest.mark.parametrize("name", [s.name for s in SAMPLERS])
def test_every_sampler_keeps_the_known_latents(tiny_model, name):
    model = tiny_model
    image = Image.fromarray((np.random.default_rng(0).random((PIXELS, PIXELS, 3)) * 255).astype(np.uint8))
    mask = np.zeros((PIXELS, PIXELS), np.uint8)
    mask[8:24, 8:24] = 255
    canvas = inpaint.Canvas(image, Image.fromarray(mask), image.size)
    with torch.no_grad():
        prep = inpaint.prepare(model, canvas, inpainting=False, device="cpu")
        cond = model.get_learned_conditioning(["a red circle"])
        z = inpaint.sample_inpaint(model, resolve(name), prep, cond, None, 4, 1.0, 1.0, pipeline.generators([3]))
        z0 = inpaint._posterior(model, prep.image, [_after_first_draw(3, z.shape[1:])], "cpu")  # 2nd draw
    keep = prep.keep.bool().expand_as(z)
    assert 0 < keep.float().mean() < 1
    # DDIM, PLMS and DPM-Solver stop at the model's lowest noise level (sigma ~0.03), not at 0, as the originals
    last = float(samplers.sigmas_for(resolve(name), model.alphas_cumprod, 4)[-1])
    torch.testing.assert_close(z[keep], z0[keep], atol=1e-4 + 5 * last, rtol=1e-4)
    assert (z - z0)[~keep].abs().mean() > 0.05


def _after_first_draw(seed: int, shape) -> torch.Generator:
    gen = torch.Generator().manual_seed(seed)
    torch.randn(tuple(shape), generator=gen)
    return gen


def _no_output(out: Path) -> bool:
    return not out.exists() or not any(out.rglob("*.png"))


@pytest.mark.parametrize("case,expected", [
    ("missing", "does not exist"), ("not_image", "cannot read"), ("black", "repaints nothing"),
    ("no_mask", "needs a mask"), ("bad_pad", "multiple of 2"), ("pad_text", "LEFT,RIGHT,TOP,BOTTOM"),
    ("full_res_and_pad", "do not go together"), ("huge_pad", "outpainted canvas would be"),
])
def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, case, expected):
    init = write_picture(tmp_path / "in.png")
    (tmp_path / "notes.png").write_text("not a picture")
    black = write_mask(tmp_path / "black.png", (0, 0, 0, 0))
    extra = {"missing": ["--mask", str(tmp_path / "nope.png")], "not_image": ["--mask", str(tmp_path / "notes.png")],
             "black": ["--mask", str(black)], "no_mask": [], "bad_pad": ["--outpaint", "3,0,0,0"],
             "pad_text": ["--outpaint", "left"],
             "full_res_and_pad": ["--outpaint", "8,8,8,8", "--inpaint_full_res", "--mask", str(black)],
             "huge_pad": ["--outpaint", "0,100000,0,0"]}[case]
    out = tmp_path / "out"
    assert run(tiny, out, init, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("inpaint.py: error:") and expected in err[0]
    assert _no_output(out)


def test_full_mask_repaints_everything_with_a_warning(tiny, tmp_path, caplog):
    init = write_picture(tmp_path / "in.png")
    full = write_mask(tmp_path / "full.png", (0, 0, SIDE, SIDE))
    assert run(tiny, tmp_path / "out", init, "--mask", str(full)) == 0
    assert "repaints the whole picture" in caplog.text


def test_only_masked_area_is_generated_at_full_resolution(tiny, tmp_path):
    init = write_picture(tmp_path / "in.png")
    mask = write_mask(tmp_path / "mask.png", (40, 8, 52, 20))
    out = tmp_path / "out"
    assert run(tiny, out, init, "--mask", str(mask), "--inpaint_full_res", "--inpaint_full_res_padding", "4",
               "--W", str(PIXELS), "--H", str(PIXELS), "--mask_blur", "2") == 0
    got, want = pixels(samples(out)[0]).astype(int), pixels(init).astype(int)
    assert got.shape == want.shape  # pasted back into the whole picture
    keep = untouched(mask, 2)
    assert np.abs(got - want)[keep].max() <= 1 and np.abs(got - want)[8:20, 40:52].mean() > 5
    meta = parse_parameters(read_parameters(samples(out)[0]))
    assert meta["Inpaint area"] == "Only masked" and meta["Masked area padding"] == "4"
    box = inpaint.crop_box(inpaint.blur(Image.open(mask).convert("L"), 2), 4, (PIXELS, PIXELS))
    assert box[2] - box[0] == box[3] - box[1] and box[0] <= 40 - 4 and box[2] >= 52 + 4


def test_txt2img_refuses_an_inpainting_model(tiny_inpainting, tmp_path, capsys):
    out = tmp_path / "out"
    assert txt2img.main([*model_args(tiny_inpainting), "--outdir", str(out), "--prompt", "x"]) == 2
    assert "inpaint.py" in capsys.readouterr().err and _no_output(out)


def test_parameters_read_back_by_sd_parsers(tiny, tmp_path):
    sd_parsers = pytest.importorskip("sd_parsers")
    init = write_picture(tmp_path / "in.png")
    mask = write_mask(tmp_path / "mask.png", (16, 16, 48, 48))
    out = tmp_path / "out"
    assert run(tiny, out, init, "--mask", str(mask), "--mask_blur", "6", "--invert_mask", "--inpaint_full_res",
               "--W", str(PIXELS), "--H", str(PIXELS), "--strength", "0.6", "--seed", "3") == 0
    info = sd_parsers.ParserManager().parse(samples(out)[0])
    assert info.metadata["Mask blur"] == "6" and info.metadata["Denoising strength"] == "0.6"
    assert info.metadata["Mask mode"] == "Inpaint not masked" and info.metadata["Inpaint area"] == "Only masked"
    assert info.metadata["Masked area padding"] == "32" and info.samplers[0].parameters["seed"] == "3"


def test_mask_of_the_image_files_size_follows_a_resize_quietly(tiny, tmp_path, caplog):
    init = write_picture(tmp_path / "in.png")
    mask = write_mask(tmp_path / "mask.png", (16, 16, 48, 48))
    out = tmp_path / "out"
    assert run(tiny, out, init, "--mask", str(mask), "--W", str(PIXELS), "--H", str(PIXELS)) == 0
    assert "resized to fit" not in caplog.text and pixels(samples(out)[0]).shape == (PIXELS, PIXELS, 3)

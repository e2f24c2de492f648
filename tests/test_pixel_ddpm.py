"""Pixel-space DDPM: ancestral and respaced DDIM sampling against the exact Gaussian denoiser, the labelled shapes
data, and the example config end to end (train through the trainer, sample and report bits/dim by command)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_likelihood import GaussianData

from ldm.data.pixel_shapes import PixelShapes, class_names
from ldm.data.synthetic_shapes import make_scene
from ldm.models.diffusion.ancestral import p_sample_loop
from ldm.models.diffusion.ddpm_tools import intermediates_strip
from ldm.models.diffusion.process import DiffusionSchedule
from ldm.samplers.denoiser import SigmaDenoiser
from ldm.samplers.noise import gaussian_noise
from ldm.samplers.original import sample_ddim
from ldm.samplers.schedules import respaced_sigmas
from ldm.modules.diffusionmodules.schedules import make_beta_schedule, space_timesteps

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "ddpm" / "shapes-tiny.yaml"
MU, S = 0.3, 0.5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: tiny models gain nothing from more on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Denoiser:
    """The exact Gaussian denoiser as a sampler's denoiser (``prediction`` + call)."""

    def __init__(self, data: GaussianData) -> None:
        self.data, self.prediction = data, data.schedule.prediction
        self.alphas_cumprod = data.schedule.alphas_cumprod

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        return self.data.denoiser(x, t, cond)


def _moments_ok(out: torch.Tensor, mean: float, var: float, sigmas: float = 4.0) -> None:
    n = out.numel()
    assert abs(out.double().mean().item() - mean) < sigmas * (var / n) ** 0.5
    assert abs(out.double().var().item() / var - 1) < sigmas * (2 / n) ** 0.5


@pytest.mark.parametrize("var_type,prediction", [("learned", "eps"), ("learned", "v"), ("fixed_small", "eps"),
                                                 ("fixed_large", "x0")])
def test_ancestral_sampling_reproduces_gaussian_data(var_type, prediction):
    """p_sample loop over all 1000 steps with the exact denoiser draws N(mu, s^2) within sampling error.

    With the exact (learned) variance every reverse step is the true one; the fixed variances (Ho et al.) are
    close enough at 1000 steps.
    """
    sched = DiffusionSchedule.from_betas(make_beta_schedule("linear", 1000), prediction, var_type)
    data = GaussianData(sched, MU, S, with_variance=var_type == "learned")
    g = torch.Generator().manual_seed(3)
    x_T = data.marginal(999, (128, 1, 8, 8), g)
    out, inter = p_sample_loop(sched, data.denoiser, x_T, generator=g, log_every_t=250)
    _moments_ok(out, MU, S ** 2)
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 6  # x_T, 999, 750, 500, 250, 0


def test_ancestral_sampling_over_a_respaced_subset():
    full = DiffusionSchedule.from_betas(make_beta_schedule("cosine", 1000), "eps", "fixed_large")
    sub = full.respaced(space_timesteps(1000, "100"))
    data = GaussianData(full, MU, S)
    g = torch.Generator().manual_seed(4)
    calls = []
    denoiser = lambda x, t, c: calls.append(t[0].item()) or data.denoiser(x, t, c)  # noqa: E731
    out, _ = p_sample_loop(sub, denoiser, data.marginal(999, (128, 1, 8, 8), g), generator=g)
    assert calls == sorted(space_timesteps(1000, "100"), reverse=True)
    _moments_ok(out, MU, S ** 2, sigmas=6.0)


def _ddim(data: GaussianData, x_T: torch.Tensor, use: list[int], eta: float = 0.0,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM over the respaced subset ``use`` from the DDPM sample x_T at its highest timestep, down to x_0."""
    sigmas = respaced_sigmas(data.schedule.alphas_cumprod, use)
    x = x_T * (1 + float(sigmas[0]) ** 2) ** 0.5
    return sample_ddim(SigmaDenoiser(Denoiser(data)).bind(None), x, sigmas, noise=gaussian_noise(x, generator),
                       eta=eta)


def _ddim_moment_errors(prediction: str, spec: str) -> tuple[float, float]:
    """(mean error, relative variance error) of DDIM (eta 0) over a respaced subset, from x_T ~ the exact marginal.

    For Gaussian data the deterministic sampler is affine in x_T: two runs give its output moments exactly.
    """
    sched = DiffusionSchedule.from_betas(make_beta_schedule("cosine", 1000), prediction)
    data = GaussianData(sched, MU, S)
    use = space_timesteps(1000, spec)
    out = _ddim(data, torch.tensor([0.0, 1.0]).view(2, 1, 1, 1), use)
    gain, offset = (out[1] - out[0]).item(), out[0].item()
    start = max(use)
    a, sigma = data.a[start].item(), data.sigma[start].item()
    return gain * a * MU + offset - MU, gain ** 2 * (a * a * S ** 2 + sigma * sigma) / S ** 2 - 1


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_over_a_respaced_subset_converges_to_the_data_moments(prediction):
    """The mean is exact; the variance error of the ODE solver is first order in the step size."""
    mean100, var100 = _ddim_moment_errors(prediction, "ddim100")
    mean500, var500 = _ddim_moment_errors(prediction, "500")
    assert abs(mean100) < 1e-5 and abs(mean500) < 1e-5
    assert abs(var500) < 0.01
    assert 4.0 < var100 / var500 < 6.0


def test_ddim_with_noise_reproduces_gaussian_data():
    sched = DiffusionSchedule.from_betas(make_beta_schedule("linear", 1000))
    data = GaussianData(sched, MU, S)
    g = torch.Generator().manual_seed(5)
    out = _ddim(data, data.marginal(999, (128, 1, 8, 8), g), space_timesteps(1000, "200"), eta=1.0, generator=g)
    _moments_ok(out, MU, S ** 2, sigmas=5.0)


def test_intermediates_strip_layout():
    frames = {"x_inter": [torch.zeros(3, 3, 8, 8)] * 5, "pred_x0": [torch.ones(3, 3, 8, 8)] * 5}
    strip = intermediates_strip(frames, max_samples=2)
    assert strip.shape == (3, 4 * 9 + 1, 5 * 9 + 1)  # 2 samples x (x_t row, x0 row), 5 frames, 1-pixel padding
    assert strip[:, 1:9, 1:9].eq(0).all() and strip[:, 10:18, 1:9].eq(1).all()


# ---------------------------------------------------------------- data

def test_pixel_shapes_items_and_labels():
    ds = PixelShapes(size=16, length=12, seed=3)
    item = ds[(5, 999)]
    assert item["image"].shape == (16, 16, 3) and item["image"].min() >= -1 and item["image"].max() <= 1
    levels = (item["image"] + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # 8-bit levels, as bits/dim assumes
    assert ds.names[item["class_label"]] == make_scene(3, 5).shape == item["human_label"]
    assert [ds.label_of(i) for i in range(12)] == [ds[i]["class_label"] for i in range(12)]
    assert torch.equal(ds[7]["image"], PixelShapes(size=16, length=12, seed=3)[7]["image"])
    assert len(class_names("shape_colour")) == 32 and ds.num_classes == 4
    with pytest.raises(ValueError, match="label_by"):
        PixelShapes(label_by="size")


# ---------------------------------------------------------------- the example config end to end

def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The tiny example config trained for 4 steps through the trainer (Python API, CPU)."""
    from ldm.training.config import load_config
    from ldm.training.distributed import DistContext
    from ldm.training.trainer import RunOptions, Trainer

    logdir = tmp_path_factory.mktemp("ddpm_run")
    cfg = load_config([TINY])
    trainer = Trainer(cfg, RunOptions(logdir=logdir, seed=0, scale_lr=False), DistContext())
    logs = trainer.fit()
    assert trainer.step == 4 and np.isfinite(logs["train/loss"]) and "train/loss_vb" in logs
    assert trainer.model.cond_stage_model.embedding.weight.requires_grad
    return logdir


def test_example_config_trains_through_the_trainer(trained):
    ckpt = trained / "checkpoints" / "last.ckpt"
    assert ckpt.exists() and (trained / "checkpoints" / "last-ema.safetensors").exists()
    from ldm.checkpoint import load_state_dict_file
    sd = load_state_dict_file(ckpt)
    assert any(k.startswith("cond_stage_model.embedding") for k in sd)
    assert any(k.startswith("model_ema.") for k in sd)


@pytest.mark.parametrize("method,steps", [("ancestral", None), ("ddim", "10")])
def test_sample_command_from_the_trained_checkpoint(trained, tmp_path, method, steps):
    out = tmp_path / method
    argv = ["--config", str(TINY), "--ckpt", str(trained / "checkpoints" / "last.ckpt"), "--outdir", str(out),
            "--n_samples", "3", "--method", method, "--class_label", "0", "2", "--scale", "2.0", "--intermediates",
            "--frames", "5", "--device", "cpu", "--no_progress"]
    if steps:
        argv += ["--steps", steps]
    assert _script("sample_ddpm").main(argv) == 0
    grid, strip = Image.open(out / "samples.png"), Image.open(out / "intermediates.png")
    assert Image.open(out / "sample_0002.png").size == (16, 16) and grid.size[1] == 16 + 4
    assert (out / "labels.txt").read_text().split() == ["0", "2", "0"]
    assert strip.size[1] == 3 * 2 * 17 + 1 and strip.size[0] >= 6 * 17 + 1


def test_bits_per_dim_command(trained, tmp_path, capsys):
    result_file = tmp_path / "bpd.json"
    argv = ["--config", str(TINY), "--ckpt", str(trained / "checkpoints" / "last-ema.safetensors"),
            "--n_images", "4", "--batch_size", "2", "--device", "cpu", "--json", str(result_file), "--no_progress"]
    assert _script("bits_per_dim").main(argv) == 0
    result = json.loads(result_file.read_text())
    assert result["n_images"] == 4 and np.isfinite(result["total_bpd"]) and result["total_bpd"] > 0
    parts = result["prior_bpd"] + result["kl_bpd"] + result["decoder_bpd"]
    assert parts == pytest.approx(result["total_bpd"], rel=1e-5)
    assert "bits/dim:" in capsys.readouterr().out


@pytest.mark.slow
def test_example_config_learns_on_cpu(tmp_path):
    """A couple of hundred steps of the tiny config lower the loss on a fixed batch (fixed t and noise)."""
    from torch.utils.data import default_collate

    from ldm.training.config import load_config, model_config
    from ldm.training.distributed import DistContext
    from ldm.training.trainer import RunOptions, Trainer
    from ldm.util import instantiate_from_config

    cfg = load_config([TINY], ["trainer.max_steps=200", "trainer.checkpoint_every_n_steps=1000",
                               "trainer.val_every_n_steps=0", "data.params.batch_size=8"])
    batch = default_collate([PixelShapes(size=16, length=64)[i] for i in range(16)])
    g = torch.Generator().manual_seed(0)
    t, noise = torch.randint(0, 100, (16,), generator=g), torch.randn(16, 3, 16, 16, generator=g)

    def fixed_loss(model) -> float:
        model.eval()
        with torch.no_grad():
            x = model.get_input(batch, "image")
            c = model.get_learned_conditioning(batch)
            return model.p_losses(x, c, t, noise)[1]["val/loss_simple"].item()

    torch.manual_seed(0)
    before = fixed_loss(instantiate_from_config(model_config(cfg)))
    trainer = Trainer(cfg, RunOptions(logdir=tmp_path, seed=0, scale_lr=False), DistContext())
    trainer.fit()
    assert fixed_loss(trainer.model) < 0.6 * before

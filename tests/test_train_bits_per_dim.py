"""scripts/bits_per_dim.py --timesteps N: the stratified estimate of the bound agrees with the full sum within
its error bar, from N model calls per image."""
from __future__ import annotations

import math

import torch
from test_train_helpers import ROOT

from ldm.models.diffusion.likelihood import bits_per_dim
from ldm.models.diffusion.process import DiffusionSchedule
from ldm.modules.diffusionmodules.schedules import make_beta_schedule
from tiny_model import load_script

bpd = load_script("bits_per_dim")


class CountingModel:
    """A fixed, imperfect eps-predictor (so every KL term is positive and differs by timestep); counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: object = None) -> torch.Tensor:
        self.calls += 1
        return 0.5 * x * (t.float() / 200).view(-1, 1, 1, 1)


def _mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    v = values.double()
    return float(v.mean()), float(v.std() / math.sqrt(v.numel()))


def test_strided_estimate_matches_the_full_bound_within_its_error_bar():
    schedule = DiffusionSchedule.from_betas(make_beta_schedule("linear", 200, 1e-3, 5e-2))
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (512, 1, 2, 2), generator=g).float() / 127.5 - 1)
    full_model, strided_model = CountingModel(), CountingModel()
    full = bits_per_dim(schedule, full_model, x0, clip_denoised=False, generator=torch.Generator().manual_seed(1))
    est = bpd.strided_bits_per_dim(schedule, strided_model, x0, None, 10, clip_denoised=False,
                                   generator=torch.Generator().manual_seed(2))
    assert (full_model.calls, strided_model.calls) == (200, 10)  # batched: one call per timestep
    m_full, se_full = _mean_and_stderr(full["total_bpd"])
    m_est, se_est = _mean_and_stderr(est["total_bpd"])
    assert se_est > se_full  # the timestep sampling adds its own noise to the error bar
    assert abs(m_full - m_est) < 4 * math.hypot(se_full, se_est)
    torch.testing.assert_close(est["total_bpd"], est["prior_bpd"] + est["decoder_bpd"] + est["kl_bpd"])
    assert abs(m_full - m_est) < 0.05 * m_full


def test_timesteps_option_end_to_end(tmp_path, capsys):
    """The command on the tiny pixel DDPM (random weights): 5 of its 100 timesteps, with the error bar."""
    import json

    import pytest
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from ldm.util import instantiate_from_config

    config = ROOT / "configs" / "ddpm" / "shapes-tiny.yaml"
    with pytest.raises(SystemExit):
        bpd.parse_args(["--config", str(config), "--ckpt", "m.ckpt", "--timesteps", "1"])
    model = instantiate_from_config(OmegaConf.load(config).model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    argv = ["--config", str(config), "--ckpt", str(tmp_path / "m.safetensors"), "--n_images", "4", "--batch_size",
            "4", "--device", "cpu", "--timesteps", "5", "--json", str(tmp_path / "r.json"), "--no_progress"]
    assert bpd.main(argv) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["timesteps"] == 5 and result["n_images"] == 4 and result["total_bpd_stderr"] > 0
    parts = result["prior_bpd"] + result["kl_bpd"] + result["decoder_bpd"]
    assert parts == pytest.approx(result["total_bpd"], rel=1e-5)
    assert "5 of 100 timesteps" in capsys.readouterr().out

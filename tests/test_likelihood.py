"""Likelihood: Gaussian KL, the discretized decoder likelihood, the bound's terms and bits/dim, with known answers
from data drawn from a Gaussian (whose exact denoiser and reverse process are known in closed form)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.models.diffusion.likelihood import (bits_per_dim, discretized_gaussian_log_likelihood, normal_kl, prior_bpd,
                                             vlb_terms)
from ldm.models.diffusion.process import DiffusionSchedule, ReverseStep
from ldm.modules.diffusionmodules.schedules import make_beta_schedule


class GaussianData:
    """Data x0 ~ N(mu, s^2) iid and the exact denoiser of a schedule: x_t = a x0 + sigma eps.

    E[x0 | x_t] = mu + a s^2 (x_t - a mu) / (a^2 s^2 + sigma^2), Var(x0 | x_t) = s^2 sigma^2 / (a^2 s^2 + sigma^2).
    The true reverse step x_{t-1} | x_t is Gaussian too: the posterior mean at E[x0 | x_t] and the variance
    beta tilde_t + coef1_t^2 Var(x0 | x_t). ``denoiser`` outputs eps, x0 or v, followed by that log variance when
    ``with_variance`` (a network with ``model_var_type: learned``).
    """

    def __init__(self, schedule: DiffusionSchedule, mu: float = 0.0, s: float = 0.2,
                 with_variance: bool = False) -> None:
        self.schedule, self.mu, self.s, self.with_variance = schedule, mu, s, with_variance
        acp = np.cumprod(1.0 - schedule.betas.double().numpy())
        acp_prev = np.append(1.0, acp[:-1])
        self.a = torch.tensor(np.sqrt(acp))
        self.sigma = torch.tensor(np.sqrt(1.0 - acp))
        self.coef1 = torch.tensor(schedule.betas.double().numpy() * np.sqrt(acp_prev) / (1.0 - acp))
        self.beta_tilde = torch.tensor(schedule.betas.double().numpy() * (1.0 - acp_prev) / (1.0 - acp))

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        return self.mu + self.s * torch.randn(shape, generator=generator, dtype=torch.float64)

    def marginal(self, index: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        a, sigma = self.a[index], self.sigma[index]
        return (a * self.mu + (a * a * self.s ** 2 + sigma * sigma).sqrt()
                * torch.randn(shape, generator=generator, dtype=torch.float64)).float()

    def denoiser(self, x: torch.Tensor, t: torch.Tensor, cond: object = None) -> torch.Tensor:
        index = t.long()  # network timesteps index the full schedule this data model was built on
        shape = (-1,) + (1,) * (x.dim() - 1)
        a, sigma, c1, bt = (v[index].reshape(shape) for v in (self.a, self.sigma, self.coef1, self.beta_tilde))
        var = a * a * self.s ** 2 + sigma * sigma
        x0 = self.mu + a * self.s ** 2 * (x.double() - a * self.mu) / var
        eps = (x.double() - a * x0) / sigma
        out = {"eps": eps, "x0": x0, "v": a * eps - sigma * x0}[self.schedule.prediction.value]
        if self.with_variance:
            post_var = self.s ** 2 * sigma * sigma / var
            out = torch.cat([out, torch.log(bt + c1 * c1 * post_var).expand_as(out)], dim=1)
        return out.to(x.dtype)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Continuous values -> the 8-bit levels in [-1, 1] (2k/255 - 1)."""
    return ((x + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1


def discrete_entropy_bits(mu: float, s: float) -> float:
    """Entropy per dimension (bits) of N(mu, s^2) quantized to the 8-bit levels (edge bins take the tails)."""
    edges = torch.tensor([(2 * k + 1) / 255 - 1 for k in range(255)], dtype=torch.float64)
    cdf = torch.special.ndtr((edges - mu) / s)
    p = torch.diff(torch.cat([torch.zeros(1, dtype=torch.float64), cdf, torch.ones(1, dtype=torch.float64)]))
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum())


def linear_schedule(var_type: str = "learned", prediction: str = "eps", n: int = 1000) -> DiffusionSchedule:
    return DiffusionSchedule.from_betas(make_beta_schedule("linear", n), prediction, var_type)


# ---------------------------------------------------------------- building blocks

def test_normal_kl_known_values():
    m1, lv1 = torch.tensor([0.3, -1.0]), torch.tensor([0.2, -2.0])
    assert torch.equal(normal_kl(m1, lv1, m1, lv1), torch.zeros(2))
    # KL(N(0,1) || N(1, e^2)) = 0.5 (2 + e^-2 + e^-2 - 1)
    expected = 0.5 * (2.0 + math.exp(-2.0) + math.exp(-2.0) - 1.0)
    assert normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(2.0)).item() == \
        pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -1.0), (0.7, -4.0), (-0.99, -6.0), (3.0, -5.0), (0.1234, -9.0)])
def test_discretized_likelihood_is_a_distribution_over_the_256_levels(mean, log_scale):
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    logp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
    assert torch.isfinite(logp).all() and (logp <= 0).all()
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_likelihood_matches_density_times_bin_for_wide_gaussians():
    x = torch.tensor([0.2, -0.5, 0.0], dtype=torch.float64)
    mean, std = torch.tensor(0.1, dtype=torch.float64), 0.3
    logp = discretized_gaussian_log_likelihood(x, mean.expand(3), torch.full((3,), math.log(std), dtype=torch.float64))
    density = torch.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    torch.testing.assert_close(logp, torch.log(density * 2 / 255), rtol=0, atol=1e-4)


def test_discretized_likelihood_far_in_the_tails_stays_finite():
    x = torch.tensor([0.5, -0.5], dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(x, torch.tensor([-0.5, 0.5], dtype=torch.float64),
                                               torch.full((2,), -6.0, dtype=torch.float64))
    assert torch.isfinite(logp).all() and (logp < -1000).all()


# ---------------------------------------------------------------- the bound's terms

@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_each_kl_term_is_zero_when_the_model_is_the_true_posterior(prediction):
    sched = linear_schedule("fixed_small", prediction, n=200)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1
    for index in (1, 7, 100, 199):
        t = torch.full((3,), index)
        x_t = sched.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        mean, _, log_var = sched.q_posterior(x0, x_t, t)
        exact = ReverseStep(mean, log_var, x0)
        torch.testing.assert_close(vlb_terms(sched, exact, x0, x_t, t), torch.zeros(3), atol=1e-6, rtol=0)
        off = ReverseStep(mean + 0.01, log_var, x0)
        assert (vlb_terms(sched, off, x0, x_t, t) > 0).all()


def test_model_built_from_the_true_x0_has_zero_kl_with_fixed_small():
    """The fixed-small reverse step at the true x0 is the posterior itself (all three predictions)."""
    for prediction in ("eps", "x0", "v"):
        sched = linear_schedule("fixed_small", prediction, n=100)
        x0, noise, t = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4), torch.tensor([5, 60])
        x_t = sched.q_sample(x0, t, noise)
        output = {"eps": noise, "x0": x0, "v": sched.get_v(x0, noise, t)}[prediction]
        step = sched.reverse_step(output, None, x_t, t)
        torch.testing.assert_close(vlb_terms(sched, step, x0, x_t, t), torch.zeros(2), atol=2e-5, rtol=0)


def test_decoder_term_at_t0_is_the_discretized_nll():
    sched = linear_schedule("fixed_small", n=50)
    x0 = quantize(torch.rand(2, 3, 4, 4) * 2 - 1)
    t = torch.zeros(2, dtype=torch.long)
    step = ReverseStep(x0 + 0.001, torch.full((2, 1, 1, 1), math.log(1e-5)), x0)
    expected = -discretized_gaussian_log_likelihood(x0, step.mean, 0.5 * step.log_variance.expand_as(x0))
    torch.testing.assert_close(vlb_terms(sched, step, x0, x0, t), expected.mean((1, 2, 3)) / math.log(2))


def test_prior_term_matches_its_closed_form():
    x0 = (torch.rand(2, 3, 4, 4) * 2 - 1).double()
    for sched in (linear_schedule(n=1000), DiffusionSchedule.from_betas([0.01] * 5, dtype=torch.float64)):
        a = float(np.prod(1.0 - sched.betas.double().numpy()))
        expected = 0.5 * (-math.log(1 - a) + (1 - a) + a * x0 ** 2 - 1)  # KL(N(sqrt(a) x0, 1 - a) || N(0, 1))
        torch.testing.assert_close(prior_bpd(sched, x0).double(), expected.mean((1, 2, 3)) / math.log(2),
                                   rtol=1e-3, atol=1e-6)
    assert (prior_bpd(linear_schedule(n=1000), x0) < 1e-3).all()


# ---------------------------------------------------------------- bits/dim of 8-bit Gaussian data

def test_bits_per_dim_of_gaussian_data_under_the_exact_model():
    """Finite, not below the data's own entropy (within sampling error), and not far above it."""
    mu, s = 0.0, 0.2
    sched = linear_schedule("learned", n=300)
    data = GaussianData(sched, mu, s, with_variance=True)
    g = torch.Generator().manual_seed(0)
    x0 = quantize(data.sample((256, 1, 2, 2), g)).float()
    out = bits_per_dim(sched, data.denoiser, x0, clip_denoised=False, generator=g)
    total = out["total_bpd"].double()
    entropy = discrete_entropy_bits(mu, s)
    stderr = total.std().item() / math.sqrt(total.numel())
    assert torch.isfinite(total).all() and torch.isfinite(out["vb"]).all()
    assert total.mean().item() >= entropy - 3 * stderr
    assert total.mean().item() < entropy + 0.2
    assert out["vb"].shape == (256, 300) and (out["vb"][:, 1:] >= -1e-6).all()
    torch.testing.assert_close(total, out["vb"].double().sum(1) + out["prior_bpd"].double(), rtol=1e-6, atol=1e-6)


def test_bits_per_dim_is_worse_for_a_wrong_model():
    sched = linear_schedule("learned", n=200)
    g = torch.Generator().manual_seed(1)
    right = GaussianData(sched, 0.0, 0.2, with_variance=True)
    wrong = GaussianData(sched, 0.3, 0.2, with_variance=True)
    x0 = quantize(right.sample((64, 1, 2, 2), g)).float()
    good = bits_per_dim(sched, right.denoiser, x0, clip_denoised=False, generator=torch.Generator().manual_seed(2))
    bad = bits_per_dim(sched, wrong.denoiser, x0, clip_denoised=False, generator=torch.Generator().manual_seed(2))
    assert bad["total_bpd"].mean() > good["total_bpd"].mean() + 0.5

"""DPM-Solver++ (Lu et al. 2022), multistep, data prediction, on a discrete DDPM schedule.

Reproduces the original SD2 ``DPMSolverSampler``: the discrete schedule is seen in continuous time
``t in (0, 1]`` through ``log alpha_t = 0.5 log alpha_bar`` on the grid ``t_n = (n + 1) / N`` (piecewise linear),
the model gets FLOAT timesteps ``(t - 1/N) * 1000``, the default solver is order 2 with ``time_uniform`` steps,
lower-order final steps for fewer than 15 steps, one model evaluation per step, no final denoising to t = 0.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch

from ldm.models.diffusion.denoiser import ModelDenoiser
from ldm.models.diffusion.guidance import ClassifierFreeGuidance
from ldm.models.diffusion.parameterization import Prediction, split_prediction
from ldm.models.diffusion.sampler_adapter import conditioning_batch_size
from ldm.models.diffusion.sampling import randn

logger = logging.getLogger(__name__)

__all__ = ["DPMSolverSampler", "DiscreteVPSchedule", "dpm_solver_pp_multistep"]

X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) [N] through the knots (xp [K] ascending, fp [K]), linear beyond the ends."""
    k = xp.shape[0]
    idx = (torch.searchsorted(xp.contiguous(), x.contiguous()) - 1).clamp(0, k - 2)
    x0, x1, f0, f1 = xp[idx], xp[idx + 1], fp[idx], fp[idx + 1]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


class DiscreteVPSchedule:
    """Continuous-time view of a discrete alpha_bar [N] (DPM-Solver's ``NoiseScheduleVP('discrete')``)."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        acp = alphas_cumprod.detach().float()
        self.total_N = acp.shape[0]
        self.T = 1.0
        self.t_array = torch.linspace(0.0, 1.0, self.total_N + 1, device=acp.device)[1:]
        self.log_alpha_array = 0.5 * torch.log(acp)

    def marginal_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_t [N] at continuous times t [N]."""
        return interpolate(t.reshape(-1), self.t_array.to(t.device), self.log_alpha_array.to(t.device))

    def marginal_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_t = sqrt(alpha_bar(t)) [N]."""
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_t = sqrt(1 - alpha_t^2) [N]."""
        return torch.sqrt(1.0 - torch.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: torch.Tensor) -> torch.Tensor:
        """Half log-SNR lambda_t = log(alpha_t / sigma_t) [N]."""
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * torch.log(1.0 - torch.exp(2.0 * log_mean_coeff))
        return log_mean_coeff - log_std

    def inverse_lambda(self, lamb: torch.Tensor) -> torch.Tensor:
        """Continuous time t [N] with lambda_t = lamb."""
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lamb), -2.0 * lamb)
        return interpolate(log_alpha.reshape(-1), torch.flip(self.log_alpha_array.to(lamb.device), [0]),
                           torch.flip(self.t_array.to(lamb.device), [0]))

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The (float) DDPM timestep the network is given at continuous time t: ``(t - 1/N) * 1000``."""
        return (t - 1.0 / self.total_N) * 1000.0

    def time_steps(self, skip_type: str, t_T: float, t_0: float, n: int, device: torch.device) -> torch.Tensor:
        """The n + 1 continuous times from t_T down to t_0 for "time_uniform", "logSNR" or "time_quadratic"."""
        if skip_type == "time_uniform":
            return torch.linspace(t_T, t_0, n + 1, device=device)
        if skip_type == "logSNR":
            lam_T = self.marginal_lambda(torch.tensor(t_T, device=device))
            lam_0 = self.marginal_lambda(torch.tensor(t_0, device=device))
            return self.inverse_lambda(torch.linspace(lam_T.item(), lam_0.item(), n + 1, device=device))
        if skip_type == "time_quadratic":
            return torch.linspace(t_T ** 0.5, t_0 ** 0.5, n + 1, device=device).pow(2)
        raise ValueError(f"unknown skip_type '{skip_type}'; choose time_uniform, logSNR or time_quadratic")


def _expand(v: torch.Tensor, dims: int) -> torch.Tensor:
    return v[(...,) + (None,) * (dims - 1)]


def dpm_first_order_update(ns: DiscreteVPSchedule, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                           x0_s: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(1) (= DDIM) from time s to t [B] with the data prediction x0_s [B, ...]."""
    h = ns.marginal_lambda(t) - ns.marginal_lambda(s)
    sigma_s, sigma_t = ns.marginal_std(s), ns.marginal_std(t)
    alpha_t = torch.exp(ns.marginal_log_mean_coeff(t))
    phi_1 = torch.expm1(-h)
    return _expand(sigma_t / sigma_s, x.dim()) * x - _expand(alpha_t * phi_1, x.dim()) * x0_s


def dpm_second_order_update(ns: DiscreteVPSchedule, x: torch.Tensor, x0_prev: Sequence[torch.Tensor],
                            t_prev: Sequence[torch.Tensor], t: torch.Tensor,
                            solver_type: str = "dpm_solver") -> torch.Tensor:
    """Multistep DPM-Solver++(2) to time t [B] from the last two data predictions and their times."""
    (m1, m0), (t1, t0), dims = x0_prev[-2:], t_prev[-2:], x.dim()
    lambda_1, lambda_0, lambda_t = ns.marginal_lambda(t1), ns.marginal_lambda(t0), ns.marginal_lambda(t)
    sigma_0, sigma_t = ns.marginal_std(t0), ns.marginal_std(t)
    alpha_t = torch.exp(ns.marginal_log_mean_coeff(t))
    h_0, h = lambda_0 - lambda_1, lambda_t - lambda_0
    r0 = h_0 / h
    d1_0 = _expand(1.0 / r0, dims) * (m0 - m1)
    phi = alpha_t * (torch.exp(-h) - 1.0)
    x_t = _expand(sigma_t / sigma_0, dims) * x - _expand(phi, dims) * m0
    if solver_type == "dpm_solver":
        return x_t - 0.5 * _expand(phi, dims) * d1_0
    if solver_type == "taylor":
        return x_t + _expand(alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0), dims) * d1_0
    raise ValueError(f"unknown solver_type '{solver_type}'; choose dpm_solver or taylor")


def dpm_solver_pp_multistep(x0_fn: X0Fn, x: torch.Tensor, timesteps: torch.Tensor, ns: DiscreteVPSchedule,
                            order: int = 2, lower_order_final: bool = True, solver_type: str = "dpm_solver",
                            callback: Callable[[int, torch.Tensor, torch.Tensor], Any] | None = None) -> torch.Tensor:
    """Integrate x [B, ...] over the continuous ``timesteps`` [S + 1] (descending); S model evaluations.

    ``x0_fn(x, t [B])`` is the data prediction; ``callback(step, x, x0)`` sees each new state.
    """
    if order not in (1, 2):
        raise ValueError(f"multistep DPM-Solver++ supports order 1 or 2 here, got {order}")
    steps = timesteps.shape[0] - 1
    order = min(order, steps)
    vec = lambda i: timesteps[i].expand(x.shape[0])  # noqa: E731
    x0_prev, t_prev = [x0_fn(x, vec(0))], [vec(0)]
    for step in range(1, steps + 1):
        if step < order:
            step_order = step
        elif lower_order_final and steps < 15:
            step_order = min(order, steps + 1 - step)
        else:
            step_order = order
        t = vec(step)
        if step_order == 1:
            x = dpm_first_order_update(ns, x, t_prev[-1], t, x0_prev[-1])
        else:
            x = dpm_second_order_update(ns, x, x0_prev, t_prev, t, solver_type)
        if step < steps:
            x0_prev, t_prev = (x0_prev + [x0_fn(x, t)])[-order:], (t_prev + [t])[-order:]
        if callback is not None:
            callback(step - 1, x, x0_prev[-1])
    return x


def data_prediction_fn(denoiser: Any, ns: DiscreteVPSchedule, cond: Any) -> X0Fn:
    """x0_fn(x, t_continuous [B]) of a (guided) denoiser: output -> eps -> x0 with the continuous alpha/sigma."""
    prediction = Prediction(denoiser.prediction)

    def x0_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = denoiser(x, ns.model_time(t), cond)
        alpha_t, sigma_t = _expand(ns.marginal_alpha(t), x.dim()), _expand(ns.marginal_std(t), x.dim())
        eps, _ = split_prediction(out, x, alpha_t, sigma_t, prediction)
        return (x - sigma_t * eps) / alpha_t
    return x0_fn


class DPMSolverSampler:
    """``DPMSolverSampler(model)``; ``sample(S, batch_size, shape, conditioning, ...)`` with the DDIM signature."""

    def __init__(self, model: Any, device: torch.device | str | None = None, **kwargs: Any) -> None:
        self.model = model
        self.denoiser = ModelDenoiser(model)
        self.alphas_cumprod = self.denoiser.alphas_cumprod
        self.device = torch.device(device) if device is not None else self.alphas_cumprod.device

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Any = None,
               callback: Callable[[int], Any] | None = None, normals_sequence: Any = None,
               img_callback: Callable[[torch.Tensor, int], Any] | None = None, quantize_x0: bool = False,
               eta: float = 0.0, mask: torch.Tensor | None = None, x0: torch.Tensor | None = None,
               temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
               corrector_kwargs: dict | None = None, verbose: bool = True, x_T: torch.Tensor | None = None,
               log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, generator: torch.Generator | None = None,
               order: int = 2, skip_type: str = "time_uniform", lower_order_final: bool = True,
               **kwargs: Any) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample [batch_size, *shape] in ``S`` model evaluations; returns (samples, {"x_inter", "pred_x0"})."""
        if mask is not None or score_corrector is not None or quantize_x0:
            raise NotImplementedError("DPMSolverSampler supports neither mask, score_corrector nor quantize_x0; "
                                      "use DDIMSampler for those")
        cbs = conditioning_batch_size(conditioning)
        if cbs is not None and cbs != batch_size:
            logger.warning("got %d conditionings for a batch of %d", cbs, batch_size)
        x = x_T if x_T is not None else randn((batch_size, *shape), self.device, generator=generator)
        ns = DiscreteVPSchedule(self.alphas_cumprod.to(x.device))
        guided = ClassifierFreeGuidance(self.denoiser, unconditional_conditioning, unconditional_guidance_scale)
        timesteps = ns.time_steps(skip_type, ns.T, 1.0 / ns.total_N, S, x.device)
        intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [x], "pred_x0": []}

        def on_step(i: int, x_i: torch.Tensor, x0_i: torch.Tensor) -> None:
            if i % log_every_t == 0 or i == S - 1:
                intermediates["x_inter"].append(x_i)
                intermediates["pred_x0"].append(x0_i)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(x0_i, i)

        if verbose:
            logger.info("DPM-Solver++ sampling of %s in %d steps", (batch_size, *shape), S)
        x = dpm_solver_pp_multistep(data_prediction_fn(guided, ns, conditioning), x, timesteps, ns, order=order,
                                    lower_order_final=lower_order_final, callback=on_step)
        return x.to(self.device), intermediates

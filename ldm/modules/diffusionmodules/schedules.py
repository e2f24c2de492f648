"""Pure noise-schedule functions (float64 maths), independent of any model.

These reproduce the original Stable Diffusion conventions exactly, including its traps:
``"linear"`` is linear in sqrt(beta); DDIM timesteps start at 1; ``alphas_prev[0]`` is ``alphas_cumprod[0]``.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

logger = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2,
                       cosine_s: float = 8e-3) -> np.ndarray:
    """Betas of a named schedule as a float64 array of shape [n_timestep]."""
    if n_timestep < 1:
        raise ValueError(f"n_timestep must be >= 1, got {n_timestep}")
    if schedule == "linear":
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64,
                               device="cpu") ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + cosine_s
        alphas_bar = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas_bar = alphas_bar / alphas_bar[0]
        betas = (1 - alphas_bar[1:] / alphas_bar[:-1]).clamp(min=0, max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu") ** 0.5
    else:
        raise ValueError(f"unknown beta schedule '{schedule}'; choose one of {', '.join(BETA_SCHEDULES)}")
    return betas.numpy()


def make_ddim_timesteps(ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int,
                        verbose: bool = True) -> np.ndarray:
    """DDPM timesteps visited by DDIM, ascending, int64: ``range(0, T, T // S) + 1`` for "uniform".

    Where the original grid would reach timestep T (an IndexError there, e.g. S=9 or 27 with T=1000),
    the out-of-range steps are dropped, which leaves exactly S steps for those counts.
    """
    if num_ddim_timesteps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {num_ddim_timesteps}")
    if num_ddim_timesteps > num_ddpm_timesteps:
        raise ValueError(f"cannot take {num_ddim_timesteps} sampling steps from a model trained with "
                         f"{num_ddpm_timesteps} timesteps; use at most {num_ddpm_timesteps}")
    if ddim_discr_method == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        ddim_timesteps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    elif ddim_discr_method == "quad":
        ddim_timesteps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps)) ** 2).astype(int)
    else:
        raise NotImplementedError(f'There is no ddim discretization method called "{ddim_discr_method}"')
    steps_out = ddim_timesteps + 1
    steps_out = steps_out[steps_out < num_ddpm_timesteps].astype(np.int64)
    if verbose:
        logger.info("Selected timesteps for ddim sampler: %s", steps_out)
    return steps_out


def make_ddim_sampling_parameters(alphacums: np.ndarray, ddim_timesteps: np.ndarray, eta: float,
                                  verbose: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DDIM (sigmas, alphas, alphas_prev) at the selected timesteps; alphas_prev[0] = alphacums[0]."""
    alphacums = np.asarray(alphacums)
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    if verbose:
        logger.info("Selected alphas for ddim sampler: a_t: %s; a_(t-1): %s", alphas, alphas_prev)
        logger.info("For the chosen value of eta, which is %s, this results in sigma_t schedule %s", eta, sigmas)
    return sigmas, alphas, alphas_prev


def space_timesteps(num_timesteps: int, spec: int | str | list[int]) -> list[int]:
    """The subset of ``range(num_timesteps)`` a respaced sampler visits (ascending), as Improved DDPM.

    ``spec``: an int or ``"N"`` (N steps spread evenly, ends included); ``"a,b,c"`` or a list (the timesteps cut
    into that many equal sections, each spread over its own count); ``"ddimN"`` (the stride that gives exactly
    N steps from 0, as DDIM's original spacing).
    """
    if isinstance(spec, str) and spec.startswith("ddim"):
        count = int(spec[len("ddim"):])
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"no integer stride gives exactly {count} steps out of {num_timesteps}")
    counts = [int(c) for c in (spec.split(",") if isinstance(spec, str) else
                               [spec] if isinstance(spec, int) else spec)]
    if not counts or min(counts) < 1:
        raise ValueError(f"step counts must be positive integers, got {spec!r}")
    base, extra = divmod(num_timesteps, len(counts))
    steps, start = [], 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps (spec {spec!r})")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        steps.extend(start + round(j * stride) for j in range(count))
        start += size
    return sorted(set(steps))


# The DDPM buffers, under the names a checkpoint stores them (float32 there; computed here in float64).
DDPM_BUFFER_NAMES = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def ddpm_schedule(betas: np.ndarray, v_posterior: float = 0.0) -> dict[str, np.ndarray]:
    """The 12 DDPM schedule arrays of ``betas`` [T] (float64, keyed by :data:`DDPM_BUFFER_NAMES`).

    ``posterior_variance = (1 - v) * beta_tilde + v * beta`` interpolates between the true posterior variance
    (v = 0) and beta; its log is clipped at 1e-20 because it is 0 at t = 0.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or len(betas) < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not ((betas > 0) & (betas <= 1)).all():
        raise ValueError("betas must lie in (0, 1]")
    alphas = 1.0 - betas
    acp = np.cumprod(alphas, axis=0)
    acp_prev = np.append(1.0, acp[:-1])
    posterior_variance = (1 - v_posterior) * betas * (1.0 - acp_prev) / (1.0 - acp) + v_posterior * betas
    return {
        "betas": betas,
        "alphas_cumprod": acp,
        "alphas_cumprod_prev": acp_prev,
        "sqrt_alphas_cumprod": np.sqrt(acp),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - acp),
        "log_one_minus_alphas_cumprod": np.log(1.0 - acp),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / acp),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / acp - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(acp_prev) / (1.0 - acp),
        "posterior_mean_coef2": (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
    }


def lvlb_weights(schedule: dict[str, np.ndarray], parameterization: str) -> torch.Tensor:
    """Per-timestep weights [T] (float32) of the simple loss in the variational bound, as the original.

    eps: ``beta^2 / (2 sigma_post^2 alpha (1 - alpha_bar))``; x0: ``0.5 sqrt(alpha_bar) / (2 - alpha_bar)``
    (the original's formula, kept as is); v: ones. Computed in float32 from the float32 buffers like the
    original; entry 0 (infinite or undefined where the posterior variance is 0) is set to entry 1.
    """
    f32 = {k: torch.tensor(v, dtype=torch.float32, device="cpu") for k, v in schedule.items()}
    acp = f32["alphas_cumprod"]
    if parameterization == "eps":
        alphas = torch.tensor(1.0 - schedule["betas"], dtype=torch.float32, device="cpu")
        weights = f32["betas"] ** 2 / (2 * f32["posterior_variance"] * alphas * (1 - acp))
    elif parameterization == "x0":
        weights = 0.5 * torch.sqrt(acp) / (2.0 * 1 - acp)
    elif parameterization == "v":
        weights = torch.ones_like(acp)
    else:
        raise ValueError(f"unknown parameterization '{parameterization}'; choose eps, x0 or v")
    if len(weights) > 1:
        weights[0] = weights[1]
    return weights


def min_snr_weights(alphas_cumprod: torch.Tensor, parameterization: str, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights [T] (Hang et al. 2023) for the simple loss of an eps, x0 or v network.

    The x0-space weight is ``min(SNR, gamma)``; the network's own loss is already ``SNR`` (eps) or ``SNR + 1`` (v)
    times the x0 error, so the weight applied to it is ``min(SNR, gamma) / SNR`` or ``min(SNR, gamma) / (SNR + 1)``.
    """
    if gamma <= 0:
        raise ValueError(f"snr_gamma must be positive (5 is the usual choice), got {gamma}")
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    if parameterization == "eps":
        return clipped / snr
    if parameterization == "x0":
        return clipped
    if parameterization == "v":
        return clipped / (snr + 1.0)
    raise ValueError(f"unknown parameterization '{parameterization}'; choose eps, x0 or v")

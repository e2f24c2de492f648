"""Where a stochastic sampler's fresh noise comes from: ``noise(sigma, sigma_next) -> tensor shaped like x``.

Each image may have its own ``torch.Generator`` (on the CPU, so the draws are the same on every device): then
image k's noise comes from generator k alone and an image depends on its seed only, whatever the batch.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

NoiseSampler = Callable[[float, float], torch.Tensor]
Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def draw(gens: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str,
         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Next standard normal draw of every image's generator: [len(gens), *shape] on ``device``."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=g.device, dtype=dtype)
                        for g in gens]).to(device)


def randn_like(x: torch.Tensor, gens: Generators = None) -> torch.Tensor:
    """Standard normal draw shaped like x [B, ...]: per image from ``gens`` (a list), from one generator, or
    from torch's global generator (a plain ``torch.randn`` call) when None."""
    if gens is None:
        return torch.randn(x.shape, device=x.device, dtype=x.dtype)
    if isinstance(gens, torch.Generator):
        return torch.randn(x.shape, generator=gens, device=gens.device, dtype=x.dtype).to(x.device)
    if len(gens) != x.shape[0]:
        raise ValueError(f"{len(gens)} generators for a batch of {x.shape[0]}")
    return draw(gens, x.shape[1:], x.device, x.dtype)


def gaussian_noise(x: torch.Tensor, gens: Generators = None) -> NoiseSampler:
    """Independent standard normal noise at every call (k-diffusion's default noise sampler)."""
    return lambda sigma, sigma_next: randn_like(x, gens)


def brownian_noise(x: torch.Tensor, sigma_min: float, sigma_max: float, gens: Generators = None) -> NoiseSampler:
    """Noise from a Brownian tree over [sigma_min, sigma_max] (what the SDE samplers expect): the increments of
    overlapping intervals are correlated as those of one Brownian motion. Each image's tree is seeded from a draw
    of its generator (the CPU tree gives the same noise on every device)."""
    import torchsde

    if gens is None or isinstance(gens, torch.Generator):
        gens = [gens] * x.shape[0]
    seeds = [int(torch.randint(0, 2 ** 62, (), generator=g)) for g in gens]
    lo, hi = float(sigma_min), float(sigma_max)
    w0 = torch.zeros(tuple(x.shape[1:]), dtype=torch.float64)
    # the tree's interval a little wider than the queries: torchsde keeps its ends in float32
    trees = [torchsde.BrownianTree(lo * (1 - 1e-4), w0, hi * (1 + 1e-4), entropy=s, tol=1e-6) for s in seeds]

    def sample(sigma: float, sigma_next: float) -> torch.Tensor:
        s0, s1 = min(max(float(sigma), lo), hi), min(max(float(sigma_next), lo), hi)
        a, b = min(s0, s1), max(s0, s1)
        if b <= a:
            return torch.zeros_like(x)
        sign = -1.0 if s0 > s1 else 1.0  # a step down in sigma walks the tree backwards
        w = torch.stack([tree(a, b) for tree in trees]) * (sign / (b - a) ** 0.5)
        return w.to(device=x.device, dtype=x.dtype)
    return sample


def scaled_noise(noise: NoiseSampler, temperature: float = 1.0, dropout: float = 0.0) -> NoiseSampler:
    """The original DDIM's ``temperature`` and ``noise_dropout`` applied to another noise sampler."""
    def sample(sigma: float, sigma_next: float) -> torch.Tensor:
        n = noise(sigma, sigma_next) * temperature
        return torch.nn.functional.dropout(n, p=dropout) if dropout > 0 else n
    return sample


def make_noise(x: torch.Tensor, gens: Generators, brownian: bool = False,
               sigma_range: Optional[tuple[float, float]] = None) -> NoiseSampler:
    """The noise sampler a sampler asks for: a Brownian tree over ``sigma_range`` or plain Gaussian draws."""
    if brownian and sigma_range is not None:
        return brownian_noise(x, sigma_range[0], sigma_range[1], gens)
    return gaussian_noise(x, gens)

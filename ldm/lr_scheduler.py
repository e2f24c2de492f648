"""Learning-rate multipliers of the original configs (``scheduler_config`` targets), used through ``LambdaLR``.

Each class is a callable ``f(step) -> multiplier`` (also reachable as ``.schedule`` as in the original); the
optimizer's base learning rate is multiplied by it. Cycle bookkeeping follows the original: a step ``n`` belongs
to the first cycle whose cumulative end is ``>= n``. Past the last cycle the last cycle is used (the original
raised a ``TypeError`` there).
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

logger = logging.getLogger(__name__)


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from ``lr_start`` to ``lr_max``, then cosine decay to ``lr_min`` at ``max_decay_steps``."""

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float,
                 max_decay_steps: int, verbosity_interval: int = 0) -> None:
        self.lr_warm_up_steps = warm_up_steps
        self.lr_start = lr_start
        self.lr_min = lr_min
        self.lr_max = lr_max
        self.lr_max_decay_steps = max_decay_steps
        self.last_lr = 0.0
        self.verbosity_interval = verbosity_interval

    def schedule(self, n: int, **kwargs: object) -> float:
        """Multiplier at step ``n``."""
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info("current step: %d, recent lr-multiplier: %g", n, self.last_lr)
        if n < self.lr_warm_up_steps:
            lr = (self.lr_max - self.lr_start) / self.lr_warm_up_steps * n + self.lr_start
        else:
            t = (n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps)
            t = min(t, 1.0)
            lr = self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + math.cos(t * math.pi))
        self.last_lr = float(lr)
        return self.last_lr

    def __call__(self, n: int, **kwargs: object) -> float:
        return self.schedule(n, **kwargs)


class LambdaWarmUpCosineScheduler2:
    """Repeated cycles (lists, one entry per cycle) of linear warm-up then cosine decay; use with base lr 1.0."""

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0) -> None:
        lists = (warm_up_steps, f_min, f_max, f_start, cycle_lengths)
        if len({len(x) for x in lists}) != 1:
            raise ValueError("warm_up_steps, f_min, f_max, f_start and cycle_lengths must have one entry per "
                             f"cycle (got lengths {[len(x) for x in lists]})")
        self.lr_warm_up_steps = [int(x) for x in warm_up_steps]
        self.f_start = [float(x) for x in f_start]
        self.f_min = [float(x) for x in f_min]
        self.f_max = [float(x) for x in f_max]
        self.cycle_lengths = [int(x) for x in cycle_lengths]
        self.cum_cycles = [0]
        for length in self.cycle_lengths:
            self.cum_cycles.append(self.cum_cycles[-1] + length)
        self.last_f = 0.0
        self.verbosity_interval = verbosity_interval

    def find_in_interval(self, n: int) -> int:
        """Index of the cycle that step ``n`` falls into (the last one past the end)."""
        for interval, end in enumerate(self.cum_cycles[1:]):
            if n <= end:
                return interval
        return len(self.cycle_lengths) - 1

    def _warm_up(self, cycle: int, n: int) -> float:
        return (self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n + self.f_start[cycle]

    def _after_warm_up(self, cycle: int, n: int) -> float:
        t = (n - self.lr_warm_up_steps[cycle]) / (self.cycle_lengths[cycle] - self.lr_warm_up_steps[cycle])
        t = min(t, 1.0)
        return self.f_min[cycle] + 0.5 * (self.f_max[cycle] - self.f_min[cycle]) * (1 + math.cos(t * math.pi))

    def schedule(self, n: int, **kwargs: object) -> float:
        """Multiplier at step ``n``."""
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info("current step: %d, recent lr-multiplier: %g, current cycle %d", n, self.last_f, cycle)
        if n < self.lr_warm_up_steps[cycle]:
            f = self._warm_up(cycle, n)
        else:
            f = self._after_warm_up(cycle, n)
        self.last_f = float(f)
        return self.last_f

    def __call__(self, n: int, **kwargs: object) -> float:
        return self.schedule(n, **kwargs)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """As :class:`LambdaWarmUpCosineScheduler2` but decaying linearly from ``f_max`` (at cycle start) to ``f_min``."""

    def _after_warm_up(self, cycle: int, n: int) -> float:
        length = self.cycle_lengths[cycle]
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (length - n) / length

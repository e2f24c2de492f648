"""Build a model without drawing random initial weights, for when a checkpoint overwrites every one of them.

Constructing a model runs each layer's random initialisation (``nn.init.kaiming_uniform_`` and friends), which for
a multi-billion-parameter model costs about a minute of CPU before the checkpoint replaces every value anyway
(measured: the SDXL base UNet, 2.57 B parameters, 52 s on one core). Inside :func:`skipped_weight_init` those random
fills do nothing, so parameters keep the memory ``torch.empty`` gave them. Use it only where a strict load follows:
every parameter must then be overwritten, or it holds arbitrary values. Constant fills (``ones_``, ``zeros_``,
``constant_``) and buffers computed in constructors (schedules, attention masks) are unaffected.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

# The random fills of torch.nn.init that layers' reset_parameters (and open_clip's init_parameters) call.
RANDOM_FILLS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                "xavier_normal_", "orthogonal_")
_lock = threading.Lock()


def _keep(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """A random fill that leaves ``tensor`` as it is."""
    return tensor


@contextlib.contextmanager
def skipped_weight_init() -> Iterator[None]:
    """Within this block, ``torch.nn.init``'s random fills are no-ops (restored on exit, also after an error)."""
    with _lock:
        saved = {name: getattr(torch.nn.init, name) for name in RANDOM_FILLS}
        try:
            for name in RANDOM_FILLS:
                setattr(torch.nn.init, name, _keep)
            yield
        finally:
            for name, fn in saved.items():
                setattr(torch.nn.init, name, fn)

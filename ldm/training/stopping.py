"""Stopping a run cleanly: Ctrl-C (SIGINT) or SIGTERM lets the current optimizer step finish, then the trainer
saves and returns, so the checkpoint is a state of the uninterrupted run and a resume continues it exactly."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Any

import torch

from ldm.training.distributed import DistContext, all_reduce_sum

logger = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager catching SIGINT/SIGTERM during training; a second signal aborts at once (no save).

    A repeat within ``repeat_window_s`` counts as the same request (Ctrl-C under torchrun reaches a worker twice:
    from the terminal, then forwarded by the agent); under torchrun repeats never abort, since the agent itself
    escalates to SIGKILL after its timeout. Only the main thread can install handlers; elsewhere the signals keep
    their default behaviour.
    """

    def __init__(self, repeat_window_s: float = 2.0) -> None:
        self.signal_name: str | None = None
        self.repeat_window_s = repeat_window_s
        self.abort_on_repeat = "TORCHELASTIC_RUN_ID" not in os.environ
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            if not self.abort_on_repeat or time.monotonic() - self._first_at < self.repeat_window_s:
                logger.info("%s again: still finishing the current step", name)
                return
            logger.warning("%s again: aborting without saving", name)  # second request: stop now
            self.__exit__()
            raise KeyboardInterrupt
        self.signal_name, self._first_at = name, time.monotonic()
        logger.warning("%s: finishing the current step, then saving last.ckpt (send it again to abort without "
                       "saving)", name)

    def agreed(self, ctx: DistContext) -> bool:
        """True when any process was asked to stop (collective when several processes train)."""
        if not ctx.distributed:
            return self.signal_name is not None
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=ctx.device)
        stop = float(all_reduce_sum(flag, ctx).item()) > 0
        if stop and self.signal_name is None:
            self.signal_name = "stop request of another process"
        return stop

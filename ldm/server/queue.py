"""The job queue: one worker thread per device runs jobs in arrival order; every job gets its answer (a result
or an exception) through a future; a queued job can be withdrawn, the running one interrupted."""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

FINISHED_KEPT = 1000  # finished task ids remembered for /internal/progress


@dataclass
class Job:
    """One unit of work and what ``/progress`` reports about it."""

    id: int
    name: str
    work: Callable[["Job"], Any]
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    fraction: float = 0.0
    step: int = 0
    steps: int = 0
    batch: int = 0
    batches: int = 0
    preview: Optional[str] = None  # base64 PNG of the current estimate
    preview_id: int = 0  # counts the previews, so a client asks only for a newer one
    task: Optional[str] = None  # the client's task id (the web UI's force_task_id), for /internal/progress


class QueueFull(RuntimeError):
    """More jobs are waiting than the server accepts."""


class JobQueue:
    """Jobs run one at a time, in order, on a worker thread (the device's); at most ``max_pending`` wait."""

    def __init__(self, max_pending: int = 100) -> None:
        self.max_pending = max_pending
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self.current: Optional[Job] = None
        self.completed = 0
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()  # recent task ids, in order
        self._thread = threading.Thread(target=self._loop, name="ldm-worker", daemon=True)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Withdraw the queued jobs, interrupt the running one and wait for the worker to end."""
        with self._cv:
            self._stopping = True
            while self._pending:
                self._pending.popleft().future.cancel()
            if self.current is not None:
                self.current.cancel.set()
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, name: str, work: Callable[[Job], Any], task: Optional[str] = None) -> Job:
        """Queue ``work(job)``; its result or exception arrives in ``job.future``; ``task`` names it for
        :meth:`task_state`."""
        job = Job(next(self._ids), name, work, task=task)
        with self._cv:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if len(self._pending) >= self.max_pending:
                raise QueueFull(f"{len(self._pending)} jobs are waiting, as many as this server queues; try again "
                                f"later (scripts/serve.py --max_queue raises the limit)")
            self._pending.append(job)
            self._cv.notify()
        return job

    def withdraw(self, job: Job) -> None:
        """Cancel a job: removed if still queued, interrupted if running (its client went away)."""
        with self._cv:
            if job in self._pending:
                self._pending.remove(job)
                job.future.cancel()
                logger.info("job %d (%s) withdrawn before it started", job.id, job.name)
                return
        job.cancel.set()

    def interrupt(self) -> bool:
        """Interrupt the running job (it answers with what it has); False when nothing runs."""
        job = self.current
        if job is None:
            return False
        job.cancel.set()
        return True

    def task_state(self, task: str) -> tuple[Optional[Job], Optional[int], bool]:
        """(the running job when it is ``task``, ``task``'s place in the queue (0 = next) or None, whether it
        finished recently)."""
        with self._cv:
            running = self.current if self.current is not None and self.current.task == task else None
            place = next((i for i, job in enumerate(self._pending) if job.task == task), None)
            return running, place, task in self._finished

    def pending(self) -> int:
        """Jobs waiting to run."""
        with self._cv:
            return len(self._pending)

    def _next(self) -> Optional[Job]:
        with self._cv:
            while not self._pending and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            job = self._pending.popleft()
            self.current = job
            return job

    def _loop(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            if job.future.set_running_or_notify_cancel():
                job.started = time.time()
                try:
                    job.future.set_result(job.work(job))
                except BaseException as e:  # noqa: BLE001 - every job gets its answer, the worker goes on
                    job.future.set_exception(e)
            with self._cv:
                self.current = None
                self.completed += 1
                if job.task is not None:
                    self._finished[job.task] = None
                    while len(self._finished) > FINISHED_KEPT:
                        self._finished.popitem(last=False)

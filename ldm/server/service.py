"""What the endpoints share: the loaded model, the checkpoint catalogue, the queue, saving and progress."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ldm.api import Generator, Progress, Request, Result
from ldm.inference.errors import UsageError
from ldm.inference.loading import default_watermark
from ldm.inference.outputs import OutputWriter, Watermarker
from ldm.server.images import encode_png
from ldm.server.models import Checkpoint, default_checkpoint, find_checkpoints
from ldm.server.queue import Job, JobQueue
from ldm.server.schemas import Limits

logger = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """Everything ``scripts/serve.py`` decides: model, device, limits, where and how images are saved."""

    ckpt: Optional[Path] = None
    config: Optional[Path] = None
    vae: Optional[Path] = None
    loras: Sequence[str] = ()
    device: Optional[str] = None
    precision: str = "autocast"
    ckpt_dirs: Sequence[Path] = ()
    outdir: Path = Path("outputs")
    watermark: bool = True  # in the answers and the saved files
    safety_check: bool = True  # the NSFW checker (models/safety_checker, or safety_checker) on every image
    safety_checker: Optional[Path] = None
    preview_interval: float = 1.0  # seconds between live previews; negative: none
    limits: Limits = field(default_factory=Limits)
    auth: Optional[str] = None  # "user:pass"


def _same(a: Path, b: Path) -> bool:
    """True when two paths name the same file."""
    return Path(a).resolve() == Path(b).resolve()


class Service:
    """The model (loaded once; switched through the queue), the checkpoints it may switch to, the queue."""

    def __init__(self, cfg: ServerConfig, generator: Optional[Generator] = None):
        self.cfg = cfg
        self.queue = JobQueue(cfg.limits.max_queue)
        self.generator = generator or Generator.load(cfg.ckpt, cfg.config, vae=cfg.vae, loras=cfg.loras,
                                                     device=cfg.device, precision=cfg.precision,
                                                     **self._safety())
        self._mark: Optional[Watermarker] = None
        self.clip_skip = 1  # the web UI's CLIP_stop_at_last_layers option (requests may override it)
        self.checkpoints = self._catalogue()
        self.current = self._matching(cfg.ckpt or self.weights, self.weights)
        self.queue.start()

    def _safety(self) -> dict[str, Any]:
        return {"safety_check": self.cfg.safety_check, "safety_checker": self.cfg.safety_checker}

    @property
    def weights(self) -> Path:
        """The weights file of the loaded model."""
        return self.generator.loaded.source.ckpt_path

    def close(self) -> None:
        """Stop the worker (queued jobs are cancelled, the running one interrupted)."""
        self.queue.stop()

    def _catalogue(self) -> list[Checkpoint]:
        entries = find_checkpoints(list(self.cfg.ckpt_dirs))
        try:
            entries.insert(0, default_checkpoint())
        except UsageError:  # the default model's files are gone; --ckpt serves
            pass
        if self.cfg.ckpt is not None and not any(_same(c.filename, self.cfg.ckpt) for c in entries):
            entries.append(Checkpoint(self.cfg.ckpt.name, self.cfg.ckpt, self.cfg.ckpt, self.cfg.config))
        return entries

    def _matching(self, path: Path, weights: Path) -> Checkpoint:
        """The catalogue entry of the loaded ``path``, hashed from its ``weights`` (so titled ``name [hash]``)."""
        for index, entry in enumerate(self.checkpoints):
            if _same(entry.filename, path):
                self.checkpoints[index] = entry.hashed(weights)
                return self.checkpoints[index]
        entry = Checkpoint(Path(path).name, Path(path), Path(path), None).hashed(weights)
        self.checkpoints.append(entry)
        return entry

    def refresh(self) -> None:
        """Scan the checkpoint folders again (files added or removed since the start)."""
        known = {c.filename: c for c in self.checkpoints if c.sha256}
        self.checkpoints = [known.get(c.filename, c) for c in self._catalogue()]
        self.current = self._matching(self.current.filename, self.weights)

    def find(self, text: str) -> Checkpoint:
        """The catalogue entry ``text`` names; UsageError listing the titles otherwise."""
        for entry in self.checkpoints:
            if entry.matches(text):
                return entry
        titles = ", ".join(c.title for c in self.checkpoints)
        raise UsageError(f"sd_model_checkpoint '{text}' is not a known checkpoint; use one of: {titles}")

    def switch(self, entry: Checkpoint) -> None:
        """Load ``entry`` instead of the current model (on the worker, between jobs)."""
        if _same(entry.filename, self.current.filename):
            return
        logger.info("loading %s", entry.title)
        loaded = Generator.load(entry.ckpt, entry.config, vae=self.cfg.vae, device=self.generator.loaded.device,
                                precision=self.cfg.precision, loras=self.cfg.loras, **self._safety())
        self.generator.close()
        self.generator = loaded
        self.current = self._matching(entry.filename, self.weights)

    def generate(self, job: Job, request: Request, mode: str, save: bool) -> Result:
        """Run a request on the worker, reporting progress (and previews) into ``job``; save when asked."""
        last_preview = [0.0]

        def progress(p: Progress) -> None:
            job.step, job.steps, job.batch, job.batches, job.fraction = p.step, p.total, p.batch, p.batches, p.fraction
            interval = self.cfg.preview_interval
            if interval >= 0 and time.monotonic() - last_preview[0] >= interval:
                job.preview = encode_png(p.preview())
                job.preview_id += 1
                last_preview[0] = time.monotonic()

        result = self.generator.run(request, mode, progress, job.cancel)
        if self.cfg.watermark:  # the answer's images and the saved files alike
            result.images = [self._watermarker()(image) for image in result.images]
        if save and result.images:
            self.save(result, mode)
        return result

    def generate_with(self, job: Job, request: Request, mode: str, save: bool, checkpoint: Optional[Checkpoint],
                      restore: bool = True) -> Result:
        """``generate`` on ``checkpoint`` (the web UI's ``override_settings``), switching back afterwards when
        ``restore``."""
        previous = self.current
        if checkpoint is not None:
            self.switch(checkpoint)
        try:
            return self.generate(job, request, mode, save)
        finally:
            if checkpoint is not None and restore:
                self.switch(previous)

    def _watermarker(self) -> Watermarker:
        """The loaded model family's watermark (one per payload, so a too-small size is told once)."""
        payload = default_watermark(self.generator.loaded.geometry)
        if self._mark is None or self._mark.payload != payload:
            self._mark = Watermarker(payload)
        return self._mark

    def save(self, result: Result, mode: str) -> list[Path]:
        """Write the images (already watermarked by ``generate``) as the scripts do:
        ``outdir/<mode>-samples/samples/NNNNN.png`` with parameters."""
        writer = OutputWriter(self.cfg.outdir / f"{mode}-samples", None, save_samples=True, save_grid=False)
        return [path for image, params in zip(result.images, result.parameters)
                if (path := writer.sample(image, params)) is not None]

    def progress(self, skip_image: bool = False) -> dict[str, Any]:
        """The web UI's ``/progress`` answer: the running job's progress and the queue."""
        job, pending = self.queue.current, self.queue.pending()
        fraction = job.fraction if job is not None else 0.0
        eta = _eta(job) or 0.0
        state = {"skipped": False, "interrupted": bool(job and job.cancel.is_set()),
                 "job": f"task({job.id})" if job else "", "job_count": pending + (job is not None),
                 "queue_pending": pending, "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(
                     job.created)) if job else "0", "job_no": job.batch if job else 0,
                 "sampling_step": job.step if job else 0, "sampling_steps": job.steps if job else 0,
                 "jobs_completed": self.queue.completed}
        image = job.preview if job is not None and not skip_image else None
        return {"progress": fraction, "eta_relative": eta, "state": state, "current_image": image,
                "textinfo": None}

    def task_progress(self, task: Optional[str], preview_id: int = -1, live_preview: bool = True) -> dict[str, Any]:
        """The web UI's ``/internal/progress`` answer for one task (``force_task_id``): running, queued (with its
        place) or completed; the preview only when newer than ``preview_id``."""
        job, place, done = self.queue.task_state(task) if task else (None, None, False)
        answer: dict[str, Any] = {"active": job is not None, "queued": place is not None, "completed": done,
                                  "progress": None, "eta": None, "live_preview": None, "id_live_preview": -1,
                                  "textinfo": "Waiting..."}
        if place is not None:
            answer["textinfo"] = f"In queue: {place + 1}/{self.queue.pending()}"
        if job is None:
            return answer
        answer.update(progress=job.fraction, eta=_eta(job), id_live_preview=preview_id,
                      textinfo=f"Step {job.step}/{job.steps}, batch {job.batch + 1}/{max(job.batches, 1)}")
        if live_preview and job.preview is not None and job.preview_id != preview_id:
            answer.update(live_preview="data:image/png;base64," + job.preview, id_live_preview=job.preview_id)
        return answer


def _eta(job: Optional[Job]) -> Optional[float]:
    """Seconds the running ``job`` still needs, from its pace so far; None before its first step."""
    if job is None or job.started is None or job.fraction <= 0:
        return None
    elapsed = time.time() - job.started
    return elapsed / job.fraction - elapsed

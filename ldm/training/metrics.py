"""Training feedback on disk: a CSV of the logged values, a PNG plot of the loss curves, TensorBoard if installed."""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

logger = logging.getLogger(__name__)


class MeanAccumulator:
    """Collects per-step values (tensors stay on their device until :meth:`reduce`) and averages them."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: Mapping[str, Any]) -> None:
        """Add one step's values."""
        for k, v in values.items():
            v = v.detach().float().mean() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def reduce(self) -> dict[str, torch.Tensor]:
        """Means since the last call as 0-d tensors (then cleared)."""
        out = {k: torch.as_tensor(self.sums[k] / self.counts[k]) for k in sorted(self.sums)}
        self.sums, self.counts = {}, {}
        return out


class CSVLog:
    """``metrics.csv`` with one row per logging step; new columns rewrite the file with the wider header."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        self.rows: list[dict[str, str]] = []
        self.columns: list[str] = ["step"]
        if path.exists():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                # rows written after the checkpoint we resume from belong to an abandoned future
                self.rows = [r for r in reader if resume_step is None or int(r["step"]) <= resume_step]
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Append one row."""
        row = {"step": str(step), **{k: f"{float(v):.6g}" for k, v in values.items()}}
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new or not self.path.exists():
            self.columns += new
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one column, skipping empty cells."""
        steps, values = [], []
        for r in self.rows:
            if r.get(key) not in (None, ""):
                steps.append(int(r["step"]))
                values.append(float(r[key]))
        return steps, values


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot_curves(series: Mapping[str, tuple[Sequence[int], Sequence[float]]], path: Path,
                size: tuple[int, int] = (900, 500), log_y: bool = True) -> None:
    """Draw curves (steps, values) into a PNG with PIL: axes, min/max labels and a legend."""
    from PIL import Image, ImageDraw

    series = {k: v for k, v in series.items() if len(v[0]) > 0}
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 70, 20, size[0] - 20, size[1] - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    if not series:
        img.save(path)
        return
    values = [v for _, ys in series.values() for v in ys if math.isfinite(v)]
    log_y = log_y and values and min(values) > 0
    tf = math.log10 if log_y else (lambda v: v)
    lo, hi = tf(min(values)), tf(max(values))
    hi = hi if hi > lo else lo + 1.0
    x_lo = min(min(xs) for xs, _ in series.values())
    x_hi = max(max(xs) for xs, _ in series.values())
    x_hi = x_hi if x_hi > x_lo else x_lo + 1

    def point(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (tf(y) - lo) / (hi - lo) * (bottom - top))

    for i, (name, (xs, ys)) in enumerate(sorted(series.items())):
        color = _COLORS[i % len(_COLORS)]
        pts = [point(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        draw.text((left + 10, top + 8 + 14 * i), name, fill=color)
    draw.text((4, top), f"{max(values):.4g}", fill="black")
    draw.text((4, bottom - 12), f"{min(values):.4g}", fill="black")
    draw.text((left, bottom + 8), f"step {x_lo}", fill="black")
    draw.text((right - 90, bottom + 8), f"step {x_hi}", fill="black")
    if log_y:
        draw.text((left, bottom + 22), "log scale", fill="gray")
    tmp = path.with_name(path.name + ".tmp.png")
    img.save(tmp)
    tmp.replace(path)


class MetricsLogger:
    """CSV + loss-curve PNG (+ TensorBoard events when the package is installed) under the run's folder."""

    def __init__(self, logdir: Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        logdir.mkdir(parents=True, exist_ok=True)
        self.logdir = logdir
        self.csv = CSVLog(logdir / "metrics.csv", resume_step)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(logdir / "tensorboard"), purge_step=resume_step)
            except ImportError:
                logger.info("TensorBoard is not installed: metrics go to metrics.csv and loss_curve.png only")

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Record ``values`` at ``step``."""
        self.csv.log(step, values)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), step)

    def plot(self) -> None:
        """Redraw ``loss_curve.png`` from the loss columns of the CSV."""
        keys = [c for c in self.csv.columns if c != "step" and "loss" in c.split("/")[-1]]
        preferred = [k for k in keys if k.endswith(("/loss", "/total_loss", "/loss_ema", "/disc_loss"))]
        chosen = preferred or keys
        plot_curves({k: self.csv.series(k) for k in chosen[:6]}, self.logdir / "loss_curve.png")

    def close(self) -> None:
        """Flush everything to disk."""
        self.plot()
        if self.tb is not None:
            self.tb.close()

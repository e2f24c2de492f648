"""Writing results as the original scripts lay them out (``samples/NNNNN.png``, ``grid-NNNN.png``), but safely.

Numbers continue after the files already there; each name is reserved with ``O_CREAT | O_EXCL`` before the image
is written to a temporary file and renamed over it, so two runs writing into one folder at once never overwrite
each other's (or older) files, and no reader ever sees a half-written PNG.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.inference.errors import UsageError

logger = logging.getLogger(__name__)

SAMPLE_DIGITS = 5
GRID_DIGITS = 4
GRID_PREFIX = "grid-"
PARAMETERS_KEY = "parameters"  # the PNG text chunk the common web UIs read
_MAX_TRIES = 100_000


def _numbers(folder: Path, prefix: str) -> list[int]:
    """Numbers of the entries ``<prefix><digits>...`` in ``folder`` (hidden temporary files excluded)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)(?!\d)")
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return [int(m.group(1)) for name in names if (m := pattern.match(name))]


def next_number(folder: Path, prefix: str = "") -> int:
    """The number after the highest one already used in ``folder`` by names ``<prefix><digits>...`` (0 if none)."""
    return max(_numbers(folder, prefix), default=-1) + 1


def reserve(folder: Path, prefix: str, digits: int, start: Optional[int] = None, suffix: str = ".png") -> Path:
    """Create (empty, exclusively) the first free ``<prefix><number><suffix>`` from ``start`` on; returns it.

    ``O_CREAT | O_EXCL`` makes the reservation atomic: concurrent callers, in this or other processes, get
    different names, and an existing file is never reused.
    """
    folder.mkdir(parents=True, exist_ok=True)
    number = next_number(folder, prefix) if start is None else start
    for _ in range(_MAX_TRIES):
        path = folder / f"{prefix}{number:0{digits}d}{suffix}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return path
        except FileExistsError:
            number = max(number + 1, next_number(folder, prefix))
    raise OSError(f"could not find a free file name in '{folder}' after {_MAX_TRIES} tries")


def write_png(image: Image.Image, path: Path, parameters: Optional[str] = None) -> None:
    """Write ``image`` to the (reserved) ``path`` atomically, with a ``parameters`` text chunk when given."""
    info = None
    if parameters is not None:
        info = PngInfo()
        info.add_text(PARAMETERS_KEY, parameters)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_parameters(path: str | os.PathLike) -> Optional[str]:
    """The ``parameters`` text chunk of a PNG file, or None."""
    with Image.open(path) as image:
        return image.info.get(PARAMETERS_KEY)


def check_writable(outdir: Path) -> None:
    """Raise UsageError unless ``outdir`` is (or can be created as) a writable folder; creates nothing."""
    probe = outdir.expanduser().absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--outdir '{outdir}': '{probe}' is a file, not a folder; choose another --outdir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--outdir '{outdir}': no permission to write in '{probe}'; choose another --outdir")


def make_grid(images: Sequence[Image.Image], n_rows: int, padding: int = 2) -> Image.Image:
    """Images side by side, ``n_rows`` per row (as torchvision's ``make_grid``: black ``padding`` around each)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    width, height = images[0].size
    ncol = min(n_rows, len(images))
    nrow = -(-len(images) // ncol)
    cell_w, cell_h = width + padding, height + padding
    grid = np.zeros((nrow * cell_h + padding, ncol * cell_w + padding, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        top, left = (index // ncol) * cell_h + padding, (index % ncol) * cell_w + padding
        grid[top:top + height, left:left + width] = np.asarray(image.convert("RGB"))
    return Image.fromarray(grid)


class OutputWriter:
    """Saves samples and grids under ``outdir`` with watermark and metadata; remembers what it wrote."""

    def __init__(self, outdir: Path, watermark_text: Optional[str] = None, save_samples: bool = True,
                 save_grid: bool = True, n_rows: int = 1):
        self.outdir = Path(outdir)
        self.sample_dir = self.outdir / "samples"
        self.watermark_text = watermark_text
        self.save_samples = save_samples
        self.save_grid = save_grid
        self.n_rows = max(1, n_rows)
        self.written: list[Path] = []
        self._next_sample: Optional[int] = None
        self._told_too_small = False

    def _mark(self, image: Image.Image) -> Image.Image:
        if self.watermark_text is None:
            return image
        from ldm.modules.watermark import put_watermark, watermark_fits

        if not watermark_fits(*image.size):
            if not self._told_too_small:
                self._told_too_small = True
                logger.warning("%dx%d images are too small for the invisible watermark (it needs 256x256 pixels); "
                               "saved without it", *image.size)
            return image
        return put_watermark(image, self.watermark_text)

    def sample(self, image: Image.Image, parameters: Optional[str]) -> Optional[Path]:
        """Write one image as ``samples/NNNNN.png`` (unless samples are skipped); returns its path."""
        if not self.save_samples:
            return None
        path = reserve(self.sample_dir, "", SAMPLE_DIGITS, start=self._next_sample)
        self._next_sample = int(path.stem) + 1
        self._write(self._mark(image), path, parameters)
        return path

    def grid(self, images: Sequence[Image.Image], parameters: Optional[str]) -> Optional[Path]:
        """Write all ``images`` as ``grid-NNNN.png`` in ``outdir`` (unless grids are skipped); returns its path."""
        if not self.save_grid or not images:
            return None
        path = reserve(self.outdir, GRID_PREFIX, GRID_DIGITS)
        self._write(self._mark(make_grid(images, self.n_rows)), path, parameters)
        return path

    def _write(self, image: Image.Image, path: Path, parameters: Optional[str]) -> None:
        try:
            write_png(image, path, parameters)
        except BaseException:
            path.unlink(missing_ok=True)  # give the reserved name back
            raise
        self.written.append(path)
        logger.debug("wrote %s", path)

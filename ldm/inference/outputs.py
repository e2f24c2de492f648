"""Writing results as the original scripts lay them out (``samples/NNNNN.png``, ``grid-NNNN.png``), but safely.

Each image is encoded into a private temporary file (created exclusively, never through a link, under an
unpredictable hidden name) and then hard-linked to the first free number: ``os.link`` fails rather than replace an
existing name, so two runs writing into one folder at once never overwrite each other's (or older, or planted)
files, and a final name only ever appears with a complete PNG behind it, even if the process is killed midway.
Numbers continue after the files already there.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.inference.errors import UsageError
from ldm.modules.watermark import Payload, put_watermark, watermark_fits

logger = logging.getLogger(__name__)

SAMPLE_DIGITS = 5
GRID_DIGITS = 4
GRID_PREFIX = "grid-"
PARAMETERS_KEY = "parameters"  # the PNG text chunk the common web UIs read
_MAX_TRIES = 100_000
_TEMP_TRIES = 100
_TEMP_SUFFIX = ".tmp"
# ``link()`` errors of file systems without hard links (FAT/exFAT, some network shares): fall back to reserving.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_CREATE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                 | getattr(os, "O_BINARY", 0))


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


def temp_name() -> str:
    """An unpredictable hidden file name for a private temporary file (``.<32 hex digits>.tmp``)."""
    return f".{secrets.token_hex(16)}{_TEMP_SUFFIX}"


def _create_private(folder: Path) -> tuple[int, Path]:
    """(descriptor, path) of a new empty file in ``folder``; ``O_CREAT | O_EXCL`` never opens an existing file or
    follows a planted link, so a name that is taken is simply skipped."""
    for _ in range(_TEMP_TRIES):
        path = folder / temp_name()
        try:
            return os.open(path, _CREATE_FLAGS, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"could not create a temporary file in '{folder}' after {_TEMP_TRIES} "
                                        f"tries", str(folder))


def write_private(image: Image.Image, folder: Path, parameters: Optional[str] = None) -> Path:
    """``image`` as a complete PNG (``parameters`` text chunk when given) in a new private temporary file in
    ``folder``, flushed to disk; nothing is left behind if encoding fails or is interrupted."""
    info = None
    if parameters is not None:
        info = PngInfo()
        info.add_text(PARAMETERS_KEY, parameters)
    fd, tmp = _create_private(folder)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _link(src: Path, dst: Path) -> None:
    """Give the file ``src`` the new name ``dst`` as well; FileExistsError if ``dst`` exists (even as a link)."""
    kwargs = {"follow_symlinks": False} if os.link in os.supports_follow_symlinks else {}
    try:
        os.link(src, dst, **kwargs)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        # No hard links here: reserve the name exclusively, then move the complete file onto the reservation.
        os.close(os.open(dst, _CREATE_FLAGS, 0o666))
        try:
            os.replace(src, dst)
        except BaseException:
            dst.unlink(missing_ok=True)
            raise


def publish(tmp: Path, folder: Path, prefix: str, digits: int, start: Optional[int] = None,
            suffix: str = ".png") -> Path:
    """Link the complete file ``tmp`` to the first free ``<prefix><number><suffix>`` in ``folder`` from ``start``
    on (default: after the numbers already there), retrying with the next number when a name is taken; removes
    ``tmp`` in any case and returns the final path."""
    number = next_number(folder, prefix) if start is None else start
    try:
        for _ in range(_MAX_TRIES):
            path = folder / f"{prefix}{number:0{digits}d}{suffix}"
            try:
                _link(tmp, path)
                return path
            except FileExistsError:
                number = max(number + 1, next_number(folder, prefix))
        raise OSError(f"could not find a free file name in '{folder}' after {_MAX_TRIES} tries")
    finally:
        tmp.unlink(missing_ok=True)


def save_numbered(image: Image.Image, folder: Path, prefix: str, digits: int, parameters: Optional[str] = None,
                  start: Optional[int] = None) -> Path:
    """Write ``image`` as the first free ``<prefix><number>.png`` in ``folder`` (created if needed); the name
    appears only once the PNG is complete, and no existing file is ever replaced. Returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    return publish(write_private(image, folder, parameters), folder, prefix, digits, start)


def write_png(image: Image.Image, path: Path, parameters: Optional[str] = None) -> None:
    """Write ``image`` to the new file ``path`` atomically, with a ``parameters`` text chunk when given;
    FileExistsError (and nothing written) if ``path`` exists already."""
    tmp = write_private(image, path.parent, parameters)
    try:
        _link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


class Watermarker:
    """Embeds ``payload`` (None: nothing) as the invisible watermark; pictures too small for it pass unmarked,
    with one warning."""

    def __init__(self, payload: Optional[Payload] = None):
        self.payload = payload
        self._told_too_small = False

    def __call__(self, image: Image.Image) -> Image.Image:
        """``image`` with the watermark (or unchanged, see the class)."""
        if self.payload is None:
            return image
        if not watermark_fits(*image.size):
            if not self._told_too_small:
                self._told_too_small = True
                logger.warning("%dx%d images are too small for the invisible watermark (it needs 256x256 pixels); "
                               "left without it", *image.size)
            return image
        return put_watermark(image, self.payload)


class OutputWriter:
    """Saves samples and grids under ``outdir`` with watermark and metadata; remembers what it wrote."""

    def __init__(self, outdir: Path, watermark_text: Optional[str] = None, save_samples: bool = True,
                 save_grid: bool = True, n_rows: int = 1):
        self.outdir = Path(outdir)
        self.sample_dir = self.outdir / "samples"
        self.watermark_text = watermark_text
        self._mark = Watermarker(watermark_text)
        self.save_samples = save_samples
        self.save_grid = save_grid
        self.n_rows = max(1, n_rows)
        self.written: list[Path] = []
        self._next_sample: Optional[int] = None

    def sample(self, image: Image.Image, parameters: Optional[str]) -> Optional[Path]:
        """Write one image as ``samples/NNNNN.png`` (unless samples are skipped); returns its path."""
        if not self.save_samples:
            return None
        path = save_numbered(self._mark(image), self.sample_dir, "", SAMPLE_DIGITS, parameters,
                             start=self._next_sample)
        self._next_sample = int(path.stem) + 1
        return self._record(path)

    def grid(self, images: Sequence[Image.Image], parameters: Optional[str]) -> Optional[Path]:
        """Write all ``images`` as ``grid-NNNN.png`` in ``outdir`` (unless grids are skipped); returns its path."""
        if not self.save_grid or not images:
            return None
        image = self._mark(make_grid(images, self.n_rows))
        return self._record(save_numbered(image, self.outdir, GRID_PREFIX, GRID_DIGITS, parameters))

    def _record(self, path: Path) -> Path:
        self.written.append(path)
        logger.debug("wrote %s", path)
        return path

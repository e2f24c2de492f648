"""Training checkpoints: atomic writes, plain-data contents (``weights_only`` loadable), RNG states, EMA export."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

import numpy as np
import torch

logger = logging.getLogger(__name__)
LAST = "last.ckpt"
_STEP_RE = re.compile(r"^step-(\d+)\.ckpt$")


def step_name(step: int) -> str:
    """File name of the checkpoint written at ``step``."""
    return f"step-{step:08d}.ckpt"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    """An unpredictable temporary name beside ``path`` (created exclusively by the callers: no planted links)."""
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")


class _Temporary:
    """A temporary file beside the target, created exclusively (an existing name or planted link is an error)."""

    def __init__(self, target: Path) -> None:
        self.path = _tmp_path(target)
        self.created = False

    def create(self) -> BinaryIO:
        """The new empty file, open for writing."""
        f = open(self.path, "xb")
        self.created = True
        return f

    def link_from(self, src: Path) -> None:
        """Make the temporary name a hard link of ``src`` (else a copy)."""
        try:
            os.link(src, self.path)
            self.created = True
        except FileExistsError:
            raise
        except OSError:
            with open(src, "rb") as fin, self.create() as fout:
                shutil.copyfileobj(fin, fout)
                fout.flush()
                os.fsync(fout.fileno())


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[_Temporary]:
    """Yield a temporary file beside ``path``; on success it replaces ``path`` atomically, else it is removed
    (only if this process created it)."""
    tmp = _Temporary(path)
    try:
        yield tmp
        os.replace(tmp.path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.created and (tmp.path.is_symlink() or tmp.path.exists()):
            tmp.path.unlink()


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, flush + fsync, then rename over ``path``.

    A crash at any point leaves either the previous ``path`` or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(path) as tmp, tmp.create() as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename); mode 0644 under the usual umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(path) as tmp, tmp.create() as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_save_safetensors(sd: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """``sd`` as safetensors at ``path``, atomically, with the mode of the checkpoints (not safetensors' 0600)."""
    from safetensors.torch import save_file

    from ldm.training.export import file_mode

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(path) as tmp:
        tmp.create().close()  # created exclusively: a planted link cannot redirect the write
        save_file(tensors, str(tmp.path), metadata=dict(metadata))
        os.chmod(tmp.path, file_mode())  # safetensors writes 0600
        with open(tmp.path, "rb+") as f:
            os.fsync(f.fileno())


def atomic_link(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` (hard link, else copy), replacing ``dst`` atomically."""
    with _replacing(dst) as tmp:
        tmp.link_from(src)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary files left by a process killed while writing a checkpoint."""
    for p in folder.glob(".*.tmp-*"):
        logger.info("removing the unfinished checkpoint write %s", p.name)
        p.unlink(missing_ok=True)


def step_checkpoints(folder: Path) -> list[Path]:
    """Step-numbered checkpoints in ``folder``, oldest first."""
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.ckpt") if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(folder: Path, keep: int | None) -> None:
    """Keep only the newest ``keep`` step-numbered checkpoints (and their configs; all when ``keep`` is None)."""
    if keep is None or keep <= 0:
        return
    for p in step_checkpoints(folder)[:-keep]:
        p.unlink(missing_ok=True)
        p.with_suffix(".yaml").unlink(missing_ok=True)


def write_checkpoint(obj: Mapping[str, Any], folder: Path, step: int, numbered: bool,
                     keep: int | None = None, config: Mapping[str, Any] | None = None) -> Path:
    """Write ``obj`` as ``last.ckpt`` (and ``step-N.ckpt`` when ``numbered``), atomically; returns the path.

    ``config`` (an inference config) is written beside each file as ``<name>.yaml`` for the generation scripts.
    """
    from ldm.training.export import write_inference_config

    folder.mkdir(parents=True, exist_ok=True)
    last = folder / LAST
    written = [last]
    if numbered:
        target = folder / step_name(step)
        atomic_save(obj, target)
        atomic_link(target, last)
        written.append(target)
    else:
        atomic_save(obj, last)
        target = last
    if config is not None:
        for path in written:
            write_inference_config(config, path)
    prune(folder, keep if numbered else None)
    return target


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a full training checkpoint safely (``weights_only=True``) on the CPU; CheckpointError in one line."""
    import pickle

    from ldm.checkpoint import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found" + (" (it is a folder)" if path.is_dir() else "") +
                              "; pass --resume LOGDIR or --resume LOGDIR/checkpoints/last.ckpt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"refusing to read '{path}': it holds pickled objects that are not plain data (loading "
                              f"them could run code); resume from a checkpoint written by scripts/train.py") from None
    except Exception as e:  # noqa: BLE001 - any failure means the file cannot be used
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read checkpoint '{path}': {reason}. The file may be truncated or not a "
                              f"training checkpoint; resume from another one (checkpoints/step-*.ckpt)") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"'{path}' is not a training checkpoint (no 'state_dict' entry)")
    return ckpt


def check_resumable(ckpt: Mapping[str, Any], path: Path) -> None:
    """CheckpointError unless ``ckpt`` holds what a resume needs (written by scripts/train.py)."""
    from ldm.checkpoint import CheckpointError

    needed = ("global_step", "optimizer_states", "lr_schedulers", "grad_scalers")
    missing = [k for k in needed if k not in ckpt]
    if missing:
        raise CheckpointError(f"'{path}' is not a checkpoint of scripts/train.py (no {', '.join(missing)}), so it "
                              f"cannot be resumed; to start a new run from its weights use --base CONFIG "
                              f"model.params.ckpt_path={path}")


Generator = torch.Generator | np.random.RandomState


def _numpy_plain(st: tuple) -> dict[str, Any]:
    return {"keys": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2]), "has_gauss": int(st[3]),
            "cached_gaussian": float(st[4])}


def _numpy_tuple(st: Mapping[str, Any]) -> tuple:
    return ("MT19937", st["keys"].numpy().astype(np.uint32), st["pos"], st["has_gauss"], st["cached_gaussian"])


def _generator_state(g: Generator) -> Any:
    return _numpy_plain(g.get_state()) if isinstance(g, np.random.RandomState) else g.get_state()


def _set_generator_state(g: Generator, state: Any) -> None:
    g.set_state(_numpy_tuple(state) if isinstance(g, np.random.RandomState) else state)


def rng_state(extra: Mapping[str, Generator] | None = None) -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, numpy, python, named generators) as plain tensors and lists."""
    py = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_plain(np.random.get_state()),
        "python": [py[0], list(py[1]), py[2]],
        "generators": {k: _generator_state(g) for k, g in (extra or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], extra: Mapping[str, Generator] | None = None) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_tuple(state["numpy"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for name, g in (extra or {}).items():
        if name in state.get("generators", {}):
            _set_generator_state(g, state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def inference_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flat state_dict for inference: EMA weights in place of the raw ones (when present), no ``model_ema.*`` /
    ``loss.*``. A diffusion model's EMA covers its ``model.*`` network; an autoencoder's (``ema_decay``) all of it."""
    from ldm.checkpoint import EMA_PREFIX, apply_ema, has_ema

    if has_ema(sd) and any(k.startswith("model.") for k in sd):
        out = apply_ema(dict(sd))
    else:  # the whole model's EMA (autoencoder): model_ema.<name without dots> for each trainable parameter
        out = {k: sd.get(EMA_PREFIX + k.replace(".", ""), v) for k, v in sd.items() if not k.startswith(EMA_PREFIX)}
    return {k: v for k, v in out.items() if not k.startswith("loss.")}


def export_ema(ckpt_or_sd: str | os.PathLike | Mapping[str, torch.Tensor], out: str | os.PathLike,
               config: Mapping[str, Any] | None = None, force: bool = False) -> Path:
    """Write the EMA-only inference weights of a training checkpoint as ``.safetensors`` (atomically), with
    ``<out>.yaml`` beside it: ``config``, else the inference config made from the checkpoint's own config.

    An existing ``out`` (or its ``.yaml``) is replaced only with ``force``: FileExistsError otherwise.
    """
    from ldm.checkpoint import has_ema
    from ldm.training.export import inference_config, sidecar_path, write_inference_config

    out = Path(out)
    if not force:
        for path in (out, sidecar_path(out)):
            if path.exists() or path.is_symlink():
                raise FileExistsError(f"'{path}' already exists; choose another output name or pass --force to "
                                      f"replace it")
    if isinstance(ckpt_or_sd, Mapping):
        sd = ckpt_or_sd
    else:
        ckpt = read_training_checkpoint(ckpt_or_sd)
        sd = ckpt["state_dict"]
        if config is None and isinstance(ckpt.get("config"), Mapping):
            config = inference_config(ckpt["config"])
    flat = inference_state_dict(sd)
    source = "EMA weights" if has_ema(sd) else "weights"
    atomic_save_safetensors(flat, out, metadata={"format": "pt", "source": f"ldm training ({source})"})
    logger.info("wrote %d tensors of inference %s to %s", len(flat), source, out)
    if config is not None:
        logger.info("wrote its inference config %s", write_inference_config(config, out))
    return out


"""Reading and writing checkpoint files safely (``ldm.checkpoint`` re-exports all of it).

Reading never executes code from a file: ``.safetensors`` is plain data, and pickled ``.ckpt``/``.pt``/``.bin``
files go through ``torch.load(weights_only=True)`` with stand-ins for the Lightning/numpy objects that real
Stable Diffusion checkpoints carry next to their weights (so neither Lightning nor any code of theirs is needed).
Writes are atomic (a private temporary file, then a rename).
"""
from __future__ import annotations

import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or does not fit the model it is loaded into."""


class _PickledStandIn:
    """Inert stand-in for a class named in a pickle (e.g. a Lightning callback): it only stores state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _stand_in(qualified: str) -> tuple[type, str]:
    module, _, name = qualified.rpartition(".")
    cls = type(name, (_PickledStandIn,), {"__module__": module, "__qualname__": name})
    return cls, qualified


# Non-tensor objects that SD-era Lightning checkpoints pickle beside the state_dict.
_ALLOWED_FOREIGN_GLOBALS = tuple(
    f"{root}.callbacks.{mod}.{cls}"
    for root in ("pytorch_lightning", "lightning.pytorch")
    for mod, cls in (("model_checkpoint", "ModelCheckpoint"), ("early_stopping", "EarlyStopping"),
                     ("lr_monitor", "LearningRateMonitor"), ("progress.tqdm_progress", "TQDMProgressBar"))
) + ("argparse.Namespace", "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig")


def _safe_globals() -> list:
    import numpy as np

    allowed: list = [_stand_in(name) for name in _ALLOWED_FOREIGN_GLOBALS]
    try:  # numpy scalars (e.g. best_model_score) pickled by Lightning
        from numpy.core.multiarray import scalar as np_scalar  # type: ignore[attr-defined]
        allowed.append((np_scalar, "numpy.core.multiarray.scalar"))
    except ImportError:  # pragma: no cover - numpy layout changes
        pass
    allowed += [np.dtype, type(np.dtype("float32")), type(np.dtype("float64")), type(np.dtype("int64"))]
    return allowed


def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: '{p}'. Check the path (pass --ckpt PATH to a .safetensors or "
                              f".ckpt file).")
    if p.is_dir():
        raise CheckpointError(f"'{p}' is a folder, not a checkpoint file: point to the .safetensors/.ckpt inside it.")
    if not p.is_file():
        raise CheckpointError(f"'{p}' is not a regular file (a device, pipe or socket): pass a .safetensors or .ckpt "
                              f"file.")
    if p.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint '{p}': it is empty (0 bytes), so the download or copy did not "
                              f"finish; get the file again.")
    return p


def _unpickling_detail(message: str) -> str:
    """The informative line of torch's weights-only unpickling error (it wraps it in generic advice)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1]
        if "GLOBAL" in ln:
            return ln
    return lines[-1] if lines else "unpickling failed"


def _read_pickle(p: Path) -> Any:
    kwargs: dict[str, Any] = dict(map_location="cpu", weights_only=True)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            try:  # memory-map zip checkpoints: the weights stay file-backed instead of a second copy in RAM
                return torch.load(p, mmap=True, **kwargs)
            except RuntimeError as e:
                if "mmap" not in str(e) and "zip" not in str(e):
                    raise
                return torch.load(p, **kwargs)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        detail = _unpickling_detail(str(e))
        if "GLOBAL" not in detail:
            raise CheckpointError(f"cannot read checkpoint '{p}': PyTorch's safe loader does not accept it ({detail}). "
                                  f"The file may be truncated, corrupt or not a PyTorch checkpoint.") from None
        raise CheckpointError(
            f"refusing to load '{p}': it contains pickled objects that are not plain weights, and loading them "
            f"could execute code ({detail}). If you trust the file, convert it to .safetensors with a tool you "
            f"trust, then load that.") from None
    except Exception as e:  # noqa: BLE001 - garbage makes the unpickler fail in many ways (IndexError, KeyError...)
        if not isinstance(e, (EOFError, RuntimeError, OSError, ValueError)):
            reason = f"its bytes are not a PyTorch checkpoint ({type(e).__name__} while unpickling)"
        elif str(e).strip():
            reason = str(e).strip().splitlines()[0]
        else:
            reason = f"{type(e).__name__}: the file ends too early"
        raise CheckpointError(f"cannot read checkpoint '{p}': {reason}. The file may be truncated or not a PyTorch "
                              f"checkpoint; download or export it again.") from None


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint safely; returns (flat state_dict, extra top-level entries such as global_step)."""
    p = _check_file(path)
    if p.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(p), device="cpu"), {}
        except (SafetensorError, OSError, ValueError) as e:
            reason = str(e).strip() or type(e).__name__
            raise CheckpointError(f"cannot read safetensors file '{p}': {reason}. The file may be truncated.") from None
    obj = _read_pickle(p)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"'{p}' holds a {type(obj).__name__}, not a state_dict: it is not a model checkpoint.")
    extra: dict[str, Any] = {}
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        extra = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"'{p}' contains no tensors: it is not a model checkpoint.")
    if "global_step" in extra:
        logger.info("checkpoint '%s' was saved at global step %s", p.name, extra["global_step"])
    return sd, extra


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Flat state_dict of a ``.safetensors``/``.ckpt`` file (``state_dict`` wrapper removed), read safely."""
    return read_checkpoint(path)[0]


def save_safetensors(sd: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write ``sd`` to ``path`` as safetensors atomically (temporary file, then rename); tensors made contiguous."""
    from safetensors.torch import save_file

    p = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    # an unpredictable name created exclusively: a planted file or link there cannot redirect the write
    fd, name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors (and mkstemp) write 0600; files here get the usual mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)

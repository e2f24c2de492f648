#!/usr/bin/env python
"""Convert a Stable Diffusion checkpoint to a diffusers model folder, or a diffusers folder to a checkpoint.

    python scripts/convert.py model.safetensors model-diffusers      # checkpoint -> folder (config inferred)
    python scripts/convert.py model-diffusers model.safetensors      # folder -> checkpoint (.safetensors)

The direction follows the source: a folder with model_index.json becomes a .safetensors checkpoint, anything else
is read as a checkpoint (with --config, or the config txt2img would choose) and written as a diffusers folder.
An existing output is never replaced without --force. Exit status 2 for bad input, with one line saying why.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm.checkpoint import CheckpointError  # noqa: E402
from ldm.inference.errors import EXIT_USAGE, UsageError, UsageParser  # noqa: E402

logger = logging.getLogger("convert")


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = UsageParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="a .safetensors/.ckpt checkpoint, or a diffusers folder")
    p.add_argument("out", type=Path, help="the diffusers folder to write, or the .safetensors file to write")
    p.add_argument("--config", type=Path, default=None, help="model config yaml (default: as txt2img chooses it)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--use_ema", dest="use_ema", action="store_const", const=True, default=None,
                     help="full checkpoints: write the EMA UNet weights (the default when present)")
    ema.add_argument("--no_ema", dest="use_ema", action="store_const", const=False,
                     help="full checkpoints: write the raw (non-EMA) UNet weights")
    p.add_argument("--force", action="store_true", help="replace an existing output (a file, or a diffusers folder)")
    p.add_argument("--unsafe_config", action="store_true", help="allow config targets outside this project")
    return p


def _check_out(out: Path, to_folder: bool, force: bool) -> None:
    """Refuse an output that exists (without --force), or that --force must not replace."""
    from ldm.convert.diffusers_folder import is_diffusers_folder

    if not out.parent.is_dir():
        raise UsageError(f"cannot write '{out}': its folder '{out.parent}' does not exist")
    if not to_folder and out.suffix.lower() != ".safetensors":
        raise UsageError(f"'{out}': a diffusers folder converts to a .safetensors checkpoint; name the output *.safetensors")
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise UsageError(f"'{out}' already exists: choose another output, or pass --force to replace it")
    if to_folder and not (out.is_dir() and not out.is_symlink() and (is_diffusers_folder(out) or not any(out.iterdir()))):
        raise UsageError(f"--force replaces only a diffusers folder (with model_index.json) or an empty folder; "
                         f"'{out}' is neither: choose another output")
    if not to_folder and not (out.is_file() and not out.is_symlink()):
        raise UsageError(f"'{out}' is not a regular file: --force will not replace it; choose another output")


def _load(source: Path, config_path: Optional[Path], use_ema: Optional[bool], unsafe: bool):
    """(model with the weights loaded, its config, the state dict read), as txt2img loads them."""
    from ldm.inference import loading

    src = loading.resolve_source(source, config_path)
    config = loading.read_config(src.config_path, allow_unsafe=unsafe)
    state_dict = src.state_dict
    model = loading.load_model(src, config, use_ema, None, "cpu")
    return model, config, state_dict


def convert(source: Path, out: Path, config: Optional[Path] = None, use_ema: Optional[bool] = None,
            force: bool = False, unsafe_config: bool = False) -> None:
    """Convert ``source`` (checkpoint or diffusers folder) into ``out`` (diffusers folder or .safetensors)."""
    from ldm.checkpoint import save_safetensors
    from ldm.convert.diffusers_folder import is_diffusers_folder
    from ldm.convert.diffusers_write import write_diffusers_folder

    source, out = source.expanduser(), out.expanduser()
    if not source.exists():
        raise UsageError(f"source '{source}' does not exist; check the path")
    to_folder = not source.is_dir()
    if source.is_dir() and not is_diffusers_folder(source):
        raise UsageError(f"source '{source}' is a folder without model_index.json: give a checkpoint file or a "
                         f"diffusers folder")
    _check_out(out, to_folder, force)
    model, cfg, state_dict = _load(source, config, use_ema, unsafe_config)
    if to_folder:
        try:
            write_diffusers_folder(model, cfg, out, replace=force)
        except (KeyError, ValueError) as e:
            raise UsageError(f"'{source}' cannot be written as a diffusers folder: {e.args[0] if e.args else e}") from None
    else:  # the folder's weights, checked by loading them into the model above
        save_safetensors(model.state_dict() if state_dict is None else state_dict, out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and convert; 0 on success, 2 for bad input (one line on stderr)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        ns = build_parser().parse_args(argv)
        convert(ns.source, ns.out, ns.config, ns.use_ema, ns.force, ns.unsafe_config)
    except (UsageError, CheckpointError) as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train or fine-tune from YAML configs, like the original ``main.py --base config.yaml -t``.

    python scripts/train.py --base configs/training/tiny-ldm.yaml -t
    torchrun --nproc_per_node 4 scripts/train.py --base cfg.yaml -t --name run1 model.base_learning_rate=5e-5
    python scripts/train.py --resume logs/2024-01-01T00-00-00_run1 -t
    python scripts/train.py --export_ema logs/.../checkpoints/last.ckpt model-ema.safetensors
    python scripts/train.py --export_lora logs/.../checkpoints/step-00000500.ckpt my-lora.safetensors

See configs/training/README.md for the config sections.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import logging.handlers
import re
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from ldm.checkpoint import CheckpointError  # noqa: E402
from ldm.inference.errors import EXIT_USAGE, UsageError  # noqa: E402
from ldm.training.checkpoint import LAST, export_ema  # noqa: E402
from ldm.training.config import (ConfigError, check_complete, check_sections, load_config,  # noqa: E402
                                 trainer_settings)
from ldm.training.distributed import (DistContext, broadcast_object, env_rank_info, init_distributed,  # noqa: E402
                                      shutdown)
from ldm.training.trainer import RunOptions, Trainer  # noqa: E402

logger = logging.getLogger("train")
EXIT_INTERRUPTED = 130
# A dotted override such as model.params.x=1 (also ~key, key[0]); told apart from --base files and option values.
OVERRIDE_RE = re.compile(r"^~?[A-Za-z_][\w\-]*(\[\d+\])?(\.[\w\-]+(\[\d+\])?)*=")
_ONE_VALUE = {"-r", "--resume", "-l", "--logdir", "-n", "--name", "-s", "--seed"}


def str2bool(value: str) -> bool:
    """Parse yes/no, true/false, 1/0."""
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got '{value}'")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(options and files, ``key=value`` overrides): an override ends ``--base``'s list wherever it stands."""
    rest, overrides, skip = [], [], 0
    for token in argv:
        if skip:
            skip -= 1
            rest.append(token)
        elif token in _ONE_VALUE or token in ("--export_ema", "--export_lora"):
            skip = 2 if token in ("--export_ema", "--export_lora") else 1
            rest.append(token)
        elif OVERRIDE_RE.match(token):
            overrides.append(token)
        else:
            rest.append(token)
    return rest, overrides


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``key.sub=value`` items (anywhere, also after ``--base``) override the configs."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-b", "--base", nargs="+", default=[], metavar="config.yaml",
                   help="config files, merged left to right")
    p.add_argument("-t", "--train", action="store_true", help="train (without it: one validation pass)")
    p.add_argument("-r", "--resume", help="a run folder or a checkpoint in its checkpoints/: continue exactly there")
    p.add_argument("-l", "--logdir", default="logs", help="parent folder of the run folders (default: logs)")
    p.add_argument("-n", "--name", default="", help="run name (default: name of the last --base file)")
    p.add_argument("-s", "--seed", type=int, default=23, help="random seed (default: 23)")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                   help="lr = accumulate * processes * batch_size * base_lr, as the original (default: true)")
    p.add_argument("--export_ema", nargs=2, metavar=("CKPT", "OUT"),
                   help="write the EMA inference weights of a training checkpoint as .safetensors (and OUT's "
                        ".yaml inference config), then exit")
    p.add_argument("--export_lora", nargs=2, metavar=("CKPT", "OUT"),
                   help="write the LoRA adapters of a LoRA run's checkpoint as a kohya-format .safetensors, then exit")
    p.add_argument("--force", action="store_true", help="let --export_ema / --export_lora replace an existing OUT")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.base_learning_rate=1e-4")
    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = p.parse_args(rest)
    args.overrides = [*args.overrides, *overrides]
    return args


def _run_folder(folder: Path) -> bool:
    return folder.is_dir() and any((folder / "configs").glob("*-project.yaml"))


def resolve_run(args: argparse.Namespace) -> tuple[list[Path], Path, Path | None]:
    """(config files, run folder, checkpoint to resume) from the options; UsageError for what cannot run."""
    if not args.resume:
        if not args.base:
            raise UsageError("nothing to do: give --base config.yaml (or --resume RUN_FOLDER)")
        name = args.name or Path(args.base[-1]).stem
        now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
        return [Path(b) for b in args.base], Path(args.logdir) / f"{now}_{name}", None
    path = Path(args.resume)
    if path.is_dir():
        if not _run_folder(path):
            raise UsageError(f"--resume {path}: not a run folder of scripts/train.py (no configs/*-project.yaml)")
        logdir, ckpt = path, path / "checkpoints" / LAST
        if not ckpt.is_file():
            raise UsageError(f"--resume {path}: the run saved no checkpoint yet ({ckpt} is missing); start it "
                             f"again with --base")
    elif path.is_file():
        if path.parent.name != "checkpoints" or not _run_folder(path.parent.parent):
            raise UsageError(f"--resume {path}: a checkpoint outside a run folder (RUN/checkpoints/*.ckpt); to "
                             f"start a new run from its weights use --base CONFIG model.params.ckpt_path={path}")
        logdir, ckpt = path.parent.parent, path
    else:
        raise UsageError(f"--resume {path}: no such run folder or checkpoint")
    saved = sorted((logdir / "configs").glob("*-project.yaml"))
    return saved[-1:] + [Path(b) for b in args.base], logdir, ckpt


def prepare_config(files: Sequence[Path], overrides: Sequence[str]) -> DictConfig:
    """The merged config, checked: constructor arguments, nothing left ``???``, trainer settings."""
    cfg = load_config(files, overrides)
    check_sections(cfg)
    check_complete(cfg)
    trainer_settings(cfg)
    return cfg


def setup_logging(is_main: bool) -> list[logging.Handler]:
    """Console logging (warnings only on ranks > 0) and a buffer that :func:`log_to_file` hands to ``train.log``.

    Returns the handlers added to the root logger (removed again when :func:`main` returns).
    """
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = logging.StreamHandler()
    console.setFormatter(fmt)
    console.setLevel(logging.WARNING)  # until the inputs are valid: an error stays one line
    handlers: list[logging.Handler] = [console]
    if is_main:
        handlers.append(logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1))
    root = logging.getLogger()
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    for h in handlers:
        root.addHandler(h)
    return handlers


def log_to_file(handlers: list[logging.Handler], logdir: Path) -> None:
    """Start ``train.log`` in the run folder with what was logged so far (rank 0, once the inputs are valid)."""
    file = logging.FileHandler(logdir / "train.log")
    file.setFormatter(handlers[0].formatter)
    console, buffer = handlers
    assert isinstance(buffer, logging.handlers.MemoryHandler)
    for record in buffer.buffer:
        if record.levelno < console.level:  # the start-up messages held back from the console
            console.handle(record)
    console.setLevel(logging.NOTSET)
    buffer.setTarget(file)
    buffer.flush()
    logging.getLogger().removeHandler(buffer)
    logging.getLogger().addHandler(file)
    handlers[1] = file


def export_lora(args: argparse.Namespace) -> int:
    """``--export_lora CKPT OUT``: a LoRA run's adapters as a kohya-format file; 0, or 2 with one line."""
    from ldm.modules.lora.train import export_lora_checkpoint

    ckpt, out = Path(args.export_lora[0]), Path(args.export_lora[1])
    if out.is_dir() or out.suffix != ".safetensors":
        raise UsageError(f"--export_lora: give the output file ending in .safetensors, not '{out}'")
    try:
        export_lora_checkpoint(ckpt, out, force=args.force)
    except (FileExistsError, ValueError) as e:
        raise UsageError(f"--export_lora: {e}") from None
    return 0


def export(args: argparse.Namespace) -> int:
    """``--export_ema CKPT OUT``: inference weights and their config; 0, or 2 with one line."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.export_lora:
        return export_lora(args)
    ckpt, out = Path(args.export_ema[0]), Path(args.export_ema[1])
    if out.is_dir():
        raise UsageError(f"--export_ema: '{out}' is a folder; give the output file, e.g. {out / 'model.safetensors'}")
    if out.suffix != ".safetensors":
        raise UsageError(f"--export_ema: the output '{out}' must end in .safetensors")
    try:
        export_ema(ckpt, out, force=args.force)
    except FileExistsError as e:
        raise UsageError(str(e)) from None
    return 0


def _build(cfg: DictConfig, opts: RunOptions, ctx: DistContext) -> Trainer:
    """The trainer; bad data folders, models and resume checkpoints become one-line UsageErrors."""
    try:
        return Trainer(cfg, opts, ctx)
    except (ConfigError, CheckpointError, FileNotFoundError, NotADirectoryError, ImportError, ValueError,
            TypeError) as e:  # while building from the config: a value of the wrong kind, a missing file
        raise UsageError("cannot build the run from the config: " + (" ".join(str(e).split()) or type(e).__name__)) \
            from None


def train(args: argparse.Namespace) -> int:
    """Validate everything, then create the run folder, train (or validate) and save."""
    files, logdir, ckpt = resolve_run(args)
    cfg = prepare_config(files, args.overrides)
    rank, world, local = env_rank_info()
    ctx = init_distributed(rank, world, local, device=trainer_settings(cfg).device)
    handlers = setup_logging(ctx.is_main)
    try:
        from ldm.config_policy import config_targets  # training configs are the user's own: say what they build
        logger.info("the config imports and builds these targets: %s", ", ".join(config_targets(cfg)))
        logdir = Path(broadcast_object(str(logdir), ctx))  # one folder, named by rank 0's clock
        trainer = _build(cfg, RunOptions(logdir=logdir, seed=args.seed, scale_lr=args.scale_lr, resume=ckpt), ctx)
        if ctx.is_main:
            (logdir / "configs").mkdir(parents=True, exist_ok=True)
            log_to_file(handlers, logdir)
            stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
            OmegaConf.save(cfg, logdir / "configs" / f"{stamp}-project.yaml")
        logger.info("run folder %s, %d process(es), device %s", logdir, ctx.world_size, ctx.device)
        if not args.train:
            logger.info("no -t/--train: running one validation pass; values %s", trainer.validate(None))
            return 0
        from tqdm.contrib.logging import logging_redirect_tqdm
        with logging_redirect_tqdm():
            trainer.fit()
        if trainer.interrupted:
            if ctx.is_main:
                print(f"train.py: stopped by {trainer.interrupted} at step {trainer.step}; last.ckpt holds it. "
                      f"Continue with: python scripts/train.py --resume {logdir} -t", file=sys.stderr)
            return EXIT_INTERRUPTED
        return 0
    finally:
        shutdown()
        for h in handlers:
            logging.getLogger().removeHandler(h)
            h.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (also works under torchrun): 0, 2 with one line for bad input, 130 when stopped by a signal."""
    args = parse_args(argv)
    try:
        return export(args) if args.export_ema or args.export_lora else train(args)
    except (UsageError, ConfigError, CheckpointError) as e:
        print(f"train.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before training started (loading), or a second Ctrl-C: nothing more is saved
        print("train.py: interrupted; no checkpoint written by this stop", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

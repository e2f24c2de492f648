"""Train or fine-tune from YAML configs, like the original ``main.py --base config.yaml -t``.

    python scripts/train.py --base configs/training/tiny-ldm.yaml -t
    torchrun --nproc_per_node 4 scripts/train.py --base cfg.yaml -t --name run1 model.base_learning_rate=5e-5
    python scripts/train.py --resume logs/2024-01-01T00-00-00_run1 -t
    python scripts/train.py --export_ema logs/.../checkpoints/last.ckpt model-ema.safetensors

See configs/training/README.md for the config sections.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from ldm.training.checkpoint import LAST, export_ema  # noqa: E402
from ldm.training.config import load_config, trainer_settings  # noqa: E402
from ldm.training.distributed import broadcast_object, env_rank_info, init_distributed, shutdown  # noqa: E402
from ldm.training.trainer import RunOptions, Trainer  # noqa: E402

logger = logging.getLogger("train")


def str2bool(value: str) -> bool:
    """Parse yes/no, true/false, 1/0."""
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got '{value}'")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; positional ``key.sub=value`` items override the merged configs."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-b", "--base", nargs="*", default=[], metavar="config.yaml",
                   help="config files, merged left to right")
    p.add_argument("-t", "--train", action="store_true", help="train (without it: one validation pass)")
    p.add_argument("-r", "--resume", help="a log folder or a checkpoint in it: continue exactly from there")
    p.add_argument("-l", "--logdir", default="logs", help="parent folder of the run folders (default: logs)")
    p.add_argument("-n", "--name", default="", help="run name (default: name of the last --base file)")
    p.add_argument("-s", "--seed", type=int, default=23, help="random seed (default: 23)")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                   help="lr = accumulate * processes * batch_size * base_lr, as the original (default: true)")
    p.add_argument("--export_ema", nargs=2, metavar=("CKPT", "OUT"),
                   help="write the EMA inference weights of a training checkpoint as .safetensors, then exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.base_learning_rate=1e-4")
    return p.parse_args(argv)


def resolve_run(args: argparse.Namespace) -> tuple[list[Path], Path, Path | None]:
    """(config files, run folder, checkpoint to resume) from the options."""
    if not args.resume:
        if not args.base:
            raise SystemExit("nothing to do: give --base config.yaml (or --resume LOGDIR)")
        name = args.name or Path(args.base[-1]).stem
        now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
        return [Path(b) for b in args.base], Path(args.logdir) / f"{now}_{name}", None
    path = Path(args.resume)
    if path.is_file():
        logdir, ckpt = path.parent.parent, path
    elif path.is_dir():
        logdir, ckpt = path, path / "checkpoints" / LAST
    else:
        raise SystemExit(f"--resume {path}: no such log folder or checkpoint")
    saved = sorted((logdir / "configs").glob("*-project.yaml"))
    return saved[-1:] + [Path(b) for b in args.base], logdir, ckpt


def setup_logging(logdir: Path | None, is_main: bool) -> list[logging.Handler]:
    """Console logging (warnings only on ranks > 0) and ``train.log`` in the run folder on rank 0.

    Returns the handlers added to the root logger (removed again when :func:`main` returns).
    """
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if logdir is not None and is_main:
        logdir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logdir / "train.log"))
    root = logging.getLogger()
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    return handlers


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (also works under torchrun)."""
    args = parse_args(argv)
    if args.export_ema:
        logging.basicConfig(level=logging.INFO)
        export_ema(args.export_ema[0], args.export_ema[1])
        return 0
    files, logdir, ckpt = resolve_run(args)
    cfg = load_config(files, args.overrides)
    rank, world, local = env_rank_info()
    ctx = init_distributed(rank, world, local, device=trainer_settings(cfg).device)
    handlers: list[logging.Handler] = []
    try:
        logdir = Path(broadcast_object(str(logdir), ctx))  # one folder, named by rank 0's clock
        handlers = setup_logging(logdir, ctx.is_main)
        if ctx.is_main:
            (logdir / "configs").mkdir(parents=True, exist_ok=True)
            stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
            OmegaConf.save(cfg, logdir / "configs" / f"{stamp}-project.yaml")
        logger.info("run folder %s, %d process(es), device %s", logdir, ctx.world_size, ctx.device)
        from ldm.config_policy import config_targets  # training configs are the user's own: say what they build
        logger.info("the config imports and builds these targets: %s", ", ".join(config_targets(cfg)))
        trainer = Trainer(cfg, RunOptions(logdir=logdir, seed=args.seed, scale_lr=args.scale_lr, resume=ckpt), ctx)
        if args.train:
            from tqdm.contrib.logging import logging_redirect_tqdm
            with logging_redirect_tqdm():
                trainer.fit()
        else:
            logger.info("no -t/--train: running one validation pass; values %s", trainer.validate(None))
    finally:
        shutdown()
        for h in handlers:
            logging.getLogger().removeHandler(h)
            h.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

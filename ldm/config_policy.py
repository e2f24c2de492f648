"""Which ``target:`` classes a model config may name: the project's own classes plus a short reviewed list.

A config file is data that may come with a download (``<checkpoint>.yaml``), but ``instantiate_from_config``
imports and calls whatever its ``target:`` entries name (``subprocess.Popen``, ``os.system`` ...). Inference
therefore checks every ``target`` in the whole config tree before anything is imported or built: each must be a
class defined in the project's model, module, data or scheduler code, or one of ``ALLOWED_EXTERNAL``. Only
``ldm`` modules are ever imported to check a target; anything else is refused by its name alone. Training configs
are the user's own and are not restricted (``scripts/train.py`` logs what they build).
"""
from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Mapping, Optional

from ldm.sgm_aliases import SGM_ALIASES, resolve_target

# Non-project targets that configs may name: reviewed, harmless to construct with any arguments.
ALLOWED_EXTERNAL = frozenset({
    "torch.nn.Identity",  # the placeholder ``lossconfig`` of every Stable Diffusion inference config
})
# Where the classes that configs build live (also the original Stable Diffusion class paths). The run machinery
# (``ldm.inference``, ``ldm.training``, the default model's recipe tools) is not something a config builds.
PROJECT_PACKAGES = ("ldm.models", "ldm.modules", "ldm.data", "ldm.lr_scheduler", "ldm.default_model.latents")
OPT_IN_FLAG = "--unsafe_config"

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
_MAX_DEPTH = 200


class UnsafeConfigError(ValueError):
    """A config names a target outside the policy (or cannot be checked); the message says which and where."""


def _short(text: Any, limit: int = 120) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def _in_project(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in PROJECT_PACKAGES)


def refusal(target: Any) -> Optional[str]:
    """Why ``target`` may not be built from an untrusted config, or None when it is allowed.

    Imports nothing unless the target names a project module (to see that it holds a class defined there).
    """
    if not isinstance(target, str) or not _DOTTED.fullmatch(target):
        return "is not a dotted class path"
    if target in ALLOWED_EXTERNAL:
        return None
    if target.startswith("sgm.") and target not in SGM_ALIASES:
        return "is not one of the sgm classes this project implements (those of the SDXL base and refiner configs)"
    target = resolve_target(target)  # the SDXL configs' sgm.* names: aliases of project classes
    module, name = target.rsplit(".", 1)
    if not _in_project(module):
        return "is not one of this project's classes"
    try:
        obj = getattr(importlib.import_module(module), name, None)
    except ImportError as e:
        return f"does not exist in this project ({_short(e)})"
    if obj is None:
        return f"does not exist in this project (module '{module}' has no '{name}')"
    if not inspect.isclass(obj) or not _in_project(getattr(obj, "__module__", "") or ""):
        return "is not a class defined in this project"
    return None


def find_targets(node: Any, where: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """Every ``target`` entry in a plain config tree (dicts and lists): (location such as ``model.target``,
    value)."""
    if depth > _MAX_DEPTH:
        raise UnsafeConfigError(f"is nested more than {_MAX_DEPTH} levels deep at '{where}'")
    found: list[tuple[str, Any]] = []
    if isinstance(node, Mapping):
        for key, value in node.items():
            loc = f"{where}.{key}" if where else str(key)
            if key == "target":
                found.append((loc, value))
            else:
                found.extend(find_targets(value, loc, depth + 1))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            found.extend(find_targets(value, f"{where}[{i}]", depth + 1))
    return found


def plain_tree(config: Any) -> Any:
    """``config`` (an OmegaConf object or plain data) as plain dicts/lists with its interpolations resolved."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not OmegaConf.is_config(config):
        return config
    try:
        return OmegaConf.to_container(config, resolve=True)
    except (OmegaConfBaseException, ValueError, TypeError, RecursionError) as e:
        raise UnsafeConfigError(f"has interpolations that cannot be resolved: {_short(e, 200)}") from None


def config_targets(config: Any) -> list[str]:
    """The distinct targets a config names, in order of appearance (interpolations resolved when possible)."""
    try:
        tree = plain_tree(config)
    except UnsafeConfigError:
        from omegaconf import OmegaConf

        tree = OmegaConf.to_container(config, resolve=False)
    return list(dict.fromkeys(str(value) for _, value in find_targets(tree)))


def check_config(config: Any, source: str) -> None:
    """Raise UnsafeConfigError naming the first target of ``config`` (from file ``source``) that the policy
    refuses; checks the whole tree, nested ``params`` included, before anything is built."""
    try:
        targets = find_targets(plain_tree(config))
    except UnsafeConfigError as e:
        raise UnsafeConfigError(f"config '{source}' {e}; fix the file, or pass {OPT_IN_FLAG} if you trust "
                                f"it") from None
    for where, target in targets:
        reason = refusal(target)
        if reason is not None:
            raise UnsafeConfigError(
                f"config '{source}' names target '{_short(target)}' (at {_short(where)}), which {reason}; a config "
                f"may build only this project's classes and {', '.join(sorted(ALLOWED_EXTERNAL))}. If you trust "
                f"this file and want it to run its own code, pass {OPT_IN_FLAG}")


def outside_policy(config: Any) -> list[str]:
    """The targets of ``config`` that the policy would refuse (for the warning when the user opted in)."""
    return [t for t in config_targets(config) if refusal(t) is not None]

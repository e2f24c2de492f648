"""The one table of samplers: names users type (web-UI display names and short names) -> function, default
schedule and what the sampler needs (fresh noise, a Brownian tree, the original's VP start)."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ldm.samplers import dpmpp, euler, original, unipc
from ldm.samplers.schedules import SCHEDULE_ALIASES, SCHEDULE_LABELS, SCHEDULES, USER_SCHEDULES


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler as users know it."""

    name: str  # short name, also the function's name without ``sample_``
    label: str  # the web UI's display name (what the PNG parameters say)
    fn: Callable[..., Any]
    schedule: str = "normal"  # the default schedule
    calls: str = "1"  # model calls per step, as documented
    eta: Optional[float] = None  # default eta of a stochastic sampler; None: deterministic, no eta
    brownian: bool = False  # wants Brownian-tree noise (the SDE samplers)
    discard_penultimate: bool = False  # the web UI drops the next-to-last sigma of steps + 1 (DPM2, 3M SDE)
    vp_start: bool = False  # the original samplers: the start noise is the DDPM x_T at sigmas[0]
    options: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def stochastic(self) -> bool:
        """True when the sampler adds fresh noise by default."""
        return self.eta is not None


SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("euler", "Euler", euler.sample_euler, aliases=("k_euler",)),
    SamplerSpec("euler_ancestral", "Euler a", euler.sample_euler_ancestral, eta=1.0,
                aliases=("euler_a", "k_euler_a", "k_euler_ancestral")),
    SamplerSpec("heun", "Heun", euler.sample_heun, calls="2", aliases=("k_heun",)),
    SamplerSpec("dpm_2", "DPM2", euler.sample_dpm_2, schedule="karras", calls="2", discard_penultimate=True,
                aliases=("k_dpm_2",)),
    SamplerSpec("dpm_2_ancestral", "DPM2 a", euler.sample_dpm_2_ancestral, schedule="karras", calls="2", eta=1.0,
                discard_penultimate=True, aliases=("dpm_2_a", "k_dpm_2_a")),
    SamplerSpec("lms", "LMS", euler.sample_lms, aliases=("k_lms",)),
    SamplerSpec("dpmpp_2s_ancestral", "DPM++ 2S a", dpmpp.sample_dpmpp_2s_ancestral, schedule="karras", calls="2",
                eta=1.0, aliases=("dpmpp_2s_a", "k_dpmpp_2s_a")),
    SamplerSpec("dpmpp_2m", "DPM++ 2M", dpmpp.sample_dpmpp_2m, schedule="karras", aliases=("k_dpmpp_2m",)),
    SamplerSpec("dpmpp_sde", "DPM++ SDE", dpmpp.sample_dpmpp_sde, schedule="karras", calls="2", eta=1.0,
                brownian=True, aliases=("k_dpmpp_sde",)),
    SamplerSpec("dpmpp_2m_sde", "DPM++ 2M SDE", dpmpp.sample_dpmpp_2m_sde, schedule="exponential", eta=1.0,
                brownian=True, aliases=("k_dpmpp_2m_sde",)),
    SamplerSpec("dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun", dpmpp.sample_dpmpp_2m_sde, schedule="exponential",
                eta=1.0, brownian=True, options={"solver_type": "heun"}, aliases=("k_dpmpp_2m_sde_heun",)),
    SamplerSpec("dpmpp_3m_sde", "DPM++ 3M SDE", dpmpp.sample_dpmpp_3m_sde, schedule="exponential", eta=1.0,
                brownian=True, discard_penultimate=True, aliases=("k_dpmpp_3m_sde",)),
    SamplerSpec("unipc", "UniPC", unipc.sample_unipc, aliases=("uni_pc", "unipc_bh2")),
    SamplerSpec("ddim", "DDIM", original.sample_ddim, schedule="ddim", eta=0.0, vp_start=True),
    SamplerSpec("plms", "PLMS", original.sample_plms, schedule="ddim", calls="1 (2 on the first step)",
                vp_start=True),
    SamplerSpec("dpm_solver", "DPM-Solver", original.sample_dpm_solver, schedule="dpm_solver", vp_start=True,
                aliases=("dpm", "dpmsolver", "dpm-solver", "dpm_solver++")),
)

_BY_KEY: dict[str, SamplerSpec] = {}
for _spec in SAMPLERS:
    for _key in (_spec.name, _spec.label, *_spec.aliases):
        _BY_KEY[_key.lower()] = _spec


@dataclass(frozen=True)
class SamplerChoice:
    """A sampler with the schedule to run it on."""

    spec: SamplerSpec
    schedule: str

    @property
    def label(self) -> str:
        """The web-UI sampler name (``DPM++ 2M``)."""
        return self.spec.label

    @property
    def schedule_label(self) -> str:
        """The web-UI "Schedule type" (``Karras``)."""
        return SCHEDULE_LABELS[self.schedule]

    @property
    def combined_label(self) -> str:
        """The older combined web-UI name (``DPM++ 2M Karras``; the default schedule adds nothing)."""
        if self.schedule in ("karras", "exponential"):
            return f"{self.spec.label} {SCHEDULE_LABELS[self.schedule]}"
        return self.spec.label


class UnknownSampler(ValueError):
    """A sampler or schedule name that is not in the table; the message suggests the closest names."""


def _schedule_key(name: str) -> Optional[str]:
    key = name.strip().lower()
    key = SCHEDULE_ALIASES.get(key, key)
    if key is not None and key not in SCHEDULES:
        raise UnknownSampler(f"unknown schedule '{name}': use one of {', '.join(USER_SCHEDULES)}")
    return key


def resolve(name: str, schedule: Optional[str] = None) -> SamplerChoice:
    """The sampler for ``name`` (display or short name, any case, optionally with a " Karras" / " Exponential"
    suffix) on ``schedule`` (None or "automatic": the name's suffix, else the sampler's default)."""
    key = " ".join(name.strip().lower().split())
    suffix = None
    if key not in _BY_KEY:
        for word in ("karras", "exponential", "uniform", "normal"):
            if key.endswith(" " + word) and key[: -len(word) - 1] in _BY_KEY:
                key, suffix = key[: -len(word) - 1], SCHEDULE_ALIASES.get(word, word)
                break
    spec = _BY_KEY.get(key)
    if spec is None:
        close = difflib.get_close_matches(key, list(_BY_KEY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(_display(c)) for c in close)}?" if close else ""
        raise UnknownSampler(f"unknown sampler '{name}'{hint} (--sampler help lists them all)")
    chosen = _schedule_key(schedule) if schedule is not None else None
    return SamplerChoice(spec, chosen or suffix or spec.schedule)


def _display(key: str) -> str:
    spec = _BY_KEY[key]
    return spec.label if key == spec.label.lower() else key


def help_table() -> str:
    """The sampler table for ``--sampler help``: display name, short name, default schedule, model calls."""
    rows = [("name", "short name", "default schedule", "model calls per step", "stochastic")]
    rows += [(s.label, s.name, s.schedule, s.calls, "yes" if s.stochastic and s.eta else "no") for s in SAMPLERS]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("Names are case-insensitive; a ' Karras' / ' Exponential' suffix or --schedule "
                 f"{'|'.join(USER_SCHEDULES)} picks the schedule.")
    return "\n".join(lines)

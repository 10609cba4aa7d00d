"""Test-only fault injection: ``MEGATRON_EXT_FAULT_INJECT`` makes chosen ranks misbehave at chosen steps.

It exists so that the fault-tolerance paths (skipping bad steps, stragglers, hangs) can be exercised by real runs;
it is not meant for training. The variable holds semicolon-separated faults::

    kind:rank=R:steps=S1,S2-S5[:arg=value]

- ``nan``: the rank's loss of those steps becomes NaN (so do its gradients).
- ``spike``: the rank's loss (and gradients) of those steps is multiplied by ``factor`` (default 100).
- ``sleep``: the rank sleeps in its compute at those steps, before the step's first collective: ``seconds=S`` (a
  fixed time; a large value makes a hang), or ``fraction=F`` (F x the rank's own measured compute time of its
  previous step, without injected sleep: "this rank is F slower"; needs the straggler measurement,
  ``trainer.straggler_every_n_steps``). Exactly one of the two.

``rank`` is the global rank; ``steps`` are optimizer step numbers as logged (the first step is 1); a range ``S-E``
includes both ends. Examples: ``MEGATRON_EXT_FAULT_INJECT="nan:rank=1:steps=5;spike:rank=0:steps=9:factor=50"``,
``MEGATRON_EXT_FAULT_INJECT="sleep:rank=1:steps=11-20:fraction=0.3"``.
A value that does not parse is a :class:`ConfigError` naming the variable, at start-up.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

from megatron_ext.errors import ConfigError

ENV = "MEGATRON_EXT_FAULT_INJECT"

# kind -> {argument: (type, default)}
KINDS: Dict[str, Dict[str, tuple]] = {
    "nan": {},
    "spike": {"factor": (float, 100.0)},
    "sleep": {"seconds": (float, None), "fraction": (float, None)},
}


@dataclass
class Fault:
    kind: str
    rank: int
    steps: Set[int]
    args: Dict[str, object] = field(default_factory=dict)


def _bad(value: str, part: str, why: str) -> ConfigError:
    return ConfigError(
        f"{ENV}={value!r}: {why} in {part!r}; expected semicolon-separated 'kind:rank=R:steps=S1,S2-S5[:arg=value]' "
        f"with kind one of {', '.join(sorted(KINDS))} (a test-only variable: unset it for training)"
    )


def _steps(value: str, part: str, text: str) -> Set[int]:
    out: Set[int] = set()
    for item in text.split(","):
        lo, sep, hi = item.strip().partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise _bad(value, part, f"steps item {item!r} is not an integer or a range A-B") from None
        if a < 1 or b < a:
            raise _bad(value, part, f"steps item {item!r} must be >= 1 (a range A-B with A <= B)")
        out.update(range(a, b + 1))
    return out


def parse(env_value: Optional[str]) -> List[Fault]:
    """The faults of a ``MEGATRON_EXT_FAULT_INJECT`` value (None or blank: none)."""
    faults: List[Fault] = []
    for part in (env_value or "").split(";"):
        part = part.strip()
        if not part:
            continue
        kind, *fields = [f.strip() for f in part.split(":")]
        if kind not in KINDS:
            raise _bad(env_value, part, f"unknown kind {kind!r}")
        kv: Dict[str, str] = {}
        for f in fields:
            k, eq, v = f.partition("=")
            if not eq or not k or not v:
                raise _bad(env_value, part, f"field {f!r} is not name=value")
            if k in kv:
                raise _bad(env_value, part, f"field {k!r} given twice")
            kv[k] = v
        for need in ("rank", "steps"):
            if need not in kv:
                raise _bad(env_value, part, f"'{need}=' is missing")
        try:
            rank = int(kv.pop("rank"))
        except ValueError:
            raise _bad(env_value, part, "rank is not an integer") from None
        if rank < 0:
            raise _bad(env_value, part, "rank must be >= 0")
        steps = _steps(env_value, part, kv.pop("steps"))
        args: Dict[str, object] = {}
        for name, (typ, default) in KINDS[kind].items():
            raw = kv.pop(name, None)
            if raw is None:
                args[name] = default
                continue
            try:
                args[name] = typ(raw)
            except ValueError:
                raise _bad(env_value, part, f"{name}={raw!r} is not a {typ.__name__}") from None
        if kv:
            raise _bad(env_value, part, f"unknown argument(s) {', '.join(sorted(kv))} for kind {kind!r}")
        if kind == "spike" and not args["factor"] > 0:
            raise _bad(env_value, part, "factor must be > 0")
        if kind == "sleep":
            given = [k for k in ("seconds", "fraction") if args[k] is not None]
            if len(given) != 1:
                raise _bad(env_value, part, "sleep takes exactly one of seconds=S, fraction=F")
            if not args[given[0]] >= 0:
                raise _bad(env_value, part, f"{given[0]} must be >= 0")
        faults.append(Fault(kind, rank, steps, args))
    return faults


_cache: tuple = (None, [])  # (the variable's value, its faults)


def from_env() -> List[Fault]:
    """The faults of the current ``MEGATRON_EXT_FAULT_INJECT`` (parsed once per value)."""
    global _cache
    value = os.environ.get(ENV)
    if value != _cache[0]:
        _cache = (value, parse(value))
    return _cache[1]


def active(kind: str, rank: int, step: int) -> Optional[Fault]:
    """The fault of ``kind`` that ``MEGATRON_EXT_FAULT_INJECT`` sets for ``rank`` at ``step``, if any."""
    for f in from_env():
        if f.kind == kind and f.rank == rank and step in f.steps:
            return f
    return None


def inject_sleep(rank: int, step: int, monitor=None) -> float:
    """The ``sleep`` fault of ``rank`` at ``step``, if any: sleep (``fraction`` is relative to ``monitor``'s
    ``last_compute``, the straggler measurement), tell the monitor how long, return the seconds slept."""
    f = active("sleep", rank, step)
    if f is None:
        return 0.0
    if f.args.get("seconds") is not None:
        seconds = float(f.args["seconds"])
    else:
        seconds = float(f.args["fraction"]) * ((monitor.last_compute if monitor is not None else None) or 0.0)
    time.sleep(seconds)
    if monitor is not None:
        monitor.injected += seconds
    return seconds

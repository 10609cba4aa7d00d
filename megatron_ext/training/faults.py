"""Test-only fault injection: ``MEGATRON_EXT_FAULT_INJECT`` makes a chosen rank misbehave at chosen steps, so the
fault-tolerance paths (hang watchdog, straggler detection, ...) can be tested with real processes.

Syntax: semicolon-separated faults ``kind:rank=R:steps=S1,S2-S5[:arg=value]`` (steps are optimizer steps counted
from 1, as in metrics.jsonl; ``a-b`` is inclusive). Kinds in this build:

* ``sleep`` -- the rank sleeps in its compute at those steps, before the step's first collective: ``seconds=S``
  (a fixed time; a large value makes a hang), or ``fraction=F`` (F x the rank's own measured compute time of its
  previous step, without injected sleep: "this rank is F slower"; needs the straggler measurement,
  ``trainer.straggler_every_n_steps``).

Never set it in a real run. A bad value stops the run with one error naming the variable.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

from megatron_ext.errors import ConfigError

ENV = "MEGATRON_EXT_FAULT_INJECT"

# kind -> {arg: (type, required group)}; a kind takes exactly one of the args listed under "one_of" when set
_KINDS: Dict[str, Dict[str, object]] = {
    "sleep": {"args": {"seconds": float, "fraction": float}, "one_of": ("seconds", "fraction")},
}


@dataclass
class Fault:
    kind: str
    rank: int
    steps: Set[int]
    args: Dict[str, float] = field(default_factory=dict)


def _bad(value: str, why: str) -> ConfigError:
    return ConfigError(f"{ENV}={value!r}: {why}; expected semicolon-separated "
                       f"'kind:rank=R:steps=S1,S2-S5[:arg=value]' with kind one of {', '.join(sorted(_KINDS))} "
                       f"(a test-only variable, README 'Fault tolerance')")


def _steps(value: str, text: str) -> Set[int]:
    out: Set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise _bad(value, f"steps={text!r} is not a list of steps or ranges a-b") from None
        if a < 1 or b < a:
            raise _bad(value, f"steps={text!r}: steps count from 1 and a range a-b needs a <= b")
        out.update(range(a, b + 1))
    return out


def parse(env_value: Optional[str]) -> List[Fault]:
    """The faults of a ``MEGATRON_EXT_FAULT_INJECT`` value ([] for None or empty); ConfigError for a bad one."""
    faults: List[Fault] = []
    if not env_value or not env_value.strip():
        return faults
    for item in (s.strip() for s in env_value.split(";")):
        if not item:
            continue
        kind, *fields = item.split(":")
        if kind not in _KINDS:
            raise _bad(env_value, f"unknown fault kind {kind!r}")
        spec = _KINDS[kind]
        kv: Dict[str, str] = {}
        for f in fields:
            k, sep, v = f.partition("=")
            if not sep or not k or k in kv:
                raise _bad(env_value, f"{f!r} in {item!r} is not a single key=value")
            kv[k] = v
        if "rank" not in kv or "steps" not in kv:
            raise _bad(env_value, f"{item!r} needs rank=R and steps=...")
        try:
            rank = int(kv.pop("rank"))
        except ValueError:
            raise _bad(env_value, f"rank in {item!r} is not an integer") from None
        if rank < 0:
            raise _bad(env_value, f"rank in {item!r} must be >= 0")
        steps = _steps(env_value, kv.pop("steps"))
        args: Dict[str, float] = {}
        for k, v in kv.items():
            typ = spec["args"].get(k)  # type: ignore[union-attr]
            if typ is None:
                raise _bad(env_value, f"{kind} takes no argument {k!r} (it takes {', '.join(spec['args'])})")
            try:
                args[k] = typ(v)
            except ValueError:
                raise _bad(env_value, f"{k}={v!r} in {item!r} is not a number") from None
            if args[k] < 0:
                raise _bad(env_value, f"{k}={v!r} in {item!r} must be >= 0")
        one_of = spec.get("one_of")
        if one_of and sum(k in args for k in one_of) != 1:  # type: ignore[union-attr]
            raise _bad(env_value, f"{item!r} needs exactly one of {', '.join(one_of)}")  # type: ignore[arg-type]
        faults.append(Fault(kind, rank, steps, args))
    return faults


_cache: Optional[tuple] = None


def _faults() -> List[Fault]:
    global _cache
    value = os.environ.get(ENV)
    if _cache is None or _cache[0] != value:
        _cache = (value, parse(value))
    return _cache[1]


def active(kind: str, rank: int, step: int) -> Optional[Fault]:
    """The fault of ``kind`` injected on ``rank`` at ``step`` (environment variable ``MEGATRON_EXT_FAULT_INJECT``),
    or None."""
    for f in _faults():
        if f.kind == kind and f.rank == rank and step in f.steps:
            return f
    return None


def check() -> List[Fault]:
    """Parse the variable now (at start-up: a bad value stops the run before training)."""
    return _faults()


def inject_sleep(rank: int, step: int, monitor=None) -> float:
    """The ``sleep`` fault of ``rank`` at ``step``, if any: sleep (``fraction`` is relative to ``monitor``'s
    ``last_compute``, the straggler measurement), tell the monitor how long, return the seconds slept."""
    f = active("sleep", rank, step)
    if f is None:
        return 0.0
    if "seconds" in f.args:
        seconds = f.args["seconds"]
    else:
        seconds = f.args["fraction"] * ((monitor.last_compute if monitor is not None else None) or 0.0)
    time.sleep(seconds)
    if monitor is not None:
        monitor.injected += seconds
    return seconds

"""Data preparation that every rank runs: a user error on one rank becomes the same error on all of them.

A rank that raised while the others went on would leave them waiting in the next barrier or collective. With
:func:`collective_check` every rank runs the step, the outcomes are gathered (one ``all_gather_object`` over the
default group), and a ``MegatronExtError`` raised anywhere is raised everywhere -- on the other ranks with
``(reported by rank R)`` appended. Other exceptions are bugs and are not caught.
"""
from __future__ import annotations

from typing import Any, List, Tuple

import torch.distributed as dist

from megatron_ext.errors import ConfigError, DataError, MegatronExtError


def world() -> Tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(obj: Any) -> List[Any]:
    """``obj`` of every rank, in rank order (a collective: call on every rank)."""
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def collective_check(fn, *args, **kwargs):
    """Run ``fn`` on every rank; if it raises a user error on any rank, raise it on all ranks
    (so no rank is left waiting in a barrier)."""
    rank, size = world()
    if size == 1:
        return fn(*args, **kwargs)
    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except MegatronExtError as err:
        error = (type(err).__name__, str(err))
    errors = all_gather(error)
    for r, e in enumerate(errors):
        if e is not None:
            cls = ConfigError if e[0] == "ConfigError" else DataError
            raise cls(e[1] if r == rank else f"{e[1]} (reported by rank {r})")
    return result


__all__ = ["world", "all_gather", "collective_check"]

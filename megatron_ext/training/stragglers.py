"""Straggler detection: each rank's compute time per step, measured before it waits for the others.

A collective equalises wall time (the fast ranks wait for the slow one), so a rank's step time says nothing about
who is slow. Each rank measures its *compute*: the time from the start of the step to the moment it enters the
step's gradient reduction (DeepSpeed's backward epilogue at the gradient-accumulation boundary, where the
gradient all-reduce / ZeRO reduce starts), minus the time it spent in the step's token-count all-reduce
(``Trainer._global_batch``). Every ``trainer.straggler_every_n_steps`` steps the ranks all-gather these times (one
small collective) and rank 0 logs ``train/step_time_min``, ``train/step_time_max`` (the fastest and slowest rank's
mean compute time over those steps) and ``train/step_time_slowest_rank``; when the slowest rank's compute, step by
step, exceeded the median of the other ranks' by more than ``trainer.straggler_threshold`` in most of those steps
(its median per-step ratio over the window is above 1 + threshold: one noisy step does not count), a warning
names it.

Where it measures compute only: no pipeline engine (its schedule exchanges activations all through the step) and no
ZeRO-3 (parameters are gathered in the forward pass): both are refused when the key is set, and ``null`` (auto)
turns it off there. With tensor parallelism the TP all-reduces in forward and backward make the ranks of one TP
group wait for each other, so a slow rank shows up as its whole TP group (the warning then names one of them).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional

from megatron_ext.errors import ConfigError
from megatron_ext.training import faults  # (torch is imported where used: the config check imports this module)

log = logging.getLogger("megatron_ext")

AUTO_EVERY = 10  # trainer.straggler_every_n_steps=null where the measurement works


def resolve_every(cfg) -> int:
    """The gather interval: ``trainer.straggler_every_n_steps``, ``null`` = AUTO_EVERY where compute can be measured
    (no pipeline engine, ZeRO < 3), else 0 (off). Refuses an explicit value > 0 where it cannot work."""
    every = cfg.trainer.get("straggler_every_n_steps")
    m = cfg.model
    why = ""
    if m.pipeline_model_parallel_size > 1:
        why = (f"model.pipeline_model_parallel_size={m.pipeline_model_parallel_size}: the pipeline schedule exchanges "
               f"activations all through the step, so no rank's compute can be told from its waiting")
    elif m.zero_stage == 3:
        why = "model.zero_stage=3: ZeRO-3 gathers parameters in the forward pass, so compute includes waiting"
    if every is None:
        return 0 if why else AUTO_EVERY
    if every > 0 and why:
        raise ConfigError(f"trainer.straggler_every_n_steps={every} cannot work with {why}; set it to 0 or null")
    return int(every)


def _window_verdict(times: List[List[float]], threshold: float) -> Dict[str, Any]:
    """``times[rank][i]``: compute seconds of the window's steps. Returns min/max/slowest over the ranks' means and the
    straggler (the slowest rank on average, when its median over the steps of its time / the median of the other
    ranks' times is above 1 + threshold), or None."""
    world = len(times)
    means = [sum(t) / max(len(t), 1) for t in times]
    slowest = max(range(world), key=lambda r: means[r])
    out: Dict[str, Any] = {"min": min(means), "max": max(means), "slowest": slowest, "straggler": None,
                           "means": means}
    if world < 2:
        return out
    n = len(times[0])
    slow_steps = 0
    ratios = []
    for i in range(n):
        others = sorted(times[r][i] for r in range(world) if r != slowest)
        k = len(others)
        med = others[k // 2] if k % 2 else 0.5 * (others[k // 2 - 1] + others[k // 2])
        if med > 0:
            ratios.append(times[slowest][i] / med)
            if times[slowest][i] > (1.0 + threshold) * med:
                slow_steps += 1
    ratios.sort()
    median_ratio = (ratios[len(ratios) // 2] if len(ratios) % 2 else
                    0.5 * (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2])) if ratios else 0.0
    if median_ratio > 1.0 + threshold:
        others_mean = [means[r] for r in range(world) if r != slowest]
        out["straggler"] = {"rank": slowest, "slow_steps": slow_steps, "steps": n,
                            "mean": means[slowest], "others_median": sorted(others_mean)[len(others_mean) // 2],
                            "ratio": median_ratio}
    return out


class StragglerMonitor:
    """Per-rank compute time of each step, gathered every ``every`` steps (see the module docstring).

    The training thread calls ``step_begin(step)``; brackets the step's own collectives before the gradient reduction
    with ``wait_begin`` / ``wait_end``; the engine's
    backward epilogue calls ``compute_done()`` (``install``); ``step_end(step)`` returns the gathered metrics on a
    gather step (every rank; rank 0 also warns), else None.
    """

    def __init__(self, every: int, threshold: float, rank: int, world: int, device,
                 group=None):
        self.every, self.threshold, self.rank, self.world = every, threshold, rank, world
        self.device, self.group = device, group
        # on a GPU the host runs ahead of the kernels: the times come from CUDA events on the current stream
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.times: List[Any] = []  # per step: seconds (CPU), or CUDA events (start, done, [(wait start, end)])
        self._last: Any = None  # the previous step's record (for last_compute)
        self._t0: Any = 0.0
        self._wait: Any = 0.0
        self._done: Any = None
        self.injected = 0.0  # seconds of injected sleep in this step (faults.inject_sleep)
        self._step = 0
        self.warned: List[int] = []  # ranks named in a warning (one per gather)

    # ---------------------------------------------------------------- training-thread hooks
    def install(self, engine) -> None:
        """Time the entry into DeepSpeed's backward epilogue at the accumulation boundary (where the gradient
        reduction starts) as the end of the step's compute."""
        from megatron_ext.training.engine import deepspeed_internal  # start-up cost: not for the config check

        purpose = "measuring each rank's compute time before the gradient reduction (straggler detection)"
        original = deepspeed_internal(engine, "_backward_epilogue", purpose)
        boundary = deepspeed_internal(engine, "is_gradient_accumulation_boundary", purpose)

        def backward_epilogue(*args, **kwargs):
            if self._done is None and boundary():
                self.compute_done()
            return original(*args, **kwargs)

        engine._backward_epilogue = backward_epilogue

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        import torch

        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def step_begin(self, step: int) -> None:
        self._step = step
        self._wait, self._done, self.injected = ([] if self.cuda else 0.0), None, 0.0
        self._t0 = self._now()

    def wait_begin(self) -> Any:
        """Before one of the step's own collectives that precede the gradient reduction (the token count)."""
        return self._now()

    def wait_end(self, token: Any) -> None:
        """After it: its time is waiting, not compute."""
        if self.cuda:
            self._wait.append((token, self._now()))
        else:
            self._wait += time.perf_counter() - token

    def compute_done(self) -> None:
        self._done = self._now()

    def step_end(self, step: int) -> Optional[Dict[str, float]]:
        """Record this step's compute; on a gather step, all-gather the window and return ``step_time_min``,
        ``step_time_max``, ``step_time_slowest_rank`` (logged as ``train/...``)."""
        done = self._done if self._done is not None else self._now()
        if self.cuda:  # resolved at the gather (events need the kernels to have run)
            rec: Any = (self._t0, done, self._wait)
        else:
            rec = max(0.0, done - self._t0 - self._wait)
        self.times.append(rec)
        self._last = (rec, self.injected)
        if step % self.every:
            return None
        return self._gather(step)

    @staticmethod
    def _seconds(rec: Any) -> float:
        if isinstance(rec, float):
            return rec
        t0, done, waits = rec
        done.synchronize()
        wait_ms = sum(a.elapsed_time(b) for a, b in waits)
        return max(0.0, (t0.elapsed_time(done) - wait_ms) / 1000.0)

    @property
    def last_compute(self) -> Optional[float]:
        """The previous step's compute without injected sleep (``faults.inject_sleep``'s ``fraction``)."""
        if self._last is None:
            return None
        rec, injected = self._last
        return max(0.0, self._seconds(rec) - injected)

    # ---------------------------------------------------------------- the gather
    def _gather(self, step: int) -> Dict[str, float]:
        import torch
        import torch.distributed as dist

        local = torch.tensor([self._seconds(r) for r in self.times], dtype=torch.float64, device=self.device)
        self.times = []
        if self.world > 1:
            out = [torch.empty_like(local) for _ in range(self.world)]
            dist.all_gather(out, local, group=self.group)
            rows = [o.tolist() for o in out]
        else:
            rows = [local.tolist()]
        v = _window_verdict(rows, self.threshold)
        s = v["straggler"]
        if s is not None and self.rank == 0:
            self.warned.append(s["rank"])
            log.warning(
                "straggler: rank %d computed %.0f%% longer per step than the median of the other ranks (median "
                "per-step ratio over steps %d-%d; mean %.4f s vs %.4f s, compute before the gradient reduction; above "
                "the threshold in %d of %d steps; trainer.straggler_threshold=%g); check that rank's host (CPU/GPU "
                "clocks, other jobs, data loading)", s["rank"], 100 * (s["ratio"] - 1), step - s["steps"] + 1, step,
                s["mean"], s["others_median"], s["slow_steps"], s["steps"], self.threshold)
        return {"step_time_min": v["min"], "step_time_max": v["max"], "step_time_slowest_rank": float(v["slowest"])}


def for_trainer(trainer) -> Optional[StragglerMonitor]:
    """The monitor of a trainer's run, installed on its engine (None when off)."""
    cfg = trainer.cfg
    every = resolve_every(cfg)
    wants_fraction = any(f.kind == "sleep" and f.args.get("fraction") is not None for f in faults.from_env())
    if every <= 0:
        if wants_fraction:
            raise ConfigError(f"{faults.ENV}: a sleep fault with fraction=F needs the straggler measurement "
                              f"(trainer.straggler_every_n_steps > 0)")
        return None
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    mon = StragglerMonitor(every, float(cfg.trainer.straggler_threshold), trainer.rank, world, trainer.device)
    mon.install(trainer.engine)
    return mon

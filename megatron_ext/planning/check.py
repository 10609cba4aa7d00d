"""``trainer.plan_check``: the measured peak memory and collective bytes of a run, beside the plan's prediction.

The trainer (``PlanCheck``) measures on every rank over the first ``trainer.plan_check_steps`` training steps of
an invocation, from the second step on (the first builds state: optimizer moments, ZeRO buffers): the peak memory
(``measure.PeakMemory``: CPU the anonymous resident memory under exact malloc from after the engine build, plus
the tensors the build left; GPU the ``max_memory_allocated`` delta from before the build) over everything up to
the end of the window, and the bytes each rank passed to collectives inside the window's train steps per step by kind (``measure.CollectiveCounter``; validation,
checkpointing and the loss logging's sync are outside). Then one ``all_gather_object`` brings every rank's
figures to rank 0, which logs ``plan/measured_peak_bytes`` (the largest over the ranks) and
``plan/comm_bytes_<kind>`` (rank 0's), each rank's own as ``.../rank<r>``, and writes them all to
``<run_dir>/plan_check_step<step>.json``.

:func:`compare` sets measured figures beside predicted ones; the trainer calls it with the planner's prediction for
each rank (``predict``: ``planner.predicted_for_check``), and warns where they differ by more than ``TOLERANCE``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Dict, List, Optional

import torch.distributed as dist

from megatron_ext.errors import ConfigError
from megatron_ext.planning import planner
from megatron_ext.planning.measure import CollectiveCounter, PeakMemory, live_tensor_bytes
from megatron_ext.training.host_memory import exact_host_memory, restore_host_memory

log = logging.getLogger("megatron_ext")

TOLERANCE = 0.15  # the relative difference above which plan_check warns
# a communication kind whose measured and predicted bytes per step differ by less than this is in agreement:
# the scalars a step passes besides the model's traffic (the loss and overflow flags DeepSpeed reduces, the
# pipeline's tensor-meta messages, ZeRO 3's bookkeeping broadcasts: 8 bytes to a few KiB) are not modelled
SMALL_COMM_BYTES = 64 << 10


def compare(measured: Dict[str, Any], predicted: Dict[str, Any], tolerance: float = TOLERANCE) -> Dict[str, Any]:
    """``measured`` / ``predicted``: one rank's ``{"peak_bytes": int, "comm_bytes": {kind: bytes per step}}``.

    Returns ``{"rows": [{"what", "predicted", "measured", "ratio", "ok"}...], "warnings": [str...]}``: one row for
    the peak and one per communication kind either side names (a kind one side lacks counts as 0 there); ``ratio``
    = measured / predicted (None when predicted is 0 and measured is not); ``ok`` when the relative difference is
    at most ``tolerance``, or, for a communication kind, the absolute one is under ``SMALL_COMM_BYTES``."""
    rows: List[Dict[str, Any]] = []
    pairs = [("peak_bytes", predicted.get("peak_bytes"), measured.get("peak_bytes"))]
    pc, mc = predicted.get("comm_bytes") or {}, measured.get("comm_bytes") or {}
    pairs += [(f"comm_bytes_{k}", pc.get(k, 0), mc.get(k, 0)) for k in sorted(set(pc) | set(mc))]
    warnings = []
    for what, p, m in pairs:
        if p is None or m is None:
            continue
        p, m = float(p), float(m)
        ratio = m / p if p else (1.0 if m == 0 else None)
        small = what.startswith("comm_bytes_") and abs(m - p) < SMALL_COMM_BYTES
        ok = small or (ratio is not None and abs(ratio - 1.0) <= tolerance)
        rows.append({"what": what, "predicted": p, "measured": m, "ratio": ratio, "ok": ok})
        if not ok:
            warnings.append(f"{what}: measured {m:.4g} vs predicted {p:.4g} "
                            f"({'no prediction' if ratio is None else f'ratio {ratio:.3f}'}; tolerance "
                            f"{tolerance:.0%})")
    return {"rows": rows, "warnings": warnings}


def predict(cfg, rank: int) -> Optional[Dict[str, Any]]:
    """The planner's prediction for ``rank`` in compare()'s form (``planner.predicted_for_check``), or None (with
    a warning) when the planner does not model this run (e.g. Mega / Perceiver stacks)."""
    try:
        return planner.predicted_for_check(cfg, rank)
    except ConfigError as e:
        log.warning("plan_check rank %d: no prediction: %s", rank, e)
        return None


class PlanCheck:
    """The trainer's side of ``trainer.plan_check`` (module docstring)."""

    def __init__(self, device, steps: int):
        self.steps = int(steps)
        self.peak = PeakMemory(device)
        self.counter = None
        self.counted = 0
        self.done = False

    def before_build(self) -> None:
        """Before the model is built. GPU: the baseline (allocated bytes). CPU: glibc's malloc is set to hand
        freed blocks back for the measurement (``host_memory.exact_host_memory``; the trainer's setting returns
        after the window), so the resident set's peak is the bytes the run allocates, not what malloc keeps
        cached; the baseline comes after the build (:meth:`after_build`)."""
        if self.peak.device.type == "cuda":
            self.peak.start()
        else:
            self.exact_malloc = exact_host_memory()

    def after_build(self) -> None:
        """CPU: the baseline, once the engine is built: the resident set now, plus the bytes of every tensor the
        build left (weights, DeepSpeed's flat buffers and fp32 partitions; ``measure.live_tensor_bytes``) as held
        memory. What the build itself allocated besides tensors -- the Python modules DeepSpeed imports while it
        builds, gloo's buffers -- is not training state and is left out, like the CUDA context on GPU."""
        if self.peak.device.type != "cuda":
            self.peak.start(held_bytes=live_tensor_bytes())

    def step_context(self, step_index: int):
        """Context manager around train step ``step_index`` (1-based within the invocation): counts its
        collectives when it is in the window (steps 2 .. steps + 1)."""
        if self.done or step_index < 2:
            return contextlib.nullcontext()
        if self.counter is None:
            self.counter = CollectiveCounter()
        self.counted += 1
        return self.counter

    def due(self) -> bool:
        return not self.done and self.counted >= self.steps

    def measured(self) -> Dict[str, Any]:
        counts = self.counter.by_kind() if self.counter is not None else {}
        n = max(self.counted, 1)
        return {"peak_bytes": self.peak.peak_bytes(), "rss_peak_bytes": self.peak.rss_peak_bytes(),
                "file_growth_bytes": self.peak.file_growth_bytes(), "peak_reset": self.peak.reset, "steps": self.counted,
                "comm_bytes": {k: v / n for k, v in sorted(counts.items())},
                "comm_calls": {k: v / n for k, v in sorted(self.counter.calls.items())} if self.counter else {},
                "comm_bytes_by_function": {k: v / n for k, v in sorted(self.counter.by_function.items())}
                if self.counter else {}}

    def report(self, step: int, rank: int, cfg, exp) -> Dict[str, Any]:
        """Gather every rank's figures to rank 0, log them as metrics, write ``plan_check_step<step>.json``, and warn where the
        prediction (when there is one) differs by more than TOLERANCE. Every rank calls it (one collective)."""
        self.done = True
        mine = self.measured()
        if getattr(self, "exact_malloc", False):
            restore_host_memory()
        mine["exact_malloc"] = bool(getattr(self, "exact_malloc", False))
        mine["rank"] = rank
        predicted = predict(cfg, rank)
        if predicted is not None:
            verdict = compare(mine, predicted)
            for w in verdict["warnings"]:
                log.warning("plan_check rank %d: %s", rank, w)
            mine["predicted"], mine["compare"] = predicted, verdict
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        if rank != 0:
            return mine
        metrics: Dict[str, float] = {"plan/measured_peak_bytes": max(r["peak_bytes"] for r in everyone)}
        if all(r.get("predicted") for r in everyone):
            metrics["plan/predicted_peak_bytes"] = max(r["predicted"]["peak_bytes"] for r in everyone)
        for k, v in everyone[0]["comm_bytes"].items():
            metrics[f"plan/comm_bytes_{k}"] = v
        for r in everyone:
            metrics[f"plan/measured_peak_bytes/rank{r['rank']}"] = r["peak_bytes"]
            for k, v in r["comm_bytes"].items():
                metrics[f"plan/comm_bytes_{k}/rank{r['rank']}"] = v
        exp.log_metrics(step, metrics)
        for r in everyone:
            log.info("plan_check rank %d: measured peak %.1f MiB over %d steps%s | comm bytes per step: %s",
                     r["rank"], r["peak_bytes"] / 2**20, r["steps"],
                     "" if r["peak_reset"] else " (peak not resettable: since process start)",
                     ", ".join(f"{k} {v:.0f}" for k, v in r["comm_bytes"].items()) or "none")
        run_dir = getattr(exp, "run_dir", None)
        if run_dir and os.path.isdir(run_dir):
            with open(os.path.join(run_dir, f"plan_check_step{step}.json"), "w") as f:
                json.dump({"step": step, "ranks": everyone}, f, indent=1)
        return mine

    def announce(self, cfg, rank: int) -> List[str]:
        """At start-up (the trainer calls it right after the engine is built): rank 0 logs the plan's prediction for
        every rank, one line per pipeline stage (the ranks of a stage share it) -- peak bytes with the plan's
        breakdown (weights, gradients, masters, optimizer state, activations, ...) and the bytes per step passed to
        collectives by kind; or one line saying the planner does not model this run. Other ranks log nothing.
        Returns the lines logged."""
        if rank != 0:
            return []
        try:
            machine = planner.machine_of_run(cfg)
            pl = planner.plan(cfg, machine)
            tp, dp = int(pl.layout["tp"]), int(pl.layout["dp"])
            preds = [planner.predicted_for_check(cfg, st * tp * dp, machine)
                     for st in range(len(pl.bytes_per_rank["per_stage"]))]
        except ConfigError as e:
            lines = [f"plan_check: no prediction at start-up: the planner does not model this run ({e})"]
        else:
            lines = []
            where = "host memory of the process" if machine.cpu else "device memory"
            phases = pl.bytes_per_rank["peak_phase_per_stage"]
            for st, (parts, pred) in enumerate(zip(pl.bytes_per_rank["at_peak_per_stage"], preds)):
                first, last = st * tp * dp, (st + 1) * tp * dp - 1
                ranks = f"rank {first}" if first == last else f"ranks {first}-{last}"
                breakdown = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in parts.items() if v)
                comm = ", ".join(f"{k} {v}" for k, v in sorted(pred["comm_bytes"].items())) or "none"
                lines.append(f"plan_check prediction, {ranks} (stage {st}): peak {pred['peak_bytes'] / 2**20:.1f} MiB "
                             f"of {where} at the {phases[st]} ({breakdown} MiB) | comm bytes per step: {comm}")
        for line in lines:
            log.info("%s", line)
        return lines

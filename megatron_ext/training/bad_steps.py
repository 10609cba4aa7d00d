"""Bad steps: ``trainer.nan_policy`` (stop | skip), ``trainer.loss_spike_factor`` and ``trainer.skip_steps``.

A step is *bad* when its loss is not finite on some rank, when its gradient norm is not finite, or (with
``loss_spike_factor``) when its loss -- the mean over data parallel -- exceeds the factor times the running mean
of the last ``loss_spike_window`` good steps (no spike check until that window is full). With ``nan_policy=skip``
a bad step is skipped on every rank: the optimizer does not update (parameters, Adam moments and its step count
stay as they were), the LR scheduler does not step, the gradients are discarded and the RNG states go back to
where they were before the step, so the run goes on exactly as a run whose data never held that global batch.
More than ``max_consecutive_skips`` skipped steps in a row stop the run. With ``nan_policy=stop`` a bad step
detected here stops the run naming it (without a per-step check, ``stop`` finds a non-finite loss at the next
logged step, as before).

A skipped batch is identified by its range of consumed samples ``[start, end)`` (the data position): it is
recorded in ``metrics.jsonl`` (``train/skipped``, ``train/skipped_samples_start`` / ``_end``), in every later
checkpoint's ``meta.json`` (``bad_steps``) and in the run directory's ``skipped_batches.jsonl``. A resume -- also
from a checkpoint written before the bad step -- discards a recorded batch when the data reaches it, at the same
step, without computing it. ``trainer.skip_steps`` marks batches the same way by step number.

The decision needs the step's loss on the host before the update: with ``nan_policy=skip`` or a spike factor
every step costs one small all-reduce (one float per rank) and one host sync, after the last backward and
before ``engine.step()``.

How the update is dropped: DeepSpeed's ``engine.step()`` at the accumulation boundary calls the engine's
``_take_model_step``, which steps the optimizer and, unless the optimizer reports an overflow, the scheduler.
:func:`install_update_skip` wraps it: when ``engine.mext_skip_update`` is set, the optimizer's own overflow path
is forced (the path DeepSpeed takes for an fp16 overflow or a non-finite gradient norm: gradients -- ZeRO's
partitions included -- are cleared, no update), so the engine also skips the scheduler and counts the step. The
pipeline engine steps inside ``train_batch``: ``engine.mext_before_update`` (set by the trainer) runs the check
there, just before the update.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_ext.config.loader import parse_skip_steps
from megatron_ext.errors import CheckpointError, ConfigError, MegatronExtError
from megatron_ext.training.engine import deepspeed_internal

log = logging.getLogger("megatron_ext")

RUN_FILE = "skipped_batches.jsonl"


# ---------------------------------------------------------------------------------------------------- engine
@contextmanager
def _patched(obj: Any, **attrs: Any) -> Iterator[None]:
    """Set instance attributes for the duration (methods included: an instance attribute shadows the class's)."""
    missing = object()
    saved = {k: obj.__dict__.get(k, missing) for k in attrs}
    obj.__dict__.update(attrs)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is missing:
                obj.__dict__.pop(k, None)
            else:
                obj.__dict__[k] = v


def _overflow_forcer(engine):
    """A context-manager factory under which the engine's optimizer takes its overflow path on ``step()``: it
    clears the gradients without updating anything and reports ``overflow`` (so ``_take_model_step`` skips the
    scheduler). Raises ConfigError for an optimizer type this does not know."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    purpose = "trainer.nan_policy=skip (dropping a bad step's update)"
    if isinstance(opt, DeepSpeedZeroOptimizer):  # ZeRO 1/2: step() checks check_overflow() first
        deepspeed_internal(opt, "check_grad_overflow", purpose)
        deepspeed_internal(opt, "check_overflow", purpose)

        def force_overflow(partition_gradients=True):
            opt.overflow = True

        return lambda: _patched(opt, check_grad_overflow=True, check_overflow=force_overflow)
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):  # ZeRO 3: step() asks this before the norm
        deepspeed_internal(opt, "_overflow_check_and_loss_scale_update", purpose)
        deepspeed_internal(opt, "_loss_scale_update_and_overflow_cleanup", purpose)

        def overflow_check(update_scale=True):
            opt.overflow = True
            return opt._loss_scale_update_and_overflow_cleanup() if update_scale else True

        return lambda: _patched(opt, _overflow_check_and_loss_scale_update=overflow_check)
    if isinstance(opt, BF16_Optimizer):  # bf16 without ZeRO when DeepSpeed picks it (a DeepSpeed JSON's data_types)
        clear_hp = deepspeed_internal(opt, "clear_hp_grads", purpose)
        clear_lp = deepspeed_internal(opt, "clear_lp_grads", purpose)

        def bf16_skip(closure=None):  # its overflow branch, without computing the norm
            opt.overflow = True
            opt._global_grad_norm = float("inf")
            clear_hp()
            clear_lp()

        return lambda: _patched(opt, step=bf16_skip)
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(opt, (FP16_Optimizer, FP16_UnfusedOptimizer)):  # ZeRO 0 + bf16 (tested): its non-finite-norm branch
        skip = deepspeed_internal(opt, "_skip_invalid_grad_norm", purpose)

        def step(closure=None):
            # its loss-scale bookkeeping (iteration count; bf16's scale is static) as if the step never ran
            scale_cfg = getattr(opt, "loss_scale_config", None)
            saved = dict(vars(scale_cfg)) if hasattr(scale_cfg, "__dict__") else None
            skip()
            if saved is not None:
                vars(scale_cfg).update(saved)

        return lambda: _patched(opt, step=step)
    if isinstance(opt, torch.optim.Optimizer):  # ZeRO 0, fp32: the engine zeroes the gradients after step()
        return lambda: _patched(opt, step=lambda closure=None: None, overflow=True)
    raise ConfigError(f"trainer.nan_policy=skip: the optimizer {type(opt).__name__} (from DeepSpeed's engine) is "
                      f"not one whose update can be dropped; use trainer.nan_policy=stop")


def install_update_skip(engine) -> None:
    """``engine.mext_skip_update = True`` before ``engine.step()`` at an accumulation boundary drops that update
    (the module docstring says how). Also makes bf16 ZeRO 1/2 treat a non-finite gradient norm as an overflow, as
    DeepSpeed's other optimizers do (``check_grad_overflow``; one extra pass over the gradient partitions)."""
    original = deepspeed_internal(engine, "_take_model_step", "trainer.nan_policy=skip")
    forcer = _overflow_forcer(engine)
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(engine.optimizer, DeepSpeedZeroOptimizer):
        engine.optimizer.check_grad_overflow = True
    engine.mext_skip_update = False
    cls_step = type(engine)._take_model_step  # DeepSpeed's, without our fp32 clipping around it

    def take_model_step(*args, **kwargs):
        check = engine.__dict__.get("mext_before_update")
        if check is not None:  # the pipeline engine: the step's check runs here, inside its schedule
            check()
        if not engine.mext_skip_update:
            return original(*args, **kwargs)
        if hasattr(engine, "mext_grad_norm"):
            engine.mext_grad_norm = None
        with forcer():
            return cls_step(engine, *args, **kwargs)

    engine._take_model_step = take_model_step


# ---------------------------------------------------------------------------------------------------- records
def _record(step: int, start: int, end: int, reason: str) -> Dict[str, Any]:
    return {"step": int(step), "samples": [int(start), int(end)], "reason": str(reason)}


def _check_record(rec: Any, where: str) -> Dict[str, Any]:
    ok = (isinstance(rec, dict) and isinstance(rec.get("step"), int) and isinstance(rec.get("samples"), list)
          and len(rec["samples"]) == 2 and all(isinstance(x, int) for x in rec["samples"])
          and 0 <= rec["samples"][0] < rec["samples"][1] and isinstance(rec.get("reason", ""), str))
    if not ok:
        raise CheckpointError(f"{where}: expected a skipped-batch record {{\"step\": N, \"samples\": [start, end], "
                              f"\"reason\": \"...\"}}, got {str(rec)[:200]}")
    return _record(rec["step"], rec["samples"][0], rec["samples"][1], rec.get("reason", ""))


def read_run_file(path: str) -> List[Dict[str, Any]]:
    """The records of a run directory's ``skipped_batches.jsonl`` (a torn last line, from a crash while it was
    written, is ignored with a warning; any other bad line is an error naming the file and line)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if i >= len(lines) - 2 and not any(x.strip() for x in lines[i + 1:]):
                log.warning("%s: ignoring its incomplete last line %d (a crash while it was written)", path, i + 1)
                continue
            raise CheckpointError(f"{path}, line {i + 1}: not JSON") from None
        out.append(_check_record(rec, f"{path}, line {i + 1}"))
    return out


class BadSteps:
    """The per-run state of bad-step handling (the module docstring has the rules)."""

    def __init__(self, t, global_batch_size: int, rank: int, device: torch.device):
        self.policy = t.nan_policy
        self.factor = float(t.loss_spike_factor) if t.loss_spike_factor is not None else None
        self.window: deque = deque(maxlen=int(t.loss_spike_window))
        self.max_consecutive = int(t.max_consecutive_skips)
        self.gbs = global_batch_size
        self.rank = rank
        self.device = device
        # a per-step check (one host sync per step) only when something acts on it
        self.check_each_step = self.policy == "skip" or self.factor is not None
        self.records: List[Dict[str, Any]] = []  # every skipped batch of the run so far (checkpointed)
        self.pending: List[Dict[str, Any]] = []  # batches recorded as bad that the data has not reached yet
        self.consecutive = 0
        self.last_skipped = False  # the last step taken was skipped (its loss / grad norm are no state's)
        self.total_skipped = 0
        self.run_file: Optional[str] = None
        self._in_run_file: set = set()  # sample ranges the run file already lists (a resume does not repeat them)
        for s in parse_skip_steps(t.skip_steps):
            self.pending.append(_record(s, (s - 1) * global_batch_size, s * global_batch_size,
                                        "trainer.skip_steps"))

    # ------------------------------------------------------------------ start / checkpoint
    def start(self, run_dir: str, consumed: int, meta: Optional[Dict[str, Any]], own_run: bool) -> None:
        """After the restore: take the checkpoint's state (``meta['bad_steps']``) and, when resuming this run's own
        checkpoint, the run directory's records (they may be newer than the checkpoint); a fresh run puts an
        existing ``skipped_batches.jsonl`` aside (``skipped_batches.N.jsonl``)."""
        self.run_file = os.path.join(run_dir, RUN_FILE)
        saved = (meta or {}).get("bad_steps") or {}
        where = "meta.json bad_steps"
        if not isinstance(saved, dict):
            raise CheckpointError(f"{where}: expected an object, got {str(saved)[:100]}")
        known = [_check_record(r, where) for r in saved.get("skipped", [])]
        window = saved.get("loss_window", [])
        if not (isinstance(window, list) and all(isinstance(x, (int, float)) for x in window)):
            raise CheckpointError(f"{where}.loss_window: expected a list of numbers")
        self.window.extend(float(x) for x in window)
        self.consecutive = int(saved.get("consecutive", 0) or 0)
        self.total_skipped = len(known)
        if own_run:
            from_file = read_run_file(self.run_file)
            self._in_run_file = {tuple(r["samples"]) for r in from_file}
            known += from_file
        elif self.rank == 0 and os.path.exists(self.run_file):
            n = 1
            while os.path.exists(os.path.join(run_dir, f"skipped_batches.{n}.jsonl")):
                n += 1
            os.replace(self.run_file, os.path.join(run_dir, f"skipped_batches.{n}.jsonl"))
        seen = set()
        for rec in known:
            key = tuple(rec["samples"])
            if key in seen:
                continue
            seen.add(key)
            if rec["samples"][0] < consumed:
                self.records.append(rec)  # in the past of this run
            else:
                self.pending.append({**rec, "reason": f"recorded: {rec['reason']}"})
        self.pending.sort(key=lambda r: r["samples"][0])
        for rec in self.pending:
            if rec["samples"][1] > consumed and rec["reason"] != "trainer.skip_steps":
                log.info("bad steps: the batch of samples [%d, %d) (step %d: %s) will be skipped when the data "
                         "reaches it", rec["samples"][0], rec["samples"][1], rec["step"], rec["reason"])

    def state(self) -> Dict[str, Any]:
        """What a checkpoint keeps (``meta.json`` ``bad_steps``)."""
        return {"skipped": list(self.records), "loss_window": list(self.window), "consecutive": self.consecutive}

    # ------------------------------------------------------------------ the loop
    def recorded(self, consumed: int) -> Optional[str]:
        """Why the next global batch (samples ``[consumed, consumed + gbs)``) is to be discarded without computing
        it (it overlaps a recorded bad batch or a ``trainer.skip_steps`` step), else None."""
        end = consumed + self.gbs
        while self.pending and self.pending[0]["samples"][1] <= consumed:
            self.pending.pop(0)
        for rec in self.pending:
            if rec["samples"][0] >= end:
                break
            return rec["reason"]
        return None

    def verdict(self, step: int, local_loss: Optional[torch.Tensor], grad_norm: Optional[torch.Tensor]
                ) -> Tuple[Optional[str], float]:
        """Whether step ``step`` is bad: every rank's loss (this rank's mean micro-batch loss; None on a pipeline
        stage that computes none) and the gradient norm when given (the same on every rank) come to every host in one
        all-reduce. Returns (why it is bad or None, the step's loss averaged over the ranks that have one = over data
        parallel). Raises with ``nan_policy=stop``."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        v = torch.zeros(world + 2, dtype=torch.float64, device=self.device)
        if local_loss is not None:
            v[self.rank] = local_loss.detach().double().reshape(())
            v[world + 1] = 1.0
        if grad_norm is not None:
            v[world] = grad_norm.detach().double().reshape(()) / world
        if world > 1:
            dist.all_reduce(v)
        host = v.tolist()
        losses, norm = host[:world], host[world]
        bad = [r for r, x in enumerate(losses) if not math.isfinite(x)]
        mean = sum(losses) / max(host[world + 1], 1.0)
        why = None
        if bad:
            why = "the loss is not finite on rank " + ", ".join(f"{r} ({losses[r]})" for r in bad)
        elif grad_norm is not None and not math.isfinite(norm):
            why = f"the gradient norm is {norm}"
        elif self.factor is not None and len(self.window) == self.window.maxlen:
            running = sum(self.window) / len(self.window)
            if mean > self.factor * running:
                why = (f"loss spike: {mean:.6g} > trainer.loss_spike_factor={self.factor:g} x the running mean "
                       f"{running:.6g} of the last {len(self.window)} steps")
        if why and self.policy == "stop":
            raise MegatronExtError(f"step {step}: {why}; trainer.nan_policy=stop stops the run (nan_policy=skip "
                                   f"skips such a step)")
        return why, mean

    def check_consecutive(self, step: int, reason: str) -> None:
        """Stop the run (after the skip was recorded and logged) when more than ``max_consecutive_skips`` computed
        steps in a row were bad."""
        if self.consecutive > self.max_consecutive:
            first = step - self.consecutive + 1
            raise MegatronExtError(
                f"steps {first}-{step}: {self.consecutive} consecutive steps were bad (the last: {reason}), more than "
                f"trainer.max_consecutive_skips={self.max_consecutive}; stopping. Skipped batches are listed in "
                f"{self.run_file}; lower model.optim.lr, or resume from an earlier checkpoint with trainer.skip_steps")

    def good(self, loss: Optional[float]) -> None:
        """A step that was taken (``loss``: its checked loss, None when steps are not checked)."""
        if loss is not None:
            self.window.append(loss)
        self.consecutive = 0
        self.last_skipped = False

    def skipped(self, step: int, start: int, reason: str, computed: bool) -> Dict[str, Any]:
        """Record step ``step`` (samples ``[start, start + gbs)``) as skipped; ``computed``: it ran and was bad
        (counts towards ``max_consecutive_skips``), else it was discarded unread as recorded. Returns the metrics."""
        rec = _record(step, start, start + self.gbs, reason.removeprefix("recorded: "))
        self.records.append(rec)
        self.total_skipped += 1
        self.last_skipped = True
        if self.rank == 0 and self.run_file is not None and tuple(rec["samples"]) not in self._in_run_file:
            with open(self.run_file, "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if self.rank == 0:
            log.warning("step %d skipped (samples [%d, %d)): %s%s", step, start, start + self.gbs, reason,
                        "" if computed else " (not computed)")
        if computed:
            self.consecutive += 1
        return {"train/skipped": 1.0, "train/skipped_samples_start": float(start),
                "train/skipped_samples_end": float(start + self.gbs), "train/skipped_total": float(self.total_skipped)}

"""Loading a training run back (seed 003's ``model_explorer.get_model_by_timestamp`` / ``verify_stable_load``).

    lm, data, train_stats, params = load_run("experiments/megatron_gpt/2026-11-23_10-00-00")
    lm, data, train_stats, params = get_model_by_timestamp("2026-11-23_10-00-00")   # searched under experiments/
    report = verify_stable_load(run_dir)   # the reloaded model reproduces the logged val/loss, deterministically

``lm``: an :class:`~megatron_ext.inference.lm.LM` from the run's newest complete checkpoint (any TP / PP / ZeRO
layout, consolidated in this process at TP=1). ``data``: a :class:`RunData` with ``train_dataloader(batch_size)``,
``val_dataloader(batch_size)``, ``test_dataloader(batch_size)`` and ``show_sample(i)``, built from the run's own
data config (same splits and seeds). ``train_stats``: ``{metric: [(step, value), ...]}`` from ``metrics.jsonl``.
``params``: the run's resolved config as a dict.

``validation_loss`` recomputes what the trainer logs as ``val/loss``: the token-weighted mean of the per-token loss
over the first ``trainer.limit_val_batches`` global batches of the validation split (the same batches at every
evaluation). Runs trained in bf16/fp16 logged a loss computed in that precision, while the reloaded model runs in
fp32: compare those with a looser ``atol``.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Dict, Optional, Tuple

import torch
from omegaconf import OmegaConf

from megatron_ext.config.loader import check_schema
from megatron_ext.data.samplers import build_pretraining_dataloader
from megatron_ext.errors import CheckpointError
from megatron_ext.inference.inspection import load_metrics
from megatron_ext.inference.lm import LM
from megatron_ext.models.families import get_family
from megatron_ext.training.bart_task import BARTTask
from megatron_ext.training.gpt_task import GPTTask

#: the training task of each model family (the names of megatron_ext.models.families.FAMILIES)
TASKS = {"gpt": GPTTask, "mega": GPTTask, "encdec": BARTTask}


def _typed(lm):
    return check_schema(OmegaConf.create(lm.config), get_family(lm.family).schema)


def _task(lm):
    cfg = _typed(lm)
    task = TASKS[lm.family](cfg, lm.device)  # built as training built it (the LM's config names its tokenizer file)
    task.model = lm.model
    return task


def _num_samples(cfg, with_test: bool = False) -> Tuple[int, int, int]:
    """The (train, valid, test) sample counts the trainer asked for, so the validation (and test) index is the same
    one (``with_test``: the test split too; of the validation size when the run evaluated none, for browsing)."""
    t, m = cfg.trainer, cfg.model
    val = max(1, t.limit_val_batches) * m.global_batch_size
    train = 0 if t.limit_train_batches == 0 else t.max_steps * m.global_batch_size
    limit_test = t.get("limit_test_batches")
    test = (max(1, t.limit_val_batches) if limit_test is None else int(limit_test)) * m.global_batch_size
    return train, val, (test or val) if with_test else 0


class RunData:
    """The run's datasets (built lazily, the run's splits and seeds) as DataLoaders of any batch size."""

    def __init__(self, lm):
        self.lm = lm
        self._sets = None

    def _datasets(self):
        if self._sets is None:
            task = _task(self.lm)
            self._sets = task.build_datasets(_num_samples(task.cfg, with_test=True))
        return self._sets

    def _dataset(self, idx: int, name: Optional[str] = None):
        """The split's dataset; with several named datasets (``model.data.data_prefix`` dict form) the one called
        ``name``."""
        split = ("train", "validation", "test")[idx]
        ds = self._datasets()[idx]
        if ds is None:
            raise ValueError(f"this run has no {split} split (model.data.data_prefix / splits_string)")
        if isinstance(ds, dict):
            if name not in ds:
                raise ValueError(f"this run has several {split} datasets: {', '.join(ds)}; pass name=<one of them>"
                                 + (f" (not {name!r})" if name is not None else ""))
            return ds[name]
        return ds

    def _loader(self, idx: int, batch_size: int, name: Optional[str] = None):
        return torch.utils.data.DataLoader(self._dataset(idx, name), batch_size=int(batch_size), shuffle=False)

    def train_dataloader(self, batch_size: int = 8):
        return self._loader(0, batch_size)

    def val_dataloader(self, batch_size: int = 8, name: Optional[str] = None):
        return self._loader(1, batch_size, name)

    def test_dataloader(self, batch_size: int = 8, name: Optional[str] = None):
        return self._loader(2, batch_size, name)

    def show_sample(self, i: int, split: str = "val", name: Optional[str] = None) -> str:
        idx = {"train": 0, "val": 1, "test": 2}.get(split)
        if idx is None:
            raise ValueError(f"split={split!r}: expected train, val or test")
        sample = self._dataset(idx, name)[int(i)]
        key = "tokens" if "tokens" in sample else "text_enc"
        text = self.lm.decode([int(t) for t in sample[key]])
        print(text)
        return text


def resolve_run(run: str, exp_dir: Optional[str] = None) -> str:
    """A run directory, or a version / timestamp searched as ``<exp_dir>/*/<run>`` (exp_dir default
    ``experiments``)."""
    if os.path.isdir(run) and (os.path.isfile(os.path.join(run, "config.yaml")) or
                               os.path.isdir(os.path.join(run, "checkpoints"))):
        return os.path.abspath(run)
    base = exp_dir or "experiments"
    hits = sorted(glob.glob(os.path.join(base, "*", run)))
    hits = [h for h in hits if os.path.isdir(h)]
    if not hits:
        raise CheckpointError(f"no run {run!r}: not a run directory, and no {base}/*/{run} (pass exp_dir=...)")
    if len(hits) > 1:
        raise CheckpointError(f"run {run!r} is ambiguous: {', '.join(hits)}; pass the run directory")
    return os.path.abspath(hits[0])


def load_run(run: str, exp_dir: Optional[str] = None, *, map_location="cpu"):
    """``(lm, data, train_stats, params)`` of a run directory or timestamp (see the module docstring)."""
    run_dir = resolve_run(run, exp_dir)
    lm = LM.restore_from(run_dir, map_location=map_location)
    lm.info["run_dir"] = run_dir
    stats = load_metrics(run_dir) if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")) else {}
    return lm, RunData(lm), stats, dict(lm.config)


def get_model_by_timestamp(timestamp: str, exp_dir: Optional[str] = None, *, map_location="cpu"):
    """Seed 003's name for :func:`load_run` with a version / timestamp."""
    return load_run(timestamp, exp_dir, map_location=map_location)


@torch.no_grad()
def validation_loss(lm, num_global_batches: Optional[int] = None) -> float:
    """The trainer's ``val/loss`` recomputed for ``lm`` (its run config: splits, seeds, batch sizes)."""
    task = _task(lm)
    cfg = task.cfg
    n = int(num_global_batches if num_global_batches is not None else max(1, cfg.trainer.limit_val_batches))
    val_ds = task.build_datasets(_num_samples(cfg))[1]
    if val_ds is None:
        raise CheckpointError("this run has no validation split (model.data.data_prefix / splits_string)")
    mbs, gbs = int(cfg.model.micro_batch_size), int(cfg.model.global_batch_size)
    was = lm.model.training
    lm.model.eval()
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for ds in (val_ds.values() if isinstance(val_ds, dict) else [val_ds]):  # several: token-weighted over all
        loader = build_pretraining_dataloader(ds, consumed_samples=0, micro_batch_size=mbs, dp_rank=0, dp_size=1,
                                              num_workers=0)
        it = iter(loader)
        for _ in range(n * (gbs // mbs)):
            batch = {k: (v.to(lm.device) if isinstance(v, torch.Tensor) else v) for k, v in next(it).items()}
            loss, ntok, _ = task.loss(lm.model, batch)
            total += float(loss) * float(ntok)
            count += float(ntok)
    lm.model.train(was)
    return (total / count.clamp(min=1.0)).item()


def verify_stable_load(run: str, exp_dir: Optional[str] = None, *, atol: float = 1e-5) -> Dict[str, Any]:
    """Reload a run's newest checkpoint and check that it reproduces the ``val/loss`` logged at that step (within
    ``atol``) and that two evaluations agree exactly. Returns the figures; raises ``CheckpointError`` otherwise."""
    lm, _, stats, _ = load_run(run, exp_dir)
    step = int(lm.info.get("step", 0))
    logged = [v for s, v in stats.get("val/loss", []) if int(s) == step]
    if not logged:
        raise CheckpointError(f"{lm.info.get('run_dir')}: no val/loss logged at the checkpoint's step {step} "
                              f"(set trainer.val_check_interval to a divisor of the checkpoint interval)")
    first = validation_loss(lm)
    second = validation_loss(lm)
    report = {"step": step, "logged_val_loss": logged[-1], "reloaded_val_loss": first,
              "abs_diff": abs(first - logged[-1]), "deterministic": first == second,
              "checkpoint": lm.info.get("checkpoint")}
    if not report["deterministic"]:
        raise CheckpointError(f"reloaded model is not deterministic: val/loss {first} then {second}")
    if report["abs_diff"] > atol:
        raise CheckpointError(f"reloaded model gives val/loss {first:.8f} but {logged[-1]:.8f} was logged at step "
                              f"{step} (|diff| {report['abs_diff']:.2e} > atol {atol:g})")
    return report


__all__ = ["load_run", "get_model_by_timestamp", "verify_stable_load", "validation_loss", "RunData", "resolve_run"]

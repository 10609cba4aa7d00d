"""NeMo / Lightning trainer keys that count in epochs and fractions, resolved to the step counts the loop runs on.

``trainer.max_epochs`` (with ``trainer.max_steps=-1``, or both: the first reached stops), a float
``trainer.val_check_interval`` (a fraction of an epoch), a float ``trainer.limit_val_batches`` (a fraction of the
validation split), a float ``trainer.limit_train_batches`` (0.0: evaluation only; else each epoch is that fraction of
its steps) and ``trainer.fast_dev_run``.

**One epoch** is one pass over the train split: the samples in one epoch of the built train dataset, divided by
``model.global_batch_size`` and rounded down (:func:`samples_per_epoch`):

* GPT (``.bin/.idx``, megatron-core ``GPTDataset``): the tokens of the train split's documents minus the one extra
  token a sample reads, divided by ``seq_length`` -- the count megatron-core builds for ``num_samples=None``; a blend
  (``BlendedDataset``) sums its datasets' epochs (every document of every dataset once);
* BART: the chunks of the train split's documents (a ``BARTDataset`` epoch visits each once), summed over a blend;
* synthetic tasks: ``model.data.task_params.num_train`` (a task drawn on the fly has no epoch: refused);
* any other dataset that defines ``samples_per_epoch`` (an int).

The epoch is measured on a small first build of the datasets (one global batch of train, and of validation when
its size is a fraction); the datasets are then built for the resolved number of steps as usual. The resolved
values replace the keys in the run's config (``trainer.max_steps``, ``trainer.val_check_interval``,
``trainer.limit_val_batches`` become integers; the run directory's ``config.yaml`` shows them), so everything
downstream (LR schedule, sample counts, ``inference.runs``) sees plain step counts.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from omegaconf import open_dict

from megatron_ext.errors import ConfigError

log = logging.getLogger("megatron_ext")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return isinstance(v, float)


def fast_dev_run_steps(t) -> int:
    """``trainer.fast_dev_run``: false/0 -> 0, true -> 1, N -> N."""
    v = t.get("fast_dev_run", False)
    if v is True:
        return 1
    if v is False or v is None:
        return 0
    return int(v)


def check_config(t) -> None:
    """Types and ranges of the keys (ConfigError naming the key); run in ``config.loader.validate_config``."""
    ms, me = t.max_steps, t.get("max_epochs")
    fdr = t.get("fast_dev_run", None)
    if not (fdr is None or isinstance(fdr, bool) or (_is_int(fdr) and fdr >= 0)):
        raise ConfigError(f"trainer.fast_dev_run={fdr!r}: expected null, true/false or an integer N >= 0 (N train "
                          f"steps and N validation batches, no checkpoints or loggers)")
    if me is not None and not (_is_int(me) and me >= 1):
        raise ConfigError(f"trainer.max_epochs={me!r}: expected null or an integer >= 1")
    if not _is_int(ms) or not (ms > 0 or ms == -1):
        raise ConfigError(f"trainer.max_steps={ms!r}: expected an integer > 0, or -1 (no step limit: then "
                          f"trainer.max_epochs must be set)")
    if ms == -1 and me is None and not fast_dev_run_steps(t):
        raise ConfigError("trainer.max_steps=-1 (no step limit) needs trainer.max_epochs (or trainer.fast_dev_run); "
                          "set one of them, or a positive trainer.max_steps")
    v = t.val_check_interval
    if not ((_is_int(v) and v >= 0) or (_is_float(v) and 0 < v <= 1)):
        raise ConfigError(f"trainer.val_check_interval={v!r}: expected an integer number of steps >= 0 (0 = never) "
                          f"or a float in (0, 1] (a fraction of an epoch: 1.0 = after every epoch)")
    lv = t.limit_val_batches
    if not ((_is_int(lv) and lv >= 0) or (_is_float(lv) and 0 <= lv <= 1)):
        raise ConfigError(f"trainer.limit_val_batches={lv!r}: expected an integer number of global batches >= 0 or "
                          f"a float in [0, 1] (a fraction of the validation split)")
    lt = t.limit_train_batches
    if not (lt is None or (_is_int(lt) and lt >= 0) or (_is_float(lt) and 0 <= lt <= 1)):
        raise ConfigError(f"trainer.limit_train_batches={lt!r}: expected null, an integer >= 0 (0 = evaluation only, "
                          f"N = at most N steps in this run) or a float in [0, 1] (0.0 = evaluation only, else a "
                          f"fraction of each epoch)")
    if _is_float(lt) and 0 < lt < 1 and me is None:
        raise ConfigError(f"trainer.limit_train_batches={lt} (a fraction of each epoch) needs trainer.max_epochs; "
                          f"give an integer number of steps instead, or set trainer.max_epochs")


def apply_fast_dev_run(cfg) -> int:
    """``trainer.fast_dev_run`` (as Lightning): N train steps in this invocation, validation on N global batches
    after them, no checkpoints, no early stopping, no loggers but the console (no TensorBoard, W&B or
    metrics.jsonl). Rewrites the config accordingly; returns N (0 = off)."""
    n = fast_dev_run_steps(cfg.trainer)
    if not n:
        return 0
    t, em = cfg.trainer, cfg.exp_manager
    with open_dict(cfg):
        t.limit_train_batches = n
        t.limit_val_batches = n
        t.val_check_interval = n
        if t.max_steps != -1:
            t.max_steps = max(int(t.max_steps), n)
        em.create_checkpoint_callback = False
        em.create_tensorboard_logger = False
        em.create_wandb_logger = False
        em.create_early_stopping_callback = False
    log.info("trainer.fast_dev_run=%d: %d train steps, validation on %d global batches, no checkpoints, no "
             "loggers but the console", n, n, n)
    return n


def needs_epoch(cfg) -> bool:
    """Whether resolving the keys needs the size of an epoch (a first, small build of the datasets)."""
    t = cfg.trainer
    fname = cfg.exp_manager.checkpoint_callback_params.get("filename") or ""
    return (t.get("max_epochs") is not None or _is_float(t.val_check_interval)
            or (_is_float(t.limit_val_batches) and 0 < t.limit_val_batches)
            or (_is_float(t.get("limit_test_batches")) and 0 < t.limit_test_batches)
            or "{epoch" in fname)


def samples_per_epoch(ds: Any, key: str = "trainer.max_epochs") -> int:
    """Samples in one pass over ``ds``'s split (module docstring); ConfigError naming ``key`` when it has none."""
    if ds is None:
        raise ConfigError(f"{key}: the split is empty or not built (model.data.splits_string gives it no share)")
    if isinstance(ds, dict):  # several named validation / test sets, each evaluated on the same number of batches:
        return min(samples_per_epoch(d, key) for d in ds.values())  # the fraction of the smallest
    if type(ds).__name__ == "DocumentSegmentsDataset":  # reset_attention_mask's wrapper: the wrapped dataset's
        return samples_per_epoch(ds.dataset, key)
    own = getattr(ds, "samples_per_epoch", None)
    if own is not None and not callable(own):
        return int(own)
    name = type(ds).__name__
    if hasattr(ds, "_get_num_tokens_per_epoch") and hasattr(ds, "config"):  # megatron-core GPTDataset
        tokens = int(ds._get_num_tokens_per_epoch())
        extra = int(getattr(ds.config, "add_extra_token_to_sequence", True))
        return max(0, (tokens - extra) // int(ds.config.sequence_length))
    if name == "BlendedDataset" and hasattr(ds, "datasets"):
        return sum(samples_per_epoch(d, key) for d in ds.datasets)
    if name == "BARTDataset":
        return int(ds.num_chunks)
    if name == "BlendedBARTDataset":
        return sum(samples_per_epoch(d, key) for d in ds.datasets if d is not None)
    if name == "SyntheticDataset":
        n = ds.params.num_examples(ds.split)
        if not n:
            raise ConfigError(f"{key}: the synthetic task {ds.spec.name!r} draws its {ds.split} examples on the fly "
                              f"and has no epoch; set model.data.task_params.num_{ds.split} (a fixed split) or use "
                              f"trainer.max_steps / an integer step count")
        return int(n)
    raise ConfigError(f"{key}: cannot tell how many samples one epoch of a {name} holds (it defines no "
                      f"samples_per_epoch); use trainer.max_steps and integer step counts")


def resolve(cfg, train_ds: Any, val_ds: Any, test_ds: Any = None) -> Optional[dict]:
    """From a small first build (``train_ds``, ``val_ds``: see the module docstring): write the resolved integers
    into ``cfg.trainer``; returns what was resolved (for the log and the checkpoint's ``epoch``)."""
    t, gbs = cfg.trainer, int(cfg.model.global_batch_size)
    info: dict = {}
    me = t.get("max_epochs")
    eval_only = t.limit_train_batches == 0
    wants_train = not eval_only and (me is not None or _is_float(t.val_check_interval)
                                     or "{epoch" in (cfg.exp_manager.checkpoint_callback_params.get("filename") or ""))
    if wants_train:
        key = ("trainer.max_epochs" if me is not None else "trainer.val_check_interval"
               if _is_float(t.val_check_interval) else "exp_manager.checkpoint_callback_params.filename ({epoch})")
        samples = samples_per_epoch(train_ds, key)
        full = samples // gbs
        if full < 1:
            raise ConfigError(f"{key}: one epoch of the train split holds {samples} samples, less than one global "
                              f"batch (model.global_batch_size={gbs}); use more data or a smaller batch")
        steps = full
        lt = t.limit_train_batches
        if _is_float(lt) and 0 < lt < 1:
            steps = int(full * lt)
            if steps < 1:
                raise ConfigError(f"trainer.limit_train_batches={lt}: {lt} of the {full} steps of an epoch is less "
                                  f"than one step; use a larger fraction")
        info.update(epoch_samples=samples, steps_per_epoch=steps)
    with open_dict(cfg):
        if wants_train:
            steps = info["steps_per_epoch"]
            if me is not None:
                by_epochs = int(me) * steps
                t.max_steps = by_epochs if t.max_steps == -1 else min(int(t.max_steps), by_epochs)
                info["max_steps"] = int(t.max_steps)
            if _is_float(t.val_check_interval):
                t.val_check_interval = max(1, int(steps * t.val_check_interval))
                info["val_check_interval"] = int(t.val_check_interval)
            if _is_float(t.limit_train_batches) and t.limit_train_batches > 0:
                t.limit_train_batches = None  # the fraction is in the epoch's length now
        for name, ds, what in (("limit_val_batches", val_ds, "validation"), ("limit_test_batches", test_ds, "test")):
            frac = t.get(name)
            if not _is_float(frac):
                continue
            if frac == 0:
                t[name] = 0
                continue
            samples = samples_per_epoch(ds, f"trainer.{name}")
            n = int(samples // gbs * frac)
            if n < 1:
                raise ConfigError(f"trainer.{name}={frac}: {frac} of the {what} split ({samples} samples, "
                                  f"{samples // gbs} global batches of {gbs}) is less than one global batch; use "
                                  f"a larger fraction or more data")
            t[name] = n
            info[name] = n
        if _is_float(t.limit_train_batches) and t.limit_train_batches == 0:
            t.limit_train_batches = 0
        if t.max_steps == -1:  # fast_dev_run without epochs: its own step count
            t.max_steps = max(1, fast_dev_run_steps(t))
    if info:
        log.info("epochs: %s", ", ".join(f"{k} {v}" for k, v in info.items()))
    return info


def probe_sizes(cfg) -> tuple:
    """``num_samples`` for the small first build: one global batch of train (when an epoch of it is needed) and of
    validation (when its size is a fraction)."""
    t, gbs = cfg.trainer, int(cfg.model.global_batch_size)
    val = gbs if _is_float(t.limit_val_batches) and t.limit_val_batches > 0 else 0
    lt = t.get("limit_test_batches")
    return gbs, val, gbs if _is_float(lt) and lt > 0 else 0

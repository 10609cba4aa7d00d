"""The training loop: a task (what to build, how to compute the loss) driven over a DeepSpeed engine.

One optimizer step consumes one *global batch* = micro_batch_size x data_parallel_size x accumulation
micro-batches; DeepSpeed accumulates gradients over the micro-batches (scaling each backward by
1/accumulation), clips, and steps the optimizer and LR scheduler at the boundary.

The loss is token-weighted over the global batch: before the forward passes of a step the trainer counts the
loss tokens of all its micro-batches and all-reduces the count over data parallel (one collective), and every
micro-batch loss is its summed token loss divided by ``count / (accumulation x dp)``
(``modules.cross_entropy.loss_token_denominator``). DeepSpeed's averaging over micro-batches and ranks then gives
``train/loss = sum of token losses / count``, and the gradient is that loss's gradient. The pipeline engine gets
the same denominator with the labels. ``val/loss`` is token-weighted over all validation batches (of every
validation dataset: ``val/loss/<name>`` is each one's own); ``test/loss`` likewise over the test split, evaluated
once after training and in evaluation-only runs.

Losses stay on the device: the loop keeps each step's loss there and copies them to the host once per logged
step (and at a checkpoint step), all-reduced over data parallel in the same single collective; that copy also
detects a non-finite loss of any step since the previous one and stops the run naming that step. With
``trainer.nan_policy=skip`` or ``trainer.loss_spike_factor`` each step is checked before its update instead (one
small all-reduce and host sync per step) and a bad step is stopped at or skipped on every rank (``bad_steps.py``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from typing import Any, Dict, Iterator, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from megatron_ext.checkpoint import reshard
from megatron_ext.checkpoint.loader import load_weights_file
from megatron_ext.checkpoint.files import check_files, find_latest, list_complete, read_meta, resolve_ckpt_path
from megatron_ext.checkpoint.manifest import MANIFEST, config_hash
from megatron_ext.config.loader import Derived, check_config, validate_config
from megatron_ext.config.schema import GPTConfig
from megatron_ext.data.samplers import build_pretraining_dataloader
from megatron_ext.errors import CheckpointError, ConfigError, CorruptCheckpointError, MegatronExtError
from megatron_ext.modules.cross_entropy import loss_token_count, loss_token_denominator
from megatron_ext.parallel import state as pstate
from megatron_ext.parallel.random import get_all_rng_states, model_parallel_manual_seed, set_all_rng_states
from megatron_ext.planning.check import PlanCheck
from megatron_ext.training import faults, run_length, stragglers, watchdog
from megatron_ext.training.best import BestCheckpoints, EarlyStopping, check_logged, resolve_logged
from megatron_ext.training.bad_steps import BadSteps, install_update_skip
from megatron_ext.training.checkpointing import Checkpointer, LoadedState
from megatron_ext.training.engine import build_ds_config, build_engine, deepspeed_internal, model_parallel_grad_norm
from megatron_ext.training.exp_manager import ExpManager
from megatron_ext.training.host_memory import resolve_reuse_host_memory, reuse_host_memory
from megatron_ext.training.lr_schedulers import build_scheduler, config_state, keep_config_on_resume
from megatron_ext.training import preemption
from megatron_ext.training.optim import build_optimizer
from megatron_ext.training.throughput import peak_tflops

log = logging.getLogger("megatron_ext")


class Task(Protocol):
    """What a model family provides to the trainer (GPT, BART, ...)."""

    def build_model(self) -> torch.nn.Module: ...

    def build_datasets(self, num_samples: tuple[int, int, int]) -> tuple[Any, Any, Any]:
        """(train, valid, test): each None, a dataset, or (valid/test) an ordered ``{name: dataset}`` dict of
        datasets evaluated separately."""
        ...

    def loss(self, model, batch: Dict[str, torch.Tensor], denominator: Optional[torch.Tensor] = None
             ) -> tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
        """(loss to backprop: the summed token loss over ``batch["loss_mask"]`` divided by ``denominator``, by
        default this batch's loss-token count; the number of loss tokens; extras to log as ``train/<name>``,
        ``val/<name>`` and ``test/<name>``). An extra is a scalar (averaged over a step's micro-batches and DP ranks
        for ``train/``, token-weighted over the evaluated batches for ``val/`` and ``test/``) or a (numerator,
        denominator) pair (both summed, then divided)."""
        ...

    def flops_per_iteration(self, global_batch_size: int) -> float: ...

    def tokens_per_sample(self) -> int: ...


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    root = logging.getLogger()
    if not any(getattr(h, "_megatron_ext", False) for h in root.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%H:%M:%S"))
        h._megatron_ext = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(level)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "megatron", "megatron.core"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # DeepSpeed installs its own logger at INFO
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except Exception:
        pass


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    """{"a.b": value} of a nested dict (lists and scalars are leaves)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}." if isinstance(v, dict) and v else f"{prefix}{k}"))
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    model_parallel_manual_seed(seed)


class Trainer:
    def __init__(self, cfg: DictConfig, task_factory, schema=None):
        cfg = check_config(cfg, schema or GPTConfig)
        self.cfg = cfg
        run_length.apply_fast_dev_run(cfg)  # trainer.fast_dev_run: N steps, no checkpoints, no loggers
        t = cfg.trainer
        self.on_cuda = pstate.use_cuda(t.accelerator)
        # every config error before the process group starts (the launcher's environment gives the world size)
        self.derived: Derived = validate_config(cfg, pstate.read_dist_env().world_size, self.on_cuda)
        denv = pstate.initialize_parallel(
            cfg.model.tensor_model_parallel_size,
            cfg.model.pipeline_model_parallel_size,
            accelerator=t.accelerator,
            timeout_minutes=t.dist_timeout_minutes,
        )
        self.rank = denv.rank
        setup_logging(self.rank)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_cuda else torch.device("cpu")
        if resolve_reuse_host_memory(t.reuse_host_memory, self.on_cuda) and reuse_host_memory():
            log.info("host memory: glibc malloc keeps freed blocks for reuse (trainer.reuse_host_memory)")
        self.dp_rank, self.dp_size = pstate.data_parallel_info()
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        from megatron.core import parallel_state as ps

        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.pipeline = cfg.model.pipeline_model_parallel_size > 1
        # Megatron's offset: pipeline stages draw different dropout masks. Weights do not depend on it (models
        # initialise from trainer.seed per component, see models/gpt.py).
        seed_everything(t.seed + 100 * self.pp_rank)
        self.task = task_factory(cfg, self.device)
        restart = preemption.apply_restart(cfg)  # a restarted worker resumes from latest, in the same run directory
        self.exp = ExpManager(cfg, self.rank)
        if restart:
            log.info("%s: %s", restart, self.exp.run_dir)
        self.faults = faults.from_env()  # test-only (MEGATRON_EXT_FAULT_INJECT); a bad value stops here
        self.bad: Optional[BadSteps] = None
        self._restored_meta: Optional[Dict[str, Any]] = None
        self._resumed_own = False
        self._epoch: Dict[str, Any] = {}  # trainer.max_epochs & co. as resolved (training/run_length.py)
        self._early: Optional[EarlyStopping] = None
        self._val_at: tuple = (None, {})  # (step, metrics) of the last validation: a checkpoint of that step keeps them

    # ------------------------------------------------------------------ helpers
    def _num_samples(self) -> tuple[int, int, int]:
        """(train, valid, test) samples to build. Validation always reads the first ``limit_val_batches`` global
        batches of each validation dataset (the same batches every time, so val/loss is comparable across steps);
        the test split the first ``limit_test_batches`` (null: as many as validation) once, after training."""
        t, m = self.cfg.trainer, self.cfg.model
        test = self._limit_test_batches() * m.global_batch_size
        if t.limit_train_batches == 0:  # evaluation only
            return 0, max(1, t.limit_val_batches) * m.global_batch_size, test
        val = t.limit_val_batches * m.global_batch_size if t.val_check_interval else 0
        return t.max_steps * m.global_batch_size, val, test

    def _limit_test_batches(self) -> int:
        """``trainer.limit_test_batches`` (null: ``limit_val_batches``, at least 1 in an evaluation-only run)."""
        t = self.cfg.trainer
        n = t.get("limit_test_batches")
        if n is None:
            n = max(1, t.limit_val_batches) if t.limit_train_batches == 0 else t.limit_val_batches
        return int(n)

    def _dataloader(self, dataset, consumed: int):
        return build_pretraining_dataloader(
            dataset,
            consumed_samples=consumed,
            micro_batch_size=self.cfg.model.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            num_workers=self.cfg.model.data.num_workers,
        )

    def _iter(self, dataset, consumed: int) -> Iterator:
        """A batch iterator that leaves the global RNG alone: ``iter(DataLoader)`` draws a base seed from torch's
        default generator, which would shift dropout masks after a resume (the iterator is rebuilt there)."""
        with torch.random.fork_rng(devices=[]):
            return iter(self._dataloader(dataset, consumed))

    def _grad_norm(self) -> float:
        """The pre-clipping global grad norm of the last optimizer step: ours on the fp32 ZeRO-0 path
        (``engine.install_fp32_clipping``), DeepSpeed's for ZeRO and mixed precision."""
        if hasattr(self.engine, "mext_grad_norm"):
            gn = self.engine.mext_grad_norm
            if torch.is_tensor(gn):  # copied to the host by the step's one sync (``_sync``)
                gn = getattr(self, "_synced_grad_norm", None)
        else:
            gn = self.engine.get_global_grad_norm()
        if gn is None:
            return float("nan")
        return float(gn)

    def _to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _rng_states(self) -> Dict[str, Any]:
        return get_all_rng_states()

    # ------------------------------------------------------------------ build
    def _build(self):
        cfg = self.cfg
        self._plan_check = None
        if cfg.trainer.get("plan_check"):  # the peak's baseline: before the model is built (planning/check.py)
            self._plan_check = PlanCheck(self.device, cfg.trainer.plan_check_steps)
            self._plan_check.before_build()
        model = self.task.build_model().to(self.device)
        if cfg.model.ckpt_path and os.path.isfile(cfg.model.ckpt_path):
            info = load_weights_file(model, cfg.model.ckpt_path, cfg.model)
            self._loaded_step = int(info.get("step", 0))
            log.info("loaded consolidated weights from %s (step %d)", cfg.model.ckpt_path, self._loaded_step)
        optim_cfg = cfg.model.optim
        optimizer = build_optimizer(model, optim_cfg)
        sched_cfg = optim_cfg.get("sched", None)
        scheduler = build_scheduler(optimizer, sched_cfg, max_steps=cfg.trainer.max_steps) if sched_cfg else None
        ds_config = build_ds_config(
            micro_batch_size=cfg.model.micro_batch_size,
            global_batch_size=cfg.model.global_batch_size,
            accumulate_grad_batches=self.derived.accumulate_grad_batches,
            precision=self.derived.precision,
            zero_stage=cfg.model.zero_stage,
            gradient_clip_val=cfg.trainer.gradient_clip_val,
            deepspeed_config=cfg.model.deepspeed_config,
            offload_optimizer=cfg.model.offload_optimizer,
            offload_param=cfg.model.offload_param,
        )
        stage = ds_config["zero_optimization"]["stage"]
        if self.pipeline and stage >= 2:
            src = f"model.deepspeed_config ({cfg.model.deepspeed_config})" if cfg.model.deepspeed_config else \
                f"model.zero_stage={stage}"
            raise ConfigError(
                f"{src}: ZeRO stage {stage} cannot be combined with model.pipeline_model_parallel_size="
                f"{cfg.model.pipeline_model_parallel_size} (DeepSpeed's pipeline engine supports ZeRO 0 and 1); "
                f"use zero_stage 0 or 1, or pipeline_model_parallel_size=1"
            )
        self.engine, self.optimizer, self.scheduler = build_engine(model, optimizer, scheduler, ds_config)
        if self._plan_check is not None:
            self._plan_check.after_build()
        self.ds_config = ds_config
        if self._plan_check is not None:  # the plan's prediction for each rank, before the first step
            self._plan_check.announce(cfg, self.rank)
        t = cfg.trainer
        if t.nan_policy == "skip" or (self.pipeline and t.loss_spike_factor is not None):
            install_update_skip(self.engine)  # a bad step's update can be dropped / checked in the pipeline's schedule
        if self.pipeline and self.faults:  # test-only: the pipeline's last stage computes the loss in its loss_fn
            loss_fn = self.engine.module.loss_fn

            def injected_loss_fn(outputs, labels):
                loss = loss_fn(outputs, labels)
                return self._inject_faults(loss) if self.engine.module.training else loss

            self.engine.module.loss_fn = injected_loss_fn
        n_params = sum(p.numel() for p in model.parameters())
        log.info(
            "model: %.2fM parameters on this rank | world %d = tp %d x pp %d x dp %d | micro-batch %d, "
            "accumulation %d, global batch %d | precision %s | ZeRO stage %d",
            n_params / 1e6, self.derived.world_size, cfg.model.tensor_model_parallel_size,
            cfg.model.pipeline_model_parallel_size, self.dp_size, cfg.model.micro_batch_size,
            self.derived.accumulate_grad_batches, cfg.model.global_batch_size, self.derived.precision,
            ds_config["zero_optimization"]["stage"],
        )

    def _layout(self) -> Dict[str, Any]:
        m = self.cfg.model
        return {"tp": m.tensor_model_parallel_size, "pp": m.pipeline_model_parallel_size, "dp": self.dp_size,
                "zero_stage": self.ds_config["zero_optimization"]["stage"], "precision": self.derived.precision,
                "vocab_size": getattr(getattr(self.task, "tokenizer", None), "vocab_size", None)}

    def _meta(self, step: Optional[int] = None) -> Dict[str, Any]:
        from omegaconf import OmegaConf

        bad = {"bad_steps": self.bad.state()} if self.bad is not None else {}
        extra: Dict[str, Any] = {}  # for a checkpoint of ``step``:
        if step is not None and self._val_at[0] == step:  # this step validated (training/best.py)
            extra["val_metrics"] = dict(self._val_at[1])
        if self._epoch.get("steps_per_epoch") and step:
            extra["epoch"] = (int(step) - 1) // int(self._epoch["steps_per_epoch"])
        if self._early is not None:
            extra["early_stopping"] = self._early.state()
        return {**self._layout(), "model_config": OmegaConf.to_container(self.cfg.model, resolve=True), **bad,
                **extra}

    def _layout_change(self, meta: Dict[str, Any], with_optimizer: bool) -> list:
        """What differs between the layout that wrote ``meta`` and this run's, as far as DeepSpeed's own loader
        cares: TP and PP; with the optimizer state, also DP and the ZeRO stage when either side partitions it."""
        mine = self._layout()
        bad = [k for k in ("tp", "pp") if meta.get(k) != mine[k]]
        saved_zero = int(meta.get("zero_stage", 0) or 0)
        if with_optimizer and max(saved_zero, mine["zero_stage"]) > 0:
            bad += [k for k in ("dp", "zero_stage") if (saved_zero if k == "zero_stage" else meta.get(k)) != mine[k]]
        return bad

    def _check_layout(self, meta: Dict[str, Any], where: str, bad: list) -> None:
        """A layout change (``bad``) on a checkpoint without layout-free state (written by an older version):
        one error saying how to convert it."""
        if bad:
            mine = self._layout()
            names = {"tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size",
                     "dp": "data parallel size (with ZeRO-partitioned optimizer state)", "zero_stage": "zero_stage"}
            diff = ", ".join(f"{names[k]} {meta.get(k)} -> {mine[k]}" for k in bad)
            raise CheckpointError(
                f"{where} was saved with a different parallel layout ({diff}) and holds no layout-free state "
                f"({reshard.STATE_DIR}/: written from this version on, except for fp16/bf16 without ZeRO). Either "
                f"run with the saved layout, or convert it: `python "
                f"tools/convert_checkpoint.py --input {where} --output model.pt` writes one fp32 state dict that any "
                f"layout loads with model.ckpt_path=model.pt (weights only; the optimizer restarts), or add "
                f"`--target-tp T --target-pp P --output-dir DIR` to write a checkpoint directory for the new layout"
            )

    def _load_resharded(self, path: str, meta: Dict[str, Any], bad: list, model_only: bool):
        """Load ``path``'s layout-free state into this layout (``checkpoint.reshard``); restores the scheduler
        too unless ``model_only``. Returns (step, consumed samples)."""
        mine = self._layout()
        log.info("%s was written with tp %s, pp %s, dp %s, ZeRO %s; loading its layout-free state into tp %d, pp %d, "
                 "dp %d, ZeRO %d%s", path, meta.get("tp"), meta.get("pp"), meta.get("dp"), meta.get("zero_stage"),
                 mine["tp"], mine["pp"], mine["dp"], mine["zero_stage"], " (weights only)" if model_only else "")
        kw = self._reshard_kw()
        extra = reshard.load_state(self.engine, path, pipeline=kw["pipeline"], num_layers=kw["num_layers"],
                                   model_only=model_only)
        step, consumed = int(meta["step"]), int(meta["consumed_samples"])
        if not model_only:
            if self.scheduler is not None and extra.get("lr_scheduler") is not None:
                self.scheduler.load_state_dict(extra["lr_scheduler"])
            self.engine.global_steps = step
            self.engine.global_samples = consumed
        return step, consumed

    def _restore(self) -> tuple[int, int]:
        """Resume (exp_manager.resume_if_exists: this run's own latest checkpoint), start from the full state of
        another run's checkpoint (exp_manager.resume_from_checkpoint), or from model.ckpt_path's weights. Returns
        (step, consumed)."""
        em, m = self.cfg.exp_manager, self.cfg.model
        if em.resume_if_exists:
            tag = find_latest(self.exp.ckpt_dir)
            if tag is not None:
                if em.resume_from_checkpoint:
                    log.info("resume: %s holds this run's own checkpoints (latest %s); they win over "
                             "exp_manager.resume_from_checkpoint=%s, which only starts a run that has none",
                             self.exp.ckpt_dir, tag, em.resume_from_checkpoint)
                self._resumed_own = True
                return self._resume(self.exp.ckpt_dir, tag)
            if not em.resume_ignore_no_checkpoint and not em.resume_from_checkpoint:
                raise CheckpointError(
                    f"exp_manager.resume_if_exists=true but {self.exp.ckpt_dir} holds no complete checkpoint "
                    f"(set exp_manager.resume_ignore_no_checkpoint=true to start fresh)"
                )
            if not em.resume_from_checkpoint:
                log.info("no checkpoint in %s; starting fresh", self.exp.ckpt_dir)
        if em.resume_from_checkpoint:
            key = "exp_manager.resume_from_checkpoint"
            ckpt_dir, tag = resolve_ckpt_path(em.resume_from_checkpoint, key=key)
            # a step directory named on purpose is loaded or refused; a checkpoints directory's latest may fall
            # back to an older complete checkpoint of it, as a resume does
            named = os.path.abspath(em.resume_from_checkpoint) == os.path.join(ckpt_dir, tag)
            step, consumed = self._resume(ckpt_dir, tag, fallback=not named, key=key)
            self._loaded_step = step
            return step, consumed
        if m.ckpt_path and not os.path.isfile(m.ckpt_path):  # a file: consolidated weights, loaded in _build
            ckpt_dir, tag = resolve_ckpt_path(m.ckpt_path)
            path = os.path.join(ckpt_dir, tag)
            why = self._verify(path)
            if why:
                raise CorruptCheckpointError(f"model.ckpt_path: {why}")
            meta = read_meta(path)
            change = self._layout_change(meta, with_optimizer=False)
            if change and reshard.has_state(path):
                step, _ = self._load_resharded(path, meta, change, model_only=True)
            else:
                self._check_layout(meta, path, change)
                step = Checkpointer.load(self.engine, ckpt_dir, tag, load_optimizer=False).step
            log.info("loaded model weights from %s (step %d)", path, step)
            self._loaded_step = step
        return 0, 0

    def _verify(self, path: str) -> str:
        """Why checkpoint ``path`` must not be loaded ('' when it verifies): every rank checks the sizes against
        its manifest and hashes its share of the files (``verify_checksums``); the first reason, in rank order,
        reaches every rank."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        why = ""
        try:
            check_files(path, checksums=bool(self.cfg.exp_manager.checkpoint_callback_params.verify_checksums),
                        rank=self.rank, world=world)
        except CorruptCheckpointError as e:
            why = str(e)
        if world > 1:
            whys = [None] * world
            dist.all_gather_object(whys, why)
            why = next((w for w in whys if w), "")
        return why

    def _note_config_change(self, meta: Dict[str, Any], path: str) -> None:
        """One log line when the resolved model config differs from the checkpoint's (its manifest's config hash),
        naming up to 8 differing keys: a resume with changed settings is allowed, but said."""
        try:
            with open(os.path.join(path, MANIFEST)) as f:
                saved = json.load(f).get("config_hash")
        except (OSError, ValueError, AttributeError):
            return  # a legacy checkpoint (warned about already)
        mine = self._meta()["model_config"]
        if self.rank != 0 or saved == config_hash(mine):
            return
        old, new = _flatten(meta.get("model_config") or {}), _flatten(mine)
        keys = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
        shown = ", ".join(f"model.{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys[:8])
        more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
        log.info("resume: the model config differs from the one %s was saved with (config hash %s -> %s): %s%s",
                 path, str(saved)[:12], config_hash(mine)[:12], shown or "(meta.json holds no model_config)", more)

    def _resume(self, ckpt_dir: str, latest: str, fallback: bool = True, key: str = "") -> tuple[int, int]:
        """Load the full training state of ``ckpt_dir/latest`` -- or, with ``fallback``, when one of its files is
        truncated/corrupt/missing (a warning names it) the newest older complete checkpoint of ``ckpt_dir`` that
        verifies and loads. All ranks verify it together (``_verify``) and follow the same choice; a layout
        mismatch is not a corrupt file and stops at once. ``key`` names the config key that chose the checkpoint
        (exp_manager.resume_from_checkpoint) in errors."""
        configured = config_state(self.optimizer, self.scheduler)  # before any (maybe partial) load changes it
        older = [d for _, d in reversed(list_complete(ckpt_dir)) if d < latest] if fallback else []
        bad = []
        for tag in [latest] + older:
            path = os.path.join(ckpt_dir, tag)
            why = self._verify(path)
            if not why:
                meta = read_meta(path)
                change = self._layout_change(meta, with_optimizer=True)
                if change and not reshard.has_state(path):
                    self._check_layout(meta, path, change)
                self._note_config_change(meta, path)
                try:
                    if change:
                        step, consumed = self._load_resharded(path, meta, change, model_only=False)
                        st = LoadedState(step=step, consumed_samples=consumed, meta=meta)
                        mine = self._layout()
                        same_ranks = all(meta.get(k) == mine[k] for k in ("tp", "pp", "dp"))
                        rng = Checkpointer.load_rng(ckpt_dir, tag) if same_ranks else None
                        if not same_ranks:
                            log.info("resume: RNG states not restored (they belong to the ranks of another layout)")
                    else:
                        st = Checkpointer.load(self.engine, ckpt_dir, tag, load_optimizer=True)
                        rng = Checkpointer.load_rng(ckpt_dir, tag)
                except CorruptCheckpointError as e:
                    why = str(e)
                else:
                    for line in keep_config_on_resume(self.optimizer, self.scheduler, configured):
                        log.info("resume: the config overrides the restored optimizer/scheduler state: %s", line)
            if why:
                bad.append(why)
                if fallback:
                    log.warning("cannot resume from %s: %s; trying the previous complete checkpoint", path, why)
                continue
            if rng is not None:
                set_all_rng_states(rng)
            self._restored_meta = st.meta
            log.info("resumed from %s at step %d (%d samples consumed)", path, st.step, st.consumed_samples)
            return st.step, st.consumed_samples
        if not fallback:
            raise CorruptCheckpointError(f"{key}={os.path.join(ckpt_dir, latest)} cannot be loaded: {bad[0]}")
        raise CheckpointError(
            f"{key + ': ' if key else ''}no checkpoint in {ckpt_dir} could be loaded ({len(bad)} tried; newest: "
            f"{bad[0]}); move the broken step directories away"
            + ("" if key else ", or start fresh with exp_manager.overwrite=true")
        )

    def _nonfinite(self, loss: Optional[float]) -> str:
        """Why the state after this step must not become a checkpoint ('' when it may): a non-finite loss or
        pre-clipping grad norm of the step (when known; with fp16 loss scaling an overflow only skips the update),
        or a non-finite parameter on any rank (a huge update can overflow the weights from finite gradients)."""
        if self.derived.precision != "16" and not (self.bad is not None and self.bad.last_skipped):
            gn = getattr(self.engine, "mext_grad_norm", None) if hasattr(self.engine, "mext_grad_norm") \
                else self.engine.get_global_grad_norm()
            if loss is not None and not math.isfinite(loss):
                return f"the loss is {loss}"
            if gn is not None and not math.isfinite(float(gn)):
                return f"the grad norm is {float(gn)}"
        bad = torch.zeros((), dtype=torch.float32)
        for p in self.engine.module.parameters():
            t = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition
            t = p if t is None else t
            if t.numel() and not bool(torch.isfinite(t.detach()).all()):
                bad += 1
        if dist.is_initialized() and dist.get_world_size() > 1:
            bad = bad.to(self.device) if self.on_cuda else bad
            dist.all_reduce(bad)
        return f"{int(bad)} parameter tensors hold inf/nan" if int(bad) else ""

    def _save(self, ckpt: Checkpointer, step: int, consumed: int, loss: Optional[float]) -> None:
        """Write a checkpoint of this step unless its state is non-finite (then warn; ``latest`` stays put)."""
        why = self._nonfinite(loss)
        if why:
            log.warning("step %d: not writing a checkpoint because %s; 'latest' stays on %s", step, why,
                        find_latest(ckpt.ckpt_dir) or "(none)")
            return
        keep = self.cfg.exp_manager.checkpoint_callback_params.save_layout_free
        ckpt.save(self.engine, step, consumed, self._rng_states(), self._meta(step),
                  layout_free=self._save_layout_free(step, consumed) if keep else None)

    def _save_layout_free(self, step: int, consumed: int):
        """The hook ``Checkpointer.save`` calls (every rank, in the training thread) to collect the layout-free
        state it then writes (``checkpoint.reshard``)."""
        extra = {"step": step, "consumed_samples": consumed, "layout": self._layout()}
        return lambda: reshard.collect_state(self.engine, scheduler=self.scheduler, extra=extra,
                                             **self._reshard_kw())

    def _reshard_kw(self) -> Dict[str, Any]:
        """(pipeline stages map names by the GPT layer count; other families have no pipeline)"""
        return {"pipeline": self.pipeline, "num_layers": int(self.cfg.model.get("num_layers") or 0),
                "vocab_size": self._layout()["vocab_size"]}

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def validate(self, dataset, num_global_batches: int) -> Optional[float]:
        """Token-weighted ``val/loss`` over the first ``num_global_batches`` global batches of ``dataset`` (sum of
        token losses / loss tokens, over all of them and all DP ranks; a ``{name: dataset}`` dict: over the batches
        of every dataset); ``self._val_extras`` gets ``val/<name>``. Sums stay on the device and reach the host
        once per dataset."""
        if not self.evaluate(dataset, num_global_batches, "val"):
            return None
        combined = self._combined
        self._val_extras = {k: v for k, v in combined.items() if k not in ("val/loss", "val/ppl")}
        return combined["val/loss"]

    def evaluate(self, datasets, num_global_batches: int, prefix: str = "val") -> Dict[str, float]:
        """The metrics of one evaluation (``prefix`` ``val`` or ``test``) over the first ``num_global_batches``
        global batches of each dataset: ``<prefix>/loss`` token-weighted over all their batches, ``<prefix>/ppl``
        and each task extra ``<prefix>/<extra>`` (summed as in ``Task.loss``); with several datasets (a
        ``{name: dataset}`` dict) also ``<prefix>/loss/<name>``, ``<prefix>/ppl/<name>`` and
        ``<prefix>/<extra>/<name>`` per dataset. Empty when there is nothing to evaluate."""
        if datasets is None or num_global_batches <= 0:
            return {}
        named = datasets if isinstance(datasets, dict) else {None: datasets}
        total: Dict[str, list] = {}
        out: Dict[str, float] = {}
        for name, ds in named.items():
            sums = self._eval_sums(ds, num_global_batches)
            for k, (num, den) in sums.items():
                acc = total.setdefault(k, [0.0, 0.0])
                acc[0] += num
                acc[1] += den
            if name is not None and len(named) > 1:
                one = self._eval_metrics(sums, prefix)
                out.update({f"{k}/{name}": v for k, v in one.items()})
        self._combined = self._eval_metrics(total, prefix)
        return {**self._combined, **out}

    def _eval_metrics(self, sums: Dict[str, Any], prefix: str) -> Dict[str, float]:
        loss = sums["loss"][0] / max(sums["loss"][1], 1.0)
        extras = {f"{prefix}/{k}": num / max(den, 1.0) for k, (num, den) in sums.items() if k != "loss"}
        ppl = math.exp(min(extras.get(f"{prefix}/tokens_loss", loss), 50))
        return {f"{prefix}/loss": loss, f"{prefix}/ppl": ppl, **extras}

    @torch.no_grad()
    def _eval_sums(self, dataset, num_global_batches: int) -> Dict[str, tuple]:
        """``{"loss": (sum of token losses, loss tokens), <extra>: (numerator, denominator)}`` over the first
        ``num_global_batches`` global batches of ``dataset``, summed over DP ranks."""
        if self.pipeline:
            return self._validate_pipeline(dataset, num_global_batches)
        self.engine.eval()
        it = self._iter(dataset, 0)
        names: list = []
        total = None
        for _ in range(num_global_batches * self.derived.accumulate_grad_batches):
            batch = self._to_device(next(it))
            loss, ntok, extras = self.task.loss(self.engine, batch)
            if total is None:
                names = sorted(extras)
            ntok = ntok.detach().double()
            vals = [loss.detach().double() * ntok, ntok]
            for k in names:  # a scalar is token-weighted; a (numerator, denominator) pair is summed as such
                v = extras[k]
                vals += [v[0], v[1]] if isinstance(v, (tuple, list)) else [v.detach().double() * ntok, ntok]
            row = torch.stack([torch.as_tensor(x, device=self.device).double().reshape(()) for x in vals])
            total = row if total is None else total + row
        if self.dp_size > 1:
            from megatron.core import parallel_state as ps

            dist.all_reduce(total, group=ps.get_data_parallel_group())
        self.engine.train()
        host = total.tolist()
        return {"loss": (host[0], host[1]), **{k: (host[2 + 2 * i], host[3 + 2 * i]) for i, k in enumerate(names)}}

    @torch.no_grad()
    def _validate_pipeline(self, dataset, num_global_batches: int) -> Dict[str, tuple]:
        """Pipeline engine: each global batch's loss is token-weighted (the denominator travels with the labels,
        as in training); the batches are combined weighted by their loss tokens, as in ``_eval_sums``."""
        it = self._iter(dataset, 0)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for _ in range(num_global_batches):
            batches, count, denom = self._global_batch(it)
            out = self.engine.eval_batch(iter([self.task.pipeline_batch(b, denom) for b in batches]),
                                         compute_loss=True, reduce_output="avg", bcast_loss=True)
            total += torch.stack([out.detach().double().reshape(()) * count, count])
        self.engine.train()
        loss_sum, tokens = total.tolist()
        return {"loss": (loss_sum, tokens)}

    def _validate_and_log(self, val_ds, step: int) -> Dict[str, float]:
        """Validate on ``trainer.limit_val_batches`` global batches of each validation dataset and log; returns the
        metrics logged (``val/loss``, ``val/ppl``, ``val/<extra>``, per dataset ``val/loss/<name>``, ...), empty
        when nothing was validated."""
        return self._evaluate_and_log(val_ds, step, self.cfg.trainer.limit_val_batches, "val")

    def _evaluate_and_log(self, datasets, step: int, num_global_batches: int, prefix: str,
                          what: str = "") -> Dict[str, float]:
        metrics = self.evaluate(datasets, num_global_batches, prefix)
        if metrics:
            self.exp.log_metrics(step, metrics)
            main = (f"{prefix}/loss", f"{prefix}/ppl")
            log.info("%sstep %d | %s %.4f | %s %.3f%s", what, step, main[0], metrics[main[0]], main[1],
                     metrics[main[1]], "".join(f" | {k} {v:.4f}" for k, v in metrics.items() if k not in main))
        return metrics

    def _test_and_log(self, test_ds, step: int) -> Dict[str, float]:
        """The test split, once (after training, or in an evaluation-only run): ``test/loss`` etc. on
        ``trainer.limit_test_batches`` global batches of each test dataset."""
        return self._evaluate_and_log(test_ds, step, self._limit_test_batches(), "test", "test: ")

    def _say_missing_splits(self, val_ds, test_ds, evaluation_only: bool) -> None:
        """One log line for each evaluation the config asks for but the data has no split for."""
        t = self.cfg.trainer
        if val_ds is None and (evaluation_only or (t.val_check_interval and t.limit_val_batches > 0)):
            log.info("no validation split (model.data.data_prefix / splits_string): validation is not run")
        if test_ds is None and self._limit_test_batches() > 0:
            log.info("no test split (model.data.data_prefix / splits_string): the test split is not evaluated "
                     "(trainer.limit_test_batches=0 says so without this line)")

    # ------------------------------------------------------------------ step
    def _global_batch(self, it: Iterator) -> tuple[list, torch.Tensor, torch.Tensor]:
        """This rank's micro-batches of the next global batch (on the device), the loss tokens of the whole global
        batch (counted before any forward pass, one all-reduce over data parallel), and the per-micro-batch loss
        denominator that makes the step's loss token-weighted (``loss_token_denominator``)."""
        accum = self.derived.accumulate_grad_batches
        batches = [self._to_device(next(it)) for _ in range(accum)]
        count = torch.stack([loss_token_count(b["loss_mask"]) for b in batches]).sum()
        if self.dp_size > 1:
            from megatron.core import parallel_state as ps

            strag = getattr(self, "_stragglers", None)  # this collective's time is waiting, not compute
            token = strag.wait_begin() if strag is not None else None
            dist.all_reduce(count, group=ps.get_data_parallel_group())
            if strag is not None:
                strag.wait_end(token)
        return batches, count, loss_token_denominator(count, accum, self.dp_size)

    def _train_step(self, it: Iterator, keep_extras: bool) -> tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """One optimizer step over a global batch. Returns the step's loss on the device -- the mean of this rank's
        micro-batch losses, whose mean over DP is the token-weighted loss of the global batch (the pipeline engine
        returns it already averaged over DP) -- and, with ``keep_extras``, each extra as a device tensor
        ``[numerator, denominator]`` summed over the micro-batches (a scalar extra counts 1 per micro-batch)."""
        batches, _, denom = self._global_batch(it)
        guard = self.bad is not None and self.bad.check_each_step  # bad-step check before the update (bad_steps.py)
        rng = self._rng_states() if guard and self.bad.policy == "skip" else None
        if self.pipeline:  # the engine runs the 1F1B schedule over the micro-batches, the update last
            if guard:  # checked inside the schedule, just before its optimizer step
                self.engine.mext_before_update = self._check_pipeline_step
            try:
                loss = self.engine.train_batch(data_iter=iter([self.task.pipeline_batch(b, denom) for b in batches]))
            finally:
                self.engine.__dict__.pop("mext_before_update", None)
            if guard:
                self._after_update(rng)
            return loss.detach().float().reshape(()), {}
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        extras: Dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            loss, _, micro_extras = self.task.loss(self.engine, batch, denom)
            loss = self._inject_faults(loss)
            self.engine.backward(loss)
            if guard and i == len(batches) - 1:
                self._check_step((total + loss.detach().float()) / len(batches))
            self.engine.step()
            total += loss.detach().float()
            for k, v in micro_extras.items() if keep_extras else ():
                num, den = v if isinstance(v, (tuple, list)) else (v, 1.0)
                pair = torch.stack([torch.as_tensor(x, device=self.device).detach().float().reshape(())
                                    for x in (num, den)])
                extras[k] = extras[k] + pair if k in extras else pair
        if guard:
            self._after_update(rng)
        return total / len(batches), extras

    def _inject_faults(self, loss: torch.Tensor) -> torch.Tensor:
        """Test-only (``MEGATRON_EXT_FAULT_INJECT``, ``training/faults.py``): this rank's loss becomes NaN or is
        multiplied at the chosen steps."""
        if not self.faults:
            return loss
        if faults.active("nan", self.rank, self._step_no):
            loss = loss * float("nan")
        spike = faults.active("spike", self.rank, self._step_no)
        return loss * spike.args["factor"] if spike else loss

    def _check_step(self, loss: torch.Tensor) -> None:
        """After the step's last backward, before ``engine.step()``: is the step bad (``BadSteps.verdict``: one
        all-reduce and host sync)? If so (nan_policy=skip), the engine drops its update. On the fp32 ZeRO-0 path the
        gradients are reduced by now: their norm is checked in the same sync and reused by the clipping."""
        norm = None
        if self.bad.policy == "skip" and hasattr(self.engine, "mext_grad_norm"):
            norm = self.engine.mext_norm_ready = model_parallel_grad_norm(self.engine.module)
        self._skip_why, self._step_mean = self.bad.verdict(self._step_no, loss, norm)
        if self._skip_why:
            self.engine.mext_skip_update = True

    def _check_pipeline_step(self) -> None:
        """``_check_step`` for the pipeline engine, called at its optimizer step (the gradients are reduced by then):
        the loss is the last stage's mean over its micro-batches (the engine's running sum); other stages have none."""
        local = None
        if self.engine.is_last_stage():
            total = deepspeed_internal(self.engine, "total_loss", "trainer.nan_policy=skip with the pipeline engine")
            local = total.detach().float() / self.derived.accumulate_grad_batches
        self._check_step(local)

    def _after_update(self, rng: Optional[Dict[str, Any]]) -> None:
        """A step DeepSpeed did not apply (its optimizer found a non-finite gradient norm) is skipped too; a
        skipped step leaves no trace: the RNG states go back to where they were before it."""
        if self.bad.policy != "skip":
            return
        self.engine.mext_skip_update = False
        self.engine.__dict__.pop("mext_norm_ready", None)
        if self._skip_why is None and not self.engine.was_step_applied():
            self._skip_why = "the gradient norm is not finite (DeepSpeed dropped the update)"
        if self._skip_why is not None:
            set_all_rng_states(rng)

    def _discard_global_batch(self, it: Iterator) -> None:
        """A global batch recorded as bad: read past it (nothing computed, no collective); the engine counts the
        step as DeepSpeed counts a skipped one."""
        for _ in range(self.derived.accumulate_grad_batches):
            next(it)
        self.engine.global_steps += 1
        self.engine.global_samples += self.cfg.model.global_batch_size
        self.engine.skipped_steps += 1

    def _sync(self, pending: list, extras: Dict[str, torch.Tensor], lr: float) -> tuple[float, Dict[str, float]]:
        """The train loop's one host synchronisation per logged (or checkpoint) step: the losses of the steps since
        the last one (``pending``: (step, device loss)) and the extras of this step, averaged over data parallel in
        one all-reduce, come to the host in one copy. Raises when a step's loss is not finite (except with fp16
        loss scaling, where an overflow only skips the update). Returns (the last step's loss, extras)."""
        names = sorted(extras)
        losses = torch.stack([loss for _, loss in pending]).double()
        # our fp32 clipping leaves the step's grad norm on the device: it travels in the same copy (the same
        # value on every data-parallel rank, so the mean below leaves it unchanged)
        norm = getattr(self.engine, "mext_grad_norm", None)
        norm = [norm.detach().double().reshape(1)] if torch.is_tensor(norm) else []
        flat = torch.cat([losses] + norm + [extras[k].double() for k in names])
        if self.dp_size > 1 and not self.pipeline:
            from megatron.core import parallel_state as ps

            dist.all_reduce(flat, group=ps.get_data_parallel_group())
            flat[: len(pending) + len(norm)] /= self.dp_size
        host = flat.tolist()
        self._synced_grad_norm = host.pop(len(pending)) if norm else None
        if self.derived.precision != "16":
            for (step, _), value in zip(pending, host):
                if not math.isfinite(value):
                    raise MegatronExtError(
                        f"training loss is {value} at step {step} (lr {lr:.3e}); lower model.optim.lr, keep "
                        f"trainer.gradient_clip_val > 0, or use trainer.precision=32 to find the cause"
                    )
        pairs = host[len(pending):]
        return host[len(pending) - 1], {k: pairs[2 * i] / max(pairs[2 * i + 1], 1.0) for i, k in enumerate(names)}

    # ------------------------------------------------------------------ fit
    def fit(self) -> Dict[str, Any]:
        t = self.cfg.trainer
        self._loaded_step = 0
        try:  # exp.close (in finally) also releases the run directory's lock
            probe = (None, None, None)
            if run_length.needs_epoch(self.cfg):  # an epoch's size, from a first build of one global batch
                probe = self.task.build_datasets(run_length.probe_sizes(self.cfg))
            self._epoch = run_length.resolve(self.cfg, probe[0], probe[1], probe[2])
            del probe
            train_ds, val_ds, test_ds = self.task.build_datasets(self._num_samples())
            self._build()
            step, consumed = self._restore()
            self.exp.start(resumed_step=step if step > 0 else None)
            result: Dict[str, Any] = {"run_dir": self.exp.run_dir}
            self._say_missing_splits(val_ds, test_ds, t.limit_train_batches == 0)
            if t.limit_train_batches == 0:
                val = self._evaluate_and_log(val_ds, self._loaded_step, max(1, t.limit_val_batches), "val",
                                             "evaluation only: ")
                test = self._test_and_log(test_ds, self._loaded_step)
                result.update(step=self._loaded_step, val_loss=val.get("val/loss"), test_loss=test.get("test/loss"))
                return result
            result.update(self._train_loop(train_ds, val_ds, step, consumed))
            test = self._test_and_log(test_ds, result["step"])  # once, after the last validation
            result["test_loss"] = test.get("test/loss")
            return result
        finally:
            self.exp.close()

    def _train_loop(self, train_ds, val_ds, step: int, consumed: int) -> Dict[str, Any]:
        """Train from ``step`` (``consumed`` samples) to the end, once the engine is built and restored."""
        self.bad = BadSteps(self.cfg.trainer, self.cfg.model.global_batch_size, self.rank, self.device)
        self.bad.start(self.exp.run_dir, consumed, self._restored_meta, own_run=self._resumed_own)
        ckpt = _CheckpointSchedule(self)
        self._early = EarlyStopping.from_config(self.cfg.exp_manager)
        restored = (self._restored_meta or {}).get("early_stopping")
        if self._early is not None and self._early.load(restored):
            log.info("early stopping: %d validation(s) without improvement so far (best %s at step %s), from the "
                     "checkpoint", self._early.wait, self._early.best, self._early.best_step)
        self._monitors_checked = False
        self._preempt = preemption.PreemptionHandler(self.device)
        self._preempt.install()  # SIGTERM / SIGUSR1 only set a flag, checked at every step boundary
        faults.from_env()  # a bad MEGATRON_EXT_FAULT_INJECT (test-only) stops here
        self._stragglers = stragglers.for_trainer(self)  # per-rank compute time (trainer.straggler_every_n_steps)
        self._watchdog = watchdog.for_trainer(self)  # trainer.step_timeout_minutes
        try:
            return self._train_steps(train_ds, val_ds, step, consumed, ckpt)
        except BaseException:
            ckpt.finish(quiet=True)  # a checkpoint being written in the background still completes
            raise
        finally:
            self._preempt.uninstall()
            if self._watchdog is not None:
                self._watchdog.close()

    def _stop_if_preempted(self, step: int, first_step: int, consumed: int, pending: list, lr: float,
                           last_loss: Optional[float], ckpt: "_CheckpointSchedule") -> None:
        """At a step boundary: when any rank got SIGTERM/SIGUSR1 (one all-reduce), every rank writes a checkpoint of
        this step (unless it was just written, or nothing was trained since the resume), waits for an async save in
        flight, and raises ``Preempted`` (the entry point exits 75)."""
        why = self._preempt.should_stop()
        if why is None:
            return
        log.warning("preemption: %s; writing a checkpoint of step %d and stopping", why, step)
        if pending:
            last_loss, _ = self._sync(pending, {}, lr)
            pending.clear()
        if ckpt.ckpt is not None and ckpt.saved_at != step and step > first_step:
            ckpt.save(step, consumed, last_loss)
        ckpt.finish()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # every rank has the checkpoint committed before any exits (srun --kill-on-bad-exit)
        latest = find_latest(ckpt.ckpt.ckpt_dir) if ckpt.ckpt is not None else None
        raise preemption.Preempted(step, why, os.path.join(ckpt.ckpt.ckpt_dir, latest) if latest else None)

    def _train_steps(self, train_ds, val_ds, step: int, consumed: int, ckpt: "_CheckpointSchedule") -> Dict[str, Any]:
        t, gbs = self.cfg.trainer, self.cfg.model.global_batch_size
        last_step = t.max_steps if t.limit_train_batches is None else min(t.max_steps, step + t.limit_train_batches)
        first_step, meter = step, _Throughput(self)
        it = self._iter(train_ds, consumed)
        self.engine.train()
        pending: list = []  # (step, loss on the device) since the last host sync
        last_loss, last_val, extras = None, None, {}
        t_start = time.perf_counter()
        self._stop_if_preempted(step, first_step, consumed, pending, 0.0, last_loss, ckpt)  # (a signal during start-up)
        wd, strag, strag_metrics = self._watchdog, self._stragglers, {}
        pc = getattr(self, "_plan_check", None)
        while step < last_step:
            if wd is not None:
                wd.begin(step + 1)
            if strag is not None:
                strag.step_begin(step + 1)
            faults.inject_sleep(self.rank, step + 1, strag)  # test-only (MEGATRON_EXT_FAULT_INJECT)
            lr = self.optimizer.param_groups[0]["lr"]
            logs = (step + 1) % t.log_every_n_steps == 0 or step + 1 == last_step or step == first_step
            if hasattr(self.engine, "mext_want_norm"):  # fp32 ZeRO-0: our clipping computes the norm (if clip = 0: on demand)
                self.engine.mext_want_norm = logs
            self._step_no, self._skip_why, self._step_mean = step + 1, None, None
            recorded = self.bad.recorded(consumed) if self.bad.pending else None
            if recorded is not None:  # a batch recorded as bad (a resume, trainer.skip_steps): not read
                self._discard_global_batch(it)
            elif pc is not None:
                with pc.step_context(step - first_step + 1):  # trainer.plan_check: the window's collectives
                    loss, extras = self._train_step(it, keep_extras=logs)
            else:
                loss, extras = self._train_step(it, keep_extras=logs)
            step += 1
            consumed += gbs
            if strag is not None:  # every straggler_every_n_steps: one small all-gather of the compute times
                strag_metrics = strag.step_end(step) or strag_metrics
            meter.steps += 1
            skipped = recorded or self._skip_why
            if skipped:
                self.exp.log_metrics(step, self.bad.skipped(step, consumed - gbs, skipped, recorded is None))
                self.bad.check_consecutive(step, skipped)
            else:
                pending.append((step, loss))
                self.bad.good(self._step_mean)
            validates = bool(t.val_check_interval) and step % t.val_check_interval == 0 and t.limit_val_batches > 0
            saves = ckpt.due(step) or (validates and ckpt.at_validation)
            if (logs or saves) and pending:
                last_loss, extras = self._sync(pending, extras, lr)
                pending = []
            if logs and not skipped:
                self._log_train(step, last_step, consumed, last_loss, lr, {**extras, **strag_metrics},
                                meter.interval())
                strag_metrics = {}
            if pc is not None and pc.due():
                pc.report(step, self.rank, self.cfg, self.exp)
            stop_why = None
            if validates:
                with self._untimed():
                    val_metrics = self._validate_and_log(val_ds, step)
                last_val = val_metrics.get("val/loss", last_val)
                stop_why = self._after_validation(step, val_metrics, ckpt)
                meter.restart()
            if saves:
                ckpt.save(step, consumed, last_loss)
                meter.restart()
            if stop_why is not None:
                log.info("early stopping: %s; stopped after step %d of %d", stop_why, step, last_step)
                self._stopped_early = stop_why
                break
            if step < last_step:
                self._stop_if_preempted(step, first_step, consumed, pending, lr, last_loss, ckpt)
        if wd is not None:
            wd.idle()  # training is over
        if pc is not None and not pc.done:  # fewer steps than the window: what was measured
            pc.report(step, self.rank, self.cfg, self.exp)
        if ckpt.due_at_end(step, first_step):
            ckpt.save(step, consumed, last_loss)
        ckpt.finish()  # a checkpoint still being written in the background
        elapsed = time.perf_counter() - t_start
        log.info("training done: %d steps in %.1fs; run directory %s", step - first_step, elapsed, self.exp.run_dir)
        out = {"step": step, "train_loss": last_loss, "val_loss": last_val, "elapsed_s": elapsed}
        if getattr(self, "_stopped_early", None):
            out["stopped_early"] = self._stopped_early
        return out

    def _after_validation(self, step: int, metrics: Dict[str, float], ckpt: "_CheckpointSchedule") -> Optional[str]:
        """After a validation (every rank holds the same metrics): remember them for a checkpoint of this step; at
        the first one, check that the monitored metrics are logged (naming the key otherwise) and settle their
        logged names; count it for early stopping. Returns why to stop, or None."""
        if not metrics:
            return None
        self._val_at = (step, metrics)
        best = ckpt.ckpt.best if ckpt.ckpt is not None else None
        if not self._monitors_checked:
            monitors = []
            if best is not None:
                monitors.append(("exp_manager.checkpoint_callback_params.monitor", best.monitor))
            if self._early is not None:
                monitors.append((f"{EarlyStopping.KEY}.monitor", self._early.monitor))
            check_logged(metrics, monitors)
            if best is not None:
                best.monitor = resolve_logged(best.monitor, metrics)
            if self._early is not None:
                self._early.monitor = resolve_logged(self._early.monitor, metrics)
            self._monitors_checked = True
        if self._early is None:
            return None
        return self._early.update(step, metrics[self._early.monitor])

    def _untimed(self):
        """Validation and checkpoint writing do not count towards trainer.step_timeout_minutes."""
        wd = getattr(self, "_watchdog", None)
        return wd.paused() if wd is not None else contextlib.nullcontext()

    def _log_train(self, step: int, last_step: int, consumed: int, loss: float, lr: float, extras: Dict[str, float],
                   perf: Dict[str, float]) -> None:
        gn = self._grad_norm()
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": gn, **perf,
                   "train/consumed_samples": consumed, **{f"train/{k}": v for k, v in extras.items()}}
        self.exp.log_metrics(step, metrics)
        log.info("step %d/%d | loss %.4f | lr %.3e | grad_norm %.3f | %.0f tokens/s | %.3f TFLOP/s | MFU %.1f%%",
                 step, last_step, loss, lr, gn, perf["train/tokens_per_sec"], perf["train/tflops"],
                 100 * perf["train/mfu"])


class _CheckpointSchedule:
    """When the train loop writes a checkpoint: every ``every_n_train_steps`` steps, after every validation when
    ``monitor`` is set (``at_validation``: the checkpoints ``save_top_k`` ranks, training/best.py), and at the end
    with ``save_last`` unless the last step was just saved (``exp_manager.create_checkpoint_callback`` off:
    never)."""

    def __init__(self, trainer: "Trainer"):
        p = trainer.cfg.exp_manager.checkpoint_callback_params
        self.trainer = trainer
        self.every, self.save_last = p.every_n_train_steps, p.save_last
        self.ckpt = Checkpointer(trainer.exp.ckpt_dir, p.save_top_k, async_save=p.async_save,
                                 best=BestCheckpoints.from_params(p)) \
            if trainer.cfg.exp_manager.create_checkpoint_callback else None
        self.at_validation = self.ckpt is not None and self.ckpt.best is not None
        self.saved_at: Optional[int] = None

    def due(self, step: int) -> bool:
        return self.ckpt is not None and bool(self.every) and step % self.every == 0

    def due_at_end(self, step: int, first_step: int) -> bool:
        return self.ckpt is not None and bool(self.save_last) and self.saved_at != step and step > first_step

    def save(self, step: int, consumed: int, loss: Optional[float]) -> None:
        with self.trainer._untimed():
            self.trainer._save(self.ckpt, step, consumed, loss)
        self.saved_at = step

    def finish(self, quiet: bool = False) -> None:
        if self.ckpt is not None:
            with self.trainer._untimed():
                self.ckpt.finish(quiet)


class _Throughput:
    """Step time, tokens/s, model TFLOP/s per process and MFU, averaged over the steps since the last logged step
    (read when the losses have reached the host, so queued device work is included); validation and checkpoint
    writing restart the interval."""

    def __init__(self, trainer: "Trainer"):
        gbs = trainer.cfg.model.global_batch_size
        self.flops_iter = trainer.task.flops_per_iteration(gbs)
        self.tokens_iter = gbs * trainer.task.tokens_per_sample()
        self.world = trainer.derived.world_size
        self.peak, src = peak_tflops(trainer.device.type, trainer.derived.precision)
        log.info("MFU peak: %.2f TFLOP/s per process (%s); model FLOPs per iteration %.3e", self.peak, src,
                 self.flops_iter)
        self.restart()

    def restart(self) -> None:
        self.t0, self.steps = time.perf_counter(), 0

    def interval(self) -> Dict[str, float]:
        """The ``train/`` throughput metrics since the last restart; restarts."""
        step_time = (time.perf_counter() - self.t0) / max(self.steps, 1)
        self.restart()
        tflops = self.flops_iter / step_time / self.world / 1e12
        return {"train/tokens_per_sec": self.tokens_iter / step_time, "train/tflops": tflops,
                "train/mfu": tflops / self.peak if self.peak > 0 else float("nan"), "train/step_time": step_time}

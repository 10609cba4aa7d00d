"""Experiment manager: run directory, resolved config, metrics.jsonl, TensorBoard and W&B loggers.

Layout of a run (NeMo-style)::

    <exp_dir>/<name>/<version>/
        config.yaml          the resolved config of this run (config.<n>.yaml for earlier starts on resume)
        metrics.jsonl        one JSON object per logged step: {"step": .., "train/loss": .., ...}
        events.out.tfevents.*  TensorBoard
        wandb/               W&B (when exp_manager.create_wandb_logger)
        checkpoints/         see megatron_ext.training.checkpointing

Only global rank 0 writes; the version is chosen on rank 0 and broadcast so all ranks agree.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Dict, Optional

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from megatron_ext.errors import ConfigError

log = logging.getLogger(__name__)

# Stable, documented metric names (README "Logged metrics").
METRIC_NAMES = (
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/tokens_per_sec",
    "train/tflops",
    "train/mfu",
    "train/step_time",
    "train/consumed_samples",
    "val/loss",
    "val/ppl",
)


def _broadcast_str(value: str) -> str:
    if dist.is_initialized() and dist.get_world_size() > 1:
        obj = [value]
        dist.broadcast_object_list(obj, src=0)
        return obj[0]
    return value


def _has_checkpoint(version_dir: str) -> bool:
    return os.path.isfile(os.path.join(version_dir, "checkpoints", "latest"))


def resolve_run_dir(em: DictConfig, rank: int) -> str:
    """exp_dir/name/version. With resume_if_exists and no version, reuse the newest version that has a checkpoint."""
    base = os.path.abspath(os.path.join(em.exp_dir, em.name))
    version = em.version
    if version is None and rank == 0:
        if em.resume_if_exists and os.path.isdir(base):
            cands = [d for d in sorted(os.listdir(base)) if _has_checkpoint(os.path.join(base, d))]
            if cands:
                version = max(cands, key=lambda d: os.path.getmtime(os.path.join(base, d, "checkpoints", "latest")))
        if version is None:
            version = time.strftime("%Y-%m-%d_%H-%M-%S")
    version = _broadcast_str(str(version) if version is not None else "")
    return os.path.join(base, version)


class ExpManager:
    def __init__(self, cfg: DictConfig, rank: int):
        self.cfg = cfg
        self.em = cfg.exp_manager
        self.rank = rank
        self.run_dir = resolve_run_dir(self.em, rank)
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        self._tb = None
        self._wandb = None
        self._metrics_f = None
        if rank == 0:
            os.makedirs(self.ckpt_dir, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()

    # ------------------------------------------------------------------ setup
    def start(self, resumed_step: Optional[int]) -> None:
        """Write the config, open the loggers. ``resumed_step``: the step we continue from (None = fresh)."""
        if self.rank != 0:
            return
        cfg_path = os.path.join(self.run_dir, "config.yaml")
        if os.path.exists(cfg_path):
            n = 1
            while os.path.exists(os.path.join(self.run_dir, f"config.{n}.yaml")):
                n += 1
            os.replace(cfg_path, os.path.join(self.run_dir, f"config.{n}.yaml"))
        with open(cfg_path, "w") as f:
            f.write(OmegaConf.to_yaml(self.cfg, resolve=True))
        self._prepare_metrics(resumed_step)
        self._metrics_f = open(self.metrics_path, "a", buffering=1)
        if self.em.create_tensorboard_logger:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=self.run_dir, purge_step=(resumed_step + 1) if resumed_step else None)
        if self.em.create_wandb_logger:
            self._wandb = self._start_wandb()
        log.info("run directory: %s", self.run_dir)

    def _prepare_metrics(self, resumed_step: Optional[int]) -> None:
        """On resume, drop metric lines past the checkpoint (they were written by the interrupted run and will be
        recomputed); they are kept in metrics.interrupted.jsonl, not lost."""
        if not os.path.exists(self.metrics_path):
            return
        keep, dropped = [], []
        with open(self.metrics_path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash mid-write
                    dropped.append(line)
                    continue
                if resumed_step is None or rec.get("step", 0) > resumed_step:
                    dropped.append(line)
                else:
                    keep.append(line)
        if dropped:
            with open(os.path.join(self.run_dir, "metrics.interrupted.jsonl"), "a") as f:
                f.write("\n".join(dropped) + "\n")
            log.info("moved %d metric lines past step %s to metrics.interrupted.jsonl", len(dropped), resumed_step)
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in keep))
        os.replace(tmp, self.metrics_path)

    def _start_wandb(self):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "exp_manager.create_wandb_logger=true needs the wandb package: pip install 'megatron_ext[wandb]'"
            ) from None
        kw = self.em.wandb_logger_kwargs
        if kw.offline:
            os.environ["WANDB_MODE"] = "offline"
        return wandb.init(
            project=kw.project,
            name=kw.name or f"{self.em.name}/{os.path.basename(self.run_dir)}",
            entity=kw.entity,
            dir=self.run_dir,
            config=OmegaConf.to_container(self.cfg, resolve=True),
            resume="allow",
            id=f"{self.em.name}-{os.path.basename(self.run_dir)}".replace("/", "-"),
        )

    # ---------------------------------------------------------------- logging
    def log_metrics(self, step: int, metrics: Dict[str, Any]) -> None:
        if self.rank != 0:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}
        rec = {"step": step, **clean}
        self._metrics_f.write(json.dumps(rec, allow_nan=True) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        if self.rank != 0:
            return
        if self._metrics_f is not None:
            self._metrics_f.close()
            self._metrics_f = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

"""Experiment manager: run directory, resolved config, metrics.jsonl, TensorBoard and W&B loggers.

Layout of a run (NeMo-style)::

    <exp_dir>/<name>/<version>/
        config.yaml          the resolved config of this run (config.<n>.yaml for earlier starts on resume)
        metrics.jsonl        one JSON object per logged step: {"step": .., "train/loss": .., ...}
        events.out.tfevents.*  TensorBoard
        wandb/               W&B (when exp_manager.create_wandb_logger)
        checkpoints/         see megatron_ext.checkpoint.files

Only global rank 0 writes; the version is chosen on rank 0 and broadcast so all ranks agree.

A run owns its directory: rank 0 holds an exclusive ``flock`` on ``<run dir>/.lock`` (which records the holder's
pid and host) for the run's life, so a second run on the same directory stops at once with one line naming the
directory and the holder; the kernel drops the lock when the process dies, so a crashed run leaves no stale lock.
A default version (no ``exp_manager.version``) is a start time created with ``os.mkdir``, which fails when the
directory exists: runs started in the same second get ``<time>_2``, ``<time>_3``... A fresh run (no
``resume_if_exists``) is refused in a directory that already holds checkpoints unless ``exp_manager.overwrite`` is
set, which removes them first (one log line), so no step of an earlier run survives beside the new run's.

Hydra sweeps (``python pretrain_gpt.py -m model.hidden_size=128,256 model.optim.lr=1e-3,3e-4``): every job of
the sweep gets its own run directory, ``<version>_job<N>_<swept overrides>`` -- ``<version>`` is
``exp_manager.version``, or when that is null the sweep's start time (shared by the jobs Hydra's default launcher
runs in this process), ``N`` Hydra's job number and the swept overrides those of this job as ``key-value`` joined
by ``+`` (e.g. ``2025-01-31_12-00-00_job1_model.hidden_size-128+model.optim.lr-0.0003``), so no job overwrites
another and each directory holds its own resolved config.yaml. A swept ``exp_manager.version`` already names
each job and is used as is. With ``resume_if_exists`` and no version, a job resumes the newest directory of the
same job number and swept values.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import time
from typing import Any, Dict, Optional, Set

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from megatron_ext.checkpoint.files import remove_incomplete
from megatron_ext.errors import ConfigError
from megatron_ext.parallel.state import read_dist_env
from megatron_ext.training.preemption import elastic_version, record_elastic_run

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


_CKPT_ENTRY = re.compile(r"^(\.tmp-|\.del-)?step_\d+$|^latest$")


def _checkpoint_entries(ckpt_dir: str) -> list:
    """The checkpoint entries (``step_N``, ``.tmp-step_N``, ``.del-step_N``, ``latest``) in ``ckpt_dir``."""
    try:
        return sorted(d for d in os.listdir(ckpt_dir) if _CKPT_ENTRY.match(d))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _check_exp_dir(em: DictConfig, base: str) -> None:
    """``exp_manager.exp_dir`` (and ``<exp_dir>/<name>``) must be directories or not exist yet."""
    path = os.path.abspath(em.exp_dir)
    while True:  # the nearest existing ancestor must be a directory
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise ConfigError(f"exp_manager.exp_dir={em.exp_dir!r}: {path} is a file, expected a directory "
                                  f"(or a path that does not exist yet)")
            break
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if os.path.exists(base) and not os.path.isdir(base):
        raise ConfigError(f"exp_manager.name={em.name!r}: {base} is a file, expected a directory")


def _new_version_dir(base: str, stamp: str, tag: Optional[str]) -> str:
    """Create ``base/<stamp>[_<tag>]`` atomically (``os.mkdir``); when it exists (a run started in the same
    second), ``<stamp>_2``, ``<stamp>_3``... Returns the version name."""
    os.makedirs(base, exist_ok=True)
    n = 1
    while True:
        s = stamp if n == 1 else f"{stamp}_{n}"
        version = s if tag is None else f"{s}_{tag}"
        try:
            os.mkdir(os.path.join(base, version))
            return version
        except FileExistsError:
            n += 1


# ------------------------------------------------------------------------------------------- Hydra sweeps
_SWEEP_STAMPS: Dict[str, str] = {}  # sweep directory -> the start time naming its jobs (jobs run in one process)
# what stays in a job's directory name: safe in paths and in an unquoted Hydra override value (the name is passed
# on to self-launched workers as exp_manager.version=<name>)
_UNSAFE = re.compile(r"[^A-Za-z0-9._@%-]+")


def _override_key(parser, text: str) -> Optional[str]:
    try:
        return parser.parse_override(text).key_or_group
    except Exception:  # not an override (a flag, a config name)
        return None


def _swept_keys(hc, argv) -> Set[str]:
    """Keys swept by this multirun: overrides on the command line with several values (``a=1,2``, ``range()``,
    ``choice()``, ...) and the keys of ``hydra.sweeper.params``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    keys: Set[str] = set()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            o = parser.parse_override(arg)
        except Exception:
            continue
        if o.is_sweep_override():
            keys.add(o.key_or_group)
    params = hc.sweeper.get("params", None) if hasattr(hc.sweeper, "get") else None
    for k, v in (params or {}).items():
        key = _override_key(parser, f"{k}={v}")
        if key is not None:
            keys.add(key)
    return keys


def sweep_job() -> Optional[Dict[str, Any]]:
    """When this process runs a job of a Hydra multirun: ``{"num", "overrides" (the swept ones, as given to this
    job), "swept_keys", "sweep_dir"}``; else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        from hydra.core.override_parser.overrides_parser import OverridesParser

        swept = _swept_keys(hc, sys.argv[1:])
        parser = OverridesParser.create()
        mine = [o for o in hc.overrides.task if _override_key(parser, o) in swept]
        return {"num": int(hc.job.num), "overrides": mine, "swept_keys": swept, "sweep_dir": str(hc.sweep.dir)}
    except Exception:  # no Hydra / an unexpected Hydra layout: behave as a single run
        return None


def sweep_job_tag(job: Dict[str, Any]) -> str:
    """``job<N>_<key>-<value>+<key>-<value>...`` for the swept overrides of the job; characters that are unsafe in a
    directory name or a Hydra override value become ``_``."""
    pairs = []
    for o in job["overrides"]:
        key, _, value = o.lstrip("+~").partition("=")
        pairs.append(f"{_UNSAFE.sub('_', key)}-{_UNSAFE.sub('_', value)}")
    swept = "+".join(pairs)[:120]
    return f"job{job['num']}" + (f"_{swept}" if swept else "")


def check_sweep_launch(cfg: DictConfig) -> None:
    """Before a sweep job starts its own ``trainer.devices`` workers (no launcher): a fixed, non-swept
    ``exp_manager.version`` cannot be made per-job for the workers (they get the job's overrides, in which the
    version is the same for every job), so it is refused rather than letting the jobs share one directory."""
    job = sweep_job()
    if job is None or cfg.exp_manager.version is None or "exp_manager.version" in job["swept_keys"]:
        return
    if int(cfg.trainer.devices) > 1:
        if not read_dist_env().launched:
            raise ConfigError(
                f"exp_manager.version={cfg.exp_manager.version!r} with a -m sweep and trainer.devices="
                f"{cfg.trainer.devices}: every job would write to the same run directory; leave exp_manager.version "
                f"null (each job gets <start time>_job<N>_<swept overrides>) or sweep it too"
            )


def resolve_run_dir(em: DictConfig, rank: int) -> str:
    """exp_dir/name/version. With resume_if_exists and no version, reuse the newest version that has a checkpoint.
    In a Hydra multirun, each job gets ``<version or sweep start time>_<job tag>`` (module docstring). A new default
    version is created here (unique, module docstring). Raises ConfigError (on every rank) when ``exp_dir`` or
    ``<exp_dir>/<name>`` is a file."""
    base = os.path.abspath(os.path.join(em.exp_dir, em.name))
    version = em.version
    err = ""
    if rank == 0:
        try:
            version = _pick_version(em, base)
        except ConfigError as e:
            err = str(e)
    err = _broadcast_str(err)
    if err:
        raise ConfigError(err)
    version = _broadcast_str(str(version) if version is not None else "")
    return os.path.join(base, version)


def _pick_version(em: DictConfig, base: str) -> str:
    """The version on rank 0 (see resolve_run_dir)."""
    version = em.version
    _check_exp_dir(em, base)
    job = sweep_job()
    tag = sweep_job_tag(job) if job is not None else None
    if tag is not None and version is not None and "exp_manager.version" not in job["swept_keys"]:
        version = f"{version}_{tag}"
    if version is None:  # a torchrun restart: the directory this torchrun run made (training.preemption)
        version = elastic_version(base)
    if version is None and em.resume_if_exists and os.path.isdir(base):
        cands = [d for d in sorted(os.listdir(base)) if _has_checkpoint(os.path.join(base, d))
                 and (tag is None or d.endswith(f"_{tag}"))]
        if cands:
            version = max(cands, key=lambda d: os.path.getmtime(os.path.join(base, d, "checkpoints", "latest")))
    if version is None:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        if tag is not None:
            stamp = _SWEEP_STAMPS.setdefault(job["sweep_dir"], stamp)
        try:
            version = _new_version_dir(base, stamp, tag)
        except OSError as e:
            raise ConfigError(f"exp_manager.exp_dir={em.exp_dir!r}: cannot create a run directory in {base} "
                              f"({e.strerror or e})") from None
    return version


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
        self._lock_f = None
        err = ""
        if rank == 0:
            try:
                self._own_run_dir()
            except ConfigError as e:
                err = str(e)
        err = _broadcast_str(err)  # every rank stops with the same message
        if err:
            raise ConfigError(err)
        if dist.is_initialized():
            dist.barrier()

    def _own_run_dir(self) -> None:
        """Rank 0: create the run directory, take its lock, refuse (or with ``overwrite`` clear) the checkpoints of
        an earlier run when this one starts fresh, and remove incomplete checkpoint directories."""
        try:
            os.makedirs(self.run_dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"exp_manager.exp_dir={self.em.exp_dir!r}: cannot create the run directory "
                              f"{self.run_dir} ({e.strerror or e})") from None
        self._lock()
        try:
            writes_checkpoints = self.em.create_checkpoint_callback and self.cfg.trainer.get("limit_train_batches") != 0
            old = _checkpoint_entries(self.ckpt_dir)
            if old and writes_checkpoints and not self.em.resume_if_exists:
                if not self.em.get("overwrite", False):
                    raise ConfigError(
                        f"{self.ckpt_dir} already holds checkpoints of an earlier run ({', '.join(old[:3])}"
                        f"{', ...' if len(old) > 3 else ''}); add exp_manager.resume_if_exists=true to continue that "
                        f"run, or exp_manager.overwrite=true to delete its checkpoints and start fresh"
                    )
                shutil.rmtree(self.ckpt_dir)
                log.warning("exp_manager.overwrite=true: deleted the %d checkpoint entries of an earlier run in %s "
                            "(%s)", len(old), self.ckpt_dir, ", ".join(old))
            os.makedirs(self.ckpt_dir, exist_ok=True)
            remove_incomplete(self.ckpt_dir)
            record_elastic_run(self.run_dir)  # under torchrun: a restart finds this directory again
        except BaseException:
            self._unlock()
            raise

    def _lock(self) -> None:
        """Hold an exclusive flock on ``<run dir>/.lock`` (pid and host written inside) until ``close``."""
        import fcntl

        path = os.path.join(self.run_dir, ".lock")
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                f.close()
                raise
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            f.close()
            raise ConfigError(
                f"run directory {self.run_dir} is in use by another run ({holder}); wait for it to finish, or give "
                f"this run another exp_manager.version (or leave it null for a new one)"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._lock_f = f

    def _unlock(self) -> None:
        if self._lock_f is not None:
            self._lock_f.close()  # closing the descriptor releases the flock
            self._lock_f = None

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
        if not self.cfg.trainer.get("fast_dev_run"):  # fast_dev_run: no loggers but the console
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
        if self._metrics_f is not None:
            self._metrics_f.write(json.dumps(rec, allow_nan=True) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        """Close the loggers and release the run directory's lock."""
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
        self._unlock()

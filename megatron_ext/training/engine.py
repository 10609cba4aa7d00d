"""DeepSpeed engine construction: the DeepSpeed JSON from our config keys, and ``deepspeed.initialize``."""
from __future__ import annotations

import copy
import json
import logging
from typing import Any, Dict, Optional

import torch

from megatron_ext.errors import ConfigError

log = logging.getLogger(__name__)

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


OFFLOAD_DEVICES = ("cpu", "nvme")


def _zero_section(stage: int, offload_optimizer: Optional[str], offload_param: Optional[str]) -> Dict[str, Any]:
    """``zero_optimization`` from ``model.zero_stage`` / ``model.offload_optimizer`` / ``model.offload_param``.

    DeepSpeed offloads optimizer state (and its step) with ZeRO 1-3 and parameters only with ZeRO 3. NVMe offload
    also needs ``nvme_path``, which only a DeepSpeed JSON (``model.deepspeed_config``) can give.
    """
    z: Dict[str, Any] = {"stage": stage}
    for key, dev, min_stage in (("offload_optimizer", offload_optimizer, 1), ("offload_param", offload_param, 3)):
        if dev is None or str(dev).lower() in ("none", "null", ""):
            continue
        dev = str(dev).lower()
        if dev not in OFFLOAD_DEVICES:
            raise ConfigError(f"model.{key}={dev!r}: expected null, 'cpu' or 'nvme'")
        if stage < min_stage:
            raise ConfigError(
                f"model.{key}={dev} needs model.zero_stage >= {min_stage} (DeepSpeed offloads "
                f"{'optimizer state' if min_stage == 1 else 'parameters'} only with ZeRO "
                f"{'1-3' if min_stage == 1 else '3'}); this run has model.zero_stage={stage}"
            )
        if dev == "nvme":
            raise ConfigError(
                f"model.{key}=nvme needs an nvme_path: give the whole zero_optimization section in a DeepSpeed "
                f"JSON through model.deepspeed_config"
            )
        z[key] = {"device": dev, "pin_memory": False}
    if "offload_optimizer" in z:
        # our optimizer registry builds torch optimizers; let DeepSpeed step them on the offloaded fp32 state
        z["_force_ds_cpu_optimizer"] = False
    return z


def build_ds_config(
    *,
    micro_batch_size: int,
    global_batch_size: int,
    accumulate_grad_batches: int,
    precision: str,
    zero_stage: int = 0,
    gradient_clip_val: float = 1.0,
    deepspeed_config: Optional[str] = None,
    offload_optimizer: Optional[str] = None,
    offload_param: Optional[str] = None,
) -> Dict[str, Any]:
    """DeepSpeed JSON. ``deepspeed_config`` (a file) is the base; our keys fill what it leaves out.

    Batch sizes in the file must agree with ``model.*`` (DeepSpeed would assert deep inside otherwise);
    optimizer/scheduler sections are rejected: they come from ``model.optim`` so there is one source of truth.
    """
    ours: Dict[str, Any] = {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulate_grad_batches,
        "gradient_clipping": float(gradient_clip_val or 0.0),
        "zero_optimization": _zero_section(int(zero_stage), offload_optimizer, offload_param),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {
            "enabled": precision == "16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if deepspeed_config is None:
        force = ours["zero_optimization"].pop("_force_ds_cpu_optimizer", None)
        if force is not None:
            ours["zero_force_ds_cpu_optimizer"] = force
        return ours
    try:
        with open(deepspeed_config) as f:
            user = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"model.deepspeed_config: file not found: {deepspeed_config}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"model.deepspeed_config: {deepspeed_config} is not valid JSON ({e})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"model.deepspeed_config: {deepspeed_config} must hold a JSON object")
    for k in ("optimizer", "scheduler"):
        if k in user:
            raise ConfigError(
                f"model.deepspeed_config: {deepspeed_config} has an '{k}' section; configure it under "
                f"model.optim{'.sched' if k == 'scheduler' else ''} instead"
            )
    for k in _BATCH_KEYS:
        if k in user and user[k] != ours[k]:
            raise ConfigError(
                f"model.deepspeed_config: {deepspeed_config} sets {k}={user[k]} but the model config implies "
                f"{ours[k]} (model.global_batch_size / micro_batch_size / data parallel size); remove it from the JSON"
            )
    force = ours["zero_optimization"].pop("_force_ds_cpu_optimizer", None)
    merged = copy.deepcopy(ours)
    if force is not None:
        merged["zero_force_ds_cpu_optimizer"] = force
    for k, v in user.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = {**merged[k], **v}
        else:
            merged[k] = v
    if "gradient_clipping" in user and gradient_clip_val and user["gradient_clipping"] != gradient_clip_val:
        log.warning("model.deepspeed_config gradient_clipping=%s overrides trainer.gradient_clip_val=%s",
                    user["gradient_clipping"], gradient_clip_val)
    if merged["bf16"].get("enabled") and merged["fp16"].get("enabled"):
        raise ConfigError(f"model.deepspeed_config: {deepspeed_config} enables both bf16 and fp16")
    return merged


def build_engine(model: torch.nn.Module, optimizer, lr_scheduler, ds_config: Dict[str, Any]):
    """``deepspeed.initialize`` with megatron-core's parallel groups (through ``MPUAdapter``).

    A ``deepspeed.pipe.PipelineModule`` gets DeepSpeed's ``PipelineEngine``; its groups come from the module's
    topology, which ``megatron_ext.parallel.pipeline.pipeline_topology`` checked against megatron-core's.
    """
    import deepspeed
    from deepspeed.pipe import PipelineModule

    from megatron_ext.parallel.state import MPUAdapter

    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        mpu=None if isinstance(model, PipelineModule) else MPUAdapter(),
        config=ds_config,
        dist_init_required=False,
    )
    return engine, optimizer, lr_scheduler

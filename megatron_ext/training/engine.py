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


def build_ds_config(
    *,
    micro_batch_size: int,
    global_batch_size: int,
    accumulate_grad_batches: int,
    precision: str,
    zero_stage: int = 0,
    gradient_clip_val: float = 1.0,
    deepspeed_config: Optional[str] = None,
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
        "zero_optimization": {"stage": int(zero_stage)},
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
    merged = copy.deepcopy(ours)
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
    """``deepspeed.initialize`` with megatron-core's parallel groups (through ``MPUAdapter``)."""
    import deepspeed

    from megatron_ext.parallel.state import MPUAdapter

    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        mpu=MPUAdapter(),
        config=ds_config,
        dist_init_required=False,
    )
    return engine, optimizer, lr_scheduler

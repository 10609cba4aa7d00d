"""DeepSpeed engine construction: the DeepSpeed JSON from our config keys, and ``deepspeed.initialize``.

After ``deepspeed.initialize`` a few of the engine's private members are replaced or set (the fp32 clipping step,
the single-replica all-reduce switch, the checkpoint loader). They exist in the DeepSpeed versions that
``pyproject.toml`` allows (``TESTED_DEEPSPEED``); every one is looked up through :func:`deepspeed_internal`, so a
DeepSpeed whose internals changed stops the run with one :class:`DeepSpeedInternalsError` naming the installed
version and the missing member, rather than training on without the patch.
"""
from __future__ import annotations

import copy
import json
import logging
from typing import Any, Dict, Optional

import torch

from megatron_ext.checkpoint.safe_load import install_safe_checkpoint_engine
from megatron_ext.errors import ConfigError, MegatronExtError
from megatron_ext.parallel.state import MPUAdapter, attach_deepspeed_comm

log = logging.getLogger(__name__)

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


OFFLOAD_DEVICES = ("cpu", "nvme")

# the DeepSpeed releases whose engine internals the patches below were run against (pyproject.toml pins the same)
TESTED_DEEPSPEED = ">=0.16,<=0.19.8"


class DeepSpeedInternalsError(MegatronExtError, RuntimeError):
    """The installed DeepSpeed lacks an engine member that megatron_ext patches: a DeepSpeed outside
    ``TESTED_DEEPSPEED`` whose internals changed."""


def deepspeed_internal(obj: Any, name: str, purpose: str) -> Any:
    """``getattr(obj, name)`` for a private DeepSpeed member that a patch here relies on; a missing one is a
    :class:`DeepSpeedInternalsError` naming the DeepSpeed version, the class, the member and what needs it."""
    try:
        return getattr(obj, name)
    except AttributeError:
        import deepspeed  # already imported by whoever built obj

        raise DeepSpeedInternalsError(
            f"DeepSpeed {deepspeed.__version__}: {type(obj).__name__} has no attribute '{name}', which megatron_ext "
            f"needs for {purpose}; its internals changed. Install a tested version: pip install "
            f"'deepspeed{TESTED_DEEPSPEED}'"
        ) from None


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

    attach_deepspeed_comm()
    own_clip = None
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    mixed = ds_config.get("bf16", {}).get("enabled") or ds_config.get("fp16", {}).get("enabled")
    if stage == 0 and not mixed:  # DeepSpeed's plain fp32 path: we clip (see install_fp32_clipping)
        own_clip = float(ds_config.get("gradient_clipping") or 0.0)
        ds_config = {**ds_config, "gradient_clipping": 0.0}
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        mpu=None if isinstance(model, PipelineModule) else MPUAdapter(),
        config=ds_config,
        dist_init_required=False,
    )
    _skip_single_replica_allreduce(engine)
    _safe_checkpoint_loading(engine)
    if own_clip is not None:
        install_fp32_clipping(engine, own_clip)
    return engine, optimizer, lr_scheduler


def model_parallel_grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """L2 norm of all gradients of the model (every TP x PP shard), identical on every rank of a model replica.

    Each rank counts its TP-sharded parameters (megatron-core marks them ``tensor_model_parallel``) and, on TP
    rank 0 only, its replicated ones (norms, biases of row-parallel layers, position embeddings); DeepSpeed's
    pipeline copies of a tied weight (``ds_pipe_replicated``) are counted once. The squared sums are added over
    megatron-core's model-parallel (TP x PP) group. Per-parameter norms come from one ``torch._foreach_norm``.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    grads = [
        p.grad.detach()
        for p in module.parameters()
        if p.grad is not None
        and not getattr(p, "ds_pipe_replicated", False)
        and (tp_rank == 0 or getattr(p, "tensor_model_parallel", False))
    ]
    device = next(module.parameters()).device
    sq = torch.zeros((), dtype=torch.float64, device=device)
    if grads:
        sq = torch.stack(torch._foreach_norm(grads)).double().pow(2).sum()
    if ps.get_model_parallel_group() is not None and dist.get_world_size(ps.get_model_parallel_group()) > 1:
        dist.all_reduce(sq, group=ps.get_model_parallel_group())
    return sq.sqrt()


def install_fp32_clipping(engine, clip: float) -> None:
    """Gradient clipping (and the grad norm) for DeepSpeed's plain fp32 path (ZeRO 0, no bf16/fp16 optimizer).

    DeepSpeed's own fp32 clipping is wrong under pipeline parallelism -- it counts replicated parameters (norms,
    biases) only on the rank whose *pipeline x tensor* rank is 0, so later stages' are left out -- it discards the
    norm (``get_global_grad_norm()`` is None on this path, so a logged norm needed a second pass), and it rescales
    every gradient even when the norm is under the limit. Here ``model_parallel_grad_norm`` runs once per optimizer
    step just before DeepSpeed's step (the engine is built with ``gradient_clipping: 0``) and stays on the device:
    gradients are multiplied by ``min(1, clip / norm)`` (one ``torch._foreach_mul_`` by a device scalar; exact
    when the norm is under the limit), so clipping never waits for the host. The pre-clipping norm is kept, as a
    tensor, in ``engine.mext_grad_norm`` for the trainer to copy with the loss on the steps it logs. With
    ``clip == 0`` the norm is computed only when ``engine.mext_want_norm`` is set (the trainer sets it on the
    steps it logs).
    """
    original = deepspeed_internal(engine, "_take_model_step", "gradient clipping on the fp32 path")
    engine.mext_grad_norm = None
    engine.mext_want_norm = False

    def take_model_step(*args, **kwargs):
        engine.mext_grad_norm = None
        ready = engine.__dict__.pop("mext_norm_ready", None)  # computed already by the trainer's bad-step check
        if clip > 0 or engine.mext_want_norm or ready is not None:
            norm = ready if ready is not None else model_parallel_grad_norm(engine.module)
            engine.mext_grad_norm = norm
            if clip > 0:
                grads = [p.grad.detach() for p in engine.module.parameters() if p.grad is not None]
                if grads:
                    scale = torch.clamp(clip / (norm + 1e-6), max=1.0).to(grads[0].dtype)
                    torch._foreach_mul_(grads, scale)
        return original(*args, **kwargs)

    engine._take_model_step = take_model_step


def _skip_single_replica_allreduce(engine) -> None:
    """With one data-parallel replica and no ZeRO, DeepSpeed's gradient all-reduce is pure overhead: it still
    flattens every gradient into one buffer (``torch.cat`` over all parameters), all-reduces it over a group of one,
    divides by 1 and copies the buffer back. Turn it off there; the gradients are bit-for-bit the same. ZeRO >= 1
    keeps it (its reduce also fills the optimizer's partitions), and the pipeline engine reduces through its own
    schedule."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    purpose = "skipping the gradient all-reduce of a single data-parallel replica"
    if isinstance(engine, PipelineEngine) or engine.zero_optimization_stage() != 0:
        return
    if deepspeed_internal(engine, "has_moe_layers", purpose) or deepspeed_internal(engine, "dp_world_size",
                                                                                  purpose) != 1:
        return
    deepspeed_internal(engine, "enable_backward_allreduce", purpose)  # a renamed switch would be set in vain
    engine.enable_backward_allreduce = False


def _safe_checkpoint_loading(engine) -> None:
    """DeepSpeed unpickles its checkpoint files in full (its torch checkpoint engine calls ``torch.load`` without
    ``weights_only``): a checkpoint directory from elsewhere -- ``model.ckpt_path=<dir>``, or a resumed run
    directory -- could run code. Its checkpoint engine reads through ``megatron_ext.checkpoint.safe_load`` instead
    (tensors, plain values and DeepSpeed's few optimizer-state types; anything else is refused naming the file)."""
    deepspeed_internal(engine, "checkpoint_engine", "reading checkpoints through the safe loader")
    install_safe_checkpoint_engine(engine)

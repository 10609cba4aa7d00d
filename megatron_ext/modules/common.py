"""Shared helpers for the TP-aware modules: init methods, megatron-core configs, dropout.

Conventions used by every module in this package:

* activations are batch-first, ``[batch, seq, hidden]`` (megatron-core's linear layers only
  multiply the last dimension, so no ``[s, b, h]`` transposes are needed without sequence
  parallelism);
* tensor-parallel layers are megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` /
  ``VocabParallelEmbedding`` built with ``use_cpu_initialization=True``: the full ("master")
  weight is drawn on every rank from the default CPU generator and each rank keeps its shard,
  so a model built with the same seed has the same full weights at any TP size;
* dropout on activations that are replicated across TP ranks uses the default generator
  (identical masks on every TP rank); dropout on TP-sharded activations runs inside
  ``get_rng_tracker().fork()`` (different masks per TP rank).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from megatron_ext.errors import ConfigError
from megatron_ext.parallel.random import MODEL_PARALLEL_RNG_TRACKER_NAME, get_rng_tracker
from megatron_ext.parallel.state import initialize_parallel

InitMethod = Callable[[torch.Tensor], torch.Tensor]


def init_method_normal(std: float) -> InitMethod:
    """normal(0, std) initialiser (used for every weight matrix and embedding)."""

    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)

    return init_


def scaled_init_method_normal(std: float, num_layers: int) -> InitMethod:
    """Megatron's scaled init for the projections that write into the residual stream:
    normal(0, std / sqrt(2 * num_layers))."""
    return init_method_normal(std / math.sqrt(2.0 * num_layers))


def tp_group():
    """megatron-core's tensor-model-parallel group (parallel_state must be initialised)."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def tp_world_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank()


def ensure_model_parallel(tensor_model_parallel_size: int, key: str = "model.tensor_model_parallel_size") -> None:
    """Make sure megatron-core's parallel groups exist with the configured TP size.

    A single process without groups gets a world of one (TP=1); TP>1 needs the launcher and
    ``megatron_ext.parallel.state.initialize_parallel`` first.
    """
    from megatron.core import parallel_state as ps

    tp = int(tensor_model_parallel_size)
    if not ps.model_parallel_is_initialized():
        if tp != 1:
            raise ConfigError(
                f"{key}={tp} but the parallel groups are not initialised; launch with torchrun and call "
                f"megatron_ext.parallel.state.initialize_parallel({tp}, ...) before building the model"
            )

        initialize_parallel(1, 1)
        return
    actual = ps.get_tensor_model_parallel_world_size()
    if actual != tp:
        raise ConfigError(
            f"{key}={tp} but the initialised tensor-parallel group has {actual} ranks; "
            f"call initialize_parallel({tp}, ...) or set {key}={actual}"
        )


def make_parallel_config(
    tensor_model_parallel_size: int,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
):
    """megatron-core ``ModelParallelConfig`` for CPU-initialised TP layers."""
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=int(tensor_model_parallel_size),
        sequence_parallel=bool(sequence_parallel),
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=params_dtype,
        gradient_accumulation_fusion=False,
    )


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout on TP-replicated activations (default generator); a no-op when p == 0."""
    if p <= 0.0 or not training:
        return x
    return F.dropout(x, p=p, training=True)


def parallel_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout on TP-sharded activations: draws from the tracker's model-parallel stream."""
    if p <= 0.0 or not training:
        return x
    with get_rng_tracker().fork(MODEL_PARALLEL_RNG_TRACKER_NAME):
        return F.dropout(x, p=p, training=True)


def check_divisible(numerator: int, denominator: int, what: str) -> None:
    if denominator <= 0 or numerator % denominator != 0:
        raise ConfigError(f"{what}: {numerator} is not divisible by {denominator}")


__all__ = [
    "init_method_normal",
    "scaled_init_method_normal",
    "tp_group",
    "tp_world_size",
    "tp_rank",
    "ensure_model_parallel",
    "make_parallel_config",
    "dropout",
    "parallel_dropout",
    "check_divisible",
]

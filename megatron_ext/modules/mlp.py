"""Tensor-parallel MLP: ``ColumnParallelLinear -> activation -> RowParallelLinear``.

GELU (exact erf form): ``fc2(gelu(fc1(x)))`` with ``fc1: h -> ffn``; ``gelu_tanh``: the same with GELU's tanh
approximation (GPT-2's ``gelu_new``, ``F.gelu(approximate="tanh")``).
SwiGLU: ``fc2(silu(gate) * up)`` with ``fc1: h -> 2*ffn``. The full fc1 weight is laid out
``[gate (ffn rows); up (ffn rows)]`` and built with megatron's ``stride=2`` so that TP shard r
holds ``[gate_r; up_r]`` -- each rank splits its local output in two halves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ext.config.model_validation import ACTIVATIONS
from megatron_ext.modules.common import InitMethod, check_divisible, tp_group, tp_world_size
from megatron_ext.modules.linear import ColumnParallelLinear, RowParallelLinear


class ParallelMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        *,
        parallel_config,
        init_method: InitMethod,
        output_init_method: InitMethod,
        activation: str = "gelu",
        bias: bool = True,
    ):
        super().__init__()

        activation = str(activation).lower()
        assert activation in ACTIVATIONS, activation  # checked with the config (config.model_validation)
        check_divisible(ffn_hidden_size, tp_world_size(), "ffn_hidden_size / tensor_model_parallel_size")
        self.activation = activation
        self.gated = activation == "swiglu"
        group = tp_group()
        self.linear_fc1 = ColumnParallelLinear(
            hidden_size,
            2 * ffn_hidden_size if self.gated else ffn_hidden_size,
            config=parallel_config,
            init_method=init_method,
            bias=bias,
            gather_output=False,
            stride=2 if self.gated else 1,
            tp_group=group,
        )
        self.linear_fc2 = RowParallelLinear(
            ffn_hidden_size,
            hidden_size,
            config=parallel_config,
            init_method=output_init_method,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=group,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h, _ = self.linear_fc1(hidden_states)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.gelu(h)
        out, _ = self.linear_fc2(h)
        return out


__all__ = ["ParallelMLP", "ACTIVATIONS"]

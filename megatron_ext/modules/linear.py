"""megatron-core's tensor-parallel linear layers with a lean forward for the common case.

``ColumnParallelLinear`` / ``RowParallelLinear`` here *are* megatron-core's classes (same
constructor, parameters, CPU master-weight init, TP attributes, state-dict keys and
``sharded_state_dict``). Only ``forward`` differs, and only on the plain path (no sequence
parallelism, no gradient-accumulation fusion, no expert layers, no output gather, no CPU
offloading): there it is ``F.linear`` -- the bias fused into ``addmm`` and PyTorch's native
autograd -- wrapped in megatron-core's own TP mappings (``copy_to_tensor_model_parallel_region``
before a column-parallel matmul: identity forward, all-reduce of the input gradient backward;
``reduce_from_tensor_model_parallel_region`` after a row-parallel matmul: all-reduce forward,
identity backward). This is the same math as megatron-core's
``LinearWithGradAccumulationAndAsyncCommunication`` without its separate bias-add pass and
extra copies; anything else falls back to megatron-core's forward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear as _MCoreColumnParallelLinear
from megatron.core.tensor_parallel import RowParallelLinear as _MCoreRowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)


def _plain_path(layer) -> bool:
    cfg = layer.config
    return (
        not layer.sequence_parallel
        and not layer.gradient_accumulation_fusion
        and not layer.is_expert
        and not getattr(cfg, "defer_embedding_wgrad_compute", False)
        and getattr(cfg, "_cpu_offloading_context", None) is None
    )


class ColumnParallelLinear(_MCoreColumnParallelLinear):
    __doc__ = _MCoreColumnParallelLinear.__doc__

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._plain = _plain_path(self) and not self.disable_grad_reduce
        self._tp_size = self.tp_group.size() if self.tp_group is not None else 1

    def forward(
        self,
        input_: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if not self._plain or gather:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        if weight is None:
            if self.weight is None:
                raise RuntimeError(
                    "weight was not supplied to ColumnParallelLinear forward pass "
                    "and skip_weight_param_allocation is True."
                )
            weight = self.weight
        elif weight.shape != (self.output_size_per_partition, self.input_size):
            raise RuntimeError(
                f"supplied weight's shape is {tuple(weight.shape)}, "
                f"not {(self.output_size_per_partition, self.input_size)} as expected"
            )
        if self._tp_size > 1:
            input_ = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        if self.skip_bias_add:
            return F.linear(input_, weight), self.bias
        return F.linear(input_, weight, self.bias), None


class RowParallelLinear(_MCoreRowParallelLinear):
    __doc__ = _MCoreRowParallelLinear.__doc__

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._plain = _plain_path(self) and self.input_is_parallel and not self.explicit_expert_comm
        self._tp_size = self.tp_group.size() if self.tp_group is not None else 1

    def forward(self, input_: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not self._plain:
            return super().forward(input_)
        if self._tp_size == 1:
            if self.skip_bias_add:
                return F.linear(input_, self.weight), self.bias
            return F.linear(input_, self.weight, self.bias), None
        out = reduce_from_tensor_model_parallel_region(F.linear(input_, self.weight), group=self.tp_group)
        if self.skip_bias_add:
            return out, self.bias
        if self.bias is not None:
            out = out + self.bias
        return out, None


__all__ = ["ColumnParallelLinear", "RowParallelLinear"]

"""Transformer building blocks on megatron-core tensor-parallel layers (CPU and GPU)."""
from megatron_ext.modules.attention import ParallelCrossAttention, ParallelSelfAttention
from megatron_ext.modules.common import (
    init_method_normal,
    make_parallel_config,
    scaled_init_method_normal,
)
from megatron_ext.modules.mlp import ParallelMLP
from megatron_ext.modules.norms import build_norm
from megatron_ext.modules.rotary import RotaryEmbedding, apply_rotary
from megatron_ext.modules.transformer import TransformerBlock, TransformerLayer

__all__ = [
    "ParallelSelfAttention",
    "ParallelCrossAttention",
    "ParallelMLP",
    "TransformerLayer",
    "TransformerBlock",
    "RotaryEmbedding",
    "apply_rotary",
    "build_norm",
    "init_method_normal",
    "scaled_init_method_normal",
    "make_parallel_config",
]

"""LayerNorm / RMSNorm from torch built-ins (fused kernels on CPU and GPU).

Norm parameters are replicated across tensor-parallel ranks (they act on full hidden
vectors), so their gradients are identical on every TP rank.
"""
from __future__ import annotations

from torch import nn

from megatron_ext.config.model_validation import NORMALIZATIONS
from megatron_ext.errors import ConfigError


def build_norm(
    normalization: str,
    hidden_size: int,
    eps: float = 1e-5,
    bias: bool = True,
    key: str = "model.normalization",
) -> nn.Module:
    """``nn.LayerNorm`` (with a bias when ``bias``) or ``nn.RMSNorm`` over the last dimension."""
    name = str(normalization).lower()
    if name == "layernorm":
        return nn.LayerNorm(hidden_size, eps=eps, bias=bias)
    if name == "rmsnorm":
        return nn.RMSNorm(hidden_size, eps=eps)
    raise ConfigError(f"{key}={normalization!r}: expected one of {', '.join(NORMALIZATIONS)}")


__all__ = ["build_norm", "NORMALIZATIONS"]

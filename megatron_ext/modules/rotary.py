"""Rotary position embedding (RoPE), "rotate-half" convention (GPT-NeoX / HF Llama layout).

For a head vector ``x = [x1, x2]`` (two halves of ``head_dim``) at position ``p``::

    rope(x, p) = x * cos(p * f) + [-x2, x1] * sin(p * f),   f_i = base^(-2i / head_dim)

The angle table is computed in fp32 and cached per device (not a buffer, so ``model.to(bf16)``
cannot round the angles); it is cast to the activation dtype when applied.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0, max_positions: int = 2048):
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"rotary embedding needs an even head dimension, got {head_dim}")
        self.head_dim = int(head_dim)
        self.base = float(base)
        self.max_positions = int(max_positions)
        self._cache: Dict[Tuple[torch.device, torch.dtype, int], Tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, length: int, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        length = max(int(length), self.max_positions)
        key = (device, dtype, length)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        half = self.head_dim // 2
        inv_freq = 1.0 / (self.base ** (torch.arange(0, half, dtype=torch.float64, device=device) * 2.0 / self.head_dim))
        pos = torch.arange(length, dtype=torch.float64, device=device)
        angles = torch.outer(pos, inv_freq)  # [L, hd/2]
        angles = torch.cat([angles, angles], dim=-1)  # [L, hd]
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        self._cache = {k: v for k, v in self._cache.items() if k[0] != device or k[1] != dtype}
        self._cache[key] = (cos, sin)
        return cos, sin

    def cos_sin(
        self, seq_len: int, device: torch.device, dtype: torch.dtype, position_ids: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos/sin shaped to broadcast against ``[b, s, heads, head_dim]``:
        ``[s, 1, hd]`` for positions ``0..s-1`` or ``[b, s, 1, hd]`` for explicit ``position_ids``."""
        if position_ids is None:
            cos, sin = self._table(seq_len, device, dtype)
            return cos[:seq_len].unsqueeze(1), sin[:seq_len].unsqueeze(1)
        need = int(position_ids.max().item()) + 1 if position_ids.numel() else 0
        cos, sin = self._table(need, device, dtype)
        return cos[position_ids].unsqueeze(2), sin[position_ids].unsqueeze(2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` ``[b, s, heads, head_dim]`` with ``cos``/``sin`` from ``RotaryEmbedding.cos_sin``."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.addcmul(x * cos, rotated, sin)


__all__ = ["RotaryEmbedding", "apply_rotary"]

"""Tensor-parallel attention over ``torch.nn.functional.scaled_dot_product_attention``.

Heads are split over the tensor-parallel ranks. The fused QKV projection is a megatron-core
``ColumnParallelLinear(gather_output=False)`` whose output features are laid out by query group (megatron-core's
layout): for each of the ``ng = num_query_groups`` groups, its ``nh / ng`` query heads, then its key head, then its
value head, each ``head_dim`` features -- ``[(nh + 2 * ng) * head_dim]`` in all. With ``ng == nh`` (plain multi-head
attention, the default) this is ``[heads, 3 (q/k/v), head_dim]``. Each TP shard is a contiguous block of whole
groups (``ng % tp == 0``) with their queries, key and value; the output projection is a ``RowParallelLinear
(input_is_parallel=True)`` that all-reduces the partial sums. Grouped-query attention (``ng < nh``) runs SDPA with
``enable_gqa=True`` (the CPU flash kernel takes fewer key/value heads natively, backward included), so the keys and
values are never repeated per query head. Cross-attention uses a query
projection plus a fused KV projection laid out ``[heads, 2 (k/v), head_dim]``.

Masks follow megatron-core's convention: ``attention_mask`` is boolean and ``True`` marks a
position that may **not** be attended (broadcastable to ``[b, heads, s_q, s_kv]``). Without a
mask, self-attention is causal via SDPA's ``is_causal=True`` (fused kernel, no mask tensor). A
:class:`~megatron_ext.modules.doc_attention.DocumentMask` (segment ids of packed documents) in place of the mask
makes self-attention causal within each document (``model.data.reset_attention_mask``).
Attention-probability dropout runs inside the RNG tracker's model-parallel fork, so each TP rank
draws an independent mask for its own heads.

Incremental decoding (KV cache)
-------------------------------
The design follows megatron's ``InferenceParams``: one mutable :class:`KVCache` object per generation batch is
passed down the stack (``GPTModel.forward(..., inference_cache=cache)`` -> ``TransformerBlock`` -> every layer
gets ``cache.layer(i)``, a :class:`LayerKVCache`). It is off unless asked: without ``inference_cache`` /
``kv_cache`` the training forward runs exactly as before (no buffer, no extra mask).

* Buffers: per layer ``k``/``v`` ``[b, kv_heads_on_this_rank, max_length, head_dim]``, allocated on the first write
  (dtype/device of the keys); ``kv_heads`` is ``num_query_groups`` (grouped-query attention caches one key/value
  head per group: ``nh / ng`` times less memory than multi-head attention). With TP > 1 each rank caches only its
  own groups -- the cache is per rank, and the
  QKV/output projections' collectives are the same as in the uncached forward. Cross-attention (the
  encoder-decoder's decoder) caches its projected ``cross_k``/``cross_v`` ``[b, heads, S_enc, head_dim]`` on the
  first call, so the encoder memory is projected once per generation.
* Bookkeeping shared by every family (:class:`InferenceCache`, also the base of the Mega state cache):
  ``length`` (positions written, the same for every row), ``key_mask`` ``[b, max_length]`` (True = real token;
  ``None`` while every position is real) and ``num_real`` ``[b]`` (real tokens per row). A model step
  (``begin_step(new_mask, s)``) derives the new tokens' position ids from ``num_real`` -- a left-padded row's
  first real token gets position 0, as if the prompt were alone -- and records their padding; ``end_step(s)``
  advances ``length`` once the whole stack has run.
* Masks: the step's SDPA mask allows query ``length + i`` to see key ``j <= length + i`` whose ``key_mask`` is
  True, plus always its own position (so a padding query row is never empty; its output is never read). With no
  padding a one-token step needs no mask at all and a prefill uses the causal kernel.
* ``index_select(rows)`` reorders / drops / repeats rows of every buffer (beam search, finished rows).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ext.modules.common import InitMethod, check_divisible, tp_group, tp_rank, tp_world_size
from megatron_ext.modules.doc_attention import DocumentMask
from megatron_ext.modules.linear import ColumnParallelLinear, RowParallelLinear
from megatron_ext.modules.rotary import apply_rotary
from megatron_ext.parallel.random import (
    DATA_PARALLEL_RNG_TRACKER_NAME,
    MODEL_PARALLEL_RNG_TRACKER_NAME,
    get_rng_tracker,
)


def ensure_rng_tracker_seeded() -> None:
    """Add the tracker streams if nobody called ``model_parallel_manual_seed`` yet, derived
    from the default generator's seed (does not touch the global generators)."""
    tracker = get_rng_tracker()
    if MODEL_PARALLEL_RNG_TRACKER_NAME in tracker.names():
        return
    base = torch.initial_seed() % (2**62)
    if DATA_PARALLEL_RNG_TRACKER_NAME not in tracker.names():
        tracker.add(DATA_PARALLEL_RNG_TRACKER_NAME, base)
    tracker.add(MODEL_PARALLEL_RNG_TRACKER_NAME, base + 2718 + tp_rank())


def _sdpa(q, k, v, attn_mask, is_causal, dropout_p):
    """SDPA over ``q`` ``[b, nh, s, d]`` and ``k``/``v`` ``[b, ng, s_kv, d]`` (``ng`` divides ``nh``: grouped-query
    attention when ``ng < nh``, query head ``i`` attending key/value head ``i // (nh / ng)``)."""
    if dropout_p > 0.0:
        ctx = get_rng_tracker().fork(MODEL_PARALLEL_RNG_TRACKER_NAME)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        if is_causal and attn_mask is None and _split_causal_on_cpu(q, k, dropout_p):
            return _SplitCausalAttention.apply(q, k, v)
        gqa = {"enable_gqa": True} if k.shape[-3] != q.shape[-3] else {}
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                              **gqa)


# PyTorch's CPU flash-attention kernel walks the keys in blocks of up to 512 and skips only whole blocks above the
# causal diagonal, so for 256 < s <= 512 (one key block) ``is_causal=True`` computes the full s x s score matrix and
# masks half of it away. Splitting the queries in two halves -- the first attends causally to the first half of the
# keys, the second to all keys under an additive lower-triangular mask -- computes 3/4 of the scores instead. The
# split runs inside one autograd Function over the CPU kernel's own forward/backward ops, so the halves' gradients
# are stitched together directly (no zero-filled slice gradients). The split is used only in the range where it
# computes fewer scores than the kernel: above 512 the kernel already skips blocks, and at or below 256 the
# saving is too small to pay for the second call (figures: bench/ and the README). Attention dropout needs SDPA's own path (the CPU flash kernel has none).
_SPLIT_CAUSAL_MIN, _SPLIT_CAUSAL_MAX = 257, 512
_split_masks: dict = {}
_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_cpu_bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _split_causal_on_cpu(q: torch.Tensor, k: torch.Tensor, dropout_p: float) -> bool:
    s = q.shape[-2]
    return (
        _flash_cpu is not None
        and _flash_cpu_bwd is not None
        and dropout_p == 0.0
        and q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and k.shape[-2] == s
        and _SPLIT_CAUSAL_MIN <= s <= _SPLIT_CAUSAL_MAX
    )


def _split_mask(s: int, h: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask for queries h..s-1 over keys 0..s-1: query h + i may attend keys 0..h + i."""
    mask = _split_masks.get((s, dtype))
    if mask is None:
        allowed = torch.ones(s - h, s, dtype=torch.bool).tril(h)
        mask = torch.zeros(s - h, s, dtype=dtype).masked_fill_(~allowed, float("-inf"))
        _split_masks[(s, dtype)] = mask
    return mask


class _SplitCausalAttention(torch.autograd.Function):
    """Causal attention over ``[b, heads, s, d]`` as two query halves; same result as ``is_causal=True``. The CPU
    kernel (forward and backward) takes keys/values with fewer heads than the queries (grouped-query attention)."""

    @staticmethod
    def forward(ctx, q, k, v):
        s = q.shape[-2]
        h = s // 2
        mask = _split_mask(s, h, q.dtype)
        q1, k1, v1, q2 = q[..., :h, :], k[..., :h, :], v[..., :h, :], q[..., h:, :]
        o1, lse1 = _flash_cpu(q1, k1, v1, 0.0, True)
        o2, lse2 = _flash_cpu(q2, k, v, 0.0, False, attn_mask=mask)
        ctx.save_for_backward(q, k, v, o1, lse1, o2, lse2)
        # The kernel's outputs are [b, heads, s/2, d] views of [b, s/2, heads, d] memory; joining them in that
        # physical layout keeps the result a view too, so the caller's transpose(1, 2).reshape(b, s, hidden) is
        # free (as it is after SDPA) instead of one more copy of the attention output per layer.
        return torch.cat([o1.transpose(1, 2), o2.transpose(1, 2)], dim=1).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, o1, lse1, o2, lse2 = ctx.saved_tensors
        s = q.shape[-2]
        h = s // 2
        mask = _split_mask(s, h, q.dtype)
        g1, g2 = grad[..., :h, :], grad[..., h:, :]
        dq1, dk1, dv1 = _flash_cpu_bwd(g1, q[..., :h, :], k[..., :h, :], v[..., :h, :], o1, lse1, 0.0, True)
        dq2, dk, dv = _flash_cpu_bwd(g2, q[..., h:, :], k, v, o2, lse2, 0.0, False, attn_mask=mask)
        dk[..., :h, :] += dk1
        dv[..., :h, :] += dv1
        return torch.cat([dq1, dq2], dim=-2), dk, dv


def _sdpa_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > 0.5
    return ~attention_mask  # SDPA: True = may attend


class ParallelSelfAttention(nn.Module):
    """Self-attention with heads split over TP. Input/output ``[b, s, hidden]`` (replicated).
    ``num_query_groups`` (None = ``num_attention_heads``): key/value heads, each shared by ``nh / ng`` query heads
    (grouped-query attention; 1 = multi-query attention)."""

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        *,
        parallel_config,
        init_method: InitMethod,
        output_init_method: InitMethod,
        bias: bool = True,
        attention_dropout: float = 0.0,
        causal: bool = True,
        num_query_groups: Optional[int] = None,
    ):
        super().__init__()

        tp = tp_world_size()
        groups = num_attention_heads if num_query_groups is None else int(num_query_groups)
        check_divisible(hidden_size, num_attention_heads, "hidden_size / num_attention_heads")
        check_divisible(num_attention_heads, groups, "num_attention_heads / num_query_groups")
        check_divisible(groups, tp, "num_query_groups / tensor_model_parallel_size")
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_query_groups = groups
        self.head_dim = hidden_size // num_attention_heads
        self.num_heads_per_partition = num_attention_heads // tp
        self.num_query_groups_per_partition = groups // tp
        self.attention_dropout = float(attention_dropout)
        self.causal = bool(causal)
        if self.attention_dropout > 0.0:
            ensure_rng_tracker_seeded()
        group = tp_group()
        self.linear_qkv = ColumnParallelLinear(
            hidden_size,
            (num_attention_heads + 2 * groups) * self.head_dim,
            config=parallel_config,
            init_method=init_method,
            bias=bias,
            gather_output=False,
            tp_group=group,
        )
        self.linear_proj = RowParallelLinear(
            hidden_size,
            hidden_size,
            config=parallel_config,
            init_method=output_init_method,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=group,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        rotary_cos_sin: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        kv_cache: Optional["LayerKVCache"] = None,
    ) -> torch.Tensor:
        """``kv_cache`` (incremental decoding, see the module docstring): ``hidden_states`` are the new tokens;
        their keys/values are appended to the cache and the queries attend to every cached position under the
        cache's step mask (``attention_mask`` must then be None)."""
        b, s, _ = hidden_states.shape
        q, k, v = self.split_qkv(hidden_states)
        nh, hd = self.num_heads_per_partition, self.head_dim
        if rotary_cos_sin is not None:
            cos, sin = rotary_cos_sin
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, nh, s, hd]
        dropout_p = self.attention_dropout if self.training else 0.0
        if kv_cache is not None:
            if attention_mask is not None:
                raise ValueError("attention_mask must be None with a KV cache: the cache builds the step mask "
                                 "from its key padding mask")
            if not self.causal:
                raise ValueError("a KV cache needs causal self-attention (a decoder)")
            k, v = kv_cache.append(k, v)  # [b, ng, length + s, hd]
            mask, causal = kv_cache.owner.step_mask()
            ctx = _sdpa(q, k, v, mask, causal, dropout_p)
        elif isinstance(attention_mask, DocumentMask):  # packed documents (modules/doc_attention.py)
            if not self.causal:
                raise ValueError("document masks (segment ids) are for causal self-attention (a decoder)")
            ctx = attention_mask.attend(q, k, v, dropout_p, _sdpa)  # [b, nh, s, hd]
        else:
            mask = _sdpa_mask(attention_mask)
            ctx = _sdpa(q, k, v, mask, self.causal and mask is None, dropout_p)  # [b, nh, s, hd]
        ctx = ctx.transpose(1, 2).reshape(b, s, nh * hd)
        out, _ = self.linear_proj(ctx)
        return out

    def split_qkv(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection of ``hidden_states`` ``[b, s, h]`` -> q ``[b, s, nh, hd]``, k and v
        ``[b, s, ng, hd]`` (this rank's heads and groups; see the module docstring for the row layout)."""
        b, s, _ = hidden_states.shape
        nh, ng, hd = self.num_heads_per_partition, self.num_query_groups_per_partition, self.head_dim
        qkv, _ = self.linear_qkv(hidden_states)  # [b, s, ng * (nh/ng + 2) * hd]
        if ng == nh:  # multi-head attention: each [b, s, nh, hd] (strided views)
            return qkv.view(b, s, nh, 3, hd).unbind(3)
        per = nh // ng
        grouped = qkv.view(b, s, ng, per + 2, hd)
        q = grouped[:, :, :, :per].reshape(b, s, nh, hd)  # query head g * per + j of group g
        return q, grouped[:, :, :, per], grouped[:, :, :, per + 1]


class ParallelCrossAttention(nn.Module):
    """Cross-attention (queries from ``hidden_states``, keys/values from ``context``), heads
    split over TP. ``context`` may have its own width ``kv_hidden_size``."""

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        *,
        parallel_config,
        init_method: InitMethod,
        output_init_method: InitMethod,
        kv_hidden_size: Optional[int] = None,
        bias: bool = True,
        attention_dropout: float = 0.0,
    ):
        super().__init__()

        tp = tp_world_size()
        check_divisible(hidden_size, num_attention_heads, "hidden_size / num_attention_heads")
        check_divisible(num_attention_heads, tp, "num_attention_heads / tensor_model_parallel_size")
        kv_hidden_size = hidden_size if kv_hidden_size is None else int(kv_hidden_size)
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.num_heads_per_partition = num_attention_heads // tp
        self.attention_dropout = float(attention_dropout)
        if self.attention_dropout > 0.0:
            ensure_rng_tracker_seeded()
        group = tp_group()
        common = dict(config=parallel_config, init_method=init_method, bias=bias, gather_output=False, tp_group=group)
        self.linear_q = ColumnParallelLinear(hidden_size, hidden_size, **common)
        self.linear_kv = ColumnParallelLinear(kv_hidden_size, 2 * hidden_size, **common)
        self.linear_proj = RowParallelLinear(
            hidden_size,
            hidden_size,
            config=parallel_config,
            init_method=output_init_method,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=group,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        key_rotary_cos_sin: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        kv_cache: Optional["LayerKVCache"] = None,
    ) -> torch.Tensor:
        """``hidden_states`` ``[b, s_q, h]``, ``context`` ``[b, s_kv, h_kv]``; ``attention_mask``
        (True = masked) broadcastable to ``[b, heads, s_q, s_kv]``, e.g. ``[b, 1, 1, s_kv]`` padding.

        ``key_rotary_cos_sin`` (optional, from ``RotaryEmbedding.cos_sin`` over the context positions) rotates the
        keys only: every query sits at position 0, so the score depends on the key's position (the Perceiver's
        latents have no order, but its token inputs would otherwise carry no position under rope).

        ``kv_cache`` (incremental decoding): the projected keys/values of ``context`` are computed on the first
        call and reused afterwards (``context`` is then not read; it may be None)."""
        b, sq, _ = hidden_states.shape
        nh, hd = self.num_heads_per_partition, self.head_dim
        q, _ = self.linear_q(hidden_states)
        q = q.view(b, sq, nh, hd).transpose(1, 2)
        if kv_cache is not None and kv_cache.cross_k is not None:
            k, v = kv_cache.cross_k, kv_cache.cross_v
        else:
            if context is None:
                raise ValueError("cross-attention needs the context (encoder output) on its first call")
            skv = context.shape[1]
            kv, _ = self.linear_kv(context)
            k, v = kv.view(b, skv, nh, 2, hd).unbind(3)  # [b, skv, nh, hd]
            if key_rotary_cos_sin is not None:
                k = apply_rotary(k, *key_rotary_cos_sin)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if kv_cache is not None:
                kv_cache.cross_k, kv_cache.cross_v = k, v
        dropout_p = self.attention_dropout if self.training else 0.0
        ctx = _sdpa(q, k, v, _sdpa_mask(attention_mask), False, dropout_p)
        ctx = ctx.transpose(1, 2).reshape(b, sq, nh * hd)
        out, _ = self.linear_proj(ctx)
        return out


# ---------------------------------------------------------------------------------------------------------------
# incremental decoding


def _check_count(name: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
    return int(value)


class InferenceCache:
    """Family-independent incremental-decoding bookkeeping (see the module docstring): ``length``,
    ``key_mask`` (True = real token, None while all are real), ``num_real`` (real tokens per row).
    Subclasses hold the model state (:class:`KVCache`: attention keys/values; the Mega models' state cache)."""

    def __init__(self, batch_size: int, max_length: int):
        self.batch_size = _check_count("batch_size", batch_size, 1)
        self.max_length = _check_count("max_length", max_length, 1)
        self.length = 0
        self.key_mask: Optional[torch.Tensor] = None
        self.num_real: Optional[torch.Tensor] = None
        self._step: Optional[int] = None  # tokens of the step in progress
        self._num_real_before: Optional[torch.Tensor] = None

    def begin_step(self, new_mask: Optional[torch.Tensor], s: int, device: torch.device) -> torch.Tensor:
        """Start a step of ``s`` new tokens per row; ``new_mask`` ``[b, s]`` (True = real; None = all real).
        Records their padding and returns their position ids ``[b, s]`` (real tokens counted per row)."""
        if self._step is not None:
            raise RuntimeError("InferenceCache: the previous step did not finish (an error inside the model?); "
                               "start generation again with a new cache")
        if s < 1:
            raise ValueError("an incremental step needs at least one new token")
        if self.length + s > self.max_length:
            raise ValueError(f"the cache holds max_length={self.max_length} positions; {self.length} are used and "
                             f"{s} more were given")
        b = self.batch_size
        if self.num_real is None:
            self.num_real = torch.zeros(b, dtype=torch.long, device=device)
        self._num_real_before = self.num_real
        if new_mask is not None:
            if tuple(new_mask.shape) != (b, s):
                raise ValueError(f"padding_mask shape {tuple(new_mask.shape)}: expected [batch={b}, new tokens={s}]")
            new_mask = new_mask.to(device=device, dtype=torch.bool)
            if self.key_mask is None:
                self.key_mask = torch.ones(b, self.max_length, dtype=torch.bool, device=device)
            self.key_mask[:, self.length:self.length + s] = new_mask
            counts = new_mask.long().cumsum(dim=1)
            positions = (self.num_real[:, None] + counts - 1).clamp(min=0)
            self.num_real = self.num_real + counts[:, -1]
        else:
            if self.key_mask is not None:
                self.key_mask[:, self.length:self.length + s] = True
            positions = self.num_real[:, None] + torch.arange(s, device=device)
            self.num_real = self.num_real + s
        self._step = s
        return positions

    def end_step(self) -> None:
        self.length += int(self._step)
        self._step = None

    def abort_step(self) -> None:
        """Forget the step in progress (the model raised): positions and length are as before it."""
        if self._step is not None:
            self.num_real = self._num_real_before
        self._step = None

    def history_mask(self) -> Optional[torch.Tensor]:
        """``[b, length + s]`` real-token mask of everything seen so far including the step in progress."""
        if self.key_mask is None:
            return None
        return self.key_mask[:, : self.length + (self._step or 0)]

    def max_position(self) -> int:
        """The largest position id used so far (-1 before the first step)."""
        return -1 if self.num_real is None else int(self.num_real.max().item()) - 1

    def index_select(self, rows: torch.Tensor) -> None:
        """Keep rows ``rows`` (a 1-D index: reorder, drop or repeat rows) of every state tensor."""
        rows = rows.to(dtype=torch.long)
        if rows.dim() != 1 or rows.numel() < 1:
            raise ValueError("index_select needs a non-empty 1-D index of rows")
        if self.num_real is not None:
            rows = rows.to(self.num_real.device)
            self.num_real = self.num_real.index_select(0, rows)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, rows.to(self.key_mask.device))
        self._index_select_state(rows)
        self.batch_size = int(rows.numel())

    def _index_select_state(self, rows: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class LayerKVCache:
    """One attention layer's buffers in a :class:`KVCache`: self-attention ``k``/``v``
    ``[b, kv_heads_on_this_rank, max_length, head_dim]`` (one per query group) and the cross-attention
    ``cross_k``/``cross_v``."""

    __slots__ = ("owner", "k", "v", "cross_k", "cross_v")

    def __init__(self, owner: "KVCache"):
        self.owner = owner
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.cross_k: Optional[torch.Tensor] = None
        self.cross_v: Optional[torch.Tensor] = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write the step's keys/values ``[b, ng, s, hd]`` at ``owner.length``; -> all keys/values so far."""
        owner = self.owner
        b, nh, s, hd = k.shape
        if b != owner.batch_size:
            raise ValueError(f"the KV cache holds {owner.batch_size} rows, the input has {b}")
        if self.k is None:
            shape = (b, nh, owner.max_length, hd)
            self.k = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(shape, dtype=v.dtype, device=v.device)
        start, end = owner.length, owner.length + s
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def index_select(self, rows: torch.Tensor) -> None:
        for name in ("k", "v", "cross_k", "cross_v"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, rows.to(t.device)))


class KVCache(InferenceCache):
    """Key/value cache of a transformer stack (see the module docstring). ``layer(i)`` is layer ``i``'s
    :class:`LayerKVCache`; ``step_mask()`` the SDPA mask of the step in progress (built once per step)."""

    def __init__(self, batch_size: int, max_length: int):
        super().__init__(batch_size, max_length)
        self.layers: List[LayerKVCache] = []
        self._mask: Optional[Tuple[Optional[torch.Tensor], bool]] = None

    def layer(self, i: int) -> LayerKVCache:
        while len(self.layers) <= i:
            self.layers.append(LayerKVCache(self))
        return self.layers[i]

    def begin_step(self, new_mask, s, device):
        positions = super().begin_step(new_mask, s, device)
        self._mask = None
        return positions

    def end_step(self) -> None:
        super().end_step()
        self._mask = None

    def abort_step(self) -> None:
        super().abort_step()
        self._mask = None

    def step_mask(self) -> Tuple[Optional[torch.Tensor], bool]:
        """(SDPA mask ``[b, 1, s, length + s]`` with True = may attend, or None; is_causal) for the step."""
        if self._mask is None:
            self._mask = self._build_mask()
        return self._mask

    def _build_mask(self) -> Tuple[Optional[torch.Tensor], bool]:
        s = int(self._step or 0)
        start, end = self.length, self.length + s
        if self.key_mask is None:
            if s == 1:
                return None, False  # one new query sees every cached key
            if start == 0:
                return None, True  # a fresh prefill: the causal kernel
        device = self.num_real.device
        qpos = torch.arange(start, end, device=device)[:, None]
        kpos = torch.arange(end, device=device)[None, :]
        allowed = kpos <= qpos  # [s, end]
        if self.key_mask is not None:
            allowed = (allowed & self.key_mask[:, None, :end]) | (kpos == qpos)  # [b, s, end]
            return allowed[:, None], False
        return allowed, False

    def _index_select_state(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.index_select(rows)


__all__ = [
    "ParallelSelfAttention",
    "ParallelCrossAttention",
    "ensure_rng_tracker_seeded",
    "InferenceCache",
    "KVCache",
    "LayerKVCache",
]

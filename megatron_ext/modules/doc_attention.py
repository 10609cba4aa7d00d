"""Attention that stays inside documents of a packed sequence (``model.data.reset_attention_mask=true``).

A packed GPT sample holds several documents separated by ``eod`` (megatron-core's ``GPTDataset`` convention: the
``eod`` token ends its document, the token after it starts the next one). The batch carries the document structure
compactly as per-token **segment ids** (int32 ``[b, s]``: document number within the row, see
:func:`segment_ids_from_tokens`), never an ``s x s`` mask per sample. The model wraps them in a
:class:`DocumentMask` once per forward; every self-attention layer then attends causally *within* each document.

Implementations (``model.document_attention``):

* ``mask``: the explicit boolean mask ``[b, 1, s, s]`` (same document and causal), built once per forward from the
  segment ids and passed to SDPA -- the reference path; it materialises ``b * s * s`` booleans and SDPA computes
  every score of the row;
* ``packed``: the documents are gathered out of the rows into right-padded batches (documents of similar length
  together: one batch per power-of-two length class) and run through causal SDPA without any mask (the fused
  kernel); the outputs are scattered back. Right padding under a causal mask is exact: a real query never sees a
  later (padding) key. It computes about ``sum(len_i^2) / 2`` scores instead of ``s^2`` per row, no mask tensor;
* ``varlen``: CUDA only, fp16/bf16 and no attention dropout: ``torch.nn.attention.varlen.varlen_attn`` (flash
  attention over the unpadded tokens with ``cu_seqlens``), nothing padded at all. Opt-in: it has not run on a GPU
  in this project's tests (no GPU was available), so ``auto`` does not pick it;
* ``auto`` (default): on the CPU ``mask`` up to ``AUTO_MASK_MAX_CPU`` (128) tokens and ``packed`` above (see the
  constant and ``bench/bench_docmask.py``); on CUDA ``packed`` (SDPA's causal flash kernel runs the padded document
  batches; an explicit mask would keep SDPA off the flash kernel).

FlexAttention (``torch.nn.attention.flex_attention``) is not used: in torch 2.13 it has no backward on CPU.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from megatron_ext.config.model_validation import DOCUMENT_ATTENTION_IMPLS
from megatron_ext.errors import DataError

try:  # torch >= 2.9 (CUDA flash attention over cu_seqlens)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older torch
    _varlen_attn = None


def segment_ids_from_tokens(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Per-token document number (int32 ``[b, s]``): the number of ``eod`` tokens strictly before each token in its
    row (an ``eod`` belongs to the document it ends). The same documents megatron-core's ``GPTDataset`` masks with
    ``reset_attention_mask`` (``_get_ltor_masks_and_position_ids``)."""
    is_eod = (tokens == int(eod)).to(torch.int32)
    return (is_eod.cumsum(dim=-1, dtype=torch.int32) - is_eod).to(torch.int32)


def document_position_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at every document (int64, same shape): ``reset_position_ids`` from segment ids."""
    s = segment_ids.shape[-1]
    idx = torch.arange(s, device=segment_ids.device).expand_as(segment_ids)
    start = torch.zeros_like(segment_ids, dtype=torch.bool)
    start[..., 0] = True
    start[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return (idx - first).long()


def check_segment_ids(segment_ids: torch.Tensor, tokens: torch.Tensor) -> None:
    """A DataError unless ``segment_ids`` is an integer tensor shaped like ``tokens``."""
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.is_floating_point() or segment_ids.dtype == torch.bool:
        raise DataError(f"segment_ids must be an integer tensor [batch, seq] of document numbers, got "
                        f"{getattr(segment_ids, 'dtype', type(segment_ids).__name__)}")
    if tuple(segment_ids.shape) != tuple(tokens.shape):
        raise DataError(f"segment_ids shape {tuple(segment_ids.shape)} does not match tokens {tuple(tokens.shape)}")


# ``auto`` on the CPU: the explicit mask up to this sequence length, the packed path above it. Measured on a quiet
# 2-core machine (bench/bench_docmask.py, 4 documents per row; README "Document masking"): at 128 tokens the mask is
# 4-11% faster (the packed path's gathers cost more than the skipped scores save), from 256 on the packed path is
# faster (attention fwd+bwd 1.3x at 256, 1.6x at 512, 2.5x at 2048; a whole train step 1.01x, 1.03x, 1.39x).
AUTO_MASK_MAX_CPU = 128


class _Permute(torch.autograd.Function):
    """``x.index_select(0, index)`` where ``index`` is (part of) a permutation with a known inverse: the backward is
    another gather, ``grad.index_select(0, inverse)`` (then zero where ``valid`` is False), instead of
    index_select's scatter-add into a zero-filled buffer (several times slower on the CPU)."""

    @staticmethod
    def forward(ctx, x, index, inverse, valid):
        ctx.save_for_backward(inverse, valid)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        inverse, valid = ctx.saved_tensors
        out = grad.index_select(0, inverse)
        if valid is not None:
            out.masked_fill_(~valid.view(-1, *([1] * (out.dim() - 1))), 0)
        return out, None, None, None


class DocumentMask:
    """Document structure of a packed batch, shared by all layers of one forward (``attention_mask`` argument of
    the transformer layers). Everything derived from the segment ids (dense mask, gather/scatter indices,
    ``cu_seqlens``) is computed on first use and cached here, so a forward builds it once, not per layer."""

    def __init__(self, segment_ids: torch.Tensor, impl: str = "auto"):
        if impl not in DOCUMENT_ATTENTION_IMPLS:
            raise ValueError(f"model.document_attention={impl!r}: expected one of "
                             f"{', '.join(DOCUMENT_ATTENTION_IMPLS)}")
        self.segment_ids = segment_ids
        self.impl = impl
        self._dense: Optional[torch.Tensor] = None
        self._docs = None
        self._packing = None

    # -------------------------------------------------------------- derived structure
    def dense(self) -> torch.Tensor:
        """SDPA mask ``[b, 1, s, s]``, True = may attend: same document and key <= query."""
        if self._dense is None:
            seg = self.segment_ids
            s = seg.shape[-1]
            causal = torch.ones(s, s, dtype=torch.bool, device=seg.device).tril()
            self._dense = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
        return self._dense

    def documents(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[int]]:
        """(doc id per flat token ``[b*s]``, start ``[n]``, length ``[n]`` (device tensors), lengths on the host)."""
        if self._docs is None:
            seg = self.segment_ids
            b, s = seg.shape
            new = torch.ones(b, s, dtype=torch.bool, device=seg.device)
            new[:, 1:] = seg[:, 1:] != seg[:, :-1]
            flat = new.reshape(-1)
            doc = flat.long().cumsum(0) - 1
            start = flat.nonzero().squeeze(1)
            length = torch.diff(start, append=torch.tensor([b * s], device=seg.device))
            self._docs = (doc, start, length, length.tolist())
        return self._docs

    def packing(self):
        """Right-padded document batches: (list of (gather index ``[n_j * L_j]``, n_j, L_j), scatter index
        ``[b*s]`` into the concatenation of the batches' slots, gather index of all slots, real-slot mask). A padding
        slot gathers its document's last token (any real row would do: causal attention never lets a real query see
        it, and it gets no gradient)."""
        if self._packing is None:
            doc, start, length, lengths = self.documents()
            device = start.device
            classes = {}
            for d, n in enumerate(lengths):  # length class: the next power of two
                classes.setdefault(1 << max(0, (n - 1).bit_length()), []).append(d)
            groups, row_base = [], torch.empty(len(lengths), dtype=torch.long)
            gathers, valids = [], []
            offset = 0
            for key in sorted(classes):
                docs = classes[key]
                L = max(lengths[d] for d in docs)
                ids = torch.tensor(docs, dtype=torch.long)
                row_base[ids] = offset + torch.arange(len(docs)) * L
                ids = ids.to(device)
                ar = torch.arange(L, device=device)
                gather = (start[ids, None] + torch.minimum(ar[None, :], length[ids, None] - 1)).reshape(-1)
                groups.append((gather, len(docs), L))
                gathers.append(gather)
                valids.append((ar[None, :] < length[ids, None]).reshape(-1))
                offset += len(docs) * L
            pos = torch.arange(doc.numel(), device=device) - start[doc]
            scatter = row_base.to(device)[doc] + pos
            self._packing = (groups, scatter, torch.cat(gathers), torch.cat(valids))
        return self._packing

    def cu_seqlens(self) -> Tuple[torch.Tensor, int]:
        _, start, _, lengths = self.documents()
        total = torch.tensor([self.segment_ids.numel()], device=start.device)
        return torch.cat([start, total]).to(torch.int32), max(lengths)

    # -------------------------------------------------------------- attention
    def resolve_impl(self, q: torch.Tensor, dropout_p: float) -> str:
        if self.impl != "auto":
            return self.impl
        if q.device.type == "cpu" and q.shape[-2] <= AUTO_MASK_MAX_CPU:
            return "mask"
        return "packed"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, sdpa) -> torch.Tensor:
        """Causal attention within documents. ``q`` ``[b, heads, s, d]``, ``k``/``v`` ``[b, kv_heads, s, d]``
        (``kv_heads`` divides ``heads``: grouped-query attention) -> ``[b, heads, s, d]``.
        ``sdpa(q, k, v, mask, is_causal, dropout_p)`` is the layer's SDPA (RNG tracker fork, CPU kernels)."""
        b, nh, s, hd = q.shape
        ng = k.shape[1]
        if tuple(self.segment_ids.shape) != (b, s):
            raise ValueError(f"segment_ids {tuple(self.segment_ids.shape)} do not match the attention input "
                             f"[batch={b}, seq={s}]")
        impl = self.resolve_impl(q, dropout_p)
        if impl == "mask":
            return sdpa(q, k, v, self.dense(), False, dropout_p)
        # token-major [b*s, heads, d] views (the QKV projection's layout)
        qt, kt, vt = (x.transpose(1, 2).reshape(b * s, x.shape[1], hd) for x in (q, k, v))
        if impl == "varlen":
            if _varlen_attn is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
                raise ValueError("model.document_attention=varlen needs CUDA and fp16/bf16 activations "
                                 f"(torch.nn.attention.varlen); got {q.device.type}, {q.dtype}: use packed or auto")
            if dropout_p > 0.0:
                raise ValueError("model.document_attention=varlen has no attention dropout; set "
                                 "model.attention_dropout=0 or use packed / auto")
            cu, max_len = self.cu_seqlens()
            gqa = {"enable_gqa": True} if ng != nh else {}
            out = _varlen_attn(qt.contiguous(), kt.contiguous(), vt.contiguous(), cu, cu, max_len, max_len,
                               window_size=(-1, 0), **gqa)
            return out.view(b, s, nh, hd).transpose(1, 2)
        groups, scatter, gather_all, valid = self.packing()
        # one gather of all slots per tensor (backward: a gather by the inverse map), then per length class a view
        sizes = [n * L for _, n, L in groups]
        # split (not slices): its backward is one concatenation, not a zero-filled buffer per slice
        qs, ks, vs = (_Permute.apply(x, gather_all, scatter, None).split(sizes) for x in (qt, kt, vt))
        outs = []
        for (_, n, L), qd, kd, vd in zip(groups, qs, ks, vs):
            qd, kd, vd = (x.view(n, L, x.shape[1], hd).transpose(1, 2) for x in (qd, kd, vd))
            o = sdpa(qd, kd, vd, None, True, dropout_p)  # [n, heads, L, d]
            outs.append(o.transpose(1, 2).reshape(n * L, nh, hd))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        return _Permute.apply(out, scatter, gather_all, valid).view(b, s, nh, hd).transpose(1, 2)


__all__ = ["DOCUMENT_ATTENTION_IMPLS", "DocumentMask", "segment_ids_from_tokens", "document_position_ids",
           "check_segment_ids"]

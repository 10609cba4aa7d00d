"""Autoregressive decoding for the encoder-decoder from a given encoder memory (``[S, B, H]`` + mask).

``generate_from_memory(model, memory, memory_mask, bos, eos, max_new_tokens, ...)`` decodes with the decoder's
inference cache (``EncoderDecoderModel.new_inference_cache``: self-attention keys/values appended step by step,
cross-attention keys/values projected from the memory once; a Mega decoder uses its own state) through the shared
decoding session and sampling code of ``megatron_ext.inference.generation``: the next token is picked greedily or
by sampling (temperature, top-k, top-p) over the full, padding-free vocabulary (``gather_logits`` trims the padded
ids), a sequence stops at ``eos`` (finished rows leave the batch) and token lists come back without bos/eos.
``use_cache=False`` re-runs the decoder over the prefix at every step (the reference; same tokens).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from megatron_ext.inference.generation import EncDecSession, choose_tokens, process_logits
from megatron_ext.models.encoder_decoder import resolve_seq_length_dec


@torch.no_grad()
def generate_from_memory(
    model,
    memory: torch.Tensor,
    memory_mask: Optional[torch.Tensor],
    *,
    bos: int,
    eos: int,
    max_new_tokens: int = 128,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    banned_ids: Optional[List[int]] = None,
    use_cache: bool = True,
) -> List[List[int]]:
    """Decode ``B`` sequences from ``memory`` ``[S, B, H]``. ``banned_ids`` (e.g. pad, mask) are never produced.
    At most ``min(max_new_tokens, seq_length_dec - 1)`` tokens (the decoder was trained on ``seq_length_dec``
    positions: bos + text)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature={temperature}: expected > 0 when sampling")
    if memory.dim() != 3:
        raise ValueError(f"memory must be [S, B, H], got shape {tuple(memory.shape)}")
    limit = max_new_tokens
    cfg = getattr(model, "config", None)
    if cfg is not None:  # the decoder was trained on seq_length_dec positions (bos + text)

        limit = max(1, min(limit, resolve_seq_length_dec(cfg) - 1))
    top_k = int(top_k) if top_k and top_k > 0 else None
    top_p = float(top_p) if top_p < 1.0 else None
    was_training = model.training
    model.eval()
    b = memory.shape[1]
    out: List[List[int]] = [[] for _ in range(b)]
    try:
        session = EncDecSession(model, memory, memory_mask, start_id=int(bos), max_new_tokens=limit,
                                use_cache=bool(use_cache) and bool(getattr(model, "supports_inference_cache", True)))
        active = list(range(b))
        for step in range(limit):
            logits = process_logits(session.logits, banned=banned_ids)
            nxt = choose_tokens(logits, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                                generator=generator)
            keep = []
            for j, tok in enumerate(nxt.tolist()):
                if int(tok) == int(eos):
                    continue
                out[active[j]].append(int(tok))
                keep.append(j)
            if not keep or step == limit - 1:
                break
            if len(keep) < len(active):
                rows = torch.tensor(keep, dtype=torch.long, device=nxt.device)
                session.select(rows)
                nxt = nxt.index_select(0, rows)
                active = [active[j] for j in keep]
            session.step(nxt)
    finally:
        model.train(was_training)
    return out


__all__ = ["generate_from_memory"]

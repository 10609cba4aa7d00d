"""Autoregressive decoding for the encoder-decoder from a given encoder memory (``[S, B, H]`` + mask).

``generate_from_memory(model, memory, memory_mask, bos, eos, max_new_tokens, ...)`` runs the decoder step by
step (no KV cache: each step re-runs the decoder over the prefix, fine for the short texts of latent tools), picks
the next token greedily or by sampling (temperature, top-k, top-p) over the full, padding-free vocabulary
(``gather_logits`` trims the padded ids), stops a sequence at ``eos`` and returns token lists without bos/eos.
"""
from __future__ import annotations

from typing import List, Optional

import torch


def _filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    if top_k and top_k > 0:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = probs.cumsum(dim=-1)
        remove = cum - probs > top_p  # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


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
) -> List[List[int]]:
    """Decode ``B`` sequences from ``memory`` ``[S, B, H]``. ``banned_ids`` (e.g. pad, mask) are never produced."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature={temperature}: expected > 0 when sampling")
    was_training = model.training
    model.eval()
    b = memory.shape[1]
    device = memory.device
    tokens = torch.full((b, 1), int(bos), dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out: List[List[int]] = [[] for _ in range(b)]
    limit = max_new_tokens
    cfg = getattr(model, "config", None)
    if cfg is not None:  # the decoder was trained on seq_length_dec positions (bos + text)
        from megatron_ext.models.encoder_decoder import resolve_seq_length_dec

        limit = min(limit, resolve_seq_length_dec(cfg) - 1)
    try:
        for _ in range(limit):
            logits = model.gather_logits(model.decode(tokens, memory, memory_mask))[:, -1, :].float()
            if banned_ids:
                logits[:, list(banned_ids)] = float("-inf")
            if greedy:
                nxt = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(_filter_logits(logits / temperature, top_k, top_p), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            for i in range(b):
                if not done[i]:
                    if int(nxt[i]) == eos:
                        done[i] = True
                    else:
                        out[i].append(int(nxt[i]))
            if bool(done.all()):
                break
            tokens = torch.cat([tokens, nxt.view(b, 1)], dim=1)
    finally:
        model.train(was_training)
    return out


__all__ = ["generate_from_memory"]

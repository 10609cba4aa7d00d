"""Model FLOPs of the GPT in ``megatron_ext.models.gpt`` (for TFLOP/s and MFU logging).

Matmul FLOPs only (2 per multiply-add); embeddings lookups, norms, softmax, activations and
the optimizer are ignored. With ``h`` = hidden size, ``f`` = ffn hidden size, ``L`` = layers,
``s`` = sequence length, ``V`` = vocabulary size, forward FLOPs **per token** are::

    per layer:  2 * (3*h*h          QKV projection
                     + h*h          attention output projection
                     + m*h*f)       MLP, m = 2 (GELU: fc1 + fc2) or 3 (SwiGLU: gate, up, down)
              + 2 * 2 * s * h       attention scores Q.K^T and probabilities x V
    logits:     2 * h * V

    flops_per_token = 3 * (L * per_layer + logits)          # fwd + bwd (bwd = 2 x fwd)
    flops_per_iteration = flops_per_token * s * global_batch_size

No causal halving: the attention term counts the full ``s x s`` score matrix, as nanoGPT's
and PaLM's MFU (``6N + 12*L*h*s`` per token) do -- megatron-core 0.16's formula halves it for
causal masks, so our numbers are higher than Megatron's by ``6*L*s*h`` per token. No
activation-recompute FLOPs are added (this is *model* FLOPs, not hardware FLOPs). ``V`` is the
vocabulary size you pass; pass ``model.padded_vocab_size`` to count the padded output matmul
actually executed.
"""
from __future__ import annotations

from typing import Optional

from megatron_ext.models.gpt import resolve_ffn_hidden_size


def gpt_forward_flops_per_token(cfg, vocab_size: int, seq_length: Optional[int] = None) -> int:
    """Forward-pass model FLOPs per token (see the module docstring)."""
    s = int(cfg.seq_length if seq_length is None else seq_length)
    h = int(cfg.hidden_size)
    L = int(cfg.num_layers)
    f = resolve_ffn_hidden_size(cfg)
    m = 3 if str(cfg.activation).lower() == "swiglu" else 2
    per_layer = 2 * (3 * h * h + h * h + m * h * f) + 2 * 2 * s * h
    logits = 2 * h * int(vocab_size)
    return L * per_layer + logits


def gpt_flops_per_token(cfg, vocab_size: int, seq_length: Optional[int] = None) -> int:
    """Forward + backward model FLOPs per token: ``3 x`` the forward FLOPs, no recompute."""
    return 3 * gpt_forward_flops_per_token(cfg, vocab_size, seq_length)


def gpt_flops_per_iteration(cfg, vocab_size: int, global_batch_size: int, seq_length: Optional[int] = None) -> int:
    """Forward + backward model FLOPs of one optimizer step over ``global_batch_size`` sequences
    of ``seq_length`` tokens (default ``cfg.seq_length``)."""
    s = int(cfg.seq_length if seq_length is None else seq_length)
    return gpt_flops_per_token(cfg, vocab_size, s) * s * int(global_batch_size)


__all__ = ["gpt_forward_flops_per_token", "gpt_flops_per_token", "gpt_flops_per_iteration"]

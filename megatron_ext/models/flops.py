"""Model FLOPs of the GPT in ``megatron_ext.models.gpt`` (for TFLOP/s and MFU logging).

Matmul FLOPs only (2 per multiply-add); embeddings lookups, norms, softmax, activations and
the optimizer are ignored. With ``h`` = hidden size, ``f`` = ffn hidden size, ``L`` = layers,
``s`` = sequence length, ``V`` = vocabulary size, ``n_h`` heads of ``d = h / n_h`` and ``n_g`` query groups
(``model.num_query_groups``, default ``n_h``), forward FLOPs **per token** are::

    per layer:  2 * (h*(n_h + 2*n_g)*d     QKV projection (3*h*h for multi-head attention, n_g = n_h)
                     + h*h                 attention output projection
                     + m*h*f)              MLP, m = 2 (GELU: fc1 + fc2) or 3 (SwiGLU: gate, up, down)
              + 2 * 2 * s * h              attention scores Q.K^T and probabilities x V (every query head)
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

from megatron_ext.models.gpt import resolve_ffn_hidden_size, resolve_num_query_groups


def mega_dims(mega, hidden_size: int):
    """(D, H, Z, N, F or 0) of a Mega layer from ``model.mega`` (defaults: H = F = 2 * D)."""
    d = int(hidden_size)
    hdim = int(mega.intermediate_size) if mega.intermediate_size else 2 * d
    f = (int(mega.nffn_hidden_size) if mega.nffn_hidden_size else 2 * d) if mega.use_normalized_ffn else 0
    return d, hdim, int(mega.shared_representation_size), int(mega.ema_projection_size), f


def mega_layer_forward_flops(mega, hidden_size: int, s: int, causal: bool = True, cross_len: int = 0) -> int:
    """Forward FLOPs of one Mega layer over a sequence of ``s`` tokens (``cross_len`` > 0: plus gated
    cross-attention to that many memory positions). Conventions of the GPT formula: matmuls only, 2 per
    multiply-add, no causal halving; the EMA is counted as its recurrence (4*N*D per token: state update and
    read-out; bidirectional encoders twice)::

        per token:  2*D*H (v) + 2*D*(2*D + Z + H) (mx_proj) + 2*H*D (h_proj)    gated attention projections
                    + 2*W*Z + 2*W*H                                          scores and weighted values, W = window
                    + 4*N*D (x2 bidirectional)                               EMA
                    + 2*2*D*F                                                normalized FFN (F = nffn_hidden_size)
        cross:      per token 2*D*(2*D + Z) + 2*D*D + 2*S*Z + 2*S*D; per memory position 2*D*Z + 2*D*D

    with W = min(chunk_size, s) when chunking, else s.
    """
    d, hdim, z, n, f = mega_dims(mega, hidden_size)
    chunk = int(mega.chunk_size)
    w = min(chunk, s) if chunk > 0 else s
    ema = 4 * n * d * (1 if causal or not mega.bidirectional else 2)
    per_token = 2 * d * hdim + 2 * d * (2 * d + z + hdim) + 2 * hdim * d + 2 * w * z + 2 * w * hdim + ema + 4 * d * f
    total = s * per_token
    if cross_len:
        S = int(cross_len)
        total += s * (2 * d * (2 * d + z) + 2 * d * d + 2 * S * z + 2 * S * d) + S * (2 * d * z + 2 * d * d)
    return total


def gpt_forward_flops_per_token(cfg, vocab_size: int, seq_length: Optional[int] = None) -> int:
    """Forward-pass model FLOPs per token (see the module docstring; ``model.arch=mega``: ``L`` x
    ``mega_layer_forward_flops / s`` + logits, + ``2 h^2`` with ``model.mega.lm_hidden_dense_layer``)."""
    s = int(cfg.seq_length if seq_length is None else seq_length)
    if str(getattr(cfg, "arch", "transformer")).lower() == "mega":
        layers = int(cfg.num_layers) * mega_layer_forward_flops(cfg.mega, cfg.hidden_size, s, causal=True)
        dense = 2 * int(cfg.hidden_size) ** 2 if getattr(cfg.mega, "lm_hidden_dense_layer", False) else 0
        return layers // s + dense + 2 * int(cfg.hidden_size) * int(vocab_size)
    h = int(cfg.hidden_size)
    L = int(cfg.num_layers)
    f = resolve_ffn_hidden_size(cfg)
    m = 3 if str(cfg.activation).lower() == "swiglu" else 2
    nh = int(cfg.num_attention_heads)
    qkv = h * (nh + 2 * resolve_num_query_groups(cfg)) * (h // nh)  # 3*h*h for multi-head attention
    per_layer = 2 * (qkv + h * h + m * h * f) + 2 * 2 * s * h
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


def _stack_dims(stack):
    h = int(stack.hidden_size)
    f = resolve_ffn_hidden_size(stack)
    m = 3 if str(stack.activation).lower() == "swiglu" else 2
    return h, f, m


def encdec_forward_flops_per_sample(cfg, vocab_size: int) -> int:
    """Forward-pass model FLOPs of one sample of the encoder-decoder (see ``encdec_flops_per_iteration``)."""
    s = int(cfg.seq_length)
    sd = int(cfg.seq_length_dec if cfg.seq_length_dec is not None else cfg.seq_length)
    enc, dec = cfg.encoder, cfg.decoder
    he, fe, me = _stack_dims(enc)
    hd, fd, md = _stack_dims(dec)
    mlp_e, mlp_d = 2 * me * he * fe, 2 * md * hd * fd  # per position
    if str(enc.arch).lower() == "mega":
        encoder = int(enc.num_layers) * mega_layer_forward_flops(enc.mega, enc.hidden_size, s, causal=False)
        s_enc = s
    elif str(enc.arch).lower() == "perceiver":
        K = int(enc.hidden_steps)
        k = int(enc.num_self_attention_per_cross_attention)
        self_layer = K * (2 * 4 * he * he + mlp_e) + 4 * K * K * he  # latent self-attn + MLP
        cross_extra = K * (2 * 2 * he * he) + s * (2 * 2 * he * he) + 4 * K * s * he  # q + out | kv | scores + values
        encoder = int(enc.num_layers) * ((1 + k) * self_layer + cross_extra)
        s_enc = K
    else:
        encoder = int(enc.num_layers) * (s * (2 * 4 * he * he + mlp_e) + 4 * s * s * he)
        s_enc = s
    per_dec_layer = (sd * (2 * 4 * hd * hd + mlp_d) + 4 * sd * sd * hd  # causal self-attn (full s_dec^2) + MLP
                     + sd * (2 * 2 * hd * hd) + s_enc * (2 * 2 * hd * hd) + 4 * sd * s_enc * hd)  # cross-attn
    if str(dec.arch).lower() == "mega":
        per_dec_layer = mega_layer_forward_flops(dec.mega, dec.hidden_size, sd, causal=True, cross_len=s_enc)
    decoder = int(dec.num_layers) * per_dec_layer
    logits = sd * 2 * hd * int(vocab_size)
    return encoder + decoder + logits


def encdec_flops_per_iteration(cfg, vocab_size: int, global_batch_size: int) -> int:
    """Forward + backward model FLOPs of one optimizer step of the encoder-decoder
    (``megatron_ext.models.encoder_decoder``) over ``global_batch_size`` samples.

    Matmul FLOPs only (2 per multiply-add), no causal halving, no recompute -- the conventions of
    the GPT formula above. With ``s`` = ``model.seq_length`` (encoder input), ``s_d`` =
    ``model.seq_length_dec`` (default ``s``), per stack ``h`` hidden, ``f`` ffn hidden, ``m`` = 2 (GELU)
    or 3 (SwiGLU), ``MLP = 2*m*h*f`` per position, ``V`` = ``vocab_size``; forward FLOPs per sample::

        transformer encoder, per layer:  s * (2*4*h*h + MLP) + 4*s*s*h          (S_enc = s)
        perceiver encoder, per block:    (1 + k) * [K * (2*4*h*h + MLP) + 4*K*K*h]     latent self-attn + MLP
                                         + K * 2*2*h*h + s * 2*2*h*h + 4*K*s*h          cross-attn q+out, kv, scores
                                         (K = hidden_steps, k = num_self_attention_per_cross_attention,
                                          S_enc = K)
        decoder, per layer:              s_d * (2*4*h*h + MLP) + 4*s_d*s_d*h    causal self-attn + MLP
                                         + s_d * 2*2*h*h + S_enc * 2*2*h*h + 4*s_d*S_enc*h   cross-attn
        LM head:                         s_d * 2*h*V
        (arch: mega, either side: ``mega_layer_forward_flops`` per layer, cross-attention to S_enc in the decoder)

        flops_per_iteration = 3 * (encoder + decoder + LM head) * global_batch_size   # fwd + bwd = 3 x fwd

    Pass ``model.padded_vocab_size`` as ``vocab_size`` to count the padded output matmul actually run.
    """
    return 3 * encdec_forward_flops_per_sample(cfg, vocab_size) * int(global_batch_size)


__all__ = [
    "mega_layer_forward_flops",
    "mega_dims",
    "gpt_forward_flops_per_token",
    "gpt_flops_per_token",
    "gpt_flops_per_iteration",
    "encdec_forward_flops_per_sample",
    "encdec_flops_per_iteration",
]

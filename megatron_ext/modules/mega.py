"""Mega building blocks (Ma et al., "Mega: Moving Average Equipped Gated Attention"), batch-first.

All activations are ``[B, L, D]`` (batch first). These modules are plain ``nn.Linear`` layers:
tensor parallelism is not supported.

Mask convention (everywhere in this file): a padding / attention mask is ``[B, L]`` with
1 / True = real token and 0 / False = padding (the Hugging Face ``attention_mask`` convention,
and the one :class:`~megatron_ext.modules.mega_ema.MultiHeadEMA` uses). Masks are converted to bool.

Blocks
------
* :func:`build_mega_norm` -- layernorm / scalenorm / rmsnorm / batchnorm / syncbatchnorm.
* :class:`SimpleRelativePositionalBias`, :class:`RotaryRelativePositionalBias` -- ``[Lq, Lk]``
  additive biases for queries at positions ``offset .. offset+Lq-1`` and keys at ``0 .. Lk-1``.
* :class:`MovingAverageGatedAttention` (MAGA) -- EMA + single-head gated attention, optionally
  chunked, with a key/value/EMA-state cache for incremental decoding.
* :class:`GatedCrossAttention` -- gated single-head cross-attention with a (key, value) cache.
* :class:`NormalizedFeedForwardNetwork` -- the Mega FFN.
* :class:`MegaLayer` -- MAGA -> optional cross-attention -> optional NFFN.

Chunking (``chunk_size > 0``): the sequence is cut into chunks of ``chunk_size`` tokens starting
at position 0 and attention is block-diagonal (causal within a chunk for decoders). When the length
is not a multiple of ``chunk_size`` the last chunk is simply shorter (internally the sequence is
padded to a multiple of the chunk size with masked keys; the padded rows are dropped), for both
encoders and decoders, so chunk ``c`` always covers positions ``[c*C, min((c+1)*C, L))`` -- the
same chunks incremental decoding sees. The EMA always runs over the whole sequence.

Incremental decoding cache (per layer, :class:`MegaCache`, a 5-tuple
``(self_key [B,T,Z], self_value [B,T,H], self_ema_state [B,D,N], cross_key [B,S,Z],
cross_value [B,S,D])``): with chunking the self key/value cache only holds the current chunk
(``T = seen_tokens % chunk_size``; it is ``None`` right after a chunk boundary) while the EMA state
persists. ``MegaCache.seen_tokens`` records how many tokens the cache has seen; the cross-attention
needs it for the relative bias of the query position (see :meth:`MegaLayer.resolve_past_length`).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ext.config.model_validation import (  # the allowed values are defined once, in config/
    MEGA_ACTIVATIONS,
    MEGA_ATTENTION_ACTIVATIONS,
    MEGA_NORMALIZATIONS,
    MEGA_RELATIVE_POSITIONAL_BIASES,
)
from megatron_ext.modules.mega_ema import MultiHeadEMA


# ----------------------------------------------------------------------------------------------
# activations
# ----------------------------------------------------------------------------------------------
def relu2(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2."""
    return torch.square(F.relu(x))


def laplace(x: torch.Tensor, mu: float = 0.707107, std: float = 0.282095) -> torch.Tensor:
    """Laplace attention function: the normal CDF with mean sqrt(1/2), std sqrt(1/(4 pi))."""
    return 0.5 * (1.0 + torch.erf((x - mu) / (std * math.sqrt(2.0))))


def get_activation(name: str):
    """Hidden activation by name (one of :data:`MEGA_ACTIVATIONS`)."""
    key = str(name).lower()
    if key in ("silu", "swish"):
        return F.silu
    if key == "relu":
        return F.relu
    if key == "gelu":
        return F.gelu
    if key == "gelu_accurate":
        return lambda x: F.gelu(x, approximate="tanh")
    if key == "tanh":
        return torch.tanh
    if key == "linear":
        return lambda x: x
    raise ValueError(f"activation={name!r}: expected one of {', '.join(MEGA_ACTIVATIONS)}")


class MegaDropout(nn.Module):
    """Dropout; with ``feature=True`` whole features are dropped for every time step of a sequence
    (one mask per ``[batch, feature]`` for a ``[B, L, D]`` input)."""

    def __init__(self, p: float, feature: bool = False):
        super().__init__()
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.feature = bool(feature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.feature and x.dim() == 3:
            mask = F.dropout(x.new_ones(x.size(0), 1, x.size(2)), self.p, True)
            return x * mask
        return F.dropout(x, self.p, True)

    def extra_repr(self) -> str:
        return f"p={self.p}, feature={self.feature}"


# ----------------------------------------------------------------------------------------------
# normalizations
# ----------------------------------------------------------------------------------------------
class MegaRMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2 over the last dim) + eps), w a learned vector (init 1).

    Unlike Hugging Face's ``MegaRMSNorm`` (which drops the normalized tensor and only multiplies by
    the weight), this one really normalizes."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True, gain_size: Optional[int] = None):
        super().__init__()
        self.dim = int(dim)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(self.dim if gain_size is None else gain_size)) if affine else None

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return y * self.weight if self.weight is not None else y


class ScaleNorm(MegaRMSNorm):
    """y = g * x / sqrt(mean(x^2 over the last dim) + eps), with one learned scalar g (init 1): the RMS norm
    with a single gain."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(dim, eps=eps, affine=affine, gain_size=1)


class MegaBatchNorm(nn.Module):
    """BatchNorm over the feature (last) dimension of a ``[..., D]`` input: statistics are taken
    over every other dimension (batch and time; padding positions included)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True, sync: bool = False):
        super().__init__()
        if sync:
            if not torch.cuda.is_available():
                raise ValueError("normalization_type='syncbatchnorm' needs CUDA (torch.nn.SyncBatchNorm "
                                 "only runs on GPU tensors); use 'batchnorm' on CPU")
            self.norm = nn.SyncBatchNorm(dim, eps=eps, affine=affine)
        else:
            self.norm = nn.BatchNorm1d(dim, eps=eps, affine=affine)
        self.sync = bool(sync)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sync and not x.is_cuda:
            raise ValueError("normalization_type='syncbatchnorm' needs CUDA tensors; got a "
                             f"{x.device.type} tensor (use 'batchnorm' on CPU)")
        shape = x.shape
        return self.norm(x.reshape(-1, shape[-1])).reshape(shape)


def build_mega_norm(norm_type: str, dim: int, affine: bool = True, eps: float = 1e-5) -> nn.Module:
    """A normalization over the last dimension of ``[B, L, D]`` activations.

    * ``layernorm``: ``nn.LayerNorm``;
    * ``scalenorm``: :class:`ScaleNorm` (one scalar gain);
    * ``rmsnorm``: :class:`MegaRMSNorm` (per-feature gain; actually normalizes);
    * ``batchnorm``: ``nn.BatchNorm1d`` over the features, statistics over batch and time;
    * ``syncbatchnorm``: ``nn.SyncBatchNorm`` (CUDA only: a ValueError without CUDA).
    """
    name = str(norm_type).lower()
    if name == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
    if name == "scalenorm":
        return ScaleNorm(dim, eps=eps, affine=affine)
    if name == "rmsnorm":
        return MegaRMSNorm(dim, eps=eps, affine=affine)
    if name == "batchnorm":
        return MegaBatchNorm(dim, eps=eps, affine=affine)
    if name == "syncbatchnorm":
        return MegaBatchNorm(dim, eps=eps, affine=affine, sync=True)
    raise ValueError(f"normalization_type={norm_type!r}: expected one of {', '.join(MEGA_NORMALIZATIONS)}")


# ----------------------------------------------------------------------------------------------
# relative positional biases
# ----------------------------------------------------------------------------------------------
class SimpleRelativePositionalBias(nn.Module):
    """A learned scalar per relative distance ``j - i`` in ``[-(max_positions-1), max_positions-1]``
    (a vector of length ``2*max_positions - 1``), laid out as a Toeplitz ``[Lq, Lk]`` matrix.

    ``forward(seq_len, key_len=None, offset=0)``: queries at positions ``offset .. offset+seq_len-1``,
    keys at ``0 .. key_len-1`` (``key_len`` defaults to ``offset + seq_len``). Every position must be
    ``< max_positions``, else ValueError.
    """

    def __init__(self, max_positions: int):
        super().__init__()
        self.max_positions = int(max_positions)
        if self.max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        self.rel_pos_bias = nn.Parameter(torch.zeros(2 * self.max_positions - 1))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.rel_pos_bias, mean=0.0, std=std)

    def forward(self, seq_len: int, key_len: Optional[int] = None, offset: int = 0) -> torch.Tensor:
        key_len = offset + seq_len if key_len is None else int(key_len)
        needed = max(key_len, offset + seq_len)
        if needed > self.max_positions:
            raise ValueError(
                f"sequence/attention window of {needed} positions exceeds max_positions={self.max_positions} "
                "of the simple relative positional bias (use relative_positional_bias='rotary', a larger "
                "max_positions, or chunking with chunk_size <= max_positions)")
        device = self.rel_pos_bias.device
        qpos = torch.arange(offset, offset + seq_len, device=device)
        kpos = torch.arange(key_len, device=device)
        idx = kpos[None, :] - qpos[:, None] + (self.max_positions - 1)
        return self.rel_pos_bias[idx]

    def extra_repr(self) -> str:
        return f"max_positions={self.max_positions}"


class RotaryRelativePositionalBias(nn.Module):
    """bias[i, j] = rot(a, i) . rot(b, j) for learned vectors a, b of size ``zdim`` (even), where
    ``rot(x, p)`` rotates the pairs ``(x[k], x[k + zdim/2])`` by the sinusoid angle ``p * 10000^(-k/(zdim/2))``.
    It depends on ``j - i`` only, and the sinusoid tables regrow on demand, so it works past
    ``max_positions`` (which only sizes the initial table)."""

    def __init__(self, zdim: int, max_positions: int):
        super().__init__()
        if zdim % 2 != 0:
            raise ValueError(f"the rotary relative positional bias needs an even size, got {zdim}")
        self.zdim = int(zdim)
        self.max_positions = int(max_positions)
        self.alpha = nn.Parameter(torch.zeros(self.zdim))
        self.beta = nn.Parameter(torch.zeros(self.zdim))
        half = self.zdim // 2
        inv = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / half))
        self.register_buffer("inv_freq", inv, persistent=False)
        self._sin: Optional[torch.Tensor] = None
        self._cos: Optional[torch.Tensor] = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.alpha, mean=0.0, std=std)
        nn.init.normal_(self.beta, mean=0.0, std=std)

    def _tables(self, n: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._sin is None or self._sin.size(0) < n or self._sin.device != device:
            size = max(n, self.max_positions, 2 if self._sin is None else 2 * self._sin.size(0))
            ang = torch.arange(size, dtype=torch.float32, device=device)[:, None] * self.inv_freq.to(device)[None, :]
            self._sin, self._cos = torch.sin(ang), torch.cos(ang)
        return self._sin, self._cos

    def _rotate(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def forward(self, seq_len: int, key_len: Optional[int] = None, offset: int = 0) -> torch.Tensor:
        key_len = offset + seq_len if key_len is None else int(key_len)
        sin, cos = self._tables(max(key_len, offset + seq_len), self.alpha.device)
        sin, cos = sin.to(self.alpha.dtype), cos.to(self.alpha.dtype)
        a = self._rotate(self.alpha[None, :], sin[offset:offset + seq_len], cos[offset:offset + seq_len])
        b = self._rotate(self.beta[None, :], sin[:key_len], cos[:key_len])
        return a @ b.t()

    def extra_repr(self) -> str:
        return f"zdim={self.zdim}, max_positions={self.max_positions}"


def build_relative_positional_bias(kind: str, zdim: int, max_positions: int) -> nn.Module:
    name = str(kind).lower()
    if name == "simple":
        return SimpleRelativePositionalBias(max_positions)
    if name == "rotary":
        return RotaryRelativePositionalBias(zdim, max_positions)
    raise ValueError(f"relative_positional_bias={kind!r}: expected one of {', '.join(MEGA_RELATIVE_POSITIONAL_BIASES)}")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _init_linear(linear: nn.Linear, std: float) -> None:
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def _as_bool_mask(mask: Optional[torch.Tensor], name: str) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"{name} must be [batch, length] (1 = real token, 0 = padding), got shape {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


class MegaCache(tuple):
    """One layer's incremental-decoding cache: the 5-tuple ``(self_key, self_value, self_ema_state,
    cross_key, cross_value)`` plus ``seen_tokens`` (number of tokens processed so far, or None when
    unknown). It indexes and unpacks like a plain tuple; plain tuples are accepted as caches too."""

    def __new__(cls, items=(None, None, None, None, None), seen_tokens: Optional[int] = None):
        self = super().__new__(cls, tuple(items))
        if len(self) != 5:
            raise ValueError(f"a Mega layer cache has 5 entries, got {len(self)}")
        self.seen_tokens = seen_tokens
        return self

    def __repr__(self) -> str:
        shapes = [None if t is None else tuple(t.shape) for t in self]
        return f"MegaCache(shapes={shapes}, seen_tokens={self.seen_tokens})"


# ----------------------------------------------------------------------------------------------
# attention core
# ----------------------------------------------------------------------------------------------
def _attention_probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, allowed: Optional[torch.Tensor],
                     kind: str, scaling: float) -> torch.Tensor:
    """Attention weights for ``q [..., Lq, Z]``, ``k [..., Lk, Z]``, additive ``bias [Lq, Lk]`` and a
    bool ``allowed`` mask broadcastable to ``[..., Lq, Lk]`` (None = everything allowed).

    softmax: softmax(q k^T * scaling + bias) over allowed keys (rows with no allowed key -> 0).
    laplace / relu2: act(q k^T / n + bias) * allowed, with n the number of allowed keys of the row."""
    if kind == "softmax":
        scores = torch.matmul(q * scaling, k.transpose(-1, -2)) + bias
        if allowed is not None:
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        low = scores.dtype in (torch.float16, torch.bfloat16)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32 if low else None).to(scores.dtype)
        if allowed is not None:
            probs = probs * allowed.any(dim=-1, keepdim=True).to(probs.dtype)
        return probs
    if allowed is None:
        lengths = float(k.size(-2))
    else:
        lengths = allowed.sum(dim=-1, keepdim=True).clamp(min=1).to(q.dtype)
    scores = torch.matmul(q, k.transpose(-1, -2)) / lengths + bias
    probs = relu2(scores) if kind == "relu2" else laplace(scores)
    if allowed is not None:
        probs = probs * allowed.to(probs.dtype)
    return probs


# ----------------------------------------------------------------------------------------------
# MAGA
# ----------------------------------------------------------------------------------------------
class MovingAverageGatedAttention(nn.Module):
    """Mega's moving-average gated attention (single head), batch-first.

    ``x [B,L,D]`` -> residual; ``xn = norm(x)`` (prenorm); ``v = act(W_v xn) [B,L,H]``;
    ``mx = EMA(xn)`` (bidirectional for encoders when ``bidirectional``; always causal when
    ``causal``); ``W_mx mx`` -> ``u = sigmoid(.) [D]``, ``silu(.) -> z [Z], r [H]``, ``hx [D]``;
    ``q, k = z * qk_weight[0|1] + qk_bias[0|1]``; attention within chunks (softmax scaled by
    ``Z^-0.5`` + relative bias, or element attention); ``h = act(hx + W_h((attn @ v) * r))``;
    ``out = x + u * (h - x)``; post-norm when not prenorm.

    ``forward(x, padding_mask=None, past_key_value=None, use_cache=False, output_attentions=False)``
    returns ``(out [B,L,D], attn_weights or None, present or None)``:

    * ``padding_mask``: ``[B, L]`` (the new tokens; cached keys are taken as real tokens) or
      ``[B, M]`` with ``M >= T + L`` whose last ``T + L`` columns cover the cached keys and the new
      tokens (the Hugging Face "full history" mask); 1 = real token.
    * ``past_key_value``: ``(self_key [B,T,Z], self_value [B,T,H], ema_state [B,D,N])`` (entries may
      be None), causal only. ``present`` has the same layout (keys/values of the current chunk).
    * ``attn_weights``: ``[B, 1, L, T + L]`` (one head; rows = the new queries, columns = the cached
      keys of the current chunk followed by the new keys); with chunking it is the dense
      block-diagonal matrix (zeros across chunks).
    """

    def __init__(self, embed_dim: int, zdim: int, hdim: int, ndim: int = 16, *, causal: bool = False,
                 bidirectional: bool = False, truncation: Optional[int] = None, chunk_size: int = -1,
                 attention_activation: str = "softmax", activation: str = "silu",
                 relative_positional_bias: str = "rotary", max_positions: int = 2048,
                 normalization_type: str = "scalenorm", normalize_before: bool = True, norm_affine: bool = True,
                 dropout: float = 0.0, hidden_dropout: float = 0.0, attention_dropout: float = 0.0,
                 feature_dropout: bool = False, ema_impl: str = "auto", initializer_range: float = 0.02,
                 ema_delta_alpha_range: float = 0.2, ema_beta_range: float = 0.02,
                 ema_gamma_omega_range: float = 1.0):
        super().__init__()
        if attention_activation not in MEGA_ATTENTION_ACTIVATIONS:
            raise ValueError(f"attention_activation={attention_activation!r}: expected one of "
                             f"{', '.join(MEGA_ATTENTION_ACTIVATIONS)}")
        self.embed_dim, self.zdim, self.hdim, self.ndim = int(embed_dim), int(zdim), int(hdim), int(ndim)
        self.causal = bool(causal)
        self.chunk_size = int(chunk_size) if chunk_size is not None and int(chunk_size) > 0 else -1
        self.attention_activation = attention_activation
        self.activation_name = activation
        self.act = get_activation(activation)
        self.prenorm = bool(normalize_before)
        self.scaling = self.zdim ** -0.5
        self.initializer_range = float(initializer_range)
        self._ema_ranges = (ema_delta_alpha_range, ema_beta_range, ema_gamma_omega_range)

        self.dropout = MegaDropout(dropout, feature=feature_dropout)
        self.hidden_dropout = MegaDropout(hidden_dropout, feature=feature_dropout)
        self.attention_dropout = MegaDropout(attention_dropout, feature=False)

        self.v_proj = nn.Linear(embed_dim, hdim)
        self.mx_proj = nn.Linear(embed_dim, zdim + hdim + 2 * embed_dim)
        self.h_proj = nn.Linear(hdim, embed_dim)
        self.qk_weight = nn.Parameter(torch.zeros(2, zdim))
        self.qk_bias = nn.Parameter(torch.zeros(2, zdim))
        self.ema = MultiHeadEMA(embed_dim, ndim=ndim, bidirectional=bool(bidirectional) and not self.causal,
                                truncation=truncation, impl=ema_impl)
        self.norm = build_mega_norm(normalization_type, embed_dim, affine=norm_affine)
        self.rel_pos_bias = build_relative_positional_bias(relative_positional_bias, zdim, max_positions)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config, causal: bool) -> "MovingAverageGatedAttention":
        return cls(
            config.hidden_size, config.shared_representation_size, config.intermediate_size,
            config.ema_projection_size, causal=causal, bidirectional=config.bidirectional and not causal,
            truncation=config.truncation, chunk_size=config.chunk_size if config.use_chunking else -1,
            attention_activation=config.attention_activation, activation=config.activation,
            relative_positional_bias=config.relative_positional_bias, max_positions=config.max_positions,
            normalization_type=config.normalization_type, normalize_before=config.normalize_before_mega,
            norm_affine=config.norm_affine, dropout=config.dropout_prob,
            hidden_dropout=config.hidden_dropout_prob, attention_dropout=config.attention_probs_dropout_prob,
            feature_dropout=config.use_feature_dropout, ema_impl=config.ema_impl,
            initializer_range=config.initializer_range, ema_delta_alpha_range=config.ema_delta_alpha_range,
            ema_beta_range=config.ema_beta_range, ema_gamma_omega_range=config.ema_gamma_omega_range)

    def reset_parameters(self) -> None:
        std = self.initializer_range
        for lin in (self.v_proj, self.mx_proj, self.h_proj):
            _init_linear(lin, std)
        nn.init.normal_(self.qk_weight, mean=0.0, std=std)
        nn.init.zeros_(self.qk_bias)
        da, b, go = self._ema_ranges
        self.ema.reset_parameters(delta_alpha_range=da, beta_range=b, gamma_omega_range=go)
        self.rel_pos_bias.reset_parameters(std)

    # -- masks -------------------------------------------------------------------------------
    @staticmethod
    def _split_mask(padding_mask: Optional[torch.Tensor], past_len: int, seq_len: int):
        """-> (key mask [B, past_len + seq_len] or None, mask of the new tokens [B, seq_len] or None)."""
        m = _as_bool_mask(padding_mask, "padding_mask")
        if m is None:
            return None, None
        width = m.size(1)
        if width >= past_len + seq_len:
            m = m[:, width - (past_len + seq_len):]
            return m, m[:, past_len:]
        if width == seq_len:
            keys = torch.cat([m.new_ones(m.size(0), past_len), m], dim=1) if past_len else m
            return keys, m
        raise ValueError(f"padding_mask has {width} columns; expected {seq_len} (the new tokens) or at least "
                         f"{past_len + seq_len} (cached keys + new tokens)")

    # -- attention -----------------------------------------------------------------------------
    def _block(self, q, k, v, key_mask, q_offset: int):
        """q [B,n,Lq,Z], k [B,n,Lk,Z], v [B,n,Lk,H], key_mask [B,n,Lk] bool or None; query row i is at
        chunk-local position q_offset + i, key j at position j. -> (out [B,n,Lq,H], probs [B,n,Lq,Lk])."""
        lq, lk = q.size(2), k.size(2)
        bias = self.rel_pos_bias(lq, lk, offset=q_offset).to(q.dtype)
        allowed = None
        if self.causal:
            qpos = torch.arange(q_offset, q_offset + lq, device=q.device)
            kpos = torch.arange(lk, device=q.device)
            allowed = kpos[None, :] <= qpos[:, None]
        if key_mask is not None:
            km = key_mask[:, :, None, :]
            allowed = km if allowed is None else (allowed & km)
        probs = _attention_probs(q, k, bias, allowed, self.attention_activation, self.scaling)
        out = torch.matmul(self.attention_dropout(probs), v)
        return out, probs

    def _attend(self, q, k, v, key_mask, cache_k, cache_v, need_weights: bool):
        """Chunked (block-diagonal) attention of the new queries over cached + new keys.
        -> (ctx [B,L,H], weights [B,1,L,P+L] or None)."""
        bsz, seq_len, _ = q.shape
        past = 0 if cache_k is None else cache_k.size(1)
        C = self.chunk_size if self.chunk_size > 0 else None
        outs, blocks = [], []  # blocks: (row0, col0, probs [B, Lq, Lk])
        first = 0
        if past > 0:
            # the queries that finish the current (cached) chunk attend to the cache + themselves
            first = seq_len if C is None else min(C - past, seq_len)
            k1 = torch.cat([cache_k, k[:, :first]], dim=1)
            v1 = torch.cat([cache_v, v[:, :first]], dim=1)
            m1 = None if key_mask is None else key_mask[:, :past + first][:, None]
            o1, p1 = self._block(q[:, None, :first], k1[:, None], v1[:, None], m1, q_offset=past)
            outs.append(o1[:, 0])
            if need_weights:
                blocks.append((0, 0, p1[:, 0]))
        rest = seq_len - first
        if rest > 0:
            q2, k2, v2 = q[:, first:], k[:, first:], v[:, first:]
            m2 = None if key_mask is None else key_mask[:, past + first:]
            if C is None or rest <= C:
                n, c = 1, rest
            else:
                n, c = -(-rest // C), C
                pad = n * c - rest
                if pad:
                    q2, k2, v2 = (F.pad(t, (0, 0, 0, pad)) for t in (q2, k2, v2))
                    if m2 is None:
                        m2 = torch.ones(bsz, rest, dtype=torch.bool, device=q.device)
                    m2 = F.pad(m2, (0, pad), value=False)
            q2 = q2.reshape(bsz, n, c, -1)
            k2 = k2.reshape(bsz, n, c, -1)
            v2 = v2.reshape(bsz, n, c, -1)
            m2 = None if m2 is None else m2.reshape(bsz, n, c)
            o2, p2 = self._block(q2, k2, v2, m2, q_offset=0)
            outs.append(o2.reshape(bsz, n * c, -1)[:, :rest])
            if need_weights:
                for i in range(n):
                    r = min(c, rest - i * c)
                    blocks.append((first + i * c, past + first + i * c, p2[:, i, :r, :r]))
        ctx = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        weights = None
        if need_weights:
            weights = q.new_zeros(bsz, 1, seq_len, past + seq_len)
            for r0, c0, p in blocks:
                weights[:, 0, r0:r0 + p.size(1), c0:c0 + p.size(2)] = p
        return ctx, weights

    def _present_kv(self, cache, new):
        """Keys (or values) to keep: everything without chunking, else the current chunk's (None at a boundary)."""
        full = new if cache is None else torch.cat([cache, new], dim=1)
        if self.chunk_size <= 0:
            return full
        rem = full.size(1) % self.chunk_size
        # full starts at a chunk boundary (the cache always does)
        return None if rem == 0 else full[:, full.size(1) - rem:]

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                past_key_value: Optional[Tuple] = None, use_cache: bool = False,
                output_attentions: bool = False):
        bsz, seq_len, dim = x.shape
        if dim != self.embed_dim:
            raise ValueError(f"expected hidden size {self.embed_dim}, got input of shape {tuple(x.shape)}")
        if (use_cache or past_key_value is not None) and not self.causal:
            raise ValueError("past_key_value / use_cache are only supported by causal (decoder) Mega attention")
        cache_k = cache_v = ema_state = None
        if past_key_value is not None:
            cache_k, cache_v, ema_state = tuple(past_key_value)[:3]
            if (cache_k is None) != (cache_v is None):
                raise ValueError("past_key_value: self_key and self_value must both be given or both be None")
            if cache_k is not None and cache_k.size(1) == 0:
                cache_k = cache_v = None
        past = 0 if cache_k is None else cache_k.size(1)
        if self.chunk_size > 0 and past >= self.chunk_size:
            raise ValueError(f"cached self_key has {past} positions; with chunk_size={self.chunk_size} the cache "
                             "holds only the current chunk (fewer than chunk_size positions)")
        key_mask, new_mask = self._split_mask(padding_mask, past, seq_len)

        residual = x
        xn = self.norm(x) if self.prenorm else x
        v = self.act(self.v_proj(xn))
        mx, new_state = self.ema(xn, padding_mask=new_mask, state=ema_state, return_state=bool(use_cache))
        mx = self.dropout(mx)
        u, zr, hx = torch.split(self.mx_proj(mx), [self.embed_dim, self.zdim + self.hdim, self.embed_dim], dim=-1)
        u = torch.sigmoid(u)
        z, r = torch.split(F.silu(zr), [self.zdim, self.hdim], dim=-1)
        qk = z.unsqueeze(2) * self.qk_weight + self.qk_bias
        q, k = qk.unbind(dim=2)
        v = self.hidden_dropout(v)

        ctx, weights = self._attend(q, k, v, key_mask, cache_k, cache_v, output_attentions)
        h = self.act(hx + self.h_proj(ctx * r))
        h = self.dropout(h)
        out = torch.addcmul(residual, u, h - residual)
        if not self.prenorm:
            out = self.norm(out)
        present = None
        if use_cache:
            present = (self._present_kv(cache_k, k), self._present_kv(cache_v, v), new_state)
        return out, weights, present


# ----------------------------------------------------------------------------------------------
# cross-attention
# ----------------------------------------------------------------------------------------------
class GatedCrossAttention(nn.Module):
    """Mega's gated cross-attention (single head), batch-first.

    ``q_proj(norm(y))`` -> residual weight ``sigmoid(.) [D]``, target gate ``silu(.) [D]``, query
    ``[Z]``; keys ``k_proj(memory) [Z]``, values ``act(v_proj(memory)) [D]``;
    ``out = y + rw * (act(W_h((attn @ v) * gate)) - y)`` (post-norm when not prenorm).
    The relative bias is indexed by the query's position in the target sequence
    (``query_offset + i``) and the key's position in the memory.

    ``forward(query [B,L,D], key_value=None [B,S,D], key_padding_mask=None [B,S] (1 = real),
    past_key_value=None (cross_key [B,S,Z], cross_value [B,S,D]), use_cache=False,
    output_attentions=False, query_offset=0)`` -> ``(out, attn [B,1,L,S] or None, present (k, v) or None)``.
    With a cache the memory is not needed (keys/values are reused); the key padding mask must be
    passed on every call.
    """

    def __init__(self, embed_dim: int, zdim: int, *, attention_activation: str = "softmax",
                 activation: str = "silu", relative_positional_bias: str = "rotary", max_positions: int = 2048,
                 normalization_type: str = "scalenorm", normalize_before: bool = True, norm_affine: bool = True,
                 dropout: float = 0.0, hidden_dropout: float = 0.0, attention_dropout: float = 0.0,
                 feature_dropout: bool = False, initializer_range: float = 0.02):
        super().__init__()
        if attention_activation not in MEGA_ATTENTION_ACTIVATIONS:
            raise ValueError(f"attention_activation={attention_activation!r}: expected one of "
                             f"{', '.join(MEGA_ATTENTION_ACTIVATIONS)}")
        self.embed_dim, self.zdim = int(embed_dim), int(zdim)
        self.attention_activation = attention_activation
        self.act = get_activation(activation)
        self.prenorm = bool(normalize_before)
        self.scaling = self.zdim ** -0.5
        self.initializer_range = float(initializer_range)
        self.dropout = MegaDropout(dropout, feature=feature_dropout)
        self.hidden_dropout = MegaDropout(hidden_dropout, feature=feature_dropout)
        self.attention_dropout = MegaDropout(attention_dropout, feature=False)
        self.q_proj = nn.Linear(embed_dim, 2 * embed_dim + zdim)
        self.k_proj = nn.Linear(embed_dim, zdim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.h_proj = nn.Linear(embed_dim, embed_dim)
        self.norm = build_mega_norm(normalization_type, embed_dim, affine=norm_affine)
        self.rel_pos_bias = build_relative_positional_bias(relative_positional_bias, zdim, max_positions)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config) -> "GatedCrossAttention":
        return cls(config.hidden_size, config.shared_representation_size,
                   attention_activation=config.attention_activation, activation=config.activation,
                   relative_positional_bias=config.relative_positional_bias, max_positions=config.max_positions,
                   normalization_type=config.normalization_type, normalize_before=config.normalize_before_mega,
                   norm_affine=config.norm_affine, dropout=config.dropout_prob,
                   hidden_dropout=config.hidden_dropout_prob, attention_dropout=config.attention_probs_dropout_prob,
                   feature_dropout=config.use_feature_dropout, initializer_range=config.initializer_range)

    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.h_proj):
            _init_linear(lin, self.initializer_range)
        self.rel_pos_bias.reset_parameters(self.initializer_range)

    def forward(self, query: torch.Tensor, key_value: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, past_key_value: Optional[Tuple] = None,
                use_cache: bool = False, output_attentions: bool = False, query_offset: int = 0):
        bsz, seq_len, _ = query.shape
        residual = query
        qn = self.norm(query) if self.prenorm else query
        rw, gate, q = torch.split(self.q_proj(qn), [self.embed_dim, self.embed_dim, self.zdim], dim=-1)
        rw = torch.sigmoid(rw)
        gate = F.silu(gate)
        if past_key_value is not None and past_key_value[0] is not None:
            k, v = past_key_value[0], past_key_value[1]
        elif key_value is not None:
            k = self.k_proj(key_value)
            v = self.act(self.v_proj(key_value))
        else:
            raise ValueError("GatedCrossAttention needs the encoder output (key_value) or a cross-attention cache")
        src_len = k.size(1)
        mask = _as_bool_mask(key_padding_mask, "encoder_attention_mask")
        if mask is not None and mask.size(1) != src_len:
            raise ValueError(f"encoder_attention_mask has {mask.size(1)} columns, the memory has {src_len} positions")
        bias = self.rel_pos_bias(seq_len, src_len, offset=int(query_offset)).to(q.dtype)
        allowed = None if mask is None else mask[:, None, :]
        probs = _attention_probs(q, k, bias, allowed, self.attention_activation, self.scaling)
        vd = self.hidden_dropout(v)
        ctx = torch.matmul(self.attention_dropout(probs), vd)
        h = self.act(self.h_proj(ctx * gate))
        h = self.dropout(h)
        out = torch.addcmul(residual, rw, h - residual)
        if not self.prenorm:
            out = self.norm(out)
        weights = probs[:, None] if output_attentions else None
        present = (k, v) if use_cache else None
        return out, weights, present


# ----------------------------------------------------------------------------------------------
# FFN
# ----------------------------------------------------------------------------------------------
class NormalizedFeedForwardNetwork(nn.Module):
    """prenorm: ``x + drop(fc2(hdrop(act(fc1(norm(x))))))``; postnorm: ``norm(x + drop(fc2(...x...)))``."""

    def __init__(self, embed_dim: int, ffn_hidden_size: int, *, activation: str = "silu",
                 normalization_type: str = "scalenorm", normalize_before: bool = True, norm_affine: bool = True,
                 dropout: float = 0.0, activation_dropout: float = 0.0, feature_dropout: bool = False,
                 initializer_range: float = 0.02):
        super().__init__()
        self.act = get_activation(activation)
        self.prenorm = bool(normalize_before)
        self.initializer_range = float(initializer_range)
        self.fc1 = nn.Linear(embed_dim, ffn_hidden_size)
        self.fc2 = nn.Linear(ffn_hidden_size, embed_dim)
        self.dropout = MegaDropout(dropout, feature=feature_dropout)
        self.hidden_dropout = MegaDropout(activation_dropout, feature=feature_dropout)
        self.norm = build_mega_norm(normalization_type, embed_dim, affine=norm_affine)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config) -> "NormalizedFeedForwardNetwork":
        return cls(config.hidden_size, config.nffn_hidden_size, activation=config.activation,
                   normalization_type=config.normalization_type, normalize_before=config.normalize_before_ffn,
                   norm_affine=config.norm_affine, dropout=config.dropout_prob,
                   activation_dropout=config.nffn_activation_dropout_prob,
                   feature_dropout=config.use_feature_dropout, initializer_range=config.initializer_range)

    def reset_parameters(self) -> None:
        _init_linear(self.fc1, self.initializer_range)
        _init_linear(self.fc2, self.initializer_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        h = self.norm(x) if self.prenorm else x
        h = self.hidden_dropout(self.act(self.fc1(h)))
        out = residual + self.dropout(self.fc2(h))
        if not self.prenorm:
            out = self.norm(out)
        return out


# ----------------------------------------------------------------------------------------------
# layer
# ----------------------------------------------------------------------------------------------
class MegaLayer(nn.Module):
    """MAGA -> optional :class:`GatedCrossAttention` (``config.add_cross_attention``) -> optional
    :class:`NormalizedFeedForwardNetwork` (``config.use_normalized_ffn``).

    ``forward(hidden_states [B,L,D], attention_mask=None [B,L] or [B,past+L] (1 = keep),
    encoder_hidden_states=None [B,S,D], encoder_attention_mask=None [B,S], past_key_value=None
    (5-tuple), use_cache=False, output_attentions=False, past_length=None)`` returns
    ``(hidden [B,L,D], present MegaCache or None, self_attn [B,1,L,T+L] or None,
    cross_attn [B,1,L,S] or None)``.
    """

    def __init__(self, config, causal: bool):
        super().__init__()
        self.causal = bool(causal)
        self.chunk_size = config.chunk_size if config.use_chunking else -1
        self.mega_layer = MovingAverageGatedAttention.from_config(config, causal=self.causal)
        self.cross_attn = GatedCrossAttention.from_config(config) if config.add_cross_attention else None
        self.nffn = NormalizedFeedForwardNetwork.from_config(config) if config.use_normalized_ffn else None

    def resolve_past_length(self, past_key_value, attention_mask: Optional[torch.Tensor], seq_len: int) -> Optional[int]:
        """Number of tokens already processed: ``past_key_value.seen_tokens`` (a :class:`MegaCache`),
        else ``attention_mask`` columns beyond the new tokens (full-history mask), else -- without
        chunking -- the cached key length; None when it cannot be known (a plain-tuple chunked cache
        and a new-tokens-only mask)."""
        if past_key_value is None:
            return 0
        seen = getattr(past_key_value, "seen_tokens", None)
        if seen is not None:
            return int(seen)
        if attention_mask is not None and attention_mask.size(1) > seq_len:
            return attention_mask.size(1) - seq_len
        if self.chunk_size <= 0:
            return 0 if past_key_value[0] is None else past_key_value[0].size(1)
        return None

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                encoder_hidden_states: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None, past_key_value: Optional[Tuple] = None,
                use_cache: bool = False, output_attentions: bool = False, past_length: Optional[int] = None):
        seq_len = hidden_states.size(1)
        if past_key_value is not None and len(past_key_value) != 5:
            raise ValueError(f"past_key_value must be the 5-tuple (self_key, self_value, self_ema_state, "
                             f"cross_key, cross_value), got {len(past_key_value)} entries")
        if past_length is None:
            past_length = self.resolve_past_length(past_key_value, attention_mask, seq_len)
        self_past = None
        if past_key_value is not None and any(t is not None for t in past_key_value[:3]):
            self_past = tuple(past_key_value[:3])
        out, self_attn, self_present = self.mega_layer(
            hidden_states, padding_mask=attention_mask, past_key_value=self_past, use_cache=use_cache,
            output_attentions=output_attentions)
        cross_attn, cross_present = None, (None, None)
        if self.cross_attn is not None:
            cross_past = None
            if past_key_value is not None and past_key_value[3] is not None:
                cross_past = (past_key_value[3], past_key_value[4])
            if encoder_hidden_states is None and cross_past is None:
                raise ValueError("this Mega layer has cross-attention: pass encoder_hidden_states "
                                 "(or a past_key_value holding the cross-attention cache)")
            if past_length is None:
                raise ValueError(
                    "cannot tell how many tokens were decoded before (needed for the cross-attention's relative "
                    "bias): pass the MegaCache returned by the previous call, a full-history attention_mask "
                    "[B, past + L], or past_length")
            out, cross_attn, cross_present = self.cross_attn(
                out, encoder_hidden_states, key_padding_mask=encoder_attention_mask, past_key_value=cross_past,
                use_cache=use_cache, output_attentions=output_attentions, query_offset=past_length)
            if cross_present is None:
                cross_present = (None, None)
        if self.nffn is not None:
            out = self.nffn(out)
        present = None
        if use_cache:
            seen = None if past_length is None else past_length + seq_len
            present = MegaCache(tuple(self_present) + tuple(cross_present), seen_tokens=seen)
        return out, present, self_attn, cross_attn


__all__ = [
    "MEGA_NORMALIZATIONS",
    "MEGA_ATTENTION_ACTIVATIONS",
    "MEGA_RELATIVE_POSITIONAL_BIASES",
    "MEGA_ACTIVATIONS",
    "get_activation",
    "relu2",
    "laplace",
    "MegaDropout",
    "ScaleNorm",
    "MegaRMSNorm",
    "MegaBatchNorm",
    "build_mega_norm",
    "SimpleRelativePositionalBias",
    "RotaryRelativePositionalBias",
    "build_relative_positional_bias",
    "MegaCache",
    "MovingAverageGatedAttention",
    "GatedCrossAttention",
    "NormalizedFeedForwardNetwork",
    "MegaLayer",
]

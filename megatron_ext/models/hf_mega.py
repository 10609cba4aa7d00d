"""Mega language models with a Hugging Face-style API (no dependency on ``transformers``).

* :class:`MegaConfig` -- Hugging Face's ``MegaConfig`` fields, meanings and defaults, plus
  ``ema_impl`` (``auto`` (default: the fused C++/CUDA kernel when it builds, else FFT), ``fused``, ``fft`` or
  ``scan``; passed to :class:`MultiHeadEMA`).
* :class:`MegaModel` -- embeddings (word + optional token-type; no absolute positions: Mega's
  position information comes from the EMA and the relative bias) and a stack of
  :class:`~megatron_ext.modules.mega.MegaLayer`.
* :class:`MegaForCausalLM` (decoder, LM head tied to the word embeddings) and
  :class:`MegaForMaskedLM` (encoder, tied LM head).
* Encoder-decoder: a ``MegaModel`` encoder (``is_decoder=False``) and a ``MegaForCausalLM``
  decoder built with ``add_cross_attention=True``, called with ``encoder_hidden_states`` /
  ``encoder_attention_mask``.

Direction: a decoder (``is_decoder=True``) is causal everywhere -- causal attention and a causal
EMA, whatever ``config.bidirectional`` says. An encoder uses non-causal attention and a
bidirectional EMA iff ``config.bidirectional``.

Masks: ``attention_mask`` / ``encoder_attention_mask`` are ``[B, L]`` with 1 = real token,
0 = padding. During incremental decoding ``attention_mask`` may be the new tokens' mask ``[B, L]``
(cached positions are then taken as real tokens) or the full-history mask ``[B, past + L]``.

Sequence length: with ``relative_positional_bias="rotary"`` any length works (the sinusoid tables
grow). With ``"simple"`` the attention window (the whole sequence, or one chunk with chunking)
must fit in ``max_positions``; otherwise a ValueError names ``max_positions``.

``attentions``: per layer ``[B, 1, L, T]`` -- rows are the (new) queries, columns the keys the layer
saw: the whole sequence, or during decoding the cached keys of the current chunk followed by the
new ones. With chunking the matrix is the dense block-diagonal one (zero across chunks).
``cross_attentions``: per layer ``[B, 1, L, S]``.

There is no final norm after the last layer (as in Hugging Face's ``MegaModel``); the LM heads'
optional ``tanh(Linear)`` (``add_lm_hidden_dense_layer``) sits between it and the tied projection.

``use_cache`` (None = ``config.use_cache`` for decoders without ``truncation`` and without
``labels``; always False for encoders; True on an encoder is a ValueError). A truncated EMA
(``truncation`` set) has no finite recurrent state, so such a decoder cannot cache.

``past_key_values``: a tuple with one :class:`~megatron_ext.modules.mega.MegaCache` per layer, the
5-tuple ``(self_key [B,T,Z], self_value [B,T,H], self_ema_state [B,D,N], cross_key [B,S,Z] or None,
cross_value [B,S,D] or None)``; with chunking ``T < chunk_size`` (the key/value cache restarts at
chunk boundaries and is None right after one) while the EMA state carries over.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ext.modules.mega import (
    MEGA_ACTIVATIONS,
    MEGA_ATTENTION_ACTIVATIONS,
    MEGA_NORMALIZATIONS,
    MEGA_RELATIVE_POSITIONAL_BIASES,
    MegaLayer,
)
from megatron_ext.modules.mega_ema import EMA_IMPL_CHOICES


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
class MegaConfig:
    """Hugging Face ``MegaConfig`` fields and defaults (plus ``ema_impl``).

    Sizes: ``hidden_size`` D, ``intermediate_size`` H (the value / attention output size),
    ``shared_representation_size`` Z (query/key size), ``ema_projection_size`` N (EMA dimension),
    ``nffn_hidden_size`` (the NFFN's inner size). ``chunk_size`` is only used when ``use_chunking``.
    ``num_attention_heads`` is always 1 (read-only). Unknown keyword arguments raise TypeError;
    invalid values raise ValueError naming the field.
    """

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        intermediate_size: int = 256,
        ema_projection_size: int = 16,
        bidirectional: bool = True,
        shared_representation_size: int = 64,
        use_chunking: bool = False,
        chunk_size: int = -1,
        truncation: Optional[int] = None,
        normalize_before_mega: bool = True,
        normalization_type: str = "scalenorm",
        norm_affine: bool = True,
        activation: str = "silu",
        attention_activation: str = "softmax",
        dropout_prob: float = 0.1,
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        use_feature_dropout: bool = False,
        use_normalized_ffn: bool = True,
        nffn_hidden_size: int = 256,
        normalize_before_ffn: bool = True,
        nffn_activation_dropout_prob: float = 0.1,
        max_positions: int = 2048,
        add_token_type_embeddings: bool = False,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        ema_delta_alpha_range: float = 0.2,
        ema_beta_range: float = 0.02,
        ema_gamma_omega_range: float = 1.0,
        pad_token_id: Optional[int] = 1,
        bos_token_id: Optional[int] = 0,
        eos_token_id: Optional[int] = 2,
        relative_positional_bias: str = "rotary",
        classifier_dropout: Optional[float] = None,
        use_cache: bool = True,
        add_lm_hidden_dense_layer: bool = True,
        is_decoder: bool = False,
        add_cross_attention: bool = False,
        ema_impl: str = "auto",
        **unknown: Any,
    ):
        if unknown:
            raise TypeError(f"MegaConfig got unknown argument(s): {', '.join(sorted(unknown))}")
        values = dict(locals())
        for name in self.field_names():
            setattr(self, name, values[name])
        self.validate()

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        params = inspect.signature(cls.__init__).parameters
        return tuple(n for n, p in params.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD)

    @property
    def num_attention_heads(self) -> int:
        return 1

    def validate(self) -> None:
        def err(field, msg):
            raise ValueError(f"MegaConfig.{field}={getattr(self, field)!r}: {msg}")

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "ema_projection_size",
                      "shared_representation_size", "nffn_hidden_size", "max_positions", "type_vocab_size"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                err(field, "expected a positive integer")
        for field, allowed in (("attention_activation", MEGA_ATTENTION_ACTIVATIONS),
                               ("relative_positional_bias", MEGA_RELATIVE_POSITIONAL_BIASES),
                               ("normalization_type", MEGA_NORMALIZATIONS),
                               ("activation", MEGA_ACTIVATIONS),
                               ("ema_impl", EMA_IMPL_CHOICES)):
            if getattr(self, field) not in allowed:
                err(field, f"expected one of {', '.join(allowed)}")
        for field in ("dropout_prob", "hidden_dropout_prob", "attention_probs_dropout_prob",
                      "nffn_activation_dropout_prob"):
            v = getattr(self, field)
            if not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
                err(field, "expected a probability in [0, 1)")
        if self.classifier_dropout is not None and not 0.0 <= float(self.classifier_dropout) < 1.0:
            err("classifier_dropout", "expected None or a probability in [0, 1)")
        if self.use_chunking:
            if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size <= 0:
                err("chunk_size", "use_chunking=True needs a positive chunk_size")
            if self.relative_positional_bias == "simple" and self.chunk_size > self.max_positions:
                err("chunk_size", f"the simple relative bias covers max_positions={self.max_positions} positions; "
                                  "chunk_size must not exceed it")
        if self.relative_positional_bias == "rotary" and self.shared_representation_size % 2 != 0:
            err("shared_representation_size", "the rotary relative positional bias needs an even size")
        if self.truncation is not None and (not isinstance(self.truncation, int) or self.truncation < 1):
            err("truncation", "expected None or a positive integer")

    def to_dict(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self.field_names()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any], **overrides: Any) -> "MegaConfig":
        kwargs = dict(d)
        kwargs.pop("num_attention_heads", None)
        kwargs.update(overrides)
        return cls(**kwargs)

    def copy(self, **overrides: Any) -> "MegaConfig":
        return self.from_dict(self.to_dict(), **overrides)

    def __eq__(self, other) -> bool:
        return isinstance(other, MegaConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"MegaConfig({body})"


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
class _Output:
    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__ if getattr(self, f) is not None)

    def __getitem__(self, i):
        return self.to_tuple()[i]


@dataclass
class MegaModelOutput(_Output):
    last_hidden_state: torch.Tensor = None
    past_key_values: Optional[tuple] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    cross_attentions: Optional[tuple] = None


@dataclass
class MegaCausalLMOutput(_Output):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None
    past_key_values: Optional[tuple] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    cross_attentions: Optional[tuple] = None


@dataclass
class MegaMaskedLMOutput(_Output):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
class MegaEmbeddings(nn.Module):
    """Word embeddings (+ token-type embeddings when ``add_token_type_embeddings``); no positions."""

    def __init__(self, config: MegaConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = None
        if config.add_token_type_embeddings:
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)

    def forward(self, input_ids: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
            x = x + self.token_type_embeddings(token_type_ids)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids were given but config.add_token_type_embeddings is False")
        return x


class MegaModel(nn.Module):
    """Mega encoder (``is_decoder=False``) or decoder (``is_decoder=True``) without a head.

    ``add_embeddings=False`` builds no embedding module: ``forward`` then needs ``inputs_embeds``
    (and rejects ``token_type_ids``). See the module docstring for masks, shapes and the cache.
    """

    def __init__(self, config: MegaConfig, add_embeddings: bool = True):
        super().__init__()
        self.config = config
        self.causal = bool(config.is_decoder)
        self.embedding_layer = MegaEmbeddings(config) if add_embeddings else None
        self.layers = nn.ModuleList([MegaLayer(config, causal=self.causal) for _ in range(config.num_hidden_layers)])
        self._init_embeddings()

    def _init_embeddings(self) -> None:
        if self.embedding_layer is None:
            return
        std = self.config.initializer_range
        for emb in (self.embedding_layer.word_embeddings, self.embedding_layer.token_type_embeddings):
            if emb is None:
                continue
            nn.init.normal_(emb.weight, mean=0.0, std=std)
            if emb.padding_idx is not None:
                with torch.no_grad():
                    emb.weight[emb.padding_idx].zero_()

    def get_input_embeddings(self) -> Optional[nn.Embedding]:
        return None if self.embedding_layer is None else self.embedding_layer.word_embeddings

    def _past_length(self, past_key_values, attention_mask, seq_len: int) -> Optional[int]:
        if past_key_values is None:
            return 0
        return self.layers[0].resolve_past_length(past_key_values[0], attention_mask, seq_len)

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                encoder_hidden_states: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None, past_key_values: Optional[tuple] = None,
                use_cache: Optional[bool] = None, output_attentions: bool = False,
                output_hidden_states: bool = False, return_dict: bool = True):
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None and self.embedding_layer is None:
            raise ValueError("this MegaModel was built with add_embeddings=False: pass inputs_embeds")
        if use_cache is None:  # a truncated EMA has no finite state to cache
            use_cache = bool(cfg.use_cache) and self.causal and cfg.truncation is None
        if (use_cache or past_key_values is not None) and not self.causal:
            raise ValueError("use_cache / past_key_values need a decoder (config.is_decoder=True)")
        if past_key_values is not None and len(past_key_values) != len(self.layers):
            raise ValueError(f"past_key_values has {len(past_key_values)} entries, the model has {len(self.layers)} layers")
        if self.layers and self.layers[0].cross_attn is not None and encoder_hidden_states is None:
            if past_key_values is None or past_key_values[0][3] is None:
                raise ValueError("config.add_cross_attention=True: pass encoder_hidden_states")

        if self.embedding_layer is not None:
            hidden = self.embedding_layer(input_ids, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds)
        else:
            if token_type_ids is not None:
                raise ValueError("token_type_ids need the embedding layer (add_embeddings=True)")
            hidden = inputs_embeds
        bsz, seq_len = hidden.shape[:2]
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.size(0) != bsz or attention_mask.size(1) < seq_len:
                raise ValueError(f"attention_mask must be [batch, length] (or [batch, past + length] when decoding) "
                                 f"with 1 = real token; got {tuple(attention_mask.shape)} for input "
                                 f"{tuple(hidden.shape[:2])}")
            attention_mask = attention_mask.bool()
        if encoder_attention_mask is not None:
            encoder_attention_mask = encoder_attention_mask.bool()

        past_length = self._past_length(past_key_values, attention_mask, seq_len)
        if cfg.relative_positional_bias == "simple" and not cfg.use_chunking:
            window = seq_len + (past_length or 0)
            if window > cfg.max_positions:
                raise ValueError(f"sequence length {window} exceeds max_positions={cfg.max_positions} of the simple "
                                 "relative positional bias (use relative_positional_bias='rotary', chunking, or a "
                                 "larger max_positions)")

        all_hidden = (hidden,) if output_hidden_states else None
        all_attn = () if output_attentions else None
        all_cross = () if output_attentions and cfg.add_cross_attention else None
        presents = () if use_cache else None
        for i, layer in enumerate(self.layers):
            layer_past = None if past_key_values is None else past_key_values[i]
            hidden, present, self_attn, cross_attn = layer(
                hidden, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask, past_key_value=layer_past, use_cache=use_cache,
                output_attentions=output_attentions, past_length=past_length)
            if use_cache:
                presents = presents + (present,)
            if output_hidden_states:
                all_hidden = all_hidden + (hidden,)
            if output_attentions:
                all_attn = all_attn + (self_attn,)
                if all_cross is not None:
                    all_cross = all_cross + (cross_attn,)
        out = MegaModelOutput(last_hidden_state=hidden, past_key_values=presents, hidden_states=all_hidden,
                              attentions=all_attn, cross_attentions=all_cross)
        return out if return_dict else out.to_tuple()


class _MegaLMHead(nn.Module):
    """Optional ``tanh(Linear)`` (``add_lm_hidden_dense_layer``), then logits with the tied embedding."""

    def __init__(self, config: MegaConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = None
        if config.add_lm_hidden_dense_layer:
            self.dense = nn.Linear(config.hidden_size, config.hidden_size)
            nn.init.normal_(self.dense.weight, mean=0.0, std=config.initializer_range)
            nn.init.zeros_(self.dense.bias)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.lm_head.weight = word_embeddings.weight  # tied
        nn.init.zeros_(self.lm_head.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            hidden = torch.tanh(self.dense(hidden))
        return self.lm_head(hidden)


class MegaForCausalLM(nn.Module):
    """Mega decoder LM (``config.is_decoder`` must be True). ``forward(..., labels=None)`` ->
    :class:`MegaCausalLMOutput`; loss = mean CE of ``logits[:, :-1]`` vs ``labels[:, 1:]``
    (ignore_index -100)."""

    def __init__(self, config: MegaConfig):
        super().__init__()
        if not config.is_decoder:
            raise ValueError("MegaForCausalLM needs config.is_decoder=True")
        self.config = config
        self.mega = MegaModel(config, add_embeddings=True)
        self.head = _MegaLMHead(config, self.mega.get_input_embeddings())

    def get_output_embeddings(self) -> nn.Linear:
        return self.head.lm_head

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                encoder_hidden_states: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None, past_key_values: Optional[tuple] = None,
                labels: Optional[torch.Tensor] = None, use_cache: Optional[bool] = None,
                output_attentions: bool = False, output_hidden_states: bool = False, return_dict: bool = True):
        if use_cache is None and labels is not None:
            use_cache = False  # training: no cache
        out = self.mega(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
                        encoder_attention_mask=encoder_attention_mask, past_key_values=past_key_values,
                        use_cache=use_cache, output_attentions=output_attentions,
                        output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.head(out.last_hidden_state)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].contiguous()
            loss = F.cross_entropy(shifted.view(-1, shifted.size(-1)).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        res = MegaCausalLMOutput(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                 hidden_states=out.hidden_states, attentions=out.attentions,
                                 cross_attentions=out.cross_attentions)
        return res if return_dict else res.to_tuple()

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int, use_cache: bool = True,
                        attention_mask: Optional[torch.Tensor] = None,
                        encoder_hidden_states: Optional[torch.Tensor] = None,
                        encoder_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Greedy decoding: returns ``[B, L + max_new_tokens]`` (no early stop at EOS).
        ``attention_mask`` covers the prompt; generated tokens are real tokens."""
        ids = input_ids
        mask = attention_mask
        kw = dict(encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask)
        out = self(ids, attention_mask=mask, use_cache=use_cache, **kw)
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
            if step == max_new_tokens - 1:
                break
            if use_cache:
                out = self(nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True, **kw)
            else:
                out = self(ids, attention_mask=mask, use_cache=False, **kw)
        return ids


class MegaForMaskedLM(nn.Module):
    """Mega encoder (``config.is_decoder`` must be False) with a tied LM head.
    ``forward(..., labels=None)`` -> :class:`MegaMaskedLMOutput`; loss = mean CE over labels != -100."""

    def __init__(self, config: MegaConfig):
        super().__init__()
        if config.is_decoder:
            raise ValueError("MegaForMaskedLM needs config.is_decoder=False (a bidirectional encoder)")
        self.config = config
        self.mega = MegaModel(config, add_embeddings=True)
        self.dropout = nn.Dropout(config.dropout_prob)
        self.head = _MegaLMHead(config, self.mega.get_input_embeddings())

    def get_output_embeddings(self) -> nn.Linear:
        return self.head.lm_head

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                encoder_hidden_states: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                output_attentions: bool = False, output_hidden_states: bool = False, return_dict: bool = True):
        out = self.mega(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
                        encoder_attention_mask=encoder_attention_mask, use_cache=False,
                        output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                        return_dict=True)
        logits = self.head(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100)
        res = MegaMaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                 attentions=out.attentions)
        return res if return_dict else res.to_tuple()


__all__ = [
    "MegaConfig",
    "MegaModel",
    "MegaEmbeddings",
    "MegaForCausalLM",
    "MegaForMaskedLM",
    "MegaModelOutput",
    "MegaCausalLMOutput",
    "MegaMaskedLMOutput",
]

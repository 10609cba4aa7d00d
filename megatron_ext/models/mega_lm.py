"""Mega inside the toolkit: ``model.arch=mega`` for ``pretrain_gpt.py`` and ``arch: mega`` for either side of
``pretrain_bart.py``.

The layers are those of the Hugging Face-style API in ``megatron_ext.models.hf_mega`` (``MegaModel`` built without
its own embeddings); around them the toolkit puts the pieces every model here shares -- megatron-core's
``VocabParallelEmbedding`` and output layer (tied by default), the padded-vocabulary masking and
``vocab_parallel_cross_entropy`` (``LMHeadMixin``), per-component seeded init -- so training, checkpoints, the
trainer's logging and the BART task work unchanged.

The config comes from ``model.mega`` (``MegaArchConfig``: Hugging Face ``MegaConfig`` names) plus the usual keys:
``hidden_size`` (D), ``num_layers``, ``hidden_dropout`` (Mega's ``dropout_prob``, ``hidden_dropout_prob`` and
``nffn_activation_dropout_prob``), ``attention_dropout`` (``attention_probs_dropout_prob``), ``init_method_std``
(``initializer_range``). The transformer-only keys (``num_attention_heads``, ``ffn_hidden_size``,
``normalization``, ``activation``, ``position_embedding_type``, ``bias``, ...) do not apply: the run logs which of
them are set to something other than their default. Mega's layers are plain ``nn.Linear`` (replicated under tensor
parallelism, see below); pipeline parallelism is refused by the config check (``config.model_validation``); data
parallelism and ZeRO 0-3 work.

A pre-norm Mega stack (``normalize_before_mega``) ends with a final norm of ``normalization_type`` unless
``model.mega.final_norm=false`` (Hugging Face's ``MegaModel`` has none; imported models set it false). The LM head of
``MegaGPTModel`` may carry Hugging Face ``MegaForCausalLM``'s extras: ``model.mega.lm_hidden_dense_layer``
(``tanh(Linear(D, D))`` before the output layer, parameters ``lm_dense.*``) and ``model.mega.lm_head_bias`` (a
vocabulary-parallel ``output_layer.bias``).

Tensor parallelism (``model.tensor_model_parallel_size > 1``) splits the vocabulary: the word embedding, the output
layer (and its bias) and the cross-entropy are megatron-core's vocabulary-parallel ones, while the Mega layers and
``lm_dense`` are replicated on every tensor-parallel rank (same init, same inputs, same dropout masks -- the default
RNG is the same on the ranks of a tensor-parallel group -- hence the same gradients). It saves the vocabulary's
memory, not the layers'.

Incremental decoding reuses Mega's own per-layer state (``megatron_ext.modules.mega.MegaCache``: the current
chunk's keys/values, the EMA state, the cross-attention keys/values) wrapped in :class:`MegaInferenceCache`, which
shares the bookkeeping of the transformer ``KVCache`` (``megatron_ext.modules.attention.InferenceCache``: length,
real-token history mask, row selection), so generation drives every family the same way:
``MegaGPTModel.forward(new_tokens, padding_mask=..., inference_cache=model.new_inference_cache(b, max_length))``.
A left-padded batch is exact without chunking (padding is zeroed before the EMA and masked as keys, and the
relative bias only depends on distances); with ``chunk_size > 0`` the chunk boundaries move with the padding, so
``megatron_ext.inference.generation`` runs prompts of different lengths as separate sub-batches there. A truncated
EMA (``model.mega.truncation``) has no finite state: ``supports_inference_cache`` is then False.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from megatron_ext.config.model_validation import TRANSFORMER_ONLY_KEYS, check_vocab_size
from megatron_ext.config.schema import ModelConfig
from megatron_ext.errors import DataError
from megatron_ext.models.gpt import LMHeadMixin, build_output_layer, component_ids, init_seed_scope, padded_vocab_size
from megatron_ext.models.hf_mega import MegaConfig, MegaModel
from megatron_ext.modules.attention import InferenceCache
from megatron_ext.modules.common import ensure_model_parallel, init_method_normal, make_parallel_config, tp_group
from megatron_ext.modules.mega import MegaCache, build_mega_norm

log = logging.getLogger("megatron_ext")

def _get(cfg, key, default=None):
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def warn_transformer_only_keys(cfg, prefix: str, defaults) -> None:
    """Log the transformer-only keys of ``cfg`` that differ from ``defaults`` (they have no effect under Mega)."""
    changed = [k for k in TRANSFORMER_ONLY_KEYS if hasattr(defaults, k) and _get(cfg, k) != getattr(defaults, k)]
    if changed:
        log.warning("model.%sarch=mega: %s not used by Mega layers (see model.%smega.*)",
                    prefix, ", ".join(f"model.{prefix}{k}" for k in changed), prefix)


def mega_config_from(mega, *, hidden_size: int, num_layers: int, hidden_dropout: float, attention_dropout: float,
                     init_method_std: float, seq_length: int, is_decoder: bool, add_cross_attention: bool = False):
    """A ``megatron_ext.models.hf_mega.MegaConfig`` (no embeddings: ``vocab_size`` is unused) from ``MegaArchConfig``."""
    d = int(hidden_size)
    chunk = int(_get(mega, "chunk_size"))
    return MegaConfig(
        vocab_size=1,
        hidden_size=d,
        num_hidden_layers=int(num_layers),
        intermediate_size=int(_get(mega, "intermediate_size") or 2 * d),
        ema_projection_size=int(_get(mega, "ema_projection_size")),
        shared_representation_size=int(_get(mega, "shared_representation_size")),
        dropout_prob=float(hidden_dropout),
        hidden_dropout_prob=float(hidden_dropout),
        attention_probs_dropout_prob=float(attention_dropout),
        nffn_activation_dropout_prob=float(hidden_dropout),
        max_positions=int(_get(mega, "max_positions") or seq_length),
        initializer_range=float(init_method_std),
        relative_positional_bias=str(_get(mega, "relative_positional_bias")).lower(),
        activation=str(_get(mega, "activation")),
        attention_activation=str(_get(mega, "attention_activation")).lower(),
        bidirectional=bool(_get(mega, "bidirectional")) and not is_decoder,
        truncation=_get(mega, "truncation"),
        use_chunking=chunk > 0,
        chunk_size=chunk,
        normalization_type=str(_get(mega, "normalization_type")).lower(),
        normalize_before_mega=bool(_get(mega, "normalize_before_mega")),
        norm_affine=bool(_get(mega, "norm_affine")),
        use_normalized_ffn=bool(_get(mega, "use_normalized_ffn")),
        nffn_hidden_size=int(_get(mega, "nffn_hidden_size") or 2 * d),
        normalize_before_ffn=bool(_get(mega, "normalize_before_ffn")),
        use_feature_dropout=bool(_get(mega, "use_feature_dropout")),
        add_token_type_embeddings=False,
        is_decoder=bool(is_decoder),
        add_cross_attention=bool(add_cross_attention),
        use_cache=False,
        ema_impl=str(_get(mega, "ema_impl")).lower(),
    )


class MegaStack(nn.Module):
    """Mega layers over given embeddings ``[b, s, D]`` (``MegaModel`` without embeddings) plus the final norm of a
    pre-norm stack. Encoder (bidirectional EMA unless ``bidirectional: false``) or causal decoder, optionally with
    gated cross-attention to a memory."""

    def __init__(self, mega_config, final_norm: bool = True):
        super().__init__()

        self.config = mega_config
        self.mega = MegaModel(mega_config, add_embeddings=False)
        self.final_norm = (build_mega_norm(mega_config.normalization_type, mega_config.hidden_size,
                                           affine=mega_config.norm_affine)
                           if mega_config.normalize_before_mega and final_norm else None)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                encoder_hidden_states: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``hidden_states`` ``[b, s, D]``; masks ``[b, s]`` / ``[b, S]`` with 1/True = real token."""
        out = self.mega(inputs_embeds=hidden_states, attention_mask=attention_mask,
                        encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                        use_cache=False, return_dict=True).last_hidden_state
        return self.final_norm(out) if self.final_norm is not None else out

    @property
    def supports_inference_cache(self) -> bool:
        """A causal stack without EMA truncation (a truncated EMA has no finite recurrent state)."""
        return bool(self.config.is_decoder) and self.config.truncation is None

    def incremental(self, hidden_states: torch.Tensor, cache: "MegaInferenceCache",
                    encoder_hidden_states: Optional[torch.Tensor] = None,
                    encoder_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One decoding step over the new tokens' embeddings ``[b, s, D]``; ``cache.begin_step`` must have been
        called (it holds the real-token history). Updates ``cache.past`` in place."""
        if not self.supports_inference_cache:
            raise ValueError("this Mega stack cannot decode incrementally: it needs is_decoder=True and no EMA "
                             f"truncation (model.mega.truncation={self.config.truncation!r})")
        out = self.mega(inputs_embeds=hidden_states, attention_mask=cache.history_mask(),
                        encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                        past_key_values=cache.past, use_cache=True, return_dict=True)
        cache.past = out.past_key_values
        hidden = out.last_hidden_state
        return self.final_norm(hidden) if self.final_norm is not None else hidden


class MegaInferenceCache(InferenceCache):
    """The incremental state of a Mega stack: ``past`` (a tuple with one ``MegaCache`` per layer, None before the
    first step) plus the shared bookkeeping of ``InferenceCache`` (see the module docstring)."""

    def __init__(self, batch_size: int, max_length: int):
        super().__init__(batch_size, max_length)
        self.past: Optional[tuple] = None

    def _index_select_state(self, rows: torch.Tensor) -> None:
        if self.past is None:
            return

        self.past = tuple(
            MegaCache(tuple(None if t is None else t.index_select(0, rows.to(t.device)) for t in layer),
                      seen_tokens=getattr(layer, "seen_tokens", None))
            for layer in self.past
        )


def build_mega_stack(stack_cfg, *, seq_length: int, is_decoder: bool, add_cross_attention: bool = False) -> MegaStack:
    """The stack of ``model.mega`` / ``model.<side>.mega`` (checked when the config was: ``config.model_validation``)."""
    cfg = mega_config_from(stack_cfg.mega, hidden_size=stack_cfg.hidden_size, num_layers=stack_cfg.num_layers,
                           hidden_dropout=stack_cfg.hidden_dropout, attention_dropout=stack_cfg.attention_dropout,
                           init_method_std=stack_cfg.init_method_std, seq_length=seq_length, is_decoder=is_decoder,
                           add_cross_attention=add_cross_attention)
    return MegaStack(cfg, final_norm=bool(_get(stack_cfg.mega, "final_norm", True)))


class MegaGPTModel(LMHeadMixin, nn.Module):
    """Causal Mega language model with ``GPTModel``'s interface (``model.arch=mega`` in ``pretrain_gpt.py``).

    ``forward(tokens [b, s], position_ids=None, labels=None, attention_mask=None)``: per-token CE ``[b, s]`` with
    ``labels``, else vocab-parallel logits ``[b, s, padded_vocab]``. Positions come from Mega's relative bias, so
    ``position_ids`` is ignored; ``attention_mask`` (document-reset masks) is not supported (an error).

    Generation only: ``padding_mask`` ``[b, s]`` (True = real token; a left-padded batch) and ``inference_cache``
    (``new_inference_cache(b, max_length)``; ``tokens`` are then the new tokens) -- see the module docstring.
    """

    def __init__(self, cfg, vocab_size: int, *, init_seed: Optional[int] = None,
                 params_dtype: torch.dtype = torch.float32):
        super().__init__()

        check_vocab_size(vocab_size)  # the config itself was checked when it was made (config.model_validation)
        warn_transformer_only_keys(cfg, "", ModelConfig())
        if init_seed is None:
            init_seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        self.init_seed = int(init_seed)
        comp = component_ids(int(cfg.num_layers))
        tp = int(cfg.tensor_model_parallel_size)
        ensure_model_parallel(tp)
        self.config = cfg
        self.vocab_size = int(vocab_size)
        self.padded_vocab_size = padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, tp)
        self.hidden_size = int(cfg.hidden_size)
        self.share_embeddings_and_output_weights = bool(cfg.share_embeddings_and_output_weights)
        parallel_config = make_parallel_config(tp, params_dtype=params_dtype, sequence_parallel=False)
        init_method = init_method_normal(cfg.init_method_std)
        with init_seed_scope(self.init_seed, comp["embedding"]):
            self.embedding = _MegaEmbedding(self.padded_vocab_size, self.hidden_size, parallel_config, init_method,
                                            float(cfg.hidden_dropout))
        with init_seed_scope(self.init_seed, 1):
            self.decoder = build_mega_stack(cfg, seq_length=int(cfg.seq_length), is_decoder=True)
        with init_seed_scope(self.init_seed, comp["output_layer"]):
            self.lm_dense = None
            if bool(getattr(cfg.mega, "lm_hidden_dense_layer", False)):
                self.lm_dense = nn.Linear(self.hidden_size, self.hidden_size, dtype=params_dtype)
                init_method(self.lm_dense.weight)
                nn.init.zeros_(self.lm_dense.bias)
            self.output_layer = build_output_layer(cfg, self.padded_vocab_size, parallel_config, init_method,
                                                   tied=self.share_embeddings_and_output_weights,
                                                   bias=bool(getattr(cfg.mega, "lm_head_bias", False)))
        self._pad_masks: dict = {}

    @property
    def supports_inference_cache(self) -> bool:
        return self.decoder.supports_inference_cache

    @property
    def max_positions(self) -> Optional[int]:
        """Mega has no position table: None (the simple relative bias's window is checked by the layers)."""
        return None

    def new_inference_cache(self, batch_size: int, max_length: int) -> MegaInferenceCache:
        if not self.supports_inference_cache:
            raise ValueError(f"model.mega.truncation={self.config.mega.truncation!r}: a truncated EMA has no "
                             f"finite state to cache; generate with use_cache=False")
        return MegaInferenceCache(batch_size, max_length)

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                padding_mask: Optional[torch.Tensor] = None, inference_cache=None) -> torch.Tensor:
        if attention_mask is not None:
            raise DataError("model.arch=mega does not take an explicit attention_mask (document-reset masks, "
                            "model.data.reset_attention_mask): Mega's EMA runs across the whole sequence")
        if tokens.dim() != 2:
            raise DataError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        if padding_mask is not None and tuple(padding_mask.shape) != tuple(tokens.shape):
            raise DataError(f"padding_mask shape {tuple(padding_mask.shape)} does not match tokens "
                            f"{tuple(tokens.shape)}")
        if inference_cache is not None:
            if labels is not None:
                raise DataError("inference_cache: labels are not accepted (incremental decoding)")
            inference_cache.begin_step(padding_mask, tokens.shape[1], tokens.device)
            try:
                hidden = self.decoder.incremental(self.embedding(tokens), inference_cache)
            except BaseException:
                inference_cache.abort_step()
                raise
            inference_cache.end_step()
            return self.compute_logits(self._head_hidden(hidden))
        hidden = self.decoder(self.embedding(tokens), padding_mask)
        logits = self.compute_logits(self._head_hidden(hidden))
        if labels is None:
            return logits
        return self.loss_from_logits(logits, labels)

    def _head_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hugging Face's ``tanh(dense(.))`` before the output layer (``model.mega.lm_hidden_dense_layer``)."""
        return hidden if self.lm_dense is None else torch.tanh(self.lm_dense(hidden))


class _MegaEmbedding(nn.Module):
    """Token embeddings only (megatron-core ``VocabParallelEmbedding`` at TP=1) + dropout: Mega's positions come
    from its relative bias and the EMA."""

    def __init__(self, padded_vocab: int, hidden_size: int, parallel_config, init_method, dropout: float):
        super().__init__()
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        self.word_embeddings = VocabParallelEmbedding(padded_vocab, hidden_size, init_method=init_method,
                                                      config=parallel_config, tp_group=tp_group())
        self.dropout = float(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(tokens)
        return nn.functional.dropout(x, self.dropout, self.training) if self.dropout > 0 else x


__all__ = ["MegaGPTModel", "MegaStack", "MegaInferenceCache", "build_mega_stack", "mega_config_from"]

"""Pre-norm transformer layer and block with optional full activation checkpointing.

Layer::

    x = x + dropout(attention(input_layernorm(x)))
    x = x + dropout(mlp(pre_mlp_layernorm(x)))

Block: ``num_layers`` layers, then (optionally) a final norm. With
``activations_checkpoint_granularity="full"`` each layer is wrapped in
``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` while training: only the layer
input is kept and the layer is recomputed in backward. ``preserve_rng_state`` replays the
default generators; the RNG tracker's streams (attention dropout in TP regions) are replayed
too, by restoring the tracker snapshot taken at forward time during the recompute.

Encoder-decoder layers (``CrossAttentionTransformerLayer`` / ``CrossAttentionTransformerBlock``)::

    x = x + dropout(self_attention(input_layernorm(x)))            causal (decoder) or not (perceiver)
    x = x + dropout(cross_attention(pre_cross_attn_layernorm(x), context, context_mask))
    x = x + dropout(mlp(pre_mlp_layernorm(x)))

``TransformerLayer(causal=False)`` with a padding mask ``[b, 1, 1, s]`` is the bidirectional
encoder layer.

Incremental decoding: ``TransformerBlock.forward(..., inference_cache=KVCache)`` (and the cross-attention block's)
runs the layers on the new tokens only, layer ``i`` reading and extending ``inference_cache.layer(i)`` (see
``megatron_ext.modules.attention``). The cache path never checkpoints (it runs under ``no_grad`` in practice); the
training path is unchanged when no cache is given.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_ext.config.model_validation import CHECKPOINT_GRANULARITIES, normalize_checkpoint_granularity
from megatron_ext.modules.attention import ParallelCrossAttention, ParallelSelfAttention
from megatron_ext.modules.common import InitMethod, dropout
from megatron_ext.modules.mlp import ParallelMLP
from megatron_ext.modules.norms import build_norm
from megatron_ext.parallel.random import get_rng_tracker


class TransformerLayer(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        ffn_hidden_size: int,
        *,
        parallel_config,
        init_method: InitMethod,
        output_init_method: InitMethod,
        normalization: str = "layernorm",
        layernorm_epsilon: float = 1e-5,
        activation: str = "gelu",
        bias: bool = True,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        causal: bool = True,
        cross_attention: bool = False,
        kv_hidden_size: Optional[int] = None,
        num_query_groups: Optional[int] = None,
    ):
        super().__init__()
        self.hidden_dropout = float(hidden_dropout)
        self.input_layernorm = build_norm(normalization, hidden_size, layernorm_epsilon, bias)
        self.self_attention = ParallelSelfAttention(
            hidden_size,
            num_attention_heads,
            parallel_config=parallel_config,
            init_method=init_method,
            output_init_method=output_init_method,
            bias=bias,
            attention_dropout=attention_dropout,
            causal=causal,
            num_query_groups=num_query_groups,
        )
        if cross_attention:  # used by CrossAttentionTransformerLayer (its forward runs it)
            self.pre_cross_attn_layernorm = build_norm(normalization, hidden_size, layernorm_epsilon, bias)
            self.cross_attention = ParallelCrossAttention(
                hidden_size,
                num_attention_heads,
                parallel_config=parallel_config,
                init_method=init_method,
                output_init_method=output_init_method,
                kv_hidden_size=kv_hidden_size,
                bias=bias,
                attention_dropout=attention_dropout,
            )
        self.pre_mlp_layernorm = build_norm(normalization, hidden_size, layernorm_epsilon, bias)
        self.mlp = ParallelMLP(
            hidden_size,
            ffn_hidden_size,
            parallel_config=parallel_config,
            init_method=init_method,
            output_init_method=output_init_method,
            activation=activation,
            bias=bias,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        rotary_cos_sin: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        kv_cache=None,
    ) -> torch.Tensor:
        attn = self.self_attention(self.input_layernorm(hidden_states), attention_mask, rotary_cos_sin, kv_cache)
        hidden_states = _residual_add(dropout(attn, self.hidden_dropout, self.training), hidden_states)
        mlp = self.mlp(self.pre_mlp_layernorm(hidden_states))
        return _residual_add(dropout(mlp, self.hidden_dropout, self.training), hidden_states)


def _residual_add(branch: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``branch + residual``, in place on the branch output when that is a fresh tensor (nobody saves a layer's
    output projection for backward): one activation-sized allocation less per add. A view -- the output of the
    tensor-parallel all-reduce without a bias returns its input -- must not be modified in place."""
    if branch._is_view():
        return branch + residual
    return branch.add_(residual)


def _tracker_replay_context():
    """``context_fn`` for torch.utils.checkpoint: snapshot the tracker at forward time and
    run the recompute from that snapshot, then put the advanced streams back."""
    tracker = get_rng_tracker()
    snapshot = tracker.get_states()

    @contextlib.contextmanager
    def recompute():
        current = tracker.get_states()
        tracker.set_states(snapshot)
        try:
            yield
        finally:
            tracker.set_states(current)

    return contextlib.nullcontext(), recompute()


class TransformerBlock(nn.Module):
    """A stack of ``layer_cls`` layers (attribute ``layers``; ``TransformerLayer`` here) plus an optional final
    norm (``final_layernorm``). Layer kwargs are those of the layer."""

    layer_cls = TransformerLayer

    def __init__(
        self,
        num_layers: int,
        *,
        activations_checkpoint_granularity: Optional[str] = None,
        final_norm: bool = True,
        layer_init_scope=None,
        checkpoint_key: str = "model.activations_checkpoint_granularity",
        **layer_kwargs,
    ):
        super().__init__()
        self.checkpoint_granularity = normalize_checkpoint_granularity(activations_checkpoint_granularity,
                                                                       checkpoint_key)
        layers = []
        for i in range(num_layers):  # layer_init_scope(i): a context that seeds layer i's initialisation
            with (layer_init_scope(i) if layer_init_scope is not None else contextlib.nullcontext()):
                layers.append(self.layer_cls(**layer_kwargs))
        self.layers = nn.ModuleList(layers)
        if final_norm:
            self.final_layernorm = build_norm(
                layer_kwargs.get("normalization", "layernorm"),
                layer_kwargs["hidden_size"],
                layer_kwargs.get("layernorm_epsilon", 1e-5),
                layer_kwargs.get("bias", True),
            )
        else:
            self.final_layernorm = None

    def _run(self, hidden_states: torch.Tensor, *layer_args) -> torch.Tensor:
        """Every layer on ``(hidden_states, *layer_args)`` (recomputed in backward under full checkpointing),
        then the final norm."""
        recompute = self.checkpoint_granularity == "full" and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            hidden_states = run_layer(layer, recompute, hidden_states, *layer_args)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states

    def _run_cached(self, hidden_states: torch.Tensor, inference_cache, *layer_args) -> torch.Tensor:
        """Every layer on the new tokens with its slice of ``inference_cache``, then the final norm."""
        for i, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, *layer_args, kv_cache=inference_cache.layer(i))
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        rotary_cos_sin: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        inference_cache=None,
    ) -> torch.Tensor:
        if inference_cache is not None:
            return self._run_cached(hidden_states, inference_cache, attention_mask, rotary_cos_sin)
        return self._run(hidden_states, attention_mask, rotary_cos_sin)


def run_layer(layer: nn.Module, recompute: bool, *args):
    """``layer(*args)``, under full activation checkpointing (tracker streams replayed) when ``recompute``."""
    if recompute:
        return checkpoint(layer, *args, use_reentrant=False, context_fn=_tracker_replay_context)
    return layer(*args)


class CrossAttentionTransformerLayer(TransformerLayer):
    """Pre-norm self-attention -> cross-attention to ``context`` -> MLP, each with a residual
    (megatron-core names: ``input_layernorm``, ``self_attention``, ``pre_cross_attn_layernorm``,
    ``cross_attention``, ``pre_mlp_layernorm``, ``mlp``). ``causal=True``: the decoder layer;
    ``causal=False``: the Perceiver's cross layer (latents attend to each other, then to the tokens)."""

    def __init__(self, *args, **kwargs):
        kwargs["cross_attention"] = True
        super().__init__(*args, **kwargs)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        context_mask: Optional[torch.Tensor] = None,
        rotary_cos_sin: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        context_rotary_cos_sin: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        kv_cache=None,
    ) -> torch.Tensor:
        """``hidden_states`` ``[b, s, h]``, ``context`` ``[b, s_ctx, h_kv]``; ``attention_mask`` for the
        self-attention (None: causal or full per ``causal``), ``context_mask`` (True = masked) broadcastable
        to ``[b, heads, s, s_ctx]``; ``rotary_cos_sin`` rotates self-attention q/k, ``context_rotary_cos_sin``
        the cross-attention keys; ``kv_cache`` (a ``LayerKVCache``) for incremental decoding."""
        attn = self.self_attention(self.input_layernorm(hidden_states), attention_mask, rotary_cos_sin, kv_cache)
        hidden_states = _residual_add(dropout(attn, self.hidden_dropout, self.training), hidden_states)
        cross = self.cross_attention(self.pre_cross_attn_layernorm(hidden_states), context, context_mask,
                                     context_rotary_cos_sin, kv_cache)
        hidden_states = _residual_add(dropout(cross, self.hidden_dropout, self.training), hidden_states)
        mlp = self.mlp(self.pre_mlp_layernorm(hidden_states))
        return _residual_add(dropout(mlp, self.hidden_dropout, self.training), hidden_states)


class CrossAttentionTransformerBlock(TransformerBlock):
    """``num_layers`` ``CrossAttentionTransformerLayer`` (attribute ``layers``) + optional final norm
    (``final_layernorm``): the encoder-decoder's decoder. Layer kwargs are those of the layer."""

    layer_cls = CrossAttentionTransformerLayer

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        context_mask: Optional[torch.Tensor] = None,
        rotary_cos_sin: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        context_rotary_cos_sin: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        inference_cache=None,
    ) -> torch.Tensor:
        if inference_cache is not None:
            return self._run_cached(hidden_states, inference_cache, context, attention_mask, context_mask,
                                    rotary_cos_sin, context_rotary_cos_sin)
        return self._run(hidden_states, context, attention_mask, context_mask, rotary_cos_sin,
                         context_rotary_cos_sin)


__all__ = [
    "TransformerLayer",
    "TransformerBlock",
    "CHECKPOINT_GRANULARITIES",
    "CrossAttentionTransformerLayer",
    "CrossAttentionTransformerBlock",
    "normalize_checkpoint_granularity",
    "run_layer",
]

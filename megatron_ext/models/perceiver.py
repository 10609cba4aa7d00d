"""Perceiver encoder (``model.encoder.arch=perceiver``): a fixed-size latent memory for the decoder.

A learned latent array ``latents`` ``[hidden_steps, h]`` (Xavier-normal, shared by all samples)
is expanded over the batch and refined by ``num_layers`` blocks; the token embeddings are only
ever *read* by cross-attention, never self-attended, so the cost is linear in the input length::

    z = latents                                          [b, K, h]
    for block in range(num_layers):
        r = z
        z = cross_layers[block](z, tokens, token_mask)   latent self-attn -> cross-attn to tokens -> MLP
        for j in range(k):                               k = num_self_attention_per_cross_attention
            z = self_layers[block * k + j](z)            latent self-attn -> MLP
        z = z + r                                        residual around the block
    z = final_layernorm(z)                               -> returned as [K, b, h] (Megatron layout)

All layers are pre-norm with their own residuals (``CrossAttentionTransformerLayer(causal=False)``,
``TransformerLayer(causal=False)``). The latents never see a mask (all K are real); the
cross-attention masks padded tokens (``token_mask`` True = real token). With
``position_embedding_type=rope`` the cross-attention keys are rotated by their token positions
(the latents query from position 0), so token order is visible to the Perceiver; with learned
absolute positions the token embeddings already carry them.

Initialisation: the latents are drawn under their own ``init_seed_scope`` component, layer ``n``
(in construction order: block 0's cross layer, its k self layers, block 1's cross layer, ...)
under ``layer_init_scope(n)``, so the same seed gives the same full weights at any TP size.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from megatron_ext.errors import DataError
from megatron_ext.modules.norms import build_norm
from megatron_ext.modules.transformer import (
    CrossAttentionTransformerLayer,
    TransformerLayer,
    normalize_checkpoint_granularity,
    run_layer,
)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class PerceiverEncoder(nn.Module):
    """See the module docstring. ``layer_kwargs`` are those of ``TransformerLayer`` (hidden_size,
    num_attention_heads, ffn_hidden_size, parallel_config, init_method, output_init_method,
    normalization, layernorm_epsilon, activation, bias, hidden_dropout, attention_dropout);
    ``causal`` is forced to False."""

    def __init__(
        self,
        num_layers: int,
        hidden_steps: int,
        num_self_attention_per_cross_attention: int,
        *,
        activations_checkpoint_granularity: Optional[str] = None,
        layer_init_scope: Optional[Callable[[int], contextlib.AbstractContextManager]] = None,
        latent_init_scope: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
        key_prefix: str = "model.encoder",
        **layer_kwargs,
    ):
        super().__init__()
        # the config was checked (config.model_validation: model.encoder.hidden_steps, ...); internal invariant only
        assert all(_positive_int(v) for v in (num_layers, hidden_steps, num_self_attention_per_cross_attention))
        self.num_layers = int(num_layers)
        self.hidden_steps = int(hidden_steps)
        self.num_self_attention_per_cross_attention = int(num_self_attention_per_cross_attention)
        self.checkpoint_granularity = normalize_checkpoint_granularity(
            activations_checkpoint_granularity, f"{key_prefix}.activations_checkpoint_granularity"
        )
        layer_kwargs = dict(layer_kwargs)
        layer_kwargs["causal"] = False
        hidden_size = int(layer_kwargs["hidden_size"])
        self.hidden_size = hidden_size
        dtype = layer_kwargs["parallel_config"].params_dtype

        with (latent_init_scope() if latent_init_scope is not None else contextlib.nullcontext()):
            self.latents = nn.Parameter(torch.empty(self.hidden_steps, hidden_size, dtype=dtype))
            with torch.no_grad():
                nn.init.xavier_normal_(self.latents)

        def scope(n):
            return layer_init_scope(n) if layer_init_scope is not None else contextlib.nullcontext()

        k = self.num_self_attention_per_cross_attention
        cross, selfs = [], []
        n = 0
        for _ in range(self.num_layers):
            with scope(n):
                cross.append(CrossAttentionTransformerLayer(**layer_kwargs))
            n += 1
            for _ in range(k):
                with scope(n):
                    selfs.append(TransformerLayer(**layer_kwargs))
                n += 1
        self.cross_layers = nn.ModuleList(cross)
        self.self_layers = nn.ModuleList(selfs)
        self.final_layernorm = build_norm(
            layer_kwargs.get("normalization", "layernorm"),
            hidden_size,
            layer_kwargs.get("layernorm_epsilon", 1e-5),
            layer_kwargs.get("bias", True),
            key=f"{key_prefix}.normalization",
        )

    @property
    def num_layer_modules(self) -> int:
        """Transformer layers built (``num_layers * (1 + num_self_attention_per_cross_attention)``)."""
        return len(self.cross_layers) + len(self.self_layers)

    def forward(
        self,
        token_embeddings: torch.Tensor,
        token_mask: Optional[torch.Tensor] = None,
        key_rotary_cos_sin: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """``token_embeddings`` ``[b, s, h]``, ``token_mask`` ``[b, s]`` bool (True = real token; None = all
        real) -> latents ``[hidden_steps, b, h]``."""
        if token_embeddings.dim() != 3 or token_embeddings.shape[-1] != self.hidden_size:
            raise DataError(f"Perceiver input must be [batch, seq, {self.hidden_size}], got "
                            f"{tuple(token_embeddings.shape)}")
        b = token_embeddings.shape[0]
        context_mask = None
        if token_mask is not None:
            context_mask = (~token_mask.bool()).view(b, 1, 1, token_mask.shape[-1])  # True = may not attend
        z = self.latents.to(token_embeddings.dtype).unsqueeze(0).expand(b, -1, -1)
        recompute = self.checkpoint_granularity == "full" and self.training and torch.is_grad_enabled()
        k = self.num_self_attention_per_cross_attention
        for i, cross in enumerate(self.cross_layers):
            residual = z
            z = run_layer(cross, recompute, z, token_embeddings, None, context_mask, None, key_rotary_cos_sin)
            for layer in self.self_layers[i * k:(i + 1) * k]:
                z = run_layer(layer, recompute, z, None, None)
            z = z + residual
        z = self.final_layernorm(z)
        return z.transpose(0, 1).contiguous()


__all__ = ["PerceiverEncoder"]

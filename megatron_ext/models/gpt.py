"""Decoder-only GPT on megatron-core tensor-parallel layers (CPU and GPU).

``GPTModel(cfg, vocab_size)`` takes the typed ``ModelConfig`` (it never reads files)::

    tokens [b, s] -> VocabParallelEmbedding (+ learned positions) -> dropout
                  -> num_layers x pre-norm TransformerLayer (rope applied to q/k if configured)
                  -> final norm -> output layer (tied embedding weight or own ColumnParallelLinear)
                  -> vocab-parallel logits [b, s, padded_vocab / tp]
                  -> (with labels) vocab_parallel_cross_entropy (megatron-core steps, modules/cross_entropy.py) -> loss [b, s] fp32

Parameter names follow megatron-core: ``embedding.word_embeddings``,
``embedding.position_embeddings``, ``decoder.layers.N.{input_layernorm, self_attention.linear_qkv,
self_attention.linear_proj, pre_mlp_layernorm, mlp.linear_fc1, mlp.linear_fc2}``,
``decoder.final_layernorm``, ``output_layer`` (weight only when untied).

TP shard layouts (for checkpoint conversion): word embeddings / output layer / QKV / fc1 are
split on dim 0, ``linear_proj`` / ``linear_fc2`` on dim 1, everything else is replicated. The
fused QKV rows are ordered by query group (megatron-core's layout): for each of the ``ng =
model.num_query_groups`` groups (default: one per head), its ``nh / ng`` query heads, its key head and its value
head, ``head_dim`` rows each -- ``[heads, (q, k, v), head_dim]`` for multi-head attention -- so a TP shard is a
contiguous block of whole groups; SwiGLU fc1 rows are ``[gate; up]`` and rank r holds ``[gate_r; up_r]``.

Initialisation: every weight matrix and embedding ~ normal(0, init_method_std); the projections
that write into the residual stream (``linear_proj``, ``linear_fc2``) ~ normal(0, init_method_std /
sqrt(2 * num_layers)) (Megatron's scaled init); biases 0; norm weights 1. Master weights are drawn
at full size on the CPU, each component (embedding, layer i, output layer) from its own generator
seeded by ``(init_seed, component)`` (``init_seed_scope``), so the same seed gives the same full
model at any TP size *and* any pipeline split (a pipeline stage builds only its own components).

Generation (``megatron_ext.inference.generation``): ``forward(..., padding_mask=[b, s])`` runs a left-padded
batch of prompts as if every prompt were alone (each row's positions start at its first real token, padding keys
are masked out); ``forward(..., inference_cache=model.new_inference_cache(b, max_length))`` is incremental decoding
with a per-rank key/value cache (``megatron_ext.modules.attention.KVCache``: learned positions / rope angles at
each row's own offsets). Neither is used by training, whose forward is unchanged.

Padded vocabulary: the vocabulary is padded to a multiple of ``make_vocab_size_divisible_by * tp``
for even TP shards. The padding columns of the logits are set to ``-inf`` before the loss, so they
never enter the softmax: the loss does not depend on the padding (Megatron-LM and NeMo let them
in, which makes the same weights give a different loss at a different TP size).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_ext.config.model_validation import (
    POSITION_EMBEDDING_TYPES,
    check_vocab_size,
    resolve_ffn_hidden_size,
    resolve_max_position_embeddings,
    resolve_num_query_groups,
)
from megatron_ext.config.schema import ModelConfig
from megatron_ext.errors import DataError
from megatron_ext.modules.attention import KVCache
from megatron_ext.modules.doc_attention import DocumentMask, check_segment_ids
from megatron_ext.modules.common import (
    dropout,
    ensure_model_parallel,
    init_method_normal,
    make_parallel_config,
    scaled_init_method_normal,
    tp_group,
    tp_rank,
    tp_world_size,
)
from megatron_ext.modules.cross_entropy import vocab_parallel_cross_entropy
from megatron_ext.modules.linear import ColumnParallelLinear
from megatron_ext.modules.rotary import RotaryEmbedding
from megatron_ext.modules.transformer import TransformerBlock

def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Round ``vocab_size`` up to a multiple of ``make_vocab_size_divisible_by * tp``."""
    multiple = int(make_vocab_size_divisible_by) * int(tensor_model_parallel_size)
    return int(math.ceil(int(vocab_size) / multiple) * multiple)


@contextlib.contextmanager
def init_seed_scope(init_seed: int, component: int) -> Iterator[None]:
    """Build one model component with the CPU generator seeded by ``(init_seed, component)``; the global
    generator state is restored afterwards (so building a model does not shift dropout streams)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((int(init_seed) * 1_000_003 + int(component) * 7919) % (2**63 - 1))
        yield


def component_ids(num_layers: int) -> dict:
    """Component numbers for ``init_seed_scope``: word embeddings 0, layer i -> 1 + i, output layer num_layers + 1,
    learned position embeddings num_layers + 2 (their own stream: the word-embedding draw has a TP-dependent size,
    the padded vocabulary)."""
    return {"embedding": 0, "output_layer": int(num_layers) + 1, "position_embeddings": int(num_layers) + 2}


class GPTEmbedding(nn.Module):
    """Vocab-parallel word embeddings + optional learned absolute positions + dropout."""

    def __init__(self, cfg: ModelConfig, padded_vocab: int, parallel_config, init_method, position_init_scope=None):
        super().__init__()
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        self.hidden_dropout = float(cfg.hidden_dropout)
        self.word_embeddings = VocabParallelEmbedding(
            padded_vocab, cfg.hidden_size, init_method=init_method, config=parallel_config, tp_group=tp_group()
        )
        if str(cfg.position_embedding_type).lower() == "learned_absolute":
            self.max_position_embeddings = resolve_max_position_embeddings(cfg)
            with (position_init_scope() if position_init_scope is not None else contextlib.nullcontext()):
                self.position_embeddings = nn.Embedding(
                    self.max_position_embeddings, cfg.hidden_size, dtype=parallel_config.params_dtype
                )
                with torch.no_grad():
                    init_method(self.position_embeddings.weight)
        else:
            self.max_position_embeddings = None
            self.position_embeddings = None

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.word_embeddings(tokens)
        if self.position_embeddings is not None:
            s = tokens.shape[1]
            if position_ids is None:
                if s > self.max_position_embeddings:
                    raise DataError(
                        f"input sequence length {s} exceeds model.max_position_embeddings="
                        f"{self.max_position_embeddings}"
                    )
                x = x + self.position_embeddings.weight[:s]
            else:
                x = x + F.embedding(position_ids, self.position_embeddings.weight)
        return dropout(x, self.hidden_dropout, self.training)


def transformer_layer_kwargs(cfg: ModelConfig, ffn_hidden_size: int, parallel_config, init_method,
                             output_init_method) -> dict:
    """Keyword arguments of ``TransformerLayer`` for a GPT config (shared with the pipeline layers)."""
    return dict(
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=resolve_num_query_groups(cfg),
        ffn_hidden_size=ffn_hidden_size,
        parallel_config=parallel_config,
        init_method=init_method,
        output_init_method=output_init_method,
        normalization=str(cfg.normalization).lower(),
        layernorm_epsilon=float(cfg.layernorm_epsilon),
        activation=str(cfg.activation).lower(),
        bias=bool(cfg.bias),
        hidden_dropout=float(cfg.hidden_dropout),
        attention_dropout=float(cfg.attention_dropout),
        causal=True,
    )


def build_output_layer(cfg: ModelConfig, padded_vocab: int, parallel_config, init_method, tied: bool,
                       bias: bool = False):
    """The LM head: a column-parallel ``hidden -> padded_vocab/tp`` projection (no weight of its own when tied;
    ``bias``: a vocabulary-parallel bias, zero-initialised -- Mega's ``model.mega.lm_head_bias``)."""
    return ColumnParallelLinear(
        cfg.hidden_size,
        padded_vocab,
        config=parallel_config,
        init_method=init_method,
        bias=bool(bias),
        gather_output=False,
        skip_weight_param_allocation=tied,
        tp_group=tp_group(),
    )


@torch.no_grad()
def gather_vocab_parallel_logits(logits: torch.Tensor, vocab_size: int, trim: bool = True) -> torch.Tensor:
    """All-gather vocab-parallel logits ``[..., V/tp]`` over TP -> ``[..., padded V]`` (no autograd); with
    ``trim`` the padding columns are dropped -> ``[..., vocab_size]``."""
    world = tp_world_size()
    if world > 1:
        local = logits.detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=tp_group())
        full = torch.cat(parts, dim=-1)
    else:
        full = logits.detach()
    return full[..., : int(vocab_size)] if trim else full


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int, cache: Optional[dict] = None) -> torch.Tensor:
    """Set the logits of padded vocabulary entries (global id >= ``vocab_size``) on this TP rank to -inf."""
    local = logits.shape[-1]
    valid = int(vocab_size) - tp_rank() * local
    if valid >= local:
        return logits
    key = (logits.device, local, valid)
    mask = cache.get(key) if cache is not None else None
    if mask is None:
        mask = torch.arange(local, device=logits.device) >= max(valid, 0)
        if cache is not None:
            cache[key] = mask
    return logits.masked_fill(mask, float("-inf"))


def padded_causal_mask(padding_mask: torch.Tensor):
    """Left-padded batch without a cache: ``padding_mask`` ``[b, s]`` (True = real token) -> (``attention_mask``
    ``[b, 1, s, s]`` bool, True = may NOT attend (megatron convention): causal, padding keys masked, every query
    sees at least itself; ``position_ids`` ``[b, s]``: each row counts its real tokens from 0)."""
    if padding_mask.dim() != 2:
        raise DataError(f"padding_mask must be [batch, seq] (True = real token), got shape "
                        f"{tuple(padding_mask.shape)}")
    real = padding_mask.bool()
    s = real.shape[1]
    pos = torch.arange(s, device=real.device)
    causal = pos[None, :] <= pos[:, None]  # [s, s]: key j <= query i
    allowed = (causal & real[:, None, :]) | torch.eye(s, dtype=torch.bool, device=real.device)
    position_ids = (real.long().cumsum(dim=1) - 1).clamp(min=0)
    return ~allowed[:, None], position_ids


class LMHeadMixin:
    """The LM head shared by ``GPTModel`` and ``EncoderDecoderModel``. Needs ``embedding.word_embeddings``,
    ``output_layer`` (a column-parallel projection, weight-less when tied), ``share_embeddings_and_output_weights``,
    ``vocab_size`` and a ``_pad_masks`` dict."""

    def output_weight(self) -> torch.Tensor:
        if self.share_embeddings_and_output_weights:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[b, s, h]`` -> vocab-parallel logits ``[b, s, padded_vocab/tp]`` (padding -inf)."""
        weight = self.embedding.word_embeddings.weight if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden_states, weight=weight)
        return mask_vocab_padding(logits, self.vocab_size, self._pad_masks)

    @staticmethod
    def loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token CE ``[b, s]`` (fp32) from vocab-parallel logits. fp32 logits are
        overwritten in place (megatron-core's kernel reuses them for the softmax); see
        ``megatron_ext.modules.cross_entropy`` for the one step that differs from megatron-core's."""
        return vocab_parallel_cross_entropy(logits, labels)

    @torch.no_grad()
    def gather_logits(self, logits: torch.Tensor, trim: bool = True) -> torch.Tensor:
        """All-gather vocab-parallel logits over TP -> ``[..., padded_vocab]`` (inference only, no autograd).
        With ``trim`` (default) the padding columns are dropped, giving ``[..., vocab_size]`` so sampling can
        never pick a padding id."""
        return gather_vocab_parallel_logits(logits, self.vocab_size, trim)

    def num_parameters(self) -> int:
        """Parameters held by this rank (a tied embedding/output weight counts once)."""
        return sum(p.numel() for p in self.parameters())


class GPTModel(LMHeadMixin, nn.Module):
    """GPT language model. See the module docstring for layout, names and init.

    ``forward(tokens, position_ids=None, labels=None, attention_mask=None)``:

    * with ``labels`` ``[b, s]``: per-token cross-entropy ``[b, s]`` (fp32), computed on the
      vocab-parallel logits with megatron-core's ``vocab_parallel_cross_entropy`` steps
      (``megatron_ext.modules.cross_entropy``);
    * without: vocab-parallel logits ``[b, s, padded_vocab_size / tp]``; ``gather_logits`` turns
      them into full-vocabulary logits for generation.

    ``attention_mask`` (optional, megatron convention: bool, ``True`` = may not attend,
    broadcastable to ``[b, 1, s, s]``, already causal) replaces the built-in causal mask.
    ``segment_ids`` (optional, int ``[b, s]``: the document number of each token, see
    ``megatron_ext.modules.doc_attention``) keeps attention causal *within* each document of a packed row
    (``model.data.reset_attention_mask``), by ``model.document_attention``'s path; positions are ``position_ids``
    (restarted per document with ``reset_position_ids``). Activations are ``[b, s, h]``.

    Generation only (see the module docstring): ``padding_mask`` ``[b, s]`` (True = real token) for a left-padded
    batch, and ``inference_cache`` (from ``new_inference_cache``) for incremental decoding -- ``tokens`` are then
    the new tokens only (``padding_mask`` covers them), positions continue from the cache.
    """

    supports_inference_cache = True

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        *,
        params_dtype: torch.dtype = torch.float32,
        init_seed: Optional[int] = None,
    ):
        super().__init__()
        check_vocab_size(vocab_size)  # the config itself was checked when it was made (config.model_validation)
        if init_seed is None:  # standalone use: follow the default generator (torch.manual_seed)
            init_seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        self.init_seed = int(init_seed)
        comp = component_ids(cfg.num_layers)
        tp = int(cfg.tensor_model_parallel_size)
        ensure_model_parallel(tp)
        self.config = cfg
        self.vocab_size = int(vocab_size)
        self.padded_vocab_size = padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, tp)
        self.hidden_size = int(cfg.hidden_size)
        self.ffn_hidden_size = resolve_ffn_hidden_size(cfg)
        self.share_embeddings_and_output_weights = bool(cfg.share_embeddings_and_output_weights)
        self.position_embedding_type = str(cfg.position_embedding_type).lower()
        self.document_attention = str(getattr(cfg, "document_attention", "auto"))

        # sequence_parallel with TP=1 on CUDA is a no-op (megatron-core disables it too).
        parallel_config = make_parallel_config(tp, params_dtype=params_dtype, sequence_parallel=False)
        init_method = init_method_normal(cfg.init_method_std)
        output_init_method = scaled_init_method_normal(cfg.init_method_std, cfg.num_layers)

        with init_seed_scope(self.init_seed, comp["embedding"]):
            self.embedding = GPTEmbedding(
                cfg, self.padded_vocab_size, parallel_config, init_method,
                position_init_scope=lambda: init_seed_scope(self.init_seed, comp["position_embeddings"]),
            )
        if self.position_embedding_type == "rope":
            self.rotary_pos_emb = RotaryEmbedding(
                cfg.hidden_size // cfg.num_attention_heads, cfg.rotary_base, resolve_max_position_embeddings(cfg)
            )
        else:
            self.rotary_pos_emb = None
        self.decoder = TransformerBlock(
            cfg.num_layers,
            activations_checkpoint_granularity=cfg.activations_checkpoint_granularity,
            final_norm=True,
            layer_init_scope=lambda i: init_seed_scope(self.init_seed, 1 + i),
            **transformer_layer_kwargs(cfg, self.ffn_hidden_size, parallel_config, init_method, output_init_method),
        )
        with init_seed_scope(self.init_seed, comp["output_layer"]):
            self.output_layer = build_output_layer(
                cfg, self.padded_vocab_size, parallel_config, init_method, tied=self.share_embeddings_and_output_weights
            )
        self._pad_masks: dict = {}

    # -- pieces (also usable by a pipeline wrapper) --------------------------------------
    def embed(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.embedding(tokens, position_ids)

    def rotary_cos_sin(self, hidden_states: torch.Tensor, position_ids: Optional[torch.Tensor] = None):
        if self.rotary_pos_emb is None:
            return None
        return self.rotary_pos_emb.cos_sin(
            hidden_states.shape[1], hidden_states.device, hidden_states.dtype, position_ids
        )

    @property
    def max_positions(self) -> Optional[int]:
        """The longest sequence the positions allow (learned table size), None for rope (unbounded)."""
        return self.embedding.max_position_embeddings

    def new_inference_cache(self, batch_size: int, max_length: int):
        """An empty per-rank ``KVCache`` for ``batch_size`` rows of up to ``max_length`` positions."""
        return KVCache(batch_size, max_length)

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        inference_cache=None,
        segment_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if segment_ids is not None:
            if inference_cache is not None or padding_mask is not None or attention_mask is not None:
                raise DataError("segment_ids (packed documents) build the attention mask themselves: pass them "
                                "without attention_mask / padding_mask / inference_cache")
            check_segment_ids(segment_ids, tokens)
            attention_mask = DocumentMask(segment_ids, self.document_attention)
        if inference_cache is not None:
            return self._forward_cached(tokens, inference_cache, padding_mask, labels, attention_mask, position_ids)
        if padding_mask is not None:
            if attention_mask is not None or position_ids is not None:
                raise DataError("padding_mask builds the attention mask and position ids itself: pass it without "
                                "attention_mask / position_ids")
            attention_mask, position_ids = padded_causal_mask(padding_mask)
        hidden = self.embedding(tokens, position_ids)
        hidden = self.decoder(hidden, attention_mask, self.rotary_cos_sin(hidden, position_ids))
        logits = self.compute_logits(hidden)
        if labels is None:
            return logits
        return self.loss_from_logits(logits, labels)

    def _forward_cached(self, tokens, cache, padding_mask, labels, attention_mask, position_ids) -> torch.Tensor:
        """Incremental step: ``tokens`` ``[b, s]`` are appended to ``cache`` -> their vocab-parallel logits."""
        if labels is not None or attention_mask is not None or position_ids is not None:
            raise DataError("inference_cache: labels, attention_mask and position_ids are not accepted (the cache "
                            "tracks positions and masks; pass padding_mask for padded prompts)")
        if tokens.dim() != 2:
            raise DataError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        positions = cache.begin_step(padding_mask, tokens.shape[1], tokens.device)
        try:
            limit = self.max_positions
            if limit is not None and cache.max_position() >= limit:
                raise DataError(f"position {cache.max_position()} is beyond model.max_position_embeddings={limit} "
                                f"(learned positions): the prompt plus the generated tokens must fit")
            hidden = self.embedding(tokens, positions)
            hidden = self.decoder(hidden, None, self.rotary_cos_sin(hidden, positions), inference_cache=cache)
        except BaseException:
            cache.abort_step()
            raise
        cache.end_step()
        return self.compute_logits(hidden)


__all__ = [
    "GPTModel",
    "LMHeadMixin",
    "init_seed_scope",
    "component_ids",
    "transformer_layer_kwargs",
    "build_output_layer",
    "mask_vocab_padding",
    "gather_vocab_parallel_logits",
    "GPTEmbedding",
    "padded_causal_mask",
    "resolve_ffn_hidden_size",
    "resolve_max_position_embeddings",
    "resolve_num_query_groups",
    "padded_vocab_size",
    "POSITION_EMBEDDING_TYPES",
]

"""GPT split into pipeline stages with DeepSpeed's ``PipelineModule`` (1F1B schedule, gloo or nccl p2p).

The layer list (what ``PipelineModule`` partitions over the stages)::

    0          EmbeddingPipe      (tokens, position_ids) -> (hidden, position_ids)      [TiedLayerSpec "embed"
                                                                                          when embeddings are tied]
    1 .. N     TransformerLayerPipe (hidden, position_ids) -> (hidden, position_ids)
    N + 1      FinalNormPipe      (hidden, position_ids) -> hidden

With ``model.data.reset_attention_mask`` every tuple also carries ``segment_ids`` (int32 ``[b, s]``) after the
position ids: ``(tokens, position_ids, segment_ids)`` -> ``(hidden, position_ids, segment_ids)`` -> ..., so each
stage's layers attend within the documents (``megatron_ext.modules.doc_attention``).
    N + 2      LM head            hidden -> vocab-parallel logits (the tied embedding's weight, or its own
                                  ColumnParallelLinear)
    loss_fn    (logits, (labels, loss_mask)) -> masked mean cross-entropy of the micro-batch

Every component is built with the same ``init_seed_scope`` component number as in ``GPTModel``, so a
pipeline-parallel model starts from exactly the same weights as the single-stage one. Transformer layers are
spread evenly over the stages (``partition_method="type:TransformerLayerPipe"``); the embedding lives on the
first stage and the final norm + head on the last, where DeepSpeed keeps a tied copy of the embedding weight
and all-reduces its gradient between the two stages.

Parameter names map to ``GPTModel``'s (``canonical_name``) for checkpoint conversion.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_ext.config.model_validation import check_vocab_size
from megatron_ext.config.schema import ModelConfig
from megatron_ext.models.gpt import (
    GPTEmbedding,
    GPTModel,
    build_output_layer,
    component_ids,
    init_seed_scope,
    mask_vocab_padding,
    padded_vocab_size,
    resolve_ffn_hidden_size,
    resolve_max_position_embeddings,
    transformer_layer_kwargs,
)
from megatron_ext.modules.common import (
    init_method_normal,
    make_parallel_config,
    scaled_init_method_normal,
)
from megatron_ext.modules.cross_entropy import masked_token_loss
from megatron_ext.modules.doc_attention import DocumentMask
from megatron_ext.modules.norms import build_norm
from megatron_ext.modules.rotary import RotaryEmbedding
from megatron_ext.modules.transformer import TransformerLayer, _tracker_replay_context
from megatron_ext.parallel.pipeline import pipeline_topology
from megatron_ext.parallel.state import attach_deepspeed_comm


class _Shared:
    """What every pipeline layer of one model needs (built once per process)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, params_dtype: torch.dtype, init_seed: int):
        tp = int(cfg.tensor_model_parallel_size)
        self.cfg = cfg
        self.vocab_size = int(vocab_size)
        self.padded_vocab_size = padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, tp)
        self.parallel_config = make_parallel_config(tp, params_dtype=params_dtype, sequence_parallel=False)
        self.init_method = init_method_normal(cfg.init_method_std)
        self.output_init_method = scaled_init_method_normal(cfg.init_method_std, cfg.num_layers)
        self.init_seed = int(init_seed)
        self.tied = bool(cfg.share_embeddings_and_output_weights)


class EmbeddingPipe(nn.Module):
    """Stage-0 embedding; on the last stage the tied copy also serves as the LM head (``tied_logits``)."""

    def __init__(self, shared: _Shared):
        super().__init__()
        cfg = shared.cfg
        comp = component_ids(cfg.num_layers)
        with init_seed_scope(shared.init_seed, comp["embedding"]):
            self.embedding = GPTEmbedding(
                cfg, shared.padded_vocab_size, shared.parallel_config, shared.init_method,
                position_init_scope=lambda: init_seed_scope(shared.init_seed, comp["position_embeddings"]),
            )
        if shared.tied:
            # a weight-less column-parallel projection that multiplies by the embedding weight
            self.output_layer = build_output_layer(cfg, shared.padded_vocab_size, shared.parallel_config,
                                                   shared.init_method, tied=True)
        self.vocab_size = shared.vocab_size
        self._pad_masks: dict = {}

    def forward(self, inputs):
        tokens, position_ids = inputs[0], inputs[1]
        return (self.embedding(tokens, position_ids),) + tuple(inputs[1:])


def tied_logits(module: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    logits, _ = module.output_layer(hidden, weight=module.embedding.word_embeddings.weight)
    return mask_vocab_padding(logits, module.vocab_size, module._pad_masks)


class TransformerLayerPipe(nn.Module):
    def __init__(self, shared: _Shared, layer_number: int):
        super().__init__()
        cfg = shared.cfg
        with init_seed_scope(shared.init_seed, 1 + layer_number):
            self.layer = TransformerLayer(**transformer_layer_kwargs(
                cfg, resolve_ffn_hidden_size(cfg), shared.parallel_config, shared.init_method,
                shared.output_init_method))
        self.rotary = (RotaryEmbedding(cfg.hidden_size // cfg.num_attention_heads, cfg.rotary_base,
                                       resolve_max_position_embeddings(cfg))
                       if str(cfg.position_embedding_type).lower() == "rope" else None)
        gran = cfg.activations_checkpoint_granularity
        self.recompute = gran is not None and str(gran).lower() == "full"
        self.document_attention = str(getattr(cfg, "document_attention", "auto"))

    def forward(self, inputs):
        hidden, position_ids = inputs[0], inputs[1]
        # (hidden, position_ids[, segment_ids]): segment ids of packed documents travel with the activations
        mask = DocumentMask(inputs[2], self.document_attention) if len(inputs) > 2 else None
        cos_sin = (self.rotary.cos_sin(hidden.shape[1], hidden.device, hidden.dtype, position_ids)
                   if self.rotary is not None else None)
        if self.recompute and self.training and torch.is_grad_enabled():
            hidden = checkpoint(self.layer, hidden, mask, cos_sin, use_reentrant=False,
                                context_fn=_tracker_replay_context)
        else:
            hidden = self.layer(hidden, mask, cos_sin)
        return (hidden,) + tuple(inputs[1:])


class FinalNormPipe(nn.Module):
    def __init__(self, shared: _Shared):
        super().__init__()
        cfg = shared.cfg
        self.final_layernorm = build_norm(str(cfg.normalization).lower(), cfg.hidden_size,
                                          float(cfg.layernorm_epsilon), bool(cfg.bias))

    def forward(self, inputs):
        return self.final_layernorm(inputs[0])


class OutputLayerPipe(nn.Module):
    """Untied LM head."""

    def __init__(self, shared: _Shared):
        super().__init__()
        with init_seed_scope(shared.init_seed, component_ids(shared.cfg.num_layers)["output_layer"]):
            self.output_layer = build_output_layer(shared.cfg, shared.padded_vocab_size, shared.parallel_config,
                                                   shared.init_method, tied=False)
        self.vocab_size = shared.vocab_size
        self._pad_masks: dict = {}

    def forward(self, hidden):
        logits, _ = self.output_layer(hidden)
        return mask_vocab_padding(logits, self.vocab_size, self._pad_masks)


def gpt_pipe_loss(logits: torch.Tensor, labels_and_mask: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The loss of one micro-batch, as ``GPTTask.loss``: ``masked_token_loss`` of the per-token cross-entropy.

    ``labels_and_mask`` is ``(labels, loss_mask)`` (masked mean over this micro-batch) or ``(labels, loss_mask,
    denominator)``: the trainer appends ``loss_token_denominator(...)`` of the global batch, counted before the
    pipeline runs, so that the engine's average over micro-batches and data-parallel ranks is token-weighted."""
    labels, loss_mask = labels_and_mask[0], labels_and_mask[1]
    denominator = labels_and_mask[2] if len(labels_and_mask) > 2 else None
    per_token = GPTModel.loss_from_logits(logits, labels)
    return masked_token_loss(per_token, loss_mask, denominator)[0]


def build_gpt_pipeline(cfg: ModelConfig, vocab_size: int, *, init_seed: int,
                       params_dtype: torch.dtype = torch.float32):
    """A ``deepspeed.pipe.PipelineModule`` for ``cfg`` over megatron-core's (already initialised) TP x PP x DP
    layout. Returns the module (``.is_pipeline = True``)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    check_vocab_size(vocab_size)  # cfg was checked when it was made (config.model_validation)
    attach_deepspeed_comm()  # PipelineModule talks through deepspeed.comm
    shared = _Shared(cfg, vocab_size, params_dtype, init_seed)
    layers = []
    if shared.tied:
        layers.append(TiedLayerSpec("embed", EmbeddingPipe, shared,
                                    tied_weight_attr=["embedding.word_embeddings.weight"]))
    else:
        layers.append(LayerSpec(EmbeddingPipe, shared))
    for i in range(cfg.num_layers):
        layers.append(LayerSpec(TransformerLayerPipe, shared, i))
    layers.append(LayerSpec(FinalNormPipe, shared))
    if shared.tied:
        layers.append(TiedLayerSpec("embed", EmbeddingPipe, shared, forward_fn=tied_logits,
                                    tied_weight_attr=["embedding.word_embeddings.weight"]))
    else:
        layers.append(LayerSpec(OutputLayerPipe, shared))
    topology = pipeline_topology()
    # no_grad: the tied-weight broadcast in PipelineModule.__init__ must not enter the autograd graph
    with torch.no_grad():
        module = PipelineModule(
            layers=layers,
            topology=topology,
            loss_fn=gpt_pipe_loss,
            partition_method="type:TransformerLayerPipe",
            activation_checkpoint_interval=0,
        )
    module.is_pipeline = True
    module.num_layers = int(cfg.num_layers)
    module.vocab_size = shared.vocab_size
    module.padded_vocab_size = shared.padded_vocab_size
    return module


_LAYER_RE = re.compile(r"^(\d+)\.(.*)$")


def canonical_name(pipe_name: str, num_layers: int) -> Optional[str]:
    """``PipelineModule`` parameter/buffer name -> ``GPTModel`` name (None for things GPTModel does not have)."""
    if pipe_name.startswith("tied_modules.embed."):
        rest = pipe_name[len("tied_modules.embed."):]
        return rest if rest.startswith("embedding.") else None
    m = _LAYER_RE.match(pipe_name)
    if not m:
        return None
    idx, rest = int(m.group(1)), m.group(2)
    if idx == 0:
        return rest if rest.startswith("embedding.") else None
    if 1 <= idx <= num_layers:
        if rest.startswith("layer."):
            return f"decoder.layers.{idx - 1}.{rest[len('layer.'):]}"
        return None
    if idx == num_layers + 1:
        return "decoder." + rest if rest.startswith("final_layernorm.") else None
    if idx == num_layers + 2:
        return rest if rest.startswith("output_layer.") else None
    return None


__all__ = [
    "build_gpt_pipeline",
    "gpt_pipe_loss",
    "canonical_name",
    "EmbeddingPipe",
    "TransformerLayerPipe",
    "FinalNormPipe",
    "OutputLayerPipe",
]

"""Encoder-decoder (BART-style) language model on megatron-core tensor-parallel layers.

``EncoderDecoderModel(cfg, vocab_size)`` takes the typed ``EncoderDecoderModelConfig`` (``model.*``;
the two stacks under ``model.encoder.*`` / ``model.decoder.*``)::

    enc_tokens [b, s] -> shared VocabParallelEmbedding (+ encoder positions) -> dropout
        arch=transformer: num_layers x pre-norm bidirectional TransformerLayer (padding-masked) -> final norm
        arch=perceiver:   PerceiverEncoder (latents cross-attend to the tokens)             -> final norm
    -> {"hiddens": [S_enc, b, h], "hiddens_mask": [b, S_enc]}       <- encode(); a hiddens module goes here
    dec_tokens [b, s_dec] -> the same word embeddings (+ decoder positions) -> dropout
        num_layers x pre-norm [causal self-attn -> cross-attn to hiddens (hiddens_mask) -> MLP] -> final norm
    -> output layer (tied word-embedding weight, or its own ColumnParallelLinear)
    -> vocab-parallel logits [b, s_dec, padded_vocab / tp] (padding columns -inf)
    -> (with labels) vocab_parallel_cross_entropy -> loss [b, s_dec] fp32      <- decode()

``S_enc`` is the input length ``s`` for the transformer encoder (``hiddens_mask`` = ``enc_mask``) and
``model.encoder.hidden_steps`` for the Perceiver (``hiddens_mask`` all True). The hiddens use
Megatron's ``[S, B, H]`` layout, as NeMo's hiddens module expects; inside the stacks activations
are ``[b, s, h]`` (the modules' convention). Masks passed to ``encode``/``decode`` are bool with
True = real token (the inverse of the attention modules' True = masked).

Positions: ``learned_absolute`` gives separate encoder and decoder tables of
``max_position_embeddings`` rows (default ``max(seq_length, seq_length_dec)``); ``rope`` rotates
q/k of every self-attention (encoder and decoder), and for the Perceiver also the cross-attention
keys by their token positions. The decoder's cross-attention has no position term.

Parameter names (megatron-core style): ``embedding.word_embeddings``,
``embedding.encoder_position_embeddings``, ``embedding.decoder_position_embeddings``,
``encoder.layers.N.*`` + ``encoder.final_layernorm`` (transformer) or ``encoder.latents``,
``encoder.cross_layers.N.*``, ``encoder.self_layers.N.*``, ``encoder.final_layernorm`` (perceiver),
``decoder.layers.N.{input_layernorm, self_attention.*, pre_cross_attn_layernorm,
cross_attention.{linear_q, linear_kv, linear_proj}, pre_mlp_layernorm, mlp.*}``,
``decoder.final_layernorm``, ``output_layer`` (weight only when untied). TP shards: as in
``models/gpt.py``; ``cross_attention.linear_q``/``linear_kv`` are split on dim 0 (the fused KV rows
are ordered ``[heads, (k, v), head_dim]``), ``linear_proj`` on dim 1; latents are replicated.

Initialisation (layout-independent, like GPT): every component is built under its own
``init_seed_scope(init_seed, component)`` (numbers in ``encdec_component_ids``), so TP1 and TP2
build identical full weights. Weights ~ normal(0, init_method_std of their stack) -- the shared
word embeddings and the encoder positions use ``model.encoder.init_method_std``, the decoder
positions and an untied output layer ``model.decoder.init_method_std`` -- and the projections
into the residual stream ~ normal(0, std / sqrt(2 * layers)), ``layers`` = the stack's number of
transformer layers (Perceiver: ``num_layers * (1 + num_self_attention_per_cross_attention)``).
Perceiver latents are Xavier-normal; biases 0, norm weights 1.

Padded vocabulary: as GPT (``mask_vocab_padding``): the padding logits are -inf, so the loss does
not depend on the TP size. Pipeline parallelism is not supported (refused by ``config.model_validation``).

Incremental decoding (generation only; the training forward is unchanged): ``new_inference_cache(b, max_length)``
gives a per-rank ``KVCache`` for the transformer decoder (self-attention keys/values appended step by step, the
cross-attention keys/values projected from the encoder memory on the first step and reused) or a
``MegaInferenceCache`` for a Mega decoder (Mega's own state, cross-attention keys/values included), and
``decode(new_tokens, hiddens, hiddens_mask, inference_cache=cache)`` runs the decoder on the new tokens only, at
positions continuing from the cache (learned decoder positions / rope angles offset accordingly).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ext.config.model_validation import (
    DECODER_ARCHS,
    ENCODER_ARCHS,
    check_vocab_size,
    resolve_encdec_max_position_embeddings,
    resolve_ffn_hidden_size,
    resolve_seq_length_dec,
)
from megatron_ext.errors import DataError
from megatron_ext.hiddens import get_hiddens_module
from megatron_ext.models.gpt import (
    LMHeadMixin,
    build_output_layer,
    init_seed_scope,
    padded_vocab_size,
    transformer_layer_kwargs,
)
from megatron_ext.models.mega_lm import MegaInferenceCache, build_mega_stack
from megatron_ext.models.perceiver import PerceiverEncoder
from megatron_ext.modules.attention import KVCache
from megatron_ext.modules.common import (
    dropout,
    ensure_model_parallel,
    init_method_normal,
    make_parallel_config,
    scaled_init_method_normal,
    tp_group,
)
from megatron_ext.modules.rotary import RotaryEmbedding
from megatron_ext.modules.transformer import CrossAttentionTransformerBlock, TransformerBlock


# ---------------------------------------------------------------------------------------------------------------
# config helpers


def encoder_num_layer_modules(enc) -> int:
    """Transformer layers in the encoder stack (Perceiver: cross + self layers)."""
    if str(enc.arch).lower() == "perceiver":
        return int(enc.num_layers) * (1 + int(enc.num_self_attention_per_cross_attention))
    return int(enc.num_layers)


def encdec_component_ids() -> dict:
    """Component numbers for ``init_seed_scope``: fixed components 0-7, then encoder layer ``n`` ->
    ``8 + 2n`` and decoder layer ``n`` -> ``9 + 2n`` (interleaved, so each stack's weights do not
    depend on the other stack's depth). Layer scopes: ``component_ids["encoder_layer"](n)``."""
    return {
        "embedding": 0,
        "output_layer": 1,
        "encoder_position_embeddings": 2,
        "decoder_position_embeddings": 3,
        "perceiver_latents": 4,
        "hiddens_module": 5,
        "encoder_layer": lambda n: 8 + 2 * int(n),
        "decoder_layer": lambda n: 9 + 2 * int(n),
    }


# ---------------------------------------------------------------------------------------------------------------
# model


def _no_empty_rows(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` [b, s] (True = real); a sample with no real position gets all True, so that no attention row is
    fully masked (SDPA backends disagree on that case: zeros on the CPU, possibly NaN elsewhere). No host sync."""
    return mask | ~mask.any(dim=-1, keepdim=True)


class EncoderDecoderEmbedding(nn.Module):
    """Shared vocab-parallel word embeddings + separate learned encoder / decoder positions (or none for rope)."""

    def __init__(self, padded_vocab: int, hidden_size: int, parallel_config, word_init_method,
                 max_position_embeddings: Optional[int], enc_init_method, dec_init_method,
                 enc_dropout: float, dec_dropout: float, scope):
        super().__init__()
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        comp = encdec_component_ids()
        self.enc_dropout = float(enc_dropout)
        self.dec_dropout = float(dec_dropout)
        with scope(comp["embedding"]):
            self.word_embeddings = VocabParallelEmbedding(
                padded_vocab, hidden_size, init_method=word_init_method, config=parallel_config, tp_group=tp_group()
            )
        self.max_position_embeddings = max_position_embeddings
        if max_position_embeddings is None:
            self.encoder_position_embeddings = None
            self.decoder_position_embeddings = None
            return
        tables = {}
        for name, init in (("encoder", enc_init_method), ("decoder", dec_init_method)):
            with scope(comp[f"{name}_position_embeddings"]):
                table = nn.Embedding(max_position_embeddings, hidden_size, dtype=parallel_config.params_dtype)
                with torch.no_grad():
                    init(table.weight)
            tables[name] = table
        self.encoder_position_embeddings = tables["encoder"]
        self.decoder_position_embeddings = tables["decoder"]

    def _embed(self, tokens: torch.Tensor, table: Optional[nn.Embedding], p: float, side: str,
               position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.word_embeddings(tokens)
        if table is not None:
            s = tokens.shape[1]
            if position_ids is not None:
                top = int(position_ids.max().item()) if position_ids.numel() else -1
                if top >= self.max_position_embeddings:
                    raise DataError(f"{side} position {top} is beyond model.max_position_embeddings="
                                    f"{self.max_position_embeddings} (learned positions)")
                x = x + F.embedding(position_ids, table.weight)
            else:
                if s > self.max_position_embeddings:
                    raise DataError(f"{side} input length {s} exceeds model.max_position_embeddings="
                                    f"{self.max_position_embeddings}")
                x = x + table.weight[:s]
        return dropout(x, p, self.training)

    def embed_encoder(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._embed(tokens, self.encoder_position_embeddings, self.enc_dropout, "encoder")

    def embed_decoder(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``position_ids`` ``[b, s]`` (incremental decoding) index the decoder table; default ``0 .. s-1``."""
        return self._embed(tokens, self.decoder_position_embeddings, self.dec_dropout, "decoder", position_ids)


class EncoderDecoderModel(LMHeadMixin, nn.Module):
    """Encoder-decoder LM; see the module docstring for the data flow, names and init.

    * ``encode(enc_tokens [b, s], enc_mask [b, s] bool, True = real token; None = all real)`` ->
      ``{"hiddens": [S_enc, b, h], "hiddens_mask": [b, S_enc] bool}``;
    * ``decode(dec_tokens [b, s_dec], hiddens [S_enc, b, h], hiddens_mask [b, S_enc] or None, labels=None)``
      -> per-token CE ``[b, s_dec]`` fp32 with ``labels``, else vocab-parallel logits
      ``[b, s_dec, padded_vocab / tp]``;
    * ``forward(enc_tokens, dec_tokens, enc_mask=None, labels=None)`` = ``decode(dec_tokens,
      **encode(enc_tokens, enc_mask), labels=labels)``.

    The decoder is causal and needs no mask of its own (padding sits after the real tokens and is
    excluded by the loss mask). A sample whose ``enc_mask`` (or ``hiddens_mask``) has no True entry is
    treated as all-real (its padding is attended), so it stays finite on every attention backend.

    Generation: ``decode(new_tokens, hiddens, hiddens_mask, inference_cache=model.new_inference_cache(b, n))``
    decodes incrementally (module docstring); pass the same ``hiddens`` / ``hiddens_mask`` at every step.
    """

    def __init__(
        self,
        cfg,
        vocab_size: int,
        *,
        init_seed: Optional[int] = None,
        params_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        check_vocab_size(vocab_size)  # the config itself was checked when it was made (config.model_validation)
        if init_seed is None:  # standalone use: follow the default generator (torch.manual_seed)
            init_seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        self.init_seed = int(init_seed)
        tp = int(cfg.tensor_model_parallel_size)
        ensure_model_parallel(tp)
        enc, dec = cfg.encoder, cfg.decoder
        self.config = cfg
        self.vocab_size = int(vocab_size)
        self.padded_vocab_size = padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, tp)
        self.hidden_size = int(dec.hidden_size)
        self.encoder_arch = str(enc.arch).lower()
        self.share_embeddings_and_output_weights = bool(cfg.share_embeddings_and_output_weights)
        self.position_embedding_type = str(cfg.position_embedding_type).lower()
        self.max_position_embeddings = resolve_encdec_max_position_embeddings(cfg)
        self.encoder_ffn_hidden_size = resolve_ffn_hidden_size(enc)
        self.decoder_ffn_hidden_size = resolve_ffn_hidden_size(dec)

        comp = encdec_component_ids()
        seed = self.init_seed

        def scope(component: int):
            return init_seed_scope(seed, component)

        parallel_config = make_parallel_config(tp, params_dtype=params_dtype, sequence_parallel=False)
        enc_init = init_method_normal(enc.init_method_std)
        dec_init = init_method_normal(dec.init_method_std)
        n_enc = encoder_num_layer_modules(enc)
        enc_out_init = scaled_init_method_normal(enc.init_method_std, n_enc)
        dec_out_init = scaled_init_method_normal(dec.init_method_std, dec.num_layers)
        learned = self.position_embedding_type == "learned_absolute"

        self.embedding = EncoderDecoderEmbedding(
            self.padded_vocab_size, self.hidden_size, parallel_config, enc_init,
            self.max_position_embeddings if learned else None, enc_init, dec_init,
            float(enc.hidden_dropout), float(dec.hidden_dropout), scope,
        )
        if not learned:
            self.encoder_rotary_pos_emb = RotaryEmbedding(
                enc.hidden_size // enc.num_attention_heads, cfg.rotary_base, self.max_position_embeddings
            )
            self.decoder_rotary_pos_emb = RotaryEmbedding(
                dec.hidden_size // dec.num_attention_heads, cfg.rotary_base, self.max_position_embeddings
            )
        else:
            self.encoder_rotary_pos_emb = None
            self.decoder_rotary_pos_emb = None

        enc_kwargs = transformer_layer_kwargs(enc, self.encoder_ffn_hidden_size, parallel_config, enc_init,
                                              enc_out_init)
        enc_kwargs["causal"] = False
        enc_layer_scope = lambda n: scope(comp["encoder_layer"](n))  # noqa: E731
        self.decoder_arch = str(dec.arch).lower()
        if self.encoder_arch == "mega":
            with enc_layer_scope(0):
                self.encoder = build_mega_stack(enc, seq_length=int(cfg.seq_length), is_decoder=False)
        elif self.encoder_arch == "perceiver":
            self.encoder = PerceiverEncoder(
                enc.num_layers,
                enc.hidden_steps,
                enc.num_self_attention_per_cross_attention,
                activations_checkpoint_granularity=enc.activations_checkpoint_granularity,
                layer_init_scope=enc_layer_scope,
                latent_init_scope=lambda: scope(comp["perceiver_latents"]),
                **enc_kwargs,
            )
        else:
            self.encoder = TransformerBlock(
                enc.num_layers,
                activations_checkpoint_granularity=enc.activations_checkpoint_granularity,
                final_norm=True,
                layer_init_scope=enc_layer_scope,
                **enc_kwargs,
            )
        dec_kwargs = transformer_layer_kwargs(dec, self.decoder_ffn_hidden_size, parallel_config, dec_init,
                                              dec_out_init)
        dec_kwargs["causal"] = True
        if self.decoder_arch == "mega":
            with scope(comp["decoder_layer"](0)):
                self.decoder = build_mega_stack(dec, seq_length=resolve_seq_length_dec(cfg), is_decoder=True,
                                                add_cross_attention=True)
        else:
            self.decoder = CrossAttentionTransformerBlock(
                dec.num_layers,
                activations_checkpoint_granularity=dec.activations_checkpoint_granularity,
                final_norm=True,
                layer_init_scope=lambda n: scope(comp["decoder_layer"](n)),
                checkpoint_key="model.decoder.activations_checkpoint_granularity",
                **dec_kwargs,
            )
        with scope(comp["output_layer"]):
            self.output_layer = build_output_layer(
                dec, self.padded_vocab_size, parallel_config, dec_init, tied=self.share_embeddings_and_output_weights
            )
        self._pad_masks: dict = {}
        # the hiddens module between encoder and decoder (MIM / VAE transforms and losses), from model.hiddens

        hcfg = cfg.get("hiddens", None) if hasattr(cfg, "get") else getattr(cfg, "hiddens", None)
        with scope(comp["hiddens_module"]):
            self.hiddens_module = get_hiddens_module(hcfg or None, hidden_size=int(enc.hidden_size),
                                                     model_parallel_cfg=parallel_config)
        self.latent_steps = int(enc.hidden_steps) if self.encoder_arch == "perceiver" else None

    # -- pieces ------------------------------------------------------------------------------
    @staticmethod
    def _rotary(rope: Optional[RotaryEmbedding], x: torch.Tensor):
        if rope is None:
            return None
        return rope.cos_sin(x.shape[1], x.device, x.dtype)

    def encode(self, enc_tokens: torch.Tensor, enc_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """``enc_tokens`` ``[b, s]``, ``enc_mask`` ``[b, s]`` (True/1 = real token, None = all real) ->
        ``{"hiddens": [S_enc, b, h], "hiddens_mask": [b, S_enc] bool}``."""
        if enc_tokens.dim() != 2:
            raise DataError(f"enc_tokens must be [batch, seq], got shape {tuple(enc_tokens.shape)}")
        b, s = enc_tokens.shape
        if enc_mask is not None:
            if tuple(enc_mask.shape) != (b, s):
                raise DataError(f"enc_mask shape {tuple(enc_mask.shape)} does not match enc_tokens {(b, s)}")
            enc_mask = _no_empty_rows(enc_mask.bool())
        x = self.embedding.embed_encoder(enc_tokens)
        rotary = self._rotary(self.encoder_rotary_pos_emb, x)
        if self.encoder_arch == "mega":
            hiddens = self.encoder(x, enc_mask).transpose(0, 1).contiguous()  # [s, b, h]
            hiddens_mask = enc_mask if enc_mask is not None else torch.ones(b, s, dtype=torch.bool,
                                                                             device=enc_tokens.device)
        elif self.encoder_arch == "perceiver":
            hiddens = self.encoder(x, enc_mask, rotary)  # [K, b, h]
            hiddens_mask = torch.ones(b, hiddens.shape[0], dtype=torch.bool, device=enc_tokens.device)
        else:
            attn_mask = None if enc_mask is None else (~enc_mask).view(b, 1, 1, s)  # True = may not attend
            hiddens = self.encoder(x, attn_mask, rotary).transpose(0, 1).contiguous()  # [s, b, h]
            hiddens_mask = enc_mask if enc_mask is not None else torch.ones(b, s, dtype=torch.bool,
                                                                             device=enc_tokens.device)
        return {"hiddens": hiddens, "hiddens_mask": hiddens_mask}

    @property
    def supports_inference_cache(self) -> bool:
        if self.decoder_arch == "mega":
            return self.decoder.supports_inference_cache
        return True

    @property
    def max_positions(self) -> Optional[int]:
        """The longest encoder / decoder input the learned positions allow; None with rope."""
        return self.max_position_embeddings if self.embedding.decoder_position_embeddings is not None else None

    def new_inference_cache(self, batch_size: int, max_length: int):
        """An empty decoder cache for ``batch_size`` rows of up to ``max_length`` decoder positions."""
        if self.decoder_arch == "mega":
            if not self.decoder.supports_inference_cache:
                raise ValueError(f"model.decoder.mega.truncation={self.config.decoder.mega.truncation!r}: a "
                                 f"truncated EMA has no finite state to cache; generate with use_cache=False")
            return MegaInferenceCache(batch_size, max_length)

        return KVCache(batch_size, max_length)

    def decode(
        self,
        dec_tokens: torch.Tensor,
        hiddens: torch.Tensor,
        hiddens_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        inference_cache=None,
    ) -> torch.Tensor:
        """``dec_tokens`` ``[b, s_dec]``, ``hiddens`` ``[S_enc, b, h]``, ``hiddens_mask`` ``[b, S_enc]`` (True = attend;
        None = all) -> per-token CE ``[b, s_dec]`` (with ``labels``) or vocab-parallel logits. With
        ``inference_cache`` ``dec_tokens`` are the new tokens of an incremental step (logits only)."""
        if dec_tokens.dim() != 2:
            raise DataError(f"dec_tokens must be [batch, seq], got shape {tuple(dec_tokens.shape)}")
        b = dec_tokens.shape[0]
        if hiddens.dim() != 3 or hiddens.shape[1] != b or hiddens.shape[2] != self.hidden_size:
            raise DataError(f"hiddens must be [S_enc, batch={b}, hidden={self.hidden_size}] (Megatron layout), "
                            f"got shape {tuple(hiddens.shape)}")
        s_enc = hiddens.shape[0]
        context_mask = keep_mask = None
        if hiddens_mask is not None:
            if tuple(hiddens_mask.shape) != (b, s_enc):
                raise DataError(f"hiddens_mask shape {tuple(hiddens_mask.shape)} does not match hiddens "
                                f"[S_enc={s_enc}, batch={b}]")
            keep_mask = _no_empty_rows(hiddens_mask.bool())
            context_mask = (~keep_mask).view(b, 1, 1, s_enc)
        if inference_cache is not None:
            if labels is not None:
                raise DataError("inference_cache: labels are not accepted (incremental decoding)")
            return self._decode_cached(dec_tokens, hiddens, keep_mask, context_mask, inference_cache)
        y = self.embedding.embed_decoder(dec_tokens)
        context = hiddens.transpose(0, 1).contiguous()
        if self.decoder_arch == "mega":
            y = self.decoder(y, None, context, keep_mask)
        else:
            y = self.decoder(y, context, None, context_mask, self._rotary(self.decoder_rotary_pos_emb, y), None)
        logits = self.compute_logits(y)
        if labels is None:
            return logits
        return self.loss_from_logits(logits, labels)

    def _decode_cached(self, dec_tokens, hiddens, keep_mask, context_mask, cache) -> torch.Tensor:
        positions = cache.begin_step(None, dec_tokens.shape[1], dec_tokens.device)
        try:
            y = self.embedding.embed_decoder(dec_tokens, positions)
            if self.decoder_arch == "mega":
                first = cache.past is None
                context = hiddens.transpose(0, 1) if first else None  # later steps reuse the cached keys/values
                y = self.decoder.incremental(y, cache, context, keep_mask)
            else:
                first = not cache.layers or cache.layers[0].cross_k is None
                context = hiddens.transpose(0, 1) if first else None
                rotary = None
                if self.decoder_rotary_pos_emb is not None:
                    rotary = self.decoder_rotary_pos_emb.cos_sin(y.shape[1], y.device, y.dtype, positions)
                y = self.decoder(y, context, None, context_mask, rotary, None, inference_cache=cache)
        except BaseException:
            cache.abort_step()
            raise
        cache.end_step()
        return self.compute_logits(y)

    def encode_latents(self, enc_tokens: torch.Tensor, enc_mask: Optional[torch.Tensor] = None,
                       batch_data: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """``encode`` followed by the hiddens module's transforms: every named output (``hiddens``,
        ``hiddens_mask``, ``z_mean``, ``z``, ...) plus ``enc_output`` / ``enc_output_mask``, what the decoder reads
        (``model.hiddens.enc_output_name``; the raw encoder output when there is no hiddens module)."""
        out = self.encode(enc_tokens, enc_mask)
        if self.hiddens_module is None:
            return {**out, "enc_output": out["hiddens"], "enc_output_mask": out["hiddens_mask"]}
        return self.hiddens_module.apply_hidden_transforms(out, batch_data)

    def forward(
        self,
        enc_tokens: torch.Tensor,
        dec_tokens: torch.Tensor,
        enc_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        batch_data: Optional[Dict[str, torch.Tensor]] = None,
        return_hiddens: bool = False,
    ):
        """Per-token CE (with ``labels``) or logits; with ``return_hiddens`` also the dict of ``encode_latents``
        (the hiddens module's losses are computed from it, see ``BARTTask.loss``)."""
        if self.hiddens_module is None and not return_hiddens:
            return self.decode(dec_tokens, **self.encode(enc_tokens, enc_mask), labels=labels)
        outs = self.encode_latents(enc_tokens, enc_mask, batch_data)
        result = self.decode(dec_tokens, outs["enc_output"], outs["enc_output_mask"], labels=labels)
        return (result, outs) if return_hiddens else result


__all__ = [
    "EncoderDecoderModel",
    "EncoderDecoderEmbedding",
    "encdec_component_ids",
    "encoder_num_layer_modules",
    "resolve_seq_length_dec",
    "resolve_encdec_max_position_embeddings",
    "ENCODER_ARCHS",
    "DECODER_ARCHS",
]

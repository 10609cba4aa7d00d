"""The architecture checks of a model config, and the allowed values they check against.

One implementation of every model-config check, run before anything is built:

* on a run config (``DictConfig``) by :func:`megatron_ext.config.validation.check_run_config`, which the entry
  points call through :func:`megatron_ext.config.loader.check_config` before any worker process or process group
  starts (``device`` from ``trainer.accelerator``);
* on a typed config by its ``__post_init__`` (``ModelConfig``, ``EncoderDecoderModelConfig`` in
  ``megatron_ext.config.schema``), so a model built directly from a dataclass (tests, notebooks) gets the same
  errors at config construction, as megatron-core's ``TransformerConfig`` does.

The models (``megatron_ext.models``) trust their config: they do not check it again. Every error is one
``ConfigError`` naming the key (``model.<key>``, ``model.encoder.<key>``, ``model.mega.<key>``, ...) and what is
expected. The allowed-value tuples below are the only definition of each set: the modules that implement the
choices import them from here.

``use_cuda`` (device-dependent checks: Mega's ``syncbatchnorm``) is the run's device when known; ``None`` means
"this machine" (``torch.cuda.is_available()``, asked only when a device-dependent value is set).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from megatron_ext.errors import ConfigError

# ----------------------------------------------------------------------------------------- allowed values
GPT_ARCHS = ("transformer", "mega")  # model.arch of pretrain_gpt.py
ENCODER_ARCHS = ("transformer", "perceiver", "mega")  # model.encoder.arch
DECODER_ARCHS = ("transformer", "mega")  # model.decoder.arch
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")  # transformer MLP (modules/mlp.py)
NORMALIZATIONS = ("layernorm", "rmsnorm")  # transformer norms (modules/norms.py)
POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope")
CHECKPOINT_GRANULARITIES = (None, "full")  # model.activations_checkpoint_granularity
# Mega (modules/mega.py, modules/mega_ema.py; Hugging Face MegaConfig names)
MEGA_NORMALIZATIONS = ("layernorm", "scalenorm", "rmsnorm", "batchnorm", "syncbatchnorm")
MEGA_ATTENTION_ACTIVATIONS = ("softmax", "laplace", "relu2")
MEGA_RELATIVE_POSITIONAL_BIASES = ("simple", "rotary")
MEGA_ACTIVATIONS = ("silu", "swish", "relu", "gelu", "gelu_accurate", "tanh", "linear")
EMA_IMPLS = ("fft", "scan")  # the pure-PyTorch EMA implementations
EMA_IMPL_CHOICES = EMA_IMPLS + ("fused", "auto")

# transformer keys with no meaning for a Mega stack (the Mega models log the ones set away from their defaults)
TRANSFORMER_ONLY_KEYS = ("num_attention_heads", "ffn_hidden_size", "normalization", "activation", "bias",
                         "position_embedding_type", "activations_checkpoint_granularity", "document_attention")
DOCUMENT_ATTENTION_IMPLS = ("auto", "packed", "mask", "varlen")  # megatron_ext.modules.doc_attention


# ----------------------------------------------------------------------------------------- derived values
def _get(cfg, key: str, default=None):
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def is_encoder_decoder(model_cfg: Any) -> bool:
    """The rule that makes a model section (``model.*`` of a run config, a checkpoint's or an archive's; dict,
    DictConfig or typed) an encoder-decoder one: it has ``model.encoder`` or ``model.decoder`` (``pretrain_bart.py``
    fills a missing side from its defaults; the GPT schema refuses both keys). The family table
    (:mod:`megatron_ext.models.families`) and :func:`check_model_config` both ask this one function."""
    return model_cfg is not None and (_get(model_cfg, "encoder") is not None or _get(model_cfg, "decoder") is not None)


def model_arch(model_cfg: Any) -> str:
    """``model.arch`` of a decoder-only section, normalised (``transformer`` when unset)."""
    arch = None if model_cfg is None else _get(model_cfg, "arch")
    return str("transformer" if arch is None else arch).strip().lower()


def resolve_ffn_hidden_size(cfg) -> int:
    """``ffn_hidden_size`` of a model / stack config, or its default: 4*hidden (GELU) / 8/3*hidden rounded up to a
    multiple of 64 (SwiGLU, so the gated MLP has about the parameters of a 4*hidden one)."""
    if cfg.ffn_hidden_size is not None:
        return int(cfg.ffn_hidden_size)
    h = int(cfg.hidden_size)
    if str(cfg.activation).lower() == "swiglu":
        return int(math.ceil(8 * h / 3 / 64) * 64)
    return 4 * h


def resolve_num_query_groups(cfg) -> int:
    """GPT: ``model.num_query_groups`` (key/value heads of grouped-query attention), default
    ``model.num_attention_heads`` (multi-head attention). Works on configs saved before the key existed."""
    groups = _get(cfg, "num_query_groups")
    return int(_get(cfg, "num_attention_heads") if groups is None else groups)


def resolve_max_position_embeddings(cfg) -> int:
    """GPT: ``model.max_position_embeddings``, default ``model.seq_length``."""
    return int(cfg.max_position_embeddings if cfg.max_position_embeddings is not None else cfg.seq_length)


def resolve_seq_length_dec(cfg) -> int:
    """Encoder-decoder: ``model.seq_length_dec``, default ``model.seq_length``."""
    return int(cfg.seq_length_dec if cfg.seq_length_dec is not None else cfg.seq_length)


def resolve_encdec_max_position_embeddings(cfg) -> int:
    """Encoder-decoder: ``model.max_position_embeddings``, default ``max(seq_length, seq_length_dec)``."""
    if cfg.max_position_embeddings is not None:
        return int(cfg.max_position_embeddings)
    return max(int(cfg.seq_length), resolve_seq_length_dec(cfg))


# ----------------------------------------------------------------------------------------- helpers
def _is_pos_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(key: str, value, expected: str) -> None:
    raise ConfigError(f"model.{key}={value!r}: {expected}")


def _check_probabilities(cfg, prefix: str) -> None:
    for key in ("hidden_dropout", "attention_dropout"):
        p = _get(cfg, key)
        if not _is_number(p) or not 0.0 <= float(p) < 1.0:
            _fail(prefix + key, p, "expected a probability in [0, 1)")


def _check_positive_numbers(cfg, prefix: str, keys) -> None:
    for key in keys:
        v = _get(cfg, key)
        if not _is_number(v) or not float(v) > 0:
            _fail(prefix + key, v, "expected a positive number")


def normalize_checkpoint_granularity(value, key: str = "model.activations_checkpoint_granularity") -> Optional[str]:
    """``None`` / ``"full"`` from a config value (``"none"``/``"null"``/``""`` mean ``None``); ConfigError otherwise."""
    gran = value
    if isinstance(gran, str) and gran.lower() in ("none", "null", ""):
        gran = None
    if gran is not None:
        gran = str(gran).lower()
    if gran not in CHECKPOINT_GRANULARITIES:
        raise ConfigError(f"{key}={value!r}: expected null or 'full'")
    return gran


def _check_granularity(cfg, prefix: str) -> None:
    normalize_checkpoint_granularity(_get(cfg, "activations_checkpoint_granularity"),
                                     f"model.{prefix}activations_checkpoint_granularity")


def _check_heads(cfg, prefix: str, tp: int, pos_type: str) -> None:
    """``hidden_size`` divisible by ``num_attention_heads``, the heads by the tensor-parallel size, and an even head
    dimension for rope."""
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    if hidden % heads != 0:
        _fail(prefix + "hidden_size", hidden, f"must be divisible by model.{prefix}num_attention_heads={heads}")
    if heads % tp != 0:
        _fail(prefix + "num_attention_heads", heads,
              f"must be divisible by model.tensor_model_parallel_size={tp} (every tensor-parallel rank holds the "
              f"same number of heads)")
    if pos_type == "rope" and (hidden // heads) % 2 != 0:
        dim = "hidden_size / num_attention_heads" if not prefix else \
            f"model.{prefix}hidden_size / model.{prefix}num_attention_heads"
        _fail(prefix + "hidden_size", hidden, f"rope needs an even head dimension ({dim})")


def _check_query_groups(cfg, tp: int) -> None:
    """GPT's ``model.num_query_groups``: null or a positive integer that divides the heads (each key/value head
    serves the same number of query heads) and is divisible by the tensor-parallel size (every rank holds whole
    groups)."""
    groups = _get(cfg, "num_query_groups")
    if groups is None:
        return
    if not _is_pos_int(groups):
        _fail("num_query_groups", groups, "expected a positive integer or null (null = model.num_attention_heads)")
    heads = cfg.num_attention_heads
    if heads % groups != 0:
        _fail("num_query_groups", groups, f"must divide model.num_attention_heads={heads} (every key/value head "
                                          f"serves the same number of query heads)")
    if groups % tp != 0:
        _fail("num_query_groups", groups, f"must be divisible by model.tensor_model_parallel_size={tp} (every "
                                          f"tensor-parallel rank holds whole query groups: their query heads, key "
                                          f"and value)")


def _check_transformer_body(cfg, prefix: str, tp: int, pos_type: str) -> None:
    """The keys a transformer stack (GPT's ``model.*`` or ``model.<side>.*``) shares; ``prefix`` is ``""`` or
    ``"encoder."`` / ``"decoder."``."""
    if cfg.ffn_hidden_size is not None and not _is_pos_int(cfg.ffn_hidden_size):
        _fail(prefix + "ffn_hidden_size", cfg.ffn_hidden_size, "expected a positive integer or null")
    _check_heads(cfg, prefix, tp, pos_type)
    if str(cfg.activation).lower() not in ACTIVATIONS:
        _fail(prefix + "activation", cfg.activation, f"expected one of {', '.join(ACTIVATIONS)}")
    ffn = resolve_ffn_hidden_size(cfg)
    if ffn % tp != 0:
        _fail(prefix + "ffn_hidden_size", cfg.ffn_hidden_size if cfg.ffn_hidden_size is not None else ffn,
              f"(resolved {ffn}) must be divisible by model.tensor_model_parallel_size={tp}")
    if str(cfg.normalization).lower() not in NORMALIZATIONS:
        _fail(prefix + "normalization", cfg.normalization, f"expected one of {', '.join(NORMALIZATIONS)}")
    if not isinstance(cfg.bias, bool):
        _fail(prefix + "bias", cfg.bias, "expected true or false")
    _check_probabilities(cfg, prefix)
    _check_positive_numbers(cfg, prefix, ("init_method_std", "layernorm_epsilon"))
    _check_granularity(cfg, prefix)


def _check_sequence_parallel(cfg) -> None:
    """``model.sequence_parallel=true`` is refused: the layers never split the sequence (README "Sequence
    parallel"), so the key would do nothing (with TP=1) or not work (TP>1, CPU)."""
    if _get(cfg, "sequence_parallel"):
        raise ConfigError(
            "model.sequence_parallel=true is not supported yet: megatron-core's sequence-parallel collectives "
            "allocate CUDA buffers and expect [s, b, h] activations, and megatron_ext's layers are [b, s, h] "
            "(with model.tensor_model_parallel_size=1 it would do nothing); set model.sequence_parallel=false"
        )


def _check_parallel_sizes(cfg) -> tuple:
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if not _is_pos_int(_get(cfg, key, 1)):
            _fail(key, _get(cfg, key), "expected a positive integer")
    return int(_get(cfg, "tensor_model_parallel_size", 1)), int(_get(cfg, "pipeline_model_parallel_size", 1))


# ----------------------------------------------------------------------------------------- public checks
def check_vocab_size(vocab_size) -> None:
    """The vocabulary size a model is built for (from the tokenizer): a positive integer."""
    if not _is_pos_int(vocab_size):
        raise ConfigError(f"vocab_size={vocab_size!r} (from the tokenizer, model.tokenizer): expected a positive integer")


def check_mega_arch(mega, prefix: str, seq_length: int, *, tp: int, pp: int, sequence_parallel: bool = False,
                    use_cuda: Optional[bool] = None, lm: bool = False) -> None:
    """``model.<prefix>`` (a ``MegaArchConfig``: ``mega``, ``encoder.mega``, ``decoder.mega``) for a sequence of
    ``seq_length`` tokens under the given parallel layout. ``lm``: the stack of ``model.arch=mega``
    (``MegaGPTModel``), whose vocabulary-parallel embedding and LM head take tensor parallelism (the Mega layers are
    then replicated on every tensor-parallel rank) and whose LM-head keys apply."""
    def fail(key, value, expected):
        raise ConfigError(f"model.{prefix}.{key}={value!r}: {expected}")

    if mega is None:
        raise ConfigError(f"model.{prefix} is missing: expected the Mega settings (model.{prefix}.chunk_size, ...)")
    if not lm:
        for key in ("lm_hidden_dense_layer", "lm_head_bias"):
            if _get(mega, key, False):
                fail(key, _get(mega, key), "only the Mega language model of pretrain_gpt.py (model.arch=mega) has "
                                           "this LM-head option; set it to false")
    if tp != 1 and not lm:
        raise ConfigError(f"model.tensor_model_parallel_size={tp}: the Mega architecture (model.{prefix}) does not "
                          f"support tensor parallelism (its layers are not split over ranks); use 1 and scale with "
                          f"data parallelism / ZeRO (trainer.devices, model.zero_stage)")
    if pp != 1:
        raise ConfigError(f"model.pipeline_model_parallel_size={pp}: the Mega architecture (model.{prefix}) does not "
                          f"support pipeline parallelism; use 1 and scale with data parallelism / ZeRO")
    if sequence_parallel:
        raise ConfigError(f"model.sequence_parallel=true: not supported with the Mega architecture (model.{prefix})")
    for key in ("ema_projection_size", "shared_representation_size"):
        if not _is_pos_int(_get(mega, key)):
            fail(key, _get(mega, key), "expected a positive integer")
    for key in ("intermediate_size", "nffn_hidden_size", "truncation", "max_positions"):
        v = _get(mega, key)
        if v is not None and not _is_pos_int(v):
            fail(key, v, "expected a positive integer or null")
    chunk = _get(mega, "chunk_size")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or not (chunk == -1 or chunk > 0):
        fail("chunk_size", chunk, "expected -1 (no chunking) or a positive integer")
    choices = {"normalization_type": MEGA_NORMALIZATIONS, "attention_activation": MEGA_ATTENTION_ACTIVATIONS,
               "relative_positional_bias": MEGA_RELATIVE_POSITIONAL_BIASES, "activation": MEGA_ACTIVATIONS,
               "ema_impl": EMA_IMPL_CHOICES}
    for key, allowed in choices.items():
        v = _get(mega, key)
        if str(v).lower() not in allowed:
            fail(key, v, f"expected one of {', '.join(allowed)}")
    if str(_get(mega, "normalization_type")).lower() == "syncbatchnorm" and \
            not (use_cuda if use_cuda is not None else torch.cuda.is_available()):
        fail("normalization_type", "syncbatchnorm", "needs CUDA (torch's SyncBatchNorm); use batchnorm on CPU")
    if str(_get(mega, "relative_positional_bias")).lower() == "rotary" and _get(mega, "shared_representation_size") % 2:
        fail("shared_representation_size", _get(mega, "shared_representation_size"),
             "the rotary relative bias needs an even size")
    if str(_get(mega, "relative_positional_bias")).lower() == "simple":
        max_pos = _get(mega, "max_positions") or seq_length
        window = min(chunk, seq_length) if chunk > 0 else seq_length
        if window > max_pos:
            fail("max_positions", max_pos, f"the simple relative bias covers at most max_positions tokens but the "
                                           f"attention window is {window} (seq_length / chunk_size); raise it, "
                                           f"chunk, or use relative_positional_bias=rotary")
    for key in ("bidirectional", "normalize_before_mega", "norm_affine", "use_normalized_ffn",
                "normalize_before_ffn", "use_feature_dropout", "final_norm", "lm_hidden_dense_layer", "lm_head_bias"):
        if not isinstance(_get(mega, key, False), bool):
            fail(key, _get(mega, key), "expected true or false")


def check_gpt_model_config(cfg, *, use_cuda: Optional[bool] = None) -> None:
    """``model.*`` of ``pretrain_gpt.py`` (a ``ModelConfig`` or its ``DictConfig``): ``model.arch=transformer``
    (``GPTModel``, pipeline stages included) or ``model.arch=mega`` (``MegaGPTModel``)."""
    arch = str(_get(cfg, "arch", "transformer")).lower()
    if arch not in GPT_ARCHS:
        _fail("arch", _get(cfg, "arch"), f"expected one of {', '.join(GPT_ARCHS)}")
    tp, pp = _check_parallel_sizes(cfg)
    if arch == "mega":
        for key in ("num_layers", "hidden_size", "seq_length", "make_vocab_size_divisible_by"):
            if not _is_pos_int(_get(cfg, key)):
                _fail(key, _get(cfg, key), "expected a positive integer")
        if _get(cfg, "num_query_groups") is not None:
            _fail("num_query_groups", _get(cfg, "num_query_groups"),
                  "grouped-query attention is an option of the transformer GPT (model.arch=transformer); Mega's "
                  "gated attention has no heads to group: set it to null")
        check_mega_arch(cfg.mega, "mega", int(cfg.seq_length), tp=tp, pp=pp,
                        sequence_parallel=bool(_get(cfg, "sequence_parallel")), use_cuda=use_cuda, lm=True)
        return
    for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "make_vocab_size_divisible_by"):
        if not _is_pos_int(_get(cfg, key)):
            _fail(key, _get(cfg, key), "expected a positive integer")
    pos_type = str(cfg.position_embedding_type).lower()
    _check_query_groups(cfg, tp)
    _check_transformer_body(cfg, "", tp, pos_type)
    if pos_type not in POSITION_EMBEDDING_TYPES:
        _fail("position_embedding_type", cfg.position_embedding_type,
              f"expected one of {', '.join(POSITION_EMBEDDING_TYPES)}")
    mpe = cfg.max_position_embeddings
    if mpe is not None and not _is_pos_int(mpe):
        _fail("max_position_embeddings", mpe, "expected a positive integer or null (null = model.seq_length)")
    max_pos = resolve_max_position_embeddings(cfg)
    if cfg.seq_length > max_pos:
        _fail("seq_length", cfg.seq_length, f"must be <= model.max_position_embeddings={max_pos}")
    if pos_type == "rope":
        _check_positive_numbers(cfg, "", ("rotary_base",))
    impl = _get(cfg, "document_attention", "auto")
    if impl not in DOCUMENT_ATTENTION_IMPLS:
        _fail("document_attention", impl, f"expected one of {', '.join(DOCUMENT_ATTENTION_IMPLS)} (how attention "
              f"stays within the documents of a packed sequence)")
    if impl == "varlen" and use_cuda is False:
        _fail("document_attention", impl, "varlen (flash attention over cu_seqlens) needs a CUDA device; use auto, "
              "packed or mask on the CPU")
    if pp > 1 and cfg.num_layers < pp:
        raise ConfigError(
            f"model.num_layers={cfg.num_layers} is smaller than model.pipeline_model_parallel_size={pp}: every "
            f"pipeline stage needs at least one transformer layer"
        )
    _check_sequence_parallel(cfg)


def _check_stack(stack, side: str, tp: int, pos_type: str) -> None:
    p = f"{side}."
    if stack is None:
        raise ConfigError(f"model.{side} is missing: expected the {side} settings (model.{side}.num_layers, ...)")
    archs = ENCODER_ARCHS if side == "encoder" else DECODER_ARCHS
    arch = str(stack.arch).lower()
    if arch not in archs:
        _fail(p + "arch", stack.arch, f"expected one of {', '.join(archs)}")
    for key in ("num_layers", "hidden_size") + (("num_attention_heads",) if arch != "mega" else ()):
        value = getattr(stack, key)
        if not _is_pos_int(value):
            _fail(p + key, value, "expected a positive integer")
    if arch == "mega":  # Mega's own keys: check_mega_arch (model.<side>.mega.*)
        _check_probabilities(stack, p)
        _check_positive_numbers(stack, p, ("init_method_std",))
        return
    _check_transformer_body(stack, p, tp, pos_type)
    if arch == "perceiver":
        for key in ("hidden_steps", "num_self_attention_per_cross_attention"):
            v = getattr(stack, key)
            if not _is_pos_int(v):
                _fail(p + key, v, f"expected a positive integer (>= 1) for model.{p}arch=perceiver")


def check_encoder_decoder_config(cfg, *, use_cuda: Optional[bool] = None) -> None:
    """``model.*`` of ``pretrain_bart.py`` (an ``EncoderDecoderModelConfig`` or its ``DictConfig``); errors name
    ``model.<key>``, ``model.encoder.<key>``, ``model.decoder.<key>``."""
    for key in ("seq_length", "make_vocab_size_divisible_by", "tensor_model_parallel_size",
                "pipeline_model_parallel_size"):
        value = getattr(cfg, key)
        if not _is_pos_int(value):
            _fail(key, value, "expected a positive integer")
    if cfg.pipeline_model_parallel_size != 1:
        _fail("pipeline_model_parallel_size", cfg.pipeline_model_parallel_size,
              "the encoder-decoder model does not support pipeline parallelism; set it to 1 "
              "(use model.tensor_model_parallel_size or more data-parallel devices)")
    if cfg.seq_length_dec is not None and not _is_pos_int(cfg.seq_length_dec):
        _fail("seq_length_dec", cfg.seq_length_dec, "expected a positive integer or null (null = model.seq_length)")
    tp = int(cfg.tensor_model_parallel_size)
    pos_type = str(cfg.position_embedding_type).lower()
    if pos_type not in POSITION_EMBEDDING_TYPES:
        _fail("position_embedding_type", cfg.position_embedding_type,
              f"expected one of {', '.join(POSITION_EMBEDDING_TYPES)}")
    mpe = cfg.max_position_embeddings
    if mpe is not None and not _is_pos_int(mpe):
        _fail("max_position_embeddings", mpe,
              "expected a positive integer or null (null = max(model.seq_length, model.seq_length_dec))")
    max_pos = resolve_encdec_max_position_embeddings(cfg)
    if cfg.seq_length > max_pos:
        _fail("seq_length", cfg.seq_length, f"must be <= model.max_position_embeddings={max_pos}")
    if resolve_seq_length_dec(cfg) > max_pos:
        _fail("seq_length_dec", cfg.seq_length_dec, f"must be <= model.max_position_embeddings={max_pos}")
    if pos_type == "rope":
        _check_positive_numbers(cfg, "", ("rotary_base",))
    if not isinstance(cfg.share_embeddings_and_output_weights, bool):
        _fail("share_embeddings_and_output_weights", cfg.share_embeddings_and_output_weights, "expected true or false")
    _check_stack(cfg.encoder, "encoder", tp, pos_type)
    _check_stack(cfg.decoder, "decoder", tp, pos_type)
    for side, length in (("encoder", int(cfg.seq_length)), ("decoder", resolve_seq_length_dec(cfg))):
        stack = getattr(cfg, side)
        if str(stack.arch).lower() == "mega":
            check_mega_arch(stack.mega, f"{side}.mega", length, tp=tp, pp=int(cfg.pipeline_model_parallel_size),
                            sequence_parallel=bool(cfg.sequence_parallel), use_cuda=use_cuda)
    if cfg.encoder.hidden_size != cfg.decoder.hidden_size:
        raise ConfigError(
            f"model.encoder.hidden_size={cfg.encoder.hidden_size!r} and model.decoder.hidden_size="
            f"{cfg.decoder.hidden_size!r} must be equal: the token embeddings are shared by the encoder, "
            f"the decoder and the output layer"
        )
    _check_sequence_parallel(cfg)


def check_model_config(model_cfg: Any, *, use_cuda: Optional[bool] = None) -> None:
    """``model.*`` of either entry point: encoder-decoder by :func:`is_encoder_decoder`, else GPT."""
    if is_encoder_decoder(model_cfg):
        check_encoder_decoder_config(model_cfg, use_cuda=use_cuda)
    else:
        check_gpt_model_config(model_cfg, use_cuda=use_cuda)


__all__ = [
    "GPT_ARCHS", "ENCODER_ARCHS", "DECODER_ARCHS", "ACTIVATIONS", "NORMALIZATIONS", "POSITION_EMBEDDING_TYPES",
    "CHECKPOINT_GRANULARITIES", "MEGA_NORMALIZATIONS", "MEGA_ATTENTION_ACTIVATIONS",
    "MEGA_RELATIVE_POSITIONAL_BIASES", "MEGA_ACTIVATIONS", "EMA_IMPLS", "EMA_IMPL_CHOICES", "TRANSFORMER_ONLY_KEYS",
    "DOCUMENT_ATTENTION_IMPLS",
    "normalize_checkpoint_granularity", "is_encoder_decoder", "model_arch", "resolve_ffn_hidden_size", "resolve_max_position_embeddings", "resolve_num_query_groups",
    "resolve_seq_length_dec",
    "resolve_encdec_max_position_embeddings", "check_vocab_size", "check_mega_arch", "check_gpt_model_config",
    "check_encoder_decoder_config", "check_model_config",
]

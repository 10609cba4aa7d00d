"""Export a trained GPT to a Hugging Face ``transformers`` model directory (weights, config, tokenizer).

    obj = consolidate_checkpoint("experiments/megatron_gpt/v1")      # or read_consolidated / read_archive
    export_to_hf(obj, "hf_model")                                    # arch="auto": GPT-2 or Llama
    model = transformers.AutoModelForCausalLM.from_pretrained("hf_model")
    tok = transformers.AutoTokenizer.from_pretrained("hf_model")     # the same ids as model.tokenizer

``tools/convert_to_hf.py`` is the command line. ``transformers`` is an optional dependency (``pip install
transformers``); it is imported only when an export runs.

Targets (``arch``; ``"auto"`` picks the one whose requirements the ``model.*`` keys meet):

* ``gpt2`` -> ``GPT2LMHeadModel``: ``model.position_embedding_type=learned_absolute``, ``model.activation=gelu``
  or ``gelu_tanh``, ``model.normalization=layernorm``. ``gelu`` is the exact erf form (``activation_function=
  "gelu"``), ``gelu_tanh`` GPT-2's own tanh approximation (``activation_function="gelu_new"``);
  ``layer_norm_epsilon=model.layernorm_epsilon``; ``n_inner=ffn_hidden_size``;
  ``n_positions=max_position_embeddings``. GPT-2's ``Conv1D`` stores weights ``[in, out]`` (transposed against
  ``nn.Linear``) and its ``c_attn`` columns are ``[q (all heads) | k | v]`` while our fused QKV rows are
  ``[heads, (q, k, v), head_dim]``: the rows are regrouped, then transposed. GPT-2 always has biases and
  LayerNorm shifts; with ``model.bias=false`` they are written as zeros (the same function). GPT-2 has no
  grouped-query attention: a model with ``model.num_query_groups`` below its heads is refused.
* ``llama`` -> ``LlamaForCausalLM``: ``model.position_embedding_type=rope``, ``model.activation=swiglu``,
  ``model.normalization=rmsnorm``. Our rotary embedding (``modules/rotary.py``) is the rotate-half convention on
  the full head dimension with ``inv_freq = base^(-2i/head_dim)`` -- exactly HF Llama's default rope -- so q/k rows
  need no permutation (an interleaved-pairs rope would need the per-head even/odd -> half/half permutation);
  ``rope_theta=model.rotary_base``, ``rms_norm_eps=model.layernorm_epsilon``, ``num_key_value_heads`` =
  ``model.num_query_groups`` (default: the heads, multi-head attention); our fused QKV rows, ordered by query group
  (each group's query heads, its key head, its value head), become ``q_proj`` (query head ``i`` = group ``i //
  (heads / groups)``'s ``i % (heads / groups)``-th, HF's grouping), ``k_proj`` and ``v_proj``;
  ``head_dim = hidden / heads``, ``intermediate_size=ffn_hidden_size``; our SwiGLU
  fc1 rows ``[gate; up]`` become ``gate_proj`` / ``up_proj``. ``model.bias=true`` maps to
  ``attention_bias=mlp_bias=true``.

In both, ``share_embeddings_and_output_weights`` becomes ``tie_word_embeddings`` (an untied ``output_layer``
becomes ``lm_head``), and the embedding / LM head get exactly ``vocab_size`` rows: the padded rows never carry
probability in our model (their logits are -inf), so dropping them gives the same softmax.

A Mega language model (``model.arch=mega``) becomes transformers 4.x's ``MegaForCausalLM`` (``arch="mega"``; the
mapping and what it refuses: :mod:`megatron_ext.inference.hf_import_mega`; the files are written without
transformers, whose version 5 has no Mega). Anything else (rope + gelu, learned positions + rmsnorm,
encoder-decoders) raises a ``ConfigError`` naming the keys that prevent the export and what each target needs.

Tokenizer: written by :mod:`megatron_ext.inference.hf_tokenizer` (``tokenizer.json`` + ``tokenizer_config.json``,
ids equal to ours) and checked against ours before anything is written; see that module for the representation of
each tokenizer and the verification.

Generation ids: GPT pretraining separates documents with ``eod`` and never shows ``bos``, so ``eos_token_id`` =
``bos_token_id`` = eod (like GPT-2's ``<|endoftext|>``: unconditional generation starts after a document end)
and ``pad_token_id`` = the tokenizer's pad.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from megatron_ext.checkpoint.loader import family_of_checkpoint, read_weights
from megatron_ext.config.model_validation import model_arch
from megatron_ext.errors import CheckpointError, ConfigError
from megatron_ext.inference.hf_import_mega import HF_ARCH, mega_to_hf, write_hf_mega_dir
from megatron_ext.inference.hf_tokenizer import (PROBE_TEXTS, TOKENIZER_FILES, VERIFY_LINES, TokenizerMismatchError,
                                                 compare_tokenizers, import_transformers, sample_lines,
                                                 symbol_probes, training_text_files, write_hf_tokenizer)
from megatron_ext.models.families import family_of_config
from megatron_ext.modules.common import tp_world_size
from megatron_ext.tokenizers import build_tokenizer
from megatron_ext.tokenizers.base import Tokenizer

ARCHS = ("auto", "gpt2", "llama", "mega")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: target -> (HF class, {model.* key: required value})
TARGETS = {
    "gpt2": ("GPT2LMHeadModel", {"position_embedding_type": "learned_absolute", "activation": ("gelu", "gelu_tanh"),
                                 "normalization": "layernorm"}),
    "llama": ("LlamaForCausalLM", {"position_embedding_type": "rope", "activation": "swiglu",
                                   "normalization": "rmsnorm"}),
}

#: our model.activation -> GPT-2's activation_function (transformers' ACT2FN names)
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}


class HFExportWarning(UserWarning):
    """An export that was asked to go on although its tokenizer encodes some checked text differently."""


def _mcfg(model_config: Any) -> Dict[str, Any]:
    """``model_config`` (dict, DictConfig or ``ModelConfig``) as a plain dict."""
    if model_config is None:
        return {}
    if isinstance(model_config, dict):
        return model_config
    if isinstance(model_config, DictConfig):
        return OmegaConf.to_container(model_config, resolve=True)
    if dataclasses.is_dataclass(model_config):
        return dataclasses.asdict(model_config)
    raise ConfigError(f"model_config: expected a dict of model.* keys, got {type(model_config).__name__}")


def _get(mc: Dict[str, Any], key: str, default: Any = None) -> Any:
    v = mc.get(key, default)
    return default if v is None else v


def _norm(v: Any) -> str:
    return str(v).strip().lower()


def resolve_arch(model_config: Any, arch: str = "auto", family: str = "gpt") -> str:
    """The export target (``"gpt2"`` / ``"llama"``) for these ``model.*`` keys; ``ConfigError`` if there is none."""
    a = _norm(arch)
    if a not in ARCHS:
        raise ConfigError(f"arch={arch!r}: expected one of {', '.join(ARCHS)}")
    if family == "encdec":
        raise ConfigError("this is an encoder-decoder model (model.encoder / model.decoder, pretrain_bart.py): only "
                          "decoder-only GPT models (pretrain_gpt.py, model.arch=transformer) can be exported to "
                          "Hugging Face GPT2LMHeadModel / LlamaForCausalLM")
    mc = _mcfg(model_config)
    if family == "mega" or model_arch(mc) == "mega":  # the family table's rule (config.model_validation)
        if a not in ("auto", "mega"):
            raise ConfigError(f"arch={arch!r}: a Mega language model (model.arch=mega) exports to Hugging Face "
                              f"MegaForCausalLM only (arch=auto or mega)")
        return "mega"  # megatron_ext.inference.hf_import_mega (transformers 4.x's MegaForCausalLM)
    if a == "mega":
        raise ConfigError(f"arch=mega: model.arch={mc.get('arch', 'transformer')!r} is not a Mega language model")
    if family not in ("gpt", None):
        raise ConfigError(f"family={family!r}: only 'gpt' models can be exported to Hugging Face")
    if model_arch(mc) != "transformer":
        raise ConfigError(f"model.arch={mc.get('arch')!r}: only model.arch=transformer GPT models can be exported")

    def blockers(target: str) -> List[str]:
        _, req = TARGETS[target]
        defaults = {"position_embedding_type": "learned_absolute", "activation": "gelu", "normalization": "layernorm"}
        out = []
        for key, want in req.items():
            have = _norm(_get(mc, key, defaults[key]))
            wants = want if isinstance(want, tuple) else (want,)
            if have not in wants:
                out.append(f"model.{key}={' or '.join(wants)} (this model has {have})")
        groups, heads = mc.get("num_query_groups"), mc.get("num_attention_heads")
        if target == "gpt2" and groups is not None and groups != heads:
            out.append(f"model.num_query_groups=null, multi-head attention (GPT-2 has no grouped-query attention; "
                       f"this model has {groups} query groups for {heads} heads)")
        return out

    candidates = list(TARGETS) if a == "auto" else [a]
    problems = {t: blockers(t) for t in candidates}
    for t in candidates:
        if not problems[t]:
            return t
    lines = "; ".join(f"{t} ({TARGETS[t][0]}) needs {', '.join(p)}" for t, p in problems.items())
    which = "no Hugging Face architecture matches this model" if a == "auto" else f"cannot export as arch={a}"
    raise ConfigError(f"{which}: {lines}")


# ---------------------------------------------------------------------------------------------------- weights
class _Weights:
    """Pops tensors out of our state dict by name; reports missing / left-over names as CheckpointError."""

    def __init__(self, sd: Dict[str, torch.Tensor], where: str):
        self.sd = dict(sd)
        self.where = where

    def has(self, name: str) -> bool:
        return name in self.sd

    def take(self, name: str, shape: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
        if name not in self.sd:
            raise CheckpointError(f"{self.where}: no weights for {name} (is this a GPTModel state dict of the "
                                  f"configured architecture?)")
        t = self.sd.pop(name)
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{self.where}: {name} is a {type(t).__name__}, expected a tensor")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.where}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)} from the "
                                  f"model config")
        return t.detach().to(torch.float32)

    def take_opt(self, name: str, shape: Tuple[int, ...], bias: bool) -> torch.Tensor:
        """A bias / norm shift: required when the model has biases, zeros otherwise."""
        if bias or name in self.sd:
            return self.take(name, shape)
        return torch.zeros(shape)

    def finish(self) -> None:
        left = [k for k in self.sd if not k.endswith("_extra_state")]
        if left:
            raise CheckpointError(f"{self.where}: weights not used by the export (the model config does not describe "
                                  f"them): {', '.join(sorted(left)[:5])}")


def _dims(mc: Dict[str, Any], sd: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """Sizes from the model config; the MLP width is read off the fc2 weight (``[hidden, ffn]``), so the default
    ``model.ffn_hidden_size`` rule (models/gpt.py) need not be repeated here (nor megatron-core imported)."""
    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        v = mc.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"model.{key}={v!r} in the checkpoint's model config: expected a positive integer")
    h, nh = int(mc["hidden_size"]), int(mc["num_attention_heads"])
    if h % nh:
        raise ConfigError(f"model.hidden_size={h}: must be divisible by model.num_attention_heads={nh}")
    ng = mc.get("num_query_groups")
    ng = nh if ng is None else ng
    if not isinstance(ng, int) or isinstance(ng, bool) or ng < 1 or nh % ng:
        raise ConfigError(f"model.num_query_groups={mc.get('num_query_groups')!r} in the checkpoint's model config: "
                          f"expected null or a positive integer dividing model.num_attention_heads={nh}")
    fc2 = sd.get("decoder.layers.0.mlp.linear_fc2.weight")
    if not isinstance(fc2, torch.Tensor) or fc2.dim() != 2:
        raise CheckpointError("no weights for decoder.layers.0.mlp.linear_fc2.weight (is this a GPTModel state dict?)")
    ffn = int(fc2.shape[1])
    if mc.get("ffn_hidden_size") is not None and int(mc["ffn_hidden_size"]) != ffn:
        raise CheckpointError(f"decoder.layers.0.mlp.linear_fc2.weight has {ffn} input features but "
                              f"model.ffn_hidden_size={mc['ffn_hidden_size']}")
    max_pos = mc.get("max_position_embeddings")
    if max_pos is None:
        max_pos = mc.get("seq_length")
    if not isinstance(max_pos, int) or max_pos < 1:
        raise ConfigError(f"model.max_position_embeddings={mc.get('max_position_embeddings')!r} / model.seq_length="
                          f"{mc.get('seq_length')!r}: expected a positive integer")
    return {"layers": int(mc["num_layers"]), "hidden": h, "heads": nh, "groups": int(ng), "head_dim": h // nh,
            "ffn": ffn, "max_pos": int(max_pos)}


def _split_qkv(w: torch.Tensor, heads: int, head_dim: int,
               groups: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our fused QKV rows (per query group: its ``heads / groups`` query heads, its key head, its value head; each
    ``head_dim`` rows; ``groups`` None = ``heads``, i.e. ``[heads, (q, k, v), head_dim]``) -> q ``[heads *
    head_dim, ...]`` (query heads in order: group by group), k and v ``[groups * head_dim, ...]``."""
    groups = heads if groups is None else int(groups)
    per = heads // groups
    rest = w.shape[1:]
    g = w.reshape(groups, per + 2, head_dim, *rest)
    q = g[:, :per].reshape(heads * head_dim, *rest).contiguous()
    return q, g[:, per].reshape(groups * head_dim, *rest).contiguous(), \
        g[:, per + 1].reshape(groups * head_dim, *rest).contiguous()


def gpt2_state_dict(sd: Dict[str, torch.Tensor], model_config: Any, vocab_size: int,
                    where: str = "state_dict") -> Dict[str, torch.Tensor]:
    """Our ``GPTModel`` names -> ``GPT2LMHeadModel`` names (Conv1D weights ``[in, out]``)."""
    mc = _mcfg(model_config)
    d = _dims(mc, sd)
    h, nh, hd, ffn, V = d["hidden"], d["heads"], d["head_dim"], d["ffn"], int(vocab_size)
    if d["groups"] != nh:
        raise ConfigError(f"model.num_query_groups={d['groups']}: GPT-2 (GPT2LMHeadModel) has no grouped-query "
                          f"attention; only models with model.num_query_groups=null (= model.num_attention_heads="
                          f"{nh}) export to it (grouped-query models export to Llama)")
    bias = bool(_get(mc, "bias", True))
    tied = bool(_get(mc, "share_embeddings_and_output_weights", True))
    W = _Weights(sd, where)
    out = {"transformer.wte.weight": W.take("embedding.word_embeddings.weight", (V, h)),
           "transformer.wpe.weight": W.take("embedding.position_embeddings.weight", (d["max_pos"], h))}
    for i in range(d["layers"]):
        p, q = f"decoder.layers.{i}.", f"transformer.h.{i}."
        out[q + "ln_1.weight"] = W.take(p + "input_layernorm.weight", (h,))
        out[q + "ln_1.bias"] = W.take_opt(p + "input_layernorm.bias", (h,), bias)
        qkv_w = _split_qkv(W.take(p + "self_attention.linear_qkv.weight", (3 * h, h)), nh, hd)
        qkv_b = _split_qkv(W.take_opt(p + "self_attention.linear_qkv.bias", (3 * h,), bias), nh, hd)
        out[q + "attn.c_attn.weight"] = torch.cat(qkv_w, dim=0).t().contiguous()
        out[q + "attn.c_attn.bias"] = torch.cat(qkv_b, dim=0)
        out[q + "attn.c_proj.weight"] = W.take(p + "self_attention.linear_proj.weight", (h, h)).t().contiguous()
        out[q + "attn.c_proj.bias"] = W.take_opt(p + "self_attention.linear_proj.bias", (h,), bias)
        out[q + "ln_2.weight"] = W.take(p + "pre_mlp_layernorm.weight", (h,))
        out[q + "ln_2.bias"] = W.take_opt(p + "pre_mlp_layernorm.bias", (h,), bias)
        out[q + "mlp.c_fc.weight"] = W.take(p + "mlp.linear_fc1.weight", (ffn, h)).t().contiguous()
        out[q + "mlp.c_fc.bias"] = W.take_opt(p + "mlp.linear_fc1.bias", (ffn,), bias)
        out[q + "mlp.c_proj.weight"] = W.take(p + "mlp.linear_fc2.weight", (h, ffn)).t().contiguous()
        out[q + "mlp.c_proj.bias"] = W.take_opt(p + "mlp.linear_fc2.bias", (h,), bias)
    out["transformer.ln_f.weight"] = W.take("decoder.final_layernorm.weight", (h,))
    out["transformer.ln_f.bias"] = W.take_opt("decoder.final_layernorm.bias", (h,), bias)
    out["lm_head.weight"] = out["transformer.wte.weight"] if tied else W.take("output_layer.weight", (V, h))
    W.finish()
    return out


def llama_state_dict(sd: Dict[str, torch.Tensor], model_config: Any, vocab_size: int,
                     where: str = "state_dict") -> Dict[str, torch.Tensor]:
    """Our ``GPTModel`` names -> ``LlamaForCausalLM`` names (q/k rows unpermuted: both use rotate-half rope)."""
    mc = _mcfg(model_config)
    d = _dims(mc, sd)
    h, nh, ng, hd, ffn, V = d["hidden"], d["heads"], d["groups"], d["head_dim"], d["ffn"], int(vocab_size)
    qkv_rows = (nh + 2 * ng) * hd
    bias = bool(_get(mc, "bias", True))
    tied = bool(_get(mc, "share_embeddings_and_output_weights", True))
    W = _Weights(sd, where)
    out = {"model.embed_tokens.weight": W.take("embedding.word_embeddings.weight", (V, h))}
    for i in range(d["layers"]):
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[q + "input_layernorm.weight"] = W.take(p + "input_layernorm.weight", (h,))
        wq, wk, wv = _split_qkv(W.take(p + "self_attention.linear_qkv.weight", (qkv_rows, h)), nh, hd, ng)
        out[q + "self_attn.q_proj.weight"], out[q + "self_attn.k_proj.weight"] = wq, wk
        out[q + "self_attn.v_proj.weight"] = wv
        out[q + "self_attn.o_proj.weight"] = W.take(p + "self_attention.linear_proj.weight", (h, h))
        out[q + "post_attention_layernorm.weight"] = W.take(p + "pre_mlp_layernorm.weight", (h,))
        fc1 = W.take(p + "mlp.linear_fc1.weight", (2 * ffn, h))
        out[q + "mlp.gate_proj.weight"], out[q + "mlp.up_proj.weight"] = fc1[:ffn].contiguous(), fc1[ffn:].contiguous()
        out[q + "mlp.down_proj.weight"] = W.take(p + "mlp.linear_fc2.weight", (h, ffn))
        if bias:
            bq, bk, bv = _split_qkv(W.take(p + "self_attention.linear_qkv.bias", (qkv_rows,)), nh, hd, ng)
            out[q + "self_attn.q_proj.bias"], out[q + "self_attn.k_proj.bias"] = bq, bk
            out[q + "self_attn.v_proj.bias"] = bv
            out[q + "self_attn.o_proj.bias"] = W.take(p + "self_attention.linear_proj.bias", (h,))
            b1 = W.take(p + "mlp.linear_fc1.bias", (2 * ffn,))
            out[q + "mlp.gate_proj.bias"], out[q + "mlp.up_proj.bias"] = b1[:ffn].contiguous(), b1[ffn:].contiguous()
            out[q + "mlp.down_proj.bias"] = W.take(p + "mlp.linear_fc2.bias", (h,))
    out["model.norm.weight"] = W.take("decoder.final_layernorm.weight", (h,))
    out["lm_head.weight"] = out["model.embed_tokens.weight"] if tied else W.take("output_layer.weight", (V, h))
    W.finish()
    return out


def _special_ids(tokenizer, vocab_size: int) -> Dict[str, Optional[int]]:
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    eod = int(tokenizer.eod)
    pad = getattr(tokenizer, "pad", None)
    bos = eod
    if getattr(tokenizer, "name", None) == "huggingface" and tokenizer.bos is not None:
        bos = int(tokenizer.bos)  # a Hugging Face tokenizer's own bos (Llama's <s>), as its config names it
    return {"bos_token_id": bos, "eos_token_id": eod, "pad_token_id": int(pad) if pad is not None else None}


def hf_config(arch: str, model_config: Any, state_dict: Dict[str, torch.Tensor], vocab_size: int, tokenizer=None):
    """The ``GPT2Config`` / ``LlamaConfig`` of our model config (``state_dict``: our weights, for the MLP width)."""
    transformers = import_transformers()
    mc = _mcfg(model_config)
    d = _dims(mc, state_dict)
    eps = float(_get(mc, "layernorm_epsilon", 1e-5))
    tied = bool(_get(mc, "share_embeddings_and_output_weights", True))
    hidden_dropout = float(_get(mc, "hidden_dropout", 0.0))
    attention_dropout = float(_get(mc, "attention_dropout", 0.0))
    common = dict(vocab_size=int(vocab_size), tie_word_embeddings=tied,
                  initializer_range=float(_get(mc, "init_method_std", 0.02)), **_special_ids(tokenizer, vocab_size))
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_positions=d["max_pos"], n_embd=d["hidden"], n_layer=d["layers"], n_head=d["heads"], n_inner=d["ffn"],
            activation_function=GPT2_ACTIVATIONS[_norm(_get(mc, "activation", "gelu"))], layer_norm_epsilon=eps,
            resid_pdrop=hidden_dropout,
            embd_pdrop=hidden_dropout, attn_pdrop=attention_dropout, scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, **common)
    if arch == "llama":
        theta = float(_get(mc, "rotary_base", 10000.0))
        bias = bool(_get(mc, "bias", True))
        kwargs = dict(hidden_size=d["hidden"], intermediate_size=d["ffn"], num_hidden_layers=d["layers"],
                      num_attention_heads=d["heads"], num_key_value_heads=d["groups"], head_dim=d["head_dim"],
                      hidden_act="silu", max_position_embeddings=d["max_pos"], rms_norm_eps=eps,
                      attention_bias=bias, mlp_bias=bias, attention_dropout=attention_dropout, **common)
        fields = getattr(transformers.LlamaConfig, "__dataclass_fields__", None) or {}
        if "rope_parameters" in fields or hasattr(transformers.LlamaConfig(), "rope_parameters"):
            kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        else:  # transformers 4.x
            kwargs["rope_theta"] = theta
        cfg = transformers.LlamaConfig(**kwargs)
        got = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", None))
        if got is None or abs(float(got) - theta) > 1e-6 * theta:
            raise ConfigError(f"model.rotary_base={theta}: this transformers version did not take it as the Llama "
                              f"rope_theta (got {got})")
        return cfg
    raise ConfigError(f"arch={arch!r}: expected gpt2 or llama")


# ---------------------------------------------------------------------------------------------------- tokenizer
def resolve_tokenizer(consolidated: Dict[str, Any], tokenizer: Any = None, *, library_key: Optional[str] = None,
                      model_key: Optional[str] = None):
    """Our tokenizer for an export: ``tokenizer`` itself (a Tokenizer), a ``{"library", "model"}`` dict, or None
    (the archive's tokenizer / the checkpoint's ``model.tokenizer``). ``False`` -> None (no tokenizer)."""
    if tokenizer is False:
        return None
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer is None:
        spec = consolidated.get("tokenizer")
        if isinstance(spec, dict) and spec.get("library"):
            where = "the archive's tokenizer"
        else:
            spec = _mcfg(consolidated.get("model_config")).get("tokenizer") or {}
            where = "the checkpoint's model.tokenizer"
        library_key = library_key or f"model.tokenizer.library ({where})"
        model_key = model_key or f"model.tokenizer.model ({where})"
    elif isinstance(tokenizer, dict):
        spec = tokenizer
        library_key = library_key or "tokenizer['library']"
        model_key = model_key or "tokenizer['model']"
    else:
        raise ConfigError(f"tokenizer: expected a megatron_ext Tokenizer, a dict with 'library'/'model', None or "
                          f"False, got {type(tokenizer).__name__}")
    library = spec.get("library") or "byte"
    model = spec.get("model")
    if _norm(library) == "byte":
        model = None  # the byte tokenizer has no file (a stale path in a config must not warn)
    try:
        return build_tokenizer(library, model, library_key=library_key, model_key=model_key)
    except ConfigError as e:
        raise ConfigError(f"{e} (give the tokenizer explicitly: tools/convert_to_hf.py --tokenizer-library/"
                          f"--tokenizer-model, or export_to_hf(..., tokenizer=...))") from None


# ---------------------------------------------------------------------------------------------------- export
def _no_init():
    """Skip transformers' random weight init while building the model we overwrite anyway (when available)."""
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            m = __import__(mod, fromlist=["no_init_weights"])
        except ImportError:
            continue
        if hasattr(m, "no_init_weights"):
            return m.no_init_weights()
    return contextlib.nullcontext()


def export_to_hf(consolidated: Dict[str, Any], out_dir: str, *, arch: str = "auto", tokenizer: Any = None,
                 dtype: Any = torch.float32, probe_texts: Optional[Sequence[str]] = None,
                 verify_text: Optional[Sequence[str]] = None, allow_tokenizer_mismatch: bool = False,
                 ) -> Dict[str, Any]:
    """Write a Hugging Face model directory for a consolidated GPT checkpoint.

    ``consolidated``: ``{"state_dict": {GPTModel name: full tensor, vocab rows trimmed}, "vocab_size",
    "model_config": {model.* keys}}`` (``consolidate_checkpoint`` / ``read_consolidated`` / ``read_archive`` /
    :func:`consolidated_from_model`); ``arch``: auto | gpt2 | llama; ``tokenizer``: see :func:`resolve_tokenizer`;
    ``dtype``: torch dtype or one of float32 / bfloat16 / float16 (the saved weights); ``probe_texts``: extra
    texts the exported tokenizer is checked on; ``verify_text``: text files whose lines (a sample of up to
    :data:`VERIFY_LINES`) it is checked on (None: the tokenizer's own training input where that is recorded and
    still there, see :func:`training_text_files`). The tokenizer files are written and checked (both
    ``tokenizers`` and ``AutoTokenizer``, see :func:`compare_tokenizers`) before anything goes to ``out_dir``: any
    line encoded differently raises :class:`TokenizerMismatchError` unless ``allow_tokenizer_mismatch`` (then an
    ``HFExportWarning`` counts the lines). Returns a summary: ``arch``, ``model_class``, ``out_dir``, ``dtype``,
    ``vocab_size``, ``tokenizer`` (library or None), ``tokenizer_checked`` (lines compared),
    ``tokenizer_sources`` (where they came from), ``tokenizer_mismatches`` (``(where, text, ours, HF)``; empty =
    exact on all of them).
    """
    if not isinstance(consolidated, dict) or "state_dict" not in consolidated:
        raise CheckpointError("consolidated: expected a dict with 'state_dict', 'vocab_size' and 'model_config' "
                              "(consolidate_checkpoint / read_consolidated / read_archive)")
    for key in ("vocab_size", "model_config"):
        if consolidated.get(key) is None:
            raise CheckpointError(f"consolidated: missing '{key}'")
    where = str((consolidated.get("source") or {}).get("path") or consolidated.get("ckpt_path") or "state_dict")
    family = consolidated.get("family") or family_of_config(consolidated["model_config"]).name
    target = resolve_arch(consolidated["model_config"], arch, family)
    torch_dtype = _resolve_dtype(dtype)
    vocab = int(consolidated["vocab_size"])
    ours = resolve_tokenizer(consolidated, tokenizer)
    if ours is not None and int(ours.vocab_size) != vocab:
        raise ConfigError(f"the tokenizer ({ours.name}) has {ours.vocab_size} ids but the model was trained with "
                          f"vocab_size={vocab}: give the tokenizer the model was trained with")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"{out_dir}: exists and is not a directory (expected an output directory)")
    mc = _mcfg(consolidated["model_config"])
    if target == "mega":  # transformers 5 has no Mega: the files are written directly (they load in 4.x)
        ids = {k: v for k, v in _special_ids(ours, vocab).items() if k.endswith("_token_id")}
        hf_sd, config = mega_to_hf(consolidated["state_dict"], mc, vocab, **ids)
        with tempfile.TemporaryDirectory(prefix="hf_tokenizer-") as tok_dir:
            tok = _checked_tokenizer(ours, tok_dir, int(config["max_positions"]), out_dir, probe_texts, verify_text,
                                     allow_tokenizer_mismatch)
            write_hf_mega_dir(out_dir, hf_sd, config, torch_dtype)
            _copy_tokenizer(tok_dir, tok["written"], out_dir)
        return {"arch": target, "model_class": HF_ARCH, "out_dir": out_dir,
                "dtype": str(torch_dtype).replace("torch.", ""), "vocab_size": vocab,
                "tokenizer": ours.name if ours is not None else None, "tokenizer_mismatches": tok["mismatches"],
                "tokenizer_checked": tok["checked"], "tokenizer_sources": tok["sources"]}
    transformers = import_transformers()
    convert = gpt2_state_dict if target == "gpt2" else llama_state_dict
    hf_sd = convert(consolidated["state_dict"], mc, vocab, where)
    config = hf_config(target, mc, consolidated["state_dict"], vocab, ours)
    cls = getattr(transformers, TARGETS[target][0])
    with _no_init():
        model = cls(config)
    tied = bool(config.tie_word_embeddings)
    with torch.no_grad():
        missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:  # a transformers version with other parameter names
        raise CheckpointError(f"{TARGETS[target][0]} of this transformers version ({transformers.__version__}) does "
                              f"not match the converted weights (missing: {', '.join(missing[:5]) or '-'}; "
                              f"unexpected: {', '.join(unexpected[:5]) or '-'})")
    if tied:
        model.tie_weights()
    model = model.to(torch_dtype).eval()
    ids = _special_ids(ours, vocab)
    gen = model.generation_config
    for k, v in ids.items():
        setattr(gen, k, v)

    with tempfile.TemporaryDirectory(prefix="hf_tokenizer-") as tok_dir:
        max_len = config.max_position_embeddings if target == "llama" else config.n_positions
        tok = _checked_tokenizer(ours, tok_dir, max_len, out_dir, probe_texts, verify_text, allow_tokenizer_mismatch)
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        _copy_tokenizer(tok_dir, tok["written"], out_dir)
    return {"arch": target, "model_class": TARGETS[target][0], "out_dir": out_dir,
            "dtype": str(torch_dtype).replace("torch.", ""), "vocab_size": vocab,
            "tokenizer": ours.name if ours is not None else None, "tokenizer_mismatches": tok["mismatches"],
            "tokenizer_checked": tok["checked"], "tokenizer_sources": tok["sources"]}


def _checked_tokenizer(ours, tok_dir: str, max_len: int, out_dir: str, probe_texts, verify_text,
                       allow_tokenizer_mismatch: bool) -> Dict[str, Any]:
    """Write the tokenizer files of ``ours`` (None: none) into ``tok_dir`` and compare them with ours on the probe
    texts and the ``verify_text`` lines (see :func:`export_to_hf`) -> ``written``, ``checked``, ``sources``,
    ``mismatches``."""
    mismatches: List[Tuple[str, str, List[int], List[int]]] = []
    written: List[str] = []
    checked, sources = 0, []
    if ours is not None:
        written = write_hf_tokenizer(ours, tok_dir, max_len)
        files = list(verify_text) if verify_text is not None else training_text_files(ours)
        texts = [(f"probe text {i + 1}", t) for i, t in
                 enumerate(list(PROBE_TEXTS) + symbol_probes(ours) + list(probe_texts or []))]
        for path in files:
            texts += sample_lines(path, VERIFY_LINES)
        checked, sources = len(texts), ["probe texts", *files]
        mismatches = compare_tokenizers(ours, tok_dir, texts)
        if mismatches:
            where, t, a, b = mismatches[0]
            msg = (f"the exported Hugging Face tokenizer encodes {len(mismatches)} of {len(texts)} lines "
                   f"differently from {ours.name} (first: {where} {_abbrev(t)}: ours {_abbrev(a)} vs Hugging "
                   f"Face {_abbrev(b)}{' (same ids, other decoded text)' if a == b else ''})")
            if not allow_tokenizer_mismatch:
                raise TokenizerMismatchError(f"{msg}; nothing was written to {out_dir} (export anyway with "
                                             f"--allow-tokenizer-mismatch / allow_tokenizer_mismatch=True)")
            warnings.warn(f"{msg}; exported anyway: AutoTokenizer ids differ from training ids for such "
                          f"text", HFExportWarning, stacklevel=3)
    return {"written": written, "checked": checked, "sources": sources, "mismatches": mismatches}


def _copy_tokenizer(tok_dir: str, written: List[str], out_dir: str) -> None:
    for name in written:
        shutil.copyfile(os.path.join(tok_dir, name), os.path.join(out_dir, name))
    for name in TOKENIZER_FILES - set(written):  # a tokenizer left by an earlier export would not match this model
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def _abbrev(x: Any, n: int = 12) -> str:
    """A text (first 60 characters, repr) or an id list (first ``n`` ids) for a one-line message."""
    if isinstance(x, str):
        return repr(x[:60]) + ("..." if len(x) > 60 else "")
    x = list(x)
    return "[" + ", ".join(map(str, x[:n])) + (f", ... ({len(x)} ids)]" if len(x) > n else "]")


def _resolve_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise ConfigError(f"dtype={dtype}: expected one of {', '.join(DTYPES)}")
    key = _norm(dtype)
    if key not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[key]


# ---------------------------------------------------------------------------------------------------- inputs
def consolidated_from_model(model) -> Dict[str, Any]:
    """An in-memory ``GPTModel`` (TP=1) -> the consolidated dict ``export_to_hf`` takes."""
    if tp_world_size() > 1:
        raise ConfigError("consolidated_from_model needs a TP=1 model (gather a split model with "
                          "megatron_ext.checkpoint.archive.gather_full_state_dict)")
    vocab = int(model.vocab_size)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("_extra_state") or not isinstance(v, torch.Tensor):
            continue
        v = v.detach().to("cpu", torch.float32).clone()
        if k in ("embedding.word_embeddings.weight", "output_layer.weight"):
            v = v[:vocab].clone()
        sd[k] = v
    cfg = model.config
    mc = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else _mcfg(cfg)
    return {"state_dict": sd, "vocab_size": vocab, "model_config": mc, "family": "gpt"}


def read_export_input(path: str, extract_dir: Optional[str] = None, key: str = "--input") -> Dict[str, Any]:
    """``path`` -> consolidated dict (:func:`megatron_ext.checkpoint.loader.read_weights`): a ``.mext`` archive
    (unpacked into ``extract_dir``), a training checkpoint (run directory, ``checkpoints`` directory or ``step_N``;
    any TP/PP/ZeRO layout) or a consolidated ``.pt``. A checkpoint of a family that has no Hugging Face target is
    refused from its ``meta.json``, before the weights are read."""
    if os.path.isdir(path):
        fam = family_of_checkpoint(path, key)
        if fam.name != "gpt":
            resolve_arch({}, "auto", fam.name)
    return read_weights(path, extract_dir, key)


__all__ = ["ARCHS", "DTYPES", "TARGETS", "HFExportWarning", "export_to_hf", "resolve_arch", "gpt2_state_dict",
           "llama_state_dict", "hf_config", "resolve_tokenizer", "consolidated_from_model", "read_export_input"]

"""Import a local Hugging Face model directory (``config.json`` + weights) as our model: the reverse of
:mod:`megatron_ext.inference.hf_export`.

    obj = import_from_hf("hf/llama")          # the consolidated dict: {"state_dict", "vocab_size", "model_config", ...}
    write_archive(...) / save_consolidated(obj, "llama.pt")    # tools/convert_from_hf.py does this for you

``tools/convert_from_hf.py`` is the command line (a ``.mext`` archive, a consolidated ``.pt`` or a training
checkpoint in a TP x PP layout). Nothing is downloaded: the directory is read as it is.

**The directory is untrusted input.** ``config.json`` is parsed as JSON (at most 1 MiB) and every value the mapping
uses is checked (type and range; options our model does not implement are refused naming the key). Weights are
``model.safetensors`` (read with the ``safetensors`` library, which never runs code) or ``pytorch_model.bin``
(read only through :func:`megatron_ext.checkpoint.safe_load.load_untrusted`: a pickle that would run code is
refused), or sharded versions of either through their index (``model.safetensors.index.json`` /
``pytorch_model.bin.index.json``): every shard name in the index must be a plain file name inside the directory
(no ``/``, ``..``, absolute paths, and no symlink leading out). For safetensors the names and shapes in each
file's header are checked against the ones the config implies before any tensor is read; missing, unexpected and
misshapen tensors are each one error naming the tensor.

Architectures (``config.json``'s ``model_type``; ``architectures``, when present, must name the causal-LM class):

* ``gpt2`` (``GPT2LMHeadModel``) -> ``model.position_embedding_type=learned_absolute``, ``normalization=layernorm``,
  ``bias=true``, ``activation``: ``gelu_new`` / ``gelu_pytorch_tanh`` -> ``gelu_tanh``, ``gelu`` -> ``gelu`` (other
  activations refused); ``n_positions`` -> ``max_position_embeddings``, ``layer_norm_epsilon`` ->
  ``layernorm_epsilon``, ``n_inner`` (null: 4 x hidden) -> ``ffn_hidden_size``. ``Conv1D`` weights ``[in, out]`` are
  transposed; ``c_attn``'s ``[q | k | v]`` columns become our per-head ``[q, k, v]`` rows.
  ``scale_attn_weights=false``, ``scale_attn_by_inverse_layer_idx=true`` and ``add_cross_attention=true`` are
  refused (``reorder_and_upcast_attn`` only changes the precision of the attention scores and is accepted).
  The causal-mask buffers older files carry (``attn.bias``, ``attn.masked_bias``) are skipped; files saved from
  ``GPT2Model`` (names without ``transformer.``, no ``lm_head``) are read as tied.
* ``llama`` (``LlamaForCausalLM``) -> ``position_embedding_type=rope``, ``normalization=rmsnorm``,
  ``activation=swiglu`` (``hidden_act`` must be ``silu``); ``rope_theta`` (or ``rope_parameters.rope_theta``) ->
  ``rotary_base``, ``rms_norm_eps`` -> ``layernorm_epsilon``, ``intermediate_size`` -> ``ffn_hidden_size``,
  ``max_position_embeddings``; ``attention_bias`` and ``mlp_bias`` must be equal (our ``model.bias`` covers both);
  ``rope_scaling`` / a ``rope_type`` other than ``default`` are refused, so are ``head_dim != hidden /
  heads`` and ``pretraining_tp != 1``. Our rotary embedding is HF Llama's rotate-half convention, so q/k rows are
  copied as they are. Grouped-query attention (``num_key_value_heads < num_attention_heads``) becomes
  ``model.num_query_groups`` with the fused QKV rows ordered by query group (for each group: its query heads, its
  key head, its value head -- megatron-core's layout; with one group per head this is our plain layout). A build
  without ``model.num_query_groups`` refuses GQA models naming the key.

In both, ``tie_word_embeddings`` -> ``share_embeddings_and_output_weights`` and ``vocab_size`` is kept as it is:
the weights carry exactly ``vocab_size`` rows (the rest of our code pads them with zero rows to the layout's
padded vocabulary, whose logits are masked), so the tokenizer the run uses must have exactly that many ids.

Other model types are looked up in :data:`IMPORTERS` (``model_type`` -> function ``(hf_state_dict, hf_config) ->
(our_state_dict, our_model_config)``), where other families register theirs: ``mega`` (transformers 4.x's
``MegaForCausalLM`` -> ``model.arch=mega``) is :func:`megatron_ext.inference.hf_import_mega.mega_from_hf`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from megatron_ext.checkpoint.safe_load import load_untrusted
from megatron_ext.errors import CheckpointError, ConfigError
from megatron_ext.inference.hf_import_mega import mega_from_hf

CONFIG_MAX_BYTES = 1 << 20
INDEX_MAX_BYTES = 64 << 20
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

#: model_type -> (causal-LM class names accepted in ``architectures``, expected-shapes function or None, converter)
IMPORTERS: Dict[str, Tuple[Tuple[str, ...], Optional[Callable], Callable]] = {}


def register_importer(model_type: str, architectures, convert: Callable, expected: Optional[Callable] = None) -> None:
    """Add a ``model_type``: ``convert(hf_state_dict, hf_config) -> (our_state_dict, our_model_config)`` (the
    family follows from the model config: ``models.families``); ``expected(hf_config, where) -> {hf name: shape}``
    (optional) lets the reader check names and shapes before any tensor is loaded -- with it, ``convert`` is called
    as ``convert(hf_state_dict, hf_config, where)`` (``where``: the config.json path, for messages)."""
    IMPORTERS[str(model_type)] = (tuple(architectures), expected, convert)


# ---------------------------------------------------------------------------------------------------- config
def read_hf_config(hf_dir: str, key: str = "--input") -> Dict[str, Any]:
    """``hf_dir/config.json`` as a dict (checked: a directory, the file, JSON object, at most 1 MiB)."""
    if not os.path.exists(hf_dir):
        raise ConfigError(f"{key} {hf_dir}: no such directory (expected a local Hugging Face model directory)")
    if not os.path.isdir(hf_dir):
        raise ConfigError(f"{key} {hf_dir}: not a directory (expected a local Hugging Face model directory with "
                          f"config.json and model.safetensors / pytorch_model.bin)")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{key} {hf_dir}: no config.json (expected a Hugging Face model directory saved with "
                          f"save_pretrained)")
    cfg = _read_json(path, CONFIG_MAX_BYTES)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return cfg


def _read_json(path: str, cap: int) -> Any:
    size = os.path.getsize(path)
    if size > cap:
        raise CheckpointError(f"{path}: refused: {size} bytes (a Hugging Face {os.path.basename(path)} is at most "
                              f"{cap} bytes here)")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


class _Cfg:
    """Typed reads of config.json values; every error names ``config.json``'s key."""

    def __init__(self, cfg: Dict[str, Any], where: str):
        self.cfg, self.where = cfg, where

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.where}: {key}={self.cfg.get(key)!r}: {msg}")

    def int(self, key: str, default: Any = None, minimum: int = 1) -> int:
        v = self.cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self.fail(key, f"expected an integer >= {minimum}")
        return int(v)

    def float(self, key: str, default: Any = None, positive: bool = True) -> float:
        v = self.cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            raise self.fail(key, "expected a positive number" if positive else "expected a number")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.cfg.get(key, default)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.fail(key, "expected true or false")
        return v

    def require(self, key: str, want: Any, default: Any, why: str) -> None:
        v = self.cfg.get(key, default)
        if v is None:
            v = default
        if v != want:
            raise self.fail(key, f"not supported ({why}); expected {json.dumps(want)}")


def _check_arch(cfg: Dict[str, Any], classes: Tuple[str, ...], where: str) -> None:
    arch = cfg.get("architectures")
    if arch is None:
        return
    if not isinstance(arch, list) or not arch or not all(isinstance(a, str) for a in arch):
        raise ConfigError(f"{where}: architectures={arch!r}: expected a list of class names")
    bad = [a for a in arch if a not in classes]
    if bad:
        raise ConfigError(f"{where}: architectures={arch!r}: {bad[0]} cannot be imported for model_type="
                          f"{cfg.get('model_type')!r} (supported: {', '.join(classes)})")


# ---------------------------------------------------------------------------------------------------- GPT-2
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def gpt2_model_config(cfg: Dict[str, Any], where: str = "config.json") -> Dict[str, Any]:
    """``GPT2Config`` values -> our ``model.*`` keys (refusing what our model does not implement)."""
    c = _Cfg(cfg, where)
    h, nh, layers = c.int("n_embd"), c.int("n_head"), c.int("n_layer")
    if h % nh:
        raise c.fail("n_embd", f"must be divisible by n_head={nh}")
    act = cfg.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise c.fail("activation_function", f"not supported; expected one of {', '.join(GPT2_ACTIVATIONS)}")
    c.require("scale_attn_weights", True, True, "our attention always scales scores by 1/sqrt(head_dim)")
    c.require("scale_attn_by_inverse_layer_idx", False, False, "our attention has no per-layer score scaling")
    c.require("add_cross_attention", False, False, "a decoder-only model has no cross-attention")
    ffn = cfg.get("n_inner")
    ffn = 4 * h if ffn is None else c.int("n_inner")
    return {
        "num_layers": layers, "hidden_size": h, "num_attention_heads": nh, "ffn_hidden_size": ffn,
        "max_position_embeddings": c.int("n_positions"), "position_embedding_type": "learned_absolute",
        "normalization": "layernorm", "layernorm_epsilon": c.float("layer_norm_epsilon", 1e-5),
        "activation": GPT2_ACTIVATIONS[act], "bias": True,
        "share_embeddings_and_output_weights": c.bool("tie_word_embeddings", True),
        "hidden_dropout": c.float("resid_pdrop", 0.1, positive=False),
        "attention_dropout": c.float("attn_pdrop", 0.1, positive=False),
        "init_method_std": c.float("initializer_range", 0.02),
    }


def gpt2_expected(cfg: Dict[str, Any], where: str = "config.json") -> Dict[str, Tuple[int, ...]]:
    mc = gpt2_model_config(cfg, where)
    h, ffn, V = mc["hidden_size"], mc["ffn_hidden_size"], _vocab(cfg, where)
    out = {"transformer.wte.weight": (V, h), "transformer.wpe.weight": (mc["max_position_embeddings"], h),
           "transformer.ln_f.weight": (h,), "transformer.ln_f.bias": (h,)}
    for i in range(mc["num_layers"]):
        q = f"transformer.h.{i}."
        out.update({q + "ln_1.weight": (h,), q + "ln_1.bias": (h,), q + "attn.c_attn.weight": (h, 3 * h),
                    q + "attn.c_attn.bias": (3 * h,), q + "attn.c_proj.weight": (h, h), q + "attn.c_proj.bias": (h,),
                    q + "ln_2.weight": (h,), q + "ln_2.bias": (h,), q + "mlp.c_fc.weight": (h, ffn),
                    q + "mlp.c_fc.bias": (ffn,), q + "mlp.c_proj.weight": (ffn, h), q + "mlp.c_proj.bias": (h,)})
    if not mc["share_embeddings_and_output_weights"]:
        out["lm_head.weight"] = (V, h)
    return out


def _vocab(cfg: Dict[str, Any], where: str) -> int:
    return _Cfg(cfg, where).int("vocab_size")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int,
             head_dim: int) -> torch.Tensor:
    """q ``[heads*hd, ...]``, k / v ``[groups*hd, ...]`` -> our fused QKV rows: for each query group, its
    ``heads/groups`` query heads, its key head, its value head (megatron-core's layout)."""
    rest = q.shape[1:]
    per = heads // groups
    qg = q.reshape(groups, per * head_dim, *rest)
    kg = k.reshape(groups, head_dim, *rest)
    vg = v.reshape(groups, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape((heads + 2 * groups) * head_dim, *rest).contiguous()


def gpt2_from_hf(sd: Dict[str, torch.Tensor], cfg: Dict[str, Any], where: str = "config.json"):
    """GPT2LMHeadModel weights -> (our GPTModel state dict, our model config)."""
    mc = gpt2_model_config(cfg, where)
    h, nh = mc["hidden_size"], mc["num_attention_heads"]
    hd = h // nh
    W = _Take(sd, gpt2_expected(cfg, where))
    out = {"embedding.word_embeddings.weight": W("transformer.wte.weight"),
           "embedding.position_embeddings.weight": W("transformer.wpe.weight")}
    for i in range(mc["num_layers"]):
        p, q = f"decoder.layers.{i}.", f"transformer.h.{i}."
        out[p + "input_layernorm.weight"] = W(q + "ln_1.weight")
        out[p + "input_layernorm.bias"] = W(q + "ln_1.bias")
        cw = W(q + "attn.c_attn.weight").t()  # [3h, h]: rows [q | k | v]
        cb = W(q + "attn.c_attn.bias")
        out[p + "self_attention.linear_qkv.weight"] = fuse_qkv(*cw.chunk(3, dim=0), nh, nh, hd)
        out[p + "self_attention.linear_qkv.bias"] = fuse_qkv(*cb.chunk(3, dim=0), nh, nh, hd)
        out[p + "self_attention.linear_proj.weight"] = W(q + "attn.c_proj.weight").t().contiguous()
        out[p + "self_attention.linear_proj.bias"] = W(q + "attn.c_proj.bias")
        out[p + "pre_mlp_layernorm.weight"] = W(q + "ln_2.weight")
        out[p + "pre_mlp_layernorm.bias"] = W(q + "ln_2.bias")
        out[p + "mlp.linear_fc1.weight"] = W(q + "mlp.c_fc.weight").t().contiguous()
        out[p + "mlp.linear_fc1.bias"] = W(q + "mlp.c_fc.bias")
        out[p + "mlp.linear_fc2.weight"] = W(q + "mlp.c_proj.weight").t().contiguous()
        out[p + "mlp.linear_fc2.bias"] = W(q + "mlp.c_proj.bias")
    out["decoder.final_layernorm.weight"] = W("transformer.ln_f.weight")
    out["decoder.final_layernorm.bias"] = W("transformer.ln_f.bias")
    if not mc["share_embeddings_and_output_weights"]:
        out["output_layer.weight"] = W("lm_head.weight")
    W.finish()
    return out, mc


# ---------------------------------------------------------------------------------------------------- Llama
def llama_model_config(cfg: Dict[str, Any], where: str = "config.json") -> Dict[str, Any]:
    """``LlamaConfig`` values -> our ``model.*`` keys (refusing what our model does not implement)."""
    c = _Cfg(cfg, where)
    h, nh, layers = c.int("hidden_size"), c.int("num_attention_heads"), c.int("num_hidden_layers")
    if h % nh:
        raise c.fail("hidden_size", f"must be divisible by num_attention_heads={nh}")
    ng = nh if cfg.get("num_key_value_heads") is None else c.int("num_key_value_heads")
    if nh % ng:
        raise c.fail("num_key_value_heads", f"must divide num_attention_heads={nh}")
    if cfg.get("head_dim") is not None and c.int("head_dim") != h // nh:
        raise c.fail("head_dim", f"not supported: our attention has head_dim = hidden_size / num_attention_heads = "
                                 f"{h // nh}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise c.fail("hidden_act", "not supported: our gated MLP is SwiGLU; expected \"silu\"")
    c.require("pretraining_tp", 1, 1, "a tensor-parallel split of the projections at pretraining time")
    if cfg.get("rope_scaling") is not None:
        raise c.fail("rope_scaling", "not supported: our rotary embedding has no scaling; expected null")
    theta = None
    rp = cfg.get("rope_parameters")
    if rp is not None:
        if not isinstance(rp, dict):
            raise c.fail("rope_parameters", "expected an object")
        if rp.get("rope_type", "default") != "default":
            raise ConfigError(f"{where}: rope_parameters.rope_type={rp.get('rope_type')!r}: not supported (our "
                              f"rotary embedding has no scaling); expected \"default\"")
        theta = _Cfg(rp, where + " rope_parameters").float("rope_theta", cfg.get("rope_theta", 10000.0))
    if theta is None:
        theta = c.float("rope_theta", 10000.0)
    attn_bias, mlp_bias = c.bool("attention_bias", False), c.bool("mlp_bias", False)
    if attn_bias != mlp_bias:
        raise ConfigError(f"{where}: attention_bias={attn_bias} with mlp_bias={mlp_bias}: not supported (our "
                          f"model.bias puts biases on all four projections or none); expected the two equal")
    for key in ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key) is not None:
            raise c.fail(key, "not supported by our attention; expected null")
    mc = {
        "num_layers": layers, "hidden_size": h, "num_attention_heads": nh,
        "ffn_hidden_size": c.int("intermediate_size"),
        "max_position_embeddings": c.int("max_position_embeddings", 2048), "position_embedding_type": "rope",
        "rotary_base": theta, "normalization": "rmsnorm", "layernorm_epsilon": c.float("rms_norm_eps", 1e-6),
        "activation": "swiglu", "bias": attn_bias,
        "share_embeddings_and_output_weights": c.bool("tie_word_embeddings", False),
        "hidden_dropout": 0.0, "attention_dropout": c.float("attention_dropout", 0.0, positive=False),
        "init_method_std": c.float("initializer_range", 0.02),
    }
    if ng != nh:
        mc["num_query_groups"] = ng
    return mc


def llama_expected(cfg: Dict[str, Any], where: str = "config.json") -> Dict[str, Tuple[int, ...]]:
    mc = llama_model_config(cfg, where)
    h, nh, ffn, V = mc["hidden_size"], mc["num_attention_heads"], mc["ffn_hidden_size"], _vocab(cfg, where)
    hd = h // nh
    kv = mc.get("num_query_groups", nh) * hd
    out = {"model.embed_tokens.weight": (V, h), "model.norm.weight": (h,)}
    for i in range(mc["num_layers"]):
        q = f"model.layers.{i}."
        out.update({q + "input_layernorm.weight": (h,), q + "post_attention_layernorm.weight": (h,),
                    q + "self_attn.q_proj.weight": (h, h), q + "self_attn.k_proj.weight": (kv, h),
                    q + "self_attn.v_proj.weight": (kv, h), q + "self_attn.o_proj.weight": (h, h),
                    q + "mlp.gate_proj.weight": (ffn, h), q + "mlp.up_proj.weight": (ffn, h),
                    q + "mlp.down_proj.weight": (h, ffn)})
        if mc["bias"]:
            out.update({q + "self_attn.q_proj.bias": (h,), q + "self_attn.k_proj.bias": (kv,),
                        q + "self_attn.v_proj.bias": (kv,), q + "self_attn.o_proj.bias": (h,),
                        q + "mlp.gate_proj.bias": (ffn,), q + "mlp.up_proj.bias": (ffn,),
                        q + "mlp.down_proj.bias": (h,)})
    if not mc["share_embeddings_and_output_weights"]:
        out["lm_head.weight"] = (V, h)
    return out


def llama_from_hf(sd: Dict[str, torch.Tensor], cfg: Dict[str, Any], where: str = "config.json"):
    """LlamaForCausalLM weights -> (our GPTModel state dict, our model config)."""
    mc = llama_model_config(cfg, where)
    h, nh = mc["hidden_size"], mc["num_attention_heads"]
    ng, hd = mc.get("num_query_groups", nh), h // nh
    W = _Take(sd, llama_expected(cfg, where))
    out = {"embedding.word_embeddings.weight": W("model.embed_tokens.weight")}
    for i in range(mc["num_layers"]):
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = W(q + "input_layernorm.weight")
        a = q + "self_attn."
        out[p + "self_attention.linear_qkv.weight"] = fuse_qkv(W(a + "q_proj.weight"), W(a + "k_proj.weight"),
                                                               W(a + "v_proj.weight"), nh, ng, hd)
        out[p + "self_attention.linear_proj.weight"] = W(a + "o_proj.weight")
        out[p + "pre_mlp_layernorm.weight"] = W(q + "post_attention_layernorm.weight")
        m = q + "mlp."
        out[p + "mlp.linear_fc1.weight"] = torch.cat([W(m + "gate_proj.weight"), W(m + "up_proj.weight")], dim=0)
        out[p + "mlp.linear_fc2.weight"] = W(m + "down_proj.weight")
        if mc["bias"]:
            out[p + "self_attention.linear_qkv.bias"] = fuse_qkv(W(a + "q_proj.bias"), W(a + "k_proj.bias"),
                                                                 W(a + "v_proj.bias"), nh, ng, hd)
            out[p + "self_attention.linear_proj.bias"] = W(a + "o_proj.bias")
            out[p + "mlp.linear_fc1.bias"] = torch.cat([W(m + "gate_proj.bias"), W(m + "up_proj.bias")], dim=0)
            out[p + "mlp.linear_fc2.bias"] = W(m + "down_proj.bias")
    out["decoder.final_layernorm.weight"] = W("model.norm.weight")
    if not mc["share_embeddings_and_output_weights"]:
        out["output_layer.weight"] = W("lm_head.weight")
    W.finish()
    return out, mc


class _Take:
    """Pops HF tensors by name, as fp32 (shapes were checked against ``expected`` when the files were read)."""

    def __init__(self, sd: Dict[str, torch.Tensor], expected: Dict[str, Tuple[int, ...]]):
        self.sd, self.expected = dict(sd), expected
        _check_names_shapes({k: tuple(v.shape) for k, v in sd.items()}, expected, "the state dict")

    def __call__(self, name: str) -> torch.Tensor:
        return self.sd.pop(name).detach().to(torch.float32).contiguous()

    def finish(self) -> None:
        if self.sd:
            raise CheckpointError(f"tensors not used by the import: {', '.join(sorted(self.sd)[:5])}")


register_importer("gpt2", ("GPT2LMHeadModel", "GPT2Model"), gpt2_from_hf, gpt2_expected)
register_importer("llama", ("LlamaForCausalLM", "LlamaModel"), llama_from_hf, llama_expected)
# transformers 4.x's Mega (megatron_ext/inference/hf_import_mega.py: the mapping, and its own refusal of
# MegaForMaskedLM naming why)
register_importer("mega", ("MegaForCausalLM", "MegaForMaskedLM"), mega_from_hf)


# ---------------------------------------------------------------------------------------------------- weights
#: buffers some saved files carry that are recomputed by the model (skipped, never used)
_SKIP_SUFFIXES = {"gpt2": (".attn.bias", ".attn.masked_bias"), "llama": (".rotary_emb.inv_freq",)}
#: the prefix of the base model's names inside the causal-LM class (files saved from the base class lack it)
_BASE_PREFIX = {"gpt2": "transformer.", "llama": "model."}


def _normalize_names(names: List[str], model_type: str) -> Dict[str, str]:
    """file name -> canonical causal-LM name (``None`` entries: buffers to skip)."""
    prefix = _BASE_PREFIX.get(model_type)
    skip = _SKIP_SUFFIXES.get(model_type, ())
    add = prefix is not None and not any(n.startswith(prefix) for n in names)
    out = {}
    for n in names:
        if skip and n.endswith(skip):
            out[n] = None
        elif add and n != "lm_head.weight":
            out[n] = prefix + n
        else:
            out[n] = n
    return out


def _check_names_shapes(have: Dict[str, Tuple[int, ...]], expected: Dict[str, Tuple[int, ...]], where: str,
                        optional: Optional[Dict[str, Tuple[int, ...]]] = None) -> None:
    """Every ``expected`` name present with its shape, nothing else but ``optional`` names (with their shapes)."""
    optional = optional or {}
    for k, shape in optional.items():
        if k in have and tuple(have[k]) != tuple(shape):
            raise CheckpointError(f"{where}: tensor {k} has shape {list(have[k])}, expected {list(shape)} from "
                                  f"config.json")
    have = {k: v for k, v in have.items() if k not in optional}
    missing = [k for k in expected if k not in have]
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]} (expected by config.json"
                              f"{f'; {len(missing)} missing in all' if len(missing) > 1 else ''})")
    extra = [k for k in have if k not in expected]
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]} (config.json describes no such weight"
                              f"{f'; {len(extra)} unexpected in all' if len(extra) > 1 else ''})")
    for k, shape in expected.items():
        if tuple(have[k]) != tuple(shape):
            raise CheckpointError(f"{where}: tensor {k} has shape {list(have[k])}, expected {list(shape)} from "
                                  f"config.json")


def _shard_path(hf_dir: str, name: Any, index: str) -> str:
    """A shard named in an index: a plain file name that stays inside ``hf_dir`` (symlinks resolved)."""
    if (not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..")
            or os.path.isabs(name) or "\x00" in name):
        raise CheckpointError(f"{index}: refused: shard {name!r} is not a file name inside the model directory")
    path = os.path.join(hf_dir, name)
    root = os.path.realpath(hf_dir)
    real = os.path.realpath(path)
    if os.path.dirname(real) != root and not real.startswith(root + os.sep):
        raise CheckpointError(f"{index}: refused: shard {name!r} leads outside the model directory ({real})")
    if not os.path.isfile(path):
        raise CheckpointError(f"{index}: shard {name!r} not found in {hf_dir}")
    return path


def weight_files(hf_dir: str) -> Tuple[str, List[str]]:
    """(``"safetensors"`` | ``"bin"``, the files to read): the single file or the shards of its index."""
    for name in WEIGHT_FILES:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            continue
        kind = "safetensors" if ".safetensors" in name else "bin"
        if not name.endswith(".index.json"):
            _shard_path(hf_dir, name, hf_dir)
            return kind, [path]
        index = _read_json(path, INDEX_MAX_BYTES)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{path}: expected an object with a non-empty 'weight_map'")
        shards = []
        for tensor, shard in wm.items():
            p = _shard_path(hf_dir, shard, path)
            if p not in shards:
                shards.append(p)
        return kind, shards
    raise CheckpointError(f"{hf_dir}: no weights (expected one of {', '.join(WEIGHT_FILES)})")


def read_hf_state_dict(hf_dir: str, model_type: str = "", expected: Optional[Dict[str, Tuple[int, ...]]] = None,
                       optional: Optional[Dict[str, Tuple[int, ...]]] = None) -> Dict[str, torch.Tensor]:
    """The weights of ``hf_dir`` by canonical causal-LM name. ``expected`` ({name: shape}, plus ``optional`` names
    that may be there): checked before any tensor is read from safetensors files (for ``.bin`` after loading, as
    its names live in the pickle)."""
    kind, files = weight_files(hf_dir)
    if kind == "safetensors":
        from safetensors import SafetensorError, safe_open

        headers: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
        for f in files:
            try:
                with safe_open(f, framework="pt") as st:
                    for k in st.keys():
                        if k in headers:
                            raise CheckpointError(f"{f}: tensor {k} also in {headers[k][0]}")
                        headers[k] = (f, tuple(st.get_slice(k).get_shape()))
            except SafetensorError as e:
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
        names = _normalize_names(list(headers), model_type)
        if expected is not None:
            _check_names_shapes({names[k]: s for k, (_, s) in headers.items() if names[k]}, expected, hf_dir,
                                optional)
        out = {}
        for f in files:
            try:
                with safe_open(f, framework="pt") as st:
                    for k in st.keys():
                        if names[k]:
                            out[names[k]] = st.get_tensor(k)
            except SafetensorError as e:
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
        return out
    raw: Dict[str, torch.Tensor] = {}
    for f in files:
        sd = load_untrusted(f, "Hugging Face weights file")
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in sd.items()):
            raise CheckpointError(f"{f}: expected a dict of tensor name -> tensor")
        for k, v in sd.items():
            if k in raw:
                raise CheckpointError(f"{f}: tensor {k} appears in two shards")
            raw[k] = v
    names = _normalize_names(list(raw), model_type)
    out = {names[k]: v for k, v in raw.items() if names[k]}
    if expected is not None:
        _check_names_shapes({k: tuple(v.shape) for k, v in out.items()}, expected, hf_dir, optional)
    return out


# ---------------------------------------------------------------------------------------------------- import
_EMBEDDING = {"gpt2": "transformer.wte.weight", "llama": "model.embed_tokens.weight"}


def _tied(cfg: Dict[str, Any], model_type: str) -> bool:
    v = cfg.get("tie_word_embeddings")
    return (model_type == "gpt2") if v is None else bool(v)


def _tied_head(sd: Dict[str, torch.Tensor], cfg: Dict[str, Any], model_type: str, where: str) -> None:
    """A tied model's file may still hold ``lm_head.weight`` (a copy of the embedding): dropped when equal."""
    emb = _EMBEDDING.get(model_type)
    if emb and _tied(cfg, model_type) and "lm_head.weight" in sd:
        head = sd.pop("lm_head.weight")
        if emb in sd and (head.shape != sd[emb].shape or not torch.equal(head, sd[emb])):
            raise CheckpointError(f"{where}: tie_word_embeddings=true but lm_head.weight differs from {emb}")


def import_from_hf(hf_dir: str, key: str = "--input") -> Dict[str, Any]:
    """A local Hugging Face model directory -> the consolidated dict (``state_dict`` with our names, fp32,
    ``vocab_size`` rows; ``vocab_size``; ``model_config``: our ``model.*`` keys; ``family``; ``source``)."""
    cfg = read_hf_config(hf_dir, key)
    where = os.path.join(hf_dir, "config.json")
    mt = cfg.get("model_type")
    if mt not in IMPORTERS:
        raise ConfigError(f"{where}: model_type={mt!r}: cannot be imported (supported: "
                          f"{', '.join(sorted(IMPORTERS))})")
    classes, expected_fn, convert = IMPORTERS[mt]
    _check_arch(cfg, classes, where)
    vocab = _vocab(cfg, where)
    expected = expected_fn(cfg, where) if expected_fn is not None else None
    optional = None
    emb = _EMBEDDING.get(mt)
    if expected is not None and emb in expected and _tied(cfg, mt):
        optional = {"lm_head.weight": expected[emb]}  # a tied file may carry a copy of the embedding (compared)
    sd = read_hf_state_dict(hf_dir, mt, expected, optional)
    _tied_head(sd, cfg, mt, hf_dir)
    try:
        our_sd, mc = convert(sd, cfg, where) if expected_fn is not None else convert(sd, cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{hf_dir}: {e}") from None
    return {"format": "megatron_ext.consolidated.v1", "state_dict": our_sd, "vocab_size": vocab,
            "model_config": mc, "step": 0, "consumed_samples": 0, "family": _family(mc),
            "source": {"path": os.path.abspath(hf_dir), "hf_model_type": mt,
                       "hf_architectures": cfg.get("architectures"), "tp": 1, "pp": 1, "dp": 1, "zero_stage": 0,
                       "precision": "32"}}


def _family(mc: Dict[str, Any]) -> str:
    from megatron_ext.models.families import family_of_config  # start-up cost: model stack

    return family_of_config(mc).name


__all__ = ["IMPORTERS", "register_importer", "read_hf_config", "read_hf_state_dict", "weight_files",
           "import_from_hf", "gpt2_from_hf", "llama_from_hf", "gpt2_model_config", "llama_model_config",
           "fuse_qkv"]

"""Hugging Face Mega <-> our Mega language model (``model.arch=mega``, ``megatron_ext.models.mega_lm.MegaGPTModel``).

    sd, hf_config = read_hf_dir("hf_mega_dir")                  # safetensors / .bin, sharded or not; no download
    our_sd, model_cfg = mega_from_hf(sd, hf_config)              # the consolidated form: fp32, our names, model.*
    hf_sd, hf_cfg = mega_to_hf(our_sd, model_cfg, vocab_size)    # and back: HF names, config.json fields
    write_hf_mega_dir("out_dir", hf_sd, hf_cfg)                  # config.json + model.safetensors (transformers 4.x)

Source: ``transformers``' ``MegaForCausalLM`` (``model_type: mega``; removed from transformers 5 with the other
deprecated models, so the exported directory loads in transformers 4.x only, e.g. 4.39). Our ``MegaGPTModel`` is
built from the same layers as HF's (``megatron_ext.models.hf_mega`` follows ``modeling_mega``), so the mapping is a
renaming plus three LM-head keys of ours that say what HF's causal LM has around the layers:

* ``model.mega.final_norm=false``: HF's ``MegaModel`` ends without a norm (our pre-norm stacks add one by default);
* ``model.mega.lm_hidden_dense_layer`` = HF ``add_lm_hidden_dense_layer`` (``dense`` -> ``lm_dense``, then tanh);
* ``model.mega.lm_head_bias=true``: HF's ``lm_head`` always has a bias (``lm_head.bias`` -> ``output_layer.bias``).

Names (HF ``mega.layers.{i}.`` = ours ``decoder.mega.layers.{i}.``): the EMA's ``damping_factor``,
``decay_factor``, ``ema_expansion_matrix``, ``kernel_projection_matrix``, ``residual_weight`` are our ``ema.delta``,
``alpha``, ``beta``, ``gamma``, ``omega``; HF's norm wrapper ``norm.norm.X`` is our ``norm.X`` (``scalar`` of the
scale norm is our ``weight``; batch norms keep ``norm.norm.X``); the rotary bias's ``alpha`` / ``b_param`` ``[1, Z]``
are our ``alpha`` / ``beta`` ``[Z]``; HF's ``_float_tensor`` buffer (a constant) is dropped and written back as
``[0.0]``. transformers' simple relative bias with ``chunk_size >= 0`` reads its vector around ``chunk_size - 1``
(not ``max_positions - 1``), so ours gets ``max_positions = chunk_size`` and the ``2 * chunk_size - 1`` entries HF
reads (the others are never used; such a model therefore exports back with ``max_positions = chunk_size`` and the
shorter vector -- the same function, not the same tensor).

Refused, naming the HF key (our Mega LM has no equivalent): ``add_token_type_embeddings``, ``add_cross_attention``
(a decoder of an encoder-decoder), ``is_decoder=false`` / ``bidirectional=true`` (not causal: HF would run a
non-causal EMA), ``normalization_type=rmsnorm`` (HF's RMS norm only multiplies by its weight, ours normalizes),
dropout probabilities that differ from each other (ours has one ``hidden_dropout``), an ``activation`` outside ours.
``MegaForMaskedLM`` (an encoder) is refused: no encoder-only model exists here to put it in (the BART Mega encoder
comes with a decoder and its own embeddings; see README).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Optional, Tuple

import torch

from megatron_ext.checkpoint.safe_load import load_untrusted
from megatron_ext.config.model_validation import MEGA_ACTIVATIONS, MEGA_ATTENTION_ACTIVATIONS
from megatron_ext.errors import CheckpointError, ConfigError

#: largest config.json / index JSON read (bytes)
MAX_JSON_BYTES = 4 << 20
#: largest weight file accepted (bytes); bigger ones are refused before reading
MAX_WEIGHTS_BYTES = 64 << 30

HF_ARCH = "MegaForCausalLM"

_EMA = {"damping_factor": "delta", "decay_factor": "alpha", "ema_expansion_matrix": "beta",
        "kernel_projection_matrix": "gamma", "residual_weight": "omega"}
_EMA_BACK = {v: k for k, v in _EMA.items()}
_DROPOUTS = ("dropout_prob", "hidden_dropout_prob", "nffn_activation_dropout_prob")


# ---------------------------------------------------------------------------------------------- reading a directory
def _read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no {what} (expected a Hugging Face model directory)")
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {size} bytes, more than the {MAX_JSON_BYTES} a {what} may have")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _inside(hf_dir: str, name: Any, where: str) -> str:
    """``hf_dir/name`` for a file name read from an index, refused unless it stays inside ``hf_dir``."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name or \
            any(part in ("", "..") for part in name.split("/")):
        raise CheckpointError(f"{where}: shard name {name!r} is not a plain file name inside the directory")
    root = os.path.realpath(hf_dir)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise CheckpointError(f"{where}: shard {name!r} points outside {hf_dir}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{where}: shard {name!r} does not exist")
    return path


def _load_file(path: str) -> Dict[str, torch.Tensor]:
    size = os.path.getsize(path)
    if size > MAX_WEIGHTS_BYTES:
        raise CheckpointError(f"{path}: {size} bytes, more than the {MAX_WEIGHTS_BYTES} accepted")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    sd = load_untrusted(path, "Hugging Face weights file")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return sd


def read_hf_dir(hf_dir: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, config.json) of a local Hugging Face directory: ``model.safetensors``, a sharded
    ``model.safetensors.index.json``, or ``pytorch_model.bin`` / its index (read without running pickled code)."""
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"--input {hf_dir}: not a directory (expected a Hugging Face model directory)")
    config = _read_json(os.path.join(hf_dir, "config.json"), "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{hf_dir}/config.json: expected a JSON object")
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(hf_dir, single)):
            return _load_file(os.path.join(hf_dir, single)), config
        ipath = os.path.join(hf_dir, index)
        if os.path.isfile(ipath):
            idx = _read_json(ipath, index)
            wmap = idx.get("weight_map") if isinstance(idx, dict) else None
            if not isinstance(wmap, dict) or not wmap:
                raise CheckpointError(f"{ipath}: expected a non-empty 'weight_map' object")
            sd: Dict[str, torch.Tensor] = {}
            for shard in sorted(set(wmap.values()), key=str):
                part = _load_file(_inside(hf_dir, shard, ipath))
                for k, v in part.items():
                    if wmap.get(k) == shard:
                        sd[k] = v
            missing = sorted(k for k in wmap if k not in sd)
            if missing:
                raise CheckpointError(f"{ipath}: {len(missing)} tensor(s) of the index are not in their shard "
                                      f"(first: {missing[0]})")
            return sd, config
    raise CheckpointError(f"{hf_dir}: no weights (expected model.safetensors, model.safetensors.index.json, "
                          f"pytorch_model.bin or pytorch_model.bin.index.json)")


# ---------------------------------------------------------------------------------------------- HF -> ours
def _refuse(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"config.json {key}={value!r}: {why}")


def _bool(cfg: Dict[str, Any], key: str, default: bool) -> bool:
    v = cfg.get(key, default)
    if not isinstance(v, bool):
        _refuse(key, v, "expected true or false")
    return v


def _int(cfg: Dict[str, Any], key: str, default: Any = None) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        _refuse(key, v, "expected a positive integer")
    return v


def check_hf_config(hf_config: Dict[str, Any]) -> None:
    """Refuse what our Mega language model cannot reproduce, naming the HF key."""
    c = hf_config
    if c.get("model_type") != "mega":
        _refuse("model_type", c.get("model_type"), "expected 'mega'")
    archs = c.get("architectures") or [HF_ARCH]
    if archs != [HF_ARCH]:
        if "MegaForMaskedLM" in archs:
            _refuse("architectures", archs, "MegaForMaskedLM is an encoder and megatron_ext has no encoder-only "
                                            "model to load it into (the BART Mega encoder comes with a decoder and "
                                            "its own embeddings); only MegaForCausalLM is imported")
        _refuse("architectures", archs, f"expected [{HF_ARCH!r}]")
    if not _bool(c, "is_decoder", False):
        _refuse("is_decoder", c.get("is_decoder", False), "a causal language model must be a decoder (with false "
                                                           "transformers runs non-causal attention)")
    if _bool(c, "bidirectional", True):
        _refuse("bidirectional", c.get("bidirectional", True), "a causal language model needs a causal EMA "
                                                               "(transformers runs a bidirectional one)")
    for key, why in (("add_token_type_embeddings", "our Mega LM has no token-type embeddings"),
                     ("add_cross_attention", "cross-attention belongs to an encoder-decoder's decoder; our Mega LM "
                                             "is decoder-only")):
        if _bool(c, key, False):
            _refuse(key, True, why)
    norm = str(c.get("normalization_type", "scalenorm")).lower()
    if norm == "rmsnorm":
        _refuse("normalization_type", norm, "transformers' Mega RMS norm only multiplies by its weight (it does not "
                                            "normalize); ours normalizes, so the logits would differ")
    if norm not in ("layernorm", "scalenorm", "batchnorm", "syncbatchnorm"):
        _refuse("normalization_type", norm, "expected layernorm, scalenorm, batchnorm or syncbatchnorm")
    act = str(c.get("activation", "silu")).lower()
    if act not in MEGA_ACTIVATIONS:
        _refuse("activation", act, f"expected one of {', '.join(MEGA_ACTIVATIONS)}")
    att = str(c.get("attention_activation", "softmax")).lower()
    if att not in MEGA_ATTENTION_ACTIVATIONS:
        _refuse("attention_activation", att, f"expected one of {', '.join(MEGA_ATTENTION_ACTIVATIONS)}")
    rel = str(c.get("relative_positional_bias", "rotary")).lower()
    if rel not in ("rotary", "simple"):
        _refuse("relative_positional_bias", rel, "expected rotary or simple")
    drops = {k: float(c.get(k, 0.1)) for k in _DROPOUTS}
    if len(set(drops.values())) > 1:
        _refuse("dropout_prob", drops, "our Mega has one dropout probability (model.hidden_dropout) for the three; "
                                       "set them equal in config.json")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "ema_projection_size",
                "shared_representation_size", "nffn_hidden_size", "max_positions"):
        _int(c, key)
    if c.get("truncation") is not None:
        _int(c, "truncation")
    if _bool(c, "use_chunking", False):
        _int(c, "chunk_size")


def simple_bias_window(hf_config: Dict[str, Any]) -> Optional[int]:
    """transformers' simple relative bias: the window it covers when ``chunk_size >= 0`` (whether or not
    ``use_chunking`` is on, it then indexes its ``2 * max_positions - 1`` vector around ``chunk_size - 1`` and refuses
    longer windows), else None (centred at ``max_positions - 1``, as ours)."""
    c = hf_config
    if str(c.get("relative_positional_bias", "rotary")).lower() != "simple":
        return None
    chunk = c.get("chunk_size", -1)
    if isinstance(chunk, bool) or not isinstance(chunk, int):
        _refuse("chunk_size", chunk, "expected an integer")
    if chunk < 0:
        return None
    if chunk == 0 or chunk > int(c["max_positions"]):
        _refuse("chunk_size", chunk, f"with relative_positional_bias=simple transformers reads the bias vector "
                                     f"around chunk_size - 1: expected 1..max_positions={c['max_positions']}")
    return chunk


def model_config_from_hf(hf_config: Dict[str, Any]) -> Dict[str, Any]:
    """Our ``model.*`` section (``model.arch=mega``) for an HF ``MegaForCausalLM`` config (checked first)."""
    check_hf_config(hf_config)
    c = hf_config
    max_pos = int(c["max_positions"])
    window = simple_bias_window(c)
    if window is not None:  # ours: a vector of 2 * window - 1 centred at window - 1 (the part HF reads)
        max_pos = window
    seq = max_pos if window is None or not c.get("use_chunking", False) else int(c["max_positions"])
    return {
        "arch": "mega",
        "num_layers": int(c["num_hidden_layers"]),
        "hidden_size": int(c["hidden_size"]),
        "seq_length": seq,
        "hidden_dropout": float(c.get("dropout_prob", 0.1)),
        "attention_dropout": float(c.get("attention_probs_dropout_prob", 0.1)),
        "init_method_std": float(c.get("initializer_range", 0.02)),
        "share_embeddings_and_output_weights": bool(c.get("tie_word_embeddings", True)),
        "mega": {
            "ema_projection_size": int(c["ema_projection_size"]),
            "shared_representation_size": int(c["shared_representation_size"]),
            "intermediate_size": int(c["intermediate_size"]),
            "bidirectional": False,
            "truncation": c.get("truncation"),
            "chunk_size": int(c["chunk_size"]) if c.get("use_chunking", False) else -1,
            "normalization_type": str(c.get("normalization_type", "scalenorm")).lower(),
            "normalize_before_mega": bool(c.get("normalize_before_mega", True)),
            "norm_affine": bool(c.get("norm_affine", True)),
            "activation": str(c.get("activation", "silu")).lower(),
            "attention_activation": str(c.get("attention_activation", "softmax")).lower(),
            "relative_positional_bias": str(c.get("relative_positional_bias", "rotary")).lower(),
            "max_positions": max_pos,
            "use_normalized_ffn": bool(c.get("use_normalized_ffn", True)),
            "nffn_hidden_size": int(c["nffn_hidden_size"]),
            "normalize_before_ffn": bool(c.get("normalize_before_ffn", True)),
            "use_feature_dropout": bool(c.get("use_feature_dropout", False)),
            "final_norm": False,
            "lm_hidden_dense_layer": bool(c.get("add_lm_hidden_dense_layer", True)),
            "lm_head_bias": True,
        },
    }


def _layer_name_from_hf(rest: str, norm_type: str) -> Optional[str]:
    """The part after ``mega.layers.{i}.`` -> ours (None: a constant HF buffer we drop)."""
    m = re.fullmatch(r"mega_layer\.ema_gate\.(\w+)", rest)
    if m:
        if m.group(1) not in _EMA:
            raise CheckpointError(f"unexpected Mega EMA tensor {rest!r}")
        return f"mega_layer.ema.{_EMA[m.group(1)]}"
    if rest.endswith("rel_pos_bias._float_tensor"):
        return None
    m = re.fullmatch(r"(.*)\.rel_pos_bias\.(alpha|b_param)", rest)
    if m:
        return f"{m.group(1)}.rel_pos_bias.{'alpha' if m.group(2) == 'alpha' else 'beta'}"
    m = re.fullmatch(r"(.*)\.norm\.norm\.(\w+)", rest)
    if m:
        if norm_type in ("batchnorm", "syncbatchnorm"):
            return rest
        return f"{m.group(1)}.norm.{'weight' if m.group(2) == 'scalar' else m.group(2)}"
    return rest


def mega_from_hf(hf_state_dict: Dict[str, torch.Tensor], hf_config: Dict[str, Any]
                 ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """HF ``MegaForCausalLM`` weights + ``config.json`` -> (our consolidated fp32 state dict, our ``model.*``
    config). Every HF tensor is used or is a known constant; a missing or unexpected one is an error naming it."""
    mcfg = model_config_from_hf(hf_config)
    norm_type = mcfg["mega"]["normalization_type"]
    tied = mcfg["share_embeddings_and_output_weights"]
    out: Dict[str, torch.Tensor] = {}
    for name, t in hf_state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{name}: not a tensor")
        t = t.detach().to(torch.float32) if t.is_floating_point() else t.detach().clone()
        m = re.fullmatch(r"mega\.layers\.(\d+)\.(.+)", name)
        if m:
            ours = _layer_name_from_hf(m.group(2), norm_type)
            if ours is None:
                continue
            if ours.endswith("rel_pos_bias.alpha") or ours.endswith("rel_pos_bias.beta"):
                t = t.reshape(-1)
            if ours.endswith("rel_pos_bias.rel_pos_bias") and simple_bias_window(hf_config) is not None:
                t = t[: 2 * simple_bias_window(hf_config) - 1]  # HF never reads the rest (see simple_bias_window)
            out[f"decoder.mega.layers.{m.group(1)}.{ours}"] = t.contiguous()
        elif name == "mega.embedding_layer.word_embeddings.weight":
            out["embedding.word_embeddings.weight"] = t.contiguous()
        elif name in ("dense.weight", "dense.bias"):
            if not mcfg["mega"]["lm_hidden_dense_layer"]:
                raise CheckpointError(f"{name}: present but config.json add_lm_hidden_dense_layer is false")
            out["lm_" + name] = t.contiguous()
        elif name == "lm_head.bias":
            out["output_layer.bias"] = t.contiguous()
        elif name == "lm_head.weight":
            if not tied:
                out["output_layer.weight"] = t.contiguous()
            elif not torch.equal(t.float(), hf_state_dict["mega.embedding_layer.word_embeddings.weight"].float()):
                raise CheckpointError("lm_head.weight differs from the word embeddings but config.json "
                                      "tie_word_embeddings is true")
        elif name.startswith("mega.pooler."):
            raise CheckpointError(f"{name}: a pooler is not part of a causal language model")
        else:
            raise CheckpointError(f"{name}: not a tensor of transformers' MegaForCausalLM")
    need = ["embedding.word_embeddings.weight", "output_layer.bias"]
    if not tied:
        need.append("output_layer.weight")
    if mcfg["mega"]["lm_hidden_dense_layer"]:
        need += ["lm_dense.weight", "lm_dense.bias"]
    missing = [k for k in need if k not in out]
    if missing:
        raise CheckpointError(f"the HF weights lack {missing[0]} (config.json says it exists)")
    V, D = int(hf_config["vocab_size"]), int(hf_config["hidden_size"])
    emb = out["embedding.word_embeddings.weight"]
    if tuple(emb.shape) != (V, D):
        raise CheckpointError(f"mega.embedding_layer.word_embeddings.weight has shape {tuple(emb.shape)}, "
                              f"config.json says vocab_size={V}, hidden_size={D}")
    layers = {int(re.match(r"decoder\.mega\.layers\.(\d+)\.", k).group(1)) for k in out if k.startswith("decoder.")}
    if layers != set(range(mcfg["num_layers"])):
        raise CheckpointError(f"the HF weights hold layers {sorted(layers)}, config.json num_hidden_layers="
                              f"{mcfg['num_layers']}")
    return out, mcfg


# ---------------------------------------------------------------------------------------------- ours -> HF
def _m(model_config: Dict[str, Any], key: str, default: Any = None) -> Any:
    mega = model_config.get("mega") or {}
    return mega.get(key, default)


def hf_config_from_model(model_config: Dict[str, Any], vocab_size: int, *, pad_token_id: Optional[int] = 1,
                         bos_token_id: Optional[int] = 0, eos_token_id: Optional[int] = 2) -> Dict[str, Any]:
    """``config.json`` of an HF ``MegaForCausalLM`` for our ``model.*`` (``model.arch=mega``); refuses what HF's
    model lacks, naming our key."""
    mc = model_config
    if str(mc.get("arch", "transformer")).lower() != "mega":
        raise ConfigError(f"model.arch={mc.get('arch')!r}: only model.arch=mega exports to HF MegaForCausalLM")
    prenorm = bool(_m(mc, "normalize_before_mega", True))
    if prenorm and bool(_m(mc, "final_norm", True)):
        raise ConfigError("model.mega.final_norm=true: transformers' MegaModel has no norm after its last layer, so "
                          "a pre-norm Mega LM trained with one cannot be exported (train with "
                          "model.mega.final_norm=false, as imported models are)")
    norm = str(_m(mc, "normalization_type", "scalenorm")).lower()
    if norm == "rmsnorm":
        raise ConfigError("model.mega.normalization_type=rmsnorm: transformers' Mega RMS norm does not normalize "
                          "(it only multiplies by its weight), so the export would compute something else")
    d = int(mc["hidden_size"])
    chunk = int(_m(mc, "chunk_size", -1))
    seq = int(mc.get("seq_length") or 2048)
    drop = float(mc.get("hidden_dropout", 0.0))
    return {
        "architectures": [HF_ARCH],
        "model_type": "mega",
        "vocab_size": int(vocab_size),
        "hidden_size": d,
        "num_hidden_layers": int(mc["num_layers"]),
        "intermediate_size": int(_m(mc, "intermediate_size") or 2 * d),
        "ema_projection_size": int(_m(mc, "ema_projection_size", 16)),
        "bidirectional": False,
        "shared_representation_size": int(_m(mc, "shared_representation_size", 64)),
        "use_chunking": chunk > 0,
        "chunk_size": chunk,
        "truncation": _m(mc, "truncation"),
        "normalize_before_mega": prenorm,
        "normalization_type": norm,
        "norm_affine": bool(_m(mc, "norm_affine", True)),
        "activation": str(_m(mc, "activation", "silu")).lower(),
        "attention_activation": str(_m(mc, "attention_activation", "softmax")).lower(),
        "dropout_prob": drop,
        "hidden_dropout_prob": drop,
        "attention_probs_dropout_prob": float(mc.get("attention_dropout", 0.0)),
        "use_feature_dropout": bool(_m(mc, "use_feature_dropout", False)),
        "use_normalized_ffn": bool(_m(mc, "use_normalized_ffn", True)),
        "nffn_hidden_size": int(_m(mc, "nffn_hidden_size") or 2 * d),
        "normalize_before_ffn": bool(_m(mc, "normalize_before_ffn", True)),
        "nffn_activation_dropout_prob": drop,
        "max_positions": int(_m(mc, "max_positions") or seq),
        "add_token_type_embeddings": False,
        "type_vocab_size": 2,
        "initializer_range": float(mc.get("init_method_std", 0.02)),
        "ema_delta_alpha_range": 0.2,  # init-only ranges: HF's defaults (ours are not configurable)
        "ema_beta_range": 0.02,
        "ema_gamma_omega_range": 1.0,
        "num_attention_heads": 1,
        "relative_positional_bias": str(_m(mc, "relative_positional_bias", "rotary")).lower(),
        "add_lm_hidden_dense_layer": bool(_m(mc, "lm_hidden_dense_layer", False)),
        "is_decoder": True,
        "add_cross_attention": False,
        "use_cache": True,
        "tie_word_embeddings": bool(mc.get("share_embeddings_and_output_weights", True)),
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
    }


def mega_to_hf(state_dict: Dict[str, torch.Tensor], model_config: Dict[str, Any], vocab_size: int, **token_ids
               ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Our consolidated Mega LM weights (vocabulary rows trimmed to ``vocab_size``) -> (HF ``MegaForCausalLM``
    state dict as ``save_pretrained`` writes it -- no ``lm_head.weight`` when tied --, ``config.json`` dict)."""
    cfg = hf_config_from_model(model_config, vocab_size, **token_ids)
    norm_type = cfg["normalization_type"]
    out: Dict[str, torch.Tensor] = {}
    V = int(vocab_size)
    for name, t in state_dict.items():
        t = t.detach().cpu()
        m = re.fullmatch(r"decoder\.mega\.layers\.(\d+)\.(.+)", name)
        if m:
            rest = m.group(2)
            e = re.fullmatch(r"mega_layer\.ema\.(\w+)", rest)
            if e:
                rest = f"mega_layer.ema_gate.{_EMA_BACK[e.group(1)]}"
            elif re.fullmatch(r"(.*)\.rel_pos_bias\.(alpha|beta)", rest):
                base, which = rest.rsplit(".", 1)
                out[f"mega.layers.{m.group(1)}.{base}._float_tensor"] = torch.zeros(1)
                rest = f"{base}.{'alpha' if which == 'alpha' else 'b_param'}"
                t = t.reshape(1, -1)
            elif norm_type not in ("batchnorm", "syncbatchnorm"):
                n = re.fullmatch(r"(.*)\.norm\.(weight|bias)", rest)
                if n:
                    leaf = "scalar" if norm_type == "scalenorm" and n.group(2) == "weight" else n.group(2)
                    rest = f"{n.group(1)}.norm.norm.{leaf}"
            out[f"mega.layers.{m.group(1)}.{rest}"] = t.contiguous()
        elif name == "embedding.word_embeddings.weight":
            out["mega.embedding_layer.word_embeddings.weight"] = t[:V].contiguous()
        elif name == "output_layer.weight":
            out["lm_head.weight"] = t[:V].contiguous()
        elif name == "output_layer.bias":
            out["lm_head.bias"] = t[:V].contiguous()
        elif name in ("lm_dense.weight", "lm_dense.bias"):
            out[name[len("lm_"):]] = t.contiguous()
        elif name.startswith("decoder.final_norm."):
            raise ConfigError(f"{name}: transformers' MegaModel has no final norm (model.mega.final_norm)")
        else:
            raise CheckpointError(f"{name}: not a parameter of our Mega language model")
    if "lm_head.bias" not in out:  # HF's lm_head always has a bias: ours had none (model.mega.lm_head_bias=false)
        out["lm_head.bias"] = torch.zeros(V)
    return out, cfg


def write_hf_mega_dir(out_dir: str, hf_state_dict: Dict[str, torch.Tensor], hf_config: Dict[str, Any],
                      dtype: torch.dtype = torch.float32) -> None:
    """``config.json`` + ``model.safetensors`` (+ ``generation_config.json``) in ``out_dir`` (created; files in it
    with those names are replaced -- the caller decides whether that is allowed)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    cfg = dict(hf_config, torch_dtype=str(dtype).replace("torch.", ""))
    save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in hf_state_dict.items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2, sort_keys=True)


__all__ = ["HF_ARCH", "read_hf_dir", "check_hf_config", "model_config_from_hf", "mega_from_hf",
           "hf_config_from_model", "mega_to_hf", "write_hf_mega_dir"]

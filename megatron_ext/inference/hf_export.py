"""Export a trained GPT to a Hugging Face ``transformers`` model directory (weights, config, tokenizer).

    obj = consolidate_checkpoint("experiments/megatron_gpt/v1")      # or read_consolidated / read_archive
    export_to_hf(obj, "hf_model")                                    # arch="auto": GPT-2 or Llama
    model = transformers.AutoModelForCausalLM.from_pretrained("hf_model")
    tok = transformers.AutoTokenizer.from_pretrained("hf_model")     # the same ids as model.tokenizer

``tools/convert_to_hf.py`` is the command line. ``transformers`` is an optional dependency (``pip install
transformers``); it is imported only when an export runs.

Targets (``arch``; ``"auto"`` picks the one whose requirements the ``model.*`` keys meet):

* ``gpt2`` -> ``GPT2LMHeadModel``: ``model.position_embedding_type=learned_absolute``, ``model.activation=gelu``,
  ``model.normalization=layernorm``. Our GELU is the exact erf form, so ``activation_function="gelu"`` (not GPT-2's
  tanh ``gelu_new``); ``layer_norm_epsilon=model.layernorm_epsilon``; ``n_inner=ffn_hidden_size``;
  ``n_positions=max_position_embeddings``. GPT-2's ``Conv1D`` stores weights ``[in, out]`` (transposed against
  ``nn.Linear``) and its ``c_attn`` columns are ``[q (all heads) | k | v]`` while our fused QKV rows are
  ``[heads, (q, k, v), head_dim]``: the rows are regrouped, then transposed. GPT-2 always has biases and
  LayerNorm shifts; with ``model.bias=false`` they are written as zeros (the same function).
* ``llama`` -> ``LlamaForCausalLM``: ``model.position_embedding_type=rope``, ``model.activation=swiglu``,
  ``model.normalization=rmsnorm``. Our rotary embedding (``modules/rotary.py``) is the rotate-half convention on
  the full head dimension with ``inv_freq = base^(-2i/head_dim)`` -- exactly HF Llama's default rope -- so q/k rows
  need no permutation (an interleaved-pairs rope would need the per-head even/odd -> half/half permutation);
  ``rope_theta=model.rotary_base``, ``rms_norm_eps=model.layernorm_epsilon``, ``num_key_value_heads`` = heads
  (plain multi-head attention), ``head_dim = hidden / heads``, ``intermediate_size=ffn_hidden_size``; our SwiGLU
  fc1 rows ``[gate; up]`` become ``gate_proj`` / ``up_proj``. ``model.bias=true`` maps to
  ``attention_bias=mlp_bias=true``.

In both, ``share_embeddings_and_output_weights`` becomes ``tie_word_embeddings`` (an untied ``output_layer``
becomes ``lm_head``), and the embedding / LM head get exactly ``vocab_size`` rows: the padded rows never carry
probability in our model (their logits are -inf), so dropping them gives the same softmax.

Anything else (rope + gelu, learned positions + rmsnorm, Mega ``model.arch=mega``, encoder-decoders) raises a
``ConfigError`` naming the keys that prevent the export and what each target needs.

Tokenizer: written as a ``tokenizers`` ``tokenizer.json`` (loaded by ``AutoTokenizer`` as a fast tokenizer,
``tokenizer_class`` ``PreTrainedTokenizerFast``), encoding text to our ids with no special tokens added:

* byte tokenizer: ids 0..255 are the UTF-8 bytes (a byte-level BPE with no merges whose 256 symbols have id =
  byte value), 256 ``<eod>``, 257 ``<pad>``, 258 ``<bos>`` as special tokens. Exact for any text that is valid
  Unicode (a lone surrogate, which our tokenizer passes through with ``surrogatepass``, cannot reach the Rust
  tokenizer at all). ``<eod>`` spelled in text is five bytes, as in ours.
* char tokenizer: one id per character of its list, its special ids as special tokens. Exact for every text ours
  accepts; a character outside the list (ours raises ``DataError``) is silently dropped by the HF tokenizer.
* sentencepiece (unigram, bpe, char): the model's pieces and scores, its normalization rules (the precompiled
  charsmap), dummy prefix, whitespace collapsing and byte fallback rebuilt from the ``.model`` proto; the
  ``.model`` file is copied along as ``tokenizer.model``. Text that spells a control, unknown or byte piece
  literally (``</s>``, ``<unk>``, ``<0x41>``) is cut as sentencepiece cuts it: bpe merges never build those
  pieces; in unigram models they get a score no path through known characters loses to, and a run of characters
  that have no piece of their own is cut out before the lattice (it is the unknown id; a control piece spelling
  such a character would otherwise beat it). The unknown id decodes as sentencepiece's `` ⁇ ``. User-defined
  symbols (``--user-defined-symbols``) stay one piece: unigram models get sentencepiece's score bonus for them,
  bpe models cut them out before merging (and then take a word that is a whole vocabulary entry as it is,
  ``ignore_merges``; so a control piece glued to a symbol, ``<mask></s>``, is the one case left that the check
  below refuses). ``word`` models are refused.

Special tokens are never matched in input text, as in ours: ``tokenizer.json`` lists no added tokens (``tokenizers``
would match them anywhere in the text, and its ``encode_special_tokens`` switch is not saved in the file); the
special pieces are in the model's vocabulary with their ids, and ``tokenizer_config.json`` names them
(``added_tokens_decoder``) with ``split_special_tokens: true``, so ``AutoTokenizer`` with its defaults knows them
without matching them either.

Verification: before anything is written, the tokenizer files are loaded back both ways
(``tokenizers.Tokenizer.from_file`` and ``AutoTokenizer.from_pretrained``) and compared with ours on built-in probe
texts and on a sample of up to :data:`VERIFY_LINES` lines of each ``verify_text`` file (default: the text a
sentencepiece model was trained on, its recorded ``trainer_spec.input``, when the files are still there): ids and
decoded text. Any difference raises :class:`TokenizerMismatchError` naming the first differing line and both id
lists; ``allow_tokenizer_mismatch=True`` exports anyway with an ``HFExportWarning`` that counts the lines.

Generation ids: GPT pretraining separates documents with ``eod`` and never shows ``bos``, so ``eos_token_id`` =
``bos_token_id`` = eod (like GPT-2's ``<|endoftext|>``: unconditional generation starts after a document end)
and ``pad_token_id`` = the tokenizer's pad.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_ext.errors import CheckpointError, ConfigError

ARCHS = ("auto", "gpt2", "llama")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: target -> (HF class, {model.* key: required value})
TARGETS = {
    "gpt2": ("GPT2LMHeadModel", {"position_embedding_type": "learned_absolute", "activation": "gelu",
                                 "normalization": "layernorm"}),
    "llama": ("LlamaForCausalLM", {"position_embedding_type": "rope", "activation": "swiglu",
                                   "normalization": "rmsnorm"}),
}

#: texts the exported tokenizer is checked on (ours vs. Hugging Face's ids)
PROBE_TEXTS = (
    "Hello world! This is a test.",
    "  leading and trailing spaces   ",
    "multiple   inner    spaces\tand a tab",
    "line one\nline two\r\nline three\n\n",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "numbers 0123456789, 3.14159 and 1,000,000",
    "punctuation: ()[]{}<>!?@#$%^&*_-+=~`|\\/'\";:.,",
    "héllo wörld, naïve café, Ærøskøbing, façade",
    "日本語のテキスト、中文文本",
    "Привет, мир! Ελληνικά. עברית. العربية",
    "emoji: 😀🎉👍🏽 and symbols ∑∫√∞ ™ © ①",
    "full-width ＡＢＣ１２３ and ligature ﬁ",
    "",
    " ",
    "a",
)


#: tokenizer files an export writes (and removes when it writes another kind / none)
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                             "tokenizer.model"})


#: lines of each verification text file the exported tokenizer is checked on, and how much of a file is read
VERIFY_LINES = 2000
VERIFY_READ_BYTES = 16 << 20


class HFExportWarning(UserWarning):
    """An export that was asked to go on although its tokenizer encodes some checked text differently."""


class TokenizerMismatchError(ConfigError):
    """The exported tokenizer would encode some checked text to other ids than the training tokenizer."""


# ---------------------------------------------------------------------------------------------------- helpers
def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ConfigError(f"exporting to Hugging Face needs the optional 'transformers' package, which is not "
                          f"installed ({e}): pip install transformers") from None
    return transformers


def _mcfg(model_config: Any) -> Dict[str, Any]:
    """``model_config`` (dict, DictConfig or ``ModelConfig``) as a plain dict."""
    if model_config is None:
        return {}
    if isinstance(model_config, dict):
        return model_config
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(model_config, DictConfig):
            return OmegaConf.to_container(model_config, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    import dataclasses

    if dataclasses.is_dataclass(model_config):
        return dataclasses.asdict(model_config)
    raise ConfigError(f"model_config: expected a dict of model.* keys, got {type(model_config).__name__}")


def _get(mc: Dict[str, Any], key: str, default: Any = None) -> Any:
    v = mc.get(key, default)
    return default if v is None else v


def _norm(v: Any) -> str:
    return str(v).strip().lower()


def model_family(consolidated: Dict[str, Any]) -> str:
    """``"gpt"``, ``"encdec"`` or ``"mega"``: the ``family`` entry (archives) or what the model config says."""
    fam = consolidated.get("family")
    if fam:
        return str(fam)
    mc = _mcfg(consolidated.get("model_config"))
    if "encoder" in mc or "decoder" in mc:
        return "encdec"
    if _norm(mc.get("arch", "transformer")) == "mega":
        return "mega"
    return "gpt"


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
    if family == "mega" or _norm(mc.get("arch", "transformer")) == "mega":
        raise ConfigError("model.arch=mega: a Mega language model has no Hugging Face causal-LM class that loads our "
                          "weights (transformers' MegaForCausalLM is a different, deprecated model); only "
                          "model.arch=transformer GPT models can be exported (to GPT2LMHeadModel or LlamaForCausalLM)")
    if family not in ("gpt", None):
        raise ConfigError(f"family={family!r}: only 'gpt' models can be exported to Hugging Face")
    if _norm(mc.get("arch", "transformer")) != "transformer":
        raise ConfigError(f"model.arch={mc.get('arch')!r}: only model.arch=transformer GPT models can be exported")

    def blockers(target: str) -> List[str]:
        _, req = TARGETS[target]
        defaults = {"position_embedding_type": "learned_absolute", "activation": "gelu", "normalization": "layernorm"}
        out = []
        for key, want in req.items():
            have = _norm(_get(mc, key, defaults[key]))
            if have != want:
                out.append(f"model.{key}={want} (this model has {have})")
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
    return {"layers": int(mc["num_layers"]), "hidden": h, "heads": nh, "head_dim": h // nh, "ffn": ffn,
            "max_pos": int(max_pos)}


def _split_qkv(w: torch.Tensor, heads: int, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our fused QKV rows ``[heads, (q, k, v), head_dim]`` -> q, k, v each ``[heads * head_dim, ...]``."""
    rest = w.shape[1:]
    g = w.reshape(heads, 3, head_dim, *rest)
    return tuple(g[:, i].reshape(heads * head_dim, *rest).contiguous() for i in range(3))


def gpt2_state_dict(sd: Dict[str, torch.Tensor], model_config: Any, vocab_size: int,
                    where: str = "state_dict") -> Dict[str, torch.Tensor]:
    """Our ``GPTModel`` names -> ``GPT2LMHeadModel`` names (Conv1D weights ``[in, out]``)."""
    mc = _mcfg(model_config)
    d = _dims(mc, sd)
    h, nh, hd, ffn, V = d["hidden"], d["heads"], d["head_dim"], d["ffn"], int(vocab_size)
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
    h, nh, hd, ffn, V = d["hidden"], d["heads"], d["head_dim"], d["ffn"], int(vocab_size)
    bias = bool(_get(mc, "bias", True))
    tied = bool(_get(mc, "share_embeddings_and_output_weights", True))
    W = _Weights(sd, where)
    out = {"model.embed_tokens.weight": W.take("embedding.word_embeddings.weight", (V, h))}
    for i in range(d["layers"]):
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[q + "input_layernorm.weight"] = W.take(p + "input_layernorm.weight", (h,))
        wq, wk, wv = _split_qkv(W.take(p + "self_attention.linear_qkv.weight", (3 * h, h)), nh, hd)
        out[q + "self_attn.q_proj.weight"], out[q + "self_attn.k_proj.weight"] = wq, wk
        out[q + "self_attn.v_proj.weight"] = wv
        out[q + "self_attn.o_proj.weight"] = W.take(p + "self_attention.linear_proj.weight", (h, h))
        out[q + "post_attention_layernorm.weight"] = W.take(p + "pre_mlp_layernorm.weight", (h,))
        fc1 = W.take(p + "mlp.linear_fc1.weight", (2 * ffn, h))
        out[q + "mlp.gate_proj.weight"], out[q + "mlp.up_proj.weight"] = fc1[:ffn].contiguous(), fc1[ffn:].contiguous()
        out[q + "mlp.down_proj.weight"] = W.take(p + "mlp.linear_fc2.weight", (h, ffn))
        if bias:
            bq, bk, bv = _split_qkv(W.take(p + "self_attention.linear_qkv.bias", (3 * h,)), nh, hd)
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
    return {"bos_token_id": eod, "eos_token_id": eod, "pad_token_id": int(pad) if pad is not None else None}


def hf_config(arch: str, model_config: Any, state_dict: Dict[str, torch.Tensor], vocab_size: int, tokenizer=None):
    """The ``GPT2Config`` / ``LlamaConfig`` of our model config (``state_dict``: our weights, for the MLP width)."""
    transformers = _import_transformers()
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
            activation_function="gelu", layer_norm_epsilon=eps, resid_pdrop=hidden_dropout,
            embd_pdrop=hidden_dropout, attn_pdrop=attention_dropout, scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, **common)
    if arch == "llama":
        theta = float(_get(mc, "rotary_base", 10000.0))
        bias = bool(_get(mc, "bias", True))
        kwargs = dict(hidden_size=d["hidden"], intermediate_size=d["ffn"], num_hidden_layers=d["layers"],
                      num_attention_heads=d["heads"], num_key_value_heads=d["heads"], head_dim=d["head_dim"],
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
def _byte_backend(tokenizer):
    """``tokenizers.Tokenizer`` for ``ByteTokenizer``: id = byte value; eod/pad/bos after the bytes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from megatron_ext.tokenizers.byte import _SPECIALS

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for the bytes (GPT-2's table)
    if len(alphabet) != 256:  # pragma: no cover - fixed by the tokenizers library
        raise ConfigError("tokenizers' ByteLevel alphabet does not have 256 symbols")
    # GPT-2's byte -> character table: printable bytes map to themselves, the others to 256 + k in byte order
    table, extra = {}, 0
    for b in range(256):
        if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    if set(table.values()) != set(alphabet):  # pragma: no cover - guards the table above
        raise ConfigError("tokenizers' ByteLevel alphabet differs from GPT-2's byte table")
    vocab = {table[b]: b for b in range(256)}
    specials = {s: tokenizer.NUM_BYTES + i for i, s in enumerate(_SPECIALS)}
    vocab.update(specials)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    names = {i: s for s, i in specials.items()}
    return tok, {"eos": names[tokenizer.eod], "pad": names[tokenizer.pad], "unk": None,
                 "extra_files": {}}


def _char_backend(tokenizer):
    """``tokenizers.Tokenizer`` for the char tokenizer (``tokenizers/char.py``): one id per character, its special
    ids (``<pad>``, ``<eod>``, ...) as special tokens. A character outside the vocabulary, which ours refuses with an
    error, is dropped by the Hugging Face tokenizer (it has no unknown id to give it)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    inv = dict(tokenizer.inv_vocab)
    if sorted(inv) != list(range(int(tokenizer.vocab_size))):
        raise ConfigError(f"char tokenizer: ids are not 0..{int(tokenizer.vocab_size) - 1}; cannot export it")
    specials = {piece: i for i, piece in inv.items() if len(piece) != 1}
    vocab = {piece: i for i, piece in inv.items()}
    if len(vocab) != len(inv):
        raise ConfigError("char tokenizer: a character appears twice in its vocabulary; cannot export it")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: each character is its own token
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in sorted(specials, key=specials.get)])
    return tok, {"eos": inv[int(tokenizer.eod)], "pad": inv[int(tokenizer.pad)], "unk": None, "extra_files": {}}


def _sp_backend(tokenizer):
    """``tokenizers.Tokenizer`` rebuilt from a sentencepiece model proto (see the module docstring)."""
    from sentencepiece import sentencepiece_model_pb2 as pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    path = tokenizer.model_path
    proto = pb2.ModelProto()
    try:
        proto.ParseFromString(tokenizer.processor.serialized_model_proto())
    except Exception as e:  # pragma: no cover - the processor loaded it already
        raise ConfigError(f"{path}: cannot parse the sentencepiece model proto: {e}") from None
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    kind = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(int(ts.model_type), str(ts.model_type))
    if kind not in ("unigram", "bpe", "char"):
        raise ConfigError(f"{path}: sentencepiece model_type={kind} has no exact Hugging Face tokenizers "
                          f"equivalent; export with a unigram or bpe sentencepiece model")
    NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # (5 unused, 6 byte)
    pieces = [(p.piece, float(p.score), int(p.type)) for p in proto.pieces]
    normal_scores = [s for _, s, t in pieces if t == NORMAL] or [0.0]
    min_score, max_score = min(normal_scores), max(normal_scores)
    unk_ids = [i for i, (_, _, t) in enumerate(pieces) if t == UNKNOWN]
    unk_id = unk_ids[0] if unk_ids else None
    byte_fallback = bool(ts.byte_fallback)
    user_symbols = [piece for piece, _, t in pieces if t == USER_DEFINED]

    if kind in ("unigram", "char"):
        # control / unknown / byte pieces stay in the lattice of tokenizers' Unigram (it has no way to leave a piece
        # out), so they get a score no path through known characters can lose to; the unknown-id score (this minimum
        # less 10) moves with it, which changes nothing: every path covers an unknown character with the unknown id
        longest = max((len(piece) for piece, _, t in pieces if t != NORMAL), default=1)
        unreachable = (min_score - 1.0) * 1000.0 * (longest + 1)
        vocab = []
        for piece, score, t in pieces:
            if t == USER_DEFINED:  # sentencepiece gives them a bonus so they are always one piece
                score = len(piece) * max_score + 1.0
            elif t != NORMAL:  # never cut out of text by sentencepiece: never worth a path here (see above)
                score = unreachable
            vocab.append((piece, score))
        model = models.Unigram(vocab, unk_id=unk_id, byte_fallback=byte_fallback)
    else:
        vocab_map = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        # merges in sentencepiece's priority order: the merged piece's score, best first
        ranked = sorted(((s, i, piece) for i, (piece, s, t) in enumerate(pieces) if t in (NORMAL, USER_DEFINED)),
                        key=lambda x: (-x[0], x[1]))
        merges = []
        for _, _, piece in ranked:
            for k in range(1, len(piece)):
                left, right = piece[:k], piece[k:]
                if left in vocab_map and right in vocab_map:
                    merges.append((left, right))
        kwargs = dict(vocab=vocab_map, merges=merges, unk_token=pieces[unk_id][0] if unk_id is not None else None,
                      fuse_unk=True, byte_fallback=byte_fallback, dropout=None)
        try:  # with user-defined symbols: a whole-word symbol comes out as itself
            model = models.BPE(**kwargs, **({"ignore_merges": True} if user_symbols else {}))
        except TypeError:  # tokenizers < 0.19 has no ignore_merges; the probe check reports what differs
            model = models.BPE(**kwargs)
    tok = Tokenizer(model)

    norm = []
    if ns.precompiled_charsmap:
        norm.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        norm += [normalizers.Replace(Regex(r"\A +"), ""), normalizers.Replace(Regex(r" +\z"), ""),
                 normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        norm.append(normalizers.Append(" ") if ts.treat_whitespace_as_suffix else normalizers.Prepend(" "))
    if ns.escape_whitespaces:
        norm.append(normalizers.Replace(" ", "\u2581"))
    tok.normalizer = normalizers.Sequence(norm) if norm else None
    pre = []
    if ts.split_by_whitespace and ns.escape_whitespaces:  # pieces never span a "▁" boundary: cut the words apart
        behaviour = "merged_with_previous" if ts.treat_whitespace_as_suffix else "merged_with_next"
        pre.append(pre_tokenizers.Split("\u2581", behavior=behaviour))
    if kind in ("unigram", "char"):
        # a run of characters that have no piece of their own is sentencepiece's unknown id (no normal piece holds
        # such a character): cut it out, so that a control piece spelling it (``</s>`` when ``/`` is unknown) cannot
        # cover it in the lattice -- it would beat the unknown id, whose score is below every piece's. User-defined
        # symbols are cut out whole first (always one piece): their characters may have no piece of their own
        # (``<`` of ``<mask>``), and outside a symbol such a character joins the unknown run, as in sentencepiece
        known = {piece for piece, _, t in pieces if t in (NORMAL, USER_DEFINED) and len(piece) == 1} | {"\u2581"}
        unknown = "[^" + "".join(f"\\x{{{ord(c):x}}}" for c in sorted(known)) + "]"
        pattern = unknown + "+"
        if user_symbols:
            symbols = "|".join(re.escape(u) for u in sorted(user_symbols, key=len, reverse=True))
            pattern = f"{symbols}|(?:(?!{symbols}){unknown})+"
        pre.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if kind == "bpe" and user_symbols:  # sentencepiece's bpe takes them as whole symbols before merging
        alternatives = "|".join(re.escape(u) for u in sorted(user_symbols, key=len, reverse=True))
        pre.append(pre_tokenizers.Split(Regex(alternatives), behavior="isolated"))
    if pre:
        tok.pre_tokenizer = pre[0] if len(pre) == 1 else pre_tokenizers.Sequence(pre)
    dec = [decoders.Replace("\u2581", " ")] if ns.escape_whitespaces else []
    if byte_fallback:
        dec += [decoders.ByteFallback()]
    dec += [decoders.Fuse()]
    if ns.add_dummy_prefix and ns.escape_whitespaces:
        dec.append(decoders.Strip(" ", 0, 1) if ts.treat_whitespace_as_suffix else decoders.Strip(" ", 1, 0))
    if unk_id is not None:  # sentencepiece decodes the unknown id as " ⁇ " (its unk_surface)
        dec.insert(0, decoders.Replace(pieces[unk_id][0], ts.unk_surface or " \u2047 "))
    tok.decoder = decoders.Sequence(dec)
    specials = [piece for piece, _, t in pieces if t in (CONTROL, UNKNOWN)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok, {"eos": pieces[tokenizer.eod][0], "pad": pieces[tokenizer.pad][0],
                 "unk": pieces[unk_id][0] if unk_id is not None else None,
                 "extra_files": {"tokenizer.model": path}}


def build_hf_tokenizer(tokenizer):
    """Our tokenizer -> ``(transformers.PreTrainedTokenizerFast, extra files to copy {name: path})``."""
    transformers = _import_transformers()
    from megatron_ext.tokenizers import ByteTokenizer, SentencePieceTokenizer
    from megatron_ext.tokenizers.special_tokens import AddedSpecialTokens

    if isinstance(tokenizer, AddedSpecialTokens):
        if tokenizer.appended_tokens:
            raise ConfigError(f"the tokenizer has added special tokens {tokenizer.appended_tokens} (BART's mask): "
                              f"only plain GPT tokenizers are exported")
        tokenizer = tokenizer.base
    if isinstance(tokenizer, ByteTokenizer):
        backend, info = _byte_backend(tokenizer)
    elif isinstance(tokenizer, SentencePieceTokenizer):
        backend, info = _sp_backend(tokenizer)
    elif getattr(tokenizer, "name", None) == "char" and hasattr(tokenizer, "chars"):
        backend, info = _char_backend(tokenizer)
    else:
        raise ConfigError(f"model.tokenizer.library={getattr(tokenizer, 'name', type(tokenizer).__name__)!r}: no "
                          f"Hugging Face export for this tokenizer (byte, char and sentencepiece are supported)")
    eos = info["eos"]
    kwargs = dict(tokenizer_object=backend, bos_token=eos, eos_token=eos, pad_token=info["pad"],
                  split_special_tokens=True, clean_up_tokenization_spaces=False, add_prefix_space=None)
    if info["unk"] is not None:
        kwargs["unk_token"] = info["unk"]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    fast = transformers.PreTrainedTokenizerFast(**kwargs)
    return fast, info["extra_files"]


def write_hf_tokenizer(tokenizer, out_dir: str, model_max_length: Optional[int] = None) -> List[str]:
    """Write our tokenizer as Hugging Face files into ``out_dir``; returns the file names written.

    ``tokenizer.json`` lists no added tokens: ``tokenizers`` matches an added token anywhere in the input text and
    cannot be told otherwise from the file (its ``encode_special_tokens`` switch is not saved), while ours never
    cuts a special piece out of text. The special pieces stay in the model's vocabulary (so ``token_to_id`` and
    decoding know them) and ``tokenizer_config.json`` names them with ``split_special_tokens: true``, so
    ``AutoTokenizer`` knows them as special tokens without matching them in text either."""
    hf_tok, extra_files = build_hf_tokenizer(tokenizer)
    if model_max_length is not None:
        hf_tok.model_max_length = int(model_max_length)
    os.makedirs(out_dir, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    p = os.path.join(out_dir, "tokenizer.json")
    with open(p, encoding="utf-8") as f:
        spec = json.load(f)
    specials = sorted((t["id"], t["content"]) for t in spec.get("added_tokens", []) if t.get("special"))
    spec["added_tokens"] = []
    _portable_tokenizer_config(out_dir, specials)
    with open(p, "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    for name, src in extra_files.items():
        shutil.copyfile(src, os.path.join(out_dir, name))
    return [n for n in sorted(TOKENIZER_FILES) if os.path.isfile(os.path.join(out_dir, n))]


def compare_tokenizers(ours, hf_dir: str, texts: Sequence[Any]) -> List[Tuple[str, str, List[int], List[int]]]:
    """Check the tokenizer files in ``hf_dir`` against ours: ``(where, text, our ids, Hugging Face ids)`` for every
    text that ``tokenizers.Tokenizer.from_file(tokenizer.json).encode`` or ``AutoTokenizer.from_pretrained(hf_dir)``
    (both with their defaults, no special tokens added) encodes differently, or whose ids either decodes to another
    string than ours. ``texts``: strings or ``(where, text)`` pairs. Texts ours refuses (the char tokenizer's
    unknown characters) are skipped."""
    from tokenizers import Tokenizer as RawTokenizer

    from megatron_ext.errors import DataError

    transformers = _import_transformers()
    raw = RawTokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(hf_dir)
    auto.model_max_length = 1 << 40  # no warning about lines longer than the model's context
    bad = []
    for i, item in enumerate(texts):
        where, t = item if isinstance(item, tuple) else (f"text {i + 1}", item)
        try:
            a = list(ours.tokenize(t))
            text_back = ours.detokenize(a)
        except DataError:
            continue
        b = list(raw.encode(t, add_special_tokens=False).ids)
        c = list(auto(t, add_special_tokens=False)["input_ids"])
        if b != a or c != a:
            bad.append((where, t, a, b if b != a else c))
        elif raw.decode(a) != text_back or auto.decode(a) != text_back:
            bad.append((where, t, a, a))  # the same ids, another decoded text
    return bad


def resolve_tokenizer(consolidated: Dict[str, Any], tokenizer: Any = None, *, library_key: Optional[str] = None,
                      model_key: Optional[str] = None):
    """Our tokenizer for an export: ``tokenizer`` itself (a Tokenizer), a ``{"library", "model"}`` dict, or None
    (the archive's tokenizer / the checkpoint's ``model.tokenizer``). ``False`` -> None (no tokenizer)."""
    from megatron_ext.tokenizers import build_tokenizer
    from megatron_ext.tokenizers.base import Tokenizer

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
    import contextlib

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
    family = model_family(consolidated)
    target = resolve_arch(consolidated["model_config"], arch, family)
    torch_dtype = _resolve_dtype(dtype)
    vocab = int(consolidated["vocab_size"])
    ours = resolve_tokenizer(consolidated, tokenizer)
    if ours is not None and int(ours.vocab_size) != vocab:
        raise ConfigError(f"the tokenizer ({ours.name}) has {ours.vocab_size} ids but the model was trained with "
                          f"vocab_size={vocab}: give the tokenizer the model was trained with")
    transformers = _import_transformers()
    mc = _mcfg(consolidated["model_config"])
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

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"{out_dir}: exists and is not a directory (expected an output directory)")
    import tempfile

    mismatches: List[Tuple[str, str, List[int], List[int]]] = []
    written: List[str] = []
    checked, sources = 0, []
    with tempfile.TemporaryDirectory(prefix="hf_tokenizer-") as tok_dir:
        if ours is not None:
            max_len = config.max_position_embeddings if target == "llama" else config.n_positions
            written = write_hf_tokenizer(ours, tok_dir, max_len)
            files = list(verify_text) if verify_text is not None else training_text_files(ours)
            texts = [(f"probe text {i + 1}", t) for i, t in
                     enumerate(list(PROBE_TEXTS) + _symbol_probes(ours) + list(probe_texts or []))]
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
                              f"text", HFExportWarning, stacklevel=2)
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        for name in written:
            shutil.copyfile(os.path.join(tok_dir, name), os.path.join(out_dir, name))
    for name in TOKENIZER_FILES - set(written):  # a tokenizer left by an earlier export would not match this model
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    return {"arch": target, "model_class": TARGETS[target][0], "out_dir": out_dir,
            "dtype": str(torch_dtype).replace("torch.", ""), "vocab_size": vocab,
            "tokenizer": ours.name if ours is not None else None, "tokenizer_mismatches": mismatches,
            "tokenizer_checked": checked, "tokenizer_sources": sources}


def _abbrev(x: Any, n: int = 12) -> str:
    """A text (first 60 characters, repr) or an id list (first ``n`` ids) for a one-line message."""
    if isinstance(x, str):
        return repr(x[:60]) + ("..." if len(x) > 60 else "")
    x = list(x)
    return "[" + ", ".join(map(str, x[:n])) + (f", ... ({len(x)} ids)]" if len(x) > n else "]")


def training_text_files(tokenizer) -> List[str]:
    """The text a tokenizer was trained on, where it records it and the files are still there: a sentencepiece
    model's ``trainer_spec.input`` (the ``--input`` of ``tools/train_tokenizer.py``). Other tokenizers record none
    (the run's ``model.data.data_prefix`` is token ids, not text): give ``verify_text``."""
    sp = getattr(tokenizer, "processor", None)
    if sp is None:
        return []
    from sentencepiece import sentencepiece_model_pb2 as pb2

    proto = pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return [p for p in proto.trainer_spec.input if os.path.isfile(p)]


def sample_lines(path: str, max_lines: int = 0) -> List[Tuple[str, str]]:
    """``(path:line, text)`` for up to ``max_lines`` lines spread evenly over a text file (all when 0). A file
    larger than :data:`VERIFY_READ_BYTES` is sampled from that many bytes spread over it (``path@byte``)."""
    from megatron_ext.errors import DataError

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size <= VERIFY_READ_BYTES:
                found = [(f"{path}:{i + 1}", line) for i, line in enumerate(f.read().split(b"\n"))]
            else:
                found, chunks = [], 64
                for k in range(chunks):
                    off = k * (size // chunks)
                    f.seek(off)
                    block = f.read(VERIFY_READ_BYTES // chunks).split(b"\n")[1:-1]  # whole lines only
                    found += [(f"{path}@byte {off}", line) for line in block]
    except OSError as e:
        raise DataError(f"--verify-text {path}: cannot read it ({e.strerror or e}); expected a text file") from None
    out = []
    for where, line in found:
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            raise DataError(f"--verify-text {where}: not UTF-8 text") from None
        if text.strip():
            out.append((where, text))
    if max_lines and len(out) > max_lines:
        step = len(out) / max_lines
        out = [out[int(i * step)] for i in range(max_lines)]
    return out


def _symbol_probes(tokenizer) -> List[str]:
    """Probe texts around each sentencepiece user-defined symbol (always one piece in sentencepiece)."""
    sp = getattr(tokenizer, "processor", None)
    if sp is None:
        return []
    from sentencepiece import sentencepiece_model_pb2 as pb2

    proto = pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    out = []
    for p in proto.pieces:
        if int(p.type) == 4:  # USER_DEFINED
            out += [f"a{p.piece}b", f" {p.piece} and {p.piece}"]
    return out


def _portable_tokenizer_config(out_dir: str, specials: Sequence[Tuple[int, str]] = ()) -> None:
    """Name the generic fast-tokenizer class that both transformers 4.x and 5.x resolve, never match special tokens
    in text, and list the special pieces ``(id, piece)`` (``tokenizer.json`` does not, see
    :func:`write_hf_tokenizer`)."""
    p = os.path.join(out_dir, "tokenizer_config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["split_special_tokens"] = True  # AutoTokenizer's default for this directory: never match them in text
    if specials:
        cfg["added_tokens_decoder"] = {str(i): {"content": piece, "lstrip": False, "normalized": False,
                                                "rstrip": False, "single_word": False, "special": True}
                                       for i, piece in specials}
    with open(p, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)


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
    import dataclasses

    from megatron_ext.modules.common import tp_world_size

    if tp_world_size() > 1:
        raise ConfigError("consolidated_from_model needs a TP=1 model (gather a split model with "
                          "megatron_ext.training.archive.gather_full_state_dict)")
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
    """``path`` -> consolidated dict: a ``.mext`` archive (unpacked into ``extract_dir``), a training checkpoint
    (run directory, ``checkpoints`` directory or ``step_N``; any TP/PP/ZeRO layout) or a consolidated ``.pt``."""
    import tarfile

    if not os.path.exists(path):
        raise CheckpointError(f"{key} {path}: no such file or directory (expected a .mext archive, a run/checkpoint "
                              f"directory or a consolidated .pt file)")
    if os.path.isdir(path):
        from megatron_ext.training.checkpointing import resolve_ckpt_path
        from megatron_ext.training.consolidated import consolidate_checkpoint, read_meta

        try:
            ckpt_dir, tag = resolve_ckpt_path(path)
            meta = read_meta(os.path.join(ckpt_dir, tag))
        except CheckpointError as e:
            raise CheckpointError(str(e).replace("model.ckpt_path", key, 1)) from None
        probe = {"model_config": meta.get("model_config") or {}}
        fam = model_family(probe)
        if fam != "gpt":  # refuse before reading the weights
            resolve_arch(probe["model_config"], "auto", fam)
        return consolidate_checkpoint(os.path.join(ckpt_dir, tag))
    if path.endswith(".mext") or (not path.endswith(".pt") and tarfile.is_tarfile(path)):
        from megatron_ext.training.archive import read_archive

        return read_archive(path, extract_dir)
    from megatron_ext.training.consolidated import read_consolidated

    return read_consolidated(path)


__all__ = ["ARCHS", "DTYPES", "TARGETS", "PROBE_TEXTS", "HFExportWarning", "export_to_hf", "resolve_arch",
           "model_family", "gpt2_state_dict", "llama_state_dict", "hf_config", "build_hf_tokenizer",
           "compare_tokenizers", "write_hf_tokenizer", "training_text_files", "sample_lines", "TokenizerMismatchError",
           "VERIFY_LINES", "resolve_tokenizer", "consolidated_from_model", "read_export_input"]

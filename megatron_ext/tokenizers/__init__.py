"""Tokenizers: one registry, built from ``model.tokenizer.{library,model}``.

>>> tok = build_tokenizer("byte")
>>> tok.detokenize(tok.tokenize("héllo"))
'héllo'

Every tokenizer is usable as megatron-core's ``GPTDatasetConfig(tokenizer=...)`` (it has
``vocab_size``, ``eod``, ``eos``, ``pad`` and ``unique_identifiers``) and has ``tokenize``,
``tokenize_batch``, ``tokenize_batch_flat``, ``detokenize``, ``bos``, ``name`` and
``describe()``; see :class:`megatron_ext.tokenizers.base.Tokenizer`.

Built in: ``byte`` (UTF-8 bytes), ``char`` (one id per character of a fixed set; see
:mod:`megatron_ext.tokenizers.char`), ``sentencepiece``, ``huggingface`` (a Hugging Face ``tokenizer.json`` with
its ``tokenizer_config.json``, ids as ``AutoTokenizer`` gives them; see :mod:`megatron_ext.tokenizers.huggingface`).

New libraries are added with :func:`register_tokenizer`; the class is called as
``cls(model=<model path or None>)``.

BART-style pretraining needs a ``<mask>`` id: :func:`ensure_mask_token` /
:func:`with_added_special_tokens` (:mod:`megatron_ext.tokenizers.special_tokens`) add it without
changing any existing id.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional

from megatron_ext.errors import ConfigError
from megatron_ext.tokenizers.base import Tokenizer
from megatron_ext.tokenizers.byte import ByteTokenizer
from megatron_ext.tokenizers.char import CharTokenizer
from megatron_ext.tokenizers.huggingface import HuggingFaceTokenizer
from megatron_ext.tokenizers.sentencepiece_tokenizer import (
    SentencePieceTokenizer,
    train_sentencepiece,
)
from megatron_ext.tokenizers.special_tokens import (
    MASK_TOKEN,
    AddedSpecialTokens,
    ensure_mask_token,
    unwrap_tokenizer,
    with_added_special_tokens,
)

__all__ = [
    "AVAILABLE_TOKENIZERS",
    "AddedSpecialTokens",
    "MASK_TOKEN",
    "ByteTokenizer",
    "CharTokenizer",
    "HuggingFaceTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "build_tokenizer_from_config",
    "ensure_mask_token",
    "register_tokenizer",
    "train_sentencepiece",
    "unwrap_tokenizer",
    "with_added_special_tokens",
]

#: library name -> tokenizer class (or factory) called as ``cls(model=...)``
AVAILABLE_TOKENIZERS: Dict[str, Callable[..., Tokenizer]] = {}


def register_tokenizer(name: str, cls: Callable[..., Tokenizer], *, overwrite: bool = False) -> None:
    """Register a tokenizer class under ``name`` (the value of ``model.tokenizer.library``)."""
    key = str(name).strip().lower()
    if not key:
        raise ValueError("register_tokenizer: name must be a non-empty string")
    if key in AVAILABLE_TOKENIZERS and AVAILABLE_TOKENIZERS[key] is not cls and not overwrite:
        raise ValueError(
            f"register_tokenizer: a tokenizer named '{key}' is already registered "
            f"({AVAILABLE_TOKENIZERS[key]!r}); pass overwrite=True to replace it"
        )
    AVAILABLE_TOKENIZERS[key] = cls


register_tokenizer("byte", ByteTokenizer)
register_tokenizer("char", CharTokenizer)
register_tokenizer("sentencepiece", SentencePieceTokenizer)
register_tokenizer("huggingface", HuggingFaceTokenizer)


def build_tokenizer(
    library: str,
    model: Optional[str] = None,
    *,
    library_key: str = "model.tokenizer.library",
    model_key: str = "model.tokenizer.model",
    **kwargs: Any,
) -> Tokenizer:
    """Build the tokenizer registered as ``library`` with model file ``model``.

    ``library_key`` / ``model_key`` are the names used in error messages (command-line tools
    pass their flag names). Extra keyword arguments go to the tokenizer class.
    """
    key = str(library).strip().lower() if library is not None else ""
    if key not in AVAILABLE_TOKENIZERS:
        choices = ", ".join(sorted(AVAILABLE_TOKENIZERS))
        raise ConfigError(
            f"{library_key}: unknown tokenizer library {library!r}; choose one of: {choices}"
        )
    cls = AVAILABLE_TOKENIZERS[key]
    if _accepts_keyword(cls, "model_key"):
        kwargs["model_key"] = model_key
    return cls(model=model, **kwargs)


def _accepts_keyword(cls: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_tokenizer_from_config(cfg: Any) -> Tokenizer:
    """Build from a ``TokenizerConfig`` / DictConfig / dict with ``library`` and ``model``."""
    if isinstance(cfg, dict):
        return build_tokenizer(cfg.get("library", "byte"), cfg.get("model"))
    return build_tokenizer(getattr(cfg, "library", "byte"), getattr(cfg, "model", None))

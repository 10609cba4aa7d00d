"""Extra special tokens (BART's ``<mask>``) on top of any tokenizer, without changing its ids.

>>> tok = ensure_mask_token(build_tokenizer("byte"))
>>> tok.mask, tok.vocab_size          # 259, 260: appended after the byte tokenizer's 259 ids
(259, 260)

:func:`with_added_special_tokens` wraps a tokenizer in :class:`AddedSpecialTokens`:

* a token the underlying vocabulary already has as a piece of its own -- a sentencepiece
  model trained with ``--user-defined-symbols "<mask>"`` or ``--control-symbols "<mask>"``
  (``tools/train_tokenizer.py``) -- keeps that id and the vocabulary size does not change;
* any other token gets a new id after the vocabulary (``vocab_size``, ``vocab_size + 1``, ...)
  and ``vocab_size`` grows accordingly.

Every id of the wrapped tokenizer (bytes/pieces, ``eod``, ``pad``, ``bos``) is unchanged, so
``.bin/.idx`` files made with the plain tokenizer stay valid. Text is encoded exactly as
before: the literal text ``"<mask>"`` is *not* turned into the mask id (unless the
sentencepiece model itself defines it as a user-defined symbol). ``detokenize`` drops the added
tokens (``keep_added=True`` renders them as their text instead, e.g. to look at noised input; the
text around them is decoded run by run, so sentencepiece drops the space right after a mask there).

``unique_identifiers`` gains an ``added_tokens`` entry, so caches keyed on it distinguish the
wrapped tokenizer from the plain one. Attributes the wrapper does not define (``processor``,
``model_path``, ``unk``, ...) are looked up on the wrapped tokenizer (``.base``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ext.errors import ConfigError
from megatron_ext.tokenizers.base import Tokenizer, ids_to_list

MASK_TOKEN = "<mask>"


def _existing_piece_id(tokenizer: Tokenizer, token: str) -> Optional[int]:
    """The id of ``token`` if the tokenizer's vocabulary has it as a whole piece, else None."""
    sp = getattr(tokenizer, "processor", None)
    if sp is not None and hasattr(sp, "piece_to_id"):
        i = int(sp.piece_to_id(token))
        if 0 <= i < int(tokenizer.vocab_size) and sp.id_to_piece(i) == token and not sp.is_unknown(i):
            return i
    return None


class AddedSpecialTokens(Tokenizer):
    """``base`` plus special tokens; see the module docstring."""

    def __init__(self, base: Tokenizer, tokens: Sequence[str]) -> None:
        if isinstance(base, AddedSpecialTokens):  # flatten: one wrapper with all the tokens
            tokens = list(base.added_tokens) + [t for t in tokens if t not in base.added_tokens]
            base = base.base
        self.base = base
        self._ids: "OrderedDict[str, int]" = OrderedDict()
        self._appended: List[str] = []
        next_id = int(base.vocab_size)
        for token in tokens:
            if not isinstance(token, str) or not token:
                raise ConfigError(f"added special token {token!r}: expected a non-empty string")
            if token in self._ids:
                continue
            existing = _existing_piece_id(base, token)
            if existing is not None:
                self._ids[token] = existing
            else:
                self._ids[token] = next_id
                self._appended.append(token)
                next_id += 1
        self._vocab_size = next_id
        self._added_id_array = np.array(sorted(set(self._ids.values())), dtype=np.int64)

    # attributes of the wrapped tokenizer (processor, model_path, unk, num_threads, ...)
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("base", "_ids", "_appended", "_vocab_size", "_added_id_array"):
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.base.name

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self.base.eod

    @property
    def eos(self) -> int:
        return self.base.eos

    @property
    def pad(self) -> int:
        return self.base.pad

    @property
    def bos(self) -> Optional[int]:
        return self.base.bos

    @property
    def added_tokens(self) -> "OrderedDict[str, int]":
        """token text -> id, in the order they were added."""
        return OrderedDict(self._ids)

    @property
    def appended_tokens(self) -> List[str]:
        """The added tokens that got new ids after the base vocabulary."""
        return list(self._appended)

    def token_to_id(self, token: str) -> int:
        try:
            return self._ids[token]
        except KeyError:
            raise KeyError(f"{token!r} is not an added special token (have {list(self._ids)})") from None

    @property
    def mask(self) -> int:
        if MASK_TOKEN not in self._ids:
            raise AttributeError(f"this tokenizer has no {MASK_TOKEN} token (use ensure_mask_token)")
        return self._ids[MASK_TOKEN]

    @property
    def special_ids(self) -> List[int]:
        """eod/pad/bos and every added token (sorted, unique)."""
        ids = {int(self.eod), int(self.pad), *map(int, self._ids.values())}
        if self.bos is not None:
            ids.add(int(self.bos))
        return sorted(ids)

    @property
    def unique_identifiers(self) -> "OrderedDict[str, Any]":
        ident = OrderedDict(self.base.unique_identifiers)
        ident["vocab_size"] = self.vocab_size
        ident["added_tokens"] = [[t, i] for t, i in self._ids.items()]
        return ident

    def describe(self) -> Dict[str, Any]:
        d = dict(self.base.describe())
        d["vocab_size"] = self.vocab_size
        for token, i in self._ids.items():
            d[token.strip("<>[]") or token] = i
        return d

    @property
    def inv_vocab(self) -> Dict[int, str]:
        inv = dict(self.base.inv_vocab)
        for token, i in self._ids.items():
            inv[i] = token
        return inv

    # ------------------------------------------------------------ encoding
    def tokenize(self, text: str) -> List[int]:
        return self.base.tokenize(text)

    def tokenize_plain(self, text: str) -> List[int]:
        return self.base.tokenize_plain(text)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.base.tokenize_batch(texts)

    def tokenize_batch_flat(self, texts: Sequence[str], append_eod: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        return self.base.tokenize_batch_flat(texts, append_eod=append_eod)

    def detokenize(self, ids: Iterable[int], keep_added: bool = False) -> str:
        """Text of ``ids``; added tokens are dropped (``keep_added``: written as their text)."""
        ids = ids_to_list(ids)
        for i in ids:
            if i < 0 or i >= self._vocab_size:
                raise ValueError(f"{self.name} tokenizer: token id {i} is out of range [0, {self._vocab_size})")
        added = {i: t for t, i in self._ids.items()}
        if not keep_added:
            return self.base.detokenize([i for i in ids if i not in added])
        parts: List[str] = []
        run: List[int] = []
        for i in ids:
            if i in added:
                if run:
                    parts.append(self.base.detokenize(run))
                    run = []
                parts.append(added[i])
            else:
                run.append(i)
        if run:
            parts.append(self.base.detokenize(run))
        return "".join(parts)


def with_added_special_tokens(tokenizer: Tokenizer, tokens: Sequence[str]) -> AddedSpecialTokens:
    """``tokenizer`` with the special ``tokens`` added (existing pieces reused, others appended)."""
    if isinstance(tokens, str):
        tokens = [tokens]
    return AddedSpecialTokens(tokenizer, list(tokens))


def ensure_mask_token(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer`` itself if it already has a ``mask`` id, else it wrapped with ``<mask>`` added."""
    try:
        mask = getattr(tokenizer, "mask")
    except AttributeError:
        mask = None
    if mask is not None:
        return tokenizer
    return with_added_special_tokens(tokenizer, [MASK_TOKEN])


def unwrap_tokenizer(tokenizer: Any) -> Any:
    """The innermost tokenizer (below any :class:`AddedSpecialTokens`)."""
    while isinstance(tokenizer, AddedSpecialTokens):
        tokenizer = tokenizer.base
    return tokenizer

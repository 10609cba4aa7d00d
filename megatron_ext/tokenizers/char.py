"""Character-level tokenizer (``model.tokenizer.library=char``): one id per character, no files needed.

Vocabulary (ids in this order):

* ``0`` ``<pad>``, ``1`` ``<eod>`` (also ``eos``), ``2`` ``<bos>``, ``3`` ``<sep>`` -- the special ids;
* ``4 ..`` the characters. By default these are :data:`DEFAULT_CHARS`: the newline followed by the 95
  printable ASCII characters from space (``' '``, 0x20) to tilde (``'~'``, 0x7E) in code-point order, so
  ``vocab_size`` is 100. Tab, carriage return and every non-ASCII character are *not* in it.

``model.tokenizer.model`` may name a UTF-8 text file instead; its distinct characters, in order of first
appearance, are the vocabulary (a newline counts as a character like any other, so a file that ends with one
has ``'\\n'`` in its vocabulary; duplicates are ignored).

``tokenize`` never drops a character: one that is not in the vocabulary raises
:class:`~megatron_ext.errors.DataError` naming the character, its code point and its position in the text.
``detokenize`` drops the special ids (as the byte tokenizer does); :meth:`CharTokenizer.id_to_piece` shows them.
The synthetic tasks (:mod:`megatron_ext.data.synthetic`) use ``<sep>`` between a task's input and its target.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional

from megatron_ext.errors import ConfigError, DataError
from megatron_ext.tokenizers.base import Tokenizer, ids_to_list

#: the default character set: newline + printable ASCII (0x20 .. 0x7E)
DEFAULT_CHARS = "\n" + "".join(chr(c) for c in range(0x20, 0x7F))
SPECIALS = ("<pad>", "<eod>", "<bos>", "<sep>")


def _show(ch: str) -> str:
    return f"{ch!r} (U+{ord(ch):04X})"


class CharTokenizer(Tokenizer):
    """One token per character over a fixed character set (see the module docstring)."""

    name = "char"
    PAD, EOD, BOS, SEP = 0, 1, 2, 3

    def __init__(self, model: Optional[str] = None, *, model_key: str = "model.tokenizer.model") -> None:
        if model is None or (isinstance(model, str) and not model.strip()):
            chars, self._source = DEFAULT_CHARS, "default"
        else:
            path = os.path.abspath(os.path.expanduser(str(model)))
            chars = self._read_chars(path, model_key)
            self._source = path
        self._chars = chars
        self._to_id: Dict[str, int] = {c: len(SPECIALS) + i for i, c in enumerate(chars)}

    @staticmethod
    def _read_chars(path: str, model_key: str) -> str:
        if not os.path.isfile(path):
            what = "does not exist" if not os.path.exists(path) else "is not a file"
            raise ConfigError(
                f"{model_key}: character list '{path}' {what} (expected a UTF-8 text file whose characters are the "
                f"vocabulary of the char tokenizer, or null for newline + printable ASCII)"
            )
        try:
            with open(path, "r", encoding="utf-8", newline="") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{model_key}: '{path}' is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise ConfigError(f"{model_key}: cannot read character list '{path}': {exc.strerror}") from None
        chars = "".join(OrderedDict.fromkeys(text))
        if not chars:
            raise ConfigError(f"{model_key}: character list '{path}' is empty; expected at least one character")
        return chars

    # ------------------------------------------------------------------ ids
    @property
    def chars(self) -> str:
        """The vocabulary's characters, in id order (id ``4 + i`` is ``chars[i]``)."""
        return self._chars

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self._chars)

    @property
    def eod(self) -> int:
        return self.EOD

    @property
    def pad(self) -> int:
        return self.PAD

    @property
    def bos(self) -> Optional[int]:
        return self.BOS

    @property
    def sep(self) -> int:
        """The separator id (between a synthetic task's input and its target)."""
        return self.SEP

    @property
    def unique_identifiers(self) -> "OrderedDict[str, Any]":
        digest = hashlib.sha256(self._chars.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]
        return OrderedDict(
            [
                ("class", type(self).__name__),
                ("library", self.name),
                ("vocab_size", self.vocab_size),
                ("chars_sha256", digest),
                ("eod", self.eod),
                ("pad", self.pad),
                ("bos", self.bos),
                ("sep", self.sep),
            ]
        )

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "sep": self.sep, "chars": self._source}

    @property
    def inv_vocab(self) -> Dict[int, str]:
        inv = {i: s for i, s in enumerate(SPECIALS)}
        inv.update({i: c for c, i in self._to_id.items()})
        return inv

    def id_to_piece(self, i: int) -> str:
        """The character of id ``i``, or ``<pad>``/``<eod>``/``<bos>``/``<sep>``."""
        i = int(i)
        if 0 <= i < len(SPECIALS):
            return SPECIALS[i]
        if len(SPECIALS) <= i < self.vocab_size:
            return self._chars[i - len(SPECIALS)]
        raise ValueError(f"char tokenizer: token id {i} is out of range [0, {self.vocab_size})")

    def missing_chars(self, text: str) -> str:
        """The distinct characters of ``text`` that are not in the vocabulary (in order of appearance)."""
        return "".join(c for c in OrderedDict.fromkeys(text) if c not in self._to_id)

    # ------------------------------------------------------------ encoding
    def tokenize(self, text: str) -> List[int]:
        to_id = self._to_id
        try:
            return [to_id[c] for c in text]
        except KeyError:
            pos = next(i for i, c in enumerate(text) if c not in to_id)
            vocab = "newline + printable ASCII" if self._source == "default" else f"the characters of {self._source}"
            raise DataError(
                f"char tokenizer: character {_show(text[pos])} at position {pos} is not in the vocabulary "
                f"({vocab}); add it to a character list file given as model.tokenizer.model"
            ) from None

    def detokenize(self, ids: Iterable[int]) -> str:
        out = []
        n, vs = len(SPECIALS), self.vocab_size
        for i in ids_to_list(ids):
            if i < 0 or i >= vs:
                raise ValueError(f"char tokenizer: token id {i} is out of range [0, {vs})")
            if i >= n:
                out.append(self._chars[i - n])
        return "".join(out)

"""Common tokenizer interface.

A tokenizer here is duck-typed to what megatron-core's datasets read from
``BlendedMegatronDatasetConfig.tokenizer`` (``GPTDataset`` / ``MegatronDataset``):

* ``vocab_size`` -- the real vocabulary size, special tokens included (the model pads it);
* ``eod`` / ``eos`` -- the end-of-document id appended between documents;
* ``pad`` -- the padding id (megatron-core replaces it when it collides with ``eod``);
* ``unique_identifiers`` -- an ``OrderedDict`` of JSON-serialisable values; megatron-core hashes
  it (``json.dumps(..., default=lambda o: o.unique_identifiers)``) into the sample-index cache
  key, so it must change whenever the token ids would change.

On top of that every tokenizer has ``tokenize`` / ``tokenize_batch`` / ``detokenize``, ``bos``
(``None`` when the tokenizer has none), ``name`` and ``describe()``, plus the preprocessing fast
path ``tokenize_batch_flat`` which returns numpy arrays instead of Python lists.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np


class Tokenizer:
    """Base class of the tokenizers of :mod:`megatron_ext.tokenizers`."""

    #: registry name (``model.tokenizer.library``)
    name: str = "base"

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def eod(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def eos(self) -> int:
        """Alias of :attr:`eod` (megatron-core checks ``eos`` for pad collisions)."""
        return self.eod

    @property
    def pad(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def bos(self) -> Optional[int]:
        return None

    # ------------------------------------------------------------ identity
    @property
    def unique_identifiers(self) -> "OrderedDict[str, Any]":  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def unique_description(self) -> str:
        return json.dumps(self.unique_identifiers, indent=4)

    def describe(self) -> Dict[str, Any]:
        """A small dict for logging: library, vocab size and special ids."""
        return {
            "library": self.name,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "pad": self.pad,
            "bos": self.bos,
        }

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
        return f"{type(self).__name__}({fields})"

    # ------------------------------------------------------------ encoding
    def tokenize(self, text: str) -> List[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def tokenize_plain(self, text: str) -> List[int]:
        """The ids of ``text`` alone, without tokens a tokenizer puts around every text (a Hugging Face
        post-processor's bos); the same as :meth:`tokenize` for the tokenizers that add none. Used for fragments
        such as generation stop strings."""
        return self.tokenize(text)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Tokenize many texts; subclasses override this with a batched fast path."""
        return [self.tokenize(t) for t in texts]

    def tokenize_batch_flat(
        self, texts: Sequence[str], append_eod: bool = False
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Tokenize many texts into one flat ``int32`` array plus per-text lengths (``int64``).

        With ``append_eod`` every text is followed by :attr:`eod` (counted in its length).
        This is the path used by ``tools/preprocess_data.py``; it avoids per-token Python
        objects where the library allows it.
        """
        batch = self.tokenize_batch(texts)
        lengths = np.fromiter(map(len, batch), dtype=np.int64, count=len(batch))
        total = int(lengths.sum())
        tokens = np.fromiter(
            (t for ids in batch for t in ids), dtype=np.int32, count=total
        ) if total else np.zeros(0, dtype=np.int32)
        if append_eod:
            return append_eod_flat(tokens, lengths, self.eod)
        return tokens, lengths

    def detokenize(self, ids: Iterable[int]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    # megatron-core's legacy tokenizer API names
    @property
    def vocab(self) -> Dict[str, int]:
        return {v: k for k, v in self.inv_vocab.items()}

    @property
    def inv_vocab(self) -> Dict[int, str]:  # pragma: no cover - abstract
        raise NotImplementedError


def append_eod_flat(
    tokens: np.ndarray, lengths: np.ndarray, eod: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Insert ``eod`` after each document of a flat ``tokens`` array (vectorised)."""
    n = lengths.shape[0]
    new_lengths = lengths + 1
    out = np.empty(tokens.shape[0] + n, dtype=tokens.dtype)
    ends = np.cumsum(new_lengths) - 1  # position of each document's eod
    keep = np.ones(out.shape[0], dtype=bool)
    keep[ends] = False
    out[keep] = tokens
    out[ends] = eod
    return out, new_lengths


def ids_to_list(ids: Any) -> List[int]:
    """Accept a list / tuple / numpy array / torch tensor of ids and return a list of ints."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]

"""Byte-level tokenizer: the UTF-8 bytes 0..255 plus three special ids (eod, pad, bos)."""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ext.tokenizers.base import Tokenizer, append_eod_flat, ids_to_list

_SPECIALS = ("<eod>", "<pad>", "<bos>")


class ByteTokenizer(Tokenizer):
    """UTF-8 byte tokenizer; needs no files.

    ids 0..255 are the bytes, 256 = eod, 257 = pad, 258 = bos, so ``vocab_size`` is 259.
    ``detokenize`` drops special ids and decodes the remaining bytes as UTF-8 (invalid byte
    sequences, e.g. a cut multi-byte character, become U+FFFD); any text round-trips.
    Text is encoded with ``surrogatepass`` so that lone surrogates (possible in JSON escapes)
    do not abort preprocessing; they decode back as U+FFFD.
    """

    name = "byte"
    NUM_BYTES = 256
    EOD = 256
    PAD = 257
    BOS = 258

    def __init__(self, model: Optional[str] = None, *, model_key: str = "model.tokenizer.model") -> None:
        # ``model`` is accepted for a uniform constructor signature; the byte tokenizer has none.
        if model is not None:
            warnings.warn(
                f"{model_key}={model!r} is ignored: the byte tokenizer needs no model file",
                stacklevel=3,
            )

    @property
    def vocab_size(self) -> int:
        return self.NUM_BYTES + len(_SPECIALS)

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
    def unique_identifiers(self) -> "OrderedDict[str, Any]":
        return OrderedDict(
            [
                ("class", type(self).__name__),
                ("library", self.name),
                ("vocab_size", self.vocab_size),
                ("eod", self.eod),
                ("pad", self.pad),
                ("bos", self.bos),
            ]
        )

    @property
    def inv_vocab(self) -> Dict[int, str]:
        inv = {i: bytes([i]).decode("latin-1") for i in range(self.NUM_BYTES)}
        for i, s in enumerate(_SPECIALS):
            inv[self.NUM_BYTES + i] = s
        return inv

    # ------------------------------------------------------------ encoding
    @staticmethod
    def _encode(text: str) -> bytes:
        return text.encode("utf-8", errors="surrogatepass")

    def tokenize(self, text: str) -> List[int]:
        return list(self._encode(text))

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [list(self._encode(t)) for t in texts]

    def tokenize_batch_flat(
        self, texts: Sequence[str], append_eod: bool = False
    ) -> Tuple[np.ndarray, np.ndarray]:
        encoded = [self._encode(t) for t in texts]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        tokens = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int32)
        if append_eod:
            return append_eod_flat(tokens, lengths, self.eod)
        return tokens, lengths

    def detokenize(self, ids: Iterable[int]) -> str:
        arr = np.asarray(ids_to_list(ids), dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= self.vocab_size)][0])
            raise ValueError(
                f"byte tokenizer: token id {bad} is out of range [0, {self.vocab_size})"
            )
        data = arr[arr < self.NUM_BYTES].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")

"""SentencePiece tokenizer (``model.tokenizer.library=sentencepiece``) and a trainer helper."""
from __future__ import annotations

import hashlib
import os
import re
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ext.errors import ConfigError
from megatron_ext.tokenizers.base import Tokenizer, append_eod_flat, ids_to_list

#: the special ids every model written by :func:`train_sentencepiece` defines
DEFAULT_SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


def _import_spm():
    try:
        import sentencepiece
    except ImportError as exc:  # pragma: no cover - sentencepiece is a hard dependency
        raise ConfigError(
            "model.tokenizer.library=sentencepiece needs the 'sentencepiece' package "
            "(pip install sentencepiece)"
        ) from exc
    return sentencepiece


class SentencePieceTokenizer(Tokenizer):
    """Wraps a trained sentencepiece ``.model`` file.

    ``eod`` is the model's eos id (a model without one is rejected), ``pad`` its pad id when
    defined (else ``eod``), ``bos`` its bos id or ``None``. ``num_threads`` is the thread count
    of the batched encode (-1 = all cores).
    """

    name = "sentencepiece"

    def __init__(
        self,
        model: Optional[str] = None,
        num_threads: int = -1,
        *,
        model_key: str = "model.tokenizer.model",
    ) -> None:
        if model is None or (isinstance(model, str) and not model.strip()):
            raise ConfigError(
                f"{model_key} is required for the sentencepiece tokenizer: expected the path of "
                f"a sentencepiece .model file, got {model!r}"
            )
        path = os.path.abspath(os.path.expanduser(str(model)))
        if not os.path.exists(path):
            raise ConfigError(
                f"{model_key}: sentencepiece model file '{path}' does not exist"
            )
        if not os.path.isfile(path):
            raise ConfigError(
                f"{model_key}: '{path}' is not a file (expected a sentencepiece .model file)"
            )
        try:
            with open(path, "rb") as f:
                proto = f.read()
        except OSError as exc:
            raise ConfigError(
                f"{model_key}: cannot read sentencepiece model file '{path}': {exc.strerror}"
            ) from None
        self._path = path
        self._num_threads = int(num_threads)
        self._load(proto, model_key)

    def _load(self, proto: bytes, model_key: str = "model.tokenizer.model") -> None:
        spm = _import_spm()
        sp = spm.SentencePieceProcessor()
        try:
            if not proto:
                raise RuntimeError("file is empty")
            sp.LoadFromSerializedProto(proto)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError on bad protos
            reason = str(exc).strip()
            if not reason or "ParseFromArray" in reason or "src/" in reason:
                reason = "sentencepiece cannot parse it"
            raise ConfigError(
                f"{model_key}: '{self._path}' is not a valid sentencepiece model file "
                f"({reason})"
            ) from None
        eos = sp.eos_id()
        if eos < 0:
            raise ConfigError(
                f"{model_key}: sentencepiece model '{self._path}' defines no eos id, so it has "
                f"no end-of-document token; retrain it with an eos id "
                f"(tools/train_tokenizer.py defines unk/bos/eos/pad)"
            )
        self._sp = sp
        self._proto_md5 = hashlib.md5(proto, usedforsecurity=False).hexdigest()
        self._eod = int(eos)
        pad = sp.pad_id()
        self._pad = int(pad) if pad >= 0 else self._eod
        bos = sp.bos_id()
        self._bos = int(bos) if bos >= 0 else None
        self._vocab_size = int(sp.get_piece_size())

    # pickling (DataLoader workers with spawn): ship the model bytes, not the C++ object
    def __getstate__(self) -> Dict[str, Any]:
        return {
            "path": self._path,
            "num_threads": self._num_threads,
            "proto": self._sp.serialized_model_proto(),
        }

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self._path = state["path"]
        self._num_threads = state["num_threads"]
        self._load(state["proto"])

    # ------------------------------------------------------------------ ids
    @property
    def model_path(self) -> str:
        return self._path

    @property
    def processor(self):
        """The underlying ``sentencepiece.SentencePieceProcessor``."""
        return self._sp

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def bos(self) -> Optional[int]:
        return self._bos

    @property
    def unk(self) -> Optional[int]:
        unk = self._sp.unk_id()
        return int(unk) if unk >= 0 else None

    @property
    def num_threads(self) -> int:
        return self._num_threads

    @num_threads.setter
    def num_threads(self, value: int) -> None:
        self._num_threads = int(value)

    @property
    def unique_identifiers(self) -> "OrderedDict[str, Any]":
        return OrderedDict(
            [
                ("class", type(self).__name__),
                ("library", self.name),
                ("tokenizer_path", [self._path]),
                ("model_md5", self._proto_md5),
                ("vocab_size", self.vocab_size),
                ("eod", self.eod),
                ("pad", self.pad),
                ("bos", self.bos),
            ]
        )

    def describe(self) -> Dict[str, Any]:
        d = super().describe()
        d["model"] = self._path
        d["unk"] = self.unk
        return d

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {i: self._sp.id_to_piece(i) for i in range(self.vocab_size)}

    # ------------------------------------------------------------ encoding
    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text, out_type=int)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        if not isinstance(texts, list):
            texts = list(texts)
        return self._sp.encode(texts, out_type=int, num_threads=self._num_threads)

    def tokenize_batch_flat(
        self, texts: Sequence[str], append_eod: bool = False
    ) -> Tuple[np.ndarray, np.ndarray]:
        if not isinstance(texts, list):
            texts = list(texts)
        arrays = self._sp.encode(texts, out_type="numpy", num_threads=self._num_threads)
        lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        tokens = (
            np.concatenate(arrays).astype(np.int32, copy=False)
            if arrays
            else np.zeros(0, dtype=np.int32)
        )
        if append_eod:
            return append_eod_flat(tokens, lengths, self.eod)
        return tokens, lengths

    def detokenize(self, ids: Iterable[int]) -> str:
        ids = ids_to_list(ids)
        for i in ids:
            if i < 0 or i >= self._vocab_size:
                raise ValueError(
                    f"sentencepiece tokenizer: token id {i} is out of range [0, {self._vocab_size})"
                )
        return self._sp.decode(ids)


# ---------------------------------------------------------------- training
def train_sentencepiece(
    model_prefix: str,
    vocab_size: int,
    *,
    input_files: Optional[Sequence[str]] = None,
    sentences: Optional[Iterable[str]] = None,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    input_sentence_size: int = 2_000_000,
    shuffle_input_sentence: bool = True,
    max_sentence_length: int = 16384,
    byte_fallback: bool = False,
    num_threads: Optional[int] = None,
    verbose: bool = False,
    extra_options: Optional[Dict[str, Any]] = None,
) -> str:
    """Train a sentencepiece model with unk=0, bos=1, eos=2, pad=3 and return the .model path.

    Give either ``input_files`` (plain text, one sentence per line; sentencepiece streams them)
    or ``sentences`` (any iterable of strings, consumed lazily). At most
    ``input_sentence_size`` sentences are kept in memory (reservoir-sampled when
    ``shuffle_input_sentence``), so a large corpus does not have to fit in RAM.
    Raises :class:`ConfigError` when sentencepiece rejects the settings (e.g. a vocabulary
    too large for the corpus).
    """
    spm = _import_spm()
    if (input_files is None) == (sentences is None):
        raise ValueError("train_sentencepiece: give exactly one of input_files / sentences")
    if model_type not in ("unigram", "bpe", "char", "word"):
        raise ConfigError(
            f"model_type: expected one of unigram, bpe, char, word; got {model_type!r}"
        )
    if int(vocab_size) <= len(DEFAULT_SPECIAL_IDS):
        raise ConfigError(
            f"vocab_size: expected more than {len(DEFAULT_SPECIAL_IDS)} (the special tokens), "
            f"got {vocab_size}"
        )
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    kwargs: Dict[str, Any] = dict(
        model_prefix=model_prefix,
        vocab_size=int(vocab_size),
        model_type=model_type,
        character_coverage=float(character_coverage),
        input_sentence_size=int(input_sentence_size),
        shuffle_input_sentence=bool(shuffle_input_sentence),
        max_sentence_length=int(max_sentence_length),
        byte_fallback=bool(byte_fallback),
        num_threads=int(num_threads or os.cpu_count() or 1),
        minloglevel=0 if verbose else 2,
        **DEFAULT_SPECIAL_IDS,
    )
    if extra_options:
        kwargs.update(extra_options)
    feeder = None
    if input_files is not None:
        kwargs["input"] = list(input_files)
    else:
        feeder = _SentenceFeeder(sentences)
        kwargs["sentence_iterator"] = feeder
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as exc:
        if feeder is not None and feeder.error is not None:
            raise feeder.error from None
        raise ConfigError(
            f"sentencepiece training failed (vocab_size={vocab_size}): {_clean_spm_message(exc)}"
        ) from None
    if feeder is not None and feeder.error is not None:
        # the input stopped early with an error: do not leave a model trained on part of it
        for ext in (".model", ".vocab"):
            if os.path.exists(model_prefix + ext):
                os.remove(model_prefix + ext)
        raise feeder.error
    path = model_prefix + ".model"
    if not os.path.isfile(path):  # pragma: no cover - sentencepiece always writes it on success
        raise ConfigError(f"sentencepiece training wrote no model at '{path}'")
    return path


class _SentenceFeeder:
    """Iterator handed to sentencepiece: skips blank sentences and keeps the first exception
    raised by the source (sentencepiece would otherwise wrap it in an opaque RuntimeError)."""

    def __init__(self, sentences: Iterable[str]) -> None:
        self._it = iter(sentences)
        self.error: Optional[BaseException] = None

    def __iter__(self) -> "_SentenceFeeder":
        return self

    def __next__(self) -> str:
        if self.error is not None:
            raise StopIteration
        while True:
            try:
                s = next(self._it)
            except StopIteration:
                raise
            except Exception as exc:  # noqa: BLE001 - re-raised by train_sentencepiece
                self.error = exc
                raise StopIteration from None
            if s and not s.isspace():
                return s


_SPM_LOCATION = re.compile(r"^[A-Za-z_]+:\s*(src/\S+\(\d+\)\s*)?(\[[^\]]*\]\s*)?")


def _clean_spm_message(exc: BaseException) -> str:
    """'INTERNAL: src/x.cc(744) [cond] Vocabulary size too high' -> 'Vocabulary size too high'."""
    msg = str(exc).strip()
    cleaned = _SPM_LOCATION.sub("", msg, count=1).strip()
    return cleaned or msg

"""Megatron ``.bin``/``.idx`` token files (MMIDIDX) written and merged with numpy alone.

Top level (not in megatron_ext.data) so that tools/preprocess_data.py and tools/merge_datasets.py do not import
megatron-core to write a dataset. The files are byte for byte what megatron-core's ``IndexedDatasetBuilder``
writes (``megatron/core/datasets/indexed_dataset.py``), and megatron-core's ``IndexedDataset`` reads them; the
format is described in :mod:`megatron_ext.data.validation`.

* :func:`optimal_dtype`: ``uint16`` tokens when the vocabulary is under 65,500, else ``int32`` (megatron-core's
  ``DType.optimal_dtype``);
* :class:`DatasetWriter`: a ``.bin``/``.idx`` pair written under temporary names (``.bin.tmp``/``.idx.tmp``) in whole
  chunks of documents, sha256 of each file computed on the way, renamed into place by :meth:`DatasetWriter.commit`;
* :func:`read_index`, :func:`check_dataset`: the tables of an ``.idx``, the header checked, or the whole pair checked;
* :func:`merge_into`: several pairs of one dtype concatenated into one pair, in the order given.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_ext.errors import DataError
from megatron_ext.output_files import fsync_path

IDX_MAGIC = b"MMIDIDX\x00\x00"
IDX_VERSION = 1
HEADER_BYTES = 34
# megatron-core's DType codes (integer types only: tokens are integers)
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
               np.dtype(np.int64): 5, np.dtype(np.uint16): 8}
CODE_DTYPES = {c: d for d, c in DTYPE_CODES.items()}
_COPY_BYTES = 16 * 1024 * 1024


def optimal_dtype(vocab_size: Optional[int]) -> np.dtype:
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_COPY_BYTES)
            if not block:
                return h.hexdigest()
            h.update(block)


def _index_bytes(dtype: np.dtype, lengths: np.ndarray, doc_idx: np.ndarray) -> List[bytes]:
    lengths = np.ascontiguousarray(lengths, dtype=np.int32)
    pointers = np.zeros(lengths.shape[0], dtype=np.int64)
    if lengths.shape[0] > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    doc_idx = np.ascontiguousarray(doc_idx, dtype=np.int64)
    head = (IDX_MAGIC + struct.pack("<Q", IDX_VERSION) + struct.pack("<B", DTYPE_CODES[np.dtype(dtype)])
            + struct.pack("<Q", lengths.shape[0]) + struct.pack("<Q", doc_idx.shape[0]))
    return [head, lengths.tobytes(order="C"), pointers.tobytes(order="C"), doc_idx.tobytes(order="C")]


def write_index(idx_path: str, dtype, lengths: np.ndarray, doc_idx: np.ndarray) -> str:
    """Write an ``.idx`` (sequence pointers from the lengths); returns its sha256."""
    h = hashlib.sha256()
    with open(idx_path, "wb") as f:
        for part in _index_bytes(np.dtype(dtype), lengths, doc_idx):
            f.write(part)
            h.update(part)
    return h.hexdigest()


@dataclass
class Index:
    path: str
    dtype: np.dtype
    lengths: np.ndarray  # int32, one per sequence
    doc_idx: np.ndarray  # int64, documents + 1 entries

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))


def read_index(idx_path: str) -> Index:
    """The tables of ``idx_path`` (memory-mapped) after the header checks: magic, version, an integer dtype code, a
    file as long as the header says (a multimodal index is refused); each problem is a DataError naming the file."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:9] != IDX_MAGIC:
        raise DataError(f"{idx_path}: not a Megatron index file (bad magic {head[:9]!r} or a header shorter than "
                        f"{HEADER_BYTES} bytes); the file is corrupt or is not an .idx")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != IDX_VERSION:
        raise DataError(f"{idx_path}: unsupported index version {version}, expected {IDX_VERSION}")
    if head[17] not in CODE_DTYPES:
        raise DataError(f"{idx_path}: dtype code {head[17]} is not an integer token type; expected one of "
                        + ", ".join(f"{c} ({d.name})" for c, d in sorted(CODE_DTYPES.items())))
    s, d = struct.unpack("<QQ", head[18:34])
    expected = HEADER_BYTES + 12 * s + 8 * d
    if s and size == expected + s:
        raise DataError(f"{idx_path}: a multimodal index (one mode byte per sequence); expected a plain token index")
    if size != expected:
        raise DataError(f"{idx_path}: index file is {size} bytes but its header ({s} sequences, {d} document-table "
                        f"entries) describes {expected}; the file is corrupt or truncated")
    mm = np.memmap(idx_path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(mm, dtype=np.int32, count=s, offset=HEADER_BYTES)
    doc_idx = np.frombuffer(mm, dtype=np.int64, count=d, offset=HEADER_BYTES + 12 * s)
    return Index(idx_path, CODE_DTYPES[head[17]], lengths, doc_idx)


def check_dataset(prefix: str, key: str = "--input") -> Index:
    """The index of the pair ``prefix.bin``/``prefix.idx`` after checking it whole: both files present, the header
    (:func:`read_index`), a document table from 0 to the sequence count in increasing order, non-negative lengths,
    sequences stored back to back, a ``.bin`` of the size the index describes. (The same checks as
    :mod:`megatron_ext.data.validation`, without importing megatron-core.)"""
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{key}: {' and '.join(missing)} not found; expected a Megatron dataset (the prefix of a "
                        f".bin/.idx pair, as tools/preprocess_data.py writes)")
    ix = read_index(idx_path)
    s = ix.lengths.shape[0]
    docs = ix.doc_idx
    if docs.shape[0] < 1 or docs[0] != 0 or docs[-1] != s or (docs.shape[0] > 1 and np.any(np.diff(docs) < 0)):
        raise DataError(f"{idx_path}: corrupt document table: expected increasing entries from 0 to the sequence "
                        f"count {s}")
    if s and ix.lengths.min() < 0:
        raise DataError(f"{idx_path}: corrupt index: a sequence has a negative length")
    itemsize = ix.dtype.itemsize
    pointers = np.frombuffer(np.memmap(idx_path, dtype=np.uint8, mode="r"), dtype=np.int64, count=s,
                             offset=HEADER_BYTES + 4 * s)
    expected = np.zeros(s, dtype=np.int64)
    if s > 1:
        np.cumsum(ix.lengths[:-1].astype(np.int64) * itemsize, out=expected[1:])
    if not np.array_equal(pointers, expected):
        bad = int(np.argmax(pointers != expected))
        raise DataError(f"{idx_path}: corrupt index: sequence {bad} starts at byte {int(pointers[bad])} of the .bin, "
                        f"expected {int(expected[bad])} (sequences must be stored back to back)")
    total = ix.num_tokens
    if os.path.getsize(bin_path) != total * itemsize:
        raise DataError(f"{bin_path}: size is {os.path.getsize(bin_path)} bytes, but {idx_path} describes {total} "
                        f"tokens of {ix.dtype.name} = {total * itemsize} bytes; the .bin is truncated or does not "
                        f"belong to this .idx")
    return ix


class DatasetWriter:
    """One ``.bin``/``.idx`` pair at ``prefix``, written as ``prefix.bin.tmp``/``prefix.idx.tmp`` and renamed into
    place by :meth:`commit`; ``add_documents`` takes a chunk of documents (flat tokens + one length each)."""

    def __init__(self, prefix: str, dtype) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.bin_tmp, self.idx_tmp = prefix + ".bin.tmp", prefix + ".idx.tmp"
        self._bin = open(self.bin_tmp, "wb", buffering=0)  # one write per chunk of documents: no buffer needed
        self._sha = hashlib.sha256()
        self._lengths: List[np.ndarray] = []
        self.num_tokens = 0
        self.num_documents = 0
        self.bin_sha256: Optional[str] = None
        self.idx_sha256: Optional[str] = None
        self.bin_size = 0
        self.idx_size = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if lengths.size and int(lengths.max()) > np.iinfo(np.int32).max:
            raise DataError("a document has more than 2^31 tokens")
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        view = memoryview(data)
        while view:
            view = view[self._bin.write(view):]
        self._sha.update(data)
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.num_tokens += int(tokens.shape[0])
        self.num_documents += int(lengths.shape[0])

    def finalize(self, fsync: bool = False) -> None:
        """Close the ``.bin.tmp`` and write the ``.idx.tmp`` (one sequence per document)."""
        if fsync:
            os.fsync(self._bin.fileno())
        self._bin.close()
        self.bin_size = os.path.getsize(self.bin_tmp)
        self.bin_sha256 = self._sha.hexdigest()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        self._lengths = []
        self.idx_sha256 = write_index(self.idx_tmp, self.dtype, lengths,
                                      np.arange(lengths.shape[0] + 1, dtype=np.int64))
        if fsync:
            fsync_path(self.idx_tmp)
        self.idx_size = os.path.getsize(self.idx_tmp)

    def commit(self) -> None:
        os.replace(self.bin_tmp, self.prefix + ".bin")
        os.replace(self.idx_tmp, self.prefix + ".idx")

    def abort(self) -> None:
        try:
            self._bin.close()
        except Exception:
            pass
        for p in (self.bin_tmp, self.idx_tmp):
            if os.path.exists(p):
                os.remove(p)

    def files(self) -> dict:
        """``{path: {"size", "sha256"}}`` of the final files (after :meth:`finalize`)."""
        return {self.prefix + ".bin": {"size": self.bin_size, "sha256": self.bin_sha256},
                self.prefix + ".idx": {"size": self.idx_size, "sha256": self.idx_sha256}}


def check_same_dtype(indexes: Sequence[Index], what: str = "--input") -> np.dtype:
    """The common dtype of ``indexes``; a DataError names the first file whose dtype differs."""
    first = indexes[0]
    for ix in indexes[1:]:
        if ix.dtype != first.dtype:
            raise DataError(
                f"{what}: {ix.path} holds {ix.dtype.name} tokens but {first.path} holds {first.dtype.name}; "
                f"datasets of different token dtypes cannot be merged (re-create one with the other's tokenizer)"
            )
    return first.dtype


def merge_into(prefixes: Sequence[str], bin_path: str, idx_path: str,
               indexes: Optional[Sequence[Index]] = None) -> Tuple[int, int, int]:
    """Concatenate the datasets ``prefixes`` (in that order) into ``bin_path``/``idx_path``.

    The document table of each input is shifted by the sequences before it (as megatron-core's
    ``IndexedDatasetBuilder.add_index``); the ``.bin`` files are copied as they are. Returns
    ``(sequences, documents, tokens)``."""
    if indexes is None:
        indexes = [read_index(p + ".idx") for p in prefixes]
    dtype = check_same_dtype(indexes)
    lengths, docs = [], [np.zeros(1, np.int64)]
    offset = 0
    for ix in indexes:
        lengths.append(ix.lengths)
        docs.append(ix.doc_idx[1:] + offset)
        offset += ix.lengths.shape[0]
    with open(bin_path, "wb") as out:
        for p in prefixes:
            with open(p + ".bin", "rb") as f:
                while True:
                    block = f.read(_COPY_BYTES)
                    if not block:
                        break
                    out.write(block)
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
    doc_idx = np.concatenate(docs)
    write_index(idx_path, dtype, all_lengths, doc_idx)
    return int(all_lengths.shape[0]), int(doc_idx.shape[0] - 1), int(all_lengths.sum(dtype=np.int64))


__all__ = ["DatasetWriter", "Index", "check_dataset", "check_same_dtype", "merge_into", "optimal_dtype", "read_index", "sha256_file", "write_index"]

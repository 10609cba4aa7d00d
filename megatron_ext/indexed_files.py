"""Megatron ``.bin``/``.idx`` token files (MMIDIDX) written and merged with numpy alone.

Top level (not in megatron_ext.data) so that tools/preprocess_data.py and tools/merge_datasets.py do not import
megatron-core to write a dataset. The files are byte for byte what megatron-core's ``IndexedDatasetBuilder``
writes (``megatron/core/datasets/indexed_dataset.py``), and megatron-core's ``IndexedDataset`` reads them; the
format is described in :mod:`megatron_ext.data.validation`.

* :func:`optimal_dtype`: ``uint16`` tokens when the vocabulary is under 65,500, else ``int32`` (megatron-core's
  ``DType.optimal_dtype``);
* :class:`DatasetWriter`: a ``.bin``/``.idx`` pair written under temporary names (``.bin.tmp``/``.idx.tmp``) in whole
  chunks of documents, sha256 of each file computed on the way, renamed into place by :meth:`DatasetWriter.commit`;
* :func:`read_index`: the tables of an ``.idx`` (header checks only; :mod:`megatron_ext.data.validation` checks more);
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
    """The tables of ``idx_path`` (memory-mapped); a DataError names the file when the header is not MMIDIDX."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:9] != IDX_MAGIC:
        raise DataError(f"{idx_path}: not a Megatron index file (bad magic or truncated header)")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != IDX_VERSION or head[17] not in CODE_DTYPES:
        raise DataError(f"{idx_path}: unsupported index (version {version}, dtype code {head[17]})")
    s, d = struct.unpack("<QQ", head[18:34])
    if size != HEADER_BYTES + 12 * s + 8 * d:
        raise DataError(f"{idx_path}: index file is {size} bytes, its header describes "
                        f"{HEADER_BYTES + 12 * s + 8 * d}; the file is corrupt")
    mm = np.memmap(idx_path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(mm, dtype=np.int32, count=s, offset=HEADER_BYTES)
    doc_idx = np.frombuffer(mm, dtype=np.int64, count=d, offset=HEADER_BYTES + 12 * s)
    return Index(idx_path, CODE_DTYPES[head[17]], lengths, doc_idx)


class DatasetWriter:
    """One ``.bin``/``.idx`` pair at ``prefix``, written as ``prefix.bin.tmp``/``prefix.idx.tmp`` and renamed into
    place by :meth:`commit`; ``add_documents`` takes a chunk of documents (flat tokens + one length each)."""

    def __init__(self, prefix: str, dtype) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.bin_tmp, self.idx_tmp = prefix + ".bin.tmp", prefix + ".idx.tmp"
        self._bin = open(self.bin_tmp, "wb")
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
        self._bin.write(data)
        self._sha.update(data)
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.num_tokens += int(tokens.shape[0])
        self.num_documents += int(lengths.shape[0])

    def finalize(self, fsync: bool = False) -> None:
        """Close the ``.bin.tmp`` and write the ``.idx.tmp`` (one sequence per document)."""
        if fsync:
            self._bin.flush()
            os.fsync(self._bin.fileno())
        self._bin.close()
        self.bin_size = os.path.getsize(self.bin_tmp)
        self.bin_sha256 = self._sha.hexdigest()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        self._lengths = []
        self.idx_sha256 = write_index(self.idx_tmp, self.dtype, lengths,
                                      np.arange(lengths.shape[0] + 1, dtype=np.int64))
        if fsync:
            _fsync_path(self.idx_tmp)
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


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    try:
        _fsync_path(path or ".")
    except OSError:  # pragma: no cover - some file systems cannot fsync a directory
        pass


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


__all__ = ["DatasetWriter", "Index", "merge_into", "optimal_dtype", "read_index", "sha256_file", "write_index"]

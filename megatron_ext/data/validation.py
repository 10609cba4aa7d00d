"""Checks on Megatron ``.bin``/``.idx`` token datasets, run *before* megatron-core opens them.

megatron-core reports a bad file with an ``assert``, a ``struct.error`` or a numpy error from
deep inside its readers. Here every problem becomes one :class:`~megatron_ext.errors.DataError`
that names the file and says what was expected:

* a missing ``.bin`` or ``.idx`` (which of the pair, and how to create it);
* a corrupt or truncated ``.idx``: bad magic, bad version, unknown or float dtype code, a file
  shorter (or longer) than its header says, inconsistent document/sequence tables;
* a ``.bin`` whose size is not ``sum(sequence_lengths) * itemsize``;
* token ids outside ``[0, vocab_size)`` for the tokenizer in use;
* an empty dataset, or a train/valid/test split that gets no documents although samples
  are requested from it.

The ``.idx`` format (Megatron "MMIDIDX", little endian)::

    9 bytes  magic b"MMIDIDX\\x00\\x00"
    8 bytes  version (uint64, == 1)
    1 byte   dtype code of the tokens in .bin
    8 bytes  sequence count S (uint64)
    8 bytes  document count D (uint64) -- length of the document table, i.e. documents + 1
    S int32  sequence lengths (tokens)
    S int64  sequence byte offsets into .bin
    D int64  document table: sequence index where each document starts, then S

The full scan (tables + every token of ``.bin``) is cached per file, keyed by the size and
mtime of both files, in ``<cache_dir>/data_stats/``; only the O(1) header checks run again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ext.errors import DataError

logger = logging.getLogger(__name__)

IDX_MAGIC = b"MMIDIDX\x00\x00"
IDX_VERSION = 1
HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # 34

# Integer codes are the same in every Megatron-derived project; float codes are not, and a
# float token file is a mistake anyway.
TOKEN_DTYPES: Dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    8: np.uint16,
}
FLOAT_DTYPE_CODES = {6: "float64", 7: "float32"}

PREPROCESS_HINT = "create the pair with tools/preprocess_data.py"
_STATS_VERSION = 1
_CHUNK = 1 << 24  # elements per chunk when scanning


@dataclass
class IndexedDataInfo:
    """What the checks learned about one ``.bin``/``.idx`` pair."""

    prefix: str
    bin_path: str
    idx_path: str
    dtype: str  # numpy dtype name of the tokens
    num_sequences: int
    num_documents: int
    num_tokens: int
    min_token_id: int
    max_token_id: int


def data_file_paths(prefix: str) -> Tuple[str, str]:
    """``(<prefix>.bin, <prefix>.idx)``."""
    return prefix + ".bin", prefix + ".idx"


def check_files_exist(prefix: str, key: str = "model.data.data_prefix") -> Tuple[str, str]:
    """Raise a DataError naming the missing file(s) of the pair; return ``(bin, idx)``."""
    bin_path, idx_path = data_file_paths(prefix)
    has_bin, has_idx = os.path.isfile(bin_path), os.path.isfile(idx_path)
    if has_bin and has_idx:
        return bin_path, idx_path
    if os.path.isdir(prefix):
        raise DataError(
            f"{key}: {prefix!r} is a directory; expected a dataset prefix, i.e. the path without "
            f"the .bin/.idx extension (<dir>/<name> for <dir>/<name>.bin and <dir>/<name>.idx)"
        )
    if not has_bin and not has_idx:
        raise DataError(
            f"{key}: neither {bin_path} nor {idx_path} exists; expected a Megatron token dataset "
            f"(the prefix of a .bin/.idx pair) -- {PREPROCESS_HINT}"
        )
    missing, present = (bin_path, idx_path) if not has_bin else (idx_path, bin_path)
    which = ".bin (token data)" if not has_bin else ".idx (index)"
    raise DataError(
        f"{key}: the {which} file {missing} is missing (found {present}); the .bin and .idx of a "
        f"dataset must sit side by side -- {PREPROCESS_HINT}"
    )


@dataclass
class _Header:
    dtype: type
    num_sequences: int
    doc_table_len: int
    idx_size: int


def read_idx_header(idx_path: str) -> _Header:
    """O(1) checks: magic, version, dtype code, and that the file is as long as the header says."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < 9 or head[:9] != IDX_MAGIC:
        raise DataError(
            f"{idx_path}: not a Megatron index file (bad magic {head[:9]!r}, expected {IDX_MAGIC!r}); "
            f"the file is corrupt or is not an .idx -- {PREPROCESS_HINT}"
        )
    if len(head) < HEADER_BYTES:
        raise DataError(
            f"{idx_path}: truncated index file ({size} bytes, the header alone needs {HEADER_BYTES}) -- "
            f"re-create it with tools/preprocess_data.py"
        )
    (version,) = struct.unpack("<Q", head[9:17])
    if version != IDX_VERSION:
        raise DataError(f"{idx_path}: unsupported index version {version}, expected {IDX_VERSION}")
    code = head[17]
    if code in FLOAT_DTYPE_CODES:
        raise DataError(
            f"{idx_path}: dtype code {code} ({FLOAT_DTYPE_CODES[code]}) is a float type; token data must "
            f"be integer (codes {sorted(TOKEN_DTYPES)}) -- float codes also differ between projects"
        )
    if code not in TOKEN_DTYPES:
        raise DataError(
            f"{idx_path}: unknown dtype code {code}; expected one of "
            + ", ".join(f"{c} ({np.dtype(t).name})" for c, t in sorted(TOKEN_DTYPES.items()))
        )
    num_seq, doc_len = struct.unpack("<QQ", head[18:34])
    expected = HEADER_BYTES + num_seq * (4 + 8) + doc_len * 8
    if size < expected:
        raise DataError(
            f"{idx_path}: truncated index file: {size} bytes, but its header ({num_seq} sequences, "
            f"{doc_len} document-table entries) needs {expected} bytes -- re-create it with "
            f"tools/preprocess_data.py"
        )
    if num_seq and size == expected + num_seq:  # (with no sequences the two layouts are the same file)
        raise DataError(
            f"{idx_path}: this is a multimodal index (one mode byte per sequence); GPT datasets "
            f"expect a plain token index"
        )
    if size != expected:
        raise DataError(
            f"{idx_path}: index file is {size} bytes but its header ({num_seq} sequences, {doc_len} "
            f"document-table entries) describes {expected} bytes; the file is corrupt"
        )
    return _Header(TOKEN_DTYPES[code], int(num_seq), int(doc_len), int(size))


def _stats_path(cache_dir: Optional[str], bin_path: str) -> Optional[str]:
    if not cache_dir:
        return None
    key = hashlib.md5(os.path.abspath(bin_path).encode("utf-8")).hexdigest()
    return os.path.join(cache_dir, "data_stats", f"{key}.json")


def _file_key(bin_path: str, idx_path: str) -> dict:
    b, i = os.stat(bin_path), os.stat(idx_path)
    return {
        "version": _STATS_VERSION,
        "bin_path": os.path.abspath(bin_path),
        "bin_size": b.st_size,
        "bin_mtime_ns": b.st_mtime_ns,
        "idx_size": i.st_size,
        "idx_mtime_ns": i.st_mtime_ns,
    }


def _load_stats(path: Optional[str], key: dict) -> Optional[dict]:
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if data.get("key") != key:
        return None
    return data.get("info")


def _save_stats(path: Optional[str], key: dict, info: IndexedDataInfo) -> None:
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": key, "info": asdict(info)}, f)
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache only costs a re-scan next time
        logger.warning("could not cache data stats in %s: %s", path, err)


def _check_tables(idx_path: str, bin_path: str, header: _Header) -> int:
    """Check the sequence/document tables of the .idx against each other and the .bin size.

    Returns the number of tokens. Works in chunks so huge indexes do not need huge temporaries.
    """
    s, d = header.num_sequences, header.doc_table_len
    itemsize = np.dtype(header.dtype).itemsize
    mm = np.memmap(idx_path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(mm, dtype=np.int32, count=s, offset=HEADER_BYTES)
    pointers = np.frombuffer(mm, dtype=np.int64, count=s, offset=HEADER_BYTES + 4 * s)
    docs = np.frombuffer(mm, dtype=np.int64, count=d, offset=HEADER_BYTES + 12 * s)

    if d < 1 or docs[0] != 0 or docs[-1] != s:
        first = int(docs[0]) if d else None
        last = int(docs[-1]) if d else None
        raise DataError(
            f"{idx_path}: corrupt document table (starts at {first}, ends at {last}); expected it to "
            f"start at 0 and end at the sequence count {s}"
        )
    total = 0
    expected_ptr = 0
    for beg in range(0, s, _CHUNK):
        ln = lengths[beg : beg + _CHUNK].astype(np.int64)
        if ln.size and ln.min() < 0:
            bad = beg + int(np.argmax(ln < 0))
            raise DataError(f"{idx_path}: corrupt index: sequence {bad} has negative length {int(lengths[bad])}")
        starts = expected_ptr + np.concatenate(([0], np.cumsum(ln[:-1] * itemsize)))
        got = pointers[beg : beg + _CHUNK]
        if not np.array_equal(starts, got):
            bad = beg + int(np.argmax(starts != got))
            raise DataError(
                f"{idx_path}: corrupt index: sequence {bad} starts at byte {int(pointers[bad])} of the "
                f".bin, expected {int(starts[bad - beg])} (sequences must be stored back to back)"
            )
        n = int(ln.sum())
        total += n
        expected_ptr += n * itemsize
    for beg in range(0, d, _CHUNK):
        chunk = docs[beg : beg + _CHUNK + 1]
        if chunk.size > 1 and np.any(np.diff(chunk) < 0):
            raise DataError(f"{idx_path}: corrupt document table: entries are not in increasing order")
    bin_size = os.path.getsize(bin_path)
    if bin_size != total * itemsize:
        raise DataError(
            f"{bin_path}: size is {bin_size} bytes, but {idx_path} describes {total} tokens of "
            f"{np.dtype(header.dtype).name} = {total * itemsize} bytes; the .bin is truncated or does "
            f"not belong to this .idx -- {PREPROCESS_HINT}"
        )
    del lengths, pointers, docs, mm
    return total


def scan_token_range(bin_path: str, dtype, num_tokens: int) -> Tuple[int, int]:
    """Min and max token id of a .bin file, read in chunks through a memory map."""
    if num_tokens == 0:
        return 0, -1
    mm = np.memmap(bin_path, dtype=dtype, mode="r", shape=(num_tokens,))
    lo, hi = None, None
    for beg in range(0, num_tokens, _CHUNK):
        chunk = mm[beg : beg + _CHUNK]
        cmin, cmax = int(chunk.min()), int(chunk.max())
        lo = cmin if lo is None else min(lo, cmin)
        hi = cmax if hi is None else max(hi, cmax)
    del mm
    return lo, hi


def _locate_token(bin_path: str, idx_path: str, header: _Header, predicate) -> Optional[Tuple[int, int, int]]:
    """(token position, sequence index, token value) of the first token where predicate holds."""
    s = header.num_sequences
    mm = np.memmap(bin_path, dtype=header.dtype, mode="r")
    pos = None
    for beg in range(0, mm.shape[0], _CHUNK):
        hit = predicate(mm[beg : beg + _CHUNK])
        if hit.any():
            pos = beg + int(np.argmax(hit))
            break
    if pos is None:
        return None
    value = int(mm[pos])
    lengths = np.fromfile(idx_path, dtype=np.int32, count=s, offset=HEADER_BYTES).astype(np.int64)
    seq = int(np.searchsorted(np.cumsum(lengths), pos, side="right"))
    return pos, seq, value


def inspect_indexed_dataset(prefix: str, cache_dir: Optional[str] = None,
                            key: str = "model.data.data_prefix", use_cache: bool = True) -> IndexedDataInfo:
    """All file-level checks of one prefix (no tokenizer needed). Results are cached."""
    bin_path, idx_path = check_files_exist(prefix, key)
    header = read_idx_header(idx_path)
    stats_path = _stats_path(cache_dir, bin_path)
    fkey = _file_key(bin_path, idx_path)
    cached = _load_stats(stats_path, fkey) if use_cache else None
    if cached is not None:
        cached["prefix"] = prefix
        return IndexedDataInfo(**cached)
    num_tokens = _check_tables(idx_path, bin_path, header)
    lo, hi = scan_token_range(bin_path, header.dtype, num_tokens)
    info = IndexedDataInfo(
        prefix=prefix,
        bin_path=bin_path,
        idx_path=idx_path,
        dtype=np.dtype(header.dtype).name,
        num_sequences=header.num_sequences,
        num_documents=header.doc_table_len - 1,
        num_tokens=num_tokens,
        min_token_id=lo,
        max_token_id=hi,
    )
    _save_stats(stats_path, fkey, info)
    return info


def validate_indexed_dataset(
    prefix: str,
    vocab_size: Optional[int] = None,
    cache_dir: Optional[str] = None,
    tokenizer_name: Optional[str] = None,
    key: str = "model.data.data_prefix",
) -> IndexedDataInfo:
    """Check one ``.bin``/``.idx`` pair and, with ``vocab_size``, its token ids. Raise DataError."""
    info = inspect_indexed_dataset(prefix, cache_dir, key)
    try:
        _check_info(info, vocab_size, tokenizer_name)
    except _StaleStats:  # the cached scan disagrees with the file (e.g. rewritten within one mtime tick)
        info = inspect_indexed_dataset(prefix, cache_dir, key, use_cache=False)
        _check_info(info, vocab_size, tokenizer_name)
    return info


class _StaleStats(Exception):
    pass


def _check_info(info: IndexedDataInfo, vocab_size: Optional[int], tokenizer_name: Optional[str]) -> None:
    if info.num_sequences == 0 or info.num_tokens == 0:
        raise DataError(
            f"{info.idx_path}: the dataset is empty ({info.num_sequences} documents, {info.num_tokens} "
            f"tokens); expected at least one non-empty document -- check the input of tools/preprocess_data.py"
        )
    tok = f"tokenizer {tokenizer_name!r}" if tokenizer_name else "the tokenizer"
    if info.min_token_id < 0:
        header = read_idx_header(info.idx_path)
        found = _locate_token(info.bin_path, info.idx_path, header, lambda c: c < 0)
        if found is None:
            raise _StaleStats()
        pos, seq, value = found
        raise DataError(
            f"{info.bin_path}: negative token id {value} (first at token {pos}, document {seq}); "
            f"token ids must be in [0, vocab_size) -- the file is corrupt or was written with another dtype"
        )
    if vocab_size is not None and info.max_token_id >= vocab_size:
        header = read_idx_header(info.idx_path)
        found = _locate_token(info.bin_path, info.idx_path, header, lambda c: c >= vocab_size)
        if found is None:
            raise _StaleStats()
        pos, seq, value = found
        raise DataError(
            f"{info.bin_path}: token id {info.max_token_id} is out of range for {tok} with vocab_size "
            f"{vocab_size} (ids must be < {vocab_size}; first bad id {value} at token {pos}, document {seq}); "
            f"the data was tokenized with a different tokenizer -- set model.tokenizer to the one used by "
            f"tools/preprocess_data.py, or re-run it with this tokenizer"
        )


def split_document_ranges(num_documents: int, split_matrix: Sequence[Optional[Tuple[float, float]]]
                          ) -> List[Optional[Tuple[int, int]]]:
    """The [begin, end) sequence range each split takes, exactly as megatron-core rounds it."""
    out: List[Optional[Tuple[int, int]]] = []
    for bookends in split_matrix:
        if bookends is None:
            out.append(None)
        else:
            beg = int(round(bookends[0] * float(num_documents)))
            end = int(round(bookends[1] * float(num_documents)))
            out.append((beg, end))
    return out


_SPLIT_NAMES = ("train", "validation", "test")


def check_splits(
    info: IndexedDataInfo,
    split_matrix: Sequence[Optional[Tuple[float, float]]],
    sizes: Sequence[int],
    splits_key: str = "model.data.splits_string",
    splits_value: Optional[str] = None,
) -> None:
    """Raise DataError when a split that samples are requested from gets no documents/tokens.

    megatron-core would otherwise loop forever (it adds epochs of zero tokens until it has
    enough) or fail with an index error.
    """
    ranges = split_document_ranges(info.num_sequences, split_matrix)
    lengths = None
    for i, rng in enumerate(ranges):
        if rng is None or not sizes[i]:
            continue
        beg, end = rng
        shown = f"={splits_value!r}" if splits_value is not None else ""
        if end <= beg:
            raise DataError(
                f"{info.prefix}: the {_SPLIT_NAMES[i]} split gets 0 of the {info.num_sequences} documents "
                f"with {splits_key}{shown}, but {sizes[i]} {_SPLIT_NAMES[i]} samples are needed; use more "
                f"documents or give the {_SPLIT_NAMES[i]} split a larger share in {splits_key}"
            )
        if lengths is None:
            lengths = np.fromfile(info.idx_path, dtype=np.int32, count=info.num_sequences, offset=HEADER_BYTES)
        if int(lengths[beg:end].astype(np.int64).sum()) == 0:
            raise DataError(
                f"{info.prefix}: the {_SPLIT_NAMES[i]} split (documents {beg}..{end - 1}) has no tokens, "
                f"but {sizes[i]} {_SPLIT_NAMES[i]} samples are needed; check {splits_key}{shown}"
            )

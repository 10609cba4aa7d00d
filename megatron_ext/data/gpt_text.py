"""GPT datasets over raw text or JSONL files, tokenized on the fly (``model.data.data_impl=text_mmap`` / ``jsonl``).

    python pretrain_gpt.py model.data.data_impl=text_mmap model.data.data_prefix=[1.0,corpus.txt]
    python pretrain_gpt.py model.data.data_impl=jsonl model.data.text_key=text \\
        model.data.data_prefix=[0.7,a.jsonl,0.3,b.jsonl]

Same samples as preprocessing
-----------------------------
A document is what ``tools/preprocess_data.py --append-eod`` makes of the file, with the same tokenizer:

* ``text_mmap``: one line is one document; lines that are empty or whitespace only are skipped; ``\\r\\n`` line
  ends are accepted; a UTF-8 byte-order mark at the start of the file is dropped;
* ``jsonl``: one JSON object per line, the document is the string under ``model.data.text_key`` (``--json-keys``
  with that one key); blank lines are skipped, an empty string is an (eod-only) document;
* the tokens of the text, then the tokenizer's ``eod`` (not a second one when a Hugging Face tokenizer's
  post-processor already ends every text with it).

On top of these documents sits megatron-core's own ``GPTDataset`` (:class:`TextGPTDataset` only changes where the
documents come from), so the train/valid/test split by ``splits_string``, the blend, the shuffled
document/sample/shuffle indices and the packing of documents into ``seq_length + 1`` token samples are exactly
those of ``data_impl=mmap`` over the preprocessed ``.bin/.idx``: sample ``i`` of every split has the same tokens
(tested on tinyshakespeare). Blends are ``[w1, f1, w2, f2, ...]``; ``blend_per_split`` takes whole files per split.

The low-level dataset (:class:`TextDocumentTokens`)
---------------------------------------------------
megatron-core's ``IndexedDataset`` interface over one file: ``sequence_lengths`` (int32 tokens per document,
eod included), ``document_indices``, ``len()``, ``get(idx, offset, length)``. The file's lines come from the
newline index of :class:`~megatron_ext.data.text_mmap.TextMemMapDataset` (``<file>.idx.npy``, built once).
Which lines are documents and how many tokens each has needs one pass over the file with the tokenizer; it is
done once per (file, tokenizer, data_impl, text_key) and cached beside the newline index as
``<file>.gptdocs-<key>.{lines,lengths}.npy`` + ``.json`` (the JSON, written last, records the file's size,
mtime and checksum; a changed file is scanned again). That pass also checks the file: bytes that are not UTF-8, a
line that is not a JSON object, a missing ``text_key`` or a non-string text are one ``DataError`` naming the
file and line. ``get`` reads the line from the memory-mapped file and tokenizes it (the byte tokenizer slices
the raw bytes: no decoding); a document whose token count differs from the cached one means the file changed
during the run (``DataError``).

Caches and several processes
----------------------------
Token counts: rank 0 builds them first, then the lowest rank of every other host (which only loads them when it
sees rank 0's files, else writes its own, node-local ones), then all other ranks load them; so no two processes
write the same cache file, and all files are written under a temporary name and renamed. The sample-index cache
(``model.data.index_mapping_dir``, default ``<dir of the first file>/cache``, or under ``$XDG_CACHE_HOME`` when
that directory is not writable) is built as for ``data_impl=mmap`` (:mod:`megatron_ext.data.gpt_data`: rank 0,
plus one child process per host that does not share rank 0's cache directory). Its key (megatron-core's
description hash) holds the class, each file's path, document and token counts and an MD5 of its token counts
(what the indices are computed from; identical for identical copies of the file on several nodes, whatever their
mtimes), the tokenizer's identifiers, ``data_impl`` and ``text_key``, besides megatron-core's own (seed, sequence
length, split, sizes).

Cost: tokenizing on the fly costs loader time per sample (see ``bench/bench_text_gpt.py``); preprocessing stays
the fast path for big corpora and long documents (a sample cut from a long document tokenizes all of it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections import OrderedDict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_ext.data.collective import all_gather, collective_check, world
from megatron_ext.data.gpt_data import (
    TokenizerInfo,
    _prebuild_in_child,
    _run_builder,
    _SingleProcessGroup,
    plan_index_builders,
)
from megatron_ext.data.prefixes import (
    PREFIX_KEY,
    SPLITS_KEY,
    as_list,
    is_split_dict,
    parse_split_prefixes,
    parse_splits_string,
    parse_text_paths,
)
from megatron_ext.data.text_mmap import (
    TextMemMapDataset,
    _dir_writable,
    _is_byte_tokenizer,
    _load_json,
    _mirror,
    _save_json,
    _save_npy,
    check_jsonl_keys,
    default_index_cache_dir,
    file_fingerprint,
    parse_jsonl_line,
)
from megatron_ext.data.validation import split_document_ranges
from megatron_ext.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

GPT_TEXT_IMPLS = ("text_mmap", "jsonl")
DOCS_VERSION = 2
_SCAN_LINES = 8192  # lines per block of the one-time scan
_BOM = b"\xef\xbb\xbf"
_SPLIT_NAMES = ("train", "validation", "test")


# ============================================================================ the low-level dataset
class TextDocumentTokens:
    """The documents of one text (``text_mmap``) or JSONL (``jsonl``) file as megatron-core's ``IndexedDataset``
    sees a ``.bin/.idx`` pair (see the module docstring). Picklable (DataLoader workers reopen the memory map)."""

    def __init__(self, path: str, data_impl: str, tokenizer: Any, index_mapping_dir: Optional[str] = None,
                 text_key: str = "text") -> None:
        if data_impl not in GPT_TEXT_IMPLS:
            raise ConfigError(f"model.data.data_impl={data_impl!r}: expected one of {', '.join(GPT_TEXT_IMPLS)}")
        self.path = self.path_prefix = os.path.abspath(os.path.expanduser(str(path)))
        self.data_impl = data_impl
        self.text_key = text_key
        self.tokenizer = tokenizer
        self.eod = int(tokenizer.eod)
        self._byte_tok = _is_byte_tokenizer(tokenizer)
        # a Hugging Face post-processor that ends every text with eod already (preprocess_data appends none then)
        self._eod_added = 0 if getattr(tokenizer, "ends_with_eod", False) else 1
        self._lines = TextMemMapDataset(self.path, index_mapping_dir=index_mapping_dir)  # the newline index
        self.fingerprint = file_fingerprint(self.path)
        if self.fingerprint["size"] != int(self._lines._sizes[0]):
            raise DataError(f"{self.path} changed while it was being opened; try again")
        self._size = int(self._lines._sizes[0])
        self._ends = self._lines._ends[0]
        ident = {"tokenizer": tokenizer.unique_identifiers, "data_impl": data_impl,
                 "text_key": text_key if data_impl == "jsonl" else None}
        self.cache_key = hashlib.md5(json.dumps(ident, sort_keys=True, default=str).encode("utf-8"),
                                     usedforsecurity=False).hexdigest()[:16]
        self.doc_lines, lengths = self._load_or_build()
        self.sequence_lengths = np.asarray(lengths, dtype=np.int32)
        if self.sequence_lengths.shape[0] == 0:
            what = "lines" if data_impl == "text_mmap" else "JSON objects"
            raise DataError(
                f"{self.path}: no documents ({'empty file' if self._size == 0 else 'only blank lines'}); "
                f"model.data.data_impl={data_impl} expects {what}, one document per line"
            )
        self.document_indices = np.arange(self.sequence_lengths.shape[0] + 1, dtype=np.int64)

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["doc_lines"] = np.asarray(self.doc_lines)
        state["sequence_lengths"] = np.asarray(self.sequence_lengths)
        state["_ends"] = np.asarray(self._ends)
        return state

    # ------------------------------------------------------------------ the one-time scan
    def _where(self, line: int) -> str:
        return f"{self.path}, line {line + 1}"

    def _text_of(self, text: str, line: int) -> Optional[str]:
        """The document text of a decoded line (``\\r`` and BOM removed); None for a line that is no document."""
        if not text or text.isspace():
            return None
        if self.data_impl == "text_mmap":
            return text
        return parse_jsonl_line(text, self.text_key, self._where(line))[self.text_key]

    def _decode(self, raw: bytes, first_line: int, offset: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            pos = offset + exc.start
            line = int(np.searchsorted(np.asarray(self._ends), pos, side="left"))
            raise DataError(
                f"{self._where(line)}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at file offset {pos}); "
                f"model.data.data_impl={self.data_impl} reads UTF-8 text"
            ) from None

    def _scan(self) -> Tuple[np.ndarray, np.ndarray]:
        ends = np.asarray(self._ends)
        n = int(ends.shape[0])
        mm = self._lines._mm(0)
        doc_lines: List[np.ndarray] = []
        lengths: List[np.ndarray] = []
        for beg in range(0, n, _SCAN_LINES):
            end = min(n, beg + _SCAN_LINES)
            first = int(ends[beg - 1]) + 1 if beg else 0
            raw = bytes(mm[first:int(ends[end - 1])])
            offset = first
            if beg == 0 and raw.startswith(_BOM):
                raw, offset = raw[len(_BOM):], len(_BOM)
            lines = self._decode(raw, beg, offset).split("\n")
            if len(lines) != end - beg:  # pragma: no cover - the index and the file disagree
                raise DataError(f"{self.path} changed while it was being read; try again")
            texts, which = [], []
            for i, text in enumerate(lines):
                if text.endswith("\r") and int(ends[beg + i]) < self._size:  # \r\n (preprocess_data's rule)
                    text = text[:-1]
                doc = self._text_of(text, beg + i)
                if doc is not None:
                    texts.append(doc)
                    which.append(beg + i)
            if texts:
                _, lens = self.tokenizer.tokenize_batch_flat(texts)
                doc_lines.append(np.asarray(which, dtype=np.int64))
                lengths.append(np.asarray(lens, dtype=np.int64) + self._eod_added)  # + eod
        if not doc_lines:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
        out = np.concatenate(lengths)
        if out.max(initial=0) > np.iinfo(np.int32).max:
            raise DataError(f"{self.path}: a document has more than 2^31 tokens")
        return np.concatenate(doc_lines), out.astype(np.int32)

    def _candidates(self) -> List[str]:
        return self._lines._candidates(self.path)

    def _load_or_build(self) -> Tuple[np.ndarray, np.ndarray]:
        """(document lines, token counts) from the cache, or scanned and cached; sets :attr:`identity`."""
        n_lines = int(len(self._ends))
        expected = {"version": DOCS_VERSION, "key": self.cache_key, "data_impl": self.data_impl,
                    "num_lines": n_lines, **self.fingerprint}
        name = f"gptdocs-{self.cache_key}"
        for base in self._candidates():
            info = _load_json(f"{base}.{name}.json")
            if info is None or any(info.get(k) != v for k, v in expected.items()):
                continue
            n = info.get("num_documents")
            try:  # memory-mapped, as IndexedDataset's tables are (a big corpus has many documents)
                lines = np.load(f"{base}.{name}.lines.npy", mmap_mode="r" if n else None)
                lengths = np.load(f"{base}.{name}.lengths.npy", mmap_mode="r" if n else None)
            except (OSError, ValueError):
                continue
            if lines.shape == (n,) and lengths.shape == (n,) and lines.dtype == np.int64 and lengths.dtype == np.int32 \
                    and isinstance(info.get("lengths_md5"), str):
                self.identity = {k: info[k] for k in ("num_documents", "num_tokens", "lengths_md5")}
                return lines, lengths
        logger.info("%s: finding the documents of %d lines and counting their tokens (once; cached)", self.path,
                    n_lines)
        lines, lengths = self._scan()
        if file_fingerprint(self.path) != self.fingerprint:
            raise DataError(f"{self.path} changed while it was being read; try again")
        self.identity = {"num_documents": int(lines.shape[0]), "num_tokens": int(lengths.astype(np.int64).sum()),
                         "lengths_md5": hashlib.md5(np.ascontiguousarray(lengths).tobytes(),
                                                    usedforsecurity=False).hexdigest()}
        base = self._lines._writable_base(self.path, "document token counts")
        _save_npy(f"{base}.{name}.lines.npy", lines)
        _save_npy(f"{base}.{name}.lengths.npy", lengths)
        _save_json(f"{base}.{name}.json", {**expected, **self.identity, "path": self.path, "text_key": self.text_key,
                                           "tokenizer": self.tokenizer.unique_identifiers})
        return lines, lengths

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return int(self.sequence_lengths.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.astype(np.int64).sum())

    def _raw(self, idx: int) -> bytes:
        line = int(self.doc_lines[idx])
        ends = self._ends
        beg = int(ends[line - 1]) + 1 if line > 0 else 0
        end = int(ends[line])
        raw = bytes(self._lines._mm(0)[beg:end]) if end > beg else b""
        if line == 0 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        if raw.endswith(b"\r") and end < self._size:
            raw = raw[:-1]
        return raw

    def text(self, idx: int) -> str:
        """The text of document ``idx`` (without eod)."""
        line = int(self.doc_lines[idx])
        raw = self._raw(idx)
        text = self._decode(raw, line, 0)
        doc = self._text_of(text, line)
        if doc is None:
            raise DataError(f"{self._where(line)}: is blank now but held a document when the dataset was built; "
                            f"the file changed during the run")
        return doc

    def _changed(self, idx: int, have: int) -> DataError:
        return DataError(
            f"{self._where(int(self.doc_lines[idx]))}: has {have} tokens now but {int(self.sequence_lengths[idx])} "
            f"when the dataset was built; the file changed during the run"
        )

    def tokens(self, idx: int) -> np.ndarray:
        """All tokens of document ``idx``, eod included (int64)."""
        if self._byte_tok and self.data_impl == "text_mmap":
            ids = np.frombuffer(self._raw(idx), dtype=np.uint8).astype(np.int64)
        else:
            ids = np.asarray(self.tokenizer.tokenize(self.text(idx)), dtype=np.int64)  # one text: no thread pool
        if not self._eod_added:  # the tokenizer ended the text with eod itself
            out = ids
        else:
            out = np.empty(ids.shape[0] + 1, dtype=np.int64)
            out[:-1] = ids
            out[-1] = self.eod
        if out.shape[0] != int(self.sequence_lengths[idx]):
            raise self._changed(idx, int(out.shape[0]))
        return out

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of document ``idx`` (``IndexedDataset.get``)."""
        idx, offset = int(idx), int(offset)
        n = int(self.sequence_lengths[idx])
        stop = n if length is None else offset + int(length)
        if self._byte_tok and self.data_impl == "text_mmap":  # slice the bytes themselves
            raw = self._raw(idx)
            if len(raw) + 1 != n:
                raise self._changed(idx, len(raw) + 1)
            body = np.frombuffer(raw[offset:min(stop, n - 1)], dtype=np.uint8).astype(np.int64)
            if stop >= n:
                body = np.concatenate([body, np.array([self.eod], dtype=np.int64)])
            return body
        return self.tokens(idx)[offset:stop]

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.tokens(idx)


# ============================================================================ megatron-core's GPTDataset on top
@dataclass
class TextGPTDatasetConfig(GPTDatasetConfig):
    """GPTDatasetConfig plus what the raw-text documents need; what changes the documents (``data_impl``,
    ``text_key``, the files' fingerprints) is in the cache key, beside ``tokenizer`` (a TokenizerInfo)."""

    data_impl: str = "text_mmap"
    text_key: str = "text"
    index_mapping_dir: Optional[str] = None
    # per file: document count, token count and an MD5 of the token counts -- all the sample indices depend on
    # (with the tokenizer, seed, sequence length, split and sizes), and the same for identical copies of a file
    # on several nodes, whatever their mtimes
    text_fingerprints: Dict[str, Any] = field(default_factory=dict)
    text_tokenizer: Any = None  # the tokenizer itself (not in the key: its identifiers are, via ``tokenizer``)
    text_sources: Dict[str, Any] = field(default_factory=dict)  # path -> opened TextDocumentTokens (or rebuilt)


class TextGPTDataset(GPTDataset):
    """megatron-core's GPTDataset over :class:`TextDocumentTokens` instead of an ``IndexedDataset``: documents,
    splits, blends, indices and packing are GPTDataset's own."""

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: TextGPTDatasetConfig) -> TextDocumentTokens:
        src = config.text_sources.get(dataset_path)
        if src is None:
            src = TextDocumentTokens(dataset_path, config.data_impl, config.text_tokenizer,
                                     config.index_mapping_dir, config.text_key)
        return src

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: TextDocumentTokens) -> int:
        return len(low_level_dataset)

    @staticmethod
    def _key_config_attributes() -> List[str]:
        return GPTDataset._key_config_attributes() + ["data_impl", "text_key", "text_fingerprints"]


# ============================================================================ building
def _get(data_cfg, key: str, default: Any) -> Any:
    value = data_cfg.get(key, default) if isinstance(data_cfg, dict) else getattr(data_cfg, key, default)
    return default if value is None else value


def _resolve_cache_dir(data_cfg, first_path: str) -> str:
    """The sample-index cache: ``index_mapping_dir``, else ``<dir of first file>/cache``, else (that directory
    not writable) the same under the text_mmap cache root."""
    mapping = _get(data_cfg, "index_mapping_dir", None)
    if mapping:
        d = os.path.abspath(os.path.expanduser(str(mapping)))
        if not _dir_writable(d):
            raise DataError(f"the sample-index cache directory {d} (model.data.index_mapping_dir) is not writable; "
                            f"set model.data.index_mapping_dir to a writable directory")
        return d
    beside = os.path.join(os.path.dirname(first_path), "cache")
    if _dir_writable(beside):
        return beside
    fallback = os.path.join(_mirror(default_index_cache_dir(), os.path.dirname(first_path)), "cache")
    if _dir_writable(fallback):
        logger.info("%s is not writable; the sample-index cache goes to %s", beside, fallback)
        return fallback
    raise DataError(f"cannot write the sample-index cache: neither {beside} nor {fallback} is writable; set "
                    f"model.data.index_mapping_dir to a writable directory")


def check_text_data_keys(data_cfg) -> Tuple[str, str]:
    """Validated ``(data_impl, text_key)`` of a GPT ``model.data`` for raw-text datasets."""
    impl = str(_get(data_cfg, "data_impl", "mmap")).strip()
    if impl not in GPT_TEXT_IMPLS:
        raise ConfigError(
            f"model.data.data_impl={impl!r}: expected 'mmap' (Megatron .bin/.idx files from tools/preprocess_data.py), "
            f"'text_mmap' (text files, one document per line) or 'jsonl' (JSONL files, the text under "
            f"model.data.text_key)"
        )
    text_key = _get(data_cfg, "text_key", "text")
    text_key, _ = check_jsonl_keys(text_key, ())
    if impl != "jsonl" and text_key != "text":
        raise ConfigError(f"model.data.text_key={text_key!r} with model.data.data_impl={impl}: the text key is read "
                          f"from JSONL files only (data_impl=jsonl); leave it at 'text'")
    return impl, text_key


def _open_sources(paths: Sequence[str], impl: str, tokenizer, mapping: Optional[str], text_key: str):
    out = {}
    for p in paths:
        if p not in out:
            out[p] = TextDocumentTokens(p, impl, tokenizer, mapping, text_key)
    return out


def _noop(*args, **kwargs):
    return None


def _open_sources_collectively(paths, impl, tokenizer, mapping, text_key):
    """Open the files on every rank, building the caches once: rank 0 first, then the lowest rank of every other
    host, then the rest (see the module docstring). An error on any rank is raised on all."""
    rank, size = world()
    args = (paths, impl, tokenizer, mapping, text_key)
    if size == 1:
        return _open_sources(*args)
    hosts = all_gather(socket.gethostname())
    leader = min(r for r, h in enumerate(hosts) if h == hosts[rank])
    phase = 0 if rank == 0 else (1 if rank == leader else 2)
    sources = None
    for p in range(3):
        got = collective_check(_open_sources if phase == p else _noop, *args)
        sources = got if phase == p else sources
    return sources


def _check_split_documents(src: TextDocumentTokens, split_matrix, sizes, splits_string) -> None:
    for i, rng in enumerate(split_document_ranges(len(src), split_matrix)):
        if rng is None or not sizes[i]:
            continue
        if rng[1] <= rng[0]:
            raise DataError(
                f"{src.path}: the {_SPLIT_NAMES[i]} split gets 0 of the {len(src)} documents with "
                f"{SPLITS_KEY}={splits_string!r}, but {sizes[i]} {_SPLIT_NAMES[i]} samples are needed; use more "
                f"documents or give the {_SPLIT_NAMES[i]} split a larger share in {SPLITS_KEY}"
            )


def build_gpt_text_datasets(data_cfg, tokenizer, seq_length: int, num_samples: Tuple[int, int, int], seed: int,
                            blend_per_split: Optional[Sequence[Optional[Tuple[List[str], Optional[List[float]]]]]]
                            = None):
    """``(train, valid, test)`` GPT datasets over raw text / JSONL files (see the module docstring).

    ``blend_per_split=None``: the files of ``model.data.data_prefix`` (``[f]`` or ``[w1, f1, w2, f2, ...]``),
    each split by ``splits_string``. Otherwise a list of 3 entries (train, valid, test), each None (not built) or
    ``(paths, weights or None)`` used whole for that split (megatron-core's ``blend_per_split``). A split with 0
    requested samples comes back as None. ``data_cfg.seed`` overrides ``seed`` when set. Call on every rank.
    """
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise ConfigError(f"model.seq_length={seq_length!r}: expected a positive integer")
    sizes = list(num_samples)
    if len(sizes) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sizes):
        raise ConfigError(f"num_samples={num_samples!r}: expected three non-negative integers (train, valid, test)")
    impl, text_key = check_text_data_keys(data_cfg)
    what = "text file (one document per line)" if impl == "text_mmap" else "JSONL file (one JSON object per line)"
    data_seed = _get(data_cfg, "seed", None)
    data_seed = int(seed if data_seed is None else data_seed)
    mapping = _get(data_cfg, "index_mapping_dir", None)
    splits_string = _get(data_cfg, "splits_string", "949,50,1")

    if blend_per_split is None:
        split = parse_splits_string(splits_string)
        paths, weights = parse_text_paths(_get(data_cfg, "data_prefix", []), what)
        if not paths:
            kind = "text files" if impl == "text_mmap" else "JSONL files"
            raise ConfigError(f"{PREFIX_KEY} is empty but model.data.data_impl={impl} needs {kind}: [file] or "
                              f"[w1, file1, w2, file2, ...]; use data_impl=mmap for the built-in corpus")
        all_paths = list(paths)
        per_split = None
    else:
        if len(blend_per_split) != 3:
            raise ConfigError(f"blend_per_split: expected 3 entries (train, valid, test), got {len(blend_per_split)}")
        split = None
        per_split = []
        for i, entry in enumerate(blend_per_split):
            if entry is None or not sizes[i]:
                per_split.append(None)
                continue
            ps, ws = entry
            ps = [os.path.abspath(os.path.expanduser(str(p))) for p in as_list(ps)]
            ws = None if ws is None else [float(w) for w in ws]
            if not ps:
                raise ConfigError(f"the {_SPLIT_NAMES[i]} blend has no files")
            per_split.append((ps, ws if ws is not None and len(ps) > 1 else None))
        all_paths = [p for e in per_split if e is not None for p in e[0]]
        if not all_paths:
            return None, None, None

    sources = _open_sources_collectively(all_paths, impl, tokenizer, mapping, text_key)
    cache_dir = collective_check(_resolve_cache_dir, data_cfg, all_paths[0])
    config_cls, dataset_cls = TextGPTDatasetConfig, TextGPTDataset
    common = dict(
        random_seed=data_seed, sequence_length=int(seq_length), path_to_cache=cache_dir, mmap_bin_files=True,
        tokenizer=TokenizerInfo.from_tokenizer(tokenizer), reset_position_ids=bool(_get(data_cfg,
                                                                                          "reset_position_ids", False)),
        reset_attention_mask=bool(_get(data_cfg, "reset_attention_mask", False)),
        eod_mask_loss=bool(_get(data_cfg, "eod_mask_loss", False)), create_attention_mask=False,
        num_dataset_builder_threads=1, data_impl=impl, text_key=text_key if impl == "jsonl" else "text",
        index_mapping_dir=mapping, text_tokenizer=tokenizer,
        text_fingerprints={p: s.identity for p, s in sources.items()},
        text_sources=sources,
    )
    if per_split is None:
        cfg = config_cls(blend=(list(paths), None if weights is None else list(weights)), split=split, **common)
        cfg.split_matrix = [m if sizes[i] else None for i, m in enumerate(cfg.split_matrix)]
        for src in sources.values():
            _check_split_documents(src, cfg.split_matrix, sizes, splits_string)
    else:
        cfg = config_cls(blend_per_split=per_split, **common)
    for src in sources.values():
        logger.info("%s (%s): %d documents, %d tokens", src.path, impl, len(src), src.num_tokens)

    rank, size = world()
    if size > 1:
        local_builder = plan_index_builders(cache_dir)
        if local_builder:
            child_cfg = _strip_sources(cfg)  # the child reopens the files (their caches exist now)
            collective_check(_prebuild_in_child, [SimpleNamespace(cfg=child_cfg, sizes=sizes)], dataset_cls)
        else:
            collective_check(_noop)
    try:
        with _SingleProcessGroup():
            out = _run_builder(cfg, sizes, dataset_cls)
    except OSError as err:
        raise DataError(f"reading the text files or the sample-index cache in {cache_dir} failed: {err}") from err
    out = tuple(out)
    for name, ds, n in zip(_SPLIT_NAMES, out, sizes):
        if ds is not None:
            logger.info("%s dataset (%s): %d samples of %d tokens (%d requested)", name, impl, len(ds), seq_length, n)
    return out


def build_gpt_text_split_datasets(data_cfg, tokenizer, seq_length: int, num_samples: Tuple[int, int, int],
                                  seed: int):
    """``(train, valid, test)`` for any form of ``model.data.data_prefix``: the list form (split by
    ``splits_string``) or the dict form ``{train, validation, test}`` (each split's files used whole; a split with
    several named datasets comes back as an ordered ``{name: dataset}`` dict, one dataset as itself). Call on every
    rank."""
    value = _get(data_cfg, "data_prefix", None)
    if not is_split_dict(value):
        return build_gpt_text_datasets(data_cfg, tokenizer, seq_length, num_samples, seed)
    splits = parse_split_prefixes(value, "file", _get(data_cfg, "splits_string", None))
    sizes = list(num_samples)
    if sizes[0] and splits.train is None:
        raise ConfigError(
            f"{PREFIX_KEY} has no 'train' entry but {sizes[0]} training samples are needed; add "
            f"{PREFIX_KEY}.train=[...] (only an evaluation-only run, trainer.limit_train_batches=0, needs none)"
        )
    out: List[Any] = [None, None, None]
    for i, split in enumerate(("train", "validation", "test")):
        if not sizes[i]:
            continue
        named = OrderedDict()
        for name, blend in splits.sets(split).items():
            per_split: List[Any] = [None, None, None]
            per_split[i] = (list(blend.paths), None if blend.weights is None else list(blend.weights))
            only = [0, 0, 0]
            only[i] = sizes[i]
            named[name] = build_gpt_text_datasets(data_cfg, tokenizer, seq_length, tuple(only), seed,
                                                  blend_per_split=per_split)[i]
        if named:
            out[i] = next(iter(named.values())) if len(named) == 1 else named
    return tuple(out)


def _strip_sources(cfg):
    import copy

    out = copy.copy(cfg)
    out.text_sources = {}
    return out


__all__ = ["GPT_TEXT_IMPLS", "TextDocumentTokens", "TextGPTDataset", "TextGPTDatasetConfig", "build_gpt_text_datasets", "build_gpt_text_split_datasets",
           "check_text_data_keys"]

"""Raw text files as datasets, one document per line, memory-mapped (``model.data.data_impl=text_mmap``).

    ds = TextMemMapDataset(["/data/a.txt", "/data/b.txt"])
    len(ds), ds[0]                     # number of lines, the first line of a.txt (str)
    TextMemMapDataset(paths, tokenizer=tok)[i]   # token ids (int64 numpy array) instead

What a line is
--------------
Exactly the lines of the file, as ``bytes.split(b"\\n")`` gives them: without the newline,
with one ``\\r`` before it removed (``\\r\\n`` files), a last line without a final newline
included, and a final newline not starting an extra empty line. Empty lines are kept as empty
documents (``""``), so line numbers in the file and indices here always agree; the BART
datasets skip documents without tokens. Several files are concatenated in the order given. Bytes
that are not valid UTF-8 are decoded as U+FFFD (one bad byte must not stop a long run); with the
byte tokenizer the token ids are the raw bytes themselves, so nothing is lost there.

The newline index
-----------------
The positions of the newlines are found once per file with a vectorised numpy scan (in 16 MiB
chunks, so memory stays small) and saved as ``<file>.idx.npy`` (int64: the end of each line,
i.e. the position of its newline, or the file size for a last line without one) plus
``<file>.idx.json`` holding the format version, the newline byte, the line count and the file's
size, ``mtime_ns`` and a SHA-1 of its first and last 64 KiB. An index whose JSON does not match
the file (changed size, mtime or checksum) is rebuilt. Files are written under a temporary name
and renamed, so concurrent builders (several ranks) are safe: they write identical files and
every reader sees a complete one.

Where the index goes: next to the file; or, when ``index_mapping_dir`` is given, under it,
mirroring the file's absolute path (``<index_mapping_dir>/data/a.txt.idx.npy`` for
``/data/a.txt``). When the preferred directory is not writable the other one is used, with a
log line (without ``index_mapping_dir`` the fallback is ``$XDG_CACHE_HOME/megatron_ext/text_mmap``,
``~/.cache/...`` without XDG_CACHE_HOME); when neither is writable a ``DataError`` names both.
A valid index found in either place is used.

Token counts (:meth:`TextMemMapDataset.token_lengths`) -- needed to cut long lines into
samples without truncating -- are the byte lengths for the byte tokenizer (no work), and
otherwise computed once with the tokenizer's batched encoder and cached the same way as
``<file>.toklen-<tokenizer hash>.npy`` (+ ``.json``).

JSONL (``model.data.data_impl=jsonl``)
------------------------------------
:class:`JSONLMemMapDataset` reads JSONL files the same way (same lines, same newline index): one
JSON object per line, the document text under ``text_key`` (default ``"text"``) and optional
numeric attribute columns ``attribute_keys`` (float32 per line, :meth:`JSONLMemMapDataset.attributes`).
Blank lines are documents without text (skipped by BART). Each file is checked once (valid JSON
object, text a string, every attribute a finite number, booleans rejected) with a ``DataError``
naming file, line and key; the attribute values and text lengths are cached like the index. See
the class docstring.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from megatron_ext.errors import ConfigError, DataError
from megatron_ext.tokenizers.byte import ByteTokenizer
from megatron_ext.tokenizers.special_tokens import unwrap_tokenizer

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
TOKLEN_VERSION = 1
_SCAN_CHUNK = 1 << 24  # bytes per step of the newline scan
_CHECKSUM_BYTES = 1 << 16  # first and last 64 KiB
_TOKENIZE_BATCH = 4096  # lines per batched tokenizer call when counting tokens


# ------------------------------------------------------------------------ file helpers
def file_fingerprint(path: str) -> Dict[str, Any]:
    """Size, mtime_ns and a SHA-1 of the first and last 64 KiB of ``path``."""
    st = os.stat(path)
    h = hashlib.sha1()
    with open(path, "rb") as f:
        h.update(f.read(_CHECKSUM_BYTES))
        if st.st_size > _CHECKSUM_BYTES:
            f.seek(max(_CHECKSUM_BYTES, st.st_size - _CHECKSUM_BYTES))
            h.update(f.read(_CHECKSUM_BYTES))
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "checksum": h.hexdigest()}


def scan_newlines(path: str, newline: int = 10, size: Optional[int] = None) -> np.ndarray:
    """End offsets of the lines of ``path`` (int64): newline positions, plus the file size when the
    last line has no final newline. Vectorised, in chunks; never loops over bytes in Python."""
    size = os.path.getsize(path) if size is None else size
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=(size,))
    try:
        parts = [np.flatnonzero(mm[beg: beg + _SCAN_CHUNK] == newline).astype(np.int64) + beg
                 for beg in range(0, size, _SCAN_CHUNK)]
        last = int(mm[size - 1])
    finally:
        del mm
    ends = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if last != newline:
        ends = np.concatenate([ends, np.array([size], dtype=np.int64)])
    return ends


def _dir_writable(directory: str) -> bool:
    """Whether files can be created in ``directory`` (created if missing) and it is meant to be written: a directory
    without any write bit in its mode counts as read-only even for root. Tests monkeypatch this."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return False
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:  # a directory marked read-only for everyone (no write bit) stays so for root, whom os.access lets through
        if not os.stat(directory).st_mode & 0o222:
            return False
    except OSError:
        return False
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
    except OSError:
        return False
    os.close(fd)
    try:
        os.remove(probe)
    except OSError:
        pass
    return True


def _atomic_write_bytes(path: str, write) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _save_npy(path: str, array: np.ndarray) -> None:
    _atomic_write_bytes(path, lambda f: np.save(f, array, allow_pickle=False))


def _save_json(path: str, obj: Dict[str, Any]) -> None:
    _atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode("utf-8")))


def _load_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def default_index_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron_ext", "text_mmap")


def _mirror(root: str, path: str) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(root)), os.path.abspath(path).lstrip(os.sep))


# ------------------------------------------------------------------------ the dataset
class TextMemMapDataset:
    """Lines of text files, memory-mapped (see the module docstring).

    ``dataset[i]`` is line ``i`` (a ``str``), or its token ids (``np.ndarray`` of int64) when a
    ``tokenizer`` is given. Negative indices count from the end. Picklable (DataLoader workers
    reopen the memory maps).
    """

    _IMPL = "text_mmap"  # the model.data.data_impl this class serves (for messages)
    _WHAT = "a text file with one document per line"
    _KIND = "text file"

    def __init__(
        self,
        paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
        tokenizer: Any = None,
        index_mapping_dir: Optional[str] = None,
        newline: Union[bytes, int] = b"\n",
    ) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.path.abspath(os.path.expanduser(os.fspath(p))) for p in paths]
        if not paths:
            raise ConfigError(f"{type(self).__name__}: expected at least one file")
        if isinstance(newline, (bytes, bytearray)) and len(newline) == 1:
            newline = newline[0]
        if isinstance(newline, bool) or not isinstance(newline, int) or not 0 <= newline < 256:
            raise ConfigError(f"newline={newline!r}: expected a single byte, e.g. b'\\n'")
        self.paths: List[str] = paths
        self.tokenizer = tokenizer
        self.index_mapping_dir = (
            os.path.abspath(os.path.expanduser(str(index_mapping_dir))) if index_mapping_dir else None
        )
        self.newline = int(newline)
        self._strip_cr = self.newline == 10
        for p in paths:
            if not os.path.exists(p):
                raise DataError(f"{self._KIND} {p} does not exist (model.data.data_prefix with data_impl={self._IMPL})")
            if not os.path.isfile(p):
                raise DataError(f"{p} is not a regular file; expected {self._WHAT}")
        self.index_paths: List[str] = []
        self._sizes: List[int] = []
        ends_list = []
        for p in paths:
            ends, index_path, size = self._load_or_build_index(p)
            ends_list.append(ends)
            self.index_paths.append(index_path)
            self._sizes.append(size)
        self._ends: List[np.ndarray] = ends_list
        counts = np.array([len(e) for e in ends_list], dtype=np.int64)
        self._cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._mms: List[Optional[np.memmap]] = [None] * len(paths)

    # ------------------------------------------------------------------ index files
    def _candidates(self, path: str) -> List[str]:
        """Index base paths (without .idx.npy) in order of preference."""
        beside = path
        if self.index_mapping_dir:
            return [_mirror(self.index_mapping_dir, path), beside]
        return [beside, _mirror(default_index_cache_dir(), path)]

    def _writable_base(self, path: str, what: str) -> str:
        cands = self._candidates(path)
        for i, base in enumerate(cands):
            if _dir_writable(os.path.dirname(base)):
                if i > 0:
                    logger.info(
                        "%s: %s is not writable; writing the %s to %s instead",
                        path, os.path.dirname(cands[0]), what, os.path.dirname(base),
                    )
                return base
        dirs = " nor ".join(os.path.dirname(c) for c in cands)
        raise DataError(
            f"cannot write the {what} of {path}: neither {dirs} is writable; set model.data.index_mapping_dir "
            f"to a writable directory"
        )

    def _load_or_build_index(self, path: str) -> Tuple[np.ndarray, str, int]:
        fp = file_fingerprint(path)
        for base in self._candidates(path):
            ends = self._try_load_index(base, fp)
            if ends is not None:
                return ends, base + ".idx.npy", fp["size"]
        ends = scan_newlines(path, self.newline, fp["size"])
        fp_after = file_fingerprint(path)
        if fp_after != fp:
            raise DataError(f"{path} changed while its line index was being built; try again")
        base = self._writable_base(path, "line index")
        _save_npy(base + ".idx.npy", ends)
        _save_json(base + ".idx.json", {
            "version": INDEX_VERSION, "newline": self.newline, "num_lines": int(len(ends)),
            "path": path, **fp,
        })
        logger.info("%s: %d lines; line index written to %s.idx.npy", path, len(ends), base)
        ends = np.load(base + ".idx.npy", mmap_mode="r") if len(ends) else ends
        return ends, base + ".idx.npy", fp["size"]

    def _try_load_index(self, base: str, fp: Dict[str, Any]) -> Optional[np.ndarray]:
        info = _load_json(base + ".idx.json")
        if info is None:
            return None
        expected = {"version": INDEX_VERSION, "newline": self.newline, **fp}
        if any(info.get(k) != v for k, v in expected.items()):
            logger.info("%s.idx.npy is stale (the file or the format changed); rebuilding it", base)
            return None
        try:
            ends = np.load(base + ".idx.npy", mmap_mode="r") if info.get("num_lines") else np.load(base + ".idx.npy")
        except (OSError, ValueError):
            return None
        if ends.ndim != 1 or len(ends) != info.get("num_lines") or ends.dtype != np.int64:
            return None
        if len(ends) and int(ends[-1]) != fp["size"] and int(ends[-1]) != fp["size"] - 1:
            return None
        return ends

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_mms"] = [None] * len(self.paths)
        state["_ends"] = [np.asarray(e) for e in self._ends]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return int(self._cum[-1])

    @property
    def num_files(self) -> int:
        return len(self.paths)

    def file_line_counts(self) -> List[int]:
        return [int(len(e)) for e in self._ends]

    def locate(self, idx: int) -> Tuple[int, int]:
        """``(file index, line index in that file)`` of document ``idx``."""
        n = len(self)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"line index {idx} out of range for {n} lines")
        f = int(np.searchsorted(self._cum, i, side="right")) - 1
        return f, i - int(self._cum[f])

    def _mm(self, f: int) -> Optional[np.memmap]:
        mm = self._mms[f]
        if mm is None and self._sizes[f] > 0:
            mm = np.memmap(self.paths[f], dtype=np.uint8, mode="r", shape=(self._sizes[f],))
            self._mms[f] = mm
        return mm

    def _span(self, f: int, line: int) -> Tuple[int, int]:
        ends = self._ends[f]
        beg = int(ends[line - 1]) + 1 if line > 0 else 0
        return beg, int(ends[line])

    def get_bytes(self, idx: int) -> bytes:
        """Raw bytes of line ``idx`` (no newline, no ``\\r`` before it)."""
        f, line = self.locate(idx)
        beg, end = self._span(f, line)
        if end <= beg:
            return b""
        data = bytes(self._mm(f)[beg:end])
        if self._strip_cr and data.endswith(b"\r"):
            data = data[:-1]
        return data

    def get_text(self, idx: int) -> str:
        return self.get_bytes(idx).decode("utf-8", errors="replace")

    def get_tokens(self, idx: int, tokenizer: Any = None) -> np.ndarray:
        tok = tokenizer if tokenizer is not None else self.tokenizer
        if tok is None:
            raise ValueError("get_tokens needs a tokenizer")
        if _is_byte_tokenizer(tok):
            return np.frombuffer(self._doc_bytes(idx), dtype=np.uint8).astype(np.int64)
        return np.asarray(tok.tokenize(self.get_text(idx)), dtype=np.int64)

    def _doc_bytes(self, idx: int) -> bytes:
        """The bytes the byte tokenizer sees for document ``idx`` (here: the raw line)."""
        return self.get_bytes(idx)

    def _byte_token_lengths(self) -> np.ndarray:
        """Byte-tokenizer token counts of all documents (here: :meth:`byte_lengths`)."""
        return self.byte_lengths()

    def _toklen_ident(self, tok: Any) -> Any:
        """What the token-count cache is keyed on (besides the file)."""
        return tok.unique_identifiers

    def __getitem__(self, idx: int) -> Union[str, np.ndarray]:
        if self.tokenizer is not None:
            return self.get_tokens(idx)
        return self.get_text(idx)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    # ------------------------------------------------------------------ lengths
    def byte_lengths(self) -> np.ndarray:
        """Bytes per line (int64, without newline and ``\\r``), all files concatenated."""
        out = []
        for f, ends in enumerate(self._ends):
            ends = np.asarray(ends)
            starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else ends
            lengths = (ends - starts).astype(np.int64)
            if self._strip_cr and len(ends):
                mm = self._mm(f)
                nz = np.flatnonzero(lengths > 0)
                for beg in range(0, len(nz), 1 << 20):
                    sel = nz[beg: beg + (1 << 20)]
                    cr = np.asarray(mm[ends[sel] - 1]) == 13
                    lengths[sel[cr]] -= 1
            out.append(lengths)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def token_lengths(self, tokenizer: Any = None) -> np.ndarray:
        """Tokens per line (int64) for ``tokenizer`` (default: the dataset's), all files concatenated.

        Byte tokenizer: the byte lengths. Otherwise every line is tokenized once (batched) and the
        counts are cached per file and tokenizer (see the module docstring).
        """
        tok = tokenizer if tokenizer is not None else self.tokenizer
        if tok is None:
            raise ValueError("token_lengths needs a tokenizer")
        if _is_byte_tokenizer(tok):
            return self._byte_token_lengths()
        key = hashlib.md5(
            json.dumps(self._toklen_ident(tok), sort_keys=True, default=str).encode("utf-8"), usedforsecurity=False
        ).hexdigest()[:16]
        out = []
        for f, path in enumerate(self.paths):
            out.append(self._file_token_lengths(f, path, tok, key))
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)

    def _file_token_lengths(self, f: int, path: str, tok: Any, key: str) -> np.ndarray:
        fp = file_fingerprint(path)
        n = int(len(self._ends[f]))
        expected = {"version": TOKLEN_VERSION, "newline": self.newline, "tokenizer": key, "num_lines": n, **fp}
        for base in self._candidates(path):
            info = _load_json(f"{base}.toklen-{key}.json")
            if info is not None and all(info.get(k) == v for k, v in expected.items()):
                try:
                    arr = np.load(f"{base}.toklen-{key}.npy")
                except (OSError, ValueError):
                    continue
                if arr.shape == (n,):
                    return arr
        logger.info("%s: counting the tokens of %d lines (once; cached)", path, n)
        lengths = np.zeros(n, dtype=np.int32)
        beg0 = int(self._cum[f])
        for beg in range(0, n, _TOKENIZE_BATCH):
            end = min(n, beg + _TOKENIZE_BATCH)
            texts = [self.get_text(beg0 + i) for i in range(beg, end)]
            _, lens = tok.tokenize_batch_flat(texts)
            lengths[beg:end] = lens
        base = self._writable_base(path, "token counts")
        _save_npy(f"{base}.toklen-{key}.npy", lengths)
        _save_json(f"{base}.toklen-{key}.json", {**expected, "path": path})
        return lengths


def _is_byte_tokenizer(tok: Any) -> bool:
    return isinstance(unwrap_tokenizer(tok), ByteTokenizer)


# ------------------------------------------------------------------------ JSONL
JSONL_VERSION = 1
_JSONL_BLOCK = 1 << 15  # lines per block of the validation scan
_BOM = b"\xef\xbb\xbf"


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _snippet(value: Any, n: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = text.strip()
    return text if len(text) <= n else text[: n - 3] + "..."


def parse_jsonl_line(text: str, text_key: str, where: str) -> Dict[str, Any]:
    """The JSON object of one JSONL line, checked: an object whose ``text_key`` (``model.data.text_key``) holds a
    string; otherwise one ``DataError`` starting with ``where`` (file and line). Used by every JSONL reader (BART's
    and GPT's raw-text datasets)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        msg = getattr(exc, "msg", None) or str(exc)
        col = getattr(exc, "colno", None)
        at = f" at column {col}" if col else ""
        raise DataError(f"{where}: not valid JSON ({msg}{at}): {_snippet(text)!r}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with the key '{text_key}' (model.data.text_key), got a JSON "
                        f"{_json_type(obj)}: {_snippet(text)!r}")
    if text_key not in obj:
        have = ", ".join(list(obj)[:10]) or "(none)"
        raise DataError(f"{where}: missing key '{text_key}' (model.data.text_key); the object has keys: {have}")
    value = obj[text_key]
    if not isinstance(value, str):
        raise DataError(f"{where}: key '{text_key}' (model.data.text_key) holds a JSON {_json_type(value)} "
                        f"({_snippet(value)}), expected a string")
    return obj


def check_jsonl_keys(text_key: Any, attribute_keys: Any) -> Tuple[str, Tuple[str, ...]]:
    """Validated ``(text_key, attribute_keys)`` of ``model.data`` for ``data_impl=jsonl``."""
    if not isinstance(text_key, str) or not text_key:
        raise ConfigError(f"model.data.text_key={text_key!r}: expected the (non-empty) name of the JSON key "
                          f"that holds the document text, e.g. text")
    if attribute_keys is None:
        attribute_keys = ()
    if isinstance(attribute_keys, (str, bytes)) or not isinstance(attribute_keys, (list, tuple)):
        raise ConfigError(f"model.data.attribute_keys={attribute_keys!r}: expected a list of JSON key names, "
                          f"e.g. [logP, qed] (or [] for none)")
    keys = tuple(attribute_keys)
    for k in keys:
        if not isinstance(k, str) or not k:
            raise ConfigError(f"model.data.attribute_keys={list(keys)!r}: {k!r} is not a JSON key name "
                              f"(expected non-empty strings)")
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ConfigError(f"model.data.attribute_keys={list(keys)!r}: {', '.join(dup)} listed more than once")
    if text_key in keys:
        raise ConfigError(f"model.data.attribute_keys={list(keys)!r} contains model.data.text_key={text_key!r}; "
                          f"the text cannot also be a numeric attribute")
    return text_key, keys


class JSONLMemMapDataset(TextMemMapDataset):
    """JSONL files, one JSON object per line, memory-mapped (``model.data.data_impl=jsonl``).

    ``dataset[i]`` is the text under ``text_key`` of line ``i`` (or its token ids with a
    ``tokenizer``); :meth:`attributes` gives the float32 values of ``attribute_keys``. Lines are
    those of :class:`TextMemMapDataset` (same newline index files, ``\\r\\n`` accepted, a UTF-8
    byte-order mark before the first line ignored). Blank lines (empty or whitespace only) are
    documents without text, kept so indices and line numbers agree (the BART datasets skip them,
    as they skip every document without tokens); their attributes read NaN.

    Every other line is checked once, when the dataset is first opened for a file and pair of
    keys: it must be a JSON object, with ``text_key`` holding a string and every attribute key
    holding a finite JSON number that fits float32 (``true``/``false``, ``null``, strings such
    as ``"3.2"``, NaN and Infinity are rejected). Any violation raises a ``DataError`` naming
    the file, the 1-based line number and the key. The attribute values (float32, one row per
    line) and the byte lengths of the texts are then cached next to the line index as
    ``<file>.jsonl-<hash of the keys>.{attrs,textlen}.npy`` + ``.json`` (rebuilt when the file
    changes), so later runs neither re-parse nor re-check the file. Text bytes that are not
    valid UTF-8 read as U+FFFD, as in text_mmap.
    """

    _IMPL = "jsonl"
    _WHAT = "a JSONL file with one JSON object per line"
    _KIND = "JSONL file"

    def __init__(
        self,
        paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
        tokenizer: Any = None,
        index_mapping_dir: Optional[str] = None,
        text_key: str = "text",
        attribute_keys: Sequence[str] = (),
    ) -> None:
        self.text_key, self.attribute_keys = check_jsonl_keys(text_key, attribute_keys)
        super().__init__(paths, tokenizer=tokenizer, index_mapping_dir=index_mapping_dir, newline=b"\n")
        key_blob = json.dumps({"text_key": self.text_key, "attribute_keys": list(self.attribute_keys)},
                              sort_keys=True).encode("utf-8")
        self._columns_key = hashlib.md5(key_blob, usedforsecurity=False).hexdigest()[:16]
        self._attrs: List[np.ndarray] = []
        self._text_bytes: List[np.ndarray] = []
        for f, path in enumerate(self.paths):
            attrs, text_bytes = self._load_or_build_columns(f, path)
            self._attrs.append(attrs)
            self._text_bytes.append(text_bytes)

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state["_attrs"] = [np.asarray(a) for a in self._attrs]
        state["_text_bytes"] = [np.asarray(t) for t in self._text_bytes]
        return state

    # ------------------------------------------------------------------ parsing
    def _where(self, f: int, line: int) -> str:
        return f"{self.paths[f]}, line {line + 1}"

    def _parse(self, raw: bytes, f: int, line: int) -> Optional[Dict[str, Any]]:
        """The checked JSON object of a line (``raw``: its bytes, ``\\r`` removed); None for a blank line."""
        if line == 0 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        text = raw.decode("utf-8", errors="replace")
        if not text or text.isspace():
            return None
        return parse_jsonl_line(text, self.text_key, self._where(f, line))

    def _attribute(self, obj: Dict[str, Any], key: str, f: int, line: int) -> np.float32:
        where = self._where(f, line)
        if key not in obj:
            have = ", ".join(list(obj)[:10]) or "(none)"
            raise DataError(f"{where}: missing attribute key '{key}' (model.data.attribute_keys); the object has "
                            f"keys: {have}")
        value = obj[key]
        if isinstance(value, bool):
            raise DataError(f"{where}: attribute key '{key}' holds a JSON boolean ({json.dumps(value)}); attribute "
                            f"values must be numbers (write 1/0 for yes/no)")
        if not isinstance(value, (int, float)):
            raise DataError(f"{where}: attribute key '{key}' holds a JSON {_json_type(value)} ({_snippet(value)}), "
                            f"expected a number")
        try:
            with np.errstate(over="ignore"):
                out = np.float32(value)
        except OverflowError:
            out = np.float32(np.inf)
        if not np.isfinite(out):
            raise DataError(f"{where}: attribute key '{key}' holds {_snippet(value)}, expected a finite number "
                            f"that fits float32")
        return out

    def _scan_columns(self, f: int) -> Tuple[np.ndarray, np.ndarray]:
        """Parse and check every line of file ``f``: (attributes [n, k] float32, text bytes [n] int64)."""
        ends = np.asarray(self._ends[f])
        n, k = int(len(ends)), len(self.attribute_keys)
        attrs = np.full((n, k), np.nan, dtype=np.float32)
        text_bytes = np.zeros(n, dtype=np.int64)
        mm = self._mm(f)
        for beg in range(0, n, _JSONL_BLOCK):
            end = min(n, beg + _JSONL_BLOCK)
            first = int(ends[beg - 1]) + 1 if beg else 0
            lines = bytes(mm[first:int(ends[end - 1])]).split(b"\n")
            if len(lines) != end - beg:  # pragma: no cover - the index and the file disagree
                raise DataError(f"{self.paths[f]} changed while it was being read; try again")
            for line, raw in enumerate(lines, beg):
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
                obj = self._parse(raw, f, line)
                if obj is None:
                    continue
                text_bytes[line] = len(obj[self.text_key].encode("utf-8", errors="surrogatepass"))
                for a, key in enumerate(self.attribute_keys):
                    attrs[line, a] = self._attribute(obj, key, f, line)
        return attrs, text_bytes

    def _load_or_build_columns(self, f: int, path: str) -> Tuple[np.ndarray, np.ndarray]:
        fp = file_fingerprint(path)
        n, k = int(len(self._ends[f])), len(self.attribute_keys)
        expected = {"version": JSONL_VERSION, "text_key": self.text_key, "attribute_keys": list(self.attribute_keys),
                    "num_lines": n, **fp}
        name = f"jsonl-{self._columns_key}"
        for base in self._candidates(path):
            info = _load_json(f"{base}.{name}.json")
            if info is None or any(info.get(key) != v for key, v in expected.items()):
                continue
            try:
                attrs = np.load(f"{base}.{name}.attrs.npy", mmap_mode="r" if n * k else None)
                text_bytes = np.load(f"{base}.{name}.textlen.npy", mmap_mode="r" if n else None)
            except (OSError, ValueError):
                continue
            if attrs.shape == (n, k) and attrs.dtype == np.float32 and text_bytes.shape == (n,) \
                    and text_bytes.dtype == np.int64:
                return attrs, text_bytes
        logger.info("%s: checking %d JSONL lines (text key %r, attribute keys %s; once, cached)", path, n,
                    self.text_key, list(self.attribute_keys))
        attrs, text_bytes = self._scan_columns(f)
        if file_fingerprint(path) != fp:
            raise DataError(f"{path} changed while it was being read; try again")
        base = self._writable_base(path, "JSONL columns")
        _save_npy(f"{base}.{name}.attrs.npy", attrs)
        _save_npy(f"{base}.{name}.textlen.npy", text_bytes)
        _save_json(f"{base}.{name}.json", {**expected, "path": path})
        return attrs, text_bytes

    # ------------------------------------------------------------------ access
    def get_record(self, idx: int) -> Optional[Dict[str, Any]]:
        """The JSON object of line ``idx`` (None for a blank line)."""
        f, line = self.locate(idx)
        return self._parse(self.get_bytes(idx), f, line)

    def get_text(self, idx: int) -> str:
        """The text under ``text_key`` of line ``idx`` (``""`` for a blank line)."""
        obj = self.get_record(idx)
        return "" if obj is None else obj[self.text_key]

    def _doc_bytes(self, idx: int) -> bytes:
        return self.get_text(idx).encode("utf-8", errors="surrogatepass")  # as the byte tokenizer encodes

    def _byte_token_lengths(self) -> np.ndarray:
        out = [np.asarray(t, dtype=np.int64) for t in self._text_bytes]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _toklen_ident(self, tok: Any) -> Any:
        return {"tokenizer": tok.unique_identifiers, "jsonl_text_key": self.text_key}

    def attributes(self, idx: int) -> np.ndarray:
        """float32 ``[len(attribute_keys)]``: the attribute values of line ``idx`` (NaN for a blank line)."""
        f, line = self.locate(idx)
        return np.array(self._attrs[f][line], dtype=np.float32)

    def attribute_table(self) -> np.ndarray:
        """float32 ``[len(self), len(attribute_keys)]``: the attribute values of all lines."""
        out = [np.asarray(a) for a in self._attrs]
        return np.concatenate(out) if out else np.zeros((0, len(self.attribute_keys)), dtype=np.float32)

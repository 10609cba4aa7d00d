"""Tokenize a corpus into Megatron MMIDIDX ``.bin/.idx`` datasets.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-library sentencepiece --tokenizer-model spm.model --append-eod --workers 2
    python tools/preprocess_data.py --input 'shards/*.jsonl.gz' --output-prefix data/corpus ...   # one merged output
    python tools/preprocess_data.py --input shards/ --per-shard --output-prefix data/corpus ...    # one per shard

Input (``--input``: one or more files, directories or quoted glob patterns)
  * a file; a directory: the files directly in it whose names end in ``.txt``, ``.text``, ``.json`` or ``.jsonl``,
    each optionally followed by ``.gz`` or ``.zst`` (hidden files and other names are skipped and counted in the
    log), sorted by name; a glob pattern (``*``, ``?``, ``[``, ``**``): the files it matches, sorted by path.
    Each file is one *shard*, named by its file name without those endings (``part-00.jsonl.gz`` -> ``part-00``);
    shards are processed, and merged, in that order (printed at the start). An input given twice is refused, and
    so are two shards of the same name.
  * ``.gz`` files are read with Python's gzip module, ``.zst`` files with the ``zstandard`` package (several frames
    allowed); a corrupt or truncated compressed file is one error naming it.
  * plain text (``--input-format text``): one document per line; blank (whitespace-only)
    lines are skipped; ``\\r\\n`` line ends are accepted;
  * JSONL (``--input-format jsonl``): one JSON object per line, the text of each
    ``--json-keys`` key is tokenized (default ``text``); blank lines are skipped; every object
    must have every key, with a string value (an empty string gives an empty document, so the
    documents of all keys stay aligned line by line);
  * ``--input-format auto`` (default): per shard, JSONL when the file name ends in ``.json``/``.jsonl`` (before any
    ``.gz``/``.zst``) or the first non-blank line is a JSON object, else plain text.

Output (Megatron's naming, so Megatron data prefixes work unchanged)
  one dataset per key: ``{output_prefix}_{key}_document.bin`` / ``.idx``; with plain text the
  key is the (single) ``--json-keys`` value, ``text`` by default. Every key gets its own
  finalized ``.idx`` (Megatron-LM's script only finalized the last one). One document is one
  sequence; ``--append-eod`` appends the tokenizer's end-of-document id to each. Tokens are
  ``uint16`` when the vocabulary is under 65,500, else ``int32`` (megatron-core's ``DType.optimal_dtype``).
  Files are written under a temporary name (``.bin.tmp``/``.idx.tmp``) and renamed at the end, so a failed or
  killed run leaves no file that a reader (or a rerun) would take for a dataset.

  * one input shard: written straight to ``{output_prefix}_{key}_document.*``, as before.
  * several shards (default): each shard is tokenized into ``{output_prefix}.parts/{shard}_{key}_document.*``,
    then the parts are concatenated in input order into ``{output_prefix}_{key}_document.*``
    (``megatron_ext/indexed_files.py``, the same code as ``tools/merge_datasets.py``); then the parts and the
    manifest are removed, and ``{output_prefix}.parts`` with them when nothing else is in it.
  * ``--per-shard``: ``{output_prefix}_{shard}_{key}_document.*`` for every shard, nothing merged.

Resuming (several shards or ``--per-shard``)
  After each shard its files are fsync'ed, recorded in a manifest (``{output_prefix}.parts/manifest.json``, or
  ``{output_prefix}.manifest.json`` with ``--per-shard``; written to a temporary file, fsync'ed and renamed, so it
  is always whole) and renamed into place. The manifest holds the settings that change the output (tokenizer and
  the sha256 of its model, keys, ``--append-eod``, ``--input-format``, token dtype) and, per shard, the input's path,
  size, mtime and sha256, the size and sha256 of every output file, and the shard's statistics. A rerun with the
  same arguments skips a shard when its input is unchanged (same size, and same mtime or same sha256) and its output
  files have the recorded size and sha256 (read again: the check costs one read of the finished outputs); it redoes
  a shard whose outputs are missing (a run killed between the manifest and the rename) and any shard not recorded.
  Refused, each with one error naming the file: different settings than the manifest's, an input that changed
  after it was recorded, and (``--per-shard``) a recorded output that was changed. ``--overwrite`` ignores the
  manifest and redoes every shard. The merged output of a resumed run is byte-identical to a clean run's.
  ``MEGATRON_EXT_PREPROCESS_KILL_AFTER_SHARDS=N`` (test only, never in a real run) makes the tool SIGKILL itself
  once N shards are recorded: right after writing the next shard's first chunk to its ``.bin.tmp`` (or before the
  merge when no shard is left).

How it is fast
  An uncompressed file is cut into chunks of whole lines (``--chunk-bytes``); each worker process reads its
  chunk itself. A compressed file is decompressed as a stream by the main process, cut at line ends into chunks
  of ``--chunk-bytes`` of text, and the chunks are sent to the workers. Each worker parses its chunk, tokenizes it
  with one batched call (sentencepiece's C++ batch encoder, ``cpu_count // workers`` threads each) and returns flat
  numpy arrays; the main process writes each chunk to the ``.bin`` in one write, in input order. The workers stay
  busy across shard boundaries (the chunks of the next shard are queued while the previous one is written).
  Sequence lengths are kept as numpy arrays and the index is written vectorized, so memory is ~4 bytes per
  document plus a few chunks in flight. The output does not depend on ``--workers`` or ``--chunk-bytes``.

Statistics
  One line per shard (documents, tokens, input bytes, seconds, tokens/s; "skipped" for a verified finished one) and
  a total line; ``--stats-json`` writes them as JSON (``shards``: one object per shard). A shard's seconds are the
  time from the previous shard's end to its own (the shards overlap in the workers).

Refused before any input is read: an output (``.bin``, ``.idx``, manifest, ``--stats-json``) that is an input or the
tokenizer model (same path, a symlink or a hard link), and an output that already exists (other than the recorded,
verified ones of a resumed run) unless ``--overwrite`` is given (``megatron_ext/output_files.py``).

Errors (missing file, invalid JSON line, missing key, bad tokenizer model, a shard with no documents or no tokens,
a corrupt compressed file, a read-only output directory, a full disk, ...) print one message naming the
file/line/key and exit with status 2; no ``.bin``/``.idx`` of an unfinished shard (final or temporary) is left
behind, and the finished shards stay recorded for a rerun.
"""
from __future__ import annotations

import argparse
import codecs
import glob
import json
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ext.errors import ConfigError, DataError, run_entry_point
from megatron_ext.indexed_files import DatasetWriter, merge_into, optimal_dtype, sha256_file
from megatron_ext.output_files import check_outputs, fsync_dir, write_error
from megatron_ext.text_files import (
    TEXT_SUFFIXES,
    compression_of,
    decompress_errors,
    detect_format,
    open_binary,
    shard_name,
    strip_compression,
)
from megatron_ext.tokenizers import build_tokenizer

PROG = "preprocess_data"
_MIN_CHUNK = 256 * 1024
_MAX_CHUNK = 2 * 1024 * 1024
# input bytes in flight (read, tokenized, not yet written): bounds memory
_IN_FLIGHT_BYTES = 64 * 1024 * 1024
# test only: SIGKILL this process once N shards are recorded (see the module docstring)
KILL_ENV = "MEGATRON_EXT_PREPROCESS_KILL_AFTER_SHARDS"
MANIFEST_FORMAT = "megatron_ext.preprocess_data.manifest"
MANIFEST_VERSION = 1
_SUFFIX_WORDS = ", ".join(TEXT_SUFFIXES) + " (each optionally followed by .gz or .zst)"


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize text/JSONL (optionally .gz/.zst) into Megatron .bin/.idx datasets "
        "({output_prefix}_{key}_document.bin/.idx).",
    )
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="input files, directories (their *.txt, *.text, *.json, *.jsonl files, each optionally .gz/.zst, "
        "sorted by name) or quoted glob patterns; each file is one shard",
    )
    p.add_argument("--output-prefix", required=True, help="output path prefix")
    p.add_argument(
        "--per-shard",
        action="store_true",
        help="write one dataset per input shard ({output_prefix}_{shard}_{key}_document.*) instead of one "
        "merged dataset",
    )
    p.add_argument(
        "--tokenizer-library", default="byte", help="tokenizer library: byte | char | sentencepiece | huggingface"
    )
    p.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece .model file; huggingface: a Hugging Face model directory with tokenizer.json "
                   "(ids as AutoTokenizer gives them, e.g. Llama's bos first, then eod with --append-eod)")
    p.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="JSONL keys to tokenize, one dataset each (plain text: the single name used "
        "in the output file name)",
    )
    p.add_argument("--append-eod", action="store_true", help="append the eod id to every document")
    p.add_argument("--workers", type=int, required=True, help="number of worker processes")
    p.add_argument(
        "--input-format", choices=("auto", "text", "jsonl"), default="auto", help="input format"
    )
    p.add_argument(
        "--log-interval",
        type=float,
        default=1.0,
        help="seconds between progress-bar updates (default 1)",
    )
    p.add_argument(
        "--chunk-bytes",
        type=int,
        default=0,
        help="bytes of input per work item (0 = automatic); does not change the output",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--overwrite", action="store_true", help="replace output files that already exist"
    )
    p.add_argument(
        "--stats-json", default=None, help="also write the run statistics to this JSON file"
    )
    return p


# ----------------------------------------------------------------------------- input format
def iter_chunks(path: str, size: int, chunk_bytes: int):
    """Yield ``(start, end)`` byte ranges of whole lines, each about ``chunk_bytes`` long."""
    start = 0
    with open(path, "rb") as f:
        while start < size:
            target = start + chunk_bytes
            if target >= size:
                yield start, size
                return
            f.seek(target - 1)  # if byte target-1 is '\n', the chunk ends exactly at target
            f.readline()
            end = min(f.tell(), size)
            yield start, end
            start = end


def line_number_at(path: str, offset: int) -> int:
    """1-based number of the line that starts at or contains byte ``offset``."""
    count = 0
    remaining = offset
    with open(path, "rb") as f:
        while remaining > 0:
            block = f.read(min(remaining, 16 * 1024 * 1024))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count + 1


# ----------------------------------------------------------------------------- inputs
@dataclass
class Shard:
    path: str  # absolute
    name: str
    compression: Optional[str]
    size: int
    mtime_ns: int
    fmt: str = "text"


def _accepted_name(name: str) -> bool:
    return not name.startswith(".") and strip_compression(name).lower().endswith(tuple(TEXT_SUFFIXES))


def expand_inputs(specs: Sequence[str]) -> Tuple[List[str], List[str]]:
    """The input files of ``--input`` (in order) and one log note per directory or pattern."""
    paths: List[str] = []
    notes: List[str] = []
    for spec in specs:
        p = os.path.abspath(os.path.expanduser(spec))
        if os.path.isdir(p):
            names = sorted(os.listdir(p))
            files = [os.path.join(p, n) for n in names if _accepted_name(n) and os.path.isfile(os.path.join(p, n))]
            others = sum(1 for n in names if not _accepted_name(n) and os.path.isfile(os.path.join(p, n)))
            if not files:
                raise DataError(
                    f"--input: the directory {p} holds no input file (expected names ending in {_SUFFIX_WORDS}"
                    + (f"; it has {others} other file(s)" if others else "") + ")"
                )
            notes.append(f"{p}{os.sep}: {len(files)} file(s) ending in {_SUFFIX_WORDS}, sorted by name"
                         + (f"; {others} other file(s) skipped" if others else ""))
            paths.extend(files)
        elif any(c in spec for c in "*?[") and not os.path.exists(p):
            matches = sorted(m for m in glob.glob(p, recursive=True) if os.path.isfile(m))
            if not matches:
                raise DataError(f"--input: the pattern {spec!r} matches no file")
            notes.append(f"{spec}: {len(matches)} file(s), sorted by path")
            paths.extend(os.path.abspath(m) for m in matches)
        elif not os.path.exists(p):
            raise DataError(f"--input: input file '{p}' does not exist")
        elif not os.path.isfile(p):
            raise DataError(f"--input: '{p}' is not a file")
        else:
            paths.append(p)
    seen: Dict[str, str] = {}
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            raise ConfigError(f"--input: {p} is given twice (also as {seen[real]}); each input may appear once")
        seen[real] = p
    return paths, notes


def make_shards(paths: Sequence[str], check_names: bool) -> List[Shard]:
    shards = []
    by_name: Dict[str, str] = {}
    for p in paths:
        st = os.stat(p)
        name = shard_name(p)
        if check_names:
            if not name or name.startswith(".") or os.sep in name:
                raise DataError(f"--input: {p}: cannot name a shard after this file name")
            if name in by_name:
                raise DataError(
                    f"--input: {by_name[name]} and {p} both give the shard name '{name}' (file name without "
                    f"{_SUFFIX_WORDS}); shard outputs are named after it -- rename one"
                )
            by_name[name] = p
        shards.append(Shard(p, name, compression_of(p), int(st.st_size), int(st.st_mtime_ns)))
    return shards


# ----------------------------------------------------------------------------- worker side
_W: Dict[str, Any] = {}


def _init_worker(library, model, keys, append_eod, threads) -> None:
    tok = build_tokenizer(
        library, model, library_key="--tokenizer-library", model_key="--tokenizer-model"
    )
    if hasattr(tok, "num_threads"):
        tok.num_threads = threads
    _W.update(tok=tok, keys=list(keys), append_eod=append_eod)


def _init_pool_worker(*args) -> None:
    # a worker must not outlive the main process (killed with SIGKILL, it cannot stop its pool)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - not Linux
        pass
    _init_worker(*args)


def _snippet(line: str, n: int = 80) -> str:
    line = line.strip()
    return line if len(line) <= n else line[: n - 3] + "..."


def _first_line(task) -> int:
    path, _fmt, start, _end, blob, first_line, _pb = task
    return first_line if first_line is not None else line_number_at(path, start)


def _diagnose(lines: List[str], task, keys: Sequence[str]) -> None:
    """Slow path after a batched step failed: find the first bad line and raise DataError."""
    path, fmt, start = task[0], task[1], task[2]
    first = _first_line(task)
    tok = _W["tok"]
    for i, line in enumerate(lines):
        if not line or line.isspace():
            continue
        where = f"{path}, line {first + i}"
        if fmt == "jsonl":
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as exc:
                msg = getattr(exc, "msg", str(exc))
                col = getattr(exc, "colno", None)
                at = f" at column {col}" if col else ""
                raise DataError(
                    f"{where}: not valid JSON ({msg}{at}): {_snippet(line)!r}"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(
                    f"{where}: expected a JSON object with key(s) {', '.join(keys)}, "
                    f"got a JSON {type(obj).__name__}: {_snippet(line)!r}"
                )
            for key in keys:
                if key not in obj:
                    have = ", ".join(list(obj)[:10]) or "(none)"
                    raise DataError(
                        f"{where}: missing key '{key}' (from --json-keys); "
                        f"the object has keys: {have}"
                    )
                if not isinstance(obj[key], str):
                    raise DataError(
                        f"{where}: key '{key}' holds a JSON {type(obj[key]).__name__}, "
                        f"expected a string"
                    )
            texts = [obj[k] for k in keys]
        else:
            texts = [line]
        for text in texts:
            try:
                tok.tokenize_batch_flat([text])
            except (UnicodeError, TypeError, ValueError) as exc:
                raise DataError(f"{where}: cannot tokenize this document: {exc}") from None
    raise DataError(f"{path}: cannot process bytes {start}.. (no single bad line found)")


def _process_chunk(task):
    """Tokenize one chunk of whole lines. ``task``: ``(path, format, start, end, blob, first_line, progress)``;
    ``blob`` None: read bytes [start, end) of the (uncompressed) file; else the decompressed text of a compressed
    file, which starts at decompressed offset ``start`` and line ``first_line``. Returns
    ``(docs, progress, [(tokens, lengths)] per key)``."""
    path, fmt, start, end, blob, first_line, progress = task
    keys, tok = _W["keys"], _W["tok"]
    if blob is None:
        with open(path, "rb") as f:
            f.seek(start)
            blob = f.read(end - start)
    if start == 0 and blob.startswith(codecs.BOM_UTF8):
        blob = blob[len(codecs.BOM_UTF8):]
        start += len(codecs.BOM_UTF8)
        task = (path, fmt, start, end, None, first_line, progress)
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        if first_line is None:
            line = line_number_at(path, start + exc.start)
            where = "file offset"
        else:
            line = first_line + blob[: exc.start].count(b"\n")
            where = "decompressed offset"
        raise DataError(
            f"{path}, line {line}: not valid UTF-8 (byte 0x{blob[exc.start]:02x} at {where} "
            f"{start + exc.start})"
        ) from None
    del blob
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    del text

    if fmt == "jsonl":
        loads = json.loads
        try:
            objs = [loads(line) for line in lines if line and not line.isspace()]
        except (ValueError, RecursionError):
            _diagnose(lines, task, keys)
        columns = []
        for key in keys:
            try:
                texts = [o[key] for o in objs]
            except (KeyError, TypeError, IndexError):
                _diagnose(lines, task, keys)
            if not all(type(t) is str for t in texts):
                _diagnose(lines, task, keys)
            columns.append(texts)
        n_docs = len(objs)
        del objs
    else:
        docs = [line for line in lines if line and not line.isspace()]
        columns = [docs]
        n_docs = len(docs)

    out = []
    for texts in columns:
        try:
            out.append(tok.tokenize_batch_flat(texts, append_eod=_W["append_eod"]))
        except (UnicodeError, TypeError, ValueError):
            _diagnose(lines, task, keys)
    return n_docs, progress, out


# ----------------------------------------------------------------------------- tasks (main process)
def _chunk_bytes(args, shard: Shard, workers: int) -> int:
    if args.chunk_bytes:
        return args.chunk_bytes
    text_size = shard.size * (4 if shard.compression else 1)  # compressed text: ~4x its file size
    return max(_MIN_CHUNK, min(_MAX_CHUNK, text_size // (workers * 4) + 1))


def _decompress_error(path: str, exc: BaseException) -> DataError:
    return DataError(f"{path}: cannot decompress it ({type(exc).__name__}: {exc}); the file is corrupt or "
                     f"truncated")


def shard_tasks(shard: Shard, chunk: int):
    """The work items of one shard, in order (see :func:`_process_chunk`)."""
    if shard.compression is None:
        for start, end in iter_chunks(shard.path, shard.size, chunk):
            yield (shard.path, shard.fmt, start, end, None, None, end - start)
        return
    raw = open(shard.path, "rb")
    try:
        f = open_binary(shard.path, raw)
    except BaseException:
        raw.close()
        raise
    errors = decompress_errors()
    with f:
        offset, line, carry, seen = 0, 1, b"", 0
        while True:
            try:
                data = f.read(chunk)
            except errors as exc:
                raise _decompress_error(shard.path, exc) from None
            if data:
                buf = carry + data if carry else data
                cut = buf.rfind(b"\n")
                if cut < 0:
                    carry = buf
                    continue
                blob, carry = buf[: cut + 1], buf[cut + 1:]
            elif carry:
                blob, carry = carry, b""
            else:
                return
            pos = raw.tell()
            yield (shard.path, shard.fmt, offset, offset + len(blob), blob, line, pos - seen)
            seen = pos
            offset += len(blob)
            line += blob.count(b"\n")


# ----------------------------------------------------------------------------- writing
def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def _fmt_rate(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _fmt_bytes(x: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= div:
            return f"{x / div:.1f} {unit}"
    return f"{x:.0f} B"


class _writing:
    """Turn an ``OSError`` raised while writing ``path`` (read-only, disk full, ...) into one DataError."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and isinstance(exc, OSError):
            raise write_error(exc, self.path, "--output-prefix") from None
        return False


@dataclass
class _Job:
    """One shard of this run: its outputs (one prefix per key) and what was written."""

    shard: Shard
    prefixes: List[str]
    index: int  # position in the input order, from 0
    writers: Optional[List[DatasetWriter]] = None
    docs: int = 0
    tokens_per_key: List[int] = field(default_factory=list)
    status: str = "todo"  # todo | done (verified, skipped) | redo (recorded, outputs missing)
    stats: Dict[str, Any] = field(default_factory=dict)

    def output_files(self) -> List[str]:
        return [p + ext for p in self.prefixes for ext in (".bin", ".idx")]


# ----------------------------------------------------------------------------- manifest
def _settings(args, tokenizer, keys, dtype) -> Dict[str, Any]:
    return {
        "tokenizer": tokenizer.describe(),
        "tokenizer_model_sha256": sha256_file(args.tokenizer_model) if args.tokenizer_model else None,
        "json_keys": list(keys),
        "append_eod": bool(args.append_eod),
        "input_format": args.input_format,
        "dtype": np.dtype(dtype).name,
    }


def _jsonable(x):
    return json.loads(json.dumps(x))


def load_manifest(path: str) -> Optional[Dict[str, Any]]:
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--output-prefix: {path} is not a readable manifest of preprocess_data ({exc}); "
                          f"pass --overwrite to redo every shard, or choose another --output-prefix") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("shards"), dict):
        raise ConfigError(f"--output-prefix: {path} exists and is not a manifest of preprocess_data; pass "
                          f"--overwrite to replace it, or choose another --output-prefix")
    if m.get("version") != MANIFEST_VERSION:
        raise ConfigError(f"--output-prefix: {path} is a manifest of version {m.get('version')}, this tool "
                          f"writes version {MANIFEST_VERSION}; pass --overwrite to redo every shard")
    return m


def write_manifest(path: str, manifest: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with _writing(path):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))


def _verify_recorded(job: _Job, entry: Dict[str, Any], manifest_path: str, per_shard: bool) -> Optional[str]:
    """None when ``job``'s shard is finished (input unchanged, outputs as recorded); else why it is redone.
    Raises ConfigError where redoing it would replace what the user may rely on."""
    shard = job.shard
    inp = entry.get("input") or {}
    unchanged = inp.get("size") == shard.size and (
        (inp.get("path") == shard.path and inp.get("mtime_ns") == shard.mtime_ns)
        or inp.get("sha256") == sha256_file(shard.path)
    )
    if not unchanged:
        raise ConfigError(
            f"--input: {shard.path} (shard '{shard.name}') differs from the input that {manifest_path} records as "
            f"done ({inp.get('path')}, {inp.get('size')} bytes; size or sha256 differ); pass --overwrite to redo "
            f"every shard, or restore the file"
        )
    recorded = entry.get("outputs") or {}
    files = job.output_files()
    present = [f for f in files if os.path.lexists(f)]
    if not present:
        return "its outputs are missing"
    for f in files:
        rec = recorded.get(os.path.basename(f))
        ok = (rec is not None and os.path.isfile(f) and os.path.getsize(f) == rec.get("size")
              and sha256_file(f) == rec.get("sha256"))
        if not ok:
            if not per_shard:
                return f"{f} does not match the manifest"
            raise ConfigError(
                f"--output-prefix: {f} does not match {manifest_path} (missing, or size or sha256 differ): it was "
                f"changed after preprocess_data wrote it; pass --overwrite to redo every shard"
            )
    return None


# ----------------------------------------------------------------------------- main
def _kill_after() -> Optional[int]:
    value = os.environ.get(KILL_ENV, "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise ConfigError(f"{KILL_ENV} (test only): expected a shard count >= 0, got {value!r}")
    return n


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    t_start = time.perf_counter()
    if args.workers < 1:
        raise ConfigError(f"--workers: expected an integer >= 1, got {args.workers}")
    if args.chunk_bytes < 0:
        raise ConfigError(f"--chunk-bytes: expected >= 0, got {args.chunk_bytes}")
    keys = list(args.json_keys)
    if len(set(keys)) != len(keys) or any(not k or "/" in k for k in keys):
        raise ConfigError(f"--json-keys: expected distinct non-empty keys, got {keys}")
    kill_after = _kill_after()
    specs = [args.input] if isinstance(args.input, str) else list(args.input)
    paths, notes = expand_inputs(specs)
    single = len(paths) == 1 and not args.per_shard
    shards = make_shards(paths, check_names=not single)

    out_prefix = os.path.abspath(os.path.expanduser(args.output_prefix))
    out_dir = os.path.dirname(out_prefix)
    final_prefixes = [output_prefix_for(out_prefix, k) for k in keys]
    manifest_path = None
    parts_dir = None
    if single:
        jobs = [_Job(shards[0], final_prefixes, 0)]
    elif args.per_shard:
        manifest_path = out_prefix + ".manifest.json"
        jobs = [_Job(s, [output_prefix_for(f"{out_prefix}_{s.name}", k) for k in keys], i)
                for i, s in enumerate(shards)]
    else:
        parts_dir = out_prefix + ".parts"
        manifest_path = os.path.join(parts_dir, "manifest.json")
        jobs = [_Job(s, [output_prefix_for(os.path.join(parts_dir, s.name), k) for k in keys], i)
                for i, s in enumerate(shards)]

    # outputs vs inputs (before anything is read); existing outputs are checked once the manifest is read
    inputs = [s.path for s in shards] + [args.tokenizer_model]
    outputs = [("--output-prefix", f) for j in jobs for f in j.output_files()]
    if not single and not args.per_shard:
        outputs += [("--output-prefix", p + ext) for p in final_prefixes for ext in (".bin", ".idx")]
        outputs += [("--output-prefix", p + ext) for p in final_prefixes for ext in (".bin.tmp", ".idx.tmp")]
    if manifest_path:
        outputs += [("--output-prefix", manifest_path), ("--output-prefix", manifest_path + ".tmp")]
    outputs += [("--output-prefix", f + ".tmp") for j in jobs for f in j.output_files()]
    if getattr(args, "stats_json", None):
        outputs.append(("--stats-json", args.stats_json))
    check_outputs(outputs, inputs, overwrite_flag=None)
    if parts_dir and os.path.lexists(parts_dir) and not os.path.isdir(parts_dir):
        raise ConfigError(f"--output-prefix: {parts_dir} (where the shards are tokenized before the merge) exists "
                          f"and is not a directory; remove it or choose another --output-prefix")

    tokenizer = build_tokenizer(
        args.tokenizer_library,
        args.tokenizer_model,
        library_key="--tokenizer-library",
        model_key="--tokenizer-model",
    )
    dtype = optimal_dtype(tokenizer.vocab_size)
    settings = _settings(args, tokenizer, keys, dtype) if manifest_path else None

    # the manifest of an earlier run: which shards are finished
    manifest = None
    overwrite = getattr(args, "overwrite", False)
    if manifest_path and not overwrite:
        manifest = load_manifest(manifest_path)
        if manifest is None and parts_dir and os.path.isdir(parts_dir) and os.listdir(parts_dir):
            raise ConfigError(f"--output-prefix: the directory {parts_dir} exists, is not empty and has no manifest "
                              f"of preprocess_data; pass --overwrite to write into it, or choose another "
                              f"--output-prefix")
        if manifest is not None:
            old = manifest.get("settings") or {}
            new = _jsonable(settings)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff:
                raise ConfigError(
                    f"--output-prefix: {manifest_path} records shards made with other settings ({', '.join(diff)} "
                    f"differ: {', '.join(f'{k}={old.get(k)!r} there, {new.get(k)!r} now' for k in diff)}); pass "
                    f"--overwrite to redo every shard, or choose another --output-prefix"
                )
            for job in jobs:
                entry = manifest["shards"].get(job.shard.name)
                if entry is None:
                    continue
                why = _verify_recorded(job, entry, manifest_path, args.per_shard)
                if why is None:
                    job.status = "done"
                    job.stats = dict(entry.get("stats") or {}, skipped=True)
                else:
                    job.status = "redo"
                    job.stats = {"redo": why}
    existing = [("--output-prefix", f) for j in jobs if j.status == "todo" for f in j.output_files()]
    if not single and not args.per_shard:
        existing += [("--output-prefix", p + ext) for p in final_prefixes for ext in (".bin", ".idx")]
    if getattr(args, "stats_json", None):
        existing.append(("--stats-json", args.stats_json))
    check_outputs(existing, inputs, overwrite=overwrite)

    for shard in shards:
        shard.fmt = detect_format(shard.path, args.input_format)
        if shard.fmt == "text" and len(keys) != 1:
            raise ConfigError(
                f"--json-keys: plain-text input ({shard.path}) has one field per line, got {len(keys)} keys "
                f"({' '.join(keys)}); use JSONL input or a single key"
            )

    for d in {out_dir, parts_dir} - {None}:
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, d, "--output-prefix") from None
    if manifest_path:
        if manifest is None:
            manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
                        "mode": "per-shard" if args.per_shard else "merged", "settings": settings, "shards": {}}
        if overwrite:
            manifest["shards"] = {}
        manifest["settings"] = settings

    workers = args.workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    init_args = (args.tokenizer_library, args.tokenizer_model, keys, bool(args.append_eod), threads)
    todo = [j for j in jobs if j.status != "done"]
    say = (lambda msg: None) if single else (lambda msg: bar.write(msg, file=sys.stdout))

    pool = None
    if workers > 1 and todo:
        import multiprocessing as mp

        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else None)
        pool = ctx.Pool(workers, initializer=_init_pool_worker, initargs=init_args)
    elif todo:
        _init_worker(*init_args)

    from tqdm import tqdm

    bar = tqdm(
        total=sum(j.shard.size for j in todo),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=PROG,
        file=sys.stderr,
        mininterval=max(0.0, args.log_interval),
        disable=args.no_progress,
        dynamic_ncols=True,
    )
    n = len(jobs)
    if not single:
        for note in notes:
            say(f"{PROG}: input {note}")
        say(f"{PROG}: {n} shard(s) in this order: {', '.join(j.shard.name for j in jobs)}")
        for job in jobs:
            if job.status == "done":
                say(f"{PROG}: [{job.index + 1}/{n}] {job.shard.name}: finished in an earlier run (input and "
                    f"outputs verified: size, sha256), skipped")
            elif job.status == "redo":
                say(f"{PROG}: [{job.index + 1}/{n}] {job.shard.name}: recorded as finished but {job.stats['redo']}; "
                    f"redoing it")

    t_proc = time.perf_counter()
    state = {"docs": 0, "tokens": 0, "recorded": 0, "last_end": t_proc, "progress": {}}

    def consume(job: _Job, result) -> None:
        docs, progress, columns = result
        if job.writers is None:
            job.writers = []
            job.tokens_per_key = [0] * len(keys)
            for pre in job.prefixes:
                with _writing(pre + ".bin"):
                    job.writers.append(DatasetWriter(pre, dtype))
        for i, (tokens, lengths) in enumerate(columns):
            with _writing(job.prefixes[i] + ".bin"):
                job.writers[i].add_documents(tokens, lengths)
            job.tokens_per_key[i] += int(tokens.shape[0])
            state["tokens"] += int(tokens.shape[0])
        job.docs += docs
        state["docs"] += docs
        state["progress"][job.index] = state["progress"].get(job.index, 0) + progress
        bar.update(progress)
        dt = max(time.perf_counter() - t_proc, 1e-9)
        bar.set_postfix_str(  # drawn by tqdm at most every --log-interval seconds
            f"{_fmt_rate(state['docs'] / dt)} docs/s, {_fmt_rate(state['tokens'] / dt)} tok/s", refresh=False
        )
        if kill_after is not None and state["recorded"] >= kill_after:
            _die()

    def finish(job: _Job) -> None:
        shard = job.shard
        bar.update(max(0, shard.size - state["progress"].get(job.index, 0)))
        if job.docs == 0:
            raise DataError(
                f"--input: {shard.path} is empty: it has no documents (the file is empty or has only "
                f"blank lines); no dataset was written" + ("" if single else " for this shard")
            )
        for key, count in zip(keys, job.tokens_per_key):
            if count == 0:
                what = f"every '{key}' text" if shard.fmt == "jsonl" else "every document"
                raise DataError(
                    f"--input: {shard.path} gives an empty dataset: {what} is empty (0 tokens in "
                    f"{job.docs} documents); no dataset was written" + ("" if single else " for this shard")
                )
        for w in job.writers:
            with _writing(w.prefix + ".idx"):
                w.finalize(fsync=not single)
        now = time.perf_counter()
        seconds = now - state["last_end"]
        state["last_end"] = now
        tokens = sum(job.tokens_per_key)
        job.stats = {
            "shard": shard.name, "input": shard.path, "compression": shard.compression, "input_format": shard.fmt,
            "input_bytes": shard.size, "documents": job.docs, "tokens": tokens,
            "tokens_per_key": dict(zip(keys, job.tokens_per_key)), "seconds": seconds,
            "tokens_per_sec": tokens / max(seconds, 1e-9), "skipped": False,
        }
        if manifest_path:
            files = {}
            for w in job.writers:
                files.update({os.path.basename(k): v for k, v in w.files().items()})
            manifest["shards"][shard.name] = {
                "input": {"path": shard.path, "size": shard.size, "mtime_ns": shard.mtime_ns,
                          "sha256": sha256_file(shard.path)},
                "outputs": files,
                "stats": job.stats,
            }
            write_manifest(manifest_path, manifest)
        for w in job.writers:
            with _writing(w.prefix + ".bin"):
                w.commit()
        if manifest_path:
            fsync_dir(os.path.dirname(job.prefixes[0]))
            state["recorded"] += 1
        job.writers = None
        say(f"{PROG}: [{job.index + 1}/{n}] {shard.name}: {job.docs} docs, {tokens} tokens, "
            f"{_fmt_bytes(shard.size)} in, {seconds:.2f} s ({_fmt_rate(job.stats['tokens_per_sec'])} tokens/s)")

    ok = False
    try:
        pending: deque = deque()  # ("chunk", job, result or AsyncResult) | ("end", job, None), in input order
        chunks = [0]

        def pop() -> None:
            kind, job, res = pending.popleft()
            if kind == "end":
                finish(job)
                return
            chunks[0] -= 1
            consume(job, res.get() if pool is not None else res)

        for job in todo:
            chunk = _chunk_bytes(args, job.shard, workers)
            window = max(2 * workers + 1, _IN_FLIGHT_BYTES // chunk) if pool is not None else 1
            for task in shard_tasks(job.shard, chunk):
                if pool is not None:
                    pending.append(("chunk", job, pool.apply_async(_process_chunk, (task,))))
                else:
                    pending.append(("chunk", job, _process_chunk(task)))
                chunks[0] += 1
                while chunks[0] >= window:
                    pop()
            pending.append(("end", job, None))
        while pending:
            pop()
        if kill_after is not None and state["recorded"] >= kill_after and not single:
            _die()

        if not single and not args.per_shard:
            t_merge = time.perf_counter()
            for k, pre in enumerate(final_prefixes):
                parts = [j.prefixes[k] for j in jobs]
                with _writing(pre + ".bin"):
                    merge_into(parts, pre + ".bin.tmp", pre + ".idx.tmp")
            for pre in final_prefixes:
                with _writing(pre + ".bin"):
                    os.replace(pre + ".bin.tmp", pre + ".bin")
                    os.replace(pre + ".idx.tmp", pre + ".idx")
            # only what this tool wrote there: the parts and the manifest (then the directory, when empty)
            for f in [f for j in jobs for f in j.output_files()] + [manifest_path]:
                if os.path.exists(f):
                    os.remove(f)
            try:
                os.rmdir(parts_dir)
            except OSError:
                pass
            say(f"{PROG}: merged {n} shard(s) in input order in {time.perf_counter() - t_merge:.2f} s; removed "
                f"the parts and {manifest_path}")
        ok = True
    finally:
        bar.leave = ok  # on error, clear the bar so the one-line message stands alone
        bar.close()
        if pool is not None:
            if ok:
                pool.close()
            else:
                pool.terminate()
            pool.join()
        if not ok:
            for job in jobs:
                for w in job.writers or []:
                    w.abort()
            for pre in final_prefixes if not single and not args.per_shard else []:
                for ext in (".bin.tmp", ".idx.tmp"):
                    if os.path.exists(pre + ext):
                        os.remove(pre + ext)

    seconds = time.perf_counter() - t_start
    processed_tokens = state["tokens"]
    all_docs = sum(int(j.stats.get("documents", 0)) for j in jobs)
    all_tokens = sum(int(j.stats.get("tokens", 0)) for j in jobs)
    per_key = {k: sum(int((j.stats.get("tokens_per_key") or {}).get(k, 0)) for j in jobs) for k in keys}
    if args.per_shard:
        outs = [f for j in jobs for f in j.output_files()]
    else:
        outs = [p + ext for p in final_prefixes for ext in (".bin", ".idx")]
    stats = {
        "input": shards[0].path if single else [s.path for s in shards],
        "input_format": shards[0].fmt if single else sorted({s.fmt for s in shards}),
        "input_bytes": sum(s.size for s in shards),
        "documents": all_docs,
        "tokens": all_tokens,
        "tokens_per_key": per_key,
        "tokens_processed": processed_tokens,
        "seconds": seconds,
        "tokens_per_sec": processed_tokens / max(seconds, 1e-9),
        "docs_per_sec": state["docs"] / max(seconds, 1e-9),
        "mb_per_sec": sum(j.shard.size for j in todo) / 1e6 / max(seconds, 1e-9),
        "workers": workers,
        "tokenizer": tokenizer.describe(),
        "append_eod": bool(args.append_eod),
        "mode": "single" if single else ("per-shard" if args.per_shard else "merged"),
        "shards_processed": len(todo),
        "shards_skipped": len(jobs) - len(todo),
        "shards": [] if single else [j.stats for j in jobs],
        "outputs": outs,
    }
    return stats


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    rc, stats = run_entry_point(PROG, run, args)
    if rc:
        return rc
    outs = ", ".join(stats["outputs"])
    if stats["mode"] == "single":
        what = f"{stats['documents']} docs, {stats['tokens']} tokens"
    else:
        what = (f"{len(stats['shards'])} shard(s) ({stats['shards_skipped']} skipped), {stats['documents']} docs, "
                f"{stats['tokens']} tokens ({stats['tokens_processed']} tokenized in this run)")
    print(
        f"{PROG}: {what} in {stats['seconds']:.2f} s ({_fmt_rate(stats['tokens_per_sec'])} tokens/s, "
        f"{_fmt_rate(stats['docs_per_sec'])} docs/s, {stats['mb_per_sec']:.1f} MB/s) -> {outs}",
        flush=True,
    )
    if args.stats_json:
        try:
            with open(args.stats_json, "w", encoding="utf-8") as f:
                json.dump(stats, f, indent=2)
        except OSError as exc:
            print(f"{PROG}: error: {write_error(exc, args.stats_json, '--stats-json', 'the dataset was written')}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tokenize a corpus into Megatron MMIDIDX ``.bin/.idx`` datasets.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-library sentencepiece --tokenizer-model spm.model --append-eod --workers 2

Input
  * plain text (``--input-format text``): one document per line; blank (whitespace-only)
    lines are skipped; ``\\r\\n`` line ends are accepted;
  * JSONL (``--input-format jsonl``): one JSON object per line, the text of each
    ``--json-keys`` key is tokenized (default ``text``); blank lines are skipped; every object
    must have every key, with a string value (an empty string gives an empty document, so the
    documents of all keys stay aligned line by line);
  * ``--input-format auto`` (default): JSONL when the file name ends in ``.json``/``.jsonl`` or
    the first non-blank line is a JSON object, else plain text.

Output (Megatron's naming, so Megatron data prefixes work unchanged)
  one dataset per key: ``{output_prefix}_{key}_document.bin`` / ``.idx``; with plain text the
  key is the (single) ``--json-keys`` value, ``text`` by default. Every key gets its own
  finalized ``.idx`` (Megatron-LM's script only finalized the last one). One document is one
  sequence; ``--append-eod`` appends the tokenizer's end-of-document id to each. Tokens are
  ``uint16`` when the vocabulary is under 65,500, else ``int32``
  (``megatron.core.datasets.indexed_dataset.DType.optimal_dtype``). Files are written under a
  temporary name and renamed at the end, so a failed run leaves no half-written dataset.

How it is fast
  The file is cut into chunks of whole lines (``--chunk-bytes``); each worker process reads its
  chunk itself, parses it, tokenizes the whole chunk with one batched call (sentencepiece's
  C++ batch encoder, ``cpu_count // workers`` threads each) and returns flat numpy arrays; the
  main process writes each chunk to the ``.bin`` in one write, in input order. Sequence
  lengths are kept as numpy arrays and the index is written vectorized, so memory is
  ~4 bytes per document plus a few chunks in flight. The output does not depend on
  ``--workers`` or ``--chunk-bytes``.

Refused before anything is read: an output (``.bin``, ``.idx``, ``--stats-json``) that is the input
or the tokenizer model (same path, a symlink or a hard link), and an output that already exists
unless ``--overwrite`` is given (``megatron_ext/output_files.py``).

Errors (missing file, invalid JSON line, missing key, bad tokenizer model, an input with no
documents or no tokens, a read-only output directory, a full disk, ...) print one message naming
the file/line/key and exit with status 2; no ``.bin``/``.idx`` (final or temporary) is left behind.
"""
from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import time
import warnings
from collections import deque
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from megatron_ext.errors import ConfigError, DataError, run_entry_point
from megatron_ext.output_files import check_outputs, write_error
from megatron_ext.text_files import detect_format
from megatron_ext.tokenizers import build_tokenizer

PROG = "preprocess_data"
_MIN_CHUNK = 256 * 1024
_MAX_CHUNK = 2 * 1024 * 1024
# input bytes in flight (read, tokenized, not yet written): bounds memory, and is large enough
# that the workers keep going while the main process imports megatron-core
_IN_FLIGHT_BYTES = 64 * 1024 * 1024


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize text/JSONL into Megatron .bin/.idx datasets "
        "({output_prefix}_{key}_document.bin/.idx).",
    )
    p.add_argument("--input", required=True, help="input file: plain text or JSONL")
    p.add_argument("--output-prefix", required=True, help="output path prefix")
    p.add_argument(
        "--tokenizer-library", default="byte", help="tokenizer library: byte | sentencepiece"
    )
    p.add_argument("--tokenizer-model", default=None, help="sentencepiece .model file")
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


# ----------------------------------------------------------------------------- worker side
_W: Dict[str, Any] = {}


def _init_worker(library, model, path, fmt, keys, append_eod, threads) -> None:
    tok = build_tokenizer(
        library, model, library_key="--tokenizer-library", model_key="--tokenizer-model"
    )
    if hasattr(tok, "num_threads"):
        tok.num_threads = threads
    _W.update(tok=tok, path=path, fmt=fmt, keys=list(keys), append_eod=append_eod)


def _snippet(line: str, n: int = 80) -> str:
    line = line.strip()
    return line if len(line) <= n else line[: n - 3] + "..."


def _diagnose(lines: List[str], start: int, keys: Sequence[str]) -> None:
    """Slow path after a batched step failed: find the first bad line and raise DataError."""
    path = _W["path"]
    first = line_number_at(path, start)
    tok = _W["tok"]
    for i, line in enumerate(lines):
        if not line or line.isspace():
            continue
        where = f"{path}, line {first + i}"
        if _W["fmt"] == "jsonl":
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


def _process_chunk(start: int, end: int):
    """Tokenize the lines in byte range [start, end). Returns (docs, bytes, [(tokens, lengths)])."""
    path, fmt, keys, tok = _W["path"], _W["fmt"], _W["keys"], _W["tok"]
    with open(path, "rb") as f:
        f.seek(start)
        blob = f.read(end - start)
    nbytes = end - start
    if start == 0 and blob.startswith(codecs.BOM_UTF8):
        blob = blob[len(codecs.BOM_UTF8):]
        start += len(codecs.BOM_UTF8)
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = line_number_at(path, start + exc.start)
        raise DataError(
            f"{path}, line {line}: not valid UTF-8 (byte 0x{blob[exc.start]:02x} at file "
            f"offset {start + exc.start})"
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
            _diagnose(lines, start, keys)
        columns = []
        for key in keys:
            try:
                texts = [o[key] for o in objs]
            except (KeyError, TypeError, IndexError):
                _diagnose(lines, start, keys)
            if not all(type(t) is str for t in texts):
                _diagnose(lines, start, keys)
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
            _diagnose(lines, start, keys)
    return n_docs, nbytes, out


# ----------------------------------------------------------------------------- writing
def _indexed_dataset_module():
    """Import megatron-core's indexed_dataset (slow: it imports all of megatron.core)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def _make_builder(bin_path: str, dtype):
    """A megatron-core ``IndexedDatasetBuilder`` that takes whole chunks of documents.

    ``add_documents(tokens, lengths)`` writes a chunk with one ``write`` and keeps the
    lengths as a numpy array; ``finalize`` writes the index through megatron-core's index
    writer with the sequence pointers computed by ``cumsum`` instead of a Python loop.
    """
    idx_mod = _indexed_dataset_module()

    class ChunkedIndexedDatasetBuilder(idx_mod.IndexedDatasetBuilder):
        def __init__(self, path: str, dtype) -> None:
            super().__init__(path, dtype=dtype)
            self._length_chunks: List[np.ndarray] = []

        def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
            if len(self.sequence_lengths):
                raise RuntimeError("add_documents cannot be mixed with add_item/add_document")
            if lengths.size and int(lengths.max()) > np.iinfo(np.int32).max:
                raise DataError("a document has more than 2^31 tokens")
            self.data_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
            self._length_chunks.append(lengths.astype(np.int32))

        def finalize(self, idx_path: str) -> None:
            if not self._length_chunks:
                return super().finalize(idx_path)
            lengths = np.concatenate(self._length_chunks)
            self._length_chunks = []
            doc_idx = np.arange(lengths.shape[0] + 1, dtype=np.int64)
            self.data_file.close()
            writer_cls = getattr(idx_mod, "_IndexWriter", None)
            if writer_cls is None:  # pragma: no cover - fall back to the public, list-based path
                self.sequence_lengths = lengths.tolist()
                self.document_indices = doc_idx.tolist()
                self.data_file = open(os.devnull, "wb")
                return super().finalize(idx_path)

            class _VectorIndexWriter(writer_cls):
                def _sequence_pointers(self, sequence_lengths):
                    itemsize = idx_mod.DType.size(self.dtype)
                    pointers = np.zeros(len(sequence_lengths), dtype=np.int64)
                    if len(sequence_lengths) > 1:
                        np.cumsum(
                            np.asarray(sequence_lengths[:-1], dtype=np.int64) * itemsize,
                            out=pointers[1:],
                        )
                    return pointers

            with _VectorIndexWriter(idx_path, self.dtype) as writer:
                writer.write(lengths, None, doc_idx)

    return ChunkedIndexedDatasetBuilder(bin_path, dtype)


def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


# ----------------------------------------------------------------------------- main
def _fmt_rate(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


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


def run(args: argparse.Namespace) -> Dict[str, Any]:
    t_start = time.perf_counter()
    path = os.path.abspath(os.path.expanduser(args.input))
    if not os.path.exists(path):
        raise DataError(f"--input: input file '{path}' does not exist")
    if not os.path.isfile(path):
        raise DataError(f"--input: '{path}' is not a file")
    if args.workers < 1:
        raise ConfigError(f"--workers: expected an integer >= 1, got {args.workers}")
    if args.chunk_bytes < 0:
        raise ConfigError(f"--chunk-bytes: expected >= 0, got {args.chunk_bytes}")
    keys = list(args.json_keys)
    if len(set(keys)) != len(keys) or any(not k or "/" in k for k in keys):
        raise ConfigError(f"--json-keys: expected distinct non-empty keys, got {keys}")
    out_prefix = os.path.abspath(os.path.expanduser(args.output_prefix))
    prefixes = [output_prefix_for(out_prefix, k) for k in keys]
    inputs = [path, args.tokenizer_model]
    outputs = [("--output-prefix", p + ext) for p in prefixes for ext in (".bin", ".idx")]
    if getattr(args, "stats_json", None):
        outputs.append(("--stats-json", args.stats_json))
    check_outputs(outputs, inputs, overwrite=getattr(args, "overwrite", False))
    temporaries = [("--output-prefix", p + ext) for p in prefixes for ext in (".bin.tmp", ".idx.tmp")]
    check_outputs(temporaries, inputs, overwrite_flag=None)

    tokenizer = build_tokenizer(
        args.tokenizer_library,
        args.tokenizer_model,
        library_key="--tokenizer-library",
        model_key="--tokenizer-model",
    )
    fmt = detect_format(path, args.input_format)
    if fmt == "text" and len(keys) != 1:
        raise ConfigError(
            f"--json-keys: plain-text input has one field per line, got {len(keys)} keys "
            f"({' '.join(keys)}); use JSONL input or a single key"
        )

    out_dir = os.path.dirname(out_prefix)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise write_error(exc, out_dir, "--output-prefix") from None

    size = os.path.getsize(path)
    workers = args.workers
    chunk = args.chunk_bytes or max(_MIN_CHUNK, min(_MAX_CHUNK, size // (workers * 4) + 1))
    threads = max(1, (os.cpu_count() or 1) // workers)
    init_args = (
        args.tokenizer_library,
        args.tokenizer_model,
        path,
        fmt,
        keys,
        bool(args.append_eod),
        threads,
    )

    pool = None
    if workers > 1:
        import multiprocessing as mp

        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else None)
        # started before megatron-core is imported, so the workers stay small and start fast
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=init_args)
    else:
        _init_worker(*init_args)

    from tqdm import tqdm

    bar = tqdm(
        total=size,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=PROG,
        file=sys.stderr,
        mininterval=max(0.0, args.log_interval),
        disable=args.no_progress,
        dynamic_ncols=True,
    )

    builders = None
    tmp_paths: List[str] = []
    n_docs = 0
    n_tokens = 0
    n_tokens_key = [0] * len(keys)
    t_proc = time.perf_counter()

    def consume(result) -> None:
        nonlocal builders, n_docs, n_tokens
        docs, nbytes, columns = result
        if builders is None:
            builders = []
            dtype = _indexed_dataset_module().DType.optimal_dtype(tokenizer.vocab_size)
            for pre in prefixes:
                tmp_bin = pre + ".bin.tmp"
                tmp_paths.extend([tmp_bin, pre + ".idx.tmp"])
                with _writing(pre + ".bin"):
                    builders.append(_make_builder(tmp_bin, dtype))
        for i, (tokens, lengths) in enumerate(columns):
            with _writing(prefixes[i] + ".bin"):
                builders[i].add_documents(tokens, lengths)
            n_tokens_key[i] += int(tokens.shape[0])
            n_tokens += int(tokens.shape[0])
        n_docs += docs
        bar.update(nbytes)
        dt = max(time.perf_counter() - t_proc, 1e-9)
        bar.set_postfix_str(  # drawn by tqdm at most every --log-interval seconds
            f"{_fmt_rate(n_docs / dt)} docs/s, {_fmt_rate(n_tokens / dt)} tok/s", refresh=False
        )

    ok = False
    try:
        if pool is None:
            for start, end in iter_chunks(path, size, chunk):
                consume(_process_chunk(start, end))
        else:
            pending: deque = deque()
            window = max(2 * workers + 1, _IN_FLIGHT_BYTES // chunk)
            for start, end in iter_chunks(path, size, chunk):
                pending.append(pool.apply_async(_process_chunk, (start, end)))
                if len(pending) >= window:
                    consume(pending.popleft().get())
            while pending:
                consume(pending.popleft().get())
        if n_docs == 0:
            raise DataError(
                f"--input: {path} is empty: it has no documents (the file is empty or has only "
                f"blank lines); no dataset was written"
            )
        for key, count in zip(keys, n_tokens_key):
            if count == 0:
                what = f"every '{key}' text" if fmt == "jsonl" else "every document"
                raise DataError(
                    f"--input: {path} gives an empty dataset: {what} is empty (0 tokens in "
                    f"{n_docs} documents); no dataset was written"
                )
        for pre, builder in zip(prefixes, builders):
            with _writing(pre + ".idx"):
                builder.finalize(pre + ".idx.tmp")
        for pre in prefixes:
            with _writing(pre + ".bin"):
                os.replace(pre + ".bin.tmp", pre + ".bin")
                os.replace(pre + ".idx.tmp", pre + ".idx")
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
            if builders:
                for b in builders:
                    try:
                        b.data_file.close()
                    except Exception:
                        pass
            for p in tmp_paths:
                if os.path.exists(p):
                    os.remove(p)

    seconds = time.perf_counter() - t_start
    stats = {
        "input": path,
        "input_format": fmt,
        "input_bytes": size,
        "documents": n_docs,
        "tokens": n_tokens,
        "tokens_per_key": dict(zip(keys, n_tokens_key)),
        "seconds": seconds,
        "tokens_per_sec": n_tokens / max(seconds, 1e-9),
        "docs_per_sec": n_docs / max(seconds, 1e-9),
        "mb_per_sec": size / 1e6 / max(seconds, 1e-9),
        "workers": workers,
        "tokenizer": tokenizer.describe(),
        "append_eod": bool(args.append_eod),
        "outputs": [p + ext for p in prefixes for ext in (".bin", ".idx")],
    }
    return stats


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    rc, stats = run_entry_point(PROG, run, args)
    if rc:
        return rc
    outs = ", ".join(stats["outputs"])
    print(
        f"{PROG}: {stats['documents']} docs, {stats['tokens']} tokens in "
        f"{stats['seconds']:.2f} s ({_fmt_rate(stats['tokens_per_sec'])} tokens/s, "
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

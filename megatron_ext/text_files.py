"""Input text files of the tools and scoring: plain text (one document per line) or JSONL (one object per line),
optionally compressed (``.gz`` through the standard library's gzip, ``.zst`` through the ``zstandard`` package).

Top level (not in megatron_ext.data) so the preprocessing workers do not import megatron-core to read a file."""
from __future__ import annotations

import io
import json
import os
from typing import BinaryIO, Optional

from megatron_ext.errors import DataError

# file-name endings of compressed inputs -> compression
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
# file-name endings of text inputs (before any compression ending); the formats they imply
TEXT_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".txt": None, ".text": None}


def compression_of(path: str) -> Optional[str]:
    """``"gzip"``, ``"zstd"`` or None, from the file name."""
    low = path.lower()
    for ext, kind in COMPRESSIONS.items():
        if low.endswith(ext):
            return kind
    return None


def strip_compression(name: str) -> str:
    """``name`` without its ``.gz``/``.zst`` ending."""
    low = name.lower()
    for ext in COMPRESSIONS:
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


def decompress_errors() -> tuple:
    """The exception types that a corrupt or truncated compressed input raises while it is read."""
    import gzip
    import zlib

    kinds = [EOFError, gzip.BadGzipFile, zlib.error]
    try:
        import zstandard

        kinds.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(kinds)


def _zstandard(path: str):
    try:
        import zstandard
    except ImportError:
        raise DataError(
            f"{path}: reading .zst files needs the Python package 'zstandard', which is not installed "
            f"(pip install zstandard; it is in megatron_ext's dependencies)"
        ) from None
    return zstandard


def open_binary(path: str, raw: Optional[BinaryIO] = None) -> BinaryIO:
    """``path`` opened for reading bytes, decompressed when its name ends in ``.gz``/``.zst``. ``raw``: the already
    open file to decompress (its ``tell()`` then gives the compressed bytes read so far)."""
    kind = compression_of(path)
    if kind is None:
        return raw if raw is not None else open(path, "rb")
    if kind == "zstd":
        zstandard = _zstandard(path)
    raw = raw if raw is not None else open(path, "rb")
    if kind == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=raw, mode="rb")
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
    return io.BufferedReader(reader, buffer_size=1 << 20)


def detect_format(path: str, requested: str = "auto") -> str:
    """``"text"`` or ``"jsonl"``: ``requested`` unless it is ``"auto"``; else by the name (``.json``/``.jsonl``,
    before any ``.gz``/``.zst``), else by the first non-empty line (a JSON object -> jsonl)."""
    if requested in ("text", "jsonl"):
        return requested
    if strip_compression(path).lower().endswith((".json", ".jsonl")):
        return "jsonl"
    try:
        with open_binary(path) as f:
            for raw in f:
                line = raw.decode("utf-8", errors="replace").lstrip("\ufeff").strip()
                if not line:
                    continue
                if line.startswith("{"):
                    try:
                        if isinstance(json.loads(line), dict):
                            return "jsonl"
                    except ValueError:
                        pass
                return "text"
    except decompress_errors() as exc:
        raise DataError(f"{path}: cannot decompress it ({type(exc).__name__}: {exc}); the file is corrupt or "
                        f"truncated") from None
    return "text"


def shard_name(path: str) -> str:
    """The name of an input shard: its file name without the compression and text endings
    (``part-00.jsonl.gz`` -> ``part-00``)."""
    name = strip_compression(os.path.basename(path))
    low = name.lower()
    for ext in TEXT_SUFFIXES:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


__all__ = ["COMPRESSIONS", "TEXT_SUFFIXES", "compression_of", "decompress_errors", "detect_format", "open_binary",
           "shard_name", "strip_compression"]

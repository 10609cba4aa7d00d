"""Input text files of the tools and scoring: plain text (one document per line) or JSONL (one object per line).

Top level (not in megatron_ext.data) so the preprocessing workers do not import megatron-core to read a file."""
from __future__ import annotations

import json


def detect_format(path: str, requested: str = "auto") -> str:
    """``"text"`` or ``"jsonl"``: ``requested`` unless it is ``"auto"``; else by the name (``.json``/``.jsonl``),
    else by the first non-empty line (a JSON object -> jsonl)."""
    if requested in ("text", "jsonl"):
        return requested
    if path.lower().endswith((".json", ".jsonl")):
        return "jsonl"
    with open(path, "rb") as f:
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
    return "text"


__all__ = ["detect_format"]

"""``model.data`` parsing shared by the GPT and the BART datasets: ``data_prefix`` (``.bin``/``.idx`` prefixes, or
text/JSONL files, optionally weighted as ``[w1, p1, w2, p2, ...]``) and ``splits_string``.

Every parser returns plain Python values and raises one ConfigError naming ``model.data.data_prefix`` (with the list
index of the bad entry) or ``model.data.splits_string`` and the expected form; nothing here touches the files.
"""
from __future__ import annotations

import math
import os
from typing import Any, List, Optional, Tuple

from omegaconf import ListConfig, OmegaConf

from megatron_ext.errors import ConfigError

PREFIX_KEY = "model.data.data_prefix"
SPLITS_KEY = "model.data.splits_string"


def as_list(value: Any) -> Any:
    """An OmegaConf ``ListConfig`` as a plain list (interpolations resolved); any other value as it is."""
    if isinstance(value, ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def parse_weight(value: Any, index: int) -> float:
    """The blend weight at ``data_prefix[index]``: a positive finite number (or its string), else a ConfigError."""
    bad = ConfigError(
        f"{PREFIX_KEY}[{index}]={value!r}: expected a positive number (the weight of the prefix that "
        f"follows), as in [w1, prefix1, w2, prefix2, ...]"
    )
    if isinstance(value, bool):
        raise bad
    if isinstance(value, (int, float)):
        weight = float(value)
    elif isinstance(value, str):
        try:
            weight = float(value.strip())
        except ValueError:
            raise bad from None
    else:
        raise bad
    if not math.isfinite(weight) or weight <= 0:
        raise bad
    return weight


def _normalize_prefix(value: Any, index: Optional[int]) -> str:
    where = PREFIX_KEY if index is None else f"{PREFIX_KEY}[{index}]"
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"{where}={value!r}: expected a dataset prefix (a path string, without .bin/.idx)"
        )
    prefix = value.strip()
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    return os.path.abspath(os.path.expanduser(prefix))


def parse_data_prefix(data_prefix: Any) -> Tuple[List[str], Optional[List[float]]]:
    """``model.data.data_prefix`` -> ``(prefixes, weights or None)``. ``([], None)`` = default corpus.

    Raises ConfigError naming ``model.data.data_prefix`` for any other shape.
    """
    data_prefix = as_list(data_prefix)
    if data_prefix is None:
        return [], None
    if isinstance(data_prefix, str):
        return [_normalize_prefix(data_prefix, None)], None
    if not isinstance(data_prefix, (list, tuple)):
        raise ConfigError(
            f"{PREFIX_KEY}={data_prefix!r}: expected a list: [] (built-in corpus), [prefix], or "
            f"[w1, prefix1, w2, prefix2, ...]"
        )
    items = list(data_prefix)
    if not items:
        return [], None
    if len(items) == 1:
        return [_normalize_prefix(items[0], 0)], None
    if len(items) % 2 != 0:
        raise ConfigError(
            f"{PREFIX_KEY} has {len(items)} entries: {items!r}; expected one prefix, or weight/prefix "
            f"pairs [w1, prefix1, w2, prefix2, ...] (an even number of entries)"
        )
    weights = [parse_weight(items[i], i) for i in range(0, len(items), 2)]
    prefixes = [_normalize_prefix(items[i], i) for i in range(1, len(items), 2)]
    if len(prefixes) == 1:
        return prefixes, None  # [w, prefix]: a blend of one is just that dataset
    return prefixes, weights


def parse_text_paths(data_prefix: Any, what: str = "text file (one document per line)"
                     ) -> Tuple[List[str], Optional[List[float]]]:
    """``model.data.data_prefix`` of text/JSONL files -> ``(absolute paths, weights or None)``: ``[file]``,
    ``"file"``, or ``[w1, file1, w2, file2, ...]`` (a blend of one file has no weights); ``([], None)`` when empty.
    ``what`` names the kind of file in the errors."""
    value = as_list(data_prefix)
    if value is None:
        return [], None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{PREFIX_KEY}={value!r}: expected a list of files: [file] or [w1, file1, w2, file2, ...]")
    items = list(items)
    if not items:
        return [], None

    def path(v, i):
        where = PREFIX_KEY if i is None else f"{PREFIX_KEY}[{i}]"
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{where}={v!r}: expected the path of a {what}")
        return os.path.abspath(os.path.expanduser(v.strip()))

    if len(items) == 1:
        return [path(items[0], None if isinstance(value, str) else 0)], None
    if len(items) % 2:
        raise ConfigError(
            f"{PREFIX_KEY} has {len(items)} entries: {items!r}; expected one file, or weight/file pairs "
            f"[w1, file1, w2, file2, ...] (an even number of entries)"
        )
    weights = [parse_weight(items[i], i) for i in range(0, len(items), 2)]
    paths = [path(items[i], i) for i in range(1, len(items), 2)]
    return paths, (weights if len(paths) > 1 else None)


def parse_splits_string(splits: Any) -> str:
    """Validate ``model.data.splits_string`` ("949,50,1"); return it normalised ("949,50,1")."""
    text = str(splits).strip().strip("'\"").strip()
    parts = [p.strip() for p in text.replace("/", ",").split(",")]
    bad = ConfigError(
        f"{SPLITS_KEY}={splits!r}: expected 1 to 3 non-negative numbers separated by commas "
        f"(train,valid,test weights), e.g. \"949,50,1\", with a positive sum"
    )
    if not 1 <= len(parts) <= 3:
        raise bad
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise bad from None
    if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise bad
    values += [0.0] * (3 - len(values))
    return ",".join(f"{v:g}" for v in values)


__all__ = ["PREFIX_KEY", "SPLITS_KEY", "as_list", "parse_weight", "parse_data_prefix", "parse_text_paths",
           "parse_splits_string"]

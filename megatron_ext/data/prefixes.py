"""``model.data`` parsing shared by the GPT and the BART datasets: ``data_prefix`` (``.bin``/``.idx`` prefixes, or
text/JSONL files, optionally weighted as ``[w1, p1, w2, p2, ...]``) and ``splits_string``.

Every parser returns plain Python values and raises one ConfigError naming ``model.data.data_prefix`` (with the list
index of the bad entry) or ``model.data.splits_string`` and the expected form; nothing here touches the files.
"""
from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from megatron_ext.errors import ConfigError

PREFIX_KEY = "model.data.data_prefix"
SPLITS_KEY = "model.data.splits_string"


def as_list(value: Any) -> Any:
    """An OmegaConf ``ListConfig`` as a plain list (interpolations resolved); any other value as it is."""
    if isinstance(value, ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def as_plain(value: Any) -> Any:
    """An OmegaConf container (list or dict) as plain Python values; any other value as it is."""
    if isinstance(value, (ListConfig, DictConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def parse_weight(value: Any, index: int, key: str = PREFIX_KEY) -> float:
    """The blend weight at ``<key>[index]``: a positive finite number (or its string), else a ConfigError."""
    bad = ConfigError(
        f"{key}[{index}]={value!r}: expected a positive number (the weight of the prefix that "
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


def _normalize_prefix(value: Any, index: Optional[int], key: str = PREFIX_KEY) -> str:
    where = key if index is None else f"{key}[{index}]"
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"{where}={value!r}: expected a dataset prefix (a path string, without .bin/.idx)"
        )
    prefix = value.strip()
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    return os.path.abspath(os.path.expanduser(prefix))


def parse_data_prefix(data_prefix: Any, key: str = PREFIX_KEY) -> Tuple[List[str], Optional[List[float]]]:
    """``model.data.data_prefix`` (the list form) -> ``(prefixes, weights or None)``. ``([], None)`` = default corpus.

    Raises ConfigError naming ``key`` (``model.data.data_prefix``) for any other shape.
    """
    data_prefix = as_list(data_prefix)
    if data_prefix is None:
        return [], None
    if isinstance(data_prefix, str):
        return [_normalize_prefix(data_prefix, None, key)], None
    if isinstance(data_prefix, (dict, DictConfig)):
        raise ConfigError(
            f"{key}={as_plain(data_prefix)!r}: a dict is only accepted as model.data.data_prefix itself "
            f"({{train: [...], validation: [...], test: [...]}}); expected a list here"
        )
    if not isinstance(data_prefix, (list, tuple)):
        raise ConfigError(
            f"{key}={data_prefix!r}: expected a list: [] (built-in corpus), [prefix], or "
            f"[w1, prefix1, w2, prefix2, ...]"
        )
    items = list(data_prefix)
    if not items:
        return [], None
    if len(items) == 1:
        return [_normalize_prefix(items[0], 0, key)], None
    if len(items) % 2 != 0:
        raise ConfigError(
            f"{key} has {len(items)} entries: {items!r}; expected one prefix, or weight/prefix "
            f"pairs [w1, prefix1, w2, prefix2, ...] (an even number of entries)"
        )
    weights = [parse_weight(items[i], i, key) for i in range(0, len(items), 2)]
    prefixes = [_normalize_prefix(items[i], i, key) for i in range(1, len(items), 2)]
    if len(prefixes) == 1:
        return prefixes, None  # [w, prefix]: a blend of one is just that dataset
    return prefixes, weights


def parse_text_paths(data_prefix: Any, what: str = "text file (one document per line)", key: str = PREFIX_KEY
                     ) -> Tuple[List[str], Optional[List[float]]]:
    """``model.data.data_prefix`` of text/JSONL files -> ``(absolute paths, weights or None)``: ``[file]``,
    ``"file"``, or ``[w1, file1, w2, file2, ...]`` (a blend of one file has no weights); ``([], None)`` when empty.
    ``what`` names the kind of file in the errors."""
    value = as_list(data_prefix)
    if value is None:
        return [], None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{key}={as_plain(value)!r}: expected a list of files: [file] or [w1, file1, w2, file2, ...]")
    items = list(items)
    if not items:
        return [], None

    def path(v, i):
        where = key if i is None else f"{key}[{i}]"
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{where}={v!r}: expected the path of a {what}")
        return os.path.abspath(os.path.expanduser(v.strip()))

    if len(items) == 1:
        return [path(items[0], None if isinstance(value, str) else 0)], None
    if len(items) % 2:
        raise ConfigError(
            f"{key} has {len(items)} entries: {items!r}; expected one file, or weight/file pairs "
            f"[w1, file1, w2, file2, ...] (an even number of entries)"
        )
    weights = [parse_weight(items[i], i, key) for i in range(0, len(items), 2)]
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


# ---------------------------------------------------------------------------------------------- the dict form
SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_SPLITS = "949,50,1"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_ALIASES = {"valid": "validation", "val": "validation", "validation_ds": "validation", "train_ds": "train",
            "test_ds": "test"}


@dataclass(frozen=True)
class Blend:
    """One dataset of a split: one path (``weights`` None) or a weighted blend of paths. ``keys`` names the config
    key of each path (for errors)."""

    paths: Tuple[str, ...]
    weights: Optional[Tuple[float, ...]]
    keys: Tuple[str, ...]


@dataclass(frozen=True)
class SplitPrefixes:
    """The dict form ``{train: ..., validation: ..., test: ...}``: the train blend (None: absent) and, per evaluated
    split, its datasets in order, by name (empty: absent). Several named datasets of a split are evaluated
    separately (``val/loss/<name>``)."""

    train: Optional[Blend]
    validation: "OrderedDict[str, Blend]"
    test: "OrderedDict[str, Blend]"

    def sets(self, split: str) -> "OrderedDict[str, Blend]":
        if split == "train":
            return OrderedDict() if self.train is None else OrderedDict(train=self.train)
        return getattr(self, split)


def is_split_dict(data_prefix: Any) -> bool:
    """Whether ``model.data.data_prefix`` is the dict form (``{train: [...], validation: [...], test: [...]}``)."""
    return isinstance(data_prefix, (dict, DictConfig))


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, str):
        try:
            float(value.strip())
            return True
        except ValueError:
            return False
    return False


def _stem(path: str, kind: str) -> str:
    base = os.path.basename(path)
    return base if kind == "prefix" else (os.path.splitext(base)[0] or base)


def _blend(value: Any, key: str, kind: str) -> Blend:
    """A list-form value (one path, or ``[w1, p1, w2, p2, ...]``) of ``key`` as a Blend."""
    if kind == "prefix":
        paths, weights = parse_data_prefix(value, key)
    else:
        paths, weights = parse_text_paths(value, "text or JSONL file", key)
    if not paths:
        raise ConfigError(f"{key} is empty: expected a path, [path] or [w1, path1, w2, path2, ...]")
    items = as_plain(value)
    if isinstance(items, str):
        keys: Tuple[str, ...] = (key,)
    elif len(items) == 1:
        keys = (f"{key}[0]",)
    else:
        keys = tuple(f"{key}[{2 * i + 1}]" for i in range(len(paths)))
    return Blend(tuple(paths), None if weights is None else tuple(weights), keys)


def _check_name(name: Any, key: str, why: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"{key}: the dataset name {name!r} ({why}) is not usable in a metric name (val/loss/<name>); expected "
            f"letters, digits, '_', '-' or '.'; name the datasets with a dict {{name: path}}"
        )
    return name


def _eval_sets(value: Any, key: str, kind: str) -> "OrderedDict[str, Blend]":
    """A validation/test entry: ``path``, ``[path]``, ``[w1, p1, w2, p2, ...]`` (one blended set), ``[p1, p2, ...]``
    (separate sets named by file stem), or ``{name: path or blend}`` (separate named sets)."""
    value = as_plain(value)
    out: "OrderedDict[str, Blend]" = OrderedDict()
    if value is None or value == [] or value == {}:
        return out
    if isinstance(value, dict):
        for name, v in value.items():
            out[_check_name(name, f"{key}.{name}", "a key of the dict")] = _blend(v, f"{key}.{name}", kind)
        return out
    if isinstance(value, (list, tuple)) and len(value) > 1 and not any(_is_number(v) for v in value):
        where: Dict[str, str] = {}
        for i, v in enumerate(value):
            b = _blend(v, f"{key}[{i}]", kind)
            name = _check_name(_stem(b.paths[0], kind), f"{key}[{i}]", "the file stem of " + repr(b.paths[0]))
            if name in out:
                raise ConfigError(
                    f"{key}: {where[name]!r} and {b.paths[0]!r} have the same name {name!r} (the file stem); name "
                    f"them with a dict instead, e.g. {{{name}_a: {where[name]}, {name}_b: {b.paths[0]}}}"
                )
            where[name] = b.paths[0]
            out[name] = b
        return out
    b = _blend(value, key, kind)
    out[_stem(b.paths[0], kind)] = b
    return out


def parse_split_prefixes(data_prefix: Any, kind: str = "prefix", splits_string: Any = None) -> SplitPrefixes:
    """The dict form of ``model.data.data_prefix`` (``{train: [...], validation: [...], test: [...]}``, NeMo's
    keys) -> :class:`SplitPrefixes`. ``kind``: ``prefix`` (``.bin``/``.idx`` prefixes) or ``file`` (text/JSONL
    files). Each split's files are used whole, so ``splits_string`` has nothing to split: a value other than its
    default is refused (it would silently do nothing). Touches no files."""
    value = as_plain(data_prefix)
    if not isinstance(value, dict):
        raise ConfigError(f"{PREFIX_KEY}={value!r}: expected a dict {{train: [...], validation: [...], test: [...]}}")
    for k in value:
        if k not in SPLIT_NAMES:
            hint = f" (did you mean {_ALIASES[k]!r}?)" if k in _ALIASES else ""
            raise ConfigError(
                f"{PREFIX_KEY}.{k}: unknown split {k!r}{hint}; the dict form takes the keys train, validation, test "
                f"(NeMo's names)"
            )
    if splits_string is not None and parse_splits_string(splits_string) != parse_splits_string(DEFAULT_SPLITS):
        raise ConfigError(
            f"{SPLITS_KEY}={splits_string!r} is not used with the dict form of {PREFIX_KEY} (each split names its own "
            f"files, used whole); remove it or leave it at its default {DEFAULT_SPLITS!r}"
        )
    train = value.get("train")
    train_blend = None
    if train is not None and train != []:
        if isinstance(train, dict):
            raise ConfigError(
                f"{PREFIX_KEY}.train={train!r}: expected a path, [path] or a weighted blend [w1, path1, w2, path2, "
                f"...]; named datasets ({{name: path}}) are for validation and test"
            )
        train_blend = _blend(train, f"{PREFIX_KEY}.train", kind)
    validation = _eval_sets(value.get("validation"), f"{PREFIX_KEY}.validation", kind)
    test = _eval_sets(value.get("test"), f"{PREFIX_KEY}.test", kind)
    if train_blend is None and not validation and not test:
        raise ConfigError(f"{PREFIX_KEY}={value!r}: the dict form names no files; give at least one of train, "
                          f"validation, test (or use [] for the built-in corpus)")
    return SplitPrefixes(train_blend, validation, test)


__all__ = ["PREFIX_KEY", "SPLITS_KEY", "SPLIT_NAMES", "Blend", "SplitPrefixes", "as_list", "as_plain",
           "is_split_dict", "parse_weight", "parse_data_prefix", "parse_text_paths", "parse_split_prefixes",
           "parse_splits_string"]

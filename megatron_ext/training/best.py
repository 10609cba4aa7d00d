"""Best checkpoints and early stopping by a monitored validation metric (NeMo's ``ModelCheckpoint(monitor=...)`` and
``EarlyStopping`` keys under ``exp_manager``).

Checkpoints stay ``checkpoints/step_N`` directories (``find_latest``, resume, archives and the reshard tools read
nothing else). A checkpoint written at a step that validated records that validation's metrics in its
``meta.json`` (``val_metrics``, written before the manifest, so they are part of the committed checkpoint and
survive a resume); ``save_top_k`` with ``monitor`` ranks the complete checkpoints by them (:func:`select_keep`):
the ``k`` best are kept, plus the newest one (the one a resume needs), whatever its score. ``filename`` names each
kept best checkpoint by a symlink ``checkpoints/<rendered name> -> step_N`` (:class:`FilenameTemplate`), and
``checkpoints/best.json`` lists them (monitor, mode, each kept best's tag, score and alias), replaced atomically.

Early stopping (:class:`EarlyStopping`) counts validations without an improvement by more than ``min_delta``; its
state (best value, its step, the count) travels in every checkpoint's ``meta.json`` (``early_stopping``), so a
resumed run goes on counting where the checkpoint left it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import string
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from megatron_ext.checkpoint.manifest import atomic_write_text
from megatron_ext.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("min", "max")
BEST_INDEX = "best.json"
# the fields a filename template may use besides validation metrics (val_<name>)
FIELDS = ("step", "epoch", "consumed_samples")
_STEP_DIR = re.compile(r"^(\.tmp-|\.del-)?step_\d+$")
KNOWN_METRICS = ("val/loss", "val/ppl", "val/loss/<validation set name>",
                 "a task's val/<extra> (val/exact_match, val/token_accuracy for synthetic tasks; val/accuracy, "
                 "val/masked_accuracy for BART)")


def metric_name(name: Any, key: str) -> str:
    """The logged name of a monitored metric: ``val/loss`` as given, or NeMo's spelling ``val_loss`` (the first
    ``_`` after ``val`` becomes ``/``: ``val_exact_match`` -> ``val/exact_match``). Only validation metrics can be
    monitored (they are what a checkpoint step and early stopping see); anything else is refused naming ``key``."""
    text = str(name).strip() if name is not None else ""
    if text.startswith("val_"):
        text = "val/" + text[4:]
    if not text.startswith("val/") or len(text) <= 4 or text.endswith("/") or "//" in text:
        raise ConfigError(f"{key}={name!r}: expected a validation metric: " + ", ".join(KNOWN_METRICS)
                          + " (NeMo's spelling val_loss is accepted for val/loss)")
    return text


def field_name(metric: str) -> str:
    """A metric's name as a filename-template field: ``val/loss`` -> ``val_loss``."""
    return metric.replace("/", "_")


def check_mode(mode: Any, key: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"{key}={mode!r}: expected one of {', '.join(MODES)} (which way the metric improves)")
    return str(mode)


def improves(value: float, best: Optional[float], mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` in ``mode`` (a non-finite value never does)."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class FilenameTemplate:
    """``exp_manager.checkpoint_callback_params.filename``, Lightning style: ``"{val_loss:.2f}-{step}"`` renders as
    ``val_loss=2.31-step=40`` (each field's name is inserted before its value, as Lightning's default
    ``auto_insert_metric_name``). Fields: ``step``, ``epoch``, ``consumed_samples`` and validation metrics as
    ``val_<name>`` (``val_loss``, ``val_ppl``, ``val_loss_<set>``...). An unknown field, an attribute or index
    access, or a format spec that does not format a number is refused at start-up naming the key."""

    KEY = "exp_manager.checkpoint_callback_params.filename"

    def __init__(self, template: str):
        self.template = str(template)
        self.parts: List[Tuple[str, Optional[str], str]] = []  # (literal, field, format spec)
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as e:
            raise ConfigError(f"{self.KEY}={template!r}: not a format template ({e}); expected e.g. "
                              f"'{{val_loss:.2f}}-{{step}}'") from None
        for literal, fld, spec, conv in parsed:
            if fld is not None:
                if not (fld in FIELDS or (fld.startswith("val_") and re.fullmatch(r"val_\w+", fld))) or conv:
                    raise ConfigError(
                        f"{self.KEY}={template!r}: unknown field {{{fld}{'!' + conv if conv else ''}}}; expected "
                        f"{', '.join('{' + f + '}' for f in FIELDS)} or a validation metric as {{val_<name>}} "
                        f"({{val_loss}}, {{val_ppl}}, ...), each with an optional format spec ({{val_loss:.2f}})")
                try:
                    format(1.5 if fld.startswith("val_") else 7, spec or "")
                except (ValueError, TypeError) as e:
                    raise ConfigError(f"{self.KEY}={template!r}: bad format spec {spec!r} for {{{fld}}} ({e})") \
                        from None
            self.parts.append((literal, fld, spec or ""))
        if not self.fields:
            raise ConfigError(f"{self.KEY}={template!r}: names no field, so every checkpoint would get the same name; "
                              f"expected e.g. '{{val_loss:.2f}}-{{step}}'")

    @property
    def fields(self) -> List[str]:
        return [f for _, f, _ in self.parts if f is not None]

    def metrics(self) -> List[str]:
        """The validation metrics the template names, as logged (``val_loss`` -> ``val/loss``): the first ``_``
        of the rest stays (``val_loss_a`` -> ``val/loss_a``, also matched against ``val/loss/a``)."""
        return [f for f in self.fields if f.startswith("val_")]

    def render(self, values: Dict[str, Any]) -> Optional[str]:
        """The name for a checkpoint with these field values (keys as template fields); None when one is missing.
        ``/`` becomes ``_``; a name that would look like a step directory, ``latest`` or ``best.json``, or start
        with ``.``, gets a ``ckpt-`` prefix."""
        out = []
        for literal, fld, spec in self.parts:
            out.append(literal)
            if fld is None:
                continue
            if values.get(fld) is None:
                return None
            out.append(f"{fld}={format(values[fld], spec)}")
        name = "".join(out).replace("/", "_").replace("\0", "").strip()
        if not name or name.startswith(".") or _STEP_DIR.match(name) or name in ("latest", BEST_INDEX):
            name = "ckpt-" + name
        return name


def template_values(meta: Dict[str, Any]) -> Dict[str, Any]:
    """The filename-template fields of a checkpoint, from its ``meta.json``."""
    vals: Dict[str, Any] = {"step": meta.get("step"), "consumed_samples": meta.get("consumed_samples"),
                            "epoch": meta.get("epoch")}
    for k, v in (meta.get("val_metrics") or {}).items():
        vals[field_name(k)] = v
    return vals


def select_keep(entries: Iterable[Tuple[int, str, Optional[float]]], k: int, mode: str) -> Tuple[Set[str], List[str]]:
    """Of the complete checkpoints ``(step, tag, score or None)``: the tags to keep -- the ``k`` best by score in
    ``mode`` (``k < 0``: all) and the newest -- and the best ones in rank order. A checkpoint without a (finite)
    score (written at a step that did not validate) is never among the best; ties go to the older checkpoint."""
    entries = sorted(entries)
    if not entries:
        return set(), []
    if k is None or k < 0:
        return {t for _, t, _ in entries}, [t for _, t, _ in _ranked(entries, mode)]
    ranked = [t for _, t, _ in _ranked(entries, mode)][:k]
    return set(ranked) | {entries[-1][1]}, ranked


def _ranked(entries, mode):
    scored = [e for e in entries if e[2] is not None and math.isfinite(e[2])]
    return sorted(scored, key=lambda e: ((e[2] if mode == "min" else -e[2]), e[0]))


class BestCheckpoints:
    """What the checkpointer needs to keep the best checkpoints: the monitored metric, mode, ``save_top_k``, the
    filename template (or None). :meth:`prune_plan` ranks a checkpoints directory; :meth:`publish` (rank 0, after a
    prune) points the aliases at the kept best checkpoints and rewrites ``best.json``."""

    def __init__(self, monitor: str, mode: str, save_top_k: int, filename: Optional[str] = None):
        self.monitor, self.mode, self.k = monitor, mode, save_top_k
        self.template = FilenameTemplate(filename) if filename else None

    @classmethod
    def from_params(cls, p) -> Optional["BestCheckpoints"]:
        """From ``exp_manager.checkpoint_callback_params`` (already checked by :func:`check_config`); None
        without ``monitor``."""
        if p.get("monitor") is None:
            return None
        key = "exp_manager.checkpoint_callback_params"
        return cls(metric_name(p.monitor, f"{key}.monitor"), check_mode(p.mode, f"{key}.mode"), p.save_top_k,
                   p.get("filename"))

    def score(self, meta: Dict[str, Any]) -> Optional[float]:
        v = (meta.get("val_metrics") or {}).get(self.monitor)
        try:
            return None if v is None else float(v)
        except (TypeError, ValueError):
            return None

    def prune_plan(self, ckpt_dir: str, complete: List[Tuple[int, str]]) -> Tuple[Set[str], List[str], Dict[str, Any]]:
        """(tags to keep, best tags in order, tag -> meta) for the complete checkpoints of ``ckpt_dir``."""
        metas = {t: _read_json(os.path.join(ckpt_dir, t, "meta.json")) for _, t in complete}
        keep, best = select_keep([(s, t, self.score(metas[t])) for s, t in complete], self.k, self.mode)
        return keep, best, metas

    def publish(self, ckpt_dir: str, best: List[str], metas: Dict[str, Dict[str, Any]]) -> None:
        """Rank 0, after pruning: ``<alias> -> step_N`` symlinks for the kept best checkpoints (``filename``), the
        aliases this run made earlier that no longer name a kept best one removed (only those: ``best.json`` lists
        them; no other file is touched), then ``best.json`` replaced atomically."""
        index_path = os.path.join(ckpt_dir, BEST_INDEX)
        old = _read_json(index_path)
        old_aliases = {e.get("alias") for e in old.get("best", []) if isinstance(e, dict) and e.get("alias")}
        rows, made = [], set()
        for tag in best:
            meta = metas.get(tag, {})
            alias = self.template.render(template_values(meta)) if self.template else None
            if alias is not None:
                base, n = alias, 1
                while alias in made:  # two checkpoints rendering to one name: -v1, -v2 (as Lightning)
                    alias, n = f"{base}-v{n}", n + 1
                alias = self._link(ckpt_dir, alias, tag, owned=alias in old_aliases)
                if alias:
                    made.add(alias)
            rows.append({"tag": tag, "step": meta.get("step"), "score": self.score(meta), "alias": alias})
        for name in sorted(a for a in old_aliases - made if isinstance(a, str) and "/" not in a):
            path = os.path.join(ckpt_dir, name)
            if os.path.islink(path):
                os.remove(path)
        atomic_write_text(index_path, json.dumps({"monitor": self.monitor, "mode": self.mode, "save_top_k": self.k,
                                                  "best": rows}, indent=2))

    @staticmethod
    def _link(ckpt_dir: str, alias: str, tag: str, owned: bool) -> Optional[str]:
        """``ckpt_dir/alias`` -> ``tag`` (relative), replaced atomically; a file or directory of that name that is
        not a symlink (the user's) is left alone and the alias skipped with a warning."""
        path = os.path.join(ckpt_dir, alias)
        if os.path.lexists(path) and not os.path.islink(path):
            log.warning("not naming checkpoint %s %s: %s exists and is not a symlink this run made", tag, alias, path)
            return None
        if os.path.islink(path) and os.readlink(path) == tag:
            return alias
        tmp = os.path.join(ckpt_dir, f".alias-{os.getpid()}")
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(tag, tmp)
        os.replace(tmp, path)
        return alias


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            out = json.load(f)
        return out if isinstance(out, dict) else {}
    except (OSError, ValueError):
        return {}


class EarlyStopping:
    """``exp_manager.early_stopping_callback_params``: after each validation, :meth:`update` counts it as an
    improvement (the monitored value beats the best so far by more than ``min_delta`` in ``mode``; the first
    validation always does) or not; ``patience`` validations in a row without one stop the run, as does a
    non-finite value. :meth:`state` / :meth:`load` carry the count through checkpoints."""

    KEY = "exp_manager.early_stopping_callback_params"

    def __init__(self, monitor: str, mode: str, patience: int, min_delta: float):
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, int(patience), float(min_delta)
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.wait = 0

    @classmethod
    def from_config(cls, em) -> Optional["EarlyStopping"]:
        if not em.get("create_early_stopping_callback"):
            return None
        p = em.early_stopping_callback_params
        return cls(metric_name(p.monitor, f"{cls.KEY}.monitor"), check_mode(p.mode, f"{cls.KEY}.mode"),
                   p.patience, p.min_delta)

    def state(self) -> Dict[str, Any]:
        return {"monitor": self.monitor, "mode": self.mode, "best": self.best, "best_step": self.best_step,
                "wait": self.wait}

    def load(self, state: Optional[Dict[str, Any]]) -> bool:
        """Take the counter from a checkpoint's ``meta.json`` (when it monitored the same metric the same way)."""
        if not isinstance(state, dict) or state.get("monitor") != self.monitor or state.get("mode") != self.mode:
            return False
        self.best = None if state.get("best") is None else float(state["best"])
        self.best_step = state.get("best_step")
        self.wait = int(state.get("wait") or 0)
        return True

    def update(self, step: int, value: float) -> Optional[str]:
        """Count this validation; the reason to stop now, or None."""
        if value is None or not math.isfinite(value):
            return f"{self.monitor} is {value} at step {step}"
        if improves(value, self.best, self.mode, self.min_delta):
            self.best, self.best_step, self.wait = float(value), int(step), 0
            return None
        self.wait += 1
        if self.wait >= self.patience:
            return (f"{self.monitor} did not improve by more than min_delta={self.min_delta:g} for {self.wait} "
                    f"validations (patience {self.patience}; best {self.best:.6g} at step {self.best_step})")
        return None


def check_config(cfg) -> None:
    """The checkpoint-monitoring and early-stopping keys of a run config (``config.loader.validate_config``)."""
    em, t = cfg.exp_manager, cfg.trainer
    p = em.checkpoint_callback_params
    key = "exp_manager.checkpoint_callback_params"
    validates = bool(t.val_check_interval) and t.limit_val_batches != 0
    if p.get("monitor") is not None:
        metric_name(p.monitor, f"{key}.monitor")
        check_mode(p.mode, f"{key}.mode")
        if not em.get("create_checkpoint_callback", True):
            raise ConfigError(f"{key}.monitor={p.monitor} chooses which checkpoints to keep, but "
                              f"exp_manager.create_checkpoint_callback=false writes none; set {key}.monitor=null or "
                              f"create_checkpoint_callback=true")
        if not validates and not t.get("fast_dev_run"):
            raise ConfigError(f"{key}.monitor={p.monitor}: the run never validates (trainer.val_check_interval="
                              f"{t.val_check_interval}, trainer.limit_val_batches={t.limit_val_batches}), so the "
                              f"metric is never logged; validate, or set {key}.monitor=null")
    if p.get("filename") is not None:
        FilenameTemplate(p.filename)
        if p.get("monitor") is None:
            raise ConfigError(f"{key}.filename={p.filename!r} names the best checkpoints, which needs {key}.monitor "
                              f"(e.g. val/loss)")
    if em.get("create_early_stopping_callback"):
        es = em.early_stopping_callback_params
        ekey = EarlyStopping.KEY
        metric_name(es.monitor, f"{ekey}.monitor")
        check_mode(es.mode, f"{ekey}.mode")
        if es.patience is None or int(es.patience) < 1:
            raise ConfigError(f"{ekey}.patience={es.patience}: expected an integer >= 1 (validations without "
                              f"improvement before stopping)")
        if es.min_delta is None or not float(es.min_delta) >= 0:
            raise ConfigError(f"{ekey}.min_delta={es.min_delta}: expected a number >= 0")
        if not validates:
            raise ConfigError(f"exp_manager.create_early_stopping_callback=true but the run never validates "
                              f"(trainer.val_check_interval={t.val_check_interval}, trainer.limit_val_batches="
                              f"{t.limit_val_batches}); validate, or set it to false")


def check_logged(metrics: Dict[str, Any], monitors: Iterable[Tuple[str, str]]) -> None:
    """After the first validation: each monitored metric ``(key, name)`` must be among the logged ``metrics``
    (``val/loss/a`` also answers NeMo's ``val_loss_a``); refused naming the key and the logged metrics."""
    for key, name in monitors:
        if resolve_logged(name, metrics) is None:
            raise ConfigError(f"{key}: {name} is not logged by this run; its validation logs "
                              f"{', '.join(sorted(metrics))}")


def resolve_logged(name: str, metrics: Dict[str, Any]) -> Optional[str]:
    """The logged metric ``name`` refers to (``val/loss_a`` from NeMo's ``val_loss_a`` may be ``val/loss/a``)."""
    if name in metrics:
        return name
    alt = [k for k in metrics if k.replace("/", "_") == name.replace("/", "_")]
    return alt[0] if len(alt) == 1 else None

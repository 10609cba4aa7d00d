"""Registry of hidden transformations and losses: ``cls_name`` (the config value) -> class.

A class is registered either as the class object or as a dotted import path
(``"my_pkg.my_module.MyLoss"``, imported lazily the first time a config uses it). Transforms and
losses have separate name spaces. Registering a name that is already taken by a *different*
class raises ``ValueError``; registering the same class again (same object, or same
``module.QualName`` as a class or a path) is accepted, so a module that registers at import time
can be imported twice.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Type, Union

from megatron_ext.errors import ConfigError
from megatron_ext.hiddens.base import MegatronBaseHiddenLoss, MegatronBaseHiddenTransform

ClassOrPath = Union[str, type]

_PKG = "megatron_ext.hiddens"

_TRANSFORMS: Dict[str, ClassOrPath] = {
    "cond_gaussian": f"{_PKG}.transforms.MegatronGaussianHiddenTransform",
    "guided_cls": f"{_PKG}.transforms.MegatronGuidedClsHiddenTransform",
}
_LOSSES: Dict[str, ClassOrPath] = {
    "a_mim": f"{_PKG}.losses.MegatronAMIMHiddenLoss",
    "vae": f"{_PKG}.losses.MegatronVAEHiddenLoss",
    "guided_cls_loss": f"{_PKG}.losses.MegatronGuidedClsHiddenLoss",
}

_KINDS = {"transform": _TRANSFORMS, "loss": _LOSSES}


def _base_class(kind: str) -> type:
    return MegatronBaseHiddenTransform if kind == "transform" else MegatronBaseHiddenLoss


def _target_str(target: ClassOrPath) -> str:
    if isinstance(target, type):
        return f"{target.__module__}.{target.__qualname__}"
    return str(target)


def _register(kind: str, cls_name: str, class_path: ClassOrPath) -> None:
    table = _KINDS[kind]
    if not isinstance(cls_name, str) or not cls_name:
        raise ValueError(f"register_hidden_{kind}: cls_name must be a non-empty string, got {cls_name!r}")
    if isinstance(class_path, type):
        base = _base_class(kind)
        if not issubclass(class_path, base):
            raise ValueError(f"register_hidden_{kind}({cls_name!r}): {_target_str(class_path)} is not a subclass of "
                             f"{base.__name__}")
    elif not isinstance(class_path, str) or "." not in class_path:
        raise ValueError(f"register_hidden_{kind}({cls_name!r}): class_path must be a class or a dotted import path "
                         f"'package.module.ClassName', got {class_path!r}")
    if cls_name in table:
        existing = table[cls_name]
        if existing is class_path or _target_str(existing) == _target_str(class_path):
            table[cls_name] = class_path  # the same class again (e.g. a module imported twice): keep the newest
            return
        raise ValueError(f"Cannot register duplicate hidden {kind} {cls_name!r}: already registered as "
                         f"{_target_str(existing)} (new: {_target_str(class_path)})")
    table[cls_name] = class_path


def register_hidden_transform(cls_name: str, class_path: ClassOrPath) -> None:
    """Make ``cls_name`` usable as a ``cls_name`` value under ``model.hiddens.transform``.
    ``class_path``: a ``MegatronBaseHiddenTransform`` subclass, or its dotted import path."""
    _register("transform", cls_name, class_path)


def register_hidden_loss(cls_name: str, class_path: ClassOrPath) -> None:
    """Make ``cls_name`` usable as a ``cls_name`` value under ``model.hiddens.loss``.
    ``class_path``: a ``MegatronBaseHiddenLoss`` subclass, or its dotted import path."""
    _register("loss", cls_name, class_path)


def unregister_hidden_transform(cls_name: str) -> None:
    """Remove a registered transform name (KeyError if unknown)."""
    del _TRANSFORMS[cls_name]


def unregister_hidden_loss(cls_name: str) -> None:
    """Remove a registered loss name (KeyError if unknown)."""
    del _LOSSES[cls_name]


def get_registered_hiddens() -> Dict[str, List[str]]:
    """``{"loss": [sorted loss names], "transform": [sorted transform names]}``."""
    return {"loss": sorted(_LOSSES), "transform": sorted(_TRANSFORMS)}


def import_class_by_path(path: str) -> type:
    """``"a.b.C"`` or ``"a.b.C.Inner"`` -> the class (imports the longest importable module prefix)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # only "this prefix does not exist" means: try a shorter prefix; a missing dependency inside an
            # existing module is a real error
            if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                continue
            raise
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise ImportError(f"{module_name!r} has no attribute path {'.'.join(parts[cut:])!r}") from None
        return obj
    raise ImportError(f"no importable module in {path!r}")


def resolve_hidden_class(kind: str, cls_name: str, where: str) -> Type:
    """The class registered as ``cls_name`` for ``kind`` ("transform" | "loss"); ConfigError naming
    ``where`` (the config entry) when unknown or not importable."""
    table = _KINDS[kind]
    if not isinstance(cls_name, str) or cls_name not in table:
        other = "loss" if kind == "transform" else "transform"
        hint = ""
        if isinstance(cls_name, str) and cls_name in _KINDS[other]:
            hint = f" ({cls_name!r} is a registered hidden {other}, not a {kind})"
        raise ConfigError(f"{where}.cls_name={cls_name!r}: unknown hidden {kind}{hint}; registered {kind}s: "
                          f"{', '.join(sorted(table))} (register your own with register_hidden_{kind})")
    target = table[cls_name]
    if isinstance(target, str):
        try:
            target = import_class_by_path(target)
        except ImportError as exc:
            raise ConfigError(f"{where}.cls_name={cls_name!r}: cannot import its class {table[cls_name]!r}: {exc}") from exc
    base = _base_class(kind)
    if not isinstance(target, type) or not issubclass(target, base):
        raise ConfigError(f"{where}.cls_name={cls_name!r}: {_target_str(table[cls_name])} is not a subclass of "
                          f"{base.__name__}")
    return target


__all__ = [
    "register_hidden_transform",
    "register_hidden_loss",
    "unregister_hidden_transform",
    "unregister_hidden_loss",
    "get_registered_hiddens",
    "import_class_by_path",
    "resolve_hidden_class",
]

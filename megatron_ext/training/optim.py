"""Optimizer registry, configured NeMo-style under ``model.optim``.

.. code-block:: yaml

    model:
      optim:
        name: adamw            # a key of AVAILABLE_OPTIMIZERS (case-insensitive)
        lr: 1e-3               # required for every optimizer
        weight_decay: 0.01
        betas: [0.9, 0.95]
        sched: {...}           # read by megatron_ext.training.lr_schedulers, ignored here

Every optimizer has a params dataclass (``AdamWParams`` ...) whose fields are the keys it
accepts; ``'???'`` (``omegaconf.MISSING``) marks a required key. ``build_optimizer`` checks
the config against it: an unknown key, a missing ``lr``, a value of the wrong type or an
unknown optimizer name is a :class:`~megatron_ext.errors.ConfigError` naming the dotted key.

Weight decay follows Megatron: biases and every 1-D parameter (LayerNorm/RMSNorm weights
and biases) get no weight decay; matrices, embeddings included, do. Shared (tied)
parameters appear once.

``fused_adam`` (DeepSpeed ``FusedAdam``) and ``cpu_adam`` (DeepSpeed ``DeepSpeedCPUAdam``,
the ZeRO-Offload optimizer) are registered when DeepSpeed is importable and its op builder
reports the op as compatible with the current accelerator; otherwise asking for one is a
ConfigError giving the reason (DeepSpeed's import error, or its op builder's own report), kept
in ``DEEPSPEED_UNAVAILABLE``. Their C++ ops are JIT-compiled on first use (cached in
``~/.cache/torch_extensions``); a failed build is reported as a ConfigError naming
``model.optim.name``. An optimizer constructor's ``ValueError``/``TypeError`` (a rejected value)
or ``RuntimeError`` (an option these parameters cannot have, e.g. ``fused``) becomes a
ConfigError chained to it; any other exception propagates unchanged. Arch-specific entries of ``TORCH_CUDA_ARCH_LIST``
(``9.0a``), which DeepSpeed's JIT builder cannot parse, are given to it as ``9.0`` while the
op builds. They need parameters on the matching device
(``cpu_adam``: CPU tensors; ``fused_adam``: the accelerator's tensors).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import io
import math
import os
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from omegaconf import MISSING

from megatron_ext.errors import ConfigError
from megatron_ext.kernels import torch_extension_lock

__all__ = [
    "AVAILABLE_OPTIMIZERS",
    "OPTIMIZER_PARAMS",
    "OptimizerParams",
    "SGDParams",
    "AdamParams",
    "AdamWParams",
    "AdadeltaParams",
    "AdamaxParams",
    "AdagradParams",
    "RMSpropParams",
    "RpropParams",
    "FusedAdamParams",
    "CPUAdamParams",
    "register_optimizer",
    "get_optimizer",
    "get_optimizer_params",
    "build_optimizer",
    "get_param_groups",
    "validate_params",
]


# ----------------------------------------------------------------------------------------
# Params dataclasses
# ----------------------------------------------------------------------------------------


@dataclass
class OptimizerParams:
    """Keys common to every optimizer: only ``lr``, which is required."""

    lr: float = MISSING


@dataclass
class SGDParams(OptimizerParams):
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    foreach: Optional[bool] = None
    fused: Optional[bool] = None


@dataclass
class AdamParams(OptimizerParams):
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    foreach: Optional[bool] = None
    fused: Optional[bool] = None


@dataclass
class AdamWParams(AdamParams):
    weight_decay: float = 0.01  # decoupled; otherwise the same parameters as Adam


@dataclass
class AdadeltaParams(OptimizerParams):
    rho: float = 0.9
    eps: float = 1e-6
    weight_decay: float = 0.0
    foreach: Optional[bool] = None


@dataclass
class AdamaxParams(OptimizerParams):
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    foreach: Optional[bool] = None


@dataclass
class AdagradParams(OptimizerParams):
    lr_decay: float = 0.0
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10
    foreach: Optional[bool] = None
    fused: Optional[bool] = None


@dataclass
class RMSpropParams(OptimizerParams):
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False
    foreach: Optional[bool] = None


@dataclass
class RpropParams(OptimizerParams):
    etas: Tuple[float, float] = (0.5, 1.2)
    step_sizes: Tuple[float, float] = (1e-6, 50.0)
    foreach: Optional[bool] = None


@dataclass
class FusedAdamParams(OptimizerParams):
    """DeepSpeed FusedAdam (``adam_w_mode=True``: decoupled weight decay, i.e. AdamW)."""

    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    adam_w_mode: bool = True
    bias_correction: bool = True
    set_grad_none: bool = True


@dataclass
class CPUAdamParams(OptimizerParams):
    """DeepSpeed DeepSpeedCPUAdam (``adamw_mode=True``: decoupled weight decay)."""

    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    adamw_mode: bool = True
    bias_correction: bool = True
    fp32_optimizer_states: bool = True


# ----------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------

AVAILABLE_OPTIMIZERS: Dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adadelta": torch.optim.Adadelta,
    "adamax": torch.optim.Adamax,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
    "rprop": torch.optim.Rprop,
}

OPTIMIZER_PARAMS: Dict[str, type] = {
    "sgd": SGDParams,
    "adam": AdamParams,
    "adamw": AdamWParams,
    "adadelta": AdadeltaParams,
    "adamax": AdamaxParams,
    "adagrad": AdagradParams,
    "rmsprop": RMSpropParams,
    "rprop": RpropParams,
}


_DEEPSPEED_OP_BUILDERS = {"fused_adam": "FusedAdamBuilder", "cpu_adam": "CPUAdamBuilder"}


def _deepspeed_arch_list(value: str) -> str:
    """``TORCH_CUDA_ARCH_LIST`` in the form DeepSpeed's JIT builder parses.

    PyTorch accepts arch-specific entries such as ``9.0a`` (set on Hopper images);
    DeepSpeed 0.19 fails on them (``int('0a')``). The Adam kernels use no arch-specific
    instructions, so ``9.0a`` -> ``9.0`` (``+PTX`` kept).
    """
    out: List[str] = []
    for token in value.replace(" ", ";").split(";"):
        token = token.strip()
        if not token:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)[a-zA-Z]?(\+PTX)?", token)
        if m:
            token = f"{m.group(1)}.{m.group(2)}{m.group(3) or ''}"
        if token not in out:
            out.append(token)
    return ";".join(out)


@contextlib.contextmanager
def _deepspeed_build_env():
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    fixed = _deepspeed_arch_list(saved) if saved else saved
    if fixed == saved:
        yield
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = fixed
    try:
        yield
    finally:
        os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def _load_deepspeed_op(name: str) -> Optional[str]:
    """Build/load the C++/CUDA op behind a DeepSpeed optimizer; the error text, or None."""
    try:
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder(_DEEPSPEED_OP_BUILDERS[name])
        if builder is None:
            return "DeepSpeed has no such op for this accelerator"
        with torch_extension_lock(builder.name):  # never a silent wait on a killed build's lock
            builder.load(verbose=False)
    except Exception as e:  # compiler missing, CUDA mismatch, build error, a live builder's lock timed out ...
        return f"{type(e).__name__}: {e}"
    return None


def _register_deepspeed_optimizers() -> None:
    """Add ``fused_adam`` / ``cpu_adam`` when DeepSpeed can build them here (no build now). When one cannot be
    registered, why (DeepSpeed missing or broken, no such op for this accelerator, the op builder's own
    incompatibility report) is kept in ``DEEPSPEED_UNAVAILABLE`` and given when a config asks for it."""
    try:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    except Exception as e:  # deepspeed missing or broken (any error of its import): the torch optimizers remain
        for name in _DEEPSPEED_OP_BUILDERS:
            DEEPSPEED_UNAVAILABLE[name] = f"DeepSpeed cannot be imported ({type(e).__name__}: {e})"
        return
    try:
        accelerator = get_accelerator()
    except Exception as e:  # DS_ACCELERATOR names an accelerator this machine lacks, ...
        for name in _DEEPSPEED_OP_BUILDERS:
            DEEPSPEED_UNAVAILABLE[name] = f"DeepSpeed has no accelerator here ({type(e).__name__}: {e})"
        return
    for name, cls, params in (
        ("fused_adam", FusedAdam, FusedAdamParams),
        ("cpu_adam", DeepSpeedCPUAdam, CPUAdamParams),
    ):
        reason = _deepspeed_op_incompatibility(accelerator, _DEEPSPEED_OP_BUILDERS[name])
        if reason is not None:
            DEEPSPEED_UNAVAILABLE[name] = reason
            continue
        AVAILABLE_OPTIMIZERS[name] = cls
        OPTIMIZER_PARAMS[name] = params
        _DEEPSPEED_CLASSES[name] = cls


def _deepspeed_op_incompatibility(accelerator: Any, builder_name: str) -> Optional[str]:
    """Why DeepSpeed's ``builder_name`` op cannot be built for ``accelerator``, or None when it can. The builder's
    own reason (``is_compatible(verbose=True)`` prints it and keeps the last one in ``error_log``) is captured into
    the text instead of reaching the console."""
    accel = type(accelerator).__name__
    try:
        builder = accelerator.create_op_builder(builder_name)
        if builder is None:
            return f"DeepSpeed's {accel} has no {builder_name}"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            ok = bool(builder.is_compatible(verbose=True))
    except Exception as e:  # a builder that fails while probing the system (compiler, CUDA lookup ...)
        return f"DeepSpeed's {builder_name} failed its compatibility check ({type(e).__name__}: {e})"
    if ok:
        return None
    said = " ".join(line.strip() for line in printed.getvalue().splitlines() if line.strip())
    said = said or str(getattr(builder, "error_log", None) or "")
    return f"DeepSpeed's {builder_name} reports it incompatible with {accel}" + (f": {said}" if said else "")


DEEPSPEED_UNAVAILABLE: Dict[str, str] = {}
_DEEPSPEED_CLASSES: Dict[str, type] = {}
_register_deepspeed_optimizers()


def register_optimizer(name: str, optimizer: Callable[..., torch.optim.Optimizer], optimizer_params: type) -> None:
    """Make ``optimizer`` available as ``model.optim.name: <name>``.

    Args:
        name: registry key (stored lower-case; lookups are case-insensitive).
        optimizer: a ``torch.optim.Optimizer`` subclass (or any callable
            ``optimizer(params, **kwargs) -> Optimizer``).
        optimizer_params: a dataclass type whose fields are the accepted config keys; it
            must have an ``lr`` field (use ``OptimizerParams`` as base class).

    Raises:
        ValueError: ``name`` is already registered, or ``optimizer_params`` is not a
            dataclass with an ``lr`` field.
    """
    key = name.lower()
    if key in AVAILABLE_OPTIMIZERS:
        raise ValueError(f"cannot override the registered optimizer '{key}'; choose another name")
    if not (isinstance(optimizer_params, type) and dataclasses.is_dataclass(optimizer_params)):
        raise ValueError(f"optimizer_params for '{key}' must be a dataclass type, got {optimizer_params!r}")
    if "lr" not in {f.name for f in dataclasses.fields(optimizer_params)}:
        raise ValueError(f"optimizer_params for '{key}' must have an 'lr' field (subclass OptimizerParams)")
    if not callable(optimizer):
        raise ValueError(f"optimizer for '{key}' must be callable, got {optimizer!r}")
    AVAILABLE_OPTIMIZERS[key] = optimizer
    OPTIMIZER_PARAMS[key] = optimizer_params


def _lookup_name(name: Any, registry: Mapping[str, Any], what: str, key: str, case_insensitive: bool,
                 unavailable: Mapping[str, str] = {}) -> str:
    """The registry key for ``name``; a ConfigError naming ``key`` otherwise (with the reason when ``name`` is in
    ``unavailable``: a known entry that cannot be offered here)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"{key}: expected the name of {what} (one of: {', '.join(sorted(registry))}), got {name!r}"
        )
    if name in registry:
        return name
    folded = {k.lower(): k for k in registry}
    if case_insensitive and name.lower() in folded:
        return folded[name.lower()]
    why = unavailable.get(name.lower() if case_insensitive else name)
    if why is not None:
        raise ConfigError(f"{key}: {what} '{name}' is not available on this machine: {why.rstrip('.')}. "
                          f"Available: {', '.join(sorted(registry))}.")
    close = [k for k in folded if name.lower() in k] or difflib.get_close_matches(name.lower(), list(folded), n=1)
    hint = f" Did you mean '{folded[close[0]]}'?" if close else ""
    raise ConfigError(f"{key}: unknown {what} '{name}'. Available: {', '.join(sorted(registry))}.{hint}")


def get_optimizer_params(name: str) -> type:
    """The params dataclass of a registered optimizer."""
    return OPTIMIZER_PARAMS[_lookup_name(name, OPTIMIZER_PARAMS, "optimizer", "model.optim.name", True,
                                         DEEPSPEED_UNAVAILABLE)]


def get_optimizer(name: str, **kwargs: Any) -> Callable[..., torch.optim.Optimizer]:
    """``functools.partial(optimizer_class, **kwargs)``: call it with parameters/param groups.

    Unknown names raise ConfigError listing the available optimizers; ``kwargs`` are passed
    as given (use :func:`build_optimizer` for validated config input).
    """
    key = _lookup_name(name, AVAILABLE_OPTIMIZERS, "optimizer", "model.optim.name", True, DEEPSPEED_UNAVAILABLE)
    return functools.partial(AVAILABLE_OPTIMIZERS[key], **kwargs)


# ----------------------------------------------------------------------------------------
# Config validation (shared with lr_schedulers)
# ----------------------------------------------------------------------------------------


def to_plain_dict(cfg: Any, key: str) -> Dict[str, Any]:
    """A DictConfig/Mapping as a plain ``dict`` (interpolations resolved); ConfigError otherwise."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except Exception:  # pragma: no cover - omegaconf is a dependency
        DictConfig = ()  # type: ignore[assignment]
    if isinstance(cfg, DictConfig):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True)
        except Exception as e:  # bad interpolation etc.
            raise ConfigError(f"{key}: cannot resolve the config: {e}") from None
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{key}: expected a mapping of keys (name, lr, ...), got {cfg!r}")
    out = {}
    for k, v in cfg.items():
        if not isinstance(k, str):
            raise ConfigError(f"{key}: keys must be strings, got {k!r}")
        out[k] = v
    return out


def _is_missing(value: Any) -> bool:
    return value is MISSING or (isinstance(value, str) and value == "???")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        names = [_type_name(a) for a in args]
        if len(set(names)) == 1:
            return f"a list of {len(args)} {names[0]}s"
        return f"a list [{', '.join(names)}]"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to annotation ``tp`` (float/int/bool/str/Optional/Tuple/Literal/Any)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise bad
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin in (tuple, Tuple, list, List):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if origin in (list, List) or (len(args) == 2 and args[1] is Ellipsis):
            elem = args[0] if args else Any
            items = [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        else:
            if len(value) != len(args):
                raise bad
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        return tuple(items) if origin in (tuple, Tuple) else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                out = float(value)
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(out):
            raise bad
        return out
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, (float, str)):
            try:
                f = float(value)
            except ValueError:
                raise bad from None
            if math.isfinite(f) and f == int(f):
                return int(f)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    return value


def validate_params(
    params_cls: type,
    cfg: Mapping[str, Any],
    key_prefix: str,
    what: str,
    extra_keys: Iterable[str] = (),
) -> Dict[str, Any]:
    """Check ``cfg`` against the fields of ``params_cls``; return the constructor kwargs.

    Keys in ``extra_keys`` are allowed but not returned (e.g. ``name``, ``sched``). Returns
    every field: given values (type-converted) and defaults for the others. Raises
    ConfigError naming ``<key_prefix>.<key>`` for unknown keys (listing the valid ones),
    missing required keys (default ``'???'``) and values of the wrong type.
    """
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    extra = set(extra_keys)
    unknown = [k for k in cfg if k not in fields and k not in extra]
    if unknown:
        valid = sorted(set(fields) | extra)
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, valid, n=1)
            if close:
                hints.append(f"'{k}' -> '{close[0]}'?")
        names = ", ".join(f"{key_prefix}.{k}" for k in unknown)
        msg = (
            f"{names}: unknown key{'s' if len(unknown) > 1 else ''} for {what}. "
            f"Valid keys: {', '.join(valid)}."
        )
        if hints:
            msg += f" Did you mean: {'; '.join(hints)}"
        msg += f" (remove a key with ~{key_prefix}.<key> on the command line)"
        raise ConfigError(msg)
    hints_map = typing.get_type_hints(params_cls)
    out: Dict[str, Any] = {}
    for name, f in fields.items():
        if name in cfg and not _is_missing(cfg[name]):
            out[name] = _coerce(cfg[name], hints_map.get(name, Any), f"{key_prefix}.{name}")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = MISSING
        if _is_missing(default):
            raise ConfigError(f"{key_prefix}.{name}: required for {what} but not set")
        out[name] = default
    return out


# ----------------------------------------------------------------------------------------
# Param groups and build
# ----------------------------------------------------------------------------------------


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Megatron's rule: biases and 1-D tensors (norm weights/biases) are not decayed."""
    return name.endswith(".bias") or name == "bias" or param.ndim <= 1


def get_param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    no_weight_decay_cond: Optional[Callable[[str, torch.Tensor], bool]] = None,
) -> List[Dict[str, Any]]:
    """Split the trainable parameters of ``model`` into a decay and a no-decay group.

    Returns ``[{"params": decay, "weight_decay": weight_decay},
    {"params": no_decay, "weight_decay": 0.0}]`` without empty groups. ``no_decay`` holds
    biases and 1-D parameters (norm weights), or what ``no_weight_decay_cond(name, param)``
    selects. Parameters shared between modules (tied embeddings) are listed once;
    parameters with ``requires_grad=False`` are left out.
    """
    cond = no_weight_decay_cond or _no_weight_decay
    decay: List[torch.nn.Parameter] = []
    no_decay: List[torch.nn.Parameter] = []
    seen = set()
    for name, param in model.named_parameters():  # remove_duplicate=True: tied params once
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if cond(name, param) else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _as_param_groups(model_or_params: Any, weight_decay: Optional[float]) -> List[Any]:
    if isinstance(model_or_params, torch.nn.Module):
        if weight_decay is None:  # optimizer without weight decay: one group
            groups = get_param_groups(model_or_params, 0.0, no_weight_decay_cond=lambda n, p: False)
            groups = [{"params": g["params"]} for g in groups]
        else:
            groups = get_param_groups(model_or_params, weight_decay)
    else:
        items = list(model_or_params)
        if items and all(isinstance(g, Mapping) for g in items):
            groups = [dict(g) for g in items]
        else:
            groups = [{"params": [p for p in items if getattr(p, "requires_grad", True)]}]
        groups = [g for g in groups if len(list(g["params"])) > 0]
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    return groups


def _fused_ok(groups) -> bool:
    """All parameters floating point, on one device type that torch's fused Adam supports."""
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if not params:
        return False
    kinds = {p.device.type for p in params}
    return (len(kinds) == 1 and kinds <= {"cpu", "cuda"}
            and all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params))


def build_optimizer(
    model_or_param_groups: Union[torch.nn.Module, Iterable[Any]],
    optim_cfg: Any,
    key_prefix: str = "model.optim",
) -> torch.optim.Optimizer:
    """Build the optimizer described by ``optim_cfg`` (``model.optim``).

    Args:
        model_or_param_groups: an ``nn.Module`` (split by :func:`get_param_groups` when the
            optimizer has a ``weight_decay`` key), param-group dicts (used as given; the
            config supplies the defaults), or an iterable of parameters (one group).
        optim_cfg: dict or DictConfig with ``name``, ``lr`` and the optimizer's keys;
            ``sched`` is ignored here.
        key_prefix: dotted path of ``optim_cfg`` used in error messages.

    Raises:
        ConfigError: unknown name, unknown key, missing ``lr``, a value of the wrong type,
            a value the optimizer rejects, or a DeepSpeed op that fails to build.
    """
    cfg = to_plain_dict(optim_cfg, key_prefix)
    if "name" not in cfg or cfg["name"] is None:
        raise ConfigError(
            f"{key_prefix}.name: required; one of: {', '.join(sorted(AVAILABLE_OPTIMIZERS))}"
        )
    name = _lookup_name(cfg["name"], AVAILABLE_OPTIMIZERS, "optimizer", f"{key_prefix}.name", True,
                        DEEPSPEED_UNAVAILABLE)
    params_cls = OPTIMIZER_PARAMS[name]
    kwargs = validate_params(params_cls, cfg, key_prefix, f"optimizer '{name}'", extra_keys=("name", "sched"))
    lr = kwargs["lr"]
    if isinstance(lr, float) and lr < 0:
        raise ConfigError(f"{key_prefix}.lr: must be >= 0, got {lr}")
    if "weight_decay" in kwargs and kwargs["weight_decay"] is not None and kwargs["weight_decay"] < 0:
        raise ConfigError(f"{key_prefix}.weight_decay: must be >= 0, got {kwargs['weight_decay']}")
    # None means "let the optimizer decide": do not pass it (some optimizers lack the kwarg
    # in older versions, and DeepSpeed's have no foreach/fused at all).
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    groups = _as_param_groups(model_or_param_groups, kwargs.get("weight_decay"))
    if name in ("adam", "adamw") and "fused" not in kwargs and "foreach" not in kwargs and _fused_ok(groups):
        # torch's fused Adam(W) kernel: one kernel per step instead of foreach's several passes, on CPU too
        kwargs["fused"] = True
    env = _deepspeed_build_env() if name in _DEEPSPEED_OP_BUILDERS else contextlib.nullcontext()
    with env:
        if name in _DEEPSPEED_OP_BUILDERS and AVAILABLE_OPTIMIZERS[name] is _DEEPSPEED_CLASSES.get(name):
            error = _load_deepspeed_op(name)
            if error is not None:
                raise ConfigError(
                    f"{key_prefix}.name: optimizer '{name}' cannot be built on this machine ({error}); "
                    f"use e.g. {key_prefix}.name=adamw"
                )
        try:
            return AVAILABLE_OPTIMIZERS[name](groups, **kwargs)
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:  # a value or key the optimizer's constructor rejects
            raise ConfigError(f"{key_prefix}: invalid settings for optimizer '{name}': {e}") from e
        except RuntimeError as e:  # how torch/DeepSpeed constructors refuse an option for these parameters
            # (fused=True with parameters on a device or dtype the kernel lacks, fused with foreach, amsgrad in
            # FusedAdam); any other exception is a bug and propagates as it is
            raise ConfigError(
                f"{key_prefix}.name: optimizer '{name}' cannot be created here "
                f"({type(e).__name__}: {e}); use e.g. {key_prefix}.name=adamw"
            ) from e

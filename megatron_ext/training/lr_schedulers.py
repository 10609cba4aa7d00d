"""Learning-rate scheduler registry, configured NeMo-style under ``model.optim.sched``.

.. code-block:: yaml

    model:
      optim:
        lr: 1e-3
        sched:
          name: CosineAnnealing   # a key of AVAILABLE_SCHEDULERS (case-insensitive)
          warmup_steps: 10        # or warmup_ratio: 0.1 (fraction of max_steps); not both
          min_lr: 1e-4
          max_steps: null         # null -> trainer.max_steps

All schedulers are step-based ``torch.optim.lr_scheduler.LRScheduler`` subclasses: the
trainer calls ``scheduler.step()`` once after every optimizer step. With ``s`` the number of
``step()`` calls so far (``scheduler.last_epoch``; 0 right after construction), the
optimizer's learning rate for the coming optimizer step is ``lr(s)``. Notation below:
``L`` = the configured lr of the param group (``base_lrs``), ``m`` = ``min_lr``,
``W`` = warmup steps (``warmup_steps``, or ``int(warmup_ratio * T)``), ``H`` = hold steps,
``T`` = ``max_steps``.

Common to the ``Warmup*`` family (NeMo semantics):

* warmup, for ``W > 0`` and ``s <= W``:  ``lr(s) = L * (s + 1) / (W + 1)``
  (the first step already trains, ``lr(W) = L``);
* after the end, ``s > T``:  ``lr(s) = m``;
* in between, the schedule's own decay with progress ``p = (s - S) / (T - S)`` where ``S``
  is where decay starts (``W``, or ``W + H`` for the hold variants).

Every schedule of this module is a closed-form function of ``s`` and ``base_lrs``, so it is
deterministic and ``state_dict()`` / ``load_state_dict()`` restores it exactly; loading also
writes ``lr(s)`` back into the optimizer's param groups, so a resumed run continues the same
curve whether or not the optimizer state is loaded after it. On a resume the trainer keeps the
schedule of the config instead (:func:`keep_config_on_resume`): only the position in the schedule
comes from the checkpoint. The torch schedulers
(``StepLR``, ``ExponentialLR``, ``CyclicLR``) are restored together with the optimizer state,
as usual in torch.

Meta keys accepted by every scheduler config: ``name``, ``max_steps`` (overrides the
``max_steps`` argument, normally ``trainer.max_steps``), ``monitor`` (ignored: metric-driven
schedules are not supported), ``reduce_on_plateau`` (must be false) and ``interval`` (must
be ``step``).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from omegaconf import MISSING
from torch.optim.lr_scheduler import CyclicLR, ExponentialLR, LRScheduler, StepLR

from megatron_ext.errors import ConfigError
from megatron_ext.training.optim import _coerce, _lookup_name, to_plain_dict, validate_params

__all__ = [
    "AVAILABLE_SCHEDULERS",
    "SCHEDULER_PARAMS",
    "SCHEDULER_META_KEYS",
    "ConstantPolicy",
    "WarmupPolicy",
    "WarmupHoldPolicy",
    "CosineAnnealing",
    "SquareAnnealing",
    "SquareRootAnnealing",
    "WarmupAnnealing",
    "PolynomialDecayAnnealing",
    "PolynomialHoldDecayAnnealing",
    "InverseSquareRootAnnealing",
    "NoamAnnealing",
    "register_scheduler",
    "build_scheduler",
    "config_state",
    "keep_config_on_resume",
]

SCHEDULER_META_KEYS = ("name", "max_steps", "monitor", "reduce_on_plateau", "interval")


# ----------------------------------------------------------------------------------------
# Scheduler classes
# ----------------------------------------------------------------------------------------


def _set_group_lr(group: Dict[str, Any], value: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


class _ClosedFormScheduler(LRScheduler):
    """Base: ``lr`` is ``self.lr_at(self.last_epoch)``, a pure function of the step."""

    def lr_at(self, step: int) -> List[float]:
        """The learning rate of every param group at scheduler step ``step``."""
        raise NotImplementedError

    def get_lr(self) -> List[float]:  # called by LRScheduler.step()
        return self.lr_at(self.last_epoch)

    def _get_closed_form_lr(self) -> List[float]:
        return self.lr_at(self.last_epoch)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore the step and base lrs, and set the optimizer's lrs for that step."""
        super().load_state_dict(state_dict)
        values = self.lr_at(self.last_epoch)
        if len(values) != len(self.optimizer.param_groups):
            raise ValueError(
                f"scheduler state has {len(values)} param groups, the optimizer has "
                f"{len(self.optimizer.param_groups)}"
            )
        for group, value in zip(self.optimizer.param_groups, values):
            _set_group_lr(group, value)
        self._last_lr = list(values)


class ConstantPolicy(_ClosedFormScheduler):
    """``lr(s) = L`` for every step (registered as ``constant`` and ``none``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, last_epoch: int = -1):
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int) -> List[float]:
        return [float(lr) for lr in self.base_lrs]


def _steps_from(steps: Optional[int], ratio: Optional[float], max_steps: Optional[int], what: str) -> int:
    if steps is not None and ratio is not None:
        raise ValueError(f"set either {what}_steps or {what}_ratio, not both")
    if ratio is not None:
        if max_steps is None:
            raise ValueError(f"{what}_ratio needs max_steps")
        return int(ratio * max_steps)
    return int(steps or 0)


class WarmupPolicy(_ClosedFormScheduler):
    """Linear warmup, then constant.

    ``lr(s) = L * (s + 1) / (W + 1)`` for ``W > 0, s <= W``; ``L`` until ``T``;
    ``m`` for ``s > T`` (``T = None``: constant forever).
    """

    needs_max_steps = False

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        warmup_steps: Optional[int] = None,
        warmup_ratio: Optional[float] = None,
        max_steps: Optional[int] = None,
        min_lr: float = 0.0,
        last_epoch: int = -1,
    ):
        if max_steps is None and self.needs_max_steps:
            raise ValueError(f"{type(self).__name__} needs max_steps")
        self.max_steps = max_steps
        self.warmup_steps = _steps_from(warmup_steps, warmup_ratio, max_steps, "warmup")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        self.min_lr = float(min_lr)
        self._check_steps()
        super().__init__(optimizer, last_epoch)

    def _check_steps(self) -> None:
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup steps ({self.warmup_steps}) exceed max_steps ({self.max_steps})")

    @property
    def decay_start(self) -> int:
        return self.warmup_steps

    def lr_at(self, step: int) -> List[float]:
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            frac = (step + 1) / (self.warmup_steps + 1)
            return [float(lr) * frac for lr in self.base_lrs]
        if self.max_steps is not None and step > self.max_steps:
            return [self.min_lr for _ in self.base_lrs]
        return [self._decayed(float(lr), step) for lr in self.base_lrs]

    def _progress(self, step: int) -> float:
        """``p = (s - S) / (T - S)`` in [0, 1] (S = decay start)."""
        span = self.max_steps - self.decay_start
        if span <= 0:
            return 1.0
        return min(max((step - self.decay_start) / span, 0.0), 1.0)

    def _decayed(self, base_lr: float, step: int) -> float:
        return base_lr


class WarmupHoldPolicy(WarmupPolicy):
    """Linear warmup, hold at ``L`` for ``H`` steps, then the schedule's decay (here: none).

    Warmup as :class:`WarmupPolicy`; ``lr(s) = L`` for ``W <= s < W + H``; ``m`` for ``s > T``.
    ``H`` is ``hold_steps`` or ``int(hold_ratio * T)``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        warmup_steps: Optional[int] = None,
        warmup_ratio: Optional[float] = None,
        hold_steps: Optional[int] = None,
        hold_ratio: Optional[float] = None,
        max_steps: Optional[int] = None,
        min_lr: float = 0.0,
        last_epoch: int = -1,
    ):
        self.hold_steps = _steps_from(hold_steps, hold_ratio, max_steps, "hold")
        if self.hold_steps < 0:
            raise ValueError(f"hold_steps must be >= 0, got {self.hold_steps}")
        super().__init__(
            optimizer,
            warmup_steps=warmup_steps,
            warmup_ratio=warmup_ratio,
            max_steps=max_steps,
            min_lr=min_lr,
            last_epoch=last_epoch,
        )

    def _check_steps(self) -> None:
        if self.max_steps is not None and self.warmup_steps + self.hold_steps > self.max_steps:
            raise ValueError(
                f"warmup steps ({self.warmup_steps}) + hold steps ({self.hold_steps}) "
                f"exceed max_steps ({self.max_steps})"
            )

    @property
    def decay_start(self) -> int:
        return self.warmup_steps + self.hold_steps

    def lr_at(self, step: int) -> List[float]:
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return super().lr_at(step)
        if step < self.decay_start:
            return [float(lr) for lr in self.base_lrs]
        return super().lr_at(step)


class CosineAnnealing(WarmupPolicy):
    """Linear warmup to ``L``, cosine to ``m`` at ``T``, then ``m``.

    ``lr(s) = m + (L - m) * 0.5 * (1 + cos(pi * p))``, ``p = (s - W) / (T - W)``.
    """

    needs_max_steps = True

    def _decayed(self, base_lr: float, step: int) -> float:
        p = self._progress(step)
        return self.min_lr + (base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


class SquareAnnealing(WarmupPolicy):
    """Warmup, then ``lr(s) = m + (L - m) * (1 - p)^2``, ``p = (s - W) / (T - W)``; ``m`` after ``T``."""

    needs_max_steps = True

    def _decayed(self, base_lr: float, step: int) -> float:
        return self.min_lr + (base_lr - self.min_lr) * (1.0 - self._progress(step)) ** 2


class SquareRootAnnealing(WarmupPolicy):
    """Warmup, then ``lr(s) = m + (L - m) * sqrt(1 - p)``, ``p = (s - W) / (T - W)``; ``m`` after ``T``."""

    needs_max_steps = True

    def _decayed(self, base_lr: float, step: int) -> float:
        return self.min_lr + (base_lr - self.min_lr) * math.sqrt(1.0 - self._progress(step))


class WarmupAnnealing(WarmupPolicy):
    """Warmup, then linear decay ``lr(s) = m + (L - m) * (1 - p)``, ``p = (s - W) / (T - W)``; ``m`` after ``T``."""

    needs_max_steps = True

    def _decayed(self, base_lr: float, step: int) -> float:
        return self.min_lr + (base_lr - self.min_lr) * (1.0 - self._progress(step))


class _PolynomialDecay:
    """``lr = m + (L - m) * (1 - p)^power`` over the policy's decay progress ``p`` (mixed into a warmup policy)."""

    needs_max_steps = True

    def __init__(self, optimizer: torch.optim.Optimizer, *, power: float = 1.0, **kwargs: Any):
        if power <= 0:
            raise ValueError(f"power must be > 0, got {power}")
        self.power = float(power)
        super().__init__(optimizer, **kwargs)

    def _decayed(self, base_lr: float, step: int) -> float:
        return self.min_lr + (base_lr - self.min_lr) * (1.0 - self._progress(step)) ** self.power


class PolynomialDecayAnnealing(_PolynomialDecay, WarmupPolicy):
    """Warmup, then ``lr(s) = m + (L - m) * (1 - p)^power``, ``p = (s - W) / (T - W)``; ``m`` after ``T``."""


class PolynomialHoldDecayAnnealing(_PolynomialDecay, WarmupHoldPolicy):
    """Warmup, hold ``H`` steps at ``L``, then ``lr(s) = m + (L - m) * (1 - p)^power`` with
    ``p = (s - W - H) / (T - W - H)``; ``m`` after ``T``."""


class InverseSquareRootAnnealing(WarmupPolicy):
    """Warmup, then ``lr(s) = max(m, L * sqrt((W + 1) / (s + 1)))`` (continuous at ``s = W``);
    ``m`` after ``T``."""

    needs_max_steps = True

    def _decayed(self, base_lr: float, step: int) -> float:
        return max(self.min_lr, base_lr * math.sqrt((self.warmup_steps + 1) / (step + 1)))


class NoamAnnealing(_ClosedFormScheduler):
    """The Transformer ("Attention is all you need") schedule; ``L`` acts as a scale factor.

    With ``s' = max(1, s)``:
    ``lr(s) = L * d_model^-0.5 * min(s'^-0.5, s' * W^-1.5)`` (``W = 0``: ``L * d_model^-0.5 * s'^-0.5``),
    and ``lr(s) = max(m, lr(s))`` once ``s' > W``. No cut-off at ``T`` (``max_steps`` only
    serves ``warmup_ratio``). The peak, at ``s = W``, is ``L * (d_model * W)^-0.5``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        d_model: int,
        warmup_steps: Optional[int] = None,
        warmup_ratio: Optional[float] = None,
        max_steps: Optional[int] = None,
        min_lr: float = 0.0,
        last_epoch: int = -1,
    ):
        if d_model <= 0:
            raise ValueError(f"d_model must be > 0, got {d_model}")
        self.d_model = int(d_model)
        self.max_steps = max_steps
        self.warmup_steps = _steps_from(warmup_steps, warmup_ratio, max_steps, "warmup")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        self.min_lr = float(min_lr)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int) -> List[float]:
        s = max(1, step)
        norm = self.d_model ** -0.5
        if self.warmup_steps > 0:
            mult = norm * min(s ** -0.5, s * self.warmup_steps ** -1.5)
        else:
            mult = norm * s ** -0.5
        out = []
        for lr in self.base_lrs:
            value = float(lr) * mult
            if s > self.warmup_steps:
                value = max(value, self.min_lr)
            out.append(value)
        return out


# ----------------------------------------------------------------------------------------
# Params dataclasses
# ----------------------------------------------------------------------------------------


@dataclass
class SchedulerParams:
    """Base of the scheduler params (the meta keys name/max_steps/... are always accepted)."""


@dataclass
class ConstantPolicyParams(SchedulerParams):
    pass


@dataclass
class WarmupSchedulerParams(SchedulerParams):
    warmup_steps: Optional[int] = None
    warmup_ratio: Optional[float] = None
    min_lr: float = 0.0


@dataclass
class WarmupPolicyParams(WarmupSchedulerParams):
    pass


@dataclass
class WarmupHoldPolicyParams(WarmupSchedulerParams):
    hold_steps: Optional[int] = None
    hold_ratio: Optional[float] = None


@dataclass
class CosineAnnealingParams(WarmupSchedulerParams):
    pass


@dataclass
class SquareAnnealingParams(WarmupSchedulerParams):
    pass


@dataclass
class SquareRootAnnealingParams(WarmupSchedulerParams):
    pass


@dataclass
class WarmupAnnealingParams(WarmupSchedulerParams):
    pass


@dataclass
class InverseSquareRootAnnealingParams(WarmupSchedulerParams):
    pass


@dataclass
class PolynomialDecayAnnealingParams(WarmupSchedulerParams):
    power: float = 1.0


@dataclass
class PolynomialHoldDecayAnnealingParams(WarmupHoldPolicyParams):
    power: float = 1.0


@dataclass
class NoamAnnealingParams(WarmupSchedulerParams):
    d_model: int = MISSING


@dataclass
class StepLRParams(SchedulerParams):
    """torch StepLR: ``lr = L * gamma^(s // step_size)`` (``s`` in optimizer steps)."""

    step_size: int = MISSING
    gamma: float = 0.1


@dataclass
class ExponentialLRParams(SchedulerParams):
    """torch ExponentialLR: ``lr = L * gamma^s``."""

    gamma: float = MISSING


@dataclass
class CyclicLRParams(SchedulerParams):
    """torch CyclicLR (per step). ``cycle_momentum`` needs an optimizer with momentum/betas."""

    base_lr: float = MISSING
    max_lr: float = MISSING
    step_size_up: int = 2000
    step_size_down: Optional[int] = None
    mode: str = "triangular"
    gamma: float = 1.0
    scale_mode: str = "cycle"
    cycle_momentum: bool = True
    base_momentum: float = 0.8
    max_momentum: float = 0.9


# ----------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------

AVAILABLE_SCHEDULERS: Dict[str, Callable[..., LRScheduler]] = {
    "WarmupPolicy": WarmupPolicy,
    "WarmupHoldPolicy": WarmupHoldPolicy,
    "SquareAnnealing": SquareAnnealing,
    "CosineAnnealing": CosineAnnealing,
    "NoamAnnealing": NoamAnnealing,
    "WarmupAnnealing": WarmupAnnealing,
    "InverseSquareRootAnnealing": InverseSquareRootAnnealing,
    "SquareRootAnnealing": SquareRootAnnealing,
    "PolynomialDecayAnnealing": PolynomialDecayAnnealing,
    "PolynomialHoldDecayAnnealing": PolynomialHoldDecayAnnealing,
    "StepLR": StepLR,
    "ExponentialLR": ExponentialLR,
    "CyclicLR": CyclicLR,
    "constant": ConstantPolicy,
    "none": ConstantPolicy,
}

SCHEDULER_PARAMS: Dict[str, type] = {
    "WarmupPolicy": WarmupPolicyParams,
    "WarmupHoldPolicy": WarmupHoldPolicyParams,
    "SquareAnnealing": SquareAnnealingParams,
    "CosineAnnealing": CosineAnnealingParams,
    "NoamAnnealing": NoamAnnealingParams,
    "WarmupAnnealing": WarmupAnnealingParams,
    "InverseSquareRootAnnealing": InverseSquareRootAnnealingParams,
    "SquareRootAnnealing": SquareRootAnnealingParams,
    "PolynomialDecayAnnealing": PolynomialDecayAnnealingParams,
    "PolynomialHoldDecayAnnealing": PolynomialHoldDecayAnnealingParams,
    "StepLR": StepLRParams,
    "ExponentialLR": ExponentialLRParams,
    "CyclicLR": CyclicLRParams,
    "constant": ConstantPolicyParams,
    "none": ConstantPolicyParams,
}


def register_scheduler(name: str, scheduler: Callable[..., LRScheduler], scheduler_params: type) -> None:
    """Make ``scheduler`` available as ``model.optim.sched.name: <name>``.

    Args:
        name: registry key (lookups try the exact name, then case-insensitively).
        scheduler: an ``LRScheduler`` subclass or callable ``scheduler(optimizer, **kwargs)``;
            if it takes a ``max_steps`` argument, :func:`build_scheduler` passes it.
        scheduler_params: a dataclass type whose fields are the accepted config keys
            (``'???'`` defaults are required keys).

    Raises:
        ValueError: ``name`` is already registered or ``scheduler_params`` is not a dataclass.
    """
    if name in AVAILABLE_SCHEDULERS or name.lower() in {k.lower() for k in AVAILABLE_SCHEDULERS}:
        raise ValueError(f"cannot override the registered scheduler '{name}'; choose another name")
    if not (isinstance(scheduler_params, type) and dataclasses.is_dataclass(scheduler_params)):
        raise ValueError(f"scheduler_params for '{name}' must be a dataclass type, got {scheduler_params!r}")
    if not callable(scheduler):
        raise ValueError(f"scheduler for '{name}' must be callable, got {scheduler!r}")
    AVAILABLE_SCHEDULERS[name] = scheduler
    SCHEDULER_PARAMS[name] = scheduler_params


def _accepts(fn: Callable[..., Any], arg: str) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return arg in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def _parent(key_prefix: str) -> str:
    return key_prefix.rsplit(".", 1)[0] if "." in key_prefix else key_prefix


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    sched_cfg: Any,
    max_steps: Optional[int],
    key_prefix: str = "model.optim.sched",
) -> LRScheduler:
    """Build the scheduler described by ``sched_cfg`` (``model.optim.sched``) on ``optimizer``.

    ``sched_cfg`` None means a constant learning rate (:class:`ConstantPolicy`). The
    ``max_steps`` key, when set, overrides the ``max_steps`` argument (``trainer.max_steps``).

    Raises:
        ConfigError naming ``<key_prefix>.<key>``: unknown name or key, missing required
        key, wrong type, both ``warmup_steps`` and ``warmup_ratio`` (or ``hold_*``) set,
        warmup/hold longer than ``max_steps``, ``min_lr`` above the optimizer's lr, no
        ``max_steps`` for a schedule that needs it, or a value the scheduler rejects.
    """
    if sched_cfg is None:
        return ConstantPolicy(optimizer)
    cfg = to_plain_dict(sched_cfg, key_prefix)
    if cfg.get("name") is None:
        raise ConfigError(
            f"{key_prefix}.name: required; one of: {', '.join(sorted(AVAILABLE_SCHEDULERS))}"
        )
    name = _lookup_name(cfg["name"], AVAILABLE_SCHEDULERS, "scheduler", f"{key_prefix}.name", True)
    cls = AVAILABLE_SCHEDULERS[name]
    what = f"scheduler '{name}'"
    kwargs = validate_params(
        SCHEDULER_PARAMS[name],
        cfg,
        key_prefix,
        what,
        extra_keys=SCHEDULER_META_KEYS,
    )
    # Meta keys.
    if cfg.get("reduce_on_plateau"):
        raise ConfigError(
            f"{key_prefix}.reduce_on_plateau: metric-driven schedules are not supported; set it to false"
        )
    interval = cfg.get("interval")
    if interval is not None and interval != "step":
        raise ConfigError(f"{key_prefix}.interval: only 'step' is supported, got {interval!r}")
    if cfg.get("max_steps") is not None:
        max_steps = _coerce(cfg["max_steps"], int, f"{key_prefix}.max_steps")
        max_key = f"{key_prefix}.max_steps"
    else:
        max_key = f"{key_prefix}.max_steps (default: trainer.max_steps)"
        if max_steps is not None:
            max_steps = _coerce(max_steps, int, max_key)
    if max_steps is not None and max_steps <= 0:
        raise ConfigError(f"{max_key}: must be a positive number of steps, got {max_steps}")

    # Warmup / hold: steps xor ratio.
    for what_ in ("warmup", "hold"):
        s_key, r_key = f"{what_}_steps", f"{what_}_ratio"
        if s_key not in kwargs:
            continue
        steps, ratio = kwargs.get(s_key), kwargs.get(r_key)
        if steps is not None and ratio is not None:
            raise ConfigError(
                f"{key_prefix}.{s_key} and {key_prefix}.{r_key}: set only one of them "
                f"(got {s_key}={steps}, {r_key}={ratio}); null the other"
            )
        if steps is not None and steps < 0:
            raise ConfigError(f"{key_prefix}.{s_key}: must be >= 0, got {steps}")
        if ratio is not None:
            if not 0.0 <= ratio <= 1.0:
                raise ConfigError(f"{key_prefix}.{r_key}: must be in [0, 1], got {ratio}")
            if max_steps is None:
                raise ConfigError(f"{key_prefix}.{r_key}: needs max_steps; set {key_prefix}.max_steps")
    if max_steps is None and getattr(cls, "needs_max_steps", False):
        raise ConfigError(f"{key_prefix}.max_steps: {what} needs max_steps; set it or trainer.max_steps")
    if max_steps is not None and "warmup_steps" in kwargs:
        warm = kwargs["warmup_steps"] if kwargs["warmup_steps"] is not None else int((kwargs["warmup_ratio"] or 0) * max_steps)
        hold = 0
        if "hold_steps" in kwargs:
            hold = kwargs["hold_steps"] if kwargs["hold_steps"] is not None else int((kwargs["hold_ratio"] or 0) * max_steps)
        if warm + hold > max_steps and cls is not NoamAnnealing:
            label = "warmup_steps" if not hold else "warmup_steps + hold_steps"
            raise ConfigError(
                f"{key_prefix}.{label.split(' ')[0]}: {label} ({warm + hold}) exceeds max_steps ({max_steps}) "
                f"[{max_key}]"
            )
    if "min_lr" in kwargs:
        for group in optimizer.param_groups:
            lr = float(group.get("initial_lr", group["lr"]))
            if kwargs["min_lr"] > lr:
                raise ConfigError(
                    f"{key_prefix}.min_lr: {kwargs['min_lr']} is larger than the learning rate "
                    f"{lr} ({_parent(key_prefix)}.lr)"
                )
            if kwargs["min_lr"] < 0:
                raise ConfigError(f"{key_prefix}.min_lr: must be >= 0, got {kwargs['min_lr']}")
    if _accepts(cls, "max_steps") and max_steps is not None:
        kwargs["max_steps"] = max_steps
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return cls(optimizer, **kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{key_prefix}: invalid settings for {what}: {e}") from None


# --------------------------------------------------------------------------------------- resume with a new config
# A scheduler's state_dict entries that say where in the schedule it is; the rest is the schedule itself.
_POSITION_KEYS = ("last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial")
# Optimizer param-group entries that the scheduler sets (lr) or that are not hyperparameters.
_GROUP_SKIP = ("params", "lr", "initial_lr", "step")


def config_state(optimizer: torch.optim.Optimizer, scheduler: Optional[LRScheduler]) -> Dict[str, Any]:
    """The hyperparameters an optimizer and scheduler were built with from the config (call before a checkpoint
    is loaded into them; give the result to :func:`keep_config_on_resume` after)."""
    skip = _GROUP_SKIP if scheduler is not None else tuple(k for k in _GROUP_SKIP if k != "lr")  # no scheduler: lr too
    groups = [{k: v for k, v in g.items() if k not in skip} for g in optimizer.param_groups]
    sched = {} if scheduler is None else {
        k: v for k, v in scheduler.__dict__.items() if k not in _POSITION_KEYS and k != "optimizer"}
    return {"groups": groups, "sched": sched}


def _config_key(attr: str, optimizer_side: bool) -> str:
    if attr == "base_lrs":
        return "model.optim.lr"
    return f"model.optim.{attr}" if optimizer_side else f"model.optim.sched.{attr}"


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)) and value and len({repr(v) for v in value}) == 1 and \
            not isinstance(value[0], (list, tuple)):
        value = value[0]  # one value for every param group
    return f"{value:g}" if isinstance(value, float) else str(value)


def keep_config_on_resume(optimizer: torch.optim.Optimizer, scheduler: Optional[LRScheduler],
                          configured: Dict[str, Any]) -> List[str]:
    """After a checkpoint was loaded: put back the hyperparameters of the config (``configured`` from
    :func:`config_state`) over those restored from the checkpoint, keeping the restored position in the schedule
    (its step count) and the optimizer's moments, and set each param group's lr for that step.

    So ``model.optim.lr``, ``model.optim.<key>`` (weight_decay, betas ...) and ``model.optim.sched.<key>``
    (min_lr, warmup_steps, max_steps ...) given for a resumed run take effect (Megatron-LM's
    ``--override-opt_param-scheduler``). Returns ``'<config key>: <checkpoint> -> <config>'`` for each value that
    differed (empty when the config is unchanged)."""
    changed: List[str] = []
    if scheduler is not None:
        restored = scheduler.__dict__
        for k, v in configured["sched"].items():
            if not k.startswith("_") and k in restored and not _same(restored[k], v):
                changed.append(f"{_config_key(k, False)}: {_fmt(restored[k])} -> {_fmt(v)}")
        scheduler.__dict__.update(configured["sched"])
    for i, (group, conf) in enumerate(zip(optimizer.param_groups, configured["groups"])):
        for k, v in conf.items():
            if k in group and not _same(group[k], v):
                line = f"{_config_key(k, True)}: {_fmt(group[k])} -> {_fmt(v)}"
                if line not in changed:
                    changed.append(line)
            if k == "lr":
                _set_group_lr(group, v)
            else:
                group[k] = v
    if scheduler is not None:
        if isinstance(scheduler, _ClosedFormScheduler):
            values = scheduler.lr_at(scheduler.last_epoch)
        elif hasattr(scheduler, "_get_closed_form_lr"):
            values = scheduler._get_closed_form_lr()
        else:
            scheduler._get_lr_called_within_step = True
            try:
                values = scheduler.get_lr()
            finally:
                scheduler._get_lr_called_within_step = False
        for group, value, base in zip(optimizer.param_groups, values, scheduler.base_lrs):
            _set_group_lr(group, float(value))
            group["initial_lr"] = base
        scheduler._last_lr = [float(v) for v in values]
    return changed


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b

"""Base classes of hidden transformations and hidden losses.

Shapes (Megatron layout, as the encoder-decoder's ``encode()`` returns them):

* ``hiddens`` and every per-position transform output: ``[S, B, H]`` (sequence first);
* ``hiddens_mask``: ``[B, S]`` bool, True = a real (valid) position;
* per-position scalars produced by transforms (e.g. ``z_log_prob``): ``[S, B]``;
* terms returned by a loss's ``_loss``: ``[B, S]`` (per position, batch first like the mask) or
  ``[B]`` (per sample).

Reduction done by ``MegatronBaseHiddenLoss.loss`` (the same for ``loss`` and for every extra
logged term, so padding never shows up in a logged value):

1. a ``[B, S]`` term is averaged over the valid positions of each sample:
   ``sum_s(term * mask) / count_s(mask)`` -> ``[B]`` (padded positions are *selected out* with
   ``torch.where``, so even a NaN/inf there cannot leak in);
2. the ``[B]`` per-sample values are averaged over the samples that have at least one valid
   position -> a scalar.

Step 2 is a **mean** over the micro-batch, not NeMo's sum: with a sum the effective weight of a
hidden loss relative to the (per-token mean) tokens loss grows with the micro-batch size, so the
same ``loss_weight`` would mean different things at different ``micro_batch_size``. With the mean
it does not, and averaging the scalar over data-parallel ranks gives the global-batch mean.
"""
from __future__ import annotations

import math
from typing import Collection, Dict, List, Mapping, Optional

import torch
from torch import nn

from megatron_ext.errors import ConfigError, DataError

#: keys of the dict returned by ``MegatronBaseHiddenLoss._loss`` that are not logged terms
LOSS_KEY = "loss"
VALID_KEY = "valid"


def as_float(value, what: str) -> float:
    """``value`` as a finite float (numeric strings such as ``"1e-2"`` from YAML 1.1 accepted)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}={value!r}: expected a number")
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}={value!r}: expected a number") from None
    if not math.isfinite(out):
        raise ConfigError(f"{what}={value!r}: expected a finite number")
    return out


def as_pos_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what}={value!r}: expected a positive integer")
    return int(value)


def masked_mean(term: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``term`` ``[B, S]`` over the True positions of ``mask`` ``[B, S]`` per sample -> ``[B]``
    (0 for a sample without valid positions)."""
    mask = mask.bool()
    total = torch.where(mask, term, torch.zeros((), dtype=term.dtype, device=term.device)).sum(dim=1)
    count = mask.sum(dim=1).clamp(min=1).to(term.dtype)
    return total / count


def _describe(obj: nn.Module) -> str:
    name = getattr(obj, "name", "") or ""
    return f"{type(obj).__name__}{f' {name!r}' if name else ''}"


def _check_inputs(obj: nn.Module, inputs: Mapping, kind: str) -> None:
    if not isinstance(inputs, Mapping):
        raise DataError(f"hidden {kind} {_describe(obj)}: inputs must be a dict of named tensors, got "
                        f"{type(inputs).__name__}")
    missing = [n for n in obj.input_names if n not in inputs]
    if missing:
        raise DataError(f"hidden {kind} {_describe(obj)} needs inputs {missing} that are not among the given "
                        f"names {sorted(inputs)}")


class MegatronBaseHiddenTransform(nn.Module):
    """A transformation of named encoder outputs into new named outputs.

    Subclasses declare ``input_names`` (the names they read; only these are passed to
    ``_transform``) and ``output_names`` (the names they produce, exactly), and implement
    ``_transform(inputs, batch_data) -> {name: tensor}``. ``transform`` checks both sides.

    ``name`` is the instance name (the config entry name); ``model_parallel_cfg`` is the
    megatron-core ``ModelParallelConfig`` of the model (or None), for subclasses with TP layers.
    """

    def __init__(self, name: str = "", model_parallel_cfg=None):
        super().__init__()
        self.name = str(name)
        self.model_parallel_cfg = model_parallel_cfg
        self._inputs_resolved = False

    @property
    def input_names(self) -> List[str]:
        return []

    @property
    def output_names(self) -> List[str]:
        return []

    def resolve_inputs(self, available: Collection[str]) -> None:
        """Called once (by ``MegatronHiddensModule`` at construction, else on first use) with the names
        available to this entry. A class with optional inputs picks its ``input_names`` here."""
        self._inputs_resolved = True

    def transform(self, inputs: Mapping[str, torch.Tensor], batch_data: Optional[Mapping] = None) -> Dict[str, torch.Tensor]:
        """Returns a dict with exactly ``output_names`` (only the new outputs, never the inputs)."""
        if not self._inputs_resolved and isinstance(inputs, Mapping):
            self.resolve_inputs(set(inputs))
        _check_inputs(self, inputs, "transform")
        outputs = self._transform({n: inputs[n] for n in self.input_names}, batch_data)
        if not isinstance(outputs, Mapping) or set(outputs) != set(self.output_names):
            got = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise RuntimeError(f"hidden transform {_describe(self)}: _transform must return exactly "
                               f"output_names={sorted(self.output_names)}, got {got}")
        return dict(outputs)

    def _transform(self, inputs: Dict[str, torch.Tensor], batch_data: Optional[Mapping] = None) -> Dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement _transform")

    def forward(self, inputs, batch_data=None):
        return self.transform(inputs, batch_data)


class MegatronBaseHiddenLoss(nn.Module):
    """A loss over named outputs (the encoder's and the transforms').

    Subclasses implement ``_input_names()`` (``hiddens_mask`` is always added to ``input_names``),
    optionally ``output_names`` (extra terms they return for logging, e.g. ``log_prob_P_z``), and
    ``_loss(inputs, batch_data) -> dict`` with

    * ``"loss"``: the unweighted loss per position ``[B, S]`` or per sample ``[B]``;
    * every name of ``output_names``: ``[B, S]`` or ``[B]`` (or a scalar, logged as is);
    * optionally ``"valid"``: a bool ``[B, S]`` / ``[B]`` mask of further positions/samples to leave
      out (e.g. samples without a label); it is combined with ``hiddens_mask``.

    ``loss`` reduces every term (see the module docstring: masked mean over valid positions, then
    mean over samples) and returns ``{"loss": scalar, "weighted_loss": loss_weight * loss,
    <term>: scalar, ...}``. ``loss_weight`` is a plain float attribute (a callback may change it).
    """

    def __init__(self, loss_weight: float = 1.0, name: str = ""):
        super().__init__()
        self.name = str(name)
        self.loss_weight = as_float(loss_weight, "loss_weight")
        self._inputs_resolved = False

    def _input_names(self) -> List[str]:
        return []

    @property
    def input_names(self) -> List[str]:
        names = list(self._input_names())
        return names + ([] if "hiddens_mask" in names else ["hiddens_mask"])

    @property
    def output_names(self) -> List[str]:
        return []

    def resolve_inputs(self, available: Collection[str]) -> None:
        """See ``MegatronBaseHiddenTransform.resolve_inputs``."""
        self._inputs_resolved = True

    def _reduce(self, key: str, term, pos_mask: torch.Tensor, sample_valid: torch.Tensor) -> torch.Tensor:
        """``term`` [B, S] / [B] / scalar -> scalar (masked mean over positions, then mean over valid samples)."""
        b, s = pos_mask.shape
        if not isinstance(term, torch.Tensor):
            term = torch.as_tensor(term, dtype=torch.float32, device=pos_mask.device)
        if term.dim() == 0:
            return term.float()
        term = term.float()
        if tuple(term.shape) == (b, s):
            per_sample = masked_mean(term, pos_mask)
        elif tuple(term.shape) == (b,):
            per_sample = term
        else:
            raise RuntimeError(f"hidden loss {_describe(self)}: term {key!r} has shape {tuple(term.shape)}; expected "
                               f"[B, S]={[b, s]} (per position, batch first like hiddens_mask), [B]={[b]} or a scalar")
        zero = torch.zeros((), dtype=per_sample.dtype, device=per_sample.device)
        total = torch.where(sample_valid, per_sample, zero).sum()
        return total / sample_valid.sum().clamp(min=1).to(per_sample.dtype)

    def loss(self, inputs: Mapping[str, torch.Tensor], batch_data: Optional[Mapping] = None) -> Dict[str, torch.Tensor]:
        if not self._inputs_resolved and isinstance(inputs, Mapping):
            self.resolve_inputs(set(inputs))
        _check_inputs(self, inputs, "loss")
        terms = self._loss({n: inputs[n] for n in self.input_names}, batch_data)
        if not isinstance(terms, Mapping) or LOSS_KEY not in terms:
            raise RuntimeError(f"hidden loss {_describe(self)}: _loss must return a dict with a 'loss' key")
        expected = {LOSS_KEY, *self.output_names}
        got = set(terms) - {VALID_KEY}
        if got != expected:
            raise RuntimeError(f"hidden loss {_describe(self)}: _loss must return 'loss' and exactly "
                               f"output_names={sorted(self.output_names)} (plus optional 'valid'), got {sorted(terms)}")
        mask = inputs["hiddens_mask"]
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise DataError(f"hidden loss {_describe(self)}: hiddens_mask must be a [B, S] tensor, got "
                            f"{getattr(mask, 'shape', type(mask).__name__)}")
        pos_mask = mask.bool()
        b = pos_mask.shape[0]
        sample_extra = None
        extra_valid = terms.get(VALID_KEY)
        if extra_valid is not None:
            extra_valid = torch.as_tensor(extra_valid, device=pos_mask.device).bool()
            if tuple(extra_valid.shape) == tuple(pos_mask.shape):
                pos_mask = pos_mask & extra_valid
            elif tuple(extra_valid.shape) == (b,):
                sample_extra = extra_valid
            else:
                raise RuntimeError(f"hidden loss {_describe(self)}: 'valid' has shape {tuple(extra_valid.shape)}; "
                                   f"expected [B, S]={list(pos_mask.shape)} or [B]={[b]}")
        sample_valid = pos_mask.any(dim=1)
        if sample_extra is not None:
            sample_valid = sample_valid & sample_extra
        out: Dict[str, torch.Tensor] = {}
        for key in [LOSS_KEY, *self.output_names]:
            out[key] = self._reduce(key, terms[key], pos_mask, sample_valid)
        out["weighted_loss"] = out[LOSS_KEY] * self.loss_weight
        return out

    def _loss(self, inputs: Dict[str, torch.Tensor], batch_data: Optional[Mapping] = None) -> Dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement _loss")

    def forward(self, inputs, batch_data=None):
        return self.loss(inputs, batch_data)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, loss_weight={self.loss_weight}"


__all__ = [
    "MegatronBaseHiddenTransform",
    "MegatronBaseHiddenLoss",
    "masked_mean",
    "as_float",
    "as_pos_int",
]

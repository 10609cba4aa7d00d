"""Built-in hidden losses: ``a_mim``, ``vae`` and ``guided_cls_loss``.

Every loss returns per-position ``[B, S]`` (or per-sample ``[B]``) terms; the base class reduces
each of them - the loss *and* every logged term - with a masked mean over the valid positions of
``hiddens_mask`` and a mean over the samples (see ``megatron_ext.hiddens.base``). Computations are
in fp32.
"""
from __future__ import annotations

from typing import Collection, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F

from megatron_ext.errors import ConfigError, DataError
from megatron_ext.hiddens.base import MegatronBaseHiddenLoss, as_float
from megatron_ext.hiddens.transforms import LOG_2PI

HIDDEN_AGGREGATION_METHODS = ("sum", "mean")
KL_ESTIMATORS = ("auto", "closed_form", "sample")


def _get_z(inputs: Dict[str, torch.Tensor], who: str) -> torch.Tensor:
    z = inputs["z"]
    if not isinstance(z, torch.Tensor) or z.dim() != 3:
        raise DataError(f"{who}: 'z' must be a [S, B, H] tensor, got "
                        f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    return z.float()


def _get_log_prob(inputs: Dict[str, torch.Tensor], z: torch.Tensor, who: str) -> torch.Tensor:
    lp = inputs["z_log_prob"]
    if not isinstance(lp, torch.Tensor) or tuple(lp.shape) != tuple(z.shape[:2]):
        raise DataError(f"{who}: 'z_log_prob' must be [S, B]={list(z.shape[:2])} (log q(z|x) summed over H), got "
                        f"{tuple(lp.shape) if isinstance(lp, torch.Tensor) else type(lp).__name__}")
    return lp.float()


def unit_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, 1) per element (fp32)."""
    z = z.float()
    return -0.5 * (LOG_2PI + z * z)


class MegatronAMIMHiddenLoss(MegatronBaseHiddenLoss):
    """``a_mim``: the latent part of the A-MIM loss with a unit-Normal prior (arXiv:2003.02645).

    Per position: ``loss = -1/2 * (log P(z) + log q(z|x))`` with ``P = N(0, I)``; it needs ``z`` and
    ``z_log_prob`` (from ``cond_gaussian``). The reconstruction part ``-log p(x|z)`` is the tokens
    loss. Logged terms: ``log_prob_P_z`` and ``log_prob_q_z_given_x``.

    ``hidden_aggregation_method``: ``sum`` (default; the log-densities of the H-dimensional z) or
    ``mean`` (both log-densities divided by H - the prior *and* the posterior, so the two terms
    stay on the same scale; NeMo averages only the prior).
    """

    def __init__(self, loss_weight: float = 1.0, hidden_aggregation_method: str = "sum", name: str = "mim"):
        super().__init__(loss_weight=loss_weight, name=name)
        if hidden_aggregation_method not in HIDDEN_AGGREGATION_METHODS:
            raise ConfigError(f"hidden_aggregation_method={hidden_aggregation_method!r}: expected one of "
                              f"{', '.join(HIDDEN_AGGREGATION_METHODS)}")
        self.hidden_aggregation_method = hidden_aggregation_method

    def _input_names(self) -> List[str]:
        return ["z", "z_log_prob"]

    @property
    def output_names(self) -> List[str]:
        return ["log_prob_P_z", "log_prob_q_z_given_x"]

    def _loss(self, inputs: Dict[str, torch.Tensor], batch_data: Optional[Mapping] = None) -> Dict[str, torch.Tensor]:
        who = f"a_mim loss {self.name!r}"
        z = _get_z(inputs, who)
        log_q = _get_log_prob(inputs, z, who)
        log_p = unit_normal_log_prob(z).sum(dim=-1)
        if self.hidden_aggregation_method == "mean":
            log_p = log_p / z.shape[-1]
            log_q = log_q / z.shape[-1]
        log_p, log_q = log_p.transpose(0, 1), log_q.transpose(0, 1)  # [B, S]
        return {"loss": -0.5 * (log_p + log_q), "log_prob_P_z": log_p, "log_prob_q_z_given_x": log_q}


class MegatronVAEHiddenLoss(MegatronBaseHiddenLoss):
    """``vae``: ``KL(q(z|x) || N(0, I))`` per position (arXiv:1312.6114), to be *minimized*.

    ``kl_estimator``:

    * ``closed_form``: ``1/2 * sum_h(mean^2 + exp(logvar) - 1 - logvar)`` from ``z_mean`` and
      ``z_logvar`` (exact, no sampling noise);
    * ``sample``: the single-sample estimate ``log q(z|x) - log P(z)`` from ``z`` and ``z_log_prob``
      (can be negative for one sample); logs ``log_prob_P_z`` and ``log_prob_q_z_given_x`` too;
    * ``auto`` (default): ``closed_form`` when ``z_mean`` and ``z_logvar`` are produced by an
      earlier transform (``cond_gaussian`` does), else ``sample``.

    ``loss = +KL`` (NeMo returns ``-KL``, which the minimized joint loss would *increase*).
    ``min_kl_value`` (free bits): when set, ``loss = max(KL, min_kl_value)`` per position (KL summed
    over H), so positions whose KL is below the floor get no gradient from this loss. The logged
    ``kl_div`` is the KL before the floor.
    """

    def __init__(self, loss_weight: float = 1.0, min_kl_value: Optional[float] = None, kl_estimator: str = "auto",
                 name: str = "vae"):
        super().__init__(loss_weight=loss_weight, name=name)
        self.min_kl_value = None if min_kl_value is None else as_float(min_kl_value, "min_kl_value")
        if kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"kl_estimator={kl_estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}")
        self.kl_estimator = kl_estimator
        self._mode = None if kl_estimator == "auto" else kl_estimator

    def resolve_inputs(self, available: Collection[str]) -> None:
        if self.kl_estimator == "auto":
            self._mode = "closed_form" if {"z_mean", "z_logvar"} <= set(available) else "sample"
        super().resolve_inputs(available)

    @property
    def mode(self) -> str:
        """The estimator in use: ``closed_form`` or ``sample`` (``auto`` resolved)."""
        return self._mode or "closed_form"

    def _input_names(self) -> List[str]:
        return ["z_mean", "z_logvar"] if self.mode == "closed_form" else ["z", "z_log_prob"]

    @property
    def output_names(self) -> List[str]:
        return ["kl_div"] if self.mode == "closed_form" else ["kl_div", "log_prob_P_z", "log_prob_q_z_given_x"]

    def _loss(self, inputs: Dict[str, torch.Tensor], batch_data: Optional[Mapping] = None) -> Dict[str, torch.Tensor]:
        who = f"vae loss {self.name!r}"
        out: Dict[str, torch.Tensor] = {}
        if self.mode == "closed_form":
            mean, logvar = inputs["z_mean"], inputs["z_logvar"]
            if not isinstance(mean, torch.Tensor) or mean.dim() != 3 or getattr(logvar, "shape", None) != mean.shape:
                raise DataError(f"{who}: 'z_mean' and 'z_logvar' must be [S, B, H] tensors of the same shape")
            mean, logvar = mean.float(), logvar.float()
            kl = 0.5 * (mean * mean + torch.exp(logvar) - 1.0 - logvar).sum(dim=-1).transpose(0, 1)  # [B, S]
        else:
            z = _get_z(inputs, who)
            log_q = _get_log_prob(inputs, z, who).transpose(0, 1)
            log_p = unit_normal_log_prob(z).sum(dim=-1).transpose(0, 1)
            kl = log_q - log_p
            out["log_prob_P_z"] = log_p
            out["log_prob_q_z_given_x"] = log_q
        out["kl_div"] = kl
        out["loss"] = kl if self.min_kl_value is None else torch.clamp(kl, min=self.min_kl_value)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, min_kl_value={self.min_kl_value}, kl_estimator={self.mode!r}"


class MegatronGuidedClsHiddenLoss(MegatronBaseHiddenLoss):
    """``guided_cls_loss``: supervises a per-sample prediction (``input_name``, e.g. a ``guided_cls``
    output) with the batch attribute ``attr_name`` (default: ``input_name``).

    * prediction ``[B, C]`` (logits): cross-entropy against integer class ids ``[B]``; a negative id
      means "no label" and the sample is left out;
    * prediction ``[B]`` (regression): squared error against float targets ``[B]``; a NaN target
      means "no label" and the sample is left out.

    The loss is averaged over the labelled samples. The batch (``batch_data``) must hold
    ``attr_name``; for BART data list it in ``model.data.attribute_keys``.
    """

    def __init__(self, input_name: str, attr_name: Optional[str] = None, loss_weight: float = 1.0,
                 name: str = "guided_cls_loss"):
        super().__init__(loss_weight=loss_weight, name=name)
        if not isinstance(input_name, str) or not input_name:
            raise ConfigError(f"input_name={input_name!r}: expected the name of a per-sample prediction")
        if attr_name is not None and (not isinstance(attr_name, str) or not attr_name):
            raise ConfigError(f"attr_name={attr_name!r}: expected a batch attribute name (or null for input_name)")
        self.input_name = input_name
        self.attr_name = attr_name if attr_name is not None else input_name

    def _input_names(self) -> List[str]:
        return [self.input_name]

    def _target(self, batch_data: Optional[Mapping], batch: int, device) -> torch.Tensor:
        who = f"guided_cls_loss {self.name!r}"
        if batch_data is None or not isinstance(batch_data, Mapping) or self.attr_name not in batch_data:
            keys = sorted(batch_data) if isinstance(batch_data, Mapping) else None
            raise DataError(f"{who} needs the batch attribute {self.attr_name!r} (the target of {self.input_name!r}), "
                            f"but the batch has {'no data' if keys is None else f'keys {keys}'}; add the attribute to "
                            f"the data (e.g. model.data.attribute_keys) or set attr_name")
        target = torch.as_tensor(batch_data[self.attr_name], device=device)
        if target.numel() != batch:
            raise DataError(f"{who}: batch attribute {self.attr_name!r} has shape {tuple(target.shape)}; expected one "
                            f"value per sample ({batch})")
        return target.reshape(batch)

    def _loss(self, inputs: Dict[str, torch.Tensor], batch_data: Optional[Mapping] = None) -> Dict[str, torch.Tensor]:
        who = f"guided_cls_loss {self.name!r}"
        pred = inputs[self.input_name]
        if not isinstance(pred, torch.Tensor) or pred.dim() not in (1, 2):
            raise DataError(f"{who}: input {self.input_name!r} must be logits [B, C] or values [B], got "
                            f"{tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__}")
        batch = pred.shape[0]
        target = self._target(batch_data, batch, pred.device)
        pred = pred.float()
        if pred.dim() == 2:
            if target.is_floating_point():
                if not torch.equal(target, target.round()):
                    raise DataError(f"{who}: batch attribute {self.attr_name!r} must hold integer class ids for "
                                    f"the logits {self.input_name!r} [B, C={pred.shape[1]}], got {target.tolist()}")
            target = target.long()
            valid = target >= 0
            if bool((target >= pred.shape[1]).any()):
                raise DataError(f"{who}: batch attribute {self.attr_name!r} has class ids {target.tolist()} outside "
                                f"[0, {pred.shape[1]}) (num_classes={pred.shape[1]})")
            loss = F.cross_entropy(pred, target.clamp(min=0), reduction="none")
        else:
            target = target.float()
            valid = ~torch.isnan(target)
            loss = (pred - torch.nan_to_num(target, nan=0.0)) ** 2
        return {"loss": loss, "valid": valid}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input_name={self.input_name!r}, attr_name={self.attr_name!r}"


__all__ = [
    "MegatronAMIMHiddenLoss",
    "MegatronVAEHiddenLoss",
    "MegatronGuidedClsHiddenLoss",
    "unit_normal_log_prob",
    "HIDDEN_AGGREGATION_METHODS",
    "KL_ESTIMATORS",
]

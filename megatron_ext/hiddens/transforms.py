"""Built-in hidden transformations: ``cond_gaussian`` and ``guided_cls``.

Tensor parallelism: both use plain ``torch.nn.Linear`` layers whose weights are *replicated* on
every tensor-parallel rank (the encoder output they read is replicated too, so every TP rank
computes the same values and gets the same gradients; no TP communication is needed).
megatron-core's ``ColumnParallelLinear(gather_output=True)`` - what NeMo uses - needs CUDA
buffers (see DESIGN.md), and the heads are small (``H x 2H``), so replication costs little.
Random draws (the reparameterization noise) use the default torch generator, which is the same on
all TP ranks of a data-parallel replica, so the sampled ``z`` is identical across TP ranks.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ext.errors import ConfigError, DataError
from megatron_ext.hiddens.base import MegatronBaseHiddenTransform, as_float, as_pos_int

LOG_2PI = math.log(2.0 * math.pi)


def _check_name(value, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what}={value!r}: expected a non-empty output name")
    return value


def _check_sbh(x, what: str, hidden_size: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != hidden_size:
        raise DataError(f"{what}: expected a [S, B, H={hidden_size}] tensor (Megatron layout), got "
                        f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    return x


class MegatronGaussianHiddenTransform(MegatronBaseHiddenTransform):
    """``cond_gaussian``: a diagonal Gaussian posterior q(z|x) with reparameterized sampling.

    A linear head ``H -> 2H`` (weights ~ normal(0, ``init_method_std``), bias 0) maps the input
    ``[S, B, H]`` to ``z_mean`` and the raw log-variance; ``z_logvar = clamp(raw, min=min_logvar)``
    (never below ``min_logvar``; the gradient is zero where the floor is active).

    * training (or ``sample_at_eval=True``): ``z = z_mean + exp(z_logvar / 2) * eps``, eps ~ N(0, I);
    * evaluation: ``z = z_mean`` (the posterior mode).

    ``z_log_prob = log N(z; z_mean, exp(z_logvar))`` summed over H -> ``[S, B]`` (fp32); since
    ``(z - mean) / std = eps`` it is computed from eps, so it depends on the log-variance only.

    Inputs ``[input_name]`` (default ``hiddens``); outputs ``z_mean``, ``z_logvar``, ``z`` (``[S, B, H]``,
    the input dtype) and ``z_log_prob`` (``[S, B]``). ``ffn_hidden_size`` (NeMo's name for the head
    width) must be ``2 * hidden_size`` or null: the head is split into two halves of size H.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: Optional[int] = None,
        min_logvar: float = -6.0,
        init_method_std: float = 0.02,
        sample_at_eval: bool = False,
        input_name: str = "hiddens",
        name: str = "cond_gaussian",
        model_parallel_cfg=None,
    ):
        super().__init__(name=name, model_parallel_cfg=model_parallel_cfg)
        self.hidden_size = as_pos_int(hidden_size, "hidden_size")
        if ffn_hidden_size is not None and ffn_hidden_size != 2 * self.hidden_size:
            raise ConfigError(
                f"ffn_hidden_size={ffn_hidden_size!r}: cond_gaussian's head outputs the mean and the log-variance, "
                f"H={self.hidden_size} each, so it must be 2*hidden_size={2 * self.hidden_size} (or null)")
        self.min_logvar = as_float(min_logvar, "min_logvar")
        std = as_float(init_method_std, "init_method_std")
        if std < 0:
            raise ConfigError(f"init_method_std={init_method_std!r}: expected >= 0")
        if not isinstance(sample_at_eval, bool):
            raise ConfigError(f"sample_at_eval={sample_at_eval!r}: expected true or false")
        self.sample_at_eval = sample_at_eval
        self.input_name = _check_name(input_name, "input_name")
        if self.input_name == "hiddens_mask":
            raise ConfigError("input_name='hiddens_mask': expected a [S, B, H] output such as 'hiddens'")
        self.head = nn.Linear(self.hidden_size, 2 * self.hidden_size, bias=True)
        with torch.no_grad():
            nn.init.normal_(self.head.weight, mean=0.0, std=std)
            nn.init.zeros_(self.head.bias)

    @property
    def input_names(self) -> List[str]:
        return [self.input_name]

    @property
    def output_names(self) -> List[str]:
        return ["z_mean", "z_logvar", "z", "z_log_prob"]

    def _transform(self, inputs: Dict[str, torch.Tensor], batch_data: Optional[Mapping] = None) -> Dict[str, torch.Tensor]:
        x = _check_sbh(inputs[self.input_name], f"cond_gaussian {self.name!r} input {self.input_name!r}", self.hidden_size)
        z_mean, raw_logvar = self.head(x).chunk(2, dim=-1)
        z_logvar = raw_logvar.clamp(min=self.min_logvar)
        mean32, logvar32 = z_mean.float(), z_logvar.float()
        if self.training or self.sample_at_eval:
            eps = torch.randn_like(mean32)
            z32 = mean32 + torch.exp(0.5 * logvar32) * eps
            z_log_prob = -0.5 * (LOG_2PI + logvar32 + eps * eps).sum(dim=-1)
        else:
            z32 = mean32
            z_log_prob = -0.5 * (LOG_2PI + logvar32).sum(dim=-1)
        return {"z_mean": z_mean, "z_logvar": z_logvar, "z": z32.to(x.dtype), "z_log_prob": z_log_prob}

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, hidden_size={self.hidden_size}, min_logvar={self.min_logvar}, "
                f"sample_at_eval={self.sample_at_eval}")


class MegatronGuidedClsHiddenTransform(MegatronBaseHiddenTransform):
    """``guided_cls``: predicts a per-sample attribute (``attr_name``) from a ``[S, B, H]`` output.

    The input (``input_name``, default ``hiddens``) is averaged over the valid positions of
    ``hiddens_mask`` -> ``[B, H]``, then an MLP ``H -> ffn_hidden_size (default H) -> GELU -> C``
    gives the output ``output_name`` (default: ``attr_name``, so a ``guided_cls_loss`` with
    ``input_name: <attr>`` compares it with ``batch[<attr>]``):

    * ``num_classes: C >= 2``: classification logits ``[B, C]``;
    * ``num_classes: null`` (default): a regression value ``[B]``.
    """

    def __init__(
        self,
        hidden_size: int,
        attr_name: str,
        input_name: str = "hiddens",
        num_classes: Optional[int] = None,
        output_name: Optional[str] = None,
        ffn_hidden_size: Optional[int] = None,
        init_method_std: float = 0.02,
        name: str = "guided_cls",
        model_parallel_cfg=None,
    ):
        super().__init__(name=name, model_parallel_cfg=model_parallel_cfg)
        self.hidden_size = as_pos_int(hidden_size, "hidden_size")
        self.attr_name = _check_name(attr_name, "attr_name")
        self.input_name = _check_name(input_name, "input_name")
        if self.input_name == "hiddens_mask":
            raise ConfigError("input_name='hiddens_mask': expected a [S, B, H] output such as 'hiddens' or 'z'")
        if num_classes is not None:
            num_classes = as_pos_int(num_classes, "num_classes")
            if num_classes < 2:
                raise ConfigError(f"num_classes={num_classes}: expected >= 2 classes, or null for a regression "
                                  f"(a single predicted value)")
        self.num_classes = num_classes
        self.output_name = _check_name(output_name if output_name is not None else self.attr_name, "output_name")
        ffn = self.hidden_size if ffn_hidden_size is None else as_pos_int(ffn_hidden_size, "ffn_hidden_size")
        std = as_float(init_method_std, "init_method_std")
        if std < 0:
            raise ConfigError(f"init_method_std={init_method_std!r}: expected >= 0")
        self.fc1 = nn.Linear(self.hidden_size, ffn)
        self.fc2 = nn.Linear(ffn, num_classes if num_classes is not None else 1)
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                nn.init.normal_(layer.weight, mean=0.0, std=std)
                nn.init.zeros_(layer.bias)

    @property
    def input_names(self) -> List[str]:
        return [self.input_name, "hiddens_mask"]

    @property
    def output_names(self) -> List[str]:
        return [self.output_name]

    def _transform(self, inputs: Dict[str, torch.Tensor], batch_data: Optional[Mapping] = None) -> Dict[str, torch.Tensor]:
        what = f"guided_cls {self.name!r} input {self.input_name!r}"
        x = _check_sbh(inputs[self.input_name], what, self.hidden_size)
        mask = inputs["hiddens_mask"]
        if tuple(mask.shape) != (x.shape[1], x.shape[0]):
            raise DataError(f"{what}: shape {tuple(x.shape)} does not match hiddens_mask {tuple(mask.shape)} "
                            f"(expected [S, B, H] and [B, S])")
        valid = mask.bool().transpose(0, 1).unsqueeze(-1)  # [S, B, 1]
        total = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=0)
        pooled = total / valid.sum(dim=0).clamp(min=1).to(x.dtype)  # [B, H] masked mean over S
        out = self.fc2(F.gelu(self.fc1(pooled)))
        if self.num_classes is None:
            out = out.squeeze(-1)
        return {self.output_name: out}

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, input_name={self.input_name!r}, attr_name={self.attr_name!r}, "
                f"num_classes={self.num_classes}, output_name={self.output_name!r}")


__all__ = ["MegatronGaussianHiddenTransform", "MegatronGuidedClsHiddenTransform", "LOG_2PI"]

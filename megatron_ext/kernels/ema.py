"""Fused multi-dimensional damped EMA: validation, the autograd Function and the decoding step.

The kernels take the *effective coefficients* (computed from the module parameters in PyTorch, so
autograd maps their gradients back to delta / alpha / beta / gamma)::

    pb = p * beta,  q = 1 - p * a,  g = gamma * scale          each [kd, N]

with ``kd = D`` (causal) or ``2D`` (bidirectional: channels ``D..2D-1`` run backward in time), and
compute, for x ``[B, D, L]`` and an optional prior state h0 ``[B, D, N]`` (causal only)::

    h_t = q * h_{t-1} + pb * x_t,   y_t = sum_n g * h_t          (y [B, D, L])

(the bidirectional y adds the backward-in-time EMA of channels ``D..2D-1``).  y is the EMA part of
MultiHeadEMA, before ``+ omega * x`` and silu.  y and the state are float32 (float64 for float64
inputs); x may also be float16 / bfloat16 (with float32 coefficients).  Truncation is not supported.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from megatron_ext.kernels import _build
from megatron_ext.kernels._build import KernelUnavailableError

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_COEF_DTYPES = (torch.float32, torch.float64)


def _device_kind(device: Union[torch.device, str]) -> str:
    return torch.device(device).type


def unavailable_reason(device: Union[torch.device, str] = "cpu") -> Optional[str]:
    """None when the fused kernel runs on ``device`` (building / loading it on first use), else why not."""
    kind = _device_kind(device)
    if kind not in ("cpu", "cuda"):
        return f"no fused EMA kernel for device type {kind!r} (only cpu and cuda)"
    return _build.library_status(kind)[1]


def is_available(device: Union[torch.device, str] = "cpu") -> bool:
    return unavailable_reason(device) is None


def _ops(device: torch.device):
    reason = unavailable_reason(device)
    if reason is not None:
        raise KernelUnavailableError(f"fused EMA kernel unavailable on {torch.device(device)}: {reason}")
    return getattr(torch.ops, _build.OP_NAMESPACE)


# ---------------------------------------------------------------------------- validation
def _check_tensor(name: str, t, dtypes) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"ema_scan: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"ema_scan: expected {name} of dtype {allowed}, got {str(t.dtype).replace('torch.', '')}")


def check_inputs(x: Tensor, pb: Tensor, q: Tensor, g: Tensor, h0: Optional[Tensor] = None,
                 bidirectional: bool = False, return_state: bool = False) -> None:
    """Raise TypeError / ValueError naming what was expected for bad kernel inputs."""
    _check_tensor("x", x, _X_DTYPES)
    for name, t in (("pb", pb), ("q", q), ("g", g)):
        _check_tensor(name, t, _COEF_DTYPES)
    if x.dim() != 3:
        raise ValueError(f"ema_scan: expected x of shape [batch, channels, length] (3 dims), got {tuple(x.shape)}")
    bsz, d, _ = x.shape
    kd = 2 * d if bidirectional else d
    n = pb.shape[-1] if pb.dim() == 2 else None
    for name, t in (("pb", pb), ("q", q), ("g", g)):
        if t.dim() != 2 or t.shape[0] != kd or (n is not None and t.shape[1] != n) or t.shape[-1] < 1:
            what = "2 * channels" if bidirectional else "channels"
            raise ValueError(f"ema_scan: expected {name} of shape [kd, N] with kd = {what} = {kd} "
                             f"(and one N for pb, q, g), got {tuple(t.shape)}")
    if not (pb.dtype == q.dtype == g.dtype):
        raise TypeError(f"ema_scan: expected pb, q, g of one dtype, got {pb.dtype}, {q.dtype}, {g.dtype}")
    if (x.dtype == torch.float64) != (pb.dtype == torch.float64):
        raise TypeError(f"ema_scan: expected float64 coefficients with float64 x and float32 coefficients "
                        f"otherwise, got x {x.dtype} with coefficients {pb.dtype}")
    for name, t in (("pb", pb), ("q", q), ("g", g)):
        if t.device != x.device:
            raise ValueError(f"ema_scan: expected {name} on x's device {x.device}, got {t.device}")
    if bidirectional and (h0 is not None or return_state):
        raise ValueError("ema_scan: a bidirectional EMA carries no state (h0 / return_state need bidirectional=False)")
    if h0 is not None:
        _check_tensor("h0", h0, _X_DTYPES)
        if tuple(h0.shape) != (bsz, d, n):
            raise ValueError(f"ema_scan: expected h0 of shape [batch, channels, N] = {(bsz, d, n)}, got {tuple(h0.shape)}")
        if h0.device != x.device:
            raise ValueError(f"ema_scan: expected h0 on x's device {x.device}, got {h0.device}")


# ------------------------------------------------------------------------ autograd Function
class EMAScanFunction(torch.autograd.Function):
    """``(y, h_last) = EMAScanFunction.apply(x, pb, q, g, h0, bidirectional, return_state)``.

    Returns ``y`` alone when ``return_state`` is False.  Backward gives dx, dpb, dq, dg and dh0 (the
    kernel's reverse adjoint scan plus a forward sensitivity scan; nothing but the inputs is saved).
    Call :func:`ema_scan` for validated inputs.
    """

    @staticmethod
    def forward(ctx, x, pb, q, g, h0, bidirectional, return_state):
        ops = _ops(x.device)
        y, h_last = ops.ema_fwd(x, pb, q, g, h0, bool(bidirectional), bool(return_state))
        ctx.bidirectional = bool(bidirectional)
        ctx.has_h0 = h0 is not None
        ctx.save_for_backward(x, pb, q, g, h0)
        ctx.set_materialize_grads(False)
        if return_state:
            return y, h_last
        return y

    @staticmethod
    def backward(ctx, dy, dh_last=None):
        x, pb, q, g, h0 = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros(x.shape, dtype=pb.dtype, device=x.device)
        need_dh0 = ctx.has_h0 and ctx.needs_input_grad[4]
        ops = _ops(x.device)
        dx, dpb, dq, dg, dh0 = ops.ema_bwd(dy, x, pb, q, g, h0, dh_last, ctx.bidirectional, need_dh0)
        nig = ctx.needs_input_grad
        return (dx if nig[0] else None, dpb if nig[1] else None, dq if nig[2] else None,
                dg if nig[3] else None, dh0.to(h0.dtype) if need_dh0 else None, None, None)


def ema_scan(x: Tensor, pb: Tensor, q: Tensor, g: Tensor, h0: Optional[Tensor] = None,
             bidirectional: bool = False, return_state: bool = False
             ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Fused EMA of x ``[B, D, L]`` (see the module docstring); differentiable in all tensor inputs.

    Returns y ``[B, D, L]`` (float32, float64 for float64 inputs; a view of a channels-last buffer),
    or ``(y, h_last)`` with ``h_last [B, D, N]`` when ``return_state``.  Raises TypeError / ValueError
    for bad inputs and :class:`KernelUnavailableError` when no kernel can run on x's device.
    """
    check_inputs(x, pb, q, g, h0, bidirectional, return_state)
    return EMAScanFunction.apply(x, pb, q, g, h0, bool(bidirectional), bool(return_state))


def ema_step(x: Tensor, pb: Tensor, q: Tensor, g: Tensor, h0: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One incremental-decoding step: x ``[B, D]``, h0 ``[B, D, N]`` or None (zeros), causal coefficients
    ``[D, N]``.  Returns ``(y [B, D], h1 [B, D, N])`` with ``h1 = q * h0 + pb * x``, ``y = sum_n g * h1``.

    Uses the single-step kernel when no gradient is needed, else the differentiable scan with L = 1.
    """
    if not isinstance(x, Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"ema_step: expected x of shape [batch, channels], got {got}")
    check_inputs(x.unsqueeze(-1), pb, q, g, h0, False, True)
    tensors = (x, pb, q, g) + ((h0,) if h0 is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        y, h1 = EMAScanFunction.apply(x.unsqueeze(-1), pb, q, g, h0, False, True)
        return y.squeeze(-1), h1
    return _ops(x.device).ema_step(x, h0, pb, q, g)


def cpu_isa() -> str:
    """The CPU kernel variant in use ("avx512", "avx2" or "generic"); builds the CPU library if needed."""
    return _ops(torch.device("cpu")).cpu_isa()

"""Multi-dimensional damped exponential moving average (EMA) of Mega (Ma et al., 2022).

Shapes and parameters
---------------------
``D = embed_dim`` channels, each expanded into ``N = ndim`` EMA lanes.  The parameters are
sized by ``kernel_dim``: ``D`` for a causal (one-directional) EMA, ``2D`` for a bidirectional
one (channels ``0..D-1`` run forward in time, channels ``D..2D-1`` backward).  The names
follow fairseq:

=========  ======================  =====================================================
name       shape                   meaning
=========  ======================  =====================================================
``delta``  ``[kernel_dim, N, 1]``  ``p = sigmoid(delta)``: the EMA weight (the paper's alpha)
``alpha``  ``[kernel_dim, N, 1]``  ``a = sigmoid(alpha)``: the damping (the paper's delta)
``beta``   ``[kernel_dim, N, 1]``  expansion of the input into the N lanes
``gamma``  ``[kernel_dim, N]``     projection of the N lanes back to one value
``omega``  ``[D]``                 weight of the residual term ``omega * x``
=========  ======================  =====================================================

(``delta`` plays the paper's alpha and ``alpha`` the paper's delta, as in fairseq and
Hugging Face.)  ``scale = sqrt(1 / N)``.

Math
----
With ``p = sigmoid(delta)``, ``a = sigmoid(alpha)`` and the decay ``q = 1 - p * a`` (in (0, 1)),
each channel ``d`` runs ``N`` damped EMAs over its input ``x_t``::

    h_t[n] = q[n] * h_{t-1}[n] + p[n] * beta[n] * x_t          (state h: [B, D, N])
    y_t    = sum_n gamma[n] * scale * h_t[n]

Unrolled, this is a causal convolution ``y = K * x`` with the kernel::

    K[d, l] = sum_n gamma[d, n] * scale * p[d, n] * beta[d, n] * q[d, n] ** l,   l = 0 .. L-1

where ``q ** l`` is computed as ``exp(l * log q)`` (Vandermonde form) in fp32 (fp64 for fp64
inputs).  ``truncation`` caps the kernel length at ``min(truncation, L)`` (the kernel is zero
beyond it).  A bidirectional EMA has a forward kernel ``K1`` and a backward kernel ``K2``::

    y_t = sum_{j>=0} K1[j] * x_{t-j} + sum_{j>=0} K2[j] * x_{t+j}    (K1[0] and K2[0] both weight x_t)

The module output is ``silu(y + omega * x)``, ``[B, L, D]``, in the dtype of ``x``.  Padded
positions (``padding_mask`` False/0) are zeroed before the EMA; the residual ``omega * x`` uses
the input as given (as in fairseq / Hugging Face).

Incremental decoding (causal only): with a prior state ``h0`` (the hidden state after the
previous tokens) a chunk of length L gives::

    y[l]  = (K * x)[l] + sum_n gamma[n] * scale * q[n] ** (l + 1) * h0[n]
    h_L   = sum_l p * beta * q ** (L - 1 - l) * x[l] + q ** L * h0

so processing a sequence chunk by chunk (any chunk sizes, including 1 = one decoding step)
gives the same result as processing it at once.  A bidirectional EMA, or one with
``truncation`` (whose windowed kernel is not a finite-state recurrence), cannot carry a state.

Implementations (``impl``, changeable after construction)
---------------------------------------------------------
``"fft"``   FFT convolution: ``irfft(rfft(x, 2L) * rfft(K, 2L))[:L]`` (the 2L padding makes the
            circular convolution linear; a bidirectional kernel is laid out circularly in the
            same 2L buffer).  Work O(D*N*L) for the kernel plus O(B*D*L*log L) for the
            convolution, O(log L) depth: the training / encoding path.
``"scan"``  the plain sequential recurrence above, a Python loop over time on the
            ``[B, kernel_dim, N]`` lanes.  Work O(B*D*N*L) but L sequential steps: slow, the
            reference path (truncation is applied as a sliding-window recurrence that
            subtracts ``q**T * p * beta * x_{t-T}``).
``"fused"`` the C++ / CUDA kernel of :mod:`megatron_ext.kernels` (csrc/, JIT-built and cached):
            the recurrence vectorized over channels and lanes (CPU) or a chunked scan (CUDA),
            fp32 accumulation, backward by an adjoint scan; ``omega * x`` and silu stay in
            PyTorch.  No truncation.  Raises (KernelUnavailableError / ValueError) when it cannot
            run, saying why.  Decoding steps without autograd use the single-step kernel.
``"auto"``  ``"fused"`` when the kernel is built (or buildable) for the input's device and the
            module has no truncation, else ``"fft"`` with one warning per process and reason
            (:class:`EMAKernelFallbackWarning`) saying why.

All EMA arithmetic runs in fp32 (fp64 for fp64 inputs) with autocast disabled; the output is
cast back to the input dtype.  The coefficients and kernel are recomputed on every call (no
eval-mode cache).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# EMA_IMPLS: the pure-PyTorch implementations (tests compare them); every accepted ``impl`` is in EMA_IMPL_CHOICES
# (both defined in config/, with the other allowed values).
from megatron_ext import kernels
from megatron_ext.config.model_validation import EMA_IMPL_CHOICES, EMA_IMPLS


class EMAKernelFallbackWarning(UserWarning):
    """impl="auto" fell back from the fused kernel to the FFT path (issued once per process and reason)."""


_FALLBACK_WARNED: set = set()


def _warn_fallback(device_type: str, reason: str) -> None:
    key = (device_type, reason)
    if key in _FALLBACK_WARNED:
        return
    _FALLBACK_WARNED.add(key)
    warnings.warn(
        f"MultiHeadEMA: impl='auto' uses the PyTorch FFT path instead of the fused EMA kernel on "
        f"{device_type}: {reason}",
        EMAKernelFallbackWarning,
        stacklevel=3,  # MultiHeadEMA.forward
    )


class MultiHeadEMA(nn.Module):
    """Mega's multi-dimensional damped EMA followed by ``silu(ema(x) + omega * x)``.

    Args:
        embed_dim: number of channels D (last dim of the input).
        ndim: number of EMA lanes N per channel.
        bidirectional: forward + backward EMA (parameters for 2D channels); no incremental state.
        truncation: cap the kernel length at ``min(truncation, L)``; None = no cap.
        impl: ``"fft"`` (default), ``"scan"`` (sequential reference), ``"fused"`` (C++/CUDA kernel) or
            ``"auto"`` (fused when available, else fft); see the module docstring.
    """

    def __init__(
        self,
        embed_dim: int,
        ndim: int = 16,
        bidirectional: bool = False,
        truncation: Optional[int] = None,
        impl: str = "fft",
    ):
        super().__init__()
        if int(embed_dim) < 1:
            raise ValueError(f"MultiHeadEMA: embed_dim must be >= 1, got {embed_dim}")
        if int(ndim) < 1:
            raise ValueError(f"MultiHeadEMA: ndim must be >= 1, got {ndim}")
        if truncation is not None and int(truncation) < 1:
            raise ValueError(f"MultiHeadEMA: truncation must be None or >= 1, got {truncation}")
        self.embed_dim = int(embed_dim)
        self.ndim = int(ndim)
        self.bidirectional = bool(bidirectional)
        self.truncation = None if truncation is None else int(truncation)
        self.impl = impl  # validated by the property setter
        self.kernel_dim = 2 * self.embed_dim if self.bidirectional else self.embed_dim
        self.scale = math.sqrt(1.0 / self.ndim)

        kd, n = self.kernel_dim, self.ndim
        self.delta = nn.Parameter(torch.empty(kd, n, 1))
        self.alpha = nn.Parameter(torch.empty(kd, n, 1))
        self.beta = nn.Parameter(torch.empty(kd, n, 1))
        self.gamma = nn.Parameter(torch.empty(kd, n))
        self.omega = nn.Parameter(torch.empty(self.embed_dim))
        self.reset_parameters()

    # ------------------------------------------------------------------ config
    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in EMA_IMPL_CHOICES:
            raise ValueError(f"MultiHeadEMA: impl must be one of {', '.join(EMA_IMPL_CHOICES)}, got {value!r}")
        self._impl = value

    def reset_parameters(
        self, delta_alpha_range: float = 0.2, beta_range: float = 0.02, gamma_omega_range: float = 1.0
    ) -> None:
        """delta, alpha ~ N(0, delta_alpha_range); beta ~ N(0, beta_range) + [1, -1, 1, ...] over
        the N lanes; gamma, omega ~ N(0, gamma_omega_range)."""
        with torch.no_grad():
            nn.init.normal_(self.delta, mean=0.0, std=delta_alpha_range)
            nn.init.normal_(self.alpha, mean=0.0, std=delta_alpha_range)
            sign = torch.ones(self.ndim, 1, dtype=self.beta.dtype, device=self.beta.device)
            sign[1::2] = -1.0
            nn.init.normal_(self.beta, mean=0.0, std=beta_range)
            self.beta.add_(sign)
            nn.init.normal_(self.gamma, mean=0.0, std=gamma_omega_range)
            nn.init.normal_(self.omega, mean=0.0, std=gamma_omega_range)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, ndim={self.ndim}, bidirectional={self.bidirectional}, "
            f"truncation={self.truncation}, impl={self.impl!r}"
        )

    # ------------------------------------------------------------ coefficients
    def coefficients(self, dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
        """``(p, q)`` = ``(sigmoid(delta), 1 - sigmoid(delta) * sigmoid(alpha))``, each
        ``[kernel_dim, N, 1]`` in ``dtype``."""
        p = torch.sigmoid(self.delta.to(dtype))
        a = torch.sigmoid(self.alpha.to(dtype))
        q = 1.0 - p * a
        return p, q

    def _powers(self, q: Tensor, length: int) -> Tensor:
        """``q ** l`` for ``l = 0 .. length-1`` as ``exp(l * log q)``: ``[kernel_dim, N, length]``."""
        # q is in (0, 1) mathematically; guard log(0) if p * a rounds to exactly 1.
        log_q = torch.log(q.clamp_min(torch.finfo(q.dtype).tiny))
        steps = torch.arange(length, device=q.device, dtype=q.dtype)
        return torch.exp(log_q * steps)

    def kernel_length(self, seq_len: int) -> int:
        return seq_len if self.truncation is None else min(self.truncation, seq_len)

    def compute_kernel(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """The EMA kernel ``K[d, l]``, ``[kernel_dim, min(truncation, seq_len)]`` in ``dtype``."""
        p, q = self.coefficients(dtype)
        length = self.kernel_length(seq_len)
        vander = self._powers(q, length)  # [kd, N, T]
        weight = (p * self.beta.to(dtype)).squeeze(-1) * (self.gamma.to(dtype) * self.scale)  # [kd, N]
        return torch.einsum("dn,dnl->dl", weight, vander)

    # -------------------------------------------------------------- validation
    def _check_inputs(self, x: Tensor, padding_mask: Optional[Tensor], state: Optional[Tensor],
                      return_state: bool) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"MultiHeadEMA: expected x of shape [batch, seq_len, embed_dim] (3 dims), got {got}")
        bsz, seq_len, dim = x.shape
        if dim != self.embed_dim:
            raise ValueError(
                f"MultiHeadEMA: expected the last dim of x to be embed_dim={self.embed_dim}, "
                f"got x of shape {tuple(x.shape)}"
            )
        if padding_mask is not None and tuple(padding_mask.shape) != (bsz, seq_len):
            raise ValueError(
                f"MultiHeadEMA: expected padding_mask of shape [batch, seq_len] = {(bsz, seq_len)}, "
                f"got {tuple(padding_mask.shape)}"
            )
        if state is not None or return_state:
            if self.bidirectional:
                raise ValueError(
                    "MultiHeadEMA: a bidirectional EMA cannot be decoded incrementally "
                    "(state / return_state need bidirectional=False)"
                )
            if self.truncation is not None:
                raise ValueError(
                    "MultiHeadEMA: state / return_state are not supported with truncation "
                    f"(truncation={self.truncation}); the truncated kernel is not a finite-state recurrence"
                )
        if state is not None and tuple(state.shape) != (bsz, self.embed_dim, self.ndim):
            raise ValueError(
                f"MultiHeadEMA: expected state of shape [batch, embed_dim, ndim] = "
                f"{(bsz, self.embed_dim, self.ndim)}, got {tuple(state.shape)}"
            )

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        x: Tensor,
        padding_mask: Optional[Tensor] = None,
        state: Optional[Tensor] = None,
        return_state: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """x: ``[B, L, D]``; padding_mask: ``[B, L]`` (True/1 = real token); state: ``[B, D, N]``.

        Returns ``(silu(ema(x) + omega * x)`` as ``[B, L, D]`` in x's dtype, ``new_state`` ``[B, D, N]``
        in fp32 (fp64 for fp64 inputs) when ``return_state`` else None).
        """
        self._check_inputs(x, padding_mask, state, return_state)
        cdtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc = x.to(cdtype)
            residual = xc * self.omega.to(cdtype)
            if padding_mask is not None:
                xc = xc * padding_mask.to(device=x.device, dtype=cdtype).unsqueeze(-1)
            h0 = None if state is None else state.to(device=x.device, dtype=cdtype)
            if x.shape[1] == 0:  # empty chunk: nothing to convolve, the state is unchanged
                y = torch.zeros_like(xc)
                h_new = None
                if return_state:
                    h_new = h0 if h0 is not None else xc.new_zeros(x.shape[0], self.embed_dim, self.ndim)
            else:
                y_t, h_new = self._ema(xc.transpose(1, 2), h0, return_state)  # [B, D, L]
                y = y_t.transpose(1, 2)
            out = F.silu(y + residual).to(x.dtype)
        return out, (h_new if return_state else None)

    def step(self, x_t: Tensor, state: Optional[Tensor] = None,
             padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """One decoding step: x_t ``[B, 1, D]`` or ``[B, D]``; state ``[B, D, N]`` or None (zeros);
        padding_mask ``[B]`` or ``[B, 1]``.  Returns (output shaped like x_t, new state)."""
        squeeze = isinstance(x_t, Tensor) and x_t.dim() == 2
        if squeeze:
            x_t = x_t.unsqueeze(1)
        if isinstance(x_t, Tensor) and x_t.dim() == 3 and x_t.shape[1] != 1:
            raise ValueError(f"MultiHeadEMA.step: expected x_t of shape [batch, 1, embed_dim] or "
                             f"[batch, embed_dim], got {tuple(x_t.shape)}")
        if padding_mask is not None and padding_mask.dim() == 1:
            padding_mask = padding_mask.unsqueeze(1)
        out, h = self.forward(x_t, padding_mask=padding_mask, state=state, return_state=True)
        return (out.squeeze(1) if squeeze else out), h

    # -------------------------------------------------------------- dispatch
    def _ema(self, x: Tensor, h0: Optional[Tensor], return_state: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """EMA of ``x`` ``[B, D, L]`` (masked, compute dtype) -> (``y`` ``[B, D, L]``, state or None)."""
        impl = self.impl
        # One causal step (incremental decoding): the recurrence h = q*h0 + p*beta*x, y = sum(gamma*scale*h) is a
        # handful of [B, D, N] ops, where the FFT path would build a kernel, its powers and three transforms.
        one_step = x.shape[-1] == 1 and not self.bidirectional and self.truncation is None
        if impl == "auto":
            reason = self._fused_unavailable_reason(x)
            if reason is None:
                return self._ema_fused(x, h0, return_state)
            if one_step:
                return self._ema_scan(x, h0, return_state)
            _warn_fallback(x.device.type, reason)
            return self._ema_fft(x, h0, return_state)
        if impl == "fft":
            if one_step:
                return self._ema_scan(x, h0, return_state)
            return self._ema_fft(x, h0, return_state)
        if impl == "scan":
            return self._ema_scan(x, h0, return_state)
        if impl == "fused":
            if self.truncation is not None:
                raise ValueError(
                    f"MultiHeadEMA: impl='fused' does not support truncation (truncation={self.truncation}); "
                    "use impl='fft', 'scan' or 'auto'"
                )
            return self._ema_fused(x, h0, return_state)
        raise ValueError(f"MultiHeadEMA: impl must be one of {', '.join(EMA_IMPL_CHOICES)}, got {self.impl!r}")

    def _fused_unavailable_reason(self, x: Tensor) -> Optional[str]:
        """None when the fused kernel can compute this EMA on x's device, else why not."""
        if self.truncation is not None:
            return f"truncation={self.truncation} is not supported by the fused kernel"

        return kernels.unavailable_reason(x.device)

    def _fused_coefficients(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
        """Effective kernel coefficients ``(p * beta, q, gamma * scale)``, each ``[kernel_dim, N]``."""
        p, q = self.coefficients(dtype)
        pb = (p * self.beta.to(dtype)).squeeze(-1)
        return pb, q.squeeze(-1), self.gamma.to(dtype) * self.scale

    def _ema_fused(self, x: Tensor, h0: Optional[Tensor], return_state: bool) -> Tuple[Tensor, Optional[Tensor]]:
        pb, q, g = self._fused_coefficients(x.dtype)
        if x.shape[-1] == 1 and not self.bidirectional:
            # Decoding step: the single-step kernel (ema_step falls back to the differentiable scan
            # when autograd needs it).
            y, h_new = kernels.ema_step(x[..., 0], pb, q, g, h0=h0)
            return y.unsqueeze(-1), (h_new if return_state else None)
        if return_state:
            y, h_new = kernels.ema_scan(x, pb, q, g, h0=h0, bidirectional=self.bidirectional, return_state=True)
            return y, h_new
        return kernels.ema_scan(x, pb, q, g, h0=h0, bidirectional=self.bidirectional), None

    def _ema_fft(self, x: Tensor, h0: Optional[Tensor], return_state: bool) -> Tuple[Tensor, Optional[Tensor]]:
        seq_len = x.shape[-1]
        n_fft = 2 * seq_len
        d = self.embed_dim
        kernel = self.compute_kernel(seq_len, dtype=x.dtype)  # [kd, T]
        if self.bidirectional:
            # Lay both kernels out circularly in one 2L buffer: K1 at lags 0..L-1, K2 at lags
            # -(L-1)..-1 (i.e. indices L+1..2L-1), K2[0] added to lag 0.  x is zero-padded to 2L,
            # so the two halves never alias.
            k_fwd = F.pad(kernel[:d], (0, seq_len - kernel.shape[-1]))
            k_bwd = F.pad(kernel[d:], (0, seq_len - kernel.shape[-1]))
            kernel = torch.cat(
                [k_fwd[:, :1] + k_bwd[:, :1], k_fwd[:, 1:], k_fwd.new_zeros(d, 1), k_bwd[:, 1:].flip(-1)],
                dim=-1,
            )
        k_f = torch.fft.rfft(kernel, n=n_fft)
        x_f = torch.fft.rfft(x, n=n_fft)
        y = torch.fft.irfft(x_f * k_f, n=n_fft)[..., :seq_len]

        if h0 is None and not return_state:
            return y, None
        # Causal and untruncated here (checked in _check_inputs).
        p, q = self.coefficients(x.dtype)
        powers = self._powers(q, seq_len + 1)  # q^0 .. q^L: [D, N, L+1]
        h_new = None
        if h0 is not None:
            gs = self.gamma.to(x.dtype) * self.scale  # [D, N]
            y = y + torch.einsum("bdn,dnl->bdl", h0 * gs, powers[..., 1:])
        if return_state:
            pb = p * self.beta.to(x.dtype)  # [D, N, 1]
            h_new = torch.einsum("bdl,dnl->bdn", x, pb * powers[..., :seq_len].flip(-1))
            if h0 is not None:
                h_new = h_new + powers[..., seq_len] * h0
        return y, h_new

    def _ema_scan(self, x: Tensor, h0: Optional[Tensor], return_state: bool) -> Tuple[Tensor, Optional[Tensor]]:
        bsz, d, seq_len = x.shape
        p, q = self.coefficients(x.dtype)
        p, q = p.squeeze(-1), q.squeeze(-1)  # [kd, N]
        pb = p * self.beta.to(x.dtype).squeeze(-1)
        gs = self.gamma.to(x.dtype) * self.scale
        # The backward half of a bidirectional EMA is a forward recurrence over the reversed input.
        xs = torch.cat([x, x.flip(-1)], dim=1) if self.bidirectional else x  # [B, kd, L]
        window = self.kernel_length(seq_len)
        drop = pb * q ** window if window < seq_len else None  # weight of x_{t-T} leaving the window

        h = h0 if h0 is not None else x.new_zeros(bsz, self.kernel_dim, self.ndim)
        ys = []
        for t in range(seq_len):
            h = q * h + pb * xs[:, :, t].unsqueeze(-1)
            if drop is not None and t >= window:
                h = h - drop * xs[:, :, t - window].unsqueeze(-1)
            ys.append((h * gs).sum(-1))
        y = torch.stack(ys, dim=-1)  # [B, kd, L]
        if self.bidirectional:
            y = y[:, :d] + y[:, d:].flip(-1)
        return y, (h if return_state else None)


__all__ = ["MultiHeadEMA", "EMA_IMPLS", "EMA_IMPL_CHOICES", "EMAKernelFallbackWarning"]

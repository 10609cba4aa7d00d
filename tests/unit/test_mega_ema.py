"""Tests of megatron_ext.modules.mega_ema.MultiHeadEMA (Mega's multi-dimensional damped EMA)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from helpers import EMA_PARAMS as PARAMS
from helpers import EMA_TOL as TOL
from helpers import make_ema as make
from helpers import random_mask, split_points
from megatron_ext.modules.mega_ema import EMA_IMPLS, MultiHeadEMA


def run(m, impl, x, **kw):
    m.impl = impl
    return m(x, **kw)


def reference(m, x, padding_mask=None, state=None):
    """Independent O(L^2) reference from the formula: an explicit Toeplitz matrix of the kernel,
    built with plain powers q**l in float64 (no shared code with the module's paths)."""
    x = x.double()
    bsz, seq_len, d = x.shape
    n = m.ndim
    p = torch.sigmoid(m.delta.double())[..., 0]
    a = torch.sigmoid(m.alpha.double())[..., 0]
    q = 1 - p * a
    beta = m.beta.double()[..., 0]
    gamma = m.gamma.double() * math.sqrt(1.0 / n)
    window = seq_len if m.truncation is None else min(m.truncation, seq_len)

    def kern(c):  # kernel of channel c, lags 0..L-1 (zero beyond the window)
        return torch.stack([
            (gamma[c] * p[c] * beta[c] * q[c] ** j).sum() if j < window else torch.zeros((), dtype=torch.float64)
            for j in range(seq_len)
        ])

    xm = x if padding_mask is None else x * padding_mask.double().unsqueeze(-1)
    y = torch.zeros(bsz, seq_len, d, dtype=torch.float64)
    for c in range(d):
        k1 = kern(c)
        mat = torch.zeros(seq_len, seq_len, dtype=torch.float64)
        for t in range(seq_len):
            for s in range(seq_len):
                if s <= t:
                    mat[t, s] += k1[t - s]
        if m.bidirectional:
            k2 = kern(d + c)
            for t in range(seq_len):
                for s in range(t, seq_len):
                    mat[t, s] += k2[s - t]
        y[:, :, c] = xm[:, :, c] @ mat.T
        if state is not None:
            for t in range(seq_len):
                y[:, t, c] += (gamma[c] * q[c] ** (t + 1) * state.double()[:, c, :]).sum(-1)
    return F.silu(y + m.omega.double() * x)


# --------------------------------------------------------------------------- construction


def test_parameters_shapes_and_init():
    m = make(embed_dim=6, ndim=4, bidirectional=True)
    assert m.delta.shape == (12, 4, 1) and m.alpha.shape == (12, 4, 1) and m.beta.shape == (12, 4, 1)
    assert m.gamma.shape == (12, 4) and m.omega.shape == (6,)
    assert m.scale == pytest.approx(0.5)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 4, 1)
    assert (m.beta - sign).abs().max() < 0.2  # N(0, 0.02) around the alternating pattern
    m2 = make(embed_dim=6, ndim=4)
    assert m2.delta.shape == (6, 4, 1) and m2.gamma.shape == (6, 4)
    m2.reset_parameters(delta_alpha_range=0.0, beta_range=0.0, gamma_omega_range=0.0)
    assert torch.equal(m2.beta, sign.expand(6, 4, 1))
    assert m2.delta.abs().max() == 0 and m2.omega.abs().max() == 0


def test_kernel_matches_formula():
    m = make(embed_dim=3, ndim=5, dtype=torch.float64)
    k = m.compute_kernel(9, dtype=torch.float64)
    p, q = torch.sigmoid(m.delta), 1 - torch.sigmoid(m.delta) * torch.sigmoid(m.alpha)
    expect = torch.stack([(m.gamma * m.scale * (p * m.beta * q ** j)[..., 0]).sum(-1) for j in range(9)], -1)
    torch.testing.assert_close(k, expect)
    m.truncation = 4
    assert m.compute_kernel(9, dtype=torch.float64).shape == (3, 4)


# --------------------------------------------------------------------------- fft == scan


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("seq_len", [1, 7, 64, 513])
@pytest.mark.parametrize("truncation", [None, 5])
def test_fft_matches_scan(bidirectional, seq_len, truncation):
    m = make(bidirectional=bidirectional, truncation=truncation)
    x = torch.randn(2, seq_len, 8)
    mask = random_mask(2, seq_len)
    for kw in ({}, {"padding_mask": mask}):
        out_fft, st = run(m, "fft", x, **kw)
        out_scan, st2 = run(m, "scan", x, **kw)
        assert st is None and st2 is None
        assert out_fft.shape == x.shape and out_fft.dtype == x.dtype
        torch.testing.assert_close(out_fft, out_scan, **TOL)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_fft_matches_scan_long(bidirectional):
    m = make(embed_dim=4, bidirectional=bidirectional)
    x = torch.randn(1, 4096, 4)
    mask = random_mask(1, 4096)
    torch.testing.assert_close(run(m, "fft", x, padding_mask=mask)[0], run(m, "scan", x, padding_mask=mask)[0], **TOL)
    m.truncation = 1000
    torch.testing.assert_close(run(m, "fft", x)[0], run(m, "scan", x)[0], **TOL)


def test_fft_matches_scan_long_memory():
    """Decay q close to 1 (long kernels): the two paths still agree."""
    m = make(embed_dim=4)
    with torch.no_grad():
        m.alpha.fill_(-5.0)  # a ~ 0.0067, q ~ 0.997
        m.delta.fill_(0.0)
    x = torch.randn(2, 1025, 4)
    out_fft, h_fft = run(m, "fft", x, return_state=True)
    out_scan, h_scan = run(m, "scan", x, return_state=True)
    torch.testing.assert_close(out_fft, out_scan, **TOL)
    torch.testing.assert_close(h_fft, h_scan, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("truncation", [None, 3])
@pytest.mark.parametrize("impl", EMA_IMPLS)
def test_matches_direct_toeplitz_reference(bidirectional, truncation, impl):
    m = make(embed_dim=3, ndim=4, bidirectional=bidirectional, truncation=truncation)
    x = torch.randn(2, 11, 3)
    mask = random_mask(2, 11)
    for kw in ({}, {"padding_mask": mask}):
        out, _ = run(m, impl, x, **kw)
        torch.testing.assert_close(out.double(), reference(m, x, **kw), **TOL)


@pytest.mark.parametrize("impl", EMA_IMPLS)
def test_state_matches_direct_reference(impl):
    m = make(embed_dim=3, ndim=4)
    x = torch.randn(2, 9, 3)
    h0 = torch.randn(2, 3, 4)
    out, _ = run(m, impl, x, state=h0)
    torch.testing.assert_close(out.double(), reference(m, x, state=h0), **TOL)


def test_float_and_bool_padding_masks_agree_and_zero_pads():
    m = make()
    x = torch.randn(2, 10, 8)
    mask = random_mask(2, 10)
    a = m(x, padding_mask=mask)[0]
    b = m(x, padding_mask=mask.float())[0]
    torch.testing.assert_close(a, b)
    # Changing x at a padded position only changes the residual there, never other outputs.
    pad = (~mask).nonzero()[0]
    x2 = x.clone()
    x2[pad[0], pad[1]] += 5.0
    c = m(x2, padding_mask=mask)[0]
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[pad[0], pad[1]] = False
    torch.testing.assert_close(a[keep], c[keep])


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("bidirectional,truncation", [(False, None), (True, None), (False, 4), (True, 4)])
def test_fft_and_scan_gradients_agree(bidirectional, truncation):
    m = make(embed_dim=4, ndim=4, bidirectional=bidirectional, truncation=truncation)
    x0 = torch.randn(2, 13, 4)
    w = torch.randn(2, 13, 4)
    mask = random_mask(2, 13)
    grads = {}
    for impl in EMA_IMPLS:
        m.zero_grad()
        x = x0.clone().requires_grad_(True)
        out, _ = run(m, impl, x, padding_mask=mask)
        (out * w).sum().backward()
        grads[impl] = [x.grad] + [getattr(m, n).grad.clone() for n in PARAMS]
    for g_fft, g_scan in zip(grads["fft"], grads["scan"]):
        torch.testing.assert_close(g_fft, g_scan, **TOL)


def test_fft_and_scan_state_gradients_agree():
    m = make(embed_dim=4, ndim=4)
    x0, h00 = torch.randn(2, 9, 4), torch.randn(2, 4, 4)
    w, wh = torch.randn(2, 9, 4), torch.randn(2, 4, 4)
    grads = {}
    for impl in EMA_IMPLS:
        m.zero_grad()
        x, h0 = x0.clone().requires_grad_(True), h00.clone().requires_grad_(True)
        out, h = run(m, impl, x, state=h0, return_state=True)
        ((out * w).sum() + (h * wh).sum()).backward()
        grads[impl] = [x.grad, h0.grad] + [getattr(m, n).grad.clone() for n in PARAMS]
    for g_fft, g_scan in zip(grads["fft"], grads["scan"]):
        torch.testing.assert_close(g_fft, g_scan, **TOL)


@pytest.mark.parametrize("impl,bidirectional,truncation,with_state", [
    ("fft", False, None, False), ("fft", True, None, False), ("fft", True, 3, False), ("fft", False, None, True),
    ("scan", True, 3, False), ("scan", False, None, True),
])
def test_gradcheck_float64(impl, bidirectional, truncation, with_state):
    m = make(embed_dim=2, ndim=3, bidirectional=bidirectional, truncation=truncation, impl=impl, dtype=torch.float64)
    names = list(PARAMS)
    params = tuple(getattr(m, n).detach().clone().requires_grad_(True) for n in names)
    x = torch.randn(2, 6, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, h0, *ps):
        kw = {"state": h0, "return_state": True} if with_state else {}
        out, h = functional_call(m, dict(zip(names, ps)), (x,), kw)
        return (out, h) if with_state else out

    assert torch.autograd.gradcheck(fn, (x, h0) + params, eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- incremental


@pytest.mark.parametrize("impl", EMA_IMPLS)
@pytest.mark.parametrize("sizes", [[1], [3], [5], [2, 7, 1, 4], [11, 1, 6]])
def test_chunked_equals_full(impl, sizes):
    m = make(impl=impl)
    seq_len = 23
    x = torch.randn(3, seq_len, 8)
    mask = random_mask(3, seq_len)
    for kw in ({}, {"padding_mask": mask}):
        full, h_full = m(x, return_state=True, **kw)
        outs, h = [], None
        for s, e in split_points(seq_len, sizes):
            ckw = {} if not kw else {"padding_mask": mask[:, s:e]}
            out, h = m(x[:, s:e], state=h, return_state=True, **ckw)
            outs.append(out)
        torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)
        torch.testing.assert_close(h, h_full, **TOL)


@pytest.mark.parametrize("impl", EMA_IMPLS)
def test_return_state_equals_token_loop(impl):
    m = make(ndim=5)
    x = torch.randn(2, 17, 8)
    h0 = torch.randn(2, 8, 5)
    _, h_full = run(m, impl, x, state=h0, return_state=True)
    # Token-by-token recurrence written out in the test.
    p = torch.sigmoid(m.delta)[..., 0]
    q = 1 - p * torch.sigmoid(m.alpha)[..., 0]
    pb = p * m.beta[..., 0]
    h = h0.clone()
    with torch.no_grad():
        for t in range(17):
            h = q * h + pb * x[:, t, :, None]
    torch.testing.assert_close(h_full, h, **TOL)
    assert h_full.shape == (2, 8, 5) and h_full.dtype == torch.float32


@pytest.mark.parametrize("impl", EMA_IMPLS)
def test_step_equals_forward_len1(impl):
    m = make(impl=impl)
    x_t = torch.randn(4, 1, 8)
    h0 = torch.randn(4, 8, 16)
    out, h = m.step(x_t, h0)
    ref_out, ref_h = m(x_t, state=h0, return_state=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(h, ref_h)
    out2, h2 = m.step(x_t[:, 0], h0)
    assert out2.shape == (4, 8)
    torch.testing.assert_close(out2, ref_out[:, 0])
    torch.testing.assert_close(h2, ref_h)
    # No state = zero state.
    torch.testing.assert_close(m.step(x_t)[0], m(x_t)[0])


@pytest.mark.parametrize("impl", ["fft", "auto"])
def test_one_token_steps_use_the_recurrence_and_match_the_full_sequence(impl, monkeypatch):
    """Decoding one token at a time takes the direct recurrence (no FFT per token) on the fft path and on auto's
    fallback, and gives the full-sequence FFT's outputs, final state and parameter gradients."""
    m = make(ndim=6, impl=impl)
    x = torch.randn(2, 12, 8)
    if impl == "auto":  # the fallback path: pretend the fused kernel is unavailable
        monkeypatch.setattr(m, "_fused_unavailable_reason", lambda x: "not built (test)")
    full, h_full = run(m, "fft", x, return_state=True)
    full_grads = torch.autograd.grad(full.square().sum(), [m.delta, m.alpha, m.beta, m.gamma])
    m.impl = impl
    fft_lengths = []
    real_fft = m._ema_fft
    monkeypatch.setattr(m, "_ema_fft", lambda xx, h0, rs: fft_lengths.append(xx.shape[-1]) or real_fft(xx, h0, rs))
    h, outs = None, []
    for t in range(x.shape[1]):
        out, h = m.step(x[:, t], h)
        outs.append(out)
    steps = torch.stack(outs, 1)
    assert fft_lengths == []  # no FFT for a one-token step
    torch.testing.assert_close(steps, full, **TOL)
    torch.testing.assert_close(h, h_full, **TOL)
    step_grads = torch.autograd.grad(steps.square().sum(), [m.delta, m.alpha, m.beta, m.gamma])
    for g_step, g_full in zip(step_grads, full_grads):
        torch.testing.assert_close(g_step, g_full, atol=1e-4, rtol=1e-4)


def test_empty_chunk_keeps_state():
    m = make()
    h0 = torch.randn(2, 8, 16)
    out, h = m(torch.randn(2, 0, 8), state=h0, return_state=True)
    assert out.shape == (2, 0, 8)
    torch.testing.assert_close(h, h0)


# --------------------------------------------------------------------------- directionality


@pytest.mark.parametrize("impl", EMA_IMPLS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_future_dependence(impl, bidirectional):
    m = make(bidirectional=bidirectional, impl=impl)
    x = torch.randn(2, 12, 8)
    base = m(x)[0]
    for t in range(11):
        x2 = x.clone()
        x2[:, t + 1] += 1.0
        diff = (m(x2)[0][:, : t + 1] - base[:, : t + 1]).abs().max().item()
        if bidirectional:
            assert diff > 1e-4
        elif impl == "scan":
            assert diff == 0.0
        else:  # the FFT mixes all positions, so only round-off may leak from the future
            assert diff < 1e-6


# --------------------------------------------------------------------------- errors


def test_errors():
    with pytest.raises(ValueError, match="impl must be one of fft, scan"):
        MultiHeadEMA(8, impl="cuda")
    m = make()
    with pytest.raises(ValueError, match="impl"):
        m.impl = "triton"
    assert m.impl == "fft"
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="embed_dim=8"):
        m(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="3 dims"):
        m(torch.randn(5, 8))
    with pytest.raises(ValueError, match="padding_mask"):
        m(x, padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="state of shape"):
        m(x, state=torch.zeros(2, 8, 15))
    with pytest.raises(ValueError, match="step"):
        m.step(x, None)
    bi = make(bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional"):
        bi(x, state=torch.zeros(2, 8, 16))
    with pytest.raises(ValueError, match="bidirectional"):
        bi(x, return_state=True)
    tr = make(truncation=3)
    with pytest.raises(ValueError, match="truncation"):
        tr(x, return_state=True)
    with pytest.raises(ValueError, match="truncation"):
        MultiHeadEMA(8, truncation=0)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("impl", EMA_IMPLS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_bf16_input(impl, bidirectional):
    m = make(bidirectional=bidirectional, impl=impl)
    x = torch.randn(2, 33, 8)
    ref = m(x)[0]
    out = m(x.bfloat16())[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    if not bidirectional:
        _, h = m(x.bfloat16(), return_state=True)
        assert h.dtype == torch.float32


def test_bf16_module_and_autocast():
    m = make()
    x = torch.randn(2, 16, 8)
    ref = m(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)[0]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, **TOL)  # the EMA runs with autocast disabled
    m_bf = make().bfloat16()
    out_bf = m_bf(x.bfloat16())[0]
    assert out_bf.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf.float(), ref, atol=5e-2, rtol=5e-2)

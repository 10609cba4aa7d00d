"""Tests of the fused EMA kernels (csrc/, megatron_ext.kernels) and MultiHeadEMA's "fused" / "auto" impls.

The CPU kernel is JIT-built on first use (cached under the kernels cache, see megatron_ext.kernels);
when it cannot be built these tests FAIL (a compiler is expected wherever the tests run).  CUDA
tests skip without a GPU; the CUDA sources are compile-checked with nvcc when it is installed, and
the chunked-scan math of the CUDA kernel is checked here by a PyTorch mirror of it.
"""
import math
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from megatron_ext import kernels
from megatron_ext.kernels import _build
from megatron_ext.modules import mega_ema
from megatron_ext.modules.mega_ema import EMAKernelFallbackWarning, MultiHeadEMA
from helpers import EMA_PARAMS as PARAMS  # shared helpers of the EMA tests
from helpers import EMA_TOL as TOL
from helpers import make_ema as _make
from helpers import random_mask, split_points

from helpers import REPO  # noqa: E402
CSRC = os.path.join(REPO, "csrc")
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def cpu_kernel():
    """Build / load the CPU kernel; a failure fails the test (never skips)."""
    reason = kernels.unavailable_reason("cpu")
    if reason is not None:
        pytest.fail(f"the fused CPU EMA kernel could not be built/loaded: {reason}")
    return kernels.cpu_isa()


def make(*args, impl="fused", **kw):
    return _make(*args, impl=impl, **kw)


def run_with_grads(m, impl, x0, w, mask=None, h00=None, wh=None):
    """Output, final state and the gradients of x, h0 and every parameter under ``impl``."""
    m.impl = impl
    m.zero_grad()
    x = x0.detach().clone().requires_grad_(True)
    h0 = None if h00 is None else h00.detach().clone().requires_grad_(True)
    kw = {}
    if mask is not None:
        kw["padding_mask"] = mask
    if h0 is not None or wh is not None:
        kw.update(state=h0, return_state=True)
    out, h = m(x, **kw)
    loss = (out * w).sum() + ((h * wh).sum() if wh is not None else 0.0)
    loss.backward()
    grads = {"x": x.grad}
    if h0 is not None:
        grads["h0"] = h0.grad
    grads.update({n: getattr(m, n).grad.clone() for n in PARAMS})
    return out.detach(), (None if h is None else h.detach()), grads


def assert_same(a, b, **tol):
    out_a, h_a, g_a = a
    out_b, h_b, g_b = b
    torch.testing.assert_close(out_a, out_b, **tol)
    if h_a is not None or h_b is not None:
        torch.testing.assert_close(h_a, h_b, **tol)
    assert g_a.keys() == g_b.keys()
    for k in g_a:
        torch.testing.assert_close(g_a[k], g_b[k], **tol, msg=lambda s, k=k: f"gradient of {k}: {s}")


# --------------------------------------------------------------------------- fused == fft (fp32)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("bsz,seq_len", [(2, 1), (1, 7), (3, 33), (2, 130)])
def test_fused_matches_fft_outputs_and_all_grads(cpu_kernel, bidirectional, bsz, seq_len):
    m = make(embed_dim=24, ndim=16, bidirectional=bidirectional)
    x = torch.randn(bsz, seq_len, 24)
    w = torch.randn(bsz, seq_len, 24)
    mask = random_mask(bsz, seq_len)
    for kw in ({}, {"mask": mask}):
        assert_same(run_with_grads(m, "fused", x, w, **kw), run_with_grads(m, "fft", x, w, **kw), **TOL)


@pytest.mark.parametrize("ndim", [1, 3, 5, 12, 20])
def test_fused_lane_counts_and_odd_channels(cpu_kernel, ndim):
    """N not a multiple of the kernel's lane groups, D not a multiple of the vector width."""
    for bidirectional in (False, True):
        m = make(embed_dim=19, ndim=ndim, bidirectional=bidirectional, seed=ndim)
        x, w = torch.randn(2, 29, 19), torch.randn(2, 29, 19)
        assert_same(run_with_grads(m, "fused", x, w), run_with_grads(m, "fft", x, w), **TOL)


def test_fused_float64_many_tiles_and_lane_groups(cpu_kernel):
    """Several time tiles (the kernel walks 128 steps at a time), several lane groups, float64."""
    for bidirectional in (False, True):
        m = make(embed_dim=18, ndim=40, bidirectional=bidirectional, dtype=torch.float64)
        x, w = torch.randn(2, 300, 18, dtype=torch.float64), torch.randn(2, 300, 18, dtype=torch.float64)
        x[:, 200:] = 0.0  # a zero tail: the state decays through the denormal range (flushed to zero)
        h0 = None if bidirectional else torch.randn(2, 18, 40, dtype=torch.float64)
        wh = None if bidirectional else torch.randn(2, 18, 40, dtype=torch.float64)
        assert_same(run_with_grads(m, "fused", x, w, h00=h0, wh=wh), run_with_grads(m, "fft", x, w, h00=h0, wh=wh),
                    atol=1e-10, rtol=1e-10)


def test_fused_state_and_h0_gradients_match_fft(cpu_kernel):
    m = make(embed_dim=20, ndim=16)
    x, w = torch.randn(3, 41, 20), torch.randn(3, 41, 20)
    h0, wh = torch.randn(3, 20, 16), torch.randn(3, 20, 16)
    mask = random_mask(3, 41)
    assert_same(run_with_grads(m, "fused", x, w, mask=mask, h00=h0, wh=wh),
                run_with_grads(m, "fft", x, w, mask=mask, h00=h0, wh=wh), **TOL)
    # return_state without a prior state (gradient through the final state only), and h0 without return_state.
    assert_same(run_with_grads(m, "fused", x, w, wh=wh), run_with_grads(m, "fft", x, w, wh=wh), **TOL)
    m.impl = "fused"
    out_fused, _ = m(x, state=h0)
    m.impl = "fft"
    torch.testing.assert_close(out_fused, m(x, state=h0)[0], **TOL)


def test_fused_non_contiguous_inputs(cpu_kernel):
    for bidirectional in (False, True):
        m = make(embed_dim=16, bidirectional=bidirectional)
        base = torch.randn(2, 16, 37)
        x_t = base.transpose(1, 2)  # [B, L, D] view, not contiguous
        assert not x_t.is_contiguous()
        w = torch.randn(2, 37, 16)
        assert_same(run_with_grads(m, "fused", x_t, w), run_with_grads(m, "fft", x_t.contiguous(), w), **TOL)
        x_s = torch.randn(2, 74, 16)[:, ::2]  # strided time
        assert_same(run_with_grads(m, "fused", x_s, w), run_with_grads(m, "fft", x_s.contiguous(), w), **TOL)


def test_fused_long_sequence_and_long_memory(cpu_kernel):
    m = make(embed_dim=16)
    with torch.no_grad():
        m.alpha[:8].fill_(-5.0)  # q ~ 0.997: long kernels on half the channels
        m.delta[:8].fill_(0.0)
    x = torch.randn(2, 1500, 16)
    w = torch.randn(2, 1500, 16) / 30
    mask = random_mask(2, 1500)
    fused = run_with_grads(m, "fused", x, w, mask=mask)
    fft = run_with_grads(m, "fft", x, w, mask=mask)
    torch.testing.assert_close(fused[0], fft[0], **TOL)
    for k in fused[2]:  # long sums of large sensitivities: relative tolerance
        torch.testing.assert_close(fused[2][k], fft[2][k], atol=1e-4, rtol=1e-4)


def test_fused_half_precision_inputs(cpu_kernel):
    for dtype in (torch.bfloat16, torch.float16):
        m = make(bidirectional=True)
        x = torch.randn(2, 33, 8)
        ref = m(x)[0]
        out = m(x.to(dtype))[0]
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    # the kernel entry point takes half x with float32 coefficients; dx comes back in x's dtype
    x = torch.randn(2, 8, 9, dtype=torch.bfloat16, requires_grad=True)
    pb, q, g = (torch.rand(8, 4) * 0.5 + 0.2 for _ in range(3))
    y = kernels.ema_scan(x, pb, q, g)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_cpu_kernel_variants(cpu_kernel, isa, monkeypatch):
    monkeypatch.setenv("MEGATRON_EXT_EMA_CPU_ISA", isa)
    if kernels.cpu_isa() != isa:
        pytest.skip(f"this CPU cannot run the {isa} variant")
    for bidirectional in (False, True):
        m = make(embed_dim=21, ndim=13, bidirectional=bidirectional)
        x, w = torch.randn(2, 19, 21), torch.randn(2, 19, 21)
        h0 = None if bidirectional else torch.randn(2, 21, 13)
        wh = None if bidirectional else torch.randn(2, 21, 13)
        assert_same(run_with_grads(m, "fused", x, w, h00=h0, wh=wh),
                    run_with_grads(m, "fft", x, w, h00=h0, wh=wh), **TOL)


# --------------------------------------------------------------------------- gradcheck (fp64)


def _coefs(kd, n, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(kd, n, generator=g, dtype=dtype) * 0.8 + 0.1
    a = torch.rand(kd, n, generator=g, dtype=dtype)
    pb = p * torch.randn(kd, n, generator=g, dtype=dtype)
    q = 1 - p * a
    gam = torch.randn(kd, n, generator=g, dtype=dtype)
    return pb, q, gam


@pytest.mark.parametrize("bidirectional,with_state", [(False, False), (False, True), (True, False)])
def test_gradcheck_kernel_float64(cpu_kernel, bidirectional, with_state):
    d, n, seq_len = 3, 5, 7
    kd = 2 * d if bidirectional else d
    pb, q, g = (t.requires_grad_(True) for t in _coefs(kd, n))
    x = torch.randn(2, d, seq_len, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, d, n, dtype=torch.float64, requires_grad=True)

    def fn(x, pb, q, g, h0):
        if with_state:
            return kernels.ema_scan(x, pb, q, g, h0=h0, return_state=True)
        return kernels.ema_scan(x, pb, q, g, bidirectional=bidirectional)

    assert torch.autograd.gradcheck(fn, (x, pb, q, g, h0), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("bidirectional,with_state", [(False, True), (True, False)])
def test_gradcheck_module_fused_float64(cpu_kernel, bidirectional, with_state):
    from torch.func import functional_call

    m = make(embed_dim=2, ndim=3, bidirectional=bidirectional, dtype=torch.float64)
    names = list(PARAMS)
    params = tuple(getattr(m, k).detach().clone().requires_grad_(True) for k in names)
    x = torch.randn(2, 6, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, 6)

    def fn(x, h0, *ps):
        kw = {"state": h0, "return_state": True} if with_state else {"padding_mask": mask}
        out, h = functional_call(m, dict(zip(names, ps)), (x,), kw)
        return (out, h) if with_state else out

    assert torch.autograd.gradcheck(fn, (x, h0) + params, eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- incremental




@pytest.mark.parametrize("sizes", [[1], [3], [2, 7, 1, 4]])
def test_fused_chunked_equals_full(cpu_kernel, sizes):
    m = make(impl="fused")
    seq_len = 23
    x = torch.randn(3, seq_len, 8)
    mask = random_mask(3, seq_len)
    m.impl = "fft"
    full_fft, h_fft = m(x, padding_mask=mask, return_state=True)
    m.impl = "fused"
    full, h_full = m(x, padding_mask=mask, return_state=True)
    torch.testing.assert_close(full, full_fft, **TOL)
    torch.testing.assert_close(h_full, h_fft, **TOL)
    outs, h = [], None
    for s, e in split_points(seq_len, sizes):
        out, h = m(x[:, s:e], padding_mask=mask[:, s:e], state=h, return_state=True)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)
    torch.testing.assert_close(h, h_full, **TOL)


def test_fused_step_equals_forward(cpu_kernel):
    m = make(impl="fused")
    x = torch.randn(4, 9, 8)
    full, h_full = m(x, return_state=True)
    h, outs = None, []
    with torch.no_grad():  # the single-step kernel
        for t in range(9):
            out, h = m.step(x[:, t], h)
            outs.append(out)
    torch.testing.assert_close(torch.stack(outs, 1), full.detach(), **TOL)
    torch.testing.assert_close(h, h_full.detach(), **TOL)
    # with autograd the step goes through the differentiable scan; same numbers
    h0 = torch.randn(4, 8, 16)
    out_g, h_g = m.step(x[:, 0], h0)
    with torch.no_grad():
        out_n, h_n = m.step(x[:, 0], h0)
    m.impl = "fft"
    out_f, h_f = m.step(x[:, 0], h0)
    torch.testing.assert_close(out_g, out_n, **TOL)
    torch.testing.assert_close(h_g, h_n, **TOL)
    torch.testing.assert_close(out_n, out_f, **TOL)
    torch.testing.assert_close(h_n, h_f, **TOL)


def test_kernel_step_entry_point(cpu_kernel):
    pb, q, g = (t.float() for t in _coefs(6, 4))
    x, h0 = torch.randn(3, 6), torch.randn(3, 6, 4)
    y, h1 = kernels.ema_step(x, pb, q, g, h0=h0)
    torch.testing.assert_close(h1, q * h0 + pb * x[..., None])
    torch.testing.assert_close(y, (g * h1).sum(-1))
    y0, h10 = kernels.ema_step(x, pb, q, g)
    torch.testing.assert_close(h10, pb * x[..., None])


# --------------------------------------------------------------------------- errors


def test_kernel_entry_point_errors(cpu_kernel):
    pb, q, g = (t.float() for t in _coefs(4, 3))
    x = torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match=r"x of shape \[batch, channels, length\]"):
        kernels.ema_scan(torch.randn(4, 5), pb, q, g)
    with pytest.raises(ValueError, match=r"pb of shape \[kd, N\] with kd = channels = 4"):
        kernels.ema_scan(x, pb[:3], q, g)
    with pytest.raises(ValueError, match=r"q of shape \[kd, N\] with kd = 2 \* channels = 8"):
        kernels.ema_scan(x, torch.cat([pb, pb]), q, g, bidirectional=True)
    with pytest.raises(ValueError, match="g of shape"):
        kernels.ema_scan(x, pb, q, g[:, :2])
    with pytest.raises(TypeError, match="expected pb of dtype float32, float64, got int64"):
        kernels.ema_scan(x, pb.long(), q, g)
    with pytest.raises(TypeError, match="x of dtype float16, bfloat16, float32, float64, got int32"):
        kernels.ema_scan(x.int(), pb, q, g)
    with pytest.raises(TypeError, match="float64 coefficients with float64 x"):
        kernels.ema_scan(x.double(), pb, q, g)
    with pytest.raises(TypeError, match="one dtype"):
        kernels.ema_scan(x, pb, q.double(), g)
    with pytest.raises(TypeError, match="expected x to be a torch.Tensor, got list"):
        kernels.ema_scan([1.0], pb, q, g)
    with pytest.raises(ValueError, match=r"h0 of shape \[batch, channels, N\] = \(2, 4, 3\)"):
        kernels.ema_scan(x, pb, q, g, h0=torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="bidirectional EMA carries no state"):
        pb2, q2, g2 = (torch.cat([t, t]) for t in (pb, q, g))
        kernels.ema_scan(x, pb2, q2, g2, bidirectional=True, return_state=True)
    with pytest.raises(ValueError, match=r"ema_step: expected x of shape \[batch, channels\]"):
        kernels.ema_step(x, pb, q, g)
    # the operator itself checks too (RuntimeError from TORCH_CHECK)
    with pytest.raises(RuntimeError, match="expected pb, q, g of shape"):
        torch.ops.megatron_ext_ema.ema_fwd(x, pb[:3], q[:3], g[:3], None, False, False)


def test_module_fused_errors(cpu_kernel, monkeypatch):
    with pytest.raises(ValueError, match="impl must be one of fft, scan, fused, auto"):
        MultiHeadEMA(8, impl="triton")
    m = make(truncation=4, impl="fused")
    with pytest.raises(ValueError, match="does not support truncation"):
        m(torch.randn(2, 5, 8))
    monkeypatch.setattr(_build, "load_library", _raise_unavailable)
    m = make(impl="fused")
    with pytest.raises(kernels.KernelUnavailableError, match="forced unavailable by the test"):
        m(torch.randn(2, 5, 8))


# --------------------------------------------------------------------------- auto


def _raise_unavailable(kind="cpu", verbose=False):
    raise kernels.KernelUnavailableError("no C++ compiler: forced unavailable by the test")


def test_auto_uses_fused_when_available(cpu_kernel, monkeypatch):
    monkeypatch.setattr(mega_ema, "_FALLBACK_WARNED", set())
    m = make(impl="auto", bidirectional=True)
    calls = []
    real = kernels.ema_scan

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(kernels, "ema_scan", spy)
    x = torch.randn(2, 10, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EMAKernelFallbackWarning)
        out_auto = m(x)[0]
    assert calls, "auto did not call the fused kernel"
    m.impl = "fused"
    torch.testing.assert_close(out_auto, m(x)[0])


def test_auto_falls_back_to_fft_with_one_warning(cpu_kernel, monkeypatch):
    monkeypatch.setattr(mega_ema, "_FALLBACK_WARNED", set())
    monkeypatch.setattr(_build, "load_library", _raise_unavailable)
    assert kernels.unavailable_reason("cpu") == "no C++ compiler: forced unavailable by the test"
    m = make(impl="auto")
    x = torch.randn(2, 10, 8)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        outs = [m(x)[0] for _ in range(3)]
        m2 = make(impl="auto", seed=3)
        m2(x)
    fallback = [w for w in rec if issubclass(w.category, EMAKernelFallbackWarning)]
    assert len(fallback) == 1, [str(w.message) for w in rec]
    msg = str(fallback[0].message)
    assert "FFT" in msg and "forced unavailable by the test" in msg and "cpu" in msg
    m.impl = "fft"
    torch.testing.assert_close(outs[0], m(x)[0])


def test_auto_truncation_falls_back_with_reason(cpu_kernel, monkeypatch):
    monkeypatch.setattr(mega_ema, "_FALLBACK_WARNED", set())
    m = make(impl="auto", truncation=5)
    x = torch.randn(2, 12, 8)
    with pytest.warns(EMAKernelFallbackWarning, match="truncation=5 is not supported by the fused kernel"):
        out = m(x)[0]
    m.impl = "fft"
    torch.testing.assert_close(out, m(x)[0])


# --------------------------------------------------------------------------- build / load


def test_build_dir_key_and_cli(cpu_kernel):
    d = _build.build_dir("cpu")
    assert str(d).startswith(str(_build.cache_root()))
    name = d.name
    assert torch.__version__ in name and f"py{sys.version_info[0]}{sys.version_info[1]}" in name
    assert (d / "megatron_ext_ema_cpu.so").exists()
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.kernels", "build", "--cpu-only"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"cpu: built {d}" in proc.stdout
    assert "cpu kernel variant:" in proc.stdout


def test_build_failure_reports_first_error_line(tmp_path, monkeypatch):
    """A real failing build (a broken copy of the sources) gives the compiler's first error line."""
    if _build.compiler_version() is None:
        pytest.fail("no C++ compiler found; the kernels need one")
    broken = tmp_path / "csrc"
    shutil.copytree(CSRC, broken)
    src = (broken / "ema_cpu.cpp").read_text()
    (broken / "ema_cpu.cpp").write_text("int broken_by_the_test = ;\n" + src)
    monkeypatch.setenv("MEGATRON_EXT_CSRC", str(broken))
    monkeypatch.setenv("MAX_JOBS", "1")  # ninja stops at the first failed compile
    monkeypatch.setenv("MEGATRON_EXT_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_build, "_results", {})
    ok, reason = _build.library_status("cpu")
    assert not ok
    assert reason.startswith("the CPU kernel build failed:") and "error" in reason and "ema_cpu.cpp:1:" in reason
    # remembered: no second build attempt in this process
    monkeypatch.setattr(_build, "_build_and_load", lambda *a, **k: pytest.fail("rebuilt"))
    assert _build.library_status("cpu") == (False, reason)


def test_disabled_and_missing_sources(monkeypatch, tmp_path):
    monkeypatch.setattr(_build, "_results", {})
    monkeypatch.setenv("MEGATRON_EXT_DISABLE_KERNELS", "1")
    assert "MEGATRON_EXT_DISABLE_KERNELS" in kernels.unavailable_reason("cpu")
    monkeypatch.setattr(_build, "_results", {})
    monkeypatch.delenv("MEGATRON_EXT_DISABLE_KERNELS")
    monkeypatch.setenv("MEGATRON_EXT_CSRC", str(tmp_path))
    assert "kernel sources not found" in kernels.unavailable_reason("cpu")
    assert "no fused EMA kernel for device type 'meta'" in kernels.unavailable_reason("meta")


def test_cuda_reason_without_gpu():
    if CUDA:
        pytest.skip("a GPU is present")
    reason = kernels.unavailable_reason("cuda")
    assert reason is not None and ("CPU-only" in reason or "no CUDA device" in reason)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    cu_files = sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))
    assert cu_files
    for f in cu_files:
        proc = subprocess.run(["nvcc", "-c", os.path.join(CSRC, f), "-I", CSRC, "-o", str(tmp_path / (f + ".o"))],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"nvcc -c {f} failed:\n{proc.stdout}\n{proc.stderr}"
        assert (tmp_path / (f + ".o")).stat().st_size > 0
    with open(os.path.join(CSRC, "ema_cuda_kernel.cu")) as fh:
        text = fh.read()
    assert "#include <torch" not in text and "#include <ATen" not in text


# --------------------------------------------------------------------------- the CUDA kernel's math


def _chunked_mirror(x, pb, q, g, h0, dhL, dy, bidirectional, T):
    """PyTorch mirror of csrc/ema_cuda_kernel.cu (local / carry / out passes over chunks of T steps),
    float64, used to check its chunk-carry algebra against the CPU kernel on small shapes."""
    bsz, d, seq_len = x.shape
    dirs = 2 if bidirectional else 1
    nc = math.ceil(seq_len / T)
    h0_given = h0 is not None

    def times(c):
        return list(range(c * T, min(seq_len, (c + 1) * T)))

    y = torch.zeros(bsz, d, seq_len, dtype=x.dtype)
    dx = torch.zeros_like(y)
    out = {"dpb": [], "dq": [], "dg": []}
    hL = dh0 = None
    for r in range(dirs):
        P, Q, G = (t[r * d:(r + 1) * d] for t in (pb, q, g))

        def order(c):
            return times(c) if r == 0 else times(c)[::-1]

        def xt(t):
            return x[:, :, t, None]

        def dyt(t):
            return dy[:, :, t, None]

        zero = torch.zeros(bsz, d, P.shape[1], dtype=x.dtype)
        chunks_fwd = range(nc) if r == 0 else range(nc - 1, -1, -1)
        # forward: local, carry, out
        loc = []
        for c in range(nc):
            h = zero
            for t in order(c):
                h = Q * h + P * xt(t)
            loc.append(h)
        cin = [None] * nc
        h = h0 if (r == 0 and h0_given) else zero
        for c in chunks_fwd:
            cin[c] = h
            h = Q ** len(times(c)) * h + loc[c]
        if r == 0:
            hL = h
        for c in range(nc):
            h = cin[c]
            for t in order(c):
                h = Q * h + P * xt(t)
                y[:, :, t] += (G * h).sum(-1)
        # backward: local
        crloc, stloc = [], []
        for c in range(nc):
            cr = zero
            for t in order(c)[::-1]:
                cr = Q * (G * dyt(t) + cr)
            crloc.append(cr)
            m = sq = hh = zero
            for t in order(c):
                if h0_given:
                    sq = Q * sq + hh
                    hh = Q * hh + P * xt(t)
                else:
                    sq = Q * sq + m
                m = Q * m + xt(t)
            stloc.append((m, sq, hh))
        # carries
        crin = [None] * nc
        cr = dhL if (r == 0 and dhL is not None) else zero
        for c in reversed(list(chunks_fwd)):
            crin[c] = cr
            cr = Q ** len(times(c)) * cr + crloc[c]
        if r == 0:
            dh0 = cr
        stin = [None] * nc
        m, sq, hh = zero, zero, (h0 if (r == 0 and h0_given) else zero)
        for c in chunks_fwd:
            n_c = len(times(c))
            p_c, dp_c = Q ** n_c, n_c * Q ** (n_c - 1)
            stin[c] = (m, sq, hh)
            ml, sql, hl = stloc[c]
            if h0_given:
                sq = p_c * sq + dp_c * hh + sql
                hh = p_c * hh + hl
            else:
                sq = p_c * sq + dp_c * m + sql
            m = p_c * m + ml
        m_fin, sq_fin = m, sq
        # out
        SP = SQ = SG = 0
        for c in range(nc):
            cr = crin[c]
            for t in order(c)[::-1]:
                lam = G * dyt(t) + cr
                cr = Q * lam
                dx[:, :, t] += (P * lam).sum(-1)
            m, sq, hh = stin[c]
            for t in order(c):
                if h0_given:
                    sq = Q * sq + hh
                    hh = Q * hh + P * xt(t)
                    SG = SG + (dyt(t) * hh).sum(0)
                else:
                    sq = Q * sq + m
                m = Q * m + xt(t)
                SP = SP + (dyt(t) * m).sum(0)
                SQ = SQ + (dyt(t) * sq).sum(0)
        dg = SG if h0_given else P * SP
        dpb = G * SP
        dq = G * SQ
        if r == 0 and dhL is not None:
            dpb = dpb + (dhL * m_fin).sum(0)
            dq = dq + (dhL * sq_fin).sum(0)
        if not h0_given:
            dq = P * dq
        out["dpb"].append(dpb)
        out["dq"].append(dq)
        out["dg"].append(dg)
    return y, hL, dx, torch.cat(out["dpb"]), torch.cat(out["dq"]), torch.cat(out["dg"]), dh0


@pytest.mark.parametrize("bidirectional,with_state,T", [(False, True, 4), (False, False, 3), (True, False, 4)])
def test_cuda_chunked_scan_math_matches_cpu_kernel(cpu_kernel, bidirectional, with_state, T):
    bsz, d, n, seq_len = 2, 3, 4, 11  # 11 steps: a partial last chunk
    kd = 2 * d if bidirectional else d
    pb, q, g = (t.requires_grad_(True) for t in _coefs(kd, n, seed=5))
    x = torch.randn(bsz, d, seq_len, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(bsz, d, n, dtype=torch.float64, requires_grad=True) if with_state else None
    dy = torch.randn(bsz, d, seq_len, dtype=torch.float64)
    dhL = torch.randn(bsz, d, n, dtype=torch.float64) if with_state else None
    if with_state:
        y, hL = kernels.ema_scan(x, pb, q, g, h0=h0, return_state=True)
        (y * dy).sum().add((hL * dhL).sum()).backward()
    else:
        y = kernels.ema_scan(x, pb, q, g, bidirectional=bidirectional)
        (y * dy).sum().backward()
    with torch.no_grad():
        my, mhL, mdx, mdpb, mdq, mdg, mdh0 = _chunked_mirror(
            x, pb, q, g, None if h0 is None else h0.detach(), dhL, dy, bidirectional, T)
    torch.testing.assert_close(my, y.detach())
    if with_state:
        torch.testing.assert_close(mhL, hL.detach())
        torch.testing.assert_close(mdh0, h0.grad)
    torch.testing.assert_close(mdx, x.grad)
    torch.testing.assert_close(mdpb, pb.grad)
    torch.testing.assert_close(mdq, q.grad)
    torch.testing.assert_close(mdg, g.grad)


# --------------------------------------------------------------------------- CUDA (needs a GPU)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("chunk", [None, "1", "7"])
def test_cuda_kernel_matches_cpu(bidirectional, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setenv("MEGATRON_EXT_EMA_CUDA_CHUNK", chunk)
    reason = kernels.unavailable_reason("cuda")
    if reason is not None:
        pytest.fail(f"the CUDA kernel could not be built: {reason}")
    m = make(embed_dim=40, ndim=16, bidirectional=bidirectional)
    x, w = torch.randn(3, 300, 40), torch.randn(3, 300, 40)
    mask = random_mask(3, 300)
    h0 = None if bidirectional else torch.randn(3, 40, 16)
    wh = None if bidirectional else torch.randn(3, 40, 16)
    cpu = run_with_grads(m, "fft", x, w, mask=mask, h00=h0, wh=wh)
    m.cuda()
    gpu = run_with_grads(m, "fused", x.cuda(), w.cuda(), mask=mask.cuda(),
                         h00=None if h0 is None else h0.cuda(), wh=None if wh is None else wh.cuda())
    gpu = (gpu[0].cpu(), None if gpu[1] is None else gpu[1].cpu(), {k: v.cpu() for k, v in gpu[2].items()})
    assert_same(gpu, cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_kernel_half_inputs_gradcheck_and_step(monkeypatch):
    if kernels.unavailable_reason("cuda") is not None:
        pytest.fail(kernels.unavailable_reason("cuda"))
    monkeypatch.setenv("MEGATRON_EXT_EMA_CUDA_CHUNK", "4")  # several chunks even on this small problem
    pb, q, g = (t.cuda() for t in _coefs(6, 5))
    x = torch.randn(2, 6, 13, dtype=torch.float64, device="cuda", requires_grad=True)
    h0 = torch.randn(2, 6, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    args = (x, pb.requires_grad_(), q.requires_grad_(), g.requires_grad_(), h0)
    assert torch.autograd.gradcheck(lambda *a: kernels.ema_scan(*a, return_state=True), args, eps=1e-6, atol=1e-7)
    pb2, q2, g2 = (torch.cat([t.detach(), t.detach()]) for t in (pb, q, g))
    assert torch.autograd.gradcheck(lambda x_, a_, b_, c_: kernels.ema_scan(x_, a_, b_, c_, bidirectional=True),
                                    (x, pb2.requires_grad_(), q2.requires_grad_(), g2.requires_grad_()),
                                    eps=1e-6, atol=1e-7)
    ref = kernels.ema_scan(x.detach().cpu(), pb.detach().cpu(), q.detach().cpu(), g.detach().cpu()).float()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        y = kernels.ema_scan(x.detach().to(dtype), pb.detach().float(), q.detach().float(), g.detach().float())
        torch.testing.assert_close(y.cpu(), ref, atol=3e-2, rtol=3e-2)
    y1, h1 = kernels.ema_step(x.detach()[:, :, 0], pb.detach(), q.detach(), g.detach(), h0=h0.detach())
    torch.testing.assert_close(h1, q * h0.detach() + pb.detach() * x.detach()[:, :, 0, None])
    torch.testing.assert_close(y1, (g * h1).sum(-1))

"""Mega EMA cost per decoded token: the one-token recurrence vs the FFT path it replaced vs the fused kernel.

What runs: ``MultiHeadEMA(hidden, ndim)`` (causal), ``steps`` incremental steps of one token each, state carried,
under ``torch.no_grad()`` (generation), x ``[batch, 1, hidden]`` fp32:
  recurrence  ``MultiHeadEMA.step`` with ``impl="fft"`` -- since this change a one-token step takes the direct
              recurrence h = q*h + p*beta*x, y = sum(gamma*scale*h) (also auto's path when the kernel is missing)
  fft         the FFT path for the same one-token input (``MultiHeadEMA._ema_fft``), which ``step`` used before
  fused       ``impl="fused"`` (the C++/CUDA kernel's single-step op), when it builds here
All in this process, round-robin over ``repeats`` rounds, median per-token time. Outputs of the three are checked
equal (``config.max_abs_diff``).

    python bench/bench_mega_decode.py           # hidden 1024, ndim 16, batch 1 and 8, 256 steps
    python bench/bench_mega_decode.py --quick   # hidden 256, 64 steps
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    hidden, ndim, steps = (256, 16, 64) if args.quick else (1024, 16, 256)
    from megatron_ext.kernels import is_available
    from megatron_ext.modules.mega_ema import MultiHeadEMA

    torch.manual_seed(0)
    m = MultiHeadEMA(hidden, ndim, impl="fft").eval()

    def via_step(x):
        h, outs = None, []
        for t in range(x.shape[1]):
            y, h = m.step(x[:, t:t + 1], h)
            outs.append(y)
        return torch.cat(outs, 1)

    def via_fft(x):  # the old one-token path: FFT of a length-1 input with the carried state
        h, outs = None, []
        for t in range(x.shape[1]):
            xt = x[:, t:t + 1]
            y, h = m._ema_fft(xt.transpose(1, 2), h, True)
            outs.append(torch.nn.functional.silu(y.transpose(1, 2) + xt * m.omega))
        return torch.cat(outs, 1)

    impls = {"recurrence": ("fft", via_step), "fft": ("fft", via_fft)}
    if is_available("cpu"):
        impls["fused"] = ("fused", via_step)
    for batch in (1, 8):
        x = torch.randn(batch, steps, hidden)
        times = {k: [] for k in impls}
        outs = {}
        with torch.no_grad():
            for name, (impl, fn) in impls.items():  # warm-up (kernel build, allocator)
                m.impl = impl
                outs[name] = fn(x[:, :4])
            for _ in range(args.repeats):
                for name, (impl, fn) in impls.items():
                    m.impl = impl
                    t0 = time.perf_counter()
                    outs[name] = fn(x)
                    times[name].append((time.perf_counter() - t0) / steps)
        diff = max((outs[k] - outs["fft"]).abs().max().item() for k in outs)
        conf = {"hidden": hidden, "ndim": ndim, "batch": batch, "steps": steps, "device": "cpu",
                "threads": torch.get_num_threads(), "repeats": args.repeats, "max_abs_diff": diff}
        med = {k: statistics.median(v) for k, v in times.items()}
        for name, t in med.items():
            print(json.dumps({"bench": "mega_decode", "metric": f"us_per_token_{name}", "value": round(t * 1e6, 1),
                              "unit": "us", "config": conf}))
        for name in med:
            if name != "fft":
                print(json.dumps({"bench": "mega_decode", "metric": f"speedup_vs_fft_{name}",
                                  "value": round(med["fft"] / med[name], 2), "unit": "x", "config": conf}))


if __name__ == "__main__":
    main()

"""``tools/plan.py --measure-peak``: the dense matmul rate this machine sustains, to use as ``Machine.peak_tflops``.

A short loop of square GEMMs -- bf16 on CUDA (the first device), fp32 on CPU -- timed after a warm-up, for about
``seconds`` seconds. The figure is what the matmul kernels reach here (not the vendor's datasheet peak); the
planner still multiplies it by ``compute_efficiency`` (the fraction of it a whole training step reaches).
"""
from __future__ import annotations

import time
from typing import Dict, Optional

import torch

from megatron_ext.errors import ConfigError


def measure_peak_tflops(seconds: float = 2.0, device: Optional[str] = None, n: Optional[int] = None) -> Dict[str, object]:
    """``{"tflops", "device", "dtype", "n", "iters", "seconds"}`` of an ``n x n @ n x n`` loop on ``device``
    (default: ``cuda`` when available, else ``cpu``; ``n``: 8192 on CUDA, 1024 on CPU) run for ~``seconds``."""
    if not seconds > 0:
        raise ConfigError(f"measure_peak_tflops seconds={seconds!r}: expected a number > 0")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = int(n or (8192 if cuda else 1024))
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    out = torch.empty(n, n, device=dev, dtype=dtype)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    for _ in range(2):  # warm-up: kernel selection, thread pools, clocks
        torch.matmul(a, b, out=out)
    sync()
    iters, start = 0, time.perf_counter()
    elapsed = 0.0
    while elapsed < seconds:
        for _ in range(4 if cuda else 1):
            torch.matmul(a, b, out=out)
            iters += 1
        sync()
        elapsed = time.perf_counter() - start
    flops = 2.0 * n ** 3 * iters
    return {"tflops": flops / elapsed / 1e12, "device": str(dev) if not cuda else torch.cuda.get_device_name(dev),
            "dtype": str(dtype).replace("torch.", ""), "n": n, "iters": iters, "seconds": elapsed}

"""Peak FLOP/s used for MFU.

GPUs: dense (no sparsity) peak by device name, per precision. CPUs (and unknown GPUs): there is no reliable
table, so the peak is *measured* once per process as the best of a few large square matmuls in the training
dtype — MFU on CPU is therefore "fraction of what this machine's matmul reaches", which is what a user tuning
a CPU run can act on. ``trainer``-independent; ``MEGATRON_EXT_PEAK_TFLOPS`` overrides both.
"""
from __future__ import annotations

import os
import time
from functools import lru_cache

import torch

# TFLOP/s, dense. (bf16/fp16 tensor core, tf32 for fp32 where the framework allows it.)
_GPU_PEAKS = [
    ("H200", {"bf16": 989.0, "16": 989.0, "32": 494.0}),
    ("H100 PCIe", {"bf16": 756.0, "16": 756.0, "32": 378.0}),
    ("H100 NVL", {"bf16": 835.0, "16": 835.0, "32": 418.0}),
    ("H100", {"bf16": 989.0, "16": 989.0, "32": 494.0}),
    ("A100", {"bf16": 312.0, "16": 312.0, "32": 156.0}),
    ("A10G", {"bf16": 70.0, "16": 70.0, "32": 35.0}),
    ("L40S", {"bf16": 362.0, "16": 362.0, "32": 183.0}),
    ("V100", {"bf16": 125.0, "16": 125.0, "32": 15.7}),
    ("B200", {"bf16": 2250.0, "16": 2250.0, "32": 1125.0}),
]


def _dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "16": torch.float16}.get(precision, torch.float32)


@lru_cache(maxsize=None)
def measure_matmul_tflops(device: str = "cpu", precision: str = "32", n: int = 1024, reps: int = 5) -> float:
    """Best-of-``reps`` TFLOP/s of an n x n x n matmul on this device/dtype (a few hundred ms on CPU)."""
    dt = _dtype(precision)
    if device == "cpu" and dt == torch.float16:
        dt = torch.float32
    g = torch.Generator(device=device).manual_seed(0)  # own generator: must not disturb the training RNG
    a = torch.randn(n, n, device=device, generator=g).to(dt)
    b = torch.randn(n, n, device=device, generator=g).to(dt)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best / 1e12


def peak_tflops(device: str, precision: str) -> tuple[float, str]:
    """(peak TFLOP/s per process, how it was obtained)."""
    env = os.environ.get("MEGATRON_EXT_PEAK_TFLOPS")
    if env:
        return float(env), "env MEGATRON_EXT_PEAK_TFLOPS"
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, table in _GPU_PEAKS:
            if key in name:
                return table[precision], f"table ({name})"
    return measure_matmul_tflops("cuda" if device.startswith("cuda") else "cpu", precision), "measured matmul"

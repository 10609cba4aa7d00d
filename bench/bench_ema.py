"""Mega EMA (MultiHeadEMA): fused C++/CUDA kernel vs the PyTorch FFT path vs the plain PyTorch scan.

What runs: ``megatron_ext.modules.mega_ema.MultiHeadEMA(hidden, ndim, bidirectional=...)`` on x ``[batch, L, hidden]``
(fp32, no padding mask), the whole module (EMA + ``omega * x`` + silu), with ``impl`` = ``fused`` (the kernel of
``megatron_ext.kernels``, JIT-built on first use), ``fft`` and ``scan`` (the Python loop over time).  Defaults:
hidden 1024, ndim 16, batch 4, L in {512, 2048, 8192}, causal and bidirectional, device cpu, torch's default
intra-op threads (all cores).

Two passes per (impl, L, direction):
  fwd      the forward under ``torch.no_grad()`` (inference / encoding)
  fwd_bwd  forward + ``out.sum().backward()`` with gradients for x and every parameter (a training step's share)

Time: wall time (``time.perf_counter``) of one pass; ``--warmup`` untimed passes, then ``--repeats`` timed ones
round-robin over the implementations (so machine drift hits all alike), median reported.  All implementations run
in this one process, one after the other.

Peak memory (CPU): torch's CPU allocations bypass tracemalloc, so each (impl, L, direction) runs in a fresh
subprocess of this script (``--worker``) started with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc hands every
allocation >= 64 KiB to mmap and gives it back on free, so RSS follows live tensors).  There, after one untimed
warm-up of both passes and dropping all gradients, the process's peak-RSS mark is reset (``echo 5 >
/proc/self/clear_refs``) and the peak is ``VmHWM`` after the pass minus ``VmRSS`` right before it: the extra memory
the pass needed on top of its input and the parameters (output, saved activations, temporaries, gradients).  Where
clear_refs is unavailable the worker measures the first pass only, as ``ru_maxrss`` minus the RSS before it.  On
CUDA the same rows come from ``torch.cuda.max_memory_allocated`` (in-process).

The Python scan is O(L) Python steps; its backward saves about 1 MB per step at hidden 1024 (GBs at L = 2048), so
it is capped: forward at every L, forward + backward only for L <= ``--scan-bwd-max-len`` (default 2048); skipped
rows are printed with value null and ``config.skipped`` saying why.  It runs ``--scan-repeats`` (default 1) timed
passes without warm-up.

Lines (stdout, one JSON object each; progress goes to stderr):
  {"bench": "ema", "metric": "<pass>_ms_<impl>", "unit": "ms", ...}              median time of the pass
  {"bench": "ema", "metric": "<pass>_peak_mem_mb_<impl>", "unit": "MB", ...}      peak extra memory (MiB)
  {"bench": "ema", "metric": "speedup_vs_fft", "unit": "x", ...}                 fft time / fused time, per pass
  {"bench": "ema", "metric": "mem_ratio_fft_vs_fused", "unit": "x", ...}         fft peak / fused peak, per pass
with ``config`` = {L, direction, hidden, ndim, batch, device, threads, pass?, ...}.

    python bench/bench_ema.py            # the full grid (a few minutes on 2 cores)
    python bench/bench_ema.py --quick    # L in {512, 2048}, 1 repeat, scan forward-only at 512: about a minute
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_ext.modules.mega_ema import MultiHeadEMA  # noqa: E402
from megatron_ext.planning.measure import proc_status_kib, reset_host_peak  # noqa: E402

BENCH = "ema"
IMPLS = ("fused", "fft", "scan")
PASSES = ("fwd", "fwd_bwd")
MB = 1024.0 * 1024.0


def emit(metric, value, unit, config):
    print(json.dumps({"bench": BENCH, "metric": metric, "value": value, "unit": unit, "config": config}), flush=True)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- passes
def make_case(impl, seq_len, direction, hidden, ndim, batch, device, seed=0):
    torch.manual_seed(seed)
    m = MultiHeadEMA(hidden, ndim, bidirectional=(direction == "bidirectional"), impl=impl).to(device)
    x = torch.randn(batch, seq_len, hidden, device=device, requires_grad=True)
    return m, x


def run_pass(m, x, pass_name):
    if pass_name == "fwd":
        with torch.no_grad():
            m(x)
    else:
        out, _ = m(x)
        out.sum().backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()


def clear_grads(m, x):
    x.grad = None
    m.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------- memory worker
def worker(args):
    """Peak extra memory of each pass of one (impl, L, direction); prints one JSON dict."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    m, x = make_case(args.impl, args.L, args.direction, args.hidden, args.ndim, args.batch, device)
    result = {}
    if device.type == "cuda":
        for p in PASSES:
            run_pass(m, x, p)
            clear_grads(m, x)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run_pass(m, x, p)
            result[p] = (torch.cuda.max_memory_allocated() - before) / MB
            clear_grads(m, x)
        result["method"] = "cuda.max_memory_allocated"
    elif reset_host_peak():
        for p in args.passes.split(","):  # warm-up: kernels built / loaded, allocator and thread pool up
            run_pass(m, x, p)
            clear_grads(m, x)
        for p in args.passes.split(","):
            reset_host_peak()
            before = proc_status_kib("VmRSS")
            run_pass(m, x, p)
            result[p] = (proc_status_kib("VmHWM") - before) / 1024.0
            clear_grads(m, x)
        result["method"] = "VmHWM (clear_refs) - VmRSS"
    else:  # first pass only: ru_maxrss is monotonic
        if args.impl == "fused":
            from megatron_ext import kernels

            kernels.unavailable_reason(device)  # load the library before the baseline RSS
        p = args.passes.split(",")[-1]
        before = proc_status_kib("VmRSS")
        run_pass(m, x, p)
        result[p] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024.0
        result["method"] = "ru_maxrss - VmRSS (first pass)"
    print(json.dumps(result), flush=True)


def measure_memory(args, impl, seq_len, direction, passes):
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl, "--L", str(seq_len),
           "--direction", direction, "--hidden", str(args.hidden), "--ndim", str(args.ndim), "--batch", str(args.batch),
           "--device", args.device, "--threads", str(args.threads), "--passes", ",".join(passes)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        log(f"memory worker failed ({impl}, L={seq_len}, {direction}):\n{proc.stderr[-2000:]}")
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- timing
def time_case(args, seq_len, direction, impls, scan_passes):
    """{(impl, pass): median ms}, all implementations in this process, round-robin."""
    device = torch.device(args.device)
    cases = {impl: make_case(impl, seq_len, direction, args.hidden, args.ndim, args.batch, device) for impl in impls}
    times = {}
    for p in PASSES:
        run_impls = [i for i in impls if i != "scan" or p in scan_passes]
        for impl in run_impls:
            if impl != "scan":
                for _ in range(args.warmup):
                    run_pass(*cases[impl], p)
                    clear_grads(*cases[impl])
        rounds = max(args.repeats, args.scan_repeats if "scan" in run_impls else 0)
        samples = {impl: [] for impl in run_impls}
        for r in range(rounds):
            for impl in run_impls:
                if len(samples[impl]) >= (args.scan_repeats if impl == "scan" else args.repeats):
                    continue
                m, x = cases[impl]
                t0 = time.perf_counter()
                run_pass(m, x, p)
                samples[impl].append((time.perf_counter() - t0) * 1e3)
                clear_grads(m, x)
        for impl in run_impls:
            times[(impl, p)] = statistics.median(samples[impl])
            log(f"  L={seq_len} {direction} {p} {impl}: {times[(impl, p)]:.1f} ms")
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="L in {512, 2048}, 1 repeat, scan forward-only at L=512")
    ap.add_argument("--lengths", default=None, help="comma list of L (default 512,2048,8192)")
    ap.add_argument("--directions", default="causal,bidirectional")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma list of fused,fft,scan")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ndim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's default)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed passes per impl (default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed passes per impl (default 3; --quick 1)")
    ap.add_argument("--scan-repeats", type=int, default=1, help="timed passes of the slow Python scan")
    ap.add_argument("--scan-bwd-max-len", type=int, default=None, help="longest L for the scan's fwd_bwd (2048)")
    ap.add_argument("--scan-fwd-max-len", type=int, default=None, help="longest L for the scan's fwd (all)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per memory subprocess")
    # worker mode
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--L", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--direction", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--passes", default=",".join(PASSES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads is None:
        args.threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)

    lengths = [int(v) for v in args.lengths.split(",")] if args.lengths else ([512, 2048] if args.quick else [512, 2048, 8192])
    args.warmup = 1 if args.warmup is None else args.warmup
    args.repeats = (1 if args.quick else 3) if args.repeats is None else args.repeats
    scan_bwd_max = (0 if args.quick else 2048) if args.scan_bwd_max_len is None else args.scan_bwd_max_len
    scan_fwd_max = (512 if args.quick else max(lengths)) if args.scan_fwd_max_len is None else args.scan_fwd_max_len
    impls = [i for i in args.impls.split(",") if i]
    device = torch.device(args.device)

    extra = {"torch": torch.__version__}
    if "fused" in impls:
        from megatron_ext import kernels

        reason = kernels.unavailable_reason(device)
        if reason is not None:
            log(f"fused kernel unavailable on {device}: {reason}; benchmarking fft / scan only")
            impls.remove("fused")
        elif device.type == "cpu":
            extra["isa"] = kernels.cpu_isa()
    try:
        extra["loadavg_1m_at_start"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass

    for seq_len in lengths:
        for direction in args.directions.split(","):
            config = {"L": seq_len, "direction": direction, "hidden": args.hidden, "ndim": args.ndim,
                      "batch": args.batch, "device": device.type, "threads": args.threads}
            scan_passes = [p for p, cap in (("fwd", scan_fwd_max), ("fwd_bwd", scan_bwd_max)) if seq_len <= cap]
            log(f"L={seq_len} {direction}: timing {', '.join(impls)}")
            times = time_case(args, seq_len, direction, impls, scan_passes)
            mem = {}
            if not args.no_memory:
                for impl in impls:
                    passes = [p for p in PASSES if impl != "scan" or p in scan_passes]
                    if passes:
                        mem[impl] = measure_memory(args, impl, seq_len, direction, passes)
                        log(f"  L={seq_len} {direction} memory {impl}: {mem[impl]}")
            for impl in impls:
                for p in PASSES:
                    cfg = dict(config, **({"isa": extra["isa"]} if impl == "fused" and "isa" in extra else {}))
                    if (impl, p) in times:
                        emit(f"{p}_ms_{impl}", round(times[(impl, p)], 3), "ms", dict(cfg, repeats=(
                            args.scan_repeats if impl == "scan" else args.repeats)))
                    else:
                        cap = scan_bwd_max if p == "fwd_bwd" else scan_fwd_max
                        emit(f"{p}_ms_{impl}", None, "ms", dict(cfg, skipped=(
                            f"python scan {p} capped at L <= {cap} (L sequential Python steps; its backward saves "
                            f"~1 MB per step at hidden 1024)")))
                    if impl in mem and p in mem[impl]:
                        emit(f"{p}_peak_mem_mb_{impl}", round(mem[impl][p], 1), "MB",
                             dict(cfg, method=mem[impl].get("method")))
            if "fused" in impls and "fft" in impls:
                for p in PASSES:
                    emit("speedup_vs_fft", round(times[("fft", p)] / times[("fused", p)], 2), "x",
                         dict(config, **{"pass": p}, **extra))
                    f_mem, ff_mem = mem.get("fused", {}).get(p), mem.get("fft", {}).get(p)
                    if f_mem and ff_mem:
                        emit("mem_ratio_fft_vs_fused", round(ff_mem / f_mem, 2), "x", dict(config, **{"pass": p}))


if __name__ == "__main__":
    main()

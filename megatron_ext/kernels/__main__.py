"""``python -m megatron_ext.kernels build [--cpu-only] [--require-cuda] [--verbose]``: build the
fused kernels into the cache now and print where (exit status 1 if a required library failed).
``python -m megatron_ext.kernels status``: whether each kernel is usable here (builds if needed)."""
from __future__ import annotations

import argparse
import sys

from megatron_ext import kernels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_ext.kernels", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the CPU (and, where possible, CUDA) kernels and print where")
    b.add_argument("--cpu-only", action="store_true", help="do not try the CUDA library")
    b.add_argument("--require-cuda", action="store_true", help="fail when the CUDA library cannot be built")
    b.add_argument("--verbose", action="store_true", help="show the compiler commands")
    sub.add_parser("status", help="print whether each kernel is usable")
    args = parser.parse_args(argv)

    if args.cmd == "status":
        for kind in ("cpu", "cuda"):
            reason = kernels.unavailable_reason(kind)
            print(f"{kind}: {'available' if reason is None else 'unavailable: ' + reason}")
        if kernels.is_available("cpu"):
            print(f"cpu kernel variant: {kernels.cpu_isa()}")
        return 0

    cuda = False if args.cpu_only else (True if args.require_cuda else None)
    print(f"cache root: {kernels.cache_root()}")
    result = kernels.build(cuda=cuda, verbose=args.verbose)
    status = 0
    for kind, info in result.items():
        if info["error"] is None:
            print(f"{kind}: built {info['path']}")
            print(f"{kind}: build directory {info['dir']}")
        else:
            required = kind == "cpu" or args.require_cuda
            print(f"{kind}: {'FAILED' if required else 'skipped'} ({info['error']})")
            status = 1 if required else status
    if "cpu" in result and result["cpu"]["error"] is None:
        print(f"cpu kernel variant: {kernels.cpu_isa()}")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Host (CPU) memory: let glibc's malloc keep freed blocks for reuse instead of unmapping them.

PyTorch's CPU allocator takes every tensor straight from ``malloc``. glibc serves a request above its mmap
threshold (128 KiB at start, raised adaptively up to 32 MiB) with a fresh ``mmap`` and returns it to the kernel
with ``munmap`` when the tensor is freed, so in a training step on CPU nearly every activation, gradient and
logits tensor is new memory that the kernel maps in one 4 KiB page at a time on first write: one minor page fault
per page of every large tensor, every step (the figures are in the README and bench/results). This is the reason Intel's tuning guides run PyTorch CPU
training under jemalloc or tcmalloc (``torch.backends.xeon.run_cpu --enable_jemalloc``); with glibc the same
effect needs no preload, only two ``mallopt`` settings made at run time:

* ``M_MMAP_THRESHOLD`` = 1 GiB: requests below it come from malloc's heap, where a freed block is reused by the
  next request of that size (the same tensor in the next micro-batch) without touching the kernel;
* ``M_TRIM_THRESHOLD`` = 2 GiB - 1: free memory at the top of the heap is not handed back after every step.

The cost is resident memory: the process keeps its heap instead of shrinking between steps, and the heap can
hold more than one step's peak: PyTorch allocates with ``posix_memalign`` (64-byte alignment), for which glibc
looks for a block slightly larger than the one a freed tensor of the same size left, so the first steps leave
holes before the heap settles (a loop dominated by a few large tensors pays the most). Set ``trainer.reuse_host_memory=false`` where
host memory is tight. It is the right trade for a CPU training process, whose peak repeats every step, and the
wrong one for GPU training, where large tensors live on the device and host peaks are one-off (checkpoint
staging); so the trainer applies it by default on CPU only (``trainer.reuse_host_memory``: null = on for CPU runs,
true / false to force). Other C libraries (macOS, musl) have no ``mallopt``: nothing is changed there and
:func:`reuse_host_memory` says so by returning False.

The opposite setting, :func:`exact_host_memory` (``M_MMAP_THRESHOLD`` = 64 KiB fixed, ``M_TRIM_THRESHOLD`` =
128 KiB), makes the resident set follow the bytes the process has allocated: every block above 64 KiB is its own
mapping, unmapped when freed, and the heap is trimmed. ``trainer.plan_check`` measures under it (its peak is what
the run needs, the CPU counterpart of ``torch.cuda.max_memory_allocated``, not what glibc keeps cached: under
:func:`reuse_host_memory` the resident set of a CPU step settles 1.3-1.5x above its allocated peak) and puts the
trainer's setting back after its window (:func:`restore_host_memory`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Optional

log = logging.getLogger("megatron_ext")

# glibc's <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes a C int

EXACT_MMAP_THRESHOLD = 64 << 10
EXACT_TRIM_THRESHOLD = 128 << 10

_applied = False
_mode = "default"  # "default" (glibc's own adaptive thresholds), "reuse", "exact"


def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # not glibc (musl, macOS): their mallopt, if any, means something else
    return libc


def reuse_host_memory() -> bool:
    """Set glibc malloc's mmap and trim thresholds (module docstring) for this process. Returns True when
    applied (or already applied), False where the C library is not glibc. Process-wide and idempotent; memory
    allocated before the call is unaffected, so call it before building the model."""
    global _applied, _mode
    if _applied and _mode == "reuse":
        return True
    if not _mallopt(MMAP_THRESHOLD, TRIM_THRESHOLD):
        return False
    _applied, _mode = True, "reuse"
    return True


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    libc = _glibc()
    if libc is None:
        log.info("host memory: the C library is not glibc; malloc left as it is")
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    if not ok:
        log.warning("host memory: glibc refused mallopt(M_MMAP_THRESHOLD=%d, M_TRIM_THRESHOLD=%d); malloc left as "
                    "it is", mmap_threshold, trim_threshold)
    return ok


def exact_host_memory() -> bool:
    """Make the resident set follow the allocated bytes (module docstring): blocks above 64 KiB mapped and
    unmapped one by one, the heap trimmed now and whenever 128 KiB are free at its top. Returns False where the
    C library is not glibc. :func:`restore_host_memory` undoes it."""
    global _mode
    prev = _mode
    if not _mallopt(EXACT_MMAP_THRESHOLD, EXACT_TRIM_THRESHOLD):
        return False
    _exact_restore[0] = prev
    _mode = "exact"
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    return True


_exact_restore = ["default"]


def restore_host_memory() -> None:
    """After :func:`exact_host_memory`: the setting that was there before (the trainer's
    ``trainer.reuse_host_memory``, else glibc's adaptive thresholds as far as mallopt can give them back: the
    128 KiB start values, which stop adapting once set)."""
    global _mode
    if _mode != "exact":
        return
    if _exact_restore[0] == "reuse":
        _mallopt(MMAP_THRESHOLD, TRIM_THRESHOLD)
    else:
        _mallopt(128 << 10, 128 << 10)
    _mode = _exact_restore[0]


def resolve_reuse_host_memory(setting: Optional[bool], on_cuda: bool) -> bool:
    """``trainer.reuse_host_memory``: None = on for CPU runs, off for GPU runs; True / False force it."""
    return (not on_cuda) if setting is None else bool(setting)


__all__ = ["reuse_host_memory", "exact_host_memory", "restore_host_memory", "resolve_reuse_host_memory",
           "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

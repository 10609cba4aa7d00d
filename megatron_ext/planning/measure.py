"""Ground truth for the planner: the bytes a rank passes to collectives, and the peak memory of a run.

:class:`CollectiveCounter` is a context manager that wraps torch.distributed's tensor collectives and
point-to-point calls while it is active and counts, per call kind and process group, the calls and their bytes.
Every caller is covered, however it reached the function:

* ``torch.distributed.<fn>`` and ``torch.distributed.distributed_c10d.<fn>`` (megatron-core's TP mappings call
  ``torch.distributed.all_reduce``; DeepSpeed's ``deepspeed.comm`` backend calls ``torch.distributed.*`` and
  ``distributed_c10d.all_gather_into_tensor`` / ``_all_gather_base``; its pipeline engine ``send`` / ``recv``);
* module-level aliases bound at import time (megatron-core's ``dist_all_gather_func`` /
  ``dist_reduce_scatter_func`` in ``tensor_parallel.mappings`` and ``utils``; any ``from torch.distributed import
  all_reduce``): every module of torch.distributed, deepspeed, megatron and megatron_ext whose attribute *is* one
  of the functions gets the wrapper;
* functions DeepSpeed's backend stored on itself when it started (``cdb.all_gather_function``,
  ``cdb.reduce_scatter_function``).

A call made from inside another counted call (``_all_gather_base`` calls ``all_gather_single``;
``batch_isend_irecv`` calls ``isend`` / ``irecv``) is counted once, as the outer call. Collectives on a
single-rank group move no data and are not counted. Object collectives (``all_gather_object`` & co.) are not
wrapped: the tensor collectives they make are counted.

**Bytes of a call** (per rank, the nccl-tests convention: the size of the full message): all-reduce, broadcast,
reduce: the tensor; all-gather: the gathered output (group size x this rank's input); reduce-scatter: the
input that is reduced and scattered (group size x this rank's output); send / recv: the tensor. The time such a
call takes is bytes x (n-1)/n / bus bandwidth for all-gather and reduce-scatter, 2 x that for all-reduce
(ring), bytes / bandwidth for send / recv.

**Process group** of a call: ``tp``, ``pp`` or ``dp`` when its ranks are those of this rank's tensor-, pipeline-
or data-parallel group (megatron.core.parallel_state; DeepSpeed builds its own groups over the same ranks, so
ranks are compared, not objects), ``world`` for all ranks, ``other`` otherwise. A send / recv is ``pp`` when the
peer is in this rank's pipeline group. The counter's kinds are ``<group>_<op>`` with op one of ``allreduce``,
``allgather``, ``reduce_scatter``, ``broadcast``, ``reduce``, ``alltoall``, ``send``, ``recv`` (e.g.
``tp_allreduce``, ``dp_reduce_scatter``, ``pp_send``); :meth:`CollectiveCounter.by_kind` adds ``pp_sendrecv`` =
``pp_send`` + ``pp_recv``.

Peak memory: :class:`PeakMemory` -- on CPU the peak of the process's *anonymous* resident memory over the
baseline: ``VmHWM`` (peak resident set; reset at the baseline through ``/proc/self/clear_refs``) minus the resident
set at the baseline, minus the growth of the file-backed resident pages (``RssFile``) since the baseline. Those are
the shared libraries' code and data that the run's first use of a kernel pages in (~20 MiB for a GPT step on this
CPU, whatever the model's size): clean, shared, dropped by the kernel under memory pressure, and not memory the run
allocates -- the counterpart of the CUDA context, which ``max_memory_allocated`` leaves out too. The file-backed
pages only grow and settle in the first step, so the subtraction at the end of the window is exact unless the peak
came before they settled (then it reads up to their last growth low). The raw ``VmHWM`` delta is kept as
``rss_peak_bytes``. On GPU: ``torch.cuda.max_memory_allocated`` minus the allocated bytes at the baseline (peak
statistics reset there).
"""
from __future__ import annotations

import ctypes
import gc
import inspect
import mmap
import sys
import warnings
import threading
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# function name -> op (the counted kind's suffix)
_OPS: Dict[str, str] = {
    "all_reduce": "allreduce",
    "all_reduce_coalesced": "allreduce",
    "all_gather": "allgather",
    "all_gather_into_tensor": "allgather",
    "_all_gather_base": "allgather",
    "all_gather_single": "allgather",
    "all_gather_coalesced": "allgather",
    "reduce_scatter": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter",
    "broadcast": "broadcast",
    "reduce": "reduce",
    "all_to_all": "alltoall",
    "all_to_all_single": "alltoall",
    "send": "send",
    "isend": "send",
    "recv": "recv",
    "irecv": "recv",
    "batch_isend_irecv": "p2p",
}
# module name prefixes whose module-level aliases of these functions are replaced while counting
_MODULE_PREFIXES = ("torch.distributed", "deepspeed", "megatron", "megatron_ext")


def _nbytes(x: Any) -> int:
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _message_bytes(name: str, a: Dict[str, Any]) -> int:
    """The bytes of one call (module docstring), from its bound arguments."""
    if name in ("all_reduce", "broadcast", "reduce", "send", "isend", "recv", "irecv"):
        return _nbytes(a.get("tensor"))
    if name == "all_reduce_coalesced":
        return _nbytes(a.get("tensors"))
    if name == "all_gather":
        return _nbytes(a.get("tensor_list"))
    if name in ("all_gather_into_tensor", "_all_gather_base", "all_gather_single"):
        return _nbytes(a.get("output_tensor"))
    if name == "all_gather_coalesced":
        return _nbytes(a.get("output_tensor_lists"))
    if name == "reduce_scatter":
        return _nbytes(a.get("input_list"))
    if name in ("reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter_single"):
        return _nbytes(a.get("input") if "input" in a else a.get("input_tensor"))
    if name == "all_to_all":
        return _nbytes(a.get("input_tensor_list"))
    if name == "all_to_all_single":
        return _nbytes(a.get("input"))
    return 0


class CollectiveCounter:
    """Counts the collectives and p2p calls of this process while active (module docstring).

    ``with CollectiveCounter() as cc: ...`` then ``cc.by_kind()`` -> ``{kind: bytes}``, ``cc.calls`` ->
    ``{kind: number of calls}``, ``cc.records`` (with ``keep_records=True``) -> every counted call as
    ``(kind, function name, bytes)``, ``cc.by_function`` -> ``{"<kind> <function>": bytes}``. :meth:`pause` stops counting without unwrapping. Not reentrant.
    """

    def __init__(self, keep_records: bool = False):
        self.bytes: Dict[str, int] = defaultdict(int)
        self.calls: Dict[str, int] = defaultdict(int)
        self.by_function: Dict[str, int] = defaultdict(int)  # "<kind> <function>" -> bytes
        self.keep_records = keep_records
        self.records: List[Tuple[str, str, int]] = []
        self.active = False
        self._local = threading.local()
        self._patched: List[Tuple[Any, str, Any]] = []  # (owner, attribute, original)
        self._groups: Optional[Dict[str, frozenset]] = None

    # ---------------------------------------------------------------- install
    def __enter__(self) -> "CollectiveCounter":
        originals = {name: getattr(c10d, name) for name in _OPS if hasattr(c10d, name)}
        by_id = {id(fn): name for name, fn in originals.items()}
        wrappers = {name: self._wrap(name, fn) for name, fn in originals.items()}
        owners: List[Any] = [m for n, m in list(sys.modules.items())
                             if m is not None and n.startswith(_MODULE_PREFIXES)]
        try:  # DeepSpeed's backend keeps the functions it picked at start-up
            from deepspeed.comm import comm as ds_comm

            if getattr(ds_comm, "cdb", None) is not None:
                owners.append(ds_comm.cdb)
        except ImportError:
            pass
        for owner in owners:
            try:
                attrs = list(vars(owner).items())
            except TypeError:
                continue
            for attr, value in attrs:
                name = by_id.get(id(value))
                if name is not None and value is originals[name]:
                    setattr(owner, attr, wrappers[name])
                    self._patched.append((owner, attr, value))
        self._originals = originals
        self._wrappers = wrappers
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, value in reversed(self._patched):
            setattr(owner, attr, value)
        self._patched.clear()
        self.active = False

    def pause(self) -> None:
        self.active = False

    def resume(self) -> None:
        self.active = True

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()
        self.by_function.clear()
        self.records.clear()

    # ---------------------------------------------------------------- counting
    def _wrap(self, name: str, fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        counter = self

        def counted(*args, **kwargs):
            depth = getattr(counter._local, "depth", 0)
            if depth == 0 and counter.active:
                try:
                    bound = sig.bind(*args, **kwargs)
                except TypeError:
                    bound = None  # the call itself will raise
                if bound is not None:
                    counter._count(name, bound.arguments)
            if name == "batch_isend_irecv":  # ops built before the counter started hold the original functions
                for op in (args[0] if args else kwargs.get("p2p_op_list", ())):
                    for orig, wrapped in ((counter._originals.get("isend"), counter._wrappers.get("isend")),
                                          (counter._originals.get("irecv"), counter._wrappers.get("irecv"))):
                        if getattr(op, "op", None) is orig:
                            op.op = wrapped
            counter._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                counter._local.depth = depth

        counted.__wrapped__ = fn  # type: ignore[attr-defined]
        counted.__name__ = getattr(fn, "__name__", name)
        counted.__doc__ = fn.__doc__
        return counted

    def _count(self, name: str, a: Dict[str, Any]) -> None:
        if name == "batch_isend_irecv":
            for op in a.get("p2p_op_list", ()):
                fn_name = getattr(getattr(op, "op", None), "__name__", "")
                which = "isend" if "send" in fn_name else "irecv"
                self._add(which, op.group, op.peer, _nbytes(op.tensor))
            return
        peer = None
        if name in ("send", "isend", "recv", "irecv"):
            key = "dst" if "send" in name else "src"
            peer = a.get(key)
            if peer is None and a.get(f"group_{key}") is not None:  # a rank within ``group``
                peer = dist.get_global_rank(a["group"], a[f"group_{key}"])
        self._add(name, a.get("group"), peer, _message_bytes(name, a))

    def _group_ranks(self) -> Dict[str, frozenset]:
        if self._groups is None:
            groups: Dict[str, frozenset] = {}
            try:
                from megatron.core import parallel_state as ps

                if ps.model_parallel_is_initialized():
                    for label, get in (("tp", ps.get_tensor_model_parallel_group),
                                       ("pp", ps.get_pipeline_model_parallel_group),
                                       ("dp", ps.get_data_parallel_group)):
                        groups[label] = frozenset(dist.get_process_group_ranks(get()))
            except ImportError:
                pass
            self._groups = groups
        return self._groups

    def _label(self, group, peer: Optional[int]) -> Optional[str]:
        """``tp`` / ``pp`` / ``dp`` / ``world`` / ``other``, or None for a single-rank group."""
        if group is None or group is c10d.GroupMember.WORLD:
            ranks = frozenset(range(dist.get_world_size()))
        else:
            ranks = frozenset(dist.get_process_group_ranks(group))
        groups = self._group_ranks()
        if peer is not None:  # p2p: the peer's global rank
            for label in ("pp", "tp", "dp"):
                if label in groups and peer in groups[label]:
                    return label
            return "world"
        if len(ranks) <= 1:
            return None
        for label in ("tp", "pp", "dp"):
            if groups.get(label) == ranks:
                return label
        return "world" if len(ranks) == dist.get_world_size() else "other"

    def _add(self, name: str, group, peer: Optional[int], nbytes: int) -> None:
        label = self._label(group, peer)
        if label is None:
            return
        kind = f"{label}_{_OPS[name]}"
        self.bytes[kind] += nbytes
        self.calls[kind] += 1
        self.by_function[f"{kind} {name}"] += nbytes
        if self.keep_records:
            self.records.append((kind, name, nbytes))

    def by_kind(self) -> Dict[str, int]:
        """Bytes per kind, with ``pp_sendrecv`` = ``pp_send`` + ``pp_recv`` when there is pipeline traffic."""
        out = dict(self.bytes)
        if "pp_send" in out or "pp_recv" in out:
            out["pp_sendrecv"] = out.get("pp_send", 0) + out.get("pp_recv", 0)
        return out


# -------------------------------------------------------------------- memory
_PAGE = 4096
_mincore = None


def _resident_bytes(ptr: int, nbytes: int) -> int:
    """Bytes of ``[ptr, ptr + nbytes)`` that are resident (Linux ``mincore``), or ``nbytes`` where that cannot be
    asked. A tensor the process has allocated but never written (DeepSpeed's ZeRO-3 reduce bucket is
    ``reduce_bucket_size`` elements, whatever the model's size) holds address space, not memory."""
    global _mincore, _PAGE
    if _mincore is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.mincore
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            fn.restype = ctypes.c_int
            _mincore, _PAGE = fn, mmap.PAGESIZE
        except (OSError, AttributeError):
            _mincore = False
    if not _mincore:
        return nbytes
    start = ptr - ptr % _PAGE
    pages = (ptr + nbytes - start + _PAGE - 1) // _PAGE
    vec = (ctypes.c_ubyte * pages)()
    if _mincore(start, pages * _PAGE, vec) != 0:
        return nbytes
    resident = sum(b & 1 for b in vec) * _PAGE
    return min(resident, nbytes)


def live_tensor_bytes() -> int:
    """Resident bytes of every CPU tensor storage alive in this process that Python can reach (each storage once:
    views and parameters sharing a flat buffer are counted once): the garbage collector's tensors and the
    gradients of its leaf tensors. A storage of 1 MiB or more counts its resident pages (``mincore``), a smaller
    one its size."""
    gc.collect()
    seen: Dict[int, int] = {}

    def add(t) -> None:
        try:
            if t.device.type != "cpu" or t.is_meta:
                return
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / nested / functional wrappers: no plain storage
            return
        ptr = st.data_ptr()
        if ptr and ptr not in seen:
            n = st.nbytes()
            seen[ptr] = _resident_bytes(ptr, n) if n >= (1 << 20) else n

    with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated reduce_op object warns
        warnings.simplefilter("ignore")
        for o in gc.get_objects():
            if torch.is_tensor(o):
                add(o)
                g = o.grad if o.is_leaf else None  # a gradient set from C++ (DeepSpeed's masters) has no Python object
                if g is not None:
                    add(g)
    return sum(seen.values())


def proc_status_kib(field: str) -> Optional[int]:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``, ``RssFile``...), None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_host_peak() -> bool:
    """Reset the process's peak resident set (``VmHWM``) to its current resident set (Linux: writing 5 to
    ``/proc/self/clear_refs``). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of this process since :meth:`start` (the baseline), in bytes (module docstring).

    CPU: ``VmHWM - VmRSS(at start) - (RssFile(now) - RssFile(at start))``, with the high-water mark reset at start
    (where the kernel refuses the reset, the mark is the process's lifetime peak and ``reset`` is False); GPU:
    ``torch.cuda.max_memory_allocated - memory_allocated(at start)``, with the peak statistics reset at start."""

    def __init__(self, device: Optional[torch.device] = None):
        self.device = device if device is not None else torch.device("cpu")
        self.baseline: Optional[int] = None
        self.file_baseline = 0
        self.held = 0
        self.reset = False

    def start(self, held_bytes: int = 0) -> "PeakMemory":
        """Take the baseline now. ``held_bytes``: memory already held at the baseline that the peak is to include
        (the trainer's CPU plan check passes :func:`live_tensor_bytes` taken after the engine is built)."""
        self.held = int(held_bytes)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.reset = True
        else:
            self.reset = reset_host_peak()
            rss = proc_status_kib("VmRSS")
            if rss is None:
                raise RuntimeError("peak host memory needs /proc/self/status (Linux)")
            self.baseline = rss * 1024
            self.file_baseline = (proc_status_kib("RssFile") or 0) * 1024
        return self

    def rss_peak_bytes(self) -> int:
        """CPU: the raw ``VmHWM`` delta over the baseline (file-backed pages included); GPU: :meth:`peak_bytes`."""
        if self.baseline is None:
            raise RuntimeError("PeakMemory.rss_peak_bytes() before start()")
        if self.device.type == "cuda":
            return self.peak_bytes()
        return (proc_status_kib("VmHWM") or 0) * 1024 - self.baseline

    def file_growth_bytes(self) -> int:
        """CPU: the growth of the file-backed resident pages since the baseline (0 on GPU)."""
        if self.device.type == "cuda" or self.baseline is None:
            return 0
        return max((proc_status_kib("RssFile") or 0) * 1024 - self.file_baseline, 0)

    def peak_bytes(self) -> int:
        """The peak since :meth:`start`, over the baseline."""
        if self.baseline is None:
            raise RuntimeError("PeakMemory.peak_bytes() before start()")
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device)) - self.baseline + self.held
        return self.rss_peak_bytes() - self.file_growth_bytes() + self.held

    def current_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device)) - (self.baseline or 0)
        return (proc_status_kib("VmRSS") or 0) * 1024 - (self.baseline or 0) - self.file_growth_bytes()

"""Checkpoints written in the background (``exp_manager.checkpoint_callback_params.async_save=true``).

The training step pays only for a host snapshot of the state:

- :func:`capture_saves` replaces the ``save`` of a DeepSpeed engine's checkpoint engine for the duration of
  ``engine.save_checkpoint``: each state dict DeepSpeed would serialize (module, optimizer / ZeRO partitions,
  scheduler, client state) is copied to host memory (:func:`host_snapshot`) and kept with its path instead.
- :class:`BackgroundSaver` then runs the rest of the save on one background thread: serialize and write each
  captured file, ``fsync`` it, and commit (the cross-rank check, ``meta.json``, the rename, ``latest``). The commit's
  collectives go over a process group of its own, so they never interleave with the training step's.

At most one save is in flight: the next save, and the end of training, wait for the previous one (saying what
they wait for every 30 s). An error in the background is raised in the training thread at the next save or at the
end, as a CheckpointError naming the checkpoint; ``latest`` then still names the previous complete checkpoint,
since it only ever moves once every rank's files are written and synced.

Host memory: the snapshot is a copy of everything the checkpoint holds on this rank (parameters, fp32 masters,
optimizer moments); it stays allocated between saves and is refilled in place by the next one (allocating it
afresh each time costs more than the copy).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from megatron_ext.errors import CheckpointError

log = logging.getLogger(__name__)

WAIT_REPORT_S = 30.0


def host_snapshot(obj: Any, into: Any = None) -> Any:
    """A copy of ``obj`` whose tensors are host-memory tensors that training never updates (never views of live
    state), with dicts, lists and tuples rebuilt around them; other values are kept (numbers, strings, DeepSpeed's
    small config objects: training does not change them in place).

    ``into``: the snapshot of the same file from the previous save, already written. A tensor at the same place
    with the same shape and dtype is refilled in place instead of allocated again: fresh host memory is faulted in
    page by page, which costs more than the copy itself."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if isinstance(into, torch.Tensor) and into.shape == t.shape and into.dtype == t.dtype and \
                into.device.type == "cpu" and into.stride() == t.stride():
            return into.copy_(t)
        return t.to("cpu", copy=True)
    if isinstance(obj, dict):
        prev = into if isinstance(into, dict) else {}
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            out[k] = host_snapshot(v, prev.get(k))
        return out
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        prev = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else [None] * len(obj)
        items = [host_snapshot(v, p) for v, p in zip(obj, prev)]
        return items if isinstance(obj, list) else tuple(items)
    return obj


@contextlib.contextmanager
def patched_saves(engine, save: Callable[[Any, str, Callable], None], clone_first: Optional[bool] = None):
    """While active, DeepSpeed writes every checkpoint file (model, optimizer / ZeRO partitions, pipeline layers)
    through ``save(state_dict, path, inner)`` instead of its checkpoint engine's own ``save`` (``inner``, which
    ``save`` may call); ``clone_first`` False tells DeepSpeed not to clone tensors before (its
    ``preserves_storage_sharing``). The engine's own methods are restored after."""
    ce = engine.checkpoint_engine
    names = ("save",) + (("preserves_storage_sharing",) if clone_first is not None else ())
    saved = {name: vars(ce)[name] for name in names if name in vars(ce)}
    inner = ce.save
    ce.save = lambda state_dict, path: save(state_dict, path, inner)
    if clone_first is not None:
        ce.preserves_storage_sharing = lambda: clone_first
    try:
        yield
    finally:
        for name in names:
            if name in saved:
                setattr(ce, name, saved[name])
            else:
                delattr(ce, name)


@contextlib.contextmanager
def capture_saves(engine, previous: Optional[dict] = None):
    """While active, every file DeepSpeed would write is recorded as ``(path, snapshot)`` in the yielded list
    instead (``previous``: file name -> that file's snapshot from the last save, refilled in place where it fits).
    DeepSpeed does not clone tensors first: the snapshot is the one copy."""
    captured: List[Tuple[str, Any]] = []
    previous = previous or {}

    def save(state_dict, path, _inner):
        captured.append((str(path), host_snapshot(state_dict, previous.get(os.path.basename(str(path))))))

    with patched_saves(engine, save, clone_first=False):
        yield captured


class _HashingWriter:
    """A binary file that hashes (sha256) and counts what is written through it."""

    def __init__(self, f):
        self.f, self.size, self.h = f, 0, hashlib.sha256()

    def write(self, b) -> int:
        self.h.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def write_synced(path: str, obj: Any) -> Dict[str, Any]:
    """``torch.save(obj)`` to ``path``, flushed and fsync'd before returning; returns the file's ``{"size",
    "sha256"}`` (as :func:`megatron_ext.checkpoint.manifest.hash_file` would, without reading it back)."""
    with open(path, "wb") as f:
        w = _HashingWriter(f)
        torch.save(obj, w)
        f.flush()
        os.fsync(f.fileno())
    return {"size": w.size, "sha256": w.h.hexdigest()}


class BackgroundSaver:
    """One background save at a time; errors reach the training thread at the next :meth:`submit` or :meth:`finish`.

    ``submit(label, job)`` waits for the save in flight, then runs ``job()`` on a new (non-daemon) thread, so an
    interpreter that is exiting still finishes writing the checkpoint."""

    def __init__(self, wait_report_s: float = WAIT_REPORT_S):
        self.wait_report_s = wait_report_s
        self._thread: Optional[threading.Thread] = None
        self._label = ""
        self._error: Optional[BaseException] = None
        self.last_blocking_s = 0.0  # how long the last submit waited for the save before it

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, label: str, job: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        self.wait(f"the next checkpoint ({label})")
        self.last_blocking_s = time.perf_counter() - t0
        self._raise_pending()
        self._label = label
        self._thread = threading.Thread(target=self._run, args=(job,), name=f"checkpoint {label}", daemon=False)
        self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # kept for the training thread, which reports it
            self._error = e

    def wait(self, waiter: str = "the end of training") -> None:
        """Block until the save in flight is written, logging every ``wait_report_s`` what is waited for."""
        if self._thread is None:
            return
        t0 = time.monotonic()
        while True:
            self._thread.join(timeout=self.wait_report_s)
            if not self._thread.is_alive():
                break
            log.info("%s waits for checkpoint %s to finish writing (%.0f s so far)", waiter, self._label,
                     time.monotonic() - t0)
        self._thread = None

    def finish(self) -> None:
        """Wait for the last save and raise its error, if any."""
        self.wait()
        self._raise_pending()

    def _raise_pending(self) -> None:
        err, self._error = self._error, None
        if err is None:
            return
        if isinstance(err, CheckpointError):
            raise err
        raise CheckpointError(f"writing checkpoint {self._label} in the background failed: "
                              f"{(str(err).splitlines() or [type(err).__name__])[0]}") from err

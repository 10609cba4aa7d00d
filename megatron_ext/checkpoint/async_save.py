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

Host memory: a snapshot holds a copy of everything the checkpoint holds on this rank (parameters, fp32 masters,
optimizer moments) until it is written.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, List, Optional, Tuple

import torch

from megatron_ext.errors import CheckpointError

log = logging.getLogger(__name__)

WAIT_REPORT_S = 30.0


def host_snapshot(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are fresh host-memory tensors (never views of live training state), with
    dicts, lists and tuples rebuilt around them; other values are kept (they are not updated in place by training:
    numbers, strings, and DeepSpeed's small config objects)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, host_snapshot(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: host_snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [host_snapshot(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(host_snapshot(v) for v in obj)
    return obj


@contextlib.contextmanager
def capture_saves(engine):
    """While active, ``engine.checkpoint_engine.save(state_dict, path)`` records ``(path, host_snapshot(state))``
    in the yielded list instead of writing; the engine's own ``save`` is restored after."""
    ce = engine.checkpoint_engine
    captured: List[Tuple[str, Any]] = []
    own = "save" in vars(ce)
    previous = vars(ce).get("save")

    def save(state_dict, path: str):
        captured.append((str(path), host_snapshot(state_dict)))

    ce.save = save
    try:
        yield captured
    finally:
        if own:
            ce.save = previous
        else:
            del ce.save


def write_synced(path: str, obj: Any) -> None:
    """``torch.save(obj)`` to ``path``, flushed and fsync'd before returning."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

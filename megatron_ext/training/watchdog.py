"""The step watchdog (``trainer.step_timeout_minutes``): a training step that takes too long makes every rank dump
its Python stacks into ``<run_dir>/stacks/rank<R>.txt`` and the job exit with status 4 (EXIT_STEP_TIMEOUT), with
one line naming the ranks that were waiting in a collective and those that were not.

Each rank runs a thread of its own, independent of any collective (a hung collective blocks the training thread,
not this one: torch.distributed releases the GIL while it waits). The training loop marks the start of each step
(``begin``); validation and checkpoint writing are not timed (``paused``), the rest of the iteration is (the loss
sync, logging, the preemption check's all-reduce). When the current step has
run longer than the timeout, the thread

1. writes a header (rank, step, seconds, where the training thread is) and ``faulthandler.dump_traceback`` of all
   threads to its stack file. Whether the training thread waits in a collective is read from its current Python
   stack: a frame of ``torch.distributed`` or ``deepspeed.comm`` (on GPU an NCCL wait shows up at the next host
   synchronisation instead, which the line names);
2. waits up to ``PEER_WAIT_S`` for every rank's file (the run directory is shared, as for checkpoints);
3. the lowest rank that wrote a file composes the line (ranks without a file: "not responding" -- stopped, dead, or
   stuck in native code that holds the GIL) and prints it, or, in workers started by ``trainer.devices=N``
   (self-launch), hands it to the parent in a JSON file (``REPORT_ENV``): the parent knows which of its workers
   is stopped (SIGSTOP), makes such a worker dump its stacks too (``DUMP_SIGNAL`` + SIGCONT: the handler
   ``faulthandler.register`` installed at start writes them in C), and prints the one line;
4. every rank exits with status 4 (``os._exit``: the training thread cannot be unwound from a hung collective).

This module imports only the standard library at module level: the self-launching parent uses it without the
training stack.
"""
from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional

log = logging.getLogger("megatron_ext")

EXIT_STEP_TIMEOUT = 4
REPORT_ENV = "MEGATRON_EXT_STEP_TIMEOUT_REPORT"  # set by the self-launching parent: where the reporter writes
DUMP_SIGNAL = signal.SIGUSR2  # a worker's stacks on demand (faulthandler, in C: works while the GIL is held)
PEER_WAIT_S = 10.0
STACKS = "stacks"
_END = "# end of stacks\n"
_HEADER = "# megatron_ext step timeout "
RESUMED_GAP_S = 2.0  # a poll that comes this much later than due: the process was stopped in between
RESUMED_WAIT_S = 1.0

# frames of these files mean "inside a collective / point-to-point exchange"
_COLLECTIVE_PATHS = (os.sep + os.path.join("torch", "distributed") + os.sep,
                     os.sep + os.path.join("deepspeed", "comm") + os.sep)
_OURS = os.sep + "megatron_ext" + os.sep
# our own hooks inside the step (not where the caller is): the line names the trainer's frame instead
_INSTRUMENTS = tuple(os.path.join("training", n) for n in ("stragglers.py", "watchdog.py", "faults.py"))


def stacks_path(stacks_dir: str, rank: int) -> str:
    return os.path.join(stacks_dir, f"rank{rank}.txt")


def where(frame) -> Dict[str, Any]:
    """{"collective": bool, "where": "..."} of a thread's current frame: the outermost torch.distributed /
    deepspeed.comm function (when waiting in one) or the innermost function, with the nearest caller in
    megatron_ext."""
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()  # outermost first
    is_comm = [any(p in f.f_code.co_filename for p in _COLLECTIVE_PATHS) for f in frames]
    coll = None
    if any(is_comm):  # name the collective itself (all_reduce), not torch's logging wrapper around it
        i = is_comm.index(True)
        run = [f for f, c in zip(frames[i:], is_comm[i:]) if c]
        coll = next((f for f in run if "wrapper" not in f.f_code.co_name and f.f_code.co_name != "inner"
                     and not f.f_code.co_name.startswith("_")), run[0])
    target = coll if coll is not None else (frames[-1] if frames else None)
    if target is None:
        return {"collective": False, "where": "unknown"}
    ours = None
    for f in frames:
        if f is target:
            break
        if _OURS in f.f_code.co_filename and not f.f_code.co_filename.endswith(_INSTRUMENTS):
            ours = f
    if target is not None and _OURS in target.f_code.co_filename:
        ours = None
    name = target.f_code.co_name
    text = f"{name} at {_short(target.f_code.co_filename)}:{target.f_lineno}"
    if ours is not None:
        text += f", called from {ours.f_code.co_name} at {_short(ours.f_code.co_filename)}:{ours.f_lineno}"
    return {"collective": coll is not None, "where": text}


def _short(path: str) -> str:
    for mark in (_OURS, os.sep + "site-packages" + os.sep):
        i = path.rfind(mark)
        if i >= 0:
            return path[i + 1:] if mark == _OURS else path[i + len(mark):]
    return path


def read_header(path: str) -> Optional[Dict[str, Any]]:
    """The JSON header of a complete stack file (None when missing, incomplete, or a signal-only dump)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    i = text.rfind(_HEADER)  # (after a dump the launcher asked for, when the rank then timed out itself)
    if i < 0 or not text.endswith(_END):
        return None
    try:
        return json.loads(text[i + len(_HEADER):text.index("\n", i)])
    except ValueError:
        return None


def compose_line(report: Dict[str, Any], notes: Optional[Dict[int, str]] = None) -> str:
    """The one line of a step timeout (``report``: what the reporting rank gathered; ``notes``: rank -> what the
    launcher knows of a rank that did not respond, e.g. 'stopped')."""
    notes = notes or {}
    t = report["timeout_minutes"]

    def ranks(items):
        return ", ".join(f"rank {r} ({w})" for r, w in items)

    coll = [(int(r), w) for r, w in sorted(report["collective"].items(), key=lambda kv: int(kv[0]))]
    comp = [(int(r), w) for r, w in sorted(report["not_collective"].items(), key=lambda kv: int(kv[0]))]
    silent = [(r, notes.get(r, "no stack dump within %gs: stopped, dead, or stuck in native code holding the GIL"
                            % PEER_WAIT_S)) for r in sorted(report["silent"])]
    parts = [f"waiting in a collective: {ranks(coll) or 'none'}", f"not in a collective: {ranks(comp) or 'none'}"]
    if silent:
        parts.append(f"not responding: {ranks(silent)}")
    return (f"error: step {report['step']} exceeded trainer.step_timeout_minutes={t:g} ({t * 60:g} s); "
            + "; ".join(parts) + f"; stacks in {report['stacks_dir']}")


class StepWatchdog:
    """One per rank; see the module docstring. ``begin(step)`` / ``idle()`` from the training thread; ``close()``
    at the end of training."""

    def __init__(self, timeout_minutes: float, rank: int, world: int, stacks_dir: str,
                 report_file: Optional[str] = None, poll_s: Optional[float] = None, peer_wait_s: float = PEER_WAIT_S):
        self.timeout_s = float(timeout_minutes) * 60.0
        self.timeout_minutes = float(timeout_minutes)
        self.rank, self.world, self.stacks_dir = rank, world, stacks_dir
        self.report_file = report_file
        self.poll_s = poll_s if poll_s is not None else min(1.0, max(0.05, self.timeout_s / 20))
        self.peer_wait_s = peer_wait_s
        self._step: Optional[int] = None
        self._t0: Optional[float] = None
        self._waited_step: Optional[int] = None  # the step whose dump waited once after the process was resumed
        self._thread_id: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._file = None
        self._registered = False

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Open this rank's stack file (the run directory's ``stacks/``, made ready by ``prepare_dir``), register
        the on-demand dump signal, start the thread."""
        os.makedirs(self.stacks_dir, exist_ok=True)
        self._file = open(stacks_path(self.stacks_dir, self.rank), "w")
        if threading.current_thread() is threading.main_thread():
            faulthandler.register(DUMP_SIGNAL, file=self._file, all_threads=True, chain=False)
            self._registered = True
        self._thread = threading.Thread(target=self._run, name=f"step-watchdog-rank{self.rank}", daemon=True)
        self._thread.start()

    def begin(self, step: int) -> None:
        """The training thread starts step ``step`` (its clock starts now)."""
        self._thread_id = threading.get_ident()
        self._step = step
        self._t0 = time.monotonic()

    def idle(self) -> None:
        """Not in a step (training has ended): not timed."""
        self._t0 = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Validation and checkpoint writing inside a step's iteration: not timed; the clock goes on after."""
        t0, start = self._t0, time.monotonic()
        self._t0 = None
        try:
            yield
        finally:
            if t0 is not None:
                self._t0 = t0 + (time.monotonic() - start)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._registered:
            faulthandler.unregister(DUMP_SIGNAL)
            self._registered = False
        if self._file is not None:
            self._file.close()
            self._file = None
            path = stacks_path(self.stacks_dir, self.rank)
            try:
                if os.path.getsize(path) == 0:
                    os.remove(path)
                    os.rmdir(self.stacks_dir)  # fails while another rank's file is there: fine
            except OSError:
                pass

    # ---------------------------------------------------------------- the thread
    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            resumed, last = now - last > self.poll_s + RESUMED_GAP_S, now
            if resumed and self._waited_step != self._step:  # once per step: a late poll never holds off the dump
                # the process was stopped (SIGSTOP) and has just been continued: the launcher continues a stopped
                # worker right after asking it for its stacks (DUMP_SIGNAL), which faulthandler writes into this
                # rank's file from C as the process runs again; our own dump would interleave with it, so it
                # waits a moment and comes after
                self._waited_step = self._step
                time.sleep(RESUMED_WAIT_S)
                last = time.monotonic()
                continue
            t0 = self._t0
            if t0 is not None and time.monotonic() - t0 > self.timeout_s:
                try:
                    self._fire(time.monotonic() - t0)
                finally:
                    os._exit(EXIT_STEP_TIMEOUT)

    def _fire(self, elapsed: float) -> None:
        frame = sys._current_frames().get(self._thread_id) if self._thread_id is not None else None
        state = where(frame) if frame is not None else {"collective": False, "where": "unknown"}
        header = {"rank": self.rank, "step": self._step, "elapsed_s": round(elapsed, 1), "pid": os.getpid(),
                  "host": os.uname().nodename, **state}
        f = self._file
        f.write(_HEADER + json.dumps(header) + "\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.write(_END)
        f.flush()
        os.fsync(f.fileno())
        # every rank's file, or PEER_WAIT_S
        deadline = time.monotonic() + self.peer_wait_s
        headers: Dict[int, Dict[str, Any]] = {self.rank: header}
        while True:
            for r in range(self.world):
                if r not in headers:
                    h = read_header(stacks_path(self.stacks_dir, r))
                    if h is not None:
                        headers[r] = h
            if len(headers) == self.world or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if min(headers) != self.rank:
            return  # a lower rank reports
        report = {"step": self._step, "timeout_minutes": self.timeout_minutes, "stacks_dir": self.stacks_dir,
                  "collective": {str(r): h["where"] for r, h in headers.items() if h.get("collective")},
                  "not_collective": {str(r): h["where"] for r, h in headers.items() if not h.get("collective")},
                  "silent": [r for r in range(self.world) if r not in headers]}
        if self.report_file:
            tmp = self.report_file + ".tmp"
            with open(tmp, "w") as out:
                json.dump(report, out)
            os.replace(tmp, self.report_file)
        else:
            with_stdout_flushed()
            print(compose_line(report), file=sys.stderr, flush=True)


def with_stdout_flushed() -> None:
    try:
        sys.stdout.flush()
    except Exception:
        pass


def prepare_dir(run_dir: str, rank: int) -> str:
    """``<run_dir>/stacks`` for this attempt (rank 0 moves an earlier attempt's dumps to ``stacks.N`` so they are
    never overwritten; the caller makes the other ranks wait for that). Returns the path."""
    path = os.path.join(run_dir, STACKS)
    if rank == 0 and os.path.isdir(path) and os.listdir(path):
        n = 1
        while os.path.exists(f"{path}.{n}"):
            n += 1
        os.rename(path, f"{path}.{n}")
        log.info("step watchdog: moved the stack dumps of an earlier attempt to %s.%d", path, n)
    return path


def for_trainer(trainer) -> Optional[StepWatchdog]:
    """The started watchdog of a trainer's run (None when trainer.step_timeout_minutes is null)."""
    minutes = trainer.cfg.trainer.get("step_timeout_minutes")
    if minutes is None:
        return None
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    stacks_dir = prepare_dir(trainer.exp.run_dir, trainer.rank)
    if world > 1:
        dist.barrier()  # rank 0 has moved an earlier attempt's dumps away
    wd = StepWatchdog(minutes, trainer.rank, world, stacks_dir, report_file=os.environ.get(REPORT_ENV) or None)
    wd.start()
    log.info("step watchdog: a step longer than trainer.step_timeout_minutes=%g (%g s) dumps every rank's stacks "
             "to %s and exits with status %d", minutes, minutes * 60, stacks_dir, EXIT_STEP_TIMEOUT)
    return wd


# ----------------------------------------------------------------------------------------------- the launcher side
def launcher_report(report_file: str, procs: List[Any], wait_s: float, proc_state) -> Optional[str]:
    """In the self-launching parent after a worker exited with status 4: make stopped workers dump their stacks
    (DUMP_SIGNAL, then SIGCONT), wait up to ``wait_s`` for the reporter's JSON, and return the one line (None when
    no worker reported: the caller prints its own)."""
    stopped = {}
    for r, p in enumerate(procs):
        if p.poll() is None and proc_state(p.pid).startswith("stopped"):
            stopped[r] = p
    deadline = time.monotonic() + wait_s
    while not os.path.exists(report_file) and time.monotonic() < deadline:
        if all(p.poll() is not None for p in procs):
            break
        time.sleep(0.1)
    report = None
    try:
        with open(report_file) as f:
            report = json.load(f)
    except (OSError, ValueError):
        pass
    notes = {}
    for r, p in stopped.items():
        for sig in (DUMP_SIGNAL, signal.SIGCONT):
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
        notes[r] = "stopped (SIGSTOP?); the launcher took its stacks"
    if stopped and report is not None:
        # the stopped workers' faulthandler writes their stacks once they run again
        paths = [stacks_path(report["stacks_dir"], r) for r in stopped]
        end = time.monotonic() + 3.0
        while time.monotonic() < end and not all(os.path.exists(x) and os.path.getsize(x) > 0 for x in paths):
            time.sleep(0.05)
        time.sleep(0.2)
    if report is None:
        return None
    return compose_line(report, notes)

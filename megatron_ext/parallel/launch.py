"""Starting the worker processes, and failing clearly when one of them dies or hangs.

* :func:`maybe_self_launch` — ``python pretrain_gpt.py trainer.devices=N`` outside any launcher starts the N
  workers itself (as NeMo/Lightning users expect): the same command, re-run N times with RANK, WORLD_SIZE,
  LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and a free MASTER_PORT set. The parent waits; when a worker fails
  it stops the others and names the rank that failed. SIGTERM / SIGUSR1 to the parent are forwarded to the
  workers (they checkpoint and exit 75 together, and so does the parent); ``trainer.max_restarts`` restarts all
  workers after a failure (resuming from the latest checkpoint). Under torchrun, the deepspeed launcher or SLURM
  (see ``read_dist_env``) nothing is started: the launcher's environment is used.
* :func:`report_dist_failures` — turns the errors torch.distributed raises when a peer died or a collective
  timed out into one line ``error: rank R: ...`` and exit status 3 (instead of a stack trace, or a hang).
* :func:`strip_launcher_args` — drops the ``--local_rank=N`` argument the deepspeed launcher appends, which
  Hydra would reject.

Exit statuses of the entry points: 2 = bad input (config, data), 3 = a collective failed or timed out, 4 = a step
exceeded ``trainer.step_timeout_minutes`` (``megatron_ext.training.watchdog``: every rank's stacks in
``<run_dir>/stacks/``; with self-launch the parent prints the one line naming the ranks that waited in a collective,
those that did not and those that did not respond, e.g. a stopped worker, whose stacks it takes too), 75 = preempted
(SIGTERM/SIGUSR1): a checkpoint of the last step was written, requeue the job (``EXIT_REQUEUE``).
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence

from megatron_ext.config.loader import check_config, validate_config
from megatron_ext.errors import ConfigError
from megatron_ext.parallel.state import _free_port as fp, read_dist_env, use_cuda
from megatron_ext.training import watchdog
from megatron_ext.training.exp_manager import resolve_run_dir

EXIT_DIST_FAILURE = 3
EXIT_STEP_TIMEOUT = watchdog.EXIT_STEP_TIMEOUT  # 4: a step exceeded trainer.step_timeout_minutes
EXIT_BAD_INPUT = 2
# EXIT_REQUEUE = 75: preempted (SIGTERM / SIGUSR1), every rank stopped after the same step and a checkpoint of it was
# written; requeue the job (EX_TEMPFAIL). RESTART_ENV: set in the workers on a restart by the self-launcher
# (trainer.max_restarts) or the per-task SLURM template. Defined next to the code that stops the run (a leaf module
# that imports no torch), used here.
from megatron_ext.training.preemption import EXIT_REQUEUE, RESTART_ENV, Preempted, write_requeue_file  # noqa: E402
# set in the workers a self-launching parent starts: its pid (the workers die with it)
PARENT_ENV = "MEGATRON_EXT_LAUNCH_PARENT"
LAUNCH_DOC = "launch/ (torchrun.sh, deepspeed.sh, slurm_*.sbatch; README 'Multi-process and multi-node')"


# ----------------------------------------------------------------------------------------------- arguments
def strip_launcher_args(argv: List[str]) -> List[str]:
    """Remove ``--local_rank=N`` / ``--local-rank N`` (appended by the deepspeed launcher; LOCAL_RANK is in the
    environment anyway). Returns a new list."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if i > 0 and re.fullmatch(r"--local[_-]rank(=\d+)?", a):
            skip = "=" not in a and i + 1 < len(argv) and argv[i + 1].isdigit()
            continue
        out.append(a)
    return out


_VERSION_OVERRIDE = re.compile(r"^(\+\+|\+)?exp_manager\.version=")


def _child_command(version: Optional[str]) -> List[str]:
    """The command line of this process, for the workers: same interpreter flags, script and overrides, with
    ``exp_manager.version`` pinned (every worker must write to the same run directory)."""
    args = list(sys.argv[1:])
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            # a sweep: the workers run this job only (its overrides), not the whole sweep
            cfg_flags, it = [], iter(sys.argv[1:])
            for a in it:
                if a in ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"):
                    cfg_flags += [a, next(it, "")]
                elif a.split("=", 1)[0] in ("--config-path", "--config-name", "--config-dir"):
                    cfg_flags.append(a)
            args = cfg_flags + list(hc.overrides.task)
    except Exception:  # not under Hydra (tests, notebooks): sys.argv as is
        pass
    if version is not None:
        args = [a for a in args if not _VERSION_OVERRIDE.match(a)] + [f"exp_manager.version={version}"]
    orig = list(getattr(sys, "orig_argv", []))
    n_user = len(sys.argv) - 1
    if orig and len(orig) > n_user and orig[len(orig) - n_user:] == sys.argv[1:]:
        # interpreter flags and the script (or -m module / -c code) exactly as they were given
        prefix = [sys.executable] + orig[1:len(orig) - n_user]
    else:
        prefix = [sys.executable, os.path.abspath(sys.argv[0])]
    return prefix + args


def _original_cwd() -> str:
    try:
        from hydra.utils import get_original_cwd

        return get_original_cwd()
    except Exception:
        return os.getcwd()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _free_port() -> int:
    return fp()


def _pinned_version(cfg) -> Optional[str]:
    """The run version every worker must use (exp_manager.version, else what rank 0 would pick: the newest version
    with a checkpoint for resume_if_exists, or a new unique start-time directory, created here). A ConfigError
    (``exp_dir`` is a file, ...) reaches the user before any worker starts; the lock is taken by worker rank 0."""
    em = cfg.exp_manager
    if em.version is not None:
        return None  # already the same in every worker

    return os.path.basename(resolve_run_dir(em, 0))


# ----------------------------------------------------------------------------------------------- self-launch
def _die_with_parent() -> None:
    """In a worker started by :func:`maybe_self_launch`: exit when the parent dies (Linux), so a killed parent
    never leaves workers waiting in a collective."""
    ppid = os.environ.get(PARENT_ENV)
    if not ppid:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        return
    if os.getppid() != int(ppid):  # the parent died before prctl
        os._exit(1)


def maybe_self_launch(cfg, schema=None) -> Optional[int]:
    """Start ``trainer.devices`` workers when that is > 1 and no launcher started this process.

    Returns None when this process should train itself (one device, or it is a worker / was started by a
    launcher), else the exit status for the parent (0 when every worker succeeded). First checks the whole config
    (``check_config``, ``validate_config``: schema, architecture, world size) and raises ConfigError for a bad one,
    before any worker process or process group starts; also for ``trainer.num_nodes > 1`` without a launcher.
    """
    denv = read_dist_env()
    if denv.launched:
        _die_with_parent()
    # every config error here, before any worker process or process group starts (the workers check again)
    checked = check_config(cfg, schema) if schema is not None else check_config(cfg)
    t = checked.trainer
    on_cuda = use_cuda(t.accelerator)
    if denv.launched:
        validate_config(checked, denv.world_size, on_cuda)
        if t.max_restarts and not os.environ.get(PARENT_ENV):
            raise ConfigError(
                f"trainer.max_restarts={t.max_restarts} restarts the processes this command starts itself (no "
                f"launcher); under a launcher use its own restarts: torchrun --max-restarts (launch/torchrun.sh and "
                f"launch/slurm_torchrun.sbatch: MAX_RESTARTS=N), launch/slurm_per_task.sbatch: MAX_RESTARTS=N"
            )
        return None
    if t.num_nodes is not None and t.num_nodes > 1:
        raise ConfigError(
            f"trainer.num_nodes={t.num_nodes} but no launcher started this process (no RANK/WORLD_SIZE or SLURM "
            f"tasks in the environment): a multi-node run needs torchrun, the deepspeed launcher or SLURM to start "
            f"the processes on every node; see {LAUNCH_DOC}"
        )
    validate_config(checked, t.devices * t.num_nodes, on_cuda)  # trainer.devices < 1 etc. -> ConfigError
    if t.devices == 1 and not t.max_restarts:
        return None  # (with restarts, one process is started as a worker too, so that it can be restarted)
    if on_cuda:
        import torch

        n_gpu = torch.cuda.device_count()
        if t.devices > n_gpu:
            raise ConfigError(f"trainer.devices={t.devices} but only {n_gpu} GPU(s) are visible on this machine")
    nprocs = int(t.devices)
    env = dict(os.environ)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(nprocs),
               LOCAL_WORLD_SIZE=str(nprocs), GROUP_RANK="0", NODE_RANK="0", **{PARENT_ENV: str(os.getpid())})
    if not on_cuda and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, _cpu_count() // nprocs))
    cmd = _child_command(_pinned_version(cfg))
    print(f"[launch] starting {nprocs} processes on this machine (MASTER_PORT={env['MASTER_PORT']}"
          + (f", OMP_NUM_THREADS={env['OMP_NUM_THREADS']}" if "OMP_NUM_THREADS" in env else "")
          + (f", up to {t.max_restarts} restarts" if t.max_restarts else "") + ")",
          file=sys.stderr, flush=True)
    if t.get("step_timeout_minutes") is None:
        return run_with_restarts(cmd, nprocs, env, cwd=_original_cwd(), max_restarts=int(t.max_restarts))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mext-launch-") as tmp:  # the step watchdog's report comes here
        report = os.path.join(tmp, "step_timeout.json")
        env[watchdog.REPORT_ENV] = report
        return run_with_restarts(cmd, nprocs, env, cwd=_original_cwd(), max_restarts=int(t.max_restarts),
                                 step_timeout_report=report)


# exit statuses after which restarting cannot help (or is not wanted): ok, bad input, preempted, interrupted
NO_RESTART = (0, EXIT_BAD_INPUT, EXIT_REQUEUE, 130)


def run_with_restarts(cmd: Sequence[str], nprocs: int, env: Dict[str, str], cwd: Optional[str] = None,
                      max_restarts: int = 0, **kw) -> int:
    """:func:`run_workers`, and after a failure start all workers again, up to ``max_restarts`` times, each time
    with ``MEGATRON_EXT_RESTART_COUNT`` = the restart number (the workers then resume from the latest checkpoint of
    the run directory, ``training.preemption.apply_restart``) and a fresh MASTER_PORT. One line per restart names
    its cause. Exit statuses in :data:`NO_RESTART` (bad input, preempted, interrupted) and a terminated parent end
    the run at once."""
    attempt = 0
    while True:
        info: Dict[str, object] = {}
        e = dict(env)
        if attempt:
            e.update({RESTART_ENV: str(attempt), "MASTER_PORT": str(_free_port())})
        rc = run_workers(cmd, nprocs, e, cwd=cwd, info=info, **kw)
        if rc in NO_RESTART or info.get("terminated") or attempt >= max_restarts:
            if rc not in NO_RESTART and max_restarts and attempt >= max_restarts and not info.get("terminated"):
                print(f"[launch] giving up after {attempt} restart(s) (trainer.max_restarts={max_restarts}): the last "
                      f"attempt ended with status {rc}", file=sys.stderr, flush=True)
            return rc
        attempt += 1
        cause = str(info.get("line") or f"exit status {rc}").removeprefix("error: ")
        print(f"[launch] restart {attempt}/{max_restarts} (trainer.max_restarts) after: {cause}; starting the {nprocs} "
              f"processes again, resuming from the latest checkpoint", file=sys.stderr, flush=True)


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _proc_state(pid: int) -> str:
    """'stopped' (SIGSTOP / traced), 'running' ... from /proc; '' when unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return {"T": "stopped", "t": "stopped (traced)", "D": "in uninterruptible sleep", "Z": "exiting"}.get(
            state, "running")
    except (OSError, IndexError):
        return ""


class _Terminated(Exception):
    def __init__(self, sig: int):
        self.sig = sig


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM (and SIGCONT, so a stopped worker sees it) to every live worker; SIGKILL after ``grace_s``."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        for sig in (signal.SIGTERM, signal.SIGCONT):
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


def _failure_line(failed: Dict[int, int], still_running: Dict[int, str]) -> tuple[str, int]:
    """One line naming the rank that failed first, and the parent's exit status. ``failed`` (rank -> returncode)
    is in the order the failures were seen; a rank that exited with status 3 only saw a peer fail, so another
    failure is preferred as the cause."""
    order = {r: i for i, r in enumerate(failed)}
    rank, rc = min(failed.items(), key=lambda item: (item[1] == EXIT_DIST_FAILURE, order[item[0]]))
    if rc < 0:
        what = f"rank {rank} was killed by {_signame(-rc)}"
        if -rc == signal.SIGKILL:
            what += " (out of memory? see dmesg)"
        status = 1
    elif rc == EXIT_DIST_FAILURE:
        what = f"rank {rank} exited with status 3 (a collective failed or timed out; see its error above)"
        status = rc
    elif rc == EXIT_STEP_TIMEOUT:
        what = (f"rank {rank} exited with status 4 (a step exceeded trainer.step_timeout_minutes; its stacks are in "
                f"the run directory's stacks/)")
        status = rc
    else:
        what = f"rank {rank} exited with status {rc} (see its output above)"
        status = rc
    others = [f"rank {r} {'was killed by ' + _signame(-c) if c < 0 else 'exited with status %d' % c}"
              for r, c in sorted(failed.items()) if r != rank]
    hung = [f"rank {r} was still running ({s or 'running'}{': hung?' if rc == EXIT_DIST_FAILURE else ''})"
            for r, s in sorted(still_running.items()) if rc == EXIT_DIST_FAILURE or s.startswith("stopped")]
    tail = "; ".join(others + hung + (["stopped the other ranks"] if still_running else []))
    return f"error: {what}" + (f"; {tail}" if tail else ""), status


def run_workers(cmd: Sequence[str], nprocs: int, env: Dict[str, str], cwd: Optional[str] = None,
                grace_s: float = 10.0, settle_s: float = 3.0, poll_s: float = 0.1,
                info: Optional[Dict[str, object]] = None, wait_note_s: float = 30.0,
                step_timeout_report: Optional[str] = None) -> int:
    """Run ``cmd`` as ranks 0..nprocs-1 (RANK and LOCAL_RANK set on top of ``env``) and wait.

    All exit 0 -> 0. When one fails, the others are stopped (SIGTERM, SIGKILL after ``grace_s``) and one line
    ``error: rank R ...`` names the rank that failed first; the return value is its exit status (1 for a
    signal). A rank that exits with status 3 only reports that a collective failed (another rank died or hung):
    after the first failure the parent waits up to ``settle_s`` for the other ranks to exit on their own (so the
    rank that caused it can be named, and the others can print what they saw) before it stops them.
    SIGTERM or SIGUSR1 to the parent is forwarded to every worker: they agree to stop after the same step, write a
    checkpoint and exit 75 (``EXIT_REQUEUE``), which is then the parent's status too (not a failure); the parent
    says what it waits for every ``wait_note_s``. A second SIGTERM stops the workers at once (return 143); Ctrl-C
    stops them (return 130). ``info`` (optional) receives ``line`` (the failure line) and ``terminated``. With
    ``step_timeout_report`` (the file the workers' step watchdog reports to, ``watchdog.REPORT_ENV``) a worker's
    exit status 4 makes the parent print the watchdog's one line instead, with the workers it finds stopped named
    (and their stacks taken).
    """
    procs: List[subprocess.Popen] = []
    info = {} if info is None else info
    if step_timeout_report:
        with contextlib.suppress(FileNotFoundError):
            os.remove(step_timeout_report)  # an earlier attempt's (trainer.max_restarts)
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers only work there
    old_int = signal.getsignal(signal.SIGINT)
    old_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    received: List[int] = []

    def on_term(signum, frame):
        if received and signum == signal.SIGTERM:
            raise _Terminated(signum)  # the second one: stop now
        received.append(signum)

    try:
        # The workers ignore SIGINT (a Ctrl-C reaches the whole process group): the parent stops them instead.
        # A disposition of "ignore" is inherited across exec, and Python then keeps it.
        if main_thread:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for rank in range(nprocs):
                e = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
                procs.append(subprocess.Popen(list(cmd), env=e, cwd=cwd))
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, old_int if old_int is not None else signal.default_int_handler)
        if main_thread:
            for sig in old_handlers:
                signal.signal(sig, on_term)
        failed: Dict[int, int] = {}
        first_fail_t: Optional[float] = None
        forwarded, note_t, sig_t = 0, 0.0, 0.0
        while True:
            if len(received) > forwarded:  # forward each signal once, outside the handler
                for sig in received[forwarded:]:
                    live = [p for p in procs if p.poll() is None]
                    for p in live:
                        with contextlib.suppress(ProcessLookupError):
                            p.send_signal(sig)
                            p.send_signal(signal.SIGCONT)
                    print(f"[launch] {_signame(sig)}: forwarded to {len(live)} worker processes; they stop after their "
                          f"current step, write a checkpoint and exit {EXIT_REQUEUE} (send SIGTERM again to stop them "
                          f"at once)", file=sys.stderr, flush=True)
                forwarded, note_t = len(received), time.monotonic()
                sig_t = sig_t or note_t
            rcs = [p.poll() for p in procs]
            for rank, rc in enumerate(rcs):
                if rc not in (None, 0, EXIT_REQUEUE) and rank not in failed:
                    failed[rank] = rc
                    first_fail_t = first_fail_t or time.monotonic()
            if not failed and all(rc in (0, EXIT_REQUEUE) for rc in rcs):
                if EXIT_REQUEUE in rcs:
                    print(f"[launch] preempted: the workers wrote a checkpoint and exited {EXIT_REQUEUE} (requeue "
                          f"the job: it resumes from that checkpoint)", file=sys.stderr, flush=True)
                    return EXIT_REQUEUE
                return 0
            if received and not failed and time.monotonic() - note_t >= wait_note_s:
                waiting = [r for r, rc in enumerate(rcs) if rc is None]
                print(f"[launch] waiting for ranks {waiting} to finish their step and write the checkpoint "
                      f"({time.monotonic() - sig_t:.0f} s since the signal)", file=sys.stderr, flush=True)
                note_t = time.monotonic()
            if failed and step_timeout_report and EXIT_STEP_TIMEOUT in failed.values():
                line = watchdog.launcher_report(step_timeout_report, procs, watchdog.PEER_WAIT_S + 5.0,
                                                _proc_state)
                if line is not None:
                    info["line"] = line
                    _stop(procs, grace_s)
                    print(line, file=sys.stderr, flush=True)
                    return EXIT_STEP_TIMEOUT
            if failed:
                # give the other ranks a moment to exit on their own (and print what they saw) before stopping them
                all_done = all(rc is not None for rc in rcs)
                if all_done or time.monotonic() - first_fail_t >= settle_s:
                    running = {r: _proc_state(p.pid) for r, p in enumerate(procs) if p.poll() is None}
                    line, status = _failure_line(failed, running)
                    info["line"] = line
                    _stop(procs, grace_s)
                    print(line, file=sys.stderr, flush=True)
                    return status
            time.sleep(poll_s)
    except KeyboardInterrupt:
        info["terminated"] = True
        _stop(procs, grace_s)
        print(f"interrupted: stopped {len(procs)} worker processes", file=sys.stderr, flush=True)
        return 130
    except _Terminated as t:
        info["terminated"] = True
        _stop(procs, grace_s)
        print(f"terminated by {_signame(t.sig)}: stopped {len(procs)} worker processes", file=sys.stderr, flush=True)
        return 128 + t.sig
    finally:
        if main_thread:
            for sig, old in old_handlers.items():
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
        for p in procs:  # never leave a worker behind
            if p.poll() is None:
                p.kill()
                p.wait()


# ----------------------------------------------------------------------------------------------- failures
# What torch.distributed / gloo / NCCL say when a peer went away or a collective took too long.
_TIMEOUT_PATTERNS = ("timed out", "timeout", "deadline exceeded")
_PEER_PATTERNS = (
    "connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
    "remote worker crash", "failed to recv", "failed to send", "ncclremoteerror", "nccl communicator was aborted",
    "processgroupnccl", "processgroupgloo", "gloo/transport", "socket",
)


def _dist_rank() -> str:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return str(dist.get_rank())
    except Exception:
        pass
    env = os.environ
    return env.get("RANK") or env.get("SLURM_PROCID") or "?"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    line = text.splitlines()[0].strip()
    line = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", line)  # gloo's "[/path/pair.cc:553] " prefix
    line = re.split(r"\s+(?:This is typically caused|Check the logs|GLHF)", line, maxsplit=1)[0]  # gloo's advice
    return line[:300]


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def describe_dist_failure(e: BaseException, timeout_minutes: Optional[float] = None) -> Optional[str]:
    """One line ``error: rank R: ...`` when ``e`` (or what caused it) is a failed or timed-out collective;
    None for any other error (which the caller re-raises)."""
    try:
        from torch.distributed import DistError
    except ImportError:  # pragma: no cover
        DistError = ()  # type: ignore[assignment]
    hit = None
    for x in _chain(e):
        msg = str(x).lower()
        if isinstance(x, DistError) or (isinstance(x, RuntimeError) and (
                any(p in msg for p in _PEER_PATTERNS) or ("gloo" in msg or "nccl" in msg)
                and any(p in msg for p in _TIMEOUT_PATTERNS))):
            hit = x
            break
    if hit is None:
        return None
    msg = str(hit).lower()
    t = ""
    if timeout_minutes is not None:
        t = f"trainer.dist_timeout_minutes={timeout_minutes:g} ({timeout_minutes * 60:g} s)"
    t = t or "trainer.dist_timeout_minutes"
    if any(p in msg for p in _TIMEOUT_PATTERNS):
        what = (f"a collective operation timed out after {t}: another rank probably hung or died (check the other "
                f"ranks' output)")
    else:
        what = (f"a collective operation failed: another rank probably died or hung (check the other ranks' "
                f"output; a hang is detected after {t})")
    return f"error: rank {_dist_rank()}: {what}. Underlying error: {_first_line(hit)}"


@contextlib.contextmanager
def report_dist_failures(timeout_minutes: Optional[float] = None) -> Iterator[None]:
    """Run the body; if it fails because a collective failed or timed out, print one ``error: rank R: ...`` line
    and exit with status 3 at once (``os._exit``: after such a failure, interpreter shutdown can hang or abort in
    the communication library's threads). Any other exception propagates."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - classified below, re-raised when not a distributed failure
        line = describe_dist_failure(e, timeout_minutes)
        if line is None:
            raise
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        print(line, file=sys.stderr, flush=True)
        os._exit(EXIT_DIST_FAILURE)


# ----------------------------------------------------------------------------------------------- entry points
def run_training(fit, timeout_minutes: Optional[float] = None) -> int:
    """The training entry points' body: ``fit()`` inside :func:`report_dist_failures`; returns 0, or
    :data:`EXIT_REQUEUE` after a preemption (``training.preemption.Preempted``: the checkpoint is written; rank 0
    prints one line and writes ``MEGATRON_EXT_REQUEUE_FILE`` when the SLURM templates set it)."""
    try:
        with report_dist_failures(timeout_minutes):
            fit()
    except Preempted as p:
        if _dist_rank() in ("0", "?"):
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            print(f"preempted: {p}", file=sys.stderr, flush=True)
            write_requeue_file(str(p))
        return EXIT_REQUEUE
    return 0

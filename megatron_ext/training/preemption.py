"""Preemption and restarts: stop at an agreed step boundary on SIGTERM / SIGUSR1, and resume after a restart.

* :class:`PreemptionHandler` -- installed by the trainer for the training loop. SIGTERM or SIGUSR1 (SLURM's
  ``--signal=USR1@120``, torchrun's and the self-launcher's forwarding, ``kill``) only sets a flag. At every step
  boundary the ranks all-reduce that flag (MAX of one int32 over the default process group: the one tiny collective
  this adds per step), so a signal to any one rank stops every rank after the same step; the trainer then writes a
  checkpoint of that step (an async save in flight is waited for), and the process exits with
  :data:`EXIT_REQUEUE` (75, ``EX_TEMPFAIL``: "preempted, checkpoint written, requeue me").
* :func:`apply_restart` -- a worker restarted by torchrun (``TORCHELASTIC_RESTART_COUNT`` > 0), by the
  self-launcher (``trainer.max_restarts``) or by the per-task SLURM template (``MEGATRON_EXT_RESTART_COUNT`` > 0)
  resumes from the latest checkpoint of the same run directory even without ``exp_manager.resume_if_exists``
  (said in the log). With ``exp_manager.version`` null the directory is found again from the marker rank 0 wrote
  in it (:data:`ELASTIC_MARKER`: torchrun's run id, ``TORCHELASTIC_RUN_ID``).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Optional

log = logging.getLogger("megatron_ext")

# preempted: a checkpoint of the last step was written; requeue the job (EX_TEMPFAIL). Re-exported by
# megatron_ext.parallel.launch next to the other exit statuses.
EXIT_REQUEUE = 75
RESTART_ENV = "MEGATRON_EXT_RESTART_COUNT"  # set by the self-launcher and the per-task SLURM template on a restart

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
ELASTIC_MARKER = ".elastic_run_id"  # in the run directory: torchrun's TORCHELASTIC_RUN_ID of the run that made it
REQUEUE_FILE_ENV = "MEGATRON_EXT_REQUEUE_FILE"  # the SLURM templates: rank 0 writes it before exiting 75


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


class Preempted(Exception):
    """Raised by the trainer after the preemption checkpoint is written; the entry point exits 75."""

    def __init__(self, step: int, signame: str, checkpoint: Optional[str]):
        where = f"checkpoint {checkpoint}" if checkpoint else "no new checkpoint (none is configured)"
        super().__init__(f"preempted by {signame}: stopped after step {step}; {where}; exit status {EXIT_REQUEUE} "
                         f"(requeue the job: it resumes from that checkpoint)")
        self.step, self.signame, self.checkpoint = step, signame, checkpoint


class PreemptionHandler:
    """The flag set by SIGTERM/SIGUSR1, and the per-step agreement on it. ``install`` / ``uninstall`` around the
    training loop (main thread only; elsewhere the handler is inert and says so)."""

    def __init__(self, device=None):
        self.device = device
        self.signum: Optional[int] = None  # the first signal received on this rank
        self.received_at: Optional[float] = None
        self._old: dict = {}
        self._flag = None  # the int32 tensor all-reduced at every step boundary

    # -------------------------------------------------------------- signals
    def _handler(self, signum, frame) -> None:  # only sets the flag: no I/O, no locks, nothing that can block
        if self.signum is None:
            self.signum = signum
            self.received_at = time.monotonic()

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption: signal handlers need the main thread; SIGTERM/SIGUSR1 keep their default action")
            return False
        for sig in PREEMPT_SIGNALS:
            self._old[sig] = signal.signal(sig, self._handler)
        return True

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old = {}

    # -------------------------------------------------------------- agreement
    def should_stop(self) -> Optional[str]:
        """At a step boundary, on every rank: the name of the signal when any rank received one (all ranks get the
        same answer), else None. One all-reduce of one int32 over the default group when the world is > 1."""
        import torch
        import torch.distributed as dist

        mine = int(self.signum or 0)
        if dist.is_initialized() and dist.get_world_size() > 1:
            if self._flag is None:
                self._flag = torch.zeros(1, dtype=torch.int32, device=self.device)
            self._flag.fill_(mine)
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
            got = int(self._flag.item())
        else:
            got = mine
        if not got:
            return None
        return _signame(got) + ("" if mine else " (received by another rank)")


# ------------------------------------------------------------------------------------------------ restarts
def restart_count() -> int:
    """How many times this worker group was restarted (torchrun's TORCHELASTIC_RESTART_COUNT, or ours)."""
    for key in ("TORCHELASTIC_RESTART_COUNT", RESTART_ENV):
        try:
            n = int(os.environ.get(key, "0") or 0)
        except ValueError:
            n = 0
        if n > 0:
            return n
    return 0


def _who_restarted() -> str:
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return (f"torchrun restarted this worker group (TORCHELASTIC_RESTART_COUNT="
                f"{os.environ['TORCHELASTIC_RESTART_COUNT']}, --max-restarts="
                f"{os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')})")
    return f"restart {os.environ.get(RESTART_ENV)} ({RESTART_ENV}, trainer.max_restarts / MAX_RESTARTS)"


def apply_restart(cfg) -> Optional[str]:
    """On a restarted worker: set ``exp_manager.resume_if_exists`` and ``resume_ignore_no_checkpoint`` (the run goes
    on from its latest checkpoint, or starts again in its own directory when it had none). Returns the log line, or
    None when this is not a restart. Called before the run directory is resolved."""
    if restart_count() == 0:
        return None
    em = cfg.exp_manager
    forced = not em.resume_if_exists
    em.resume_if_exists = True
    em.resume_ignore_no_checkpoint = True
    return (f"{_who_restarted()}: resuming from the latest checkpoint of the same run directory"
            + (" (exp_manager.resume_if_exists=true for this restart)" if forced else ""))


def elastic_version(base: str) -> Optional[str]:
    """On a torchrun restart with ``exp_manager.version`` null: the version directory under ``base`` that this
    torchrun run made (its :data:`ELASTIC_MARKER` holds ``TORCHELASTIC_RUN_ID``; the newest such marker), or None."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) <= 0 or not os.path.isdir(base):
        return None
    best, best_t = None, -1.0
    for d in os.listdir(base):
        path = os.path.join(base, d, ELASTIC_MARKER)
        try:
            with open(path) as f:
                if f.read().strip() != run_id:
                    continue
            t = os.path.getmtime(path)
        except OSError:
            continue
        if t > best_t:
            best, best_t = d, t
    return best


def record_elastic_run(run_dir: str) -> None:
    """Rank 0 under torchrun: write torchrun's run id into the run directory (see :func:`elastic_version`)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id:
        with open(os.path.join(run_dir, ELASTIC_MARKER), "w") as f:
            f.write(run_id + "\n")


def write_requeue_file(text: str) -> None:
    """Rank 0, before exiting 75: the SLURM templates requeue the job when this file exists (srun's own exit status
    can hide a task's 75 when another task was killed, and torchrun turns it into 1)."""
    path = os.environ.get(REQUEUE_FILE_ENV)
    if path:
        try:
            with open(path, "w") as f:
                f.write(text + "\n")
        except OSError as e:
            log.warning("preemption: cannot write %s=%s (%s); the job is requeued on exit status %d only",
                        REQUEUE_FILE_ENV, path, e.strerror or e, EXIT_REQUEUE)

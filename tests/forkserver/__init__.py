"""Start and stop the test suite's fork server (``server.py``; the client is ``client.py``).

Most of a test's subprocess (``python pretrain_gpt.py ...``, a tool, a torchrun worker) is the ~4 s import of torch,
megatron-core and DeepSpeed, plus ~1 s of interpreter teardown at exit. :func:`start` runs one server per test
session that imports them once and forks a child per command; :attr:`ForkServer.python` is a ``python`` shim that
tests use where they would use ``sys.executable``. A command the server cannot run faithfully (see client.py)
runs in the real interpreter, so the shim is always safe to use; tests about processes themselves (signals to
process groups, ``/proc`` state, start-up imports, memory) use ``sys.executable``.

``MEGATRON_EXT_TEST_FORKSERVER=0`` turns it off (every command in a real interpreter);
``MEGATRON_EXT_TEST_FORKSERVER_KEEP=1`` keeps its directory: ``server.log`` (one line per forked command) and
``real.log`` (each command the shim ran in the real interpreter, and why).
"""
import importlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SWITCH = "MEGATRON_EXT_TEST_FORKSERVER"


class ForkServer:
    def __init__(self, directory, proc, python):
        self.directory = directory
        self.proc = proc
        self.python = python

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.environ.get(SWITCH + "_KEEP"):  # the server's log and the list of commands run for real stay
            print(f"fork server logs: {self.directory}", file=sys.stderr)
        else:
            shutil.rmtree(self.directory, ignore_errors=True)


def start():
    """Start the server in the background (it is ready in a few seconds; until then the shim runs the real
    interpreter) and return it, or None when it is switched off or cannot be used (a CUDA machine: forking after
    CUDA is initialised is unsafe)."""
    if os.environ.get(SWITCH) == "0":
        return None
    import torch

    importlib.import_module("megatron_ext")  # sets DS_ACCELERATOR here, so every subprocess's environment has it

    if torch.cuda.is_available():
        return None
    # a Unix socket's path has at most 107 bytes: a long TMPDIR falls back to /tmp
    directory = tempfile.mkdtemp(prefix="mext-forkserver-")
    if len(os.path.join(directory, "socket")) > 100:
        os.rmdir(directory)
        directory = tempfile.mkdtemp(prefix="mext-fs-", dir="/tmp")
    sock, ready, shim = (os.path.join(directory, n) for n in ("socket", "ready", "python"))
    with open(shim, "w") as f:
        f.write("#!/bin/sh\nexec " + " ".join(shlex.quote(a) for a in (
            sys.executable, "-I", "-S", os.path.join(HERE, "client.py"), sock, ready, sys.executable, shim)) +
            ' "$@"\n')
    os.chmod(shim, 0o755)
    # OpenMP reads OMP_NUM_THREADS when it loads: one thread in the server (no thread pool to lose in a fork); each
    # child sets its own (its OMP_NUM_THREADS, else what a fresh interpreter would use)
    env = dict(os.environ, OMP_NUM_THREADS="1", FORKSERVER_DEFAULT_THREADS=str(torch.get_num_threads()))
    log = open(os.path.join(directory, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "server.py"), sock, ready], env=env,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return ForkServer(directory, proc, shim)

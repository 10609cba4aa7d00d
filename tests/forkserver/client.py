"""The client side of the test fork server (``server.py``): what the generated ``python`` shim runs.

``python -I -S client.py SOCKET READY_FILE REAL_PYTHON SHIM ARGS...`` behaves like ``REAL_PYTHON ARGS...``: when the
request can be forked (``ARGS`` is ``[-u] [-B] [-W opt]... (SCRIPT | -m MODULE | -c CODE) ...``, the start-only
environment matches the server's, the process is not a self-launched worker, the server is up and agrees) it
sends the request with its stdin / stdout / stderr, forwards the signals it receives to the forked child, and
exits with the child's status (killing itself with the child's signal, as a shell would report it); otherwise
it ``exec``s the real interpreter with ``ARGS``. Standard library only: it starts in ~20 ms.
"""
import array
import json
import os
import signal
import socket
import struct
import sys

# Environment read when a process starts or a library loads (the C runtime, OpenMP, the interpreter, torch's
# logging, compiler settings): a request whose values differ from the server's runs in a real interpreter.
START_ONLY_PREFIXES = ("LD_", "MALLOC_", "GLIBC_", "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "PYTHONHASHSEED",
                       "PYTHONMALLOC", "PYTHONHOME", "PYTHONOPTIMIZE", "PYTHONIOENCODING", "PYTHONUTF8",
                       "PYTHONNOUSERSITE", "PYTHONSAFEPATH", "PYTHONINSPECT", "PYTHONVERBOSE", "PYTHONDEVMODE",
                       "PYTHONTRACEMALLOC", "PYTHONPROFILEIMPORTTIME", "PYTHONSTARTUP", "PYTHONEXECUTABLE",
                       "TORCH_LOGS", "TORCH_SHOW_CPP_STACKTRACES", "TORCH_CPP_LOG_LEVEL", "TORCH_COMPILE",
                       "TORCHDYNAMO", "TORCHINDUCTOR", "DS_ACCELERATOR", "LANG", "LC_")
# the thread counts are applied in the child (torch.set_num_threads sets OpenMP's and MKL's); torch sets
# TORCHINDUCTOR_CACHE_DIR itself when its compiler is first used (a test that did so in pytest passes it on)
APPLIED_IN_CHILD = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCHINDUCTOR_CACHE_DIR")
# a worker started by megatron_ext's own launcher asks to die with its parent (prctl PR_SET_PDEATHSIG, SIGTERM)
# and exits if os.getppid() is not that parent: the forked child sees the client's parent as its own
# (os.getppid), and the client asks for the death signal the worker asks for (then forwards it)
SELF_LAUNCHED_WORKER = "MEGATRON_EXT_LAUNCH_PARENT"
RLIMITS = ("RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_CPU")
# set to 0 to run every command in a real interpreter
SWITCH = "MEGATRON_EXT_TEST_FORKSERVER"
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCONT")


def start_only(env):
    return {k: v for k, v in env.items() if k.startswith(START_ONLY_PREFIXES) and k not in APPLIED_IN_CHILD}


def parse(args):
    """(mode, flags, rest) of ``python ARGS``, or None when the arguments need a real interpreter."""
    unbuffered = dont_write_bytecode = False
    warnoptions = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-u":
            unbuffered = True
        elif a == "-B":
            dont_write_bytecode = True
        elif a == "-W" and i + 1 < len(args):
            warnoptions.append(args[i + 1])
            i += 1
        elif a.startswith("-W") and len(a) > 2:
            warnoptions.append(a[2:])
        elif a in ("-m", "-c") and i + 1 < len(args):
            return ("module" if a == "-m" else "code"), (unbuffered, dont_write_bytecode, warnoptions), args[i + 1:]
        elif a.startswith("-"):
            return None
        else:
            return "script", (unbuffered, dont_write_bytecode, warnoptions), args[i:]
        i += 1
    return None


def recv_exact(conn, n):
    """``n`` bytes from ``conn``; EOFError when the peer closes first."""
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _recv(conn):
    """One message (a 4-byte length, then JSON); None when the server closes the connection first."""
    try:
        (n,) = struct.unpack("!I", recv_exact(conn, 4))
        return json.loads(recv_exact(conn, n))
    except EOFError:
        return None


def main():
    sock_path, ready_file, real, shim = sys.argv[1:5]
    args = sys.argv[5:]

    def real_interpreter(why):
        _log(os.path.join(os.path.dirname(sock_path), "real.log"), f"{why}: {' '.join(args)[:300]}")
        os.execv(real, [real] + args)

    env = dict(os.environ)
    parsed = parse(args)
    if parsed is None:
        real_interpreter("interpreter options")
    if env.get(SWITCH) == "0":
        real_interpreter(f"{SWITCH}=0")
    try:
        with open(ready_file) as f:
            ready = json.load(f)
    except (OSError, ValueError):
        real_interpreter("the server is not ready")
    mine = start_only(env)
    if mine != ready["start_only"]:
        diff = sorted(k for k in set(mine) | set(ready["start_only"]) if mine.get(k) != ready["start_only"].get(k))
        real_interpreter(f"start-only environment differs ({', '.join(diff)})")
    mode, (unbuffered, dont_write_bytecode, warnoptions), rest = parsed
    ignore = [name for name in FORWARDED if signal.getsignal(getattr(signal, name)) == signal.SIG_IGN]
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    import resource

    rlimits = {name: resource.getrlimit(getattr(resource, name)) for name in RLIMITS}
    if SELF_LAUNCHED_WORKER in env:
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:
            real_interpreter("a self-launched worker (no prctl)")
        if str(os.getppid()) != env[SELF_LAUNCHED_WORKER]:
            os._exit(1)  # the parent died before prctl, as the worker itself would see it
    req = {"mode": mode, "argv": rest, "env": env, "cwd": os.getcwd(), "umask": _umask(), "ignore": ignore,
           "ppid": os.getppid(), "rlimits": rlimits, "unbuffered": unbuffered,
           "dont_write_bytecode": dont_write_bytecode, "warnoptions": warnoptions, "shim": shim}
    data = json.dumps(req).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(sock_path)
        conn.sendmsg([struct.pack("!I", len(data))],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        conn.sendall(data)
        reply = _recv(conn)
    except OSError:
        reply = None
    if reply is None or "pid" not in reply:
        conn.close()
        real_interpreter(f"the server refused: {(reply or {}).get('fallback', 'no answer')}")
    pid = reply["pid"]

    def forward(signum, frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for name in FORWARDED:
        if name not in ignore:
            signal.signal(getattr(signal, name), forward)
    done = _recv(conn)
    if done is None or "status" not in done:
        sys.stderr.write(f"forkserver client: the server went away while pid {pid} ran ({' '.join(args)[:200]})\n")
        os._exit(1)
    status = done["status"]
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be caught, nor given a handler
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def _log(path, line):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line.replace("\n", " ") + "\n").encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


if __name__ == "__main__":
    main()

"""A fork server for the test suite: imports the training stack once, then runs each ``python ...`` command of a
test as a forked child of itself, so the command does not pay the ~4 s import of torch, megatron-core and DeepSpeed.

Started by ``tests/conftest.py`` (one per session) as ``python server.py SOCKET READY_FILE``; the client
(``client.py``, run through the generated ``python`` shim) sends a request over the Unix socket SOCKET: the
arguments after ``python``, environment, working directory, umask, signals to ignore, and its stdin / stdout /
stderr file descriptors. The server checks the request can be served (see ``_refusal``), forks, and the child
becomes that command: the descriptors on 0/1/2, the environment, cwd, ``sys.argv``, ``sys.path`` of a fresh
interpreter given that command, then the script / module / code runs as ``__main__`` and the child leaves through
the interpreter's normal exit (atexit handlers, thread joins, flushing). The server sends the child's pid, then
its wait status, to the client, which forwards signals to the child and exits the way the child did. A client
that goes away (killed, timed out) takes its child with it (SIGKILL).

What differs from a real interpreter start, by design (see README, "Tests"): the modules in ``PRELOAD`` are
already imported (their import-time warnings are not printed again), and every child has the server's string
hash seed. Environment variables that only take effect at process start (``client.START_ONLY_PREFIXES``) and
interpreter options other than ``-u``, ``-B`` and ``-W`` make the client run the real interpreter instead.
"""
import io
import json
import os
import select
import signal
import socket
import struct
import sys
import time

from client import recv_exact, start_only

# what the entry points, tools and test workers import; each costs a subprocess ~4 s of CPU on this machine
PRELOAD = [
    "torch", "numpy", "megatron.core", "megatron.core.tensor_parallel", "megatron.core.parallel_state", "deepspeed",
    "hydra", "omegaconf", "torch.distributed.run", "megatron_ext", "megatron_ext.training.trainer",
    "megatron_ext.training.gpt_task", "megatron_ext.training.bart_task", "megatron_ext.checkpoint.loader",
    "megatron_ext.inference.lm", "megatron_ext.cli.generate", "megatron_ext.cli.evaluate",
    "megatron_ext.cli.convert_checkpoint", "megatron_ext.parallel.launch",
]


def _recv_request(conn):
    """(request dict, [fd0, fd1, fd2]): a 4-byte length, the JSON request, the descriptors in the first message."""
    fds = []
    msg, anc, _flags, _addr = conn.recvmsg(4, socket.CMSG_SPACE(3 * 4))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += list(struct.unpack(f"{len(data) // 4}i", data[:len(data) - len(data) % 4]))
    if len(msg) < 4:
        msg += recv_exact(conn, 4 - len(msg))
    (n,) = struct.unpack("!I", msg)
    return json.loads(recv_exact(conn, n)), fds


def _module_file(name):
    m = sys.modules.get(name)
    return os.path.realpath(m.__file__) if m is not None and getattr(m, "__file__", None) else None


def _origin(name):
    """Where a fresh import of top-level package ``name`` would come from under the current ``sys.path``: the
    first finder of ``sys.meta_path`` that knows it (an editable install's finder, then the path finder)."""
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        spec = find(name, None) if find is not None else None
        if spec is not None:
            return os.path.realpath(spec.origin) if spec.origin and spec.has_location else None
    return None


class Server:
    def __init__(self, path):
        self.path = path
        self.base_path = list(sys.path[1:])  # the interpreter's own entries (stdlib, site-packages, .pth files)
        self.children = {}  # pid -> client connection
        self.conns = {}  # client connection fileno -> pid
        self.default_threads = None

    # ------------------------------------------------------------------------------------------------ requests
    def child_path(self, req):
        """``sys.path`` of a fresh interpreter running this request (before ``site`` entries: script dir / cwd /
        '' first, then PYTHONPATH)."""
        argv, cwd = req["argv"], req["cwd"]
        if req["mode"] == "script":
            first = os.path.dirname(os.path.realpath(os.path.join(cwd, argv[0])))
        elif req["mode"] == "module":
            first = cwd
        else:
            first = ""
        extra = [p if os.path.isabs(p) else os.path.join(cwd, p)
                 for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        return [first] + extra + [p for p in self.base_path if p not in extra]

    def _refusal(self, req):
        """Why this request must run in a real interpreter (None when it can be forked): a preloaded package that
        the child would import from elsewhere (another checkout first on its ``sys.path``)."""
        if req["mode"] == "script" and not os.path.isfile(os.path.join(req["cwd"], req["argv"][0])):
            return "no such script"
        saved = sys.path[:]
        sys.path[:] = [p or req["cwd"] for p in self.child_path(req)]
        try:
            for top in sorted({name.split(".")[0] for name in PRELOAD}):
                loaded = _module_file(top)
                found = _origin(top)
                if loaded != found:
                    return f"{top} would be imported from {found}, not {loaded}"
        finally:
            sys.path[:] = saved
        return None

    def serve(self):
        """Accept requests until SIGTERM; returns the request in a forked child (which then becomes the command)."""
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(64)
        self.listener = listener
        self.on_ready()
        self.wakeup = (rfd, wfd)
        try:
            while not stop:
                conns = {c.fileno(): c for c in list(self.children.values())}
                try:
                    ready, _, _ = select.select([listener, rfd] + list(conns.values()), [], [], 5.0)
                except InterruptedError:
                    ready = []
                if rfd in ready:
                    try:
                        os.read(rfd, 4096)
                    except BlockingIOError:
                        pass
                self._reap()
                for c in ready:
                    if c is listener:
                        req = self._accept()
                        if req is not None:
                            return req  # in the child
                    elif c is not rfd and hasattr(c, "recv"):
                        self._client_readable(c)
        finally:
            if os.getpid() == self.pid:
                for pid in list(self.children):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
        return None

    def _accept(self):
        conn, _ = self.listener.accept()
        fds = []
        try:
            req, fds = _recv_request(conn)
            why = self._refusal(req)
        except Exception as e:  # a malformed request: the client runs the real interpreter
            why = f"bad request: {e!r}"
            req = None
        if why is not None or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            self._send(conn, {"fallback": why or "no descriptors"})
            conn.close()
            return None
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:
            req["_conn"] = conn
            req["_fds"] = fds
            return req
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        self._send(conn, {"pid": pid})
        print(f"{time.strftime('%H:%M:%S')} pid {pid}: {req['mode']} {' '.join(req['argv'])[:300]!r}", flush=True)
        return None

    @staticmethod
    def _send(conn, obj):
        data = json.dumps(obj).encode()
        try:
            conn.sendall(struct.pack("!I", len(data)) + data)
        except OSError:
            pass

    def _reap(self):
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is not None:
                self._send(conn, {"status": status})
                conn.close()

    def _client_readable(self, conn):
        """A client sends nothing after its request: readable means it went away; its child goes too."""
        try:
            data = conn.recv(1)
        except OSError:
            data = b""
        if data:
            return
        for pid, c in list(self.children.items()):
            if c is conn:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# ---------------------------------------------------------------------------------------------------- the child
def _stream(fd, unbuffered, is_stderr):
    """sys.stdout / sys.stderr as a fresh interpreter makes them for descriptor ``fd``."""
    raw = io.FileIO(fd, "w", closefd=False)
    tty = os.isatty(fd)
    buf = raw if unbuffered else io.BufferedWriter(raw)
    return io.TextIOWrapper(buf, encoding="utf-8", errors="backslashreplace" if is_stderr else "strict",
                            line_buffering=not unbuffered and (tty or is_stderr), write_through=unbuffered)


def _retarget_logging(old_new):
    """Logging handlers created at import (DeepSpeed's, megatron-core's) hold the server's stream objects."""
    import logging

    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            stream = getattr(h, "stream", None)
            for old, new in old_new:
                if stream is old:
                    h.stream = new


def become(server, req):
    """In the forked child: turn this process into ``python ARGS`` as the client asked, run it, and exit."""
    conn, fds = req.pop("_conn"), req.pop("_fds")
    signal.set_wakeup_fd(-1)
    for fd in server.wakeup:
        os.close(fd)
    server.listener.close()
    for c in server.children.values():
        c.close()
    conn.close()
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for name in req["ignore"]:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)

    import resource

    for name, (soft, hard) in req["rlimits"].items():  # the client's limits (a test may have lowered one)
        if resource.getrlimit(getattr(resource, name)) != (soft, hard):
            resource.setrlimit(getattr(resource, name), (soft, hard))
    env = req["env"]
    os.environ.clear()
    os.environ.update(env)
    os.chdir(req["cwd"])
    os.umask(req["umask"])
    unbuffered = req["unbuffered"] or bool(env.get("PYTHONUNBUFFERED"))
    old = (sys.stdout, sys.stderr)
    sys.stdout = sys.__stdout__ = _stream(1, unbuffered, False)
    sys.stderr = sys.__stderr__ = _stream(2, unbuffered, True)
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                                 encoding="utf-8")
    _retarget_logging(list(zip(old, (sys.stdout, sys.stderr))))
    sys.dont_write_bytecode = req["dont_write_bytecode"] or bool(env.get("PYTHONDONTWRITEBYTECODE"))

    import warnings

    opts = [o for o in env.get("PYTHONWARNINGS", "").split(",") if o] + req["warnoptions"]
    if opts:
        sys.warnoptions[:] = opts
        warnings._processoptions(opts)

    import numpy as np
    import torch

    threads = env.get("OMP_NUM_THREADS", env.get("MKL_NUM_THREADS", ""))
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else server.default_threads)
    torch.seed()  # a fresh process seeds torch's and numpy's generators from the OS, not from its parent
    np.random.seed(None)

    ppid = req["ppid"]
    os.getppid = lambda: ppid  # the process that started the client is this command's parent, not the server
    sys.path[:] = server.child_path(req)
    shim = req["shim"]
    sys.executable = shim
    argv = req["argv"]
    flags = (["-u"] if req["unbuffered"] else []) + (["-B"] if req["dont_write_bytecode"] else []) + \
        [x for w in req["warnoptions"] for x in ("-W", w)]
    import builtins
    import runpy
    import types

    main = types.ModuleType("__main__")  # a bare __main__, not this server's
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    code = 0
    try:
        if req["mode"] == "script":
            path = os.path.abspath(argv[0])  # __file__ of a script is absolute (Python >= 3.9); sys.argv[0] as given
            sys.argv = list(argv)
            sys.orig_argv = [shim] + flags + list(argv)
            main.__file__, main.__cached__ = path, None
            with open(path, "rb") as f:
                source = f.read()
            exec(compile(source, path, "exec"), main.__dict__)
        elif req["mode"] == "module":
            sys.argv = [argv[0]] + list(argv[1:])
            sys.orig_argv = [shim] + flags + ["-m"] + list(argv)
            runpy._run_module_as_main(argv[0], alter_argv=True)
        else:
            sys.argv = ["-c"] + list(argv[1:])
            sys.orig_argv = [shim] + flags + ["-c"] + list(argv)
            exec(compile(argv[0], "<string>", "exec"), main.__dict__)
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code & 0xFF
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt as e:  # a fresh interpreter reports it, then dies of SIGINT
        e.__traceback__ = _user_frames(e.__traceback__, runpy)  # the hook prints the exception's own traceback
        sys.excepthook(type(e), e, e.__traceback__)
        _leave(130, signal.SIGINT)
    except BaseException as e:
        e.__traceback__ = _user_frames(e.__traceback__, runpy)
        sys.excepthook(type(e), e, e.__traceback__)
        code = 1
    _leave(code)


def _user_frames(tb, runpy):
    """The traceback without this module's and runpy's frames, as a fresh interpreter would print it."""
    skip = {os.path.realpath(__file__), os.path.realpath(runpy.__file__)}
    while tb is not None and tb.tb_next is not None and os.path.realpath(tb.tb_frame.f_code.co_filename) in skip:
        tb = tb.tb_next
    return tb


def _leave(code, signum=None):
    """What the interpreter does when the program ends, up to the teardown of its modules: join non-daemon threads,
    run the atexit handlers, flush stdout / stderr. The teardown (about 1 s with torch imported: freeing the heap
    that the exit frees anyway) is skipped; then exit with ``code``, or die of ``signum``."""
    import atexit
    import threading

    try:
        threading._shutdown()
    except Exception:
        pass
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if signum is not None:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    os._exit(code)


def main():
    path, ready_file = sys.argv[1], sys.argv[2]
    t0 = time.monotonic()
    env_at_start = start_only(dict(os.environ))  # libraries add variables of their own while they import
    for name in PRELOAD:
        __import__(name)
    import torch

    server = Server(path)
    server.pid = os.getpid()
    server.default_threads = int(os.environ.get("FORKSERVER_DEFAULT_THREADS", "0")) or torch.get_num_threads()
    threads = [t for t in os.listdir("/proc/self/task")]
    info = {"pid": os.getpid(), "preload_s": round(time.monotonic() - t0, 2), "threads": len(threads),
            "start_only": env_at_start}
    tmp = ready_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    # the client reads the server's start-only environment from the ready file, written once the socket listens
    server.on_ready = lambda: os.replace(tmp, ready_file)
    req = server.serve()
    if req is not None:
        become(server, req)  # never returns


if __name__ == "__main__":
    main()

"""JIT build and loading of the C++ / CUDA EMA kernels in ``csrc/``.

Two libraries, both registering operators of the ``torch.ops.megatron_ext_ema`` namespace:

* ``megatron_ext_ema_cpu``  (csrc/ema_cpu*.cpp): defines the operators and their CPU kernels; needs
  a C++ compiler (``$CXX`` or ``c++``) and ninja.
* ``megatron_ext_ema_cuda`` (csrc/ema_cuda.cpp + csrc/ema_cuda_kernel.cu): the CUDA kernels; built
  only when torch has CUDA, a GPU is visible and nvcc is found (``CUDA_HOME``).

Each library is built once with :func:`torch.utils.cpp_extension.load` into a cache directory
keyed by everything that changes the binary::

    <root>/<name>-torch<torch version>-py<python>-<compiler>[-cuda<nvcc>-sm<archs>]-<source hash>

``<root>`` is ``$MEGATRON_EXT_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/megatron_ext/kernels``, else
``~/.cache/megatron_ext/kernels``.  No ``-march=native``: the CPU library carries AVX-512, AVX2 and
baseline variants of the kernels and picks one at run time, so the key need not name the CPU.
``MEGATRON_EXT_DISABLE_KERNELS=1`` makes every kernel unavailable (the "auto" EMA then uses FFT).

Loading happens at most once per process and library; a failure is remembered with its reason
(the first compiler error line for a failed build).

Builds never wait silently on a lock. ``torch.utils.cpp_extension`` guards a build directory with an empty
``lock`` file (``FileBaton``) that a killed builder leaves behind, and every later build then waits on it
forever. Each build here first takes :class:`BuildLock`, an ``flock`` on ``<build dir>/megatron_ext.build.lock``
holding the builder's pid, host and start time: the kernel releases it when the builder dies, so a lock whose
builder is gone is never waited on; while holding it, a torch ``lock`` file in the directory can only be a dead
builder's, and is removed (with a line on stderr naming it). A waiter prints what it waits on (file, pid, host)
after 10 s and every minute, and gives up after ``$MEGATRON_EXT_KERNELS_LOCK_TIMEOUT`` seconds (default 1800)
with an error naming the lock.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

OP_NAMESPACE = "megatron_ext_ema"

CPU_SOURCES = ("ema_cpu.cpp", "ema_cpu_avx512.cpp", "ema_cpu_avx2.cpp", "ema_cpu_generic.cpp")
CPU_HEADERS = ("ema_cpu_kernel.h", "ema_cpu_impl.h")
CUDA_SOURCES = ("ema_cuda.cpp", "ema_cuda_kernel.cu")
CUDA_HEADERS = ("ema_cuda.h",)

CPU_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-DNDEBUG"]
CPU_LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3", "-DNDEBUG"]
CUDA_NVCC_FLAGS = ["-O3", "-DNDEBUG", "--fmad=true", "-lineinfo"]


class KernelUnavailableError(RuntimeError):
    """The fused EMA kernel cannot be used; ``str(err)`` says why."""


_lock = threading.RLock()
_results: Dict[str, Tuple[Optional[str], Optional[str]]] = {}  # kind -> (library path, error reason)
_compiler_cache: Dict[str, Optional[str]] = {}


# ------------------------------------------------------------------------------------ paths
def csrc_dir() -> Path:
    """The kernel sources: ``$MEGATRON_EXT_CSRC`` or ``csrc/`` next to the ``megatron_ext`` package."""
    env = os.environ.get("MEGATRON_EXT_CSRC")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "csrc"


def cache_root() -> Path:
    env = os.environ.get("MEGATRON_EXT_KERNELS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "megatron_ext" / "kernels"


def _sanitize(text: str, limit: int = 48) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_")[:limit]


def _cxx() -> str:
    return os.environ.get("CXX", "c++")


def compiler_version(cmd: Optional[str] = None) -> Optional[str]:
    """First line of ``<cmd> --version`` (None when the compiler cannot be run)."""
    cmd = cmd or _cxx()
    if cmd not in _compiler_cache:
        line = None
        exe = shutil.which(cmd)
        if exe is not None:
            try:
                out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
                lines = [ln for ln in (out.stdout or out.stderr).splitlines() if ln.strip()]
                if out.returncode == 0 and lines:
                    line = lines[0].strip()
            except (OSError, subprocess.SubprocessError):
                line = None
        _compiler_cache[cmd] = line
    return _compiler_cache[cmd]


def _nvcc() -> Optional[str]:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _nvcc_version() -> Optional[str]:
    nvcc = _nvcc()
    if nvcc is None:
        return None
    key = "nvcc:" + nvcc
    if key not in _compiler_cache:
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
            m = re.search(r"release ([0-9.]+)", out.stdout)
            _compiler_cache[key] = m.group(1) if m else None
        except (OSError, subprocess.SubprocessError):
            _compiler_cache[key] = None
    return _compiler_cache[key]


def _cuda_archs() -> str:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return _sanitize(env.replace(";", "_").replace(" ", "_"), 32)
    caps = sorted({"%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return "_".join(caps) or "none"


def _source_hash(files: List[Path], flags: List[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(" ".join(flags).encode())
    return h.hexdigest()[:12]


def build_dir(kind: str) -> Path:
    """Cache directory of the ``kind`` ("cpu" or "cuda") library for this torch / compiler / source."""
    src = csrc_dir()
    comp = compiler_version() or "nocompiler"
    comp_id = _sanitize(re.sub(r"\(.*?\)", "", comp).replace(" ", ""), 24) + "_" + hashlib.sha1(comp.encode()).hexdigest()[:6]
    parts = [f"megatron_ext_ema_{kind}", f"torch{torch.__version__}", f"py{sys.version_info[0]}{sys.version_info[1]}", comp_id]
    if kind == "cpu":
        files = [src / f for f in CPU_SOURCES + CPU_HEADERS]
        flags = CPU_CFLAGS + CPU_LDFLAGS
    else:
        files = [src / f for f in CPU_HEADERS + CUDA_SOURCES + CUDA_HEADERS]
        flags = CUDA_CFLAGS + CUDA_NVCC_FLAGS
        parts += [f"cuda{_nvcc_version()}", f"sm{_cuda_archs()}"]
    parts.append(_source_hash([f for f in files if f.exists()], flags))
    return cache_root() / _sanitize("-".join(parts), 200)


# ---------------------------------------------------------------------------------- building
def first_error_line(text: str) -> str:
    """The first compiler / linker error line of a build log (or its first non-empty line)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    for pat in (r"\berror\b", r"undefined reference", r"fatal", r"FAILED"):
        for ln in lines:
            if re.search(pat, ln, flags=re.IGNORECASE) and not ln.startswith("Error building extension"):
                return ln[:300]
    return lines[0][:300] if lines else "unknown error"


def _precheck(kind: str) -> Optional[str]:
    """Why the ``kind`` library cannot be built here (None: worth trying)."""
    if os.environ.get("MEGATRON_EXT_DISABLE_KERNELS", "").strip() not in ("", "0"):
        return "disabled by MEGATRON_EXT_DISABLE_KERNELS"
    if kind == "cuda":
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build, so the CUDA kernel is not built"
        if not torch.cuda.is_available():
            return "no CUDA device is available, so the CUDA kernel is not built"
    src = csrc_dir()
    needed = CPU_SOURCES + CPU_HEADERS + (CUDA_SOURCES + CUDA_HEADERS if kind == "cuda" else ())
    missing = [f for f in needed if not (src / f).exists()]
    if missing:
        return f"kernel sources not found: {', '.join(missing)} in {src} (set MEGATRON_EXT_CSRC)"
    if compiler_version() is None:
        return f"no C++ compiler: '{_cxx()}' not found or not runnable (install g++ or set CXX)"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja), needed to JIT-build the kernels"
    if kind == "cuda":
        if _nvcc() is None:
            return "nvcc not found (set CUDA_HOME), so the CUDA kernel is not built"
    return None


LOCK_NAME = "megatron_ext.build.lock"
TORCH_LOCK_NAME = "lock"  # torch.utils.cpp_extension's FileBaton in the build directory
LOCK_REPORT_AFTER_S = 10.0
LOCK_REPORT_EVERY_S = 60.0


def lock_timeout() -> float:
    """Seconds a build waits for another live builder of the same directory: ``$MEGATRON_EXT_KERNELS_LOCK_TIMEOUT``
    (default 1800)."""
    raw = os.environ.get("MEGATRON_EXT_KERNELS_LOCK_TIMEOUT", "").strip()
    try:
        return float(raw) if raw else 1800.0
    except ValueError:
        raise KernelUnavailableError(f"MEGATRON_EXT_KERNELS_LOCK_TIMEOUT={raw!r}: expected a number of seconds") from None


def _note(msg: str) -> None:
    print(f"megatron_ext kernels: {msg}", file=sys.stderr, flush=True)


class BuildLock:
    """Exclusive right to build in ``directory`` (see the module docstring). Use as a context manager."""

    def __init__(self, directory: Path, what: str, timeout: Optional[float] = None,
                 report_after: float = LOCK_REPORT_AFTER_S, poll: float = 0.2) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.what = what
        self.timeout = lock_timeout() if timeout is None else float(timeout)
        self.report_after = report_after
        self.poll = poll
        self._fd: Optional[int] = None

    def holder(self) -> str:
        """Who holds the lock, as its file says ("pid 12 on host h, building x since ..."), or "unknown"."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            text = ""
        return text or "an unknown process"

    def acquire(self) -> None:
        import fcntl

        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        start = time.monotonic()
        next_report = start + self.report_after
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                now = time.monotonic()
                if now - start >= self.timeout:
                    raise KernelUnavailableError(
                        f"gave up after {self.timeout:.0f} s waiting for the build lock {self.path}, held by "
                        f"{self.holder()} (a live process); wait for it to finish, or raise "
                        f"MEGATRON_EXT_KERNELS_LOCK_TIMEOUT")
                if now >= next_report:
                    _note(f"waiting {now - start:.0f} s for the build lock {self.path}, held by {self.holder()}")
                    next_report = now + LOCK_REPORT_EVERY_S
                time.sleep(self.poll)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, (f"pid {os.getpid()} on host {socket.gethostname()}, building {self.what} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode())
        self._clear_dead_torch_lock()

    def _clear_dead_torch_lock(self) -> None:
        """Every builder of this directory holds this lock first, so torch's ``lock`` file is a dead builder's."""
        baton = self.directory / TORCH_LOCK_NAME
        if baton.exists():
            _note(f"removing {baton}, left by a build that did not finish (its builder is gone)")
            try:
                baton.unlink()
            except FileNotFoundError:
                pass

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "BuildLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def torch_extension_lock(name: str) -> BuildLock:
    """:class:`BuildLock` on the directory ``torch.utils.cpp_extension.load(name=...)`` builds in (under
    ``TORCH_EXTENSIONS_DIR``): DeepSpeed's JIT ops (``cpu_adam``, ``fused_adam``) are built there, and torch's own
    ``lock`` file of a killed build would otherwise make every later build wait forever."""
    from torch.utils import cpp_extension

    return BuildLock(Path(cpp_extension._get_build_directory(name, verbose=False)), name)


def _build_and_load(kind: str, verbose: bool) -> str:
    from torch.utils import cpp_extension

    src = csrc_dir()
    directory = build_dir(kind)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"megatron_ext_ema_{kind}"
    if kind == "cpu":
        kwargs = dict(sources=[str(src / f) for f in CPU_SOURCES], extra_cflags=list(CPU_CFLAGS),
                      extra_ldflags=list(CPU_LDFLAGS), with_cuda=False)
    else:
        kwargs = dict(sources=[str(src / f) for f in CUDA_SOURCES], extra_cflags=list(CUDA_CFLAGS),
                      extra_cuda_cflags=list(CUDA_NVCC_FLAGS), with_cuda=True)
    with BuildLock(directory, name):
        path = cpp_extension.load(name=name, build_directory=str(directory), verbose=verbose,
                                  extra_include_paths=[str(src)], is_python_module=False, **kwargs)
    return str(path) if isinstance(path, (str, os.PathLike)) else str(directory / f"{name}.so")


def load_library(kind: str = "cpu", verbose: bool = False) -> str:
    """Build (if needed) and load the ``kind`` library once per process; returns its path.

    Raises :class:`KernelUnavailableError` with the reason when it cannot be built or loaded.
    """
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kernel kind must be 'cpu' or 'cuda', got {kind!r}")
    with _lock:
        if kind not in _results:
            _results[kind] = _try_load(kind, verbose)
        path, reason = _results[kind]
    if reason is not None:
        raise KernelUnavailableError(reason)
    return path  # type: ignore[return-value]


def _try_load(kind: str, verbose: bool) -> Tuple[Optional[str], Optional[str]]:
    if kind == "cuda":
        try:
            load_library("cpu", verbose)  # defines the operators the CUDA library implements
        except KernelUnavailableError as err:
            return None, f"the CPU library (which defines the operators) is unavailable: {err}"
    reason = _precheck(kind)
    if reason is not None:
        return None, reason
    try:
        return _build_and_load(kind, verbose), None
    except KernelUnavailableError as err:  # the build lock: its message names the file
        return None, f"the {kind.upper()} kernel was not built: {err}"
    except Exception as err:  # compiler errors, linker errors, load errors
        what = "build" if "Error building extension" in str(err) else "build/load"
        return None, f"the {kind.upper()} kernel {what} failed: {first_error_line(str(err))}"


def library_status(kind: str) -> Tuple[bool, Optional[str]]:
    """(loaded, reason) for the ``kind`` library, building it on first use."""
    try:
        load_library(kind)
        return True, None
    except KernelUnavailableError as err:
        return False, str(err)


def reset() -> None:
    """Forget remembered failures (a library already loaded stays loaded)."""
    with _lock:
        for kind in list(_results):
            if _results[kind][1] is not None:
                del _results[kind]

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
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
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

"""Fused C++ / CUDA kernels of the toolkit (sources in ``csrc/``), built just in time and cached.

EMA of Mega (:class:`megatron_ext.modules.mega_ema.MultiHeadEMA` with ``impl="fused"`` / ``"auto"``):

* :func:`ema_scan` / :class:`EMAScanFunction` -- the differentiable fused EMA on effective
  coefficients (see :mod:`megatron_ext.kernels.ema`); :func:`ema_step` -- one decoding step.
* :func:`unavailable_reason` (None = usable; builds on first use), :func:`is_available`.
* :func:`build` -- build the libraries now and return where (``python -m megatron_ext.kernels build``).

Build cache: ``$MEGATRON_EXT_KERNELS_CACHE`` or ``$XDG_CACHE_HOME/megatron_ext/kernels`` or
``~/.cache/megatron_ext/kernels``, one directory per torch / python / compiler / source version
(:func:`build_dir`).  ``MEGATRON_EXT_DISABLE_KERNELS=1`` disables them;
``MEGATRON_EXT_EMA_CPU_ISA=generic|avx2|avx512`` caps the CPU kernel variant.
"""
from __future__ import annotations

from typing import Dict, Optional

from megatron_ext.kernels._build import (
    KernelUnavailableError,
    build_dir,
    cache_root,
    csrc_dir,
    library_status,
    load_library,
    torch_extension_lock,
)
from megatron_ext.kernels.ema import (
    EMAScanFunction,
    check_inputs,
    cpu_isa,
    ema_scan,
    ema_step,
    is_available,
    unavailable_reason,
)


def build(cuda: Optional[bool] = None, verbose: bool = False) -> Dict[str, Dict[str, Optional[str]]]:
    """Build and load the CPU library and (``cuda=None``: when possible; True: required) the CUDA one.

    Returns ``{kind: {"path": library or None, "dir": build directory, "error": reason or None}}``.
    """
    out: Dict[str, Dict[str, Optional[str]]] = {}
    kinds = ["cpu"] + ([] if cuda is False else ["cuda"])
    for kind in kinds:
        try:
            path, err = load_library(kind, verbose=verbose), None
        except KernelUnavailableError as e:
            path, err = None, str(e)
        try:
            where = str(build_dir(kind))
        except Exception:  # e.g. no CUDA device to name the architectures
            where = None
        out[kind] = {"path": path, "dir": where, "error": err}
    return out


__all__ = [
    "EMAScanFunction",
    "KernelUnavailableError",
    "build",
    "build_dir",
    "cache_root",
    "check_inputs",
    "cpu_isa",
    "csrc_dir",
    "ema_scan",
    "ema_step",
    "is_available",
    "library_status",
    "torch_extension_lock",
    "load_library",
    "unavailable_reason",
]

"""The one loader for ``.pt`` files a user may have received: consolidated checkpoints, latents, RNG states,
DeepSpeed model / optimizer states, archive weights.

``load_untrusted(path)`` is ``torch.load(weights_only=True)`` under ``torch.serialization.safe_globals`` with the
few non-tensor types our runs write besides tensors and plain Python values (``ALLOWED_GLOBALS``: DeepSpeed's loss
scaler, ZeRO stage enum and fragment addresses, which its bf16 / ZeRO optimizer states hold). Unpickling never
calls anything else, so a file whose pickle would run code (``os.system``, ``eval``, any class outside the list)
is refused -- before any of it runs -- with an ``UnsafeFileError`` naming the file and the refused global. A
missing, truncated or non-torch file is a ``CorruptCheckpointError`` naming the file (a resume falls back to the
previous complete checkpoint on that one, never on a refused file).

DeepSpeed reads its checkpoint files through its engine's checkpoint engine: ``install_safe_checkpoint_engine``
points that at this loader, so resuming a run and ``model.ckpt_path=<checkpoint dir>`` never unpickle code either.
``check_untrusted`` is for a reader we cannot redirect (DeepSpeed's ``zero_to_fp32``): it loads the file with this
loader first and raises if it is refused, so the full unpickler that runs next meets only the allowed globals.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Any, List, Optional

import torch

from megatron_ext.errors import CheckpointError, CorruptCheckpointError, UnsafeFileError

# (module, name) of the non-tensor types written by the runs we load; anything else in a pickle is refused
ALLOWED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)

_allowed: Optional[List[Any]] = None


def allowed_globals() -> List[Any]:
    """The objects of ``ALLOWED_GLOBALS`` (imported once; a module that is not installed is left out)."""
    global _allowed
    if _allowed is None:
        import importlib

        out = []
        for mod, name in ALLOWED_GLOBALS:
            try:
                out.append(getattr(importlib.import_module(mod), name))
            except (ImportError, AttributeError):
                continue
        _allowed = out
    return _allowed


def _refused_global(msg: str) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", msg)
    if m:
        return f"global {m.group(1)}"
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    return lines[-1] if lines else "an unsupported pickle instruction"


def load_untrusted(path: str, what: str = "checkpoint file", *, where: Optional[str] = None,
                   map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` that runs no pickled code: the object (tensors, plain values, ``ALLOWED_GLOBALS``) or a
    ``CheckpointError``. ``what`` says what the file is, ``where`` how the user knows it (default: ``path``)."""
    where = where or str(path)
    if not os.path.isfile(path):
        raise CorruptCheckpointError(f"{where}: no such {what}")
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise UnsafeFileError(f"{where}: refused: {what} holds pickled objects other than tensors and plain "
                                  f"values ({_refused_global(str(e))}); loading it could run code") from None
        raise CorruptCheckpointError(f"{where}: {what} could not be read (corrupt: {str(e).splitlines()[0]})") from None
    except Exception as e:  # truncated / not a torch file / wrong zip
        first = (str(e).splitlines() or [""])[0].split(". ")[0]
        raise CorruptCheckpointError(f"{where}: {what} could not be read (truncated or not a torch file: "
                              f"{type(e).__name__}: {first})") from None


def check_untrusted(path: str, what: str = "checkpoint file", *, where: Optional[str] = None) -> None:
    """Raise ``load_untrusted``'s error if ``path`` would be refused; for files another library unpickles."""
    load_untrusted(path, what, where=where, mmap=_is_zip(path))


def _is_zip(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def install_safe_checkpoint_engine(engine) -> None:
    """Make ``engine`` (a DeepSpeed engine) read every checkpoint file through ``load_untrusted``.

    DeepSpeed's engine (and its pipeline module) loads model, optimizer and ZeRO state files through
    ``engine.checkpoint_engine.load``; its torch engine unpickles them in full. That method is
    replaced on this engine's instance; any other checkpoint engine is refused rather than left unpickling."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce) is not TorchCheckpointEngine:
        raise CheckpointError(f"DeepSpeed checkpoint engine {type(ce).__name__}: megatron_ext reads checkpoints "
                              f"only through DeepSpeed's TorchCheckpointEngine (remove the checkpoint engine "
                              f"settings from model.deepspeed_config)")

    def load(path: str, map_location=None):
        return load_untrusted(path, "DeepSpeed checkpoint file", map_location=map_location)

    ce.load = load


# the classes a torch.distributed.checkpoint ``.metadata`` pickle is made of (anything else is refused)
_DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "MetadataIndex", "BytesStorageMetadata",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        import importlib

        if name in _DCP_METADATA_GLOBALS.get(module, ()):
            return getattr(importlib.import_module(module), name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def load_dcp_metadata(path: str, what: str = "distributed checkpoint metadata"):
    """A ``torch.distributed.checkpoint`` ``.metadata`` file (a pickle) read without running code: only DCP's
    metadata classes, torch sizes / dtypes and paths may appear; anything else is an ``UnsafeFileError``."""
    if not os.path.isfile(path):
        raise CorruptCheckpointError(f"{path}: no such {what}")
    try:
        with open(path, "rb") as f:
            obj = _DCPMetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("GLOBAL "):
            raise UnsafeFileError(f"{path}: refused: {what} holds pickled objects other than DCP's metadata "
                                  f"({_refused_global(str(e))}); loading it could run code") from None
        raise CorruptCheckpointError(f"{path}: {what} could not be read (corrupt: {str(e).splitlines()[0]})") \
            from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise CorruptCheckpointError(f"{path}: {what} could not be read (truncated or corrupt: "
                                     f"{(str(e).splitlines() or [''])[0]})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(obj, Metadata):
        raise CorruptCheckpointError(f"{path}: {what} holds a {type(obj).__name__}, not DCP metadata")
    return obj


__all__ = ["ALLOWED_GLOBALS", "allowed_globals", "load_untrusted", "check_untrusted", "install_safe_checkpoint_engine",
           "load_dcp_metadata"]

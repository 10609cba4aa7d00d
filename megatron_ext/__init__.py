"""megatron_ext: Megatron/DeepSpeed-style pretraining toolkit (GPT, BART, Perceiver, Mega, hiddens)."""
import os as _os

# DeepSpeed picks its accelerator at import time; without CUDA it must be told to use the CPU one.
if "DS_ACCELERATOR" not in _os.environ:
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            _os.environ["DS_ACCELERATOR"] = "cpu"
    except Exception:  # pragma: no cover - torch missing is reported by the importer
        pass

__version__ = "0.1.0"

from megatron_ext.errors import CheckpointError, ConfigError, DataError, MegatronExtError  # noqa: E402,F401

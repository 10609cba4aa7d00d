"""Checks of a run config that need neither a process group, nor a tokenizer, nor data.

``check_run_config`` runs where the config is first checked against the schema
(:func:`megatron_ext.config.loader.check_config`): in the parent before ``trainer.devices`` workers are
started (``maybe_self_launch``) and in ``Trainer`` before the process group is initialised. A bad value here is
one ``ConfigError`` naming the key, instead of N processes that each fail after building the model.

The model's architecture keys are checked here in full (``megatron_ext.config.model_validation``, with the device
of ``trainer.accelerator``): the models trust their config and check nothing again. It also refuses keys that are
accepted by the schema but have no effect yet (an accepted key always does something).
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from megatron_ext.config.model_validation import check_model_config
from megatron_ext.data.prefixes import is_split_dict, parse_split_prefixes
from megatron_ext.errors import ConfigError
from megatron_ext.training import best, run_length


def use_cuda(accelerator: str = "auto") -> bool:
    """Whether ``trainer.accelerator`` means CUDA on this machine (``auto``: when a GPU is visible)."""
    if accelerator == "cpu":
        return False
    if accelerator == "gpu":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator=gpu but no CUDA device is available; use trainer.accelerator=cpu or auto")
        return True
    if accelerator != "auto":
        raise ConfigError(f"trainer.accelerator={accelerator!r}: expected one of auto, cpu, gpu")
    return torch.cuda.is_available()


def check_run_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` naming the first bad key of a run config (see the module docstring)."""
    t, m = cfg.trainer, cfg.model
    timeout = t.get("dist_timeout_minutes")
    if timeout is None or not float(timeout) > 0:
        raise ConfigError(
            f"trainer.dist_timeout_minutes={timeout}: expected a number of minutes > 0 (how long a collective may "
            f"wait for the other ranks before the run stops with an error)"
        )
    run_length.check_config(t)  # max_steps / max_epochs, val_check_interval, limit_*_batches, fast_dev_run
    best.check_config(cfg)  # checkpoint_callback_params.monitor / mode / filename, early stopping
    check_model_config(m, use_cuda=use_cuda(t.accelerator))
    data = m.get("data")
    if data is not None and is_split_dict(data.get("data_prefix")):  # its shape and keys (no file is read here)
        kind = "prefix" if str(data.get("data_impl", "mmap")) in ("mmap", "lazy", "cached") else "file"
        parse_split_prefixes(data.get("data_prefix"), kind, data.get("splits_string"))
    _check_document_masking(m)


def _check_document_masking(m) -> None:
    """``model.data.reset_attention_mask`` (GPT transformer only) and ``model.document_attention``."""
    data = m.get("data")
    reset = bool(data is not None and data.get("reset_attention_mask"))
    impl = m.get("document_attention", "auto")
    if reset and str(m.get("arch", "transformer")).lower() == "mega":
        raise ConfigError(
            "model.data.reset_attention_mask=true does not work with model.arch=mega: Mega's EMA carries state "
            "along the whole sequence, across document boundaries, and cannot be reset at eod; set "
            "model.data.reset_attention_mask=false or use model.arch=transformer"
        )
    if reset and data.get("task") is not None:
        raise ConfigError(
            f"model.data.reset_attention_mask=true with model.data.task={data.get('task')!r}: a synthetic task has "
            f"one example per sequence, no packed documents to keep apart; set model.data.reset_attention_mask=false"
        )
    if impl != "auto" and not reset and m.get("document_attention") is not None:
        raise ConfigError(
            f"model.document_attention={impl!r} chooses how attention stays within packed documents, which only "
            f"happens with model.data.reset_attention_mask=true; set that too, or leave model.document_attention=auto"
        )

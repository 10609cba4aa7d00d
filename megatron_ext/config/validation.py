"""Checks of a run config that need neither a process group, nor a tokenizer, nor data.

``check_run_config`` runs where the config is first checked against the schema
(:func:`megatron_ext.config.loader.check_config`): in the parent before ``trainer.devices`` workers are
started (``maybe_self_launch``) and in ``Trainer`` before the process group is initialised. A bad value here is
one ``ConfigError`` naming the key, instead of N processes that each fail after building the model.

It also refuses keys that are accepted by the schema but have no effect yet (an accepted key always does
something). The model builders (models/gpt.py, models/encoder_decoder.py, models/mega_lm.py) keep their full
architecture checks; the ones repeated here are those a wrong parallel layout turns into a late failure.
"""
from __future__ import annotations

from omegaconf import DictConfig

from megatron_ext.errors import ConfigError


def _check_heads(node, prefix: str, tp: int) -> None:
    """``hidden_size`` divisible by ``num_attention_heads``, the heads divisible by the tensor-parallel size."""
    if node is None or str(node.get("arch", "transformer")).lower() == "mega":
        return
    heads, hidden = node.get("num_attention_heads"), node.get("hidden_size")
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        raise ConfigError(f"{prefix}num_attention_heads={heads!r}: expected a positive integer")
    if isinstance(hidden, int) and hidden % heads:
        raise ConfigError(f"{prefix}hidden_size={hidden}: must be divisible by {prefix}num_attention_heads={heads}")
    if heads % tp:
        raise ConfigError(
            f"{prefix}num_attention_heads={heads}: must be divisible by model.tensor_model_parallel_size={tp} "
            f"(every tensor-parallel rank holds the same number of heads)"
        )


def check_run_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` naming the first bad key of a run config (see the module docstring)."""
    t, m = cfg.trainer, cfg.model
    timeout = t.get("dist_timeout_minutes")
    if timeout is None or not float(timeout) > 0:
        raise ConfigError(
            f"trainer.dist_timeout_minutes={timeout}: expected a number of minutes > 0 (how long a collective may "
            f"wait for the other ranks before the run stops with an error)"
        )
    tp = m.get("tensor_model_parallel_size")
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ConfigError(f"model.tensor_model_parallel_size={tp!r}: expected a positive integer")
    if "encoder" in m:
        _check_heads(m.get("encoder"), "model.encoder.", tp)
        _check_heads(m.get("decoder"), "model.decoder.", tp)
    else:
        _check_heads(m, "model.", tp)
    data = m.get("data")
    if data is not None and data.get("reset_attention_mask"):
        raise ConfigError(
            "model.data.reset_attention_mask=true is not supported yet: the model attends causally across "
            "document boundaries (no per-document attention mask is built); set it to false "
            "(model.data.reset_position_ids and model.data.eod_mask_loss do work)"
        )

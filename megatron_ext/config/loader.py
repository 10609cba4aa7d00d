"""Hydra/OmegaConf glue: schema registration, loading outside Hydra, validation, derived values."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from megatron_ext.config.schema import BARTConfig, GPTConfig
from megatron_ext.errors import ConfigError

SCHEMAS = {"gpt_schema": GPTConfig, "bart_schema": BARTConfig}

PRECISIONS = {
    "32": "32",
    "32-true": "32",
    "fp32": "32",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
    "16": "16",
    "16-mixed": "16",
    "fp16": "16",
}


def register_schemas() -> None:
    """Make the structured configs available to Hydra's defaults lists (``- gpt_schema``)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=name, node=node)


def _explain(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = getattr(e, "msg", None) or str(e)
    msg = msg.split("\n")[0]
    if key:
        return f"config key '{key}': {msg}"
    return msg


def load_config(
    schema: type = GPTConfig,
    yaml_path: Optional[str] = None,
    overrides: Iterable[str] = (),
) -> DictConfig:
    """Load a config without Hydra's app machinery: schema <- YAML <- dotlist overrides.

    Same precedence as the Hydra entry points (CLI > YAML > dataclass). Unknown keys are an error
    naming the key. Used by tools, tests and notebooks.
    """
    try:
        cfg = OmegaConf.structured(schema)
        if yaml_path is not None:
            if not os.path.exists(yaml_path):
                raise ConfigError(f"config file not found: {yaml_path}")
            y = OmegaConf.load(yaml_path)
            y.pop("defaults", None)
            y.pop("hydra", None)
            cfg = OmegaConf.merge(cfg, y)
        overrides = list(overrides)
        if overrides:
            cleaned = [o[2:] if o.startswith("++") else (o[1:] if o.startswith("+") else o) for o in overrides]
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(cleaned))
    except (ConfigKeyError, ConfigAttributeError, ValidationError) as e:
        raise ConfigError(_explain(e)) from None
    return cfg


def check_schema(cfg: DictConfig, schema: type = GPTConfig) -> DictConfig:
    """Re-check a composed config against the closed schema.

    Hydra's ``+key=value`` adds keys with the struct flag lifted, so a mistyped ``+model.hiden_size`` would pass
    composition silently; merging onto the schema again turns it into an error naming the key.
    """
    try:
        data = OmegaConf.to_container(cfg, resolve=False)
        data.pop("hydra", None)
        return OmegaConf.merge(OmegaConf.structured(schema), data)
    except (ConfigKeyError, ConfigAttributeError, ValidationError) as e:
        raise ConfigError(_explain(e)) from None


@dataclass
class Derived:
    """Values computed from the config and the world size."""

    world_size: int
    data_parallel_size: int
    accumulate_grad_batches: int
    precision: str  # "32" | "bf16" | "16"


def _positive(cfg: DictConfig, key: str, allow_zero: bool = False) -> None:
    v = OmegaConf.select(cfg, key)
    if v is None or (v < 0 if allow_zero else v <= 0):
        want = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={v}: expected an integer {want}")


def validate_config(cfg: DictConfig, world_size: int, on_cuda: bool) -> Derived:
    """Check cross-key constraints and compute derived values. Raises ConfigError naming the key."""
    t, m = cfg.trainer, cfg.model
    prec = PRECISIONS.get(str(t.precision))
    if prec is None:
        raise ConfigError(f"trainer.precision={t.precision!r}: expected one of 32, bf16, 16 (or 16-mixed, bf16-mixed)")
    if prec == "16" and not on_cuda:
        raise ConfigError("trainer.precision=16 (fp16) needs a GPU; on CPU use trainer.precision=bf16 or 32")
    for key in ("trainer.max_steps", "model.micro_batch_size", "model.global_batch_size", "model.seq_length",
                "trainer.devices", "trainer.num_nodes", "trainer.log_every_n_steps"):
        _positive(cfg, key)
    for key in ("trainer.val_check_interval", "trainer.limit_val_batches"):
        _positive(cfg, key, allow_zero=True)
    if t.limit_train_batches is not None and t.limit_train_batches < 0:
        raise ConfigError(f"trainer.limit_train_batches={t.limit_train_batches}: expected null or an integer >= 0")
    if t.limit_train_batches == 0 and not m.ckpt_path:
        raise ConfigError("trainer.limit_train_batches=0 means evaluation only and needs model.ckpt_path=<checkpoint>")
    expected_world = t.devices * t.num_nodes
    if expected_world != world_size:
        raise ConfigError(
            f"trainer.devices ({t.devices}) x trainer.num_nodes ({t.num_nodes}) = {expected_world} but the "
            f"launcher started {world_size} processes; make them agree"
        )
    tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
    mega_keys = [k for k, node in (("model.arch", m), ("model.encoder.arch", m.get("encoder")),
                                   ("model.decoder.arch", m.get("decoder")))
                 if node is not None and str(node.get("arch", "")).lower() == "mega"]
    if mega_keys and (tp > 1 or pp > 1 or m.get("sequence_parallel")):
        what = (f"model.tensor_model_parallel_size={tp}" if tp > 1 else
                f"model.pipeline_model_parallel_size={pp}" if pp > 1 else "model.sequence_parallel=true")
        raise ConfigError(
            f"{what}: the Mega architecture ({mega_keys[0]}=mega) supports neither tensor, pipeline nor sequence "
            f"parallelism (its layers are not split over ranks); use 1 / false and scale with data parallelism "
            f"and ZeRO (trainer.devices, model.zero_stage)"
        )
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by model.tensor_model_parallel_size ({tp}) x "
            f"model.pipeline_model_parallel_size ({pp})"
        )
    dp = world_size // (tp * pp)
    per_step = m.micro_batch_size * dp
    if m.global_batch_size % per_step:
        raise ConfigError(
            f"model.global_batch_size ({m.global_batch_size}) is not divisible by model.micro_batch_size "
            f"({m.micro_batch_size}) x data_parallel_size ({dp}) = {per_step}"
        )
    accum = m.global_batch_size // per_step
    if t.accumulate_grad_batches is not None and t.accumulate_grad_batches != accum:
        raise ConfigError(
            f"trainer.accumulate_grad_batches={t.accumulate_grad_batches} disagrees with model.global_batch_size "
            f"({m.global_batch_size}) / (model.micro_batch_size ({m.micro_batch_size}) x data_parallel_size ({dp})) "
            f"= {accum}; set it to {accum} or null"
        )
    if m.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"model.zero_stage={m.zero_stage}: expected 0, 1, 2 or 3")
    if m.deepspeed_config is not None and not os.path.isfile(m.deepspeed_config):
        raise ConfigError(f"model.deepspeed_config: file not found: {m.deepspeed_config}")
    gran = m.get("activations_checkpoint_granularity", None)
    if gran not in (None, "full"):
        raise ConfigError(f"model.activations_checkpoint_granularity={gran!r}: expected null or 'full'")
    encdec = "encoder" in m
    if encdec and pp > 1:
        raise ConfigError(
            f"model.pipeline_model_parallel_size={pp}: the encoder-decoder model does not support pipeline "
            f"parallelism yet; use tensor and data parallelism (model.tensor_model_parallel_size, more devices)"
        )
    if pp > 1 and m.zero_stage >= 2:
        raise ConfigError(
            f"model.zero_stage={m.zero_stage} cannot be combined with model.pipeline_model_parallel_size={pp}: "
            f"DeepSpeed's pipeline engine supports ZeRO stages 0 and 1 only"
        )
    if pp > 1 and not encdec and m.num_layers < pp:
        raise ConfigError(
            f"model.num_layers={m.num_layers} is smaller than model.pipeline_model_parallel_size={pp}: every "
            f"pipeline stage needs at least one transformer layer"
        )
    return Derived(world_size=world_size, data_parallel_size=dp, accumulate_grad_batches=accum, precision=prec)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)

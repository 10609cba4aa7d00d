"""Hydra/OmegaConf glue: schema registration, loading outside Hydra, validation, derived values."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Iterable, List, Optional

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from megatron_ext.config.model_validation import check_model_config
from megatron_ext.config.schema import BARTConfig, BARTDataConfig, DataConfig, GPTConfig, default_optim
from megatron_ext.config.validation import check_run_config
from megatron_ext.errors import ConfigError
from megatron_ext.training.stragglers import resolve_every

SCHEMAS = {"gpt_schema": GPTConfig, "bart_schema": BARTConfig}

# Nodes whose keys depend on a name inside them (the optimizer's / scheduler's params class): a dict given for
# one of them on the command line (``model.optim={name: sgd, lr: 0.1}``) replaces the node instead of being
# merged into the YAML's, which would leave the previous optimizer's keys behind.
REPLACED_BY_DICT = ("model.optim", "model.optim.sched")

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


def hydra_main(config_path: str, config_name: str):
    """``@hydra.main`` for the entry points, with one exit status for every bad input: an error Hydra reports
    itself before the task function runs (unknown override key, bad override syntax, missing config file or
    group) exits with 2, as a ``MegatronExtError`` does, instead of Hydra's 1. Hydra's message is unchanged;
    an exit after the task function started is passed through."""
    import functools
    import sys

    import hydra

    def decorate(fn):
        entered = []

        @functools.wraps(fn)
        def task(cfg):
            entered.append(True)
            return fn(cfg)

        app = hydra.main(config_path=config_path, config_name=config_name, version_base=None)(task)

        @functools.wraps(fn)
        def run() -> None:
            try:
                app()
            except SystemExit as e:
                if e.code == 1 and not entered:
                    sys.exit(2)
                raise

        return run

    return decorate


# GPT's packing keys, which a BART config does not have: the refusal says why
_GPT_PACKING_KEYS = ("model.data.reset_attention_mask", "model.data.reset_position_ids", "model.data.eod_mask_loss")


def _explain(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = getattr(e, "msg", None) or str(e)
    msg = msg.split("\n")[0]
    if key in _GPT_PACKING_KEYS and "BARTDataConfig" in msg:
        msg += (" (a GPT key for packed documents: BART samples are noised spans of one document each, "
                "nothing to reset)")
    if key:
        return f"config key '{key}': {msg}{_bart_only_hint(key)}"
    return msg


def _bart_only_hint(key: str) -> str:
    """For a ``model.data`` key that only BART's data section has (noising, JSONL attribute columns): say so."""
    prefix, _, leaf = str(key).rpartition(".")
    if prefix != "model.data":
        return ""
    bart_only = {f.name for f in fields(BARTDataConfig)} - {f.name for f in fields(DataConfig)}
    if leaf not in bart_only:
        return ""
    return f" (model.data.{leaf} is a key of pretrain_bart.py's data section; GPT pretraining does not use it)"


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
        for key, value, delete in _parse_overrides(list(overrides)):
            if delete:
                _delete(cfg, key)
            elif key in REPLACED_BY_DICT and isinstance(value, dict):
                OmegaConf.update(cfg, key, value, merge=False)
            else:
                nested: Any = value
                for part in reversed(key.split(".")):
                    nested = {part: nested}
                cfg = OmegaConf.merge(cfg, nested)
        _fill_defaults(cfg)
    except (ConfigKeyError, ConfigAttributeError, ValidationError) as e:
        raise ConfigError(_explain(e)) from None
    return cfg


def _parse_overrides(overrides: list) -> list:
    """``(key, value, is_delete)`` per override, parsed with Hydra's grammar (the command line's): ``a.b=1``,
    ``+a.b=1``, ``++a.b=1``, ``~a.b``, ``a={x: 1, y: [1, 2]}``."""
    if not overrides:
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"bad override: {str(e).splitlines()[0]}") from None
    return [(o.key_or_group, None if o.is_delete() else o.value(), o.is_delete()) for o in parsed]


def _delete(cfg: DictConfig, key: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        raise ConfigError(f"~{key}: there is no config key '{key}' to delete")
    try:
        del parent[leaf]
    except OmegaConfBaseException:
        raise ConfigError(f"~{key}: a key of the schema cannot be deleted; set it instead") from None


def _fill_defaults(cfg: DictConfig) -> None:
    """A ``model.optim`` that names no optimizer (empty, removed, or only ``model.optim.lr=...`` on a config without
    an optimizer block) is laid over the default optimizer (``schema.default_optim``); one that names an optimizer is
    taken as given."""
    if "model" not in cfg:
        return
    optim = cfg.model.get("optim")
    if not optim or optim.get("name") is None:
        cfg.model.optim = OmegaConf.merge(default_optim(), optim or {})


def _hydra_dict_overrides() -> list:
    """``(key, dict)`` for each command-line override of a :data:`REPLACED_BY_DICT` node by a dict, with the later
    overrides of keys under it, in command-line order; empty outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if not HydraConfig.initialized():
            return []
        parsed = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    except Exception:  # not a Hydra run, or overrides Hydra itself already accepted and applied
        return []
    out, replaced = [], []
    for o in parsed:
        key = o.key_or_group
        if o.is_delete():
            continue
        if key in REPLACED_BY_DICT and isinstance(o.value(), dict):
            out.append((key, o.value()))
            replaced.append(key)
        elif any(key.startswith(r + ".") for r in replaced):
            out.append((key, o.value()))
    return out


def check_config(cfg: DictConfig, schema: type = GPTConfig) -> DictConfig:
    """The config of a run, checked: :func:`check_schema`, then the checks that need no process
    (``megatron_ext.config.validation.check_run_config``). Called before any worker is started and again by
    each process (``Trainer``); every error is a ``ConfigError`` naming the key."""
    redo = _hydra_dict_overrides()
    if redo:
        cfg = cfg.copy()
        with open_dict(cfg):
            for key, value in redo:
                if isinstance(value, dict) and key in REPLACED_BY_DICT:
                    OmegaConf.update(cfg, key, value, merge=False, force_add=True)
                else:
                    OmegaConf.update(cfg, key, value, merge=True, force_add=True)
    checked = check_schema(cfg, schema)
    check_run_config(checked)
    return checked


def check_schema(cfg: DictConfig, schema: type = GPTConfig) -> DictConfig:
    """Re-check a composed config against the closed schema.

    Hydra's ``+key=value`` adds keys with the struct flag lifted, so a mistyped ``+model.hiden_size`` would pass
    composition silently; merging onto the schema again turns it into an error naming the key.
    """
    try:
        data = OmegaConf.to_container(cfg, resolve=False)
        data.pop("hydra", None)
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        _fill_defaults(merged)
        return merged
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


NAN_POLICIES = ("stop", "skip")


def parse_skip_steps(values: Any, key: str = "trainer.skip_steps") -> List[int]:
    """``trainer.skip_steps``: a list of step numbers (>= 1) and ranges ``"A-B"`` (both ends included)."""
    if values is None:
        return []
    if isinstance(values, (str, int)):
        values = [values]
    out = set()
    for v in values:
        text = str(v).strip()
        lo, sep, hi = text.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise ConfigError(f"{key}: item {v!r} is not a step number or a range 'A-B' (e.g. [5, '100-120'])") \
                from None
        if isinstance(v, bool) or a < 1 or b < a:
            raise ConfigError(f"{key}: item {v!r}: expected steps >= 1 (a range 'A-B' with A <= B)")
        out.update(range(a, b + 1))
    return sorted(out)


def validate_bad_steps(t, precision: str) -> None:
    """Cross-key checks of the bad-step keys (``training/bad_steps.py``; ``validate_config`` calls it)."""
    if t.nan_policy not in NAN_POLICIES:
        raise ConfigError(f"trainer.nan_policy={t.nan_policy!r}: expected one of {', '.join(NAN_POLICIES)}")
    if t.max_consecutive_skips is None or int(t.max_consecutive_skips) < 0:
        raise ConfigError(f"trainer.max_consecutive_skips={t.max_consecutive_skips}: expected an integer >= 0 "
                          f"(0: the first skipped step stops the run)")
    if t.loss_spike_factor is not None and not float(t.loss_spike_factor) > 1.0:
        raise ConfigError(f"trainer.loss_spike_factor={t.loss_spike_factor}: expected null (off) or a number > 1 "
                          f"(a step whose loss exceeds factor x the running mean is bad)")
    if t.loss_spike_window is None or int(t.loss_spike_window) < 1:
        raise ConfigError(f"trainer.loss_spike_window={t.loss_spike_window}: expected an integer >= 1")
    parse_skip_steps(t.skip_steps)
    if precision == "16":
        for key, on in (("nan_policy", t.nan_policy == "skip"), ("loss_spike_factor", t.loss_spike_factor is not None)):
            if on:
                raise ConfigError(
                    f"trainer.{key}={t.get(key)} is not supported with trainer.precision=16: fp16 loss scaling "
                    f"already skips steps whose gradients overflow (and lowers the scale); use precision bf16 or 32")


def validate_config(cfg: DictConfig, world_size: int, on_cuda: bool) -> Derived:
    """Check cross-key constraints (the model's architecture included: ``model_validation``, for this device) and
    compute the values that depend on the world size. Raises ConfigError naming the key."""
    t, m = cfg.trainer, cfg.model
    prec = PRECISIONS.get(str(t.precision))
    if prec is None:
        raise ConfigError(f"trainer.precision={t.precision!r}: expected one of 32, bf16, 16 (or 16-mixed, bf16-mixed)")
    if prec == "16" and not on_cuda:
        raise ConfigError("trainer.precision=16 (fp16) needs a GPU; on CPU use trainer.precision=bf16 or 32")
    for key in ("model.micro_batch_size", "model.global_batch_size", "model.seq_length",
                "trainer.devices", "trainer.num_nodes", "trainer.log_every_n_steps"):
        _positive(cfg, key)
    _positive(cfg, "trainer.max_restarts", allow_zero=True)
    # trainer.max_steps, max_epochs, val_check_interval, limit_*_batches, fast_dev_run (training/run_length.py) and
    # the monitor / early-stopping keys (training/best.py): config.validation.check_run_config
    limit_test = t.get("limit_test_batches")
    if limit_test is not None and (isinstance(limit_test, bool) or not isinstance(limit_test, (int, float))
                                   or limit_test < 0 or (isinstance(limit_test, float) and limit_test > 1)):
        raise ConfigError(f"trainer.limit_test_batches={limit_test!r}: expected null (as trainer.limit_val_batches), 0 "
                          f"(no test evaluation), an integer > 0 (global batches) or a fraction in (0, 1]")
    step_timeout = t.get("step_timeout_minutes")
    if step_timeout is not None and not step_timeout > 0:
        raise ConfigError(f"trainer.step_timeout_minutes={step_timeout}: expected null (off) or a number of minutes > 0")
    every = t.get("straggler_every_n_steps")
    if every is not None and every < 0:
        raise ConfigError(f"trainer.straggler_every_n_steps={every}: expected null (auto), 0 (off) or an integer > 0")
    thr = t.get("straggler_threshold")
    if thr is None or not thr > 0:
        raise ConfigError(f"trainer.straggler_threshold={thr}: expected a fraction > 0 (0.2 = 20% slower)")
    pcs = t.get("plan_check_steps")
    if pcs is None or int(pcs) < 1:
        raise ConfigError(f"trainer.plan_check_steps={pcs}: expected an integer >= 1 (the steps trainer.plan_check "
                          f"measures, from the second step on)")
    em = cfg.exp_manager
    if m.ckpt_path and em.resume_from_checkpoint:
        raise ConfigError(
            f"model.ckpt_path={m.ckpt_path} and exp_manager.resume_from_checkpoint={em.resume_from_checkpoint} are "
            f"both set: model.ckpt_path starts from a checkpoint's weights only (the optimizer starts fresh), "
            f"resume_from_checkpoint from its full training state; set one of them"
        )
    if t.limit_train_batches == 0 and not (m.ckpt_path or em.resume_from_checkpoint):
        raise ConfigError("trainer.limit_train_batches=0 means evaluation only and needs model.ckpt_path=<checkpoint> "
                          "(or exp_manager.resume_from_checkpoint=<checkpoint>)")
    validate_bad_steps(t, prec)
    expected_world = t.devices * t.num_nodes
    if expected_world != world_size:
        raise ConfigError(
            f"trainer.devices ({t.devices}) x trainer.num_nodes ({t.num_nodes}) = {expected_world} but the "
            f"launcher started {world_size} processes; make them agree"
        )
    check_model_config(m, use_cuda=on_cuda)  # the architecture (model_validation), with this run's device
    tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
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
    resolve_every(cfg)  # trainer.straggler_every_n_steps > 0 where compute cannot be measured: refused
    if pp > 1 and m.zero_stage >= 2:
        raise ConfigError(
            f"model.zero_stage={m.zero_stage} cannot be combined with model.pipeline_model_parallel_size={pp}: "
            f"DeepSpeed's pipeline engine supports ZeRO stages 0 and 1 only"
        )
    return Derived(world_size=world_size, data_parallel_size=dp, accumulate_grad_batches=accum, precision=prec)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)

"""The one checkpoint loader: a ``.mext`` archive, a training checkpoint (a run directory, its ``checkpoints``
directory or one ``step_N``; any TP / PP / ZeRO layout) or a consolidated ``.pt`` -> weights, or a built model.

    obj = read_weights(path)            # {"state_dict", "vocab_size", "model_config", "family", ...}: no model built
    loaded = load_model(path)           # Loaded(model, tokenizer, config, family, info): eval mode, current TP layout
    model = restore_model(path, GPTModel)   # the bare model, .tokenizer / .run_config attached (archive.save_to)
    archive_from_checkpoint(run_dir, "gpt.mext")

Which family a checkpoint holds is decided by the table in :mod:`megatron_ext.models.families` (an archive's
manifest names it; a training checkpoint's ``meta.json`` carries the model section it was trained with). Models are
built by that table's builders -- the ones training uses -- at the current tensor-parallel size (TP=1 in a
one-process group when no parallel state is set up), pipeline parallel 1, and get this rank's shard of every full
tensor. Building a model from a training checkpoint needs the run's ``config.yaml`` (the exp manager writes it next
to ``checkpoints/``): it is the config the returned model carries. Tensor-parallel shards of a checkpoint saved at
TP > 1 are merged along the partition attributes of the same model built at TP=1.
"""
from __future__ import annotations

import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state as ps
from omegaconf import OmegaConf

from megatron_ext.checkpoint.archive import load_full_state_dict, read_archive, write_archive
from megatron_ext.checkpoint.consolidated import (checkpoint_meta, consolidate_checkpoint, load_consolidated,
                                                  read_consolidated)
from megatron_ext.checkpoint.files import read_meta, resolve_ckpt_path
from megatron_ext.config.loader import check_schema
from megatron_ext.errors import CheckpointError
from megatron_ext.models.families import Family, family_of_config, get_family
from megatron_ext.parallel.state import initialize_parallel


@dataclass
class Loaded:
    """A model built from a checkpoint, in eval mode, with what it was trained with."""

    model: torch.nn.Module
    tokenizer: Any
    config: Dict[str, Any]  # the resolved run config as a plain dict (``config["model"]``: the model section)
    family: str
    info: Dict[str, Any] = field(default_factory=dict)  # the archive manifest, or the checkpoint's step / layout
    files: Optional[tempfile.TemporaryDirectory] = None  # the unpacked archive (its tokenizer file) while in use


# ----------------------------------------------------------------------------------------------- building
def _ensure_parallel(device: torch.device) -> int:
    """The current tensor-parallel size, after setting up a one-process TP=1 group when there is none."""
    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        initialize_parallel(1, 1, accelerator="cpu" if device.type == "cpu" else "auto")
    return ps.get_tensor_model_parallel_world_size()


def build_model(config: Dict[str, Any], family: Family, *, vocab_size: Optional[int] = None,
                tokenizer_model: Optional[str] = None, device: torch.device):
    """(model, tokenizer, typed config) for a run config, built as training builds them, at the current TP size
    (pipeline parallel 1). ``tokenizer_model`` replaces ``model.tokenizer.model`` (an archive's unpacked file).
    With ``vocab_size`` no tokenizer is built (None is returned for it): the weights' shapes are all that is
    needed."""
    world = _ensure_parallel(device)
    cfg = dict(config)
    cfg.pop("hydra", None)
    typed = check_schema(OmegaConf.create(cfg), family.schema)
    m = typed.model
    m.tensor_model_parallel_size = world
    m.pipeline_model_parallel_size = 1
    m.sequence_parallel = False
    m.ckpt_path = None
    m.tokenizer.model = tokenizer_model
    tokenizer = None
    if vocab_size is None:
        tokenizer = family.build_tokenizer(m.tokenizer)
        vocab_size = int(tokenizer.vocab_size)
    model = family.build(m, int(vocab_size), init_seed=int(typed.trainer.seed))
    return model.to(device), tokenizer, typed


def run_config_for(ckpt_dir: str) -> Dict[str, Any]:
    """The run's resolved ``config.yaml`` (written by the exp manager next to ``checkpoints/``)."""
    d = os.path.dirname(os.path.abspath(ckpt_dir))
    for cand in (os.path.dirname(d), d):
        p = os.path.join(cand, "config.yaml")
        if os.path.isfile(p):
            with open(p) as f:
                try:
                    cfg = yaml.safe_load(f)
                except yaml.YAMLError as e:
                    raise CheckpointError(f"{p} is not valid YAML: {e}") from None
            if isinstance(cfg, dict) and "model" in cfg:
                return cfg
    raise CheckpointError(f"{ckpt_dir}: no config.yaml in its run directory (expected <run>/config.yaml next "
                          f"to <run>/checkpoints/)")


# ----------------------------------------------------------------------------------------------- weights
def consolidate_any(path: str) -> Dict[str, Any]:
    """A training checkpoint (run dir, checkpoints dir or ``step_N``; any TP/PP/ZeRO layout) -> the consolidated
    dict of :mod:`megatron_ext.checkpoint.consolidated` with ``family`` and ``ckpt_path`` added. No run config is
    needed: the family and, at TP > 1, the shard layout come from the model section in ``meta.json`` (GPT: the name
    table ``partition_rule``; the other families: a TP=1 build of the same model)."""
    ckpt, meta = checkpoint_meta(path)
    mcfg = meta["model_config"]
    family = family_of_config(mcfg)
    rules = None  # GPT: the name table of megatron_ext.checkpoint.consolidated.partition_rule
    if int(meta.get("tp", 1)) > 1 and family.name != "gpt":
        # the shard layout of the other families: the megatron-core attributes of the same model built at TP=1
        model, _, _ = build_model({"model": mcfg}, family, vocab_size=int(meta["vocab_size"]),
                                  tokenizer_model=(mcfg.get("tokenizer") or {}).get("model"),
                                  device=torch.device("cpu"))
        rules = {k: (int(v.partition_dim), int(v.partition_stride))
                 for k, v in model.state_dict(keep_vars=True).items() if getattr(v, "tensor_model_parallel", False)}
        del model
    obj = consolidate_checkpoint(ckpt, rules=rules, meta=meta)
    obj.update(family=family.name, ckpt_path=ckpt)
    return obj


def read_weights(path: str, extract_dir: Optional[str] = None, key: str = "--input") -> Dict[str, Any]:
    """``path`` -> the consolidated dict (``state_dict``, ``vocab_size``, ``model_config``, ``family``, ...) of a
    ``.mext`` archive (unpacked into ``extract_dir``), a training checkpoint (any layout) or a consolidated
    ``.pt``. ``key`` names the argument in errors."""
    if not os.path.exists(path):
        raise CheckpointError(f"{key} {path}: no such file or directory (expected a .mext archive, a run/checkpoint "
                              f"directory or a consolidated .pt file)")
    if os.path.isdir(path):
        try:
            resolve_ckpt_path(path)
        except CheckpointError as e:
            raise CheckpointError(str(e).replace("model.ckpt_path", key, 1)) from None
        return consolidate_any(path)
    if path.endswith(".mext") or (not path.endswith(".pt") and tarfile.is_tarfile(path)):
        return read_archive(path, extract_dir)
    obj = read_consolidated(path)
    obj.setdefault("family", family_of_config(obj.get("model_config")).name)
    return obj


def family_of_checkpoint(path: str, key: str = "--input") -> Family:
    """The family of a training checkpoint directory, read from its ``meta.json`` alone (no weights)."""
    try:
        ckpt_dir, tag = resolve_ckpt_path(path)
    except CheckpointError as e:
        raise CheckpointError(str(e).replace("model.ckpt_path", key, 1)) from None
    return family_of_config(read_meta(os.path.join(ckpt_dir, tag), keys=()).get("model_config") or {})


def load_weights_file(model: torch.nn.Module, path: str, model_cfg) -> Dict[str, Any]:
    """``model.ckpt_path`` naming a file: a consolidated ``.pt`` or a GPT ``.mext`` archive (e.g. from
    ``tools/convert_from_hf.py``) -> this rank's shards copied into ``model`` (``load_consolidated``: the
    architecture keys are checked against ``model_cfg``; an archive's tokenizer library must be the run's). Returns
    the file's header (step, source, ...)."""
    if not (str(path).endswith(".mext") or (not str(path).endswith(".pt") and tarfile.is_tarfile(path))):
        return load_consolidated(model, path, model_cfg)
    with tempfile.TemporaryDirectory(prefix="mext-") as tmp:
        obj = read_archive(path, tmp)
    mine_family = family_of_config(model_cfg).name if model_cfg is not None else "gpt"
    if obj.get("family") != mine_family:
        raise CheckpointError(f"{path} holds a {obj.get('family')} model (its manifest's family) but this run "
                              f"trains a {mine_family} model (model.arch={_attr(model_cfg, 'arch')})")
    if mine_family == "mega":
        check_mega_architecture(obj["model_config"], model_cfg, path)
    lib = (obj.get("tokenizer") or {}).get("library")
    mine = getattr(getattr(model_cfg, "tokenizer", None), "library", None) if model_cfg is not None else None
    if lib and mine and str(lib).lower() != str(mine).lower():
        raise CheckpointError(f"{path} was trained with model.tokenizer.library={lib} but this run has "
                              f"model.tokenizer.library={mine}; use the tokenizer the archive was trained with")
    obj.setdefault("step", 0)
    return load_consolidated(model, path, model_cfg, obj=obj)


#: model.mega keys that do not change the function (an implementation choice; ignored by a causal decoder)
MEGA_NON_ARCH = ("ema_impl", "bidirectional")


def _attr(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def check_mega_architecture(saved: Dict[str, Any], model_cfg: Any, where: str) -> None:
    """A Mega LM archive's ``model.mega.*`` keys against the run's (``load_consolidated`` checks the transformer
    keys and every tensor's shape; these decide the function without changing shapes). Null sizes resolve to their
    defaults (``2 * hidden_size``; ``max_positions``: ``seq_length``)."""
    a_m, b_m = saved.get("mega") or {}, _attr(model_cfg, "mega")
    if b_m is None:
        return

    def resolved(cfg: Any, mega: Any, key: str) -> Any:
        v = _attr(mega, key)
        if v is None and key in ("intermediate_size", "nffn_hidden_size"):
            return 2 * int(_attr(cfg, "hidden_size"))
        if v is None and key == "max_positions":
            return int(_attr(cfg, "seq_length"))
        return v

    for key in a_m:
        if key in MEGA_NON_ARCH:
            continue
        a, b = resolved(saved, a_m, key), resolved(model_cfg, b_m, key)
        if str(a).lower() != str(b).lower():
            raise CheckpointError(f"{where} was trained with model.mega.{key}={a} but this model has "
                                  f"model.mega.{key}={b}")


# ----------------------------------------------------------------------------------------------- models
def load_model(path: str, *, map_location="cpu") -> Loaded:
    """A ``.mext`` archive or a run / checkpoint directory (its newest complete checkpoint, any layout) -> the model
    in eval mode at the current TP layout, with its tokenizer and run config. Nothing is written but the unpacked
    archive (a temporary directory that lives as long as ``Loaded.files``)."""
    device = torch.device(map_location)
    if os.path.isdir(path):
        obj = consolidate_any(path)
        config = run_config_for(os.path.dirname(obj["ckpt_path"]))
        tok = (config.get("model") or {}).get("tokenizer") or {}
        files, tok_file, where = None, tok.get("model"), obj["ckpt_path"]
        info = {"family": obj["family"], "checkpoint": obj["ckpt_path"], "step": obj["step"],
                "vocab_size": obj["vocab_size"], "source": obj["source"]}
    else:
        files = tempfile.TemporaryDirectory(prefix="mext-")
        obj = read_archive(path, files.name)
        config, tok_file, where = obj["config"], obj["tokenizer"]["model"], path
        info = {**obj["manifest"], "path": os.path.abspath(path)}
    family = get_family(obj["family"])
    model, tokenizer, typed = build_model(config, family, tokenizer_model=tok_file, device=device)
    if int(tokenizer.vocab_size) != int(obj["vocab_size"]):
        raise CheckpointError(f"{where}: the {'archive' if files else 'run'}'s tokenizer has {tokenizer.vocab_size} "
                              f"ids but the weights were trained with {obj['vocab_size']}")
    load_full_state_dict(model, obj["state_dict"], where)
    model.eval()
    return Loaded(model, tokenizer, OmegaConf.to_container(typed, resolve=True), family.name, info, files)


def restore_model(path: str, model_class: Optional[type] = None, *, map_location="cpu") -> torch.nn.Module:
    """The bare model of an archive or run directory (:func:`load_model`), with ``.tokenizer`` and ``.run_config``
    attached so that ``archive.save_to(model, path)`` writes it again; ``model_class``: the class it must be (a
    CheckpointError naming the family otherwise)."""
    loaded = load_model(path, map_location=map_location)
    model = loaded.model
    if model_class is not None and not isinstance(model, model_class):
        raise CheckpointError(f"{path} holds a {type(model).__name__} ({loaded.family}), not a "
                              f"{model_class.__name__}")
    model.tokenizer, model.run_config = loaded.tokenizer, loaded.config
    model._archive_files = loaded.files  # keeps the extracted tokenizer file alive
    return model


def archive_from_checkpoint(path: str, out_path: str) -> str:
    """``tools/export_archive.py``: a run's checkpoint (any layout) -> a ``.mext`` archive, in one process."""
    obj = consolidate_any(path)
    config = run_config_for(os.path.dirname(obj["ckpt_path"]))
    tok = (config.get("model") or {}).get("tokenizer") or {}
    return write_archive(out_path, state_dict=obj["state_dict"], config=config, family=obj["family"],
                         vocab_size=obj["vocab_size"], tokenizer_library=str(tok.get("library", "byte")),
                         tokenizer_file=tok.get("model"),
                         source={"checkpoint": obj["ckpt_path"], "step": obj["step"],
                                 "consumed_samples": obj["consumed_samples"], "layout": obj["source"]})


__all__ = ["Loaded", "build_model", "run_config_for", "consolidate_any", "read_weights", "load_weights_file",
           "check_mega_architecture", "family_of_checkpoint",
           "load_model", "restore_model", "archive_from_checkpoint"]

"""Layout-free ("consolidated") GPT weights: one fp32 state dict that any TP x PP x DP layout can load.

File format (``torch.save``)::

    {"format": "megatron_ext.consolidated.v1",
     "state_dict": {GPTModel parameter name: full fp32 tensor},   # vocab rows trimmed to vocab_size
     "vocab_size": int, "model_config": {model.* architecture keys}, "step": int, "consumed_samples": int,
     "source": {"path": ..., "tp": ..., "pp": ..., "dp": ..., "zero_stage": ..., "precision": ...}}

Names are ``GPTModel``'s (a pipeline stage maps its own names with ``gpt_pipe.canonical_name``). TP shard
layouts come from ``partition_rule`` (the same table megatron-core's parameter attributes give; a test checks
the two agree). The word embedding / untied output layer are stored with exactly ``vocab_size`` rows: padding
rows never reach the loss (models/gpt.py masks them), so a layout with another padded size loads them as zeros.

``consolidate_checkpoint`` reads a DeepSpeed checkpoint written by ``Checkpointer`` without starting any process
group: model files per TP rank (``mp_rank_TT_model_states.pt``) or per pipeline layer
(``layer_LL-model_TT-model_states.pt``); with ZeRO 1-3 (no pipeline) the fp32 master weights come from the
optimizer partitions through DeepSpeed's own ``zero_to_fp32`` reader, run once per TP rank.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import tempfile
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from megatron_ext.checkpoint.files import check_files, resolve_ckpt_path
from megatron_ext.checkpoint.safe_load import check_untrusted, load_untrusted
from megatron_ext.errors import CheckpointError
from megatron_ext.models.gpt import resolve_ffn_hidden_size, resolve_max_position_embeddings, resolve_num_query_groups
from megatron_ext.models.gpt_pipe import canonical_name
from megatron_ext.modules import common as tp_state

log = logging.getLogger("megatron_ext")

FORMAT = "megatron_ext.consolidated.v1"

# architecture keys that must agree between a consolidated file and the model loading it
ARCH_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
             "normalization", "activation", "position_embedding_type", "share_embeddings_and_output_weights", "bias",
             "max_position_embeddings")
# numeric architecture keys compared as numbers, and only when the saved config has them (older files may not)
ARCH_NUMBERS = ("layernorm_epsilon", "rotary_base")

VOCAB_PARTITIONED = ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias")


def partition_rule(name: str, activation: str = "gelu") -> Optional[Tuple[int, int]]:
    """(partition dim, stride) of a TP-sharded ``GPTModel`` parameter, or None if it is replicated."""
    if name in VOCAB_PARTITIONED:
        return 0, 1
    if re.search(r"self_attention\.linear_qkv\.(weight|bias)$", name):
        return 0, 1
    if re.search(r"self_attention\.linear_proj\.weight$", name):
        return 1, 1
    if re.search(r"mlp\.linear_fc1\.(weight|bias)$", name):
        return 0, 2 if str(activation).lower() == "swiglu" else 1
    if re.search(r"mlp\.linear_fc2\.weight$", name):
        return 1, 1
    return None


def _is_state_key(k: str) -> bool:
    return not k.endswith("_extra_state")


# ---------------------------------------------------------------------------------------------- sharding math
def shard_of(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full`` along ``dim`` (megatron's strided layout: the dimension is viewed as
    ``stride`` blocks, each block is split in ``world`` and rank r holds the r-th piece of every block)."""
    if world == 1:
        return full
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(world, dim=dim)[rank] for b in blocks], dim=dim)


def merge_shards(shards: list, dim: int, stride: int) -> torch.Tensor:
    """Inverse of ``shard_of`` over all ranks."""
    world = len(shards)
    if world == 1:
        return shards[0]
    per_rank_blocks = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([torch.cat([per_rank_blocks[r][b] for r in range(world)], dim=dim) for b in range(stride)],
                     dim=dim)


# ---------------------------------------------------------------------------------------------- reading DS files
def _load(path: str) -> Any:
    return load_untrusted(path, "checkpoint file")


def _module_states_pp1(path: str, tp_rank: int) -> Dict[str, torch.Tensor]:
    sd = _load(os.path.join(path, f"mp_rank_{tp_rank:02d}_model_states.pt"))
    module = sd.get("module")
    if not isinstance(module, dict):
        raise CheckpointError(f"{path}: mp_rank_{tp_rank:02d}_model_states.pt has no 'module' state dict")
    return {k: v for k, v in module.items() if _is_state_key(k)}


def _module_states_pipe(path: str, tp_rank: int, num_layers: int) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    files = sorted(glob.glob(os.path.join(path, f"layer_*-model_{tp_rank:02d}-model_states.pt")))
    if not files:
        raise CheckpointError(f"{path}: no pipeline layer files layer_*-model_{tp_rank:02d}-model_states.pt")
    for f in files:
        idx = int(re.match(r"layer_(\d+)-", os.path.basename(f)).group(1))
        for k, v in _load(f).items():
            if not _is_state_key(k):
                continue
            name = canonical_name(f"{idx}.{k}", num_layers)
            if name is not None:
                out[name] = v
    return out


def _zero_fp32_states(path: str, tp_rank: int) -> Dict[str, torch.Tensor]:
    """fp32 master weights of one TP rank from ZeRO 1-3 optimizer partitions, via DeepSpeed's zero_to_fp32.

    zero_to_fp32 expects a single model-parallel rank (it globs every ``*_optim_states.pt`` and reads
    ``mp_rank_00``); it is pointed at a temporary directory of links holding just this TP rank's files,
    renamed to ``mp_rank_00``. zero_to_fp32 unpickles them itself without ``weights_only``, so every file is first
    read by ``check_untrusted`` (a file holding anything but tensors and plain values is refused, naming it).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # start-up cost: deepspeed

    tag = "t"
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, tag)
        os.makedirs(d)
        mine = f"mp_rank_{tp_rank:02d}"
        n = 0
        for f in os.listdir(path):
            if mine in f and f.endswith(".pt"):
                os.symlink(os.path.join(os.path.abspath(path), f), os.path.join(d, f.replace(mine, "mp_rank_00")))
                n += 1
        if n == 0:
            raise CheckpointError(f"{path}: no files for tensor-parallel rank {tp_rank} ({mine}_*)")
        for f in sorted(os.listdir(d)):  # zero_to_fp32 unpickles them in full: refuse any holding code first
            check_untrusted(os.path.join(d, f), "checkpoint file", where=os.path.realpath(os.path.join(d, f)))
        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=tag)
        except (FileNotFoundError, KeyError, ValueError, AssertionError) as e:
            raise CheckpointError(f"{path}: cannot consolidate the ZeRO optimizer partitions of TP rank "
                                  f"{tp_rank}: {str(e).splitlines()[0]}") from None
    return {k: v.float() for k, v in sd.items() if _is_state_key(k)}


def checkpoint_meta(path: str) -> Tuple[str, Dict[str, Any]]:
    """(the ``step_N`` directory, its ``meta.json``) for a run, checkpoints or ``step_N`` directory; the meta must
    carry ``vocab_size`` and the ``model_config`` the model was trained with. The directory is verified against
    its manifest first (sizes and sha256: a corrupt, truncated, missing or added file is refused, naming it; a
    checkpoint written before manifests is read with a warning that it is unverified)."""
    ckpt_dir, tag = resolve_ckpt_path(path)
    path = os.path.join(ckpt_dir, tag)
    meta = check_files(path, keys=("vocab_size",))
    if not meta.get("model_config"):
        raise CheckpointError(f"{path}/meta.json has no model_config (written by an older version?)")
    return path, meta


def consolidate_checkpoint(path: str, rules: Optional[Dict[str, Tuple[int, int]]] = None,
                           meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A checkpoint directory (``.../checkpoints/step_N``, or a run / checkpoints dir: its latest) -> the
    consolidated dict described in the module docstring. ``rules`` ({name: (partition dim, stride)} of the
    tensor-parallel parameters, e.g. read from a model's megatron-core attributes) replaces the GPT name table
    ``partition_rule``, for the other model families. ``meta``: :func:`checkpoint_meta`'s, when the caller has
    read it already (``path`` is then its ``step_N`` directory)."""
    if meta is None:
        path, meta = checkpoint_meta(path)
    mcfg = meta["model_config"]
    tp, pp = int(meta.get("tp", 1)), int(meta.get("pp", 1))
    stage, precision = int(meta.get("zero_stage", 0) or 0), str(meta.get("precision", "32"))
    vocab = int(meta["vocab_size"])
    num_layers = int(mcfg.get("num_layers") or 0)
    activation = mcfg.get("activation", "gelu")
    per_rank = []
    for t in range(tp):
        if pp > 1:
            sd = _module_states_pipe(path, t, num_layers)
        elif stage > 0:
            sd = _zero_fp32_states(path, t)
        else:
            sd = _module_states_pp1(path, t)
        per_rank.append(sd)
    if precision != "32" and (pp > 1 or stage == 0):
        log.warning("%s was trained with precision %s and ZeRO stage %d%s: its fp32 master weights live in the "
                    "optimizer state, which is not read here; the consolidated weights are the model's %s copy",
                    path, precision, stage, " with a pipeline" if pp > 1 else "", precision)
    names = list(per_rank[0].keys())
    for t, sd in enumerate(per_rank[1:], 1):
        if set(sd) != set(names):
            raise CheckpointError(f"{path}: TP rank {t} holds different parameters than TP rank 0")
    full: Dict[str, torch.Tensor] = {}
    for n in names:
        rule = partition_rule(n, activation) if rules is None else rules.get(n)
        if rule is None:
            full[n] = per_rank[0][n].detach().float().clone()
        else:
            full[n] = merge_shards([sd[n].detach().float() for sd in per_rank], *rule).clone()
        if n in VOCAB_PARTITIONED:
            full[n] = full[n][:vocab].clone()
    return {
        "format": FORMAT,
        "state_dict": full,
        "vocab_size": vocab,
        "model_config": mcfg,
        "step": int(meta.get("step", 0)),
        "consumed_samples": int(meta.get("consumed_samples", 0)),
        "source": {"path": path, "tp": tp, "pp": pp, "dp": meta.get("dp"), "zero_stage": stage,
                   "precision": precision},
    }


# ---------------------------------------------------------------------------------------------- loading
def read_consolidated(path: str) -> Dict[str, Any]:
    obj = _load(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a consolidated megatron_ext checkpoint (expected format {FORMAT}; "
                              f"make one with tools/convert_checkpoint.py)")
    return obj


def _arch_value(cfg, key):
    v = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
    return v


def check_architecture(saved: Dict[str, Any], model_cfg, vocab_size: int, where: str) -> None:
    class _C:  # attribute view of the saved dict for the resolve_* helpers
        def __init__(self, d):
            self.__dict__.update(d)

    s = _C(saved)
    # resolved values: a file saved before model.num_query_groups existed (multi-head) matches num_query_groups=null
    # and num_query_groups=num_attention_heads alike
    mine_res = {"ffn_hidden_size": resolve_ffn_hidden_size(model_cfg),
                "max_position_embeddings": resolve_max_position_embeddings(model_cfg),
                "num_query_groups": resolve_num_query_groups(model_cfg)}
    saved_res = {"ffn_hidden_size": resolve_ffn_hidden_size(s), "max_position_embeddings":
                 resolve_max_position_embeddings(s), "num_query_groups": resolve_num_query_groups(saved)}
    for k in ARCH_KEYS:
        a = saved_res.get(k, _arch_value(saved, k))
        b = mine_res.get(k, _arch_value(model_cfg, k))
        if str(a).lower() != str(b).lower():
            raise CheckpointError(f"{where} was trained with model.{k}={a} but this model has model.{k}={b}")
    for k in ARCH_NUMBERS:
        if not (isinstance(saved, dict) and k in saved):
            continue
        a, b = saved.get(k), _arch_value(model_cfg, k)
        if k == "rotary_base" and str(_arch_value(model_cfg, "position_embedding_type")).lower() != "rope":
            continue  # unused without rotary positions
        try:
            same = a is not None and b is not None and abs(float(a) - float(b)) <= 1e-9 * max(abs(float(a)), 1.0)
        except (TypeError, ValueError):
            same = False
        if not same:
            raise CheckpointError(f"{where} was trained with model.{k}={a} but this model has model.{k}={b}")


def load_consolidated(model: torch.nn.Module, path: str, model_cfg, obj: Optional[Dict[str, Any]] = None
                      ) -> Dict[str, Any]:
    """Copy this rank's shards of a consolidated file into ``model`` (a ``GPTModel`` or a pipeline stage) in
    place. Returns the file's header (step, source, ...). ``obj``: the file's contents when the caller has read
    them (a ``.mext`` archive read by ``megatron_ext.checkpoint.loader.load_weights_file``)."""
    obj = read_consolidated(path) if obj is None else obj
    sd = obj["state_dict"]
    vocab = int(getattr(model, "vocab_size", obj["vocab_size"]))
    if vocab != int(obj["vocab_size"]):
        raise CheckpointError(f"{path} has vocabulary size {obj['vocab_size']} but this model's tokenizer has "
                              f"{vocab}; use the tokenizer the checkpoint was trained with")
    check_architecture(obj["model_config"], model_cfg, vocab, path)
    pipeline = bool(getattr(model, "is_pipeline", False))
    num_layers = int(model_cfg.num_layers)
    rank, world = tp_state.tp_rank(), tp_state.tp_world_size()
    activation = str(model_cfg.activation)
    used = set()
    with torch.no_grad():
        for local_name, p in model.named_parameters():
            if pipeline:
                name = canonical_name(local_name, num_layers)
                if name is None:
                    raise CheckpointError(f"pipeline parameter {local_name} has no GPTModel name")
            else:
                name = local_name
            if name not in sd:
                raise CheckpointError(f"{path} has no weights for {name}")
            full = sd[name]
            if name in VOCAB_PARTITIONED:  # pad to this layout's padded vocabulary with zero rows
                padded = p.shape[0] * world
                if padded < full.shape[0]:
                    raise CheckpointError(f"{name}: {full.shape[0]} rows do not fit the padded vocabulary {padded}")
                full = torch.cat([full, full.new_zeros(padded - full.shape[0], *full.shape[1:])], dim=0)
            rule = partition_rule(name, activation)
            attr_parallel = bool(getattr(p, "tensor_model_parallel", False)) and world > 1
            if (rule is not None) != attr_parallel and world > 1:
                raise CheckpointError(f"{name}: sharding rule {rule} disagrees with the parameter's TP attributes")
            piece = shard_of(full, *rule, rank, world) if rule is not None else full
            if tuple(piece.shape) != tuple(p.shape):
                raise CheckpointError(f"{name}: {path} gives shape {tuple(piece.shape)} for this rank but the model "
                                      f"has {tuple(p.shape)}")
            p.copy_(piece.to(p.dtype))
            used.add(name)
    if not pipeline:
        unused = [k for k in sd if k not in used]
        if unused:
            raise CheckpointError(f"{path} holds weights this model does not have: {', '.join(unused[:5])}")
    if pipeline and hasattr(model, "_synchronize_tied_weights"):
        model._synchronize_tied_weights()
    return obj


def save_consolidated(obj: Dict[str, Any], out_path: str) -> None:
    d = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(d, exist_ok=True)
    tmp = out_path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, out_path)


__all__: Iterable[str] = [
    "FORMAT", "partition_rule", "shard_of", "merge_shards", "checkpoint_meta", "consolidate_checkpoint", "read_consolidated",
    "load_consolidated", "save_consolidated", "check_architecture",
]

"""Layout-free training state: resume a checkpoint under any TP x PP x DP x ZeRO layout, optimizer state included.

Every checkpoint directory ``step_N/`` also holds ``layout_free/``, written with ``torch.distributed.checkpoint``
(DCP) next to DeepSpeed's own files:

* for every parameter, by its ``GPTModel`` name (a pipeline stage's names mapped with ``gpt_pipe.canonical_name``,
  so layers carry their global index): ``<name>/param`` -- the fp32 master weight --, one ``<name>/<key>`` for
  every element-wise optimizer state (Adam: ``exp_avg``, ``exp_avg_sq``) and the optimizer's scalar state (Adam:
  ``<name>/step``). Each tensor is the *logical* one: assembled over data parallel (``safe_get_full_*`` from
  DeepSpeed's ``tensor_fragment``; under ZeRO 0 the torch optimizer's own state), then over tensor parallel along
  the megatron-core partition attributes of the parameter (``partition_dim``, ``partition_stride``), with the
  word embedding / output layer trimmed to the tokenizer's ``vocab_size`` rows (padding rows depend on the layout
  and never reach the loss);
* ``extra.pt`` (rank 0): the LR scheduler's state, the optimizer's class (another one on load is refused), the
  step, consumed samples, the layout that wrote it.

Every rank that holds a tensor offers it to DCP under the same key; DCP's planner keeps one writer per key, so
each tensor is written once. Loading under another layout: every rank asks DCP for the tensors its own stage
needs (full ones), cuts its TP shard (``consolidated.shard_of``; zero rows pad the vocabulary to this layout's
size) and sets it as the fp32 master and optimizer state through ``safe_set_full_*`` (ZeRO 1-3; the model's
working copy too) or directly into the torch optimizer (ZeRO 0). Nothing is recomputed, so the loaded state is
bitwise the saved one.

DCP's ``.metadata`` file is a pickle: it is read with ``safe_load.load_dcp_metadata`` (only DCP's own metadata
types), never with DCP's reader, and the tensor files are read by DCP with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_ext.checkpoint.consolidated import VOCAB_PARTITIONED, merge_shards, shard_of
from megatron_ext.checkpoint.safe_load import load_dcp_metadata, load_untrusted
from megatron_ext.errors import CheckpointError, CorruptCheckpointError
from megatron_ext.models.gpt_pipe import canonical_name

log = logging.getLogger("megatron_ext")

STATE_DIR = "layout_free"
EXTRA = "extra.pt"
FORMAT = "megatron_ext.layout_free.v1"
PARAM = "param"
_warned = False


# ---------------------------------------------------------------------------------------------- parameters
def _tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size(), \
        ps.get_tensor_model_parallel_rank()


def named_parameters(module: torch.nn.Module, pipeline: bool, num_layers: int) -> Iterator[Tuple[str, Any]]:
    """(global ``GPTModel`` name, parameter) of this rank's parameters, in the module's order (the same on every
    rank of a stage)."""
    seen = set()
    for local, p in module.named_parameters():
        name = canonical_name(local, num_layers) if pipeline else local
        if name is None:
            raise CheckpointError(f"pipeline parameter {local} has no GPTModel name")
        if name in seen:
            continue
        seen.add(name)
        yield name, p


def _ds(obj, *names: str):
    """The first of ``names`` that DeepSpeed's optimizer ``obj`` has (private members, as in the DeepSpeed releases
    pyproject.toml allows); none: one CheckpointError naming the version and the members."""
    for n in names:
        if hasattr(obj, n):
            return getattr(obj, n)
    import deepspeed  # already imported by whoever built obj

    raise CheckpointError(f"DeepSpeed {deepspeed.__version__}: {type(obj).__name__} has no {' / '.join(names)}, "
                          f"which the layout-free checkpoint state needs; its internals changed. Install a version "
                          f"pyproject.toml allows, or set exp_manager.checkpoint_callback_params.save_layout_free=false")


def _tp_rule(p) -> Optional[Tuple[int, int]]:
    if getattr(p, "tensor_model_parallel", False):
        return int(p.partition_dim), int(getattr(p, "partition_stride", 1) or 1)
    return None


def _shape(p) -> Tuple[int, ...]:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


class _Access:
    """Reads and writes one rank's fp32 master weights and optimizer state, whatever holds them: DeepSpeed's
    ZeRO 1-3 / bf16 optimizers (fragments of flat partitions, through ``tensor_fragment``'s ``safe_*`` API) or,
    under ZeRO 0 in fp32, the torch optimizer itself (its state keyed by the parameter)."""

    def __init__(self, engine):
        self.engine = engine
        self.opt = engine.optimizer
        params = list(engine.module.parameters())
        self.zero3 = any(hasattr(p, "ds_id") for p in params)
        self.fragments = self.zero3 or any(hasattr(p, "_hp_mapping") for p in params)
        if not self.fragments and not isinstance(self.opt, torch.optim.Optimizer):
            raise CheckpointError(f"the optimizer state of {type(self.opt).__name__} (DeepSpeed's fp16/bf16 "
                                  f"optimizer without ZeRO) cannot be read by parameter; such a checkpoint resumes "
                                  f"only under the layout that wrote it (use model.zero_stage >= 1 to change layouts)")
        self.base = _ds(self.opt, "optimizer") if self.fragments else self.opt

    # the tensors the torch optimizer steps ("flat" partitions under ZeRO), one per param of a group
    def flat_of(self, p) -> torch.Tensor:
        if not self.fragments:
            return p
        if self.zero3:
            for i, group in enumerate(_ds(self.opt, "fp16_groups")):
                if any(q is p for q in group):
                    return _ds(self.opt, "fp32_partitioned_groups_flat")[i]
            raise CheckpointError("a parameter is in no ZeRO-3 sub-group")
        groups = _ds(self.opt, "bit16_groups", "bf16_groups")
        flats = _ds(self.opt, "single_partition_of_fp32_groups", "fp32_groups_flat_partition")
        for i, group in enumerate(groups):  # (a parameter with no fragment on this rank has _hp_mapping None)
            if any(q is p for q in group):
                return flats[i]
        raise CheckpointError("a parameter is in no ZeRO parameter group")

    def flats(self) -> List[torch.Tensor]:
        if self.zero3:  # (ZeRO-3 puts them into the torch optimizer's groups only while it steps)
            return list(_ds(self.opt, "fp32_partitioned_groups_flat"))
        return [q for g in self.base.param_groups for q in g["params"]]

    def state_keys(self) -> Tuple[List[str], List[str]]:
        """(element-wise keys, scalar keys) of the optimizer state, from the first stepped tensor ([] before any
        step)."""
        for q in self.flats():
            st = self.base.state.get(q)
            if st:
                elem = sorted(k for k, v in st.items() if torch.is_tensor(v) and v.numel() == q.numel() and v.dim())
                scal = sorted(k for k, v in st.items() if k not in elem and (torch.is_tensor(v) and v.numel() == 1
                                                                            or isinstance(v, (int, float))))
                return elem, scal
        return [], []

    def get(self, p, key: str, copy: bool = True) -> torch.Tensor:
        """This rank's TP shard, full over data parallel (collective over DP under ZeRO). Without ``copy``, under
        ZeRO 0 the live tensor itself (fp32: the parameter or the optimizer's state; the caller copies it before the
        next step changes it)."""
        from deepspeed.utils.tensor_fragment import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if self.fragments:
            t = safe_get_full_fp32_param(p) if key == PARAM else safe_get_full_optimizer_state(p, key)
            return t.detach().float().reshape(_shape(p))
        t = (p.detach() if key == PARAM else self.base.state[p][key]).float()
        return t.clone() if copy else t

    def scalar(self, p, key: str) -> torch.Tensor:
        v = self.base.state[self.flat_of(p)][key]
        return v.detach().cpu().clone() if torch.is_tensor(v) else torch.tensor(v)

    def init_state(self, elem: List[str], scalars: Dict[int, Dict[str, torch.Tensor]]) -> None:
        """Create the optimizer state of every stepped tensor (zeros; the scalars given per flat tensor id) the way
        the optimizer's first step would, so that ``set`` can fill it; links DeepSpeed's fragments to it."""
        on_device = any(g.get("fused") or g.get("capturable") for g in self.base.param_groups)
        for q in self.flats():
            if not self.fragments and id(q) not in scalars:
                continue  # (ZeRO 0: a parameter A never stepped stays without state)
            st = self.base.state.setdefault(q, {})
            for k in elem:
                if k not in st:
                    st[k] = torch.zeros_like(q, memory_format=torch.preserve_format)
            for k, v in scalars.get(id(q), {}).items():  # (torch keeps ``step`` on the CPU unless fused/capturable)
                st[k] = v.clone().to(q.device if on_device else "cpu")
        self.relink()

    def relink(self) -> None:
        """Point DeepSpeed's fragments at the optimizer state of every group. (ZeRO 1/2 link them once, right
        after stepping the *first* parameter group, so the fragments of later groups never see their state.)"""
        if self.fragments and not self.zero3 and all(self.base.state.get(q) for q in self.flats()):
            link = _ds(self.opt, "_lazy_init_hp_params_optimizer_state")
            _ds(self.opt, "_hp_optimizer_states_linked")  # (a renamed switch would be set in vain)
            self.opt._hp_optimizer_states_linked = False
            link()

    def set(self, p, key: str, value: torch.Tensor) -> None:
        from deepspeed.utils.tensor_fragment import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if self.fragments:
            if key == PARAM:
                safe_set_full_fp32_param(p, value.to(torch.float32))
            else:
                safe_set_full_optimizer_state(p, value.to(torch.float32), key)
            return
        target = p if key == PARAM else self.base.state[p][key]
        with torch.no_grad():
            target.copy_(value.to(target.dtype))

    def set_model_weights(self, pairs: List[Tuple[Any, torch.Tensor]]) -> None:
        """The model's working copy of the weights (under ZeRO-3 partitioned: gathered, set, re-partitioned)."""
        if not self.fragments:
            return  # ZeRO 0 fp32: the parameter is the master, set already
        if self.zero3:
            import deepspeed

            for p, v in pairs:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):  # rank 0 of the DP group sets it
                    with torch.no_grad():
                        p.copy_(v.to(p.dtype))
            return
        with torch.no_grad():
            for p, v in pairs:
                p.copy_(v.to(p.dtype))


def _tp_full(t: torch.Tensor, rule: Optional[Tuple[int, int]]) -> torch.Tensor:
    """The whole tensor from every TP rank's shard ``t``, on the CPU (gathered on the device the TP group's
    backend needs: the accelerator's for nccl)."""
    group, world, _ = _tp_group()
    if rule is None or world == 1:
        return t.cpu()
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else \
        torch.device("cpu")
    t = t.to(dev).contiguous()
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=group)
    return merge_shards([x.cpu() for x in parts], *rule)


def gather_state(engine, *, pipeline: bool, num_layers: int, vocab_size: Optional[int],
                 copy: bool = True) -> Dict[str, torch.Tensor]:
    """Every logical tensor of this rank's stage (see the module docstring), keyed ``<name>/<state key>``, on the
    CPU. Collective over the data- and tensor-parallel groups (every rank of a stage calls it). Without ``copy``,
    a tensor that is already whole and on the CPU (ZeRO 0, fp32, no TP split) is the live one, not a copy: for a
    caller that writes or snapshots it before training goes on."""
    acc = _Access(engine)
    acc.relink()
    elem, scal = acc.state_keys()
    out: Dict[str, torch.Tensor] = {}
    from megatron.core import parallel_state as ps

    first_stage = ps.get_pipeline_model_parallel_rank() == 0
    for name, p in named_parameters(engine.module, pipeline, num_layers):
        if pipeline and not first_stage and name.startswith("embedding."):
            # the last stage's copy of the tied embedding module: its word embeddings are the first stage's (kept
            # equal by DeepSpeed), its position embeddings are never used there (stale); the first stage's count
            continue
        rule = _tp_rule(p)
        stepped = acc.fragments or bool(acc.base.state.get(p))  # ZeRO 0: a parameter never stepped has none
        for key in [PARAM] + (elem if stepped else []):
            full = _tp_full(acc.get(p, key, copy=copy), rule)
            if name in VOCAB_PARTITIONED and vocab_size:
                full = full[:vocab_size]
            out[f"{name}/{key}"] = full.contiguous()
        for key in scal if stepped else []:
            out[f"{name}/{key}"] = acc.scalar(p, key).reshape(())
    return out


# ---------------------------------------------------------------------------------------------- save
def _first_failure(e) -> BaseException:
    failures = getattr(e, "failures", None) or {}
    for _, (exc, _trace) in sorted(failures.items()):
        return exc
    return RuntimeError(str(e).splitlines()[0] if str(e) else type(e).__name__)


def collect_state(engine, *, pipeline: bool, num_layers: int, vocab_size: Optional[int], scheduler,
                  extra: Dict[str, Any]) -> Optional[Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]:
    """What :func:`write_state` writes: (every logical tensor of this rank's stage, rank 0's ``extra.pt``
    contents). Collective over the data- and tensor-parallel groups (every rank calls it, in the training
    thread). None for an optimizer whose state cannot be read by parameter (DeepSpeed's fp16/bf16 optimizers
    without ZeRO; the same on every rank), with one warning per process. Tensors may be the live state (ZeRO 0):
    write them (:func:`write_state`) or copy them (``async_save.host_snapshot``) before the next step."""
    try:
        acc = _Access(engine)
    except CheckpointError as e:
        global _warned
        if not _warned:
            log.warning("checkpoints of this run hold no layout-free state: %s", e)
            _warned = True
        return None
    state = gather_state(engine, pipeline=pipeline, num_layers=num_layers, vocab_size=vocab_size, copy=False)
    head = {"format": FORMAT, "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
            "optimizer": type(acc.base).__name__, **extra}
    return state, head


def write_state(step_dir: str, state: Dict[str, torch.Tensor], head: Dict[str, Any], group=None) -> None:
    """Write ``step_dir/layout_free`` from :func:`collect_state`'s result: DCP's files (collective over ``group``,
    None: the default group; each tensor written once by one of the ranks that hold it) and, on rank 0,
    ``extra.pt``. Needs no engine: it can run in a background thread on host copies of the state."""
    import torch.distributed.checkpoint as dcp

    out = os.path.join(step_dir, STATE_DIR)
    writer = dcp.FileSystemWriter(out, single_file_per_rank=True, thread_count=1)
    try:
        dcp.save(state, storage_writer=writer, process_group=group)
    except CheckpointException as e:  # a BaseException: the failure of the first rank, as the writer raised it
        first = _first_failure(e)
        raise first if isinstance(first, (OSError, RuntimeError)) else RuntimeError(str(first)) from None
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        torch.save(head, os.path.join(out, EXTRA))


def save_state(engine, step_dir: str, *, pipeline: bool, num_layers: int, vocab_size: Optional[int],
               scheduler, extra: Dict[str, Any]) -> None:
    """:func:`collect_state`, then :func:`write_state` (collective: every rank calls it)."""
    collected = collect_state(engine, pipeline=pipeline, num_layers=num_layers, vocab_size=vocab_size,
                              scheduler=scheduler, extra=extra)
    if collected is not None:
        write_state(step_dir, *collected)


# ---------------------------------------------------------------------------------------------- load
class _SafeReader:
    """DCP's file reader with its pickled ``.metadata`` read by the safe loader."""

    def __new__(cls, path: str):
        import torch.distributed.checkpoint as dcp

        class Reader(dcp.FileSystemReader):
            def read_metadata(self, *args, **kwargs):
                return load_dcp_metadata(os.path.join(path, ".metadata"))

        return Reader(path)


def has_state(step_dir: str) -> bool:
    return os.path.isfile(os.path.join(step_dir, STATE_DIR, ".metadata")) and \
        os.path.isfile(os.path.join(step_dir, STATE_DIR, EXTRA))


def read_extra(step_dir: str) -> Dict[str, Any]:
    path = os.path.join(step_dir, STATE_DIR, EXTRA)
    obj = load_untrusted(path, "layout-free checkpoint header")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a megatron_ext layout-free state (expected format {FORMAT})")
    return obj


def read_tensors(step_dir: str, keys: Optional[List[str]] = None) -> Dict[str, torch.Tensor]:
    """The saved logical tensors (all, or ``keys``), full, on the CPU. Without a process group it reads in this
    process alone; with one it is collective (every rank calls it, each with its own keys)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = os.path.join(step_dir, STATE_DIR)
    md = load_dcp_metadata(os.path.join(path, ".metadata"))
    saved = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    keys = sorted(saved) if keys is None else keys
    missing = [k for k in keys if k not in saved]
    if missing:
        raise CheckpointError(f"{path} holds no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                              f"(a different model?)")
    state = {k: torch.empty(tuple(saved[k].size), dtype=saved[k].properties.dtype) for k in keys}
    try:
        dcp.load(state, storage_reader=_SafeReader(path), no_dist=not dist.is_initialized())
    except CheckpointException as e:
        first = _first_failure(e)
        if isinstance(first, CheckpointError):
            raise first from None
        raise CorruptCheckpointError(f"{path}: the layout-free state could not be read ("
                                     f"{(str(first).splitlines() or [type(first).__name__])[0]})") from None
    return state


def load_state(engine, step_dir: str, *, pipeline: bool, num_layers: int, model_only: bool = False
               ) -> Dict[str, Any]:
    """Set this rank's weights (and, unless ``model_only``, its optimizer state) from ``step_dir/layout_free``,
    whatever layout wrote it. Returns the header (``extra.pt``); the caller restores the scheduler from it.
    Collective: every rank calls it."""
    where = os.path.join(step_dir, STATE_DIR)
    extra = read_extra(step_dir)
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = load_dcp_metadata(os.path.join(where, ".metadata"))
    saved_keys = {k for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    acc = _Access(engine)
    params = list(named_parameters(engine.module, pipeline, num_layers))
    want_elem, want_scal = [], []
    if not model_only:
        sizes = {k: tuple(md.state_dict_metadata[k].size) for k in saved_keys}
        names = {n for n, _ in params}
        kinds = {k.rsplit("/", 1)[1] for k in saved_keys if k.rsplit("/", 1)[0] in names} - {PARAM}
        want_scal = sorted(k for k in kinds if all(v == () for kk, v in sizes.items() if kk.endswith("/" + k)))
        want_elem = sorted(kinds - set(want_scal))
        if not want_elem:
            raise CheckpointError(f"{where} holds no optimizer state (saved before the first step); load it "
                                  f"with model.ckpt_path (weights only)")
        theirs, ours = extra.get("optimizer"), type(acc.base).__name__
        if theirs != ours:
            raise CheckpointError(f"{where} holds the state of a {theirs} optimizer but this run's is {ours} "
                                  f"(model.optim.name); resume with the same optimizer, or load the weights only "
                                  f"with model.ckpt_path")
        mine, _ = acc.state_keys()
        if mine and set(mine) != set(want_elem):
            raise CheckpointError(f"{where} holds optimizer state {want_elem} but this optimizer has {mine}")
    has = {n: [k for k in want_elem + want_scal if f"{n}/{k}" in saved_keys] for n, _ in params}
    keys = [f"{n}/{k}" for n, _ in params for k in [PARAM] + has[n]]
    tensors = read_tensors(step_dir, keys)
    _, world, rank = _tp_group()
    if not model_only:  # the optimizer state exists from here on (as after a first step), then is overwritten
        scalars: Dict[int, Dict[str, torch.Tensor]] = {}
        for n, p in params:
            if not has[n]:
                continue
            got = scalars.setdefault(id(acc.flat_of(p)), {})
            for k in (k for k in want_scal if k in has[n]):
                v = tensors[f"{n}/{k}"]
                if k in got and not torch.equal(got[k], v):
                    raise CheckpointError(f"{where}: {n}/{k}={v.item()} differs from {got[k].item()} of another "
                                          f"parameter the optimizer steps together with it")
                got[k] = v
        acc.init_state(want_elem, scalars)
    weights = []
    for n, p in params:
        rule = _tp_rule(p)
        shape = _shape(p)
        for k in [PARAM] + [k for k in want_elem if k in has[n]]:
            full = tensors[f"{n}/{k}"]
            if n in VOCAB_PARTITIONED:
                padded = shape[0] * (world if rule is not None else 1)
                if padded < full.shape[0]:
                    raise CheckpointError(f"{where}: {n} has {full.shape[0]} rows; this layout pads the "
                                          f"vocabulary to {padded}")
                full = torch.cat([full, full.new_zeros(padded - full.shape[0], *full.shape[1:])], dim=0)
            piece = shard_of(full, *rule, rank, world) if rule is not None else full
            if tuple(piece.shape) != shape:
                raise CheckpointError(f"{where}: {n}/{k} gives shape {tuple(piece.shape)} for this rank but the "
                                      f"model has {shape}")
            acc.set(p, k, piece)
            if k == PARAM:
                weights.append((p, piece))
    acc.set_model_weights(weights)
    if pipeline and hasattr(engine.module, "_synchronize_tied_weights"):
        engine.module._synchronize_tied_weights()
    return extra

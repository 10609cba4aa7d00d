"""Distributed initialisation and the megatron-core parallel groups.

``initialize_parallel`` works the same in a plain single process (it creates a world of one
on a free localhost port), under torchrun / the deepspeed launcher (reads RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), and under SLURM (SLURM_PROCID / SLURM_NTASKS).
Backend: nccl when CUDA is used, gloo otherwise.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ext.config.validation import use_cuda  # noqa: F401  (trainer.accelerator -> CUDA or not)
from megatron_ext.errors import ConfigError


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux: 32768-60999 by default)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def _free_port() -> int:
    """A TCP port free now for a rendezvous store to listen on. Picked at random *below* the ephemeral range when
    it can be: a port the kernel hands out itself (bind to 0) is in that range, where every outgoing connection
    (gloo opens one per peer and group) also takes its local port, so between our pick and the store's listen
    another process's connection may take it (EADDRINUSE). Falls back to a kernel-chosen port."""
    import random

    lo, _ = _ephemeral_range()
    rnd = random.SystemRandom()
    for _ in range(64) if lo > 11000 else ():
        port = rnd.randrange(10000, lo - 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launched: bool  # True when a launcher (torchrun/deepspeed/SLURM) set the environment


def read_dist_env() -> DistEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), True)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), True)
    return DistEnv(0, 1, 0, False)


def init_distributed(accelerator: str = "auto", timeout_minutes: float = 10.0) -> DistEnv:
    """Create the default process group (idempotent)."""
    denv = read_dist_env()
    cuda = use_cuda(accelerator)
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if dist.is_initialized():
        return denv
    if not denv.launched:
        # a world of one: never reuse an inherited MASTER_PORT (it may belong to another live process group)
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
    os.environ["RANK"] = str(denv.rank)
    os.environ["WORLD_SIZE"] = str(denv.world_size)
    os.environ["LOCAL_RANK"] = str(denv.local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if cuda:
        torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
    # Groups created later without an explicit timeout (DeepSpeed's pipeline grid, tied-weight and ZeRO groups)
    # take torch's module default (30 min gloo / 10 min nccl): make it trainer.dist_timeout_minutes too.
    td = datetime.timedelta(minutes=timeout_minutes)
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = td
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = td
    # a world of one needs no rendezvous: an in-process store (no TCP port that another process may take between
    # picking it and listening on it)
    store = dist.HashStore() if not denv.launched and denv.world_size == 1 else None
    dist.init_process_group(
        backend="nccl" if cuda else "gloo",
        rank=denv.rank,
        world_size=denv.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        store=store,
    )
    return denv


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    accelerator: str = "auto",
    timeout_minutes: float = 10.0,
) -> DistEnv:
    """Init the process group and megatron-core's TP/PP/DP groups. Checks the sizes first."""
    from megatron.core import parallel_state as ps

    denv = init_distributed(accelerator, timeout_minutes)
    world = dist.get_world_size()
    tp, pp = int(tensor_model_parallel_size), int(pipeline_model_parallel_size)
    if tp < 1 or pp < 1:
        raise ConfigError(
            f"model.tensor_model_parallel_size={tp} and model.pipeline_model_parallel_size={pp} must be >= 1"
        )
    if world % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world} is not divisible by model.tensor_model_parallel_size ({tp}) x "
            f"model.pipeline_model_parallel_size ({pp})"
        )
    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() == tp and ps.get_pipeline_model_parallel_world_size() == pp:
            return denv
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=timeout_minutes,  # a float is fine (timedelta(minutes=...))
    )
    return denv


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class MPUAdapter:
    """What DeepSpeed's ``mpu=`` expects (old Megatron names), backed by megatron-core's parallel_state."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self._ps = ps

    # model (tensor) parallel
    def get_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_group = get_model_parallel_group

    # data parallel
    def get_data_parallel_world_size(self):
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self):
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    # pipeline parallel
    def get_pipeline_model_parallel_world_size(self):
        return self._ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self):
        return self._ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()


def data_parallel_info() -> tuple[int, int]:
    """(dp_rank, dp_size) after initialize_parallel."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def attach_deepspeed_comm() -> None:
    """Attach ``deepspeed.comm`` to the existing ``torch.distributed`` world, without building DeepSpeed's
    ``deepspeed_shm_comm`` op. Every place that hands the world to DeepSpeed (``build_engine``, the pipeline
    builder) calls this first.

    On the CPU accelerator, DeepSpeed's communication backend (``deepspeed.comm.torch.TorchBackend``) JIT-builds that
    op with ``torch.utils.cpp_extension`` when it is created (``deepspeed.init_distributed``, or the first
    ``deepspeed.initialize``); its only user is ``inference_all_reduce`` (DeepSpeed-Inference's tensor-parallel
    all-reduce), while training's collectives go through ``torch.distributed`` (gloo). The build costs a C++ compile
    on a fresh ``TORCH_EXTENSIONS_DIR``, and a build killed half way leaves a ``lock`` file that makes every later
    run wait on it forever, silently. The backend builds the op only when ``deepspeed.ops.__compatible_ops__`` marks
    it compatible (the dict is probed once per process and kept, so the mark set here holds); the op then stays
    unbuilt and ``inference_all_reduce`` falls back to ``torch.distributed``.
    """
    import deepspeed  # optional at import time of this module: only the training and pipeline paths need it
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and isinstance(deepspeed.ops.__compatible_ops__, dict):
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)

"""Pipeline parallelism over DeepSpeed's pipeline engine, on megatron-core's process layout.

megatron-core orders ranks ``tp`` fastest, then ``dp``, then ``pp`` (``rank = tp_rank + tp * (dp_rank + dp *
pp_rank)``); DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model) gives the same numbering.
``pipeline_topology`` builds that topology from the initialised megatron-core groups and checks, rank by rank,
that both libraries agree on who is in this rank's TP, DP and PP groups, so the TP layers (megatron-core's
groups) and the pipeline engine (DeepSpeed's groups) can never talk past each other.
"""
from __future__ import annotations

import torch.distributed as dist

from megatron_ext.errors import MegatronExtError


def pipeline_topology():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    dp = ps.get_data_parallel_world_size()
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    rank = dist.get_rank()
    coord = topo.get_coord(rank)
    mine = (ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank())
    if (coord.pipe, coord.data, coord.model) != mine:
        raise MegatronExtError(
            f"rank {rank}: megatron-core places this rank at (pp, dp, tp) = {mine} but DeepSpeed's pipeline "
            f"topology at {(coord.pipe, coord.data, coord.model)}; the rank orders of the two libraries disagree"
        )
    return topo


__all__ = ["pipeline_topology"]

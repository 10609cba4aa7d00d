"""Test helper run by tests/integration/test_plan_measure.py under torchrun with 2 processes (gloo): known
collectives and p2p calls under ``CollectiveCounter`` in three layouts (TP2, PP2, DP2), through torch.distributed,
megatron-core's TP mappings (its import-time alias of all_gather_into_tensor) and deepspeed.comm. Prints one line
``COUNTS <json>`` per rank: ``{layout: {"bytes": {kind: bytes}, "calls": {kind: calls}}}`` plus whether the
functions were restored after the counter."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main() -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import mappings

    from megatron_ext.parallel import state as pstate
    from megatron_ext.planning.measure import CollectiveCounter

    original_all_reduce = dist.all_reduce
    out = {}
    pstate.initialize_parallel(2, 1, accelerator="cpu")
    rank = dist.get_rank()
    pstate.attach_deepspeed_comm()
    import deepspeed
    import deepspeed.comm as dscomm

    deepspeed.init_distributed(dist_backend="gloo")
    # TP2: all-reduce (100 fp32), megatron's TP all-reduce (20 fp32) and its import-time alias of all_gather_into_tensor
    # (8x4 fp32 in, 16x4 out; megatron's gather helpers allocate on CUDA), deepspeed.comm
    # all_gather_into_tensor (bf16 6 in, 12 out) and reduce_scatter_tensor (fp32 10 in, 5 out), an all-reduce on the
    # single-rank DP group (not counted)
    tp = ps.get_tensor_model_parallel_group()
    with CollectiveCounter() as cc:
        dist.all_reduce(torch.ones(100), group=tp)
        mappings.reduce_from_tensor_model_parallel_region(torch.ones(20))
        mappings.dist_all_gather_func(torch.empty(16, 4), torch.ones(8, 4), group=tp)
        dscomm.all_gather_into_tensor(torch.empty(12, dtype=torch.bfloat16), torch.ones(6, dtype=torch.bfloat16),
                                      group=tp)
        dscomm.reduce_scatter_tensor(torch.empty(5), torch.ones(10), group=tp)
        dist.all_reduce(torch.ones(7), group=ps.get_data_parallel_group())
    out["tp2"] = {"bytes": cc.by_kind(), "calls": dict(cc.calls)}

    # PP2: send/recv of 3x5 fp32 each way, a batch_isend_irecv of 16 fp64 built before the counter started
    pstate.initialize_parallel(1, 2, accelerator="cpu")
    peer = 1 - rank
    buf_out, buf_in = torch.full((16,), float(rank), dtype=torch.float64), torch.empty(16, dtype=torch.float64)
    ops = [dist.P2POp(dist.isend, buf_out, peer), dist.P2POp(dist.irecv, buf_in, peer)]
    with CollectiveCounter() as cc:
        x = torch.full((3, 5), 1.0)
        if rank == 0:
            dist.send(x, 1)
            dist.recv(x, 1)
        else:
            dist.recv(x, 0)
            dist.send(x, 0)
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    assert buf_in[0].item() == float(peer)
    out["pp2"] = {"bytes": cc.by_kind(), "calls": dict(cc.calls)}

    # DP2: all-reduce on the default group (50 fp16), _all_gather_base (counted once: it calls all_gather_single),
    # reduce_scatter_tensor (fp32 8 in, 4 out)
    pstate.initialize_parallel(1, 1, accelerator="cpu")
    with CollectiveCounter() as cc:
        dist.all_reduce(torch.ones(50, dtype=torch.float16))
        dist.distributed_c10d._all_gather_base(torch.empty(6), torch.ones(3), group=ps.get_data_parallel_group())
        dist.reduce_scatter_tensor(torch.empty(4), torch.ones(8), group=ps.get_data_parallel_group())
    out["dp2"] = {"bytes": cc.by_kind(), "calls": dict(cc.calls)}
    out["restored"] = (dist.all_reduce is original_all_reduce
                       and dist.distributed_c10d.all_reduce is original_all_reduce
                       and mappings.dist_all_gather_func is dist.all_gather_into_tensor)
    # ops made after the counter still work
    for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, buf_out, peer), dist.P2POp(dist.irecv, buf_in, peer)]):
        w.wait()
    # one write of the whole line: both ranks share the launcher's stdout, and print() writes the text and its
    # newline separately, so two ranks' lines could run together
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), ("COUNTS " + json.dumps(out, sort_keys=True) + "\n").encode())
    pstate.destroy_parallel()


if __name__ == "__main__":
    main()

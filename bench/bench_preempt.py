"""What the preemption check costs per training step: the all-reduce (MAX) of one int32 over the default gloo group
that ``training.preemption.PreemptionHandler.should_stop`` runs at every step boundary, on 2 CPU processes.

    python bench/bench_preempt.py [--quick]

Prints one JSON line per figure: the median and the best microseconds per check (over rounds of ``--iters``
checks)."""
import argparse
import json
import os
import statistics
import sys
import time

import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _worker(rank, world, port, iters, rounds, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    from megatron_ext.training.preemption import PreemptionHandler

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    h = PreemptionHandler()
    for _ in range(200):  # warm-up
        h.should_stop()
    times = []
    for _ in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            assert h.should_stop() is None
        times.append((time.perf_counter() - t0) / iters)
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--iters", type=int, default=2000)
    a = ap.parse_args()
    iters, rounds = (300, 3) if a.quick else (a.iters, 7)
    from megatron_ext.parallel.state import _free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, iters, rounds, q)) for r in range(2)]
    for p in procs:
        p.start()
    times = q.get(timeout=300)
    for p in procs:
        p.join(60)
    config = {"what": "all-reduce MAX of 1 int32 per step, gloo", "world": 2, "device": "cpu", "iters": iters,
              "rounds": rounds}
    for metric, value in (("check_us_median", statistics.median(times)), ("check_us_min", min(times))):
        print(json.dumps({"bench": "preempt_check", "metric": metric, "value": round(1e6 * value, 1), "unit": "us",
                          "config": config}), flush=True)

if __name__ == "__main__":
    main()

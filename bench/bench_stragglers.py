"""What the straggler measurement (``trainer.straggler_every_n_steps``) costs a training step.

Two real gloo processes (DP2, ZeRO 0, fp32) each build ``megatron_ext.training.trainer.Trainer`` with ``GPTTask`` (the
full stack: megatron-core layers, DeepSpeed engine, fused AdamW) and run the trainer's own ``_train_step`` in
alternating blocks of ``--block`` steps, in the same processes on the same data stream:

  off   the baseline: no monitor (DeepSpeed's backward epilogue unwrapped, no timing, no gather)
  on    ``StragglerMonitor`` as the trainer uses it: the step's clock, the token-count all-reduce's wait, the
        wrapped backward epilogue, and every ``--every`` steps one all-gather of the per-rank compute times

Lines (rank 0's step wall times, after ``--warmup`` steps):

* ``step_time_off`` / ``step_time_on``: median seconds per step of each mode;
* ``overhead_ratio``: step_time_on / step_time_off (the end-to-end figure; noise of the machine included), and
  ``overhead_ratio_paired``: the median over rounds of (mean on-step time / mean off-step time) of the same round;
* ``overhead_direct_fraction``: the monitor's own work per step -- ``--calls`` iterations of exactly what it adds to
  a step (step_begin, wait_begin/_end, compute_done, step_end with the all-gather every ``--every`` steps, both ranks in
  lockstep, ``every``=10) timed alone -- divided by step_time_off. This isolates the cost from step-to-step noise.

    python bench/bench_stragglers.py            # 4 layers, hidden 512, seq 256, global batch 8 (about 2 minutes)
    python bench/bench_stragglers.py --quick    # 2 layers, hidden 256, seq 128: well under a minute

stdout holds the JSON lines only (``bench/results/bench_stragglers_cpu.jsonl``).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = "stragglers"

FULL = dict(layers=4, hidden=512, heads=8, seq=256, global_batch=8, micro_batch=4, warmup=3, block=1, rounds=30,
            every=10, calls=5000)
QUICK = dict(layers=2, hidden=256, heads=4, seq=128, global_batch=4, micro_batch=2, warmup=2, block=1, rounds=10,
             every=10, calls=1000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(p: dict, out_path: str, exp_dir: str) -> None:
    sys.path.insert(0, REPO)
    import torch

    from megatron_ext.config.loader import load_config
    from megatron_ext.training.gpt_task import GPTTask
    from megatron_ext.training.stragglers import StragglerMonitor
    from megatron_ext.training.trainer import Trainer

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    total = p["warmup"] + 2 * p["block"] * p["rounds"]
    cfg = load_config(overrides=[
        f"model.num_layers={p['layers']}", f"model.hidden_size={p['hidden']}",
        f"model.num_attention_heads={p['heads']}", f"model.seq_length={p['seq']}",
        f"model.global_batch_size={p['global_batch']}", f"model.micro_batch_size={p['micro_batch']}",
        f"trainer.max_steps={total}", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.val_check_interval=0",
        "trainer.straggler_every_n_steps=0", f"exp_manager.exp_dir={exp_dir}", "exp_manager.version=bench",
        "exp_manager.create_checkpoint_callback=false", "exp_manager.create_tensorboard_logger=false"])
    tr = Trainer(cfg, GPTTask)
    train_ds, _, _ = tr.task.build_datasets(tr._num_samples())
    tr._build()
    tr.engine.train()
    it = tr._iter(train_ds, 0)
    world = torch.distributed.get_world_size()
    mon = StragglerMonitor(p["every"], 0.2, tr.rank, world, tr.device)

    def set_mode(on: bool) -> None:
        if "_backward_epilogue" in vars(tr.engine):
            del tr.engine._backward_epilogue  # back to DeepSpeed's own method
        tr._stragglers = None
        if on:
            mon.install(tr.engine)
            tr._stragglers = mon

    times = {"on": [], "off": []}
    rounds = []
    step = 0

    def run(mode: str, n: int, keep: bool) -> None:
        nonlocal step
        set_mode(mode == "on")
        for _ in range(n):
            step += 1
            t0 = time.perf_counter()
            if mode == "on":
                mon.step_begin(step)
            tr._train_step(it, keep_extras=False)
            if mode == "on":
                mon.step_end(step)
            if keep:
                times[mode].append(time.perf_counter() - t0)

    run("off", p["warmup"], keep=False)
    for r in range(p["rounds"]):  # alternate, starting with a different mode each round
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            run(mode, p["block"], keep=True)
        k = p["block"]
        rounds.append(statistics.mean(times["on"][-k:]) / statistics.mean(times["off"][-k:]))
    # the monitor's own per-step work, alone (the all-gather every `every` calls keeps the ranks in lockstep)
    set_mode(True)
    torch.distributed.barrier()
    t0 = time.perf_counter()
    for i in range(1, p["calls"] + 1):
        mon.step_begin(i)
        mon.wait_end(mon.wait_begin())
        mon.compute_done()
        mon.step_end(i)
    direct = (time.perf_counter() - t0) / p["calls"]
    if tr.rank == 0:
        with open(out_path, "w") as f:
            json.dump({"times": times, "paired": rounds, "direct_s_per_step": direct,
                       "params": sum(x.numel() for x in tr.engine.module.parameters())}, f)
    tr.exp.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--verbose", action="store_true", help="stream the workers' logs to stderr")
    args = ap.parse_args()
    p = dict(QUICK if args.quick else FULL)
    if args.worker:
        out, exp_dir = args.worker.split(os.pathsep)
        worker(p, out, exp_dir)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-stragglers-") as tmp:
        out = os.path.join(tmp, "result.json")
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)),
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, os.path.abspath(__file__), f"--worker={out}{os.pathsep}{tmp}"] + \
            (["--quick"] if args.quick else [])
        logs = [open(os.path.join(tmp, f"rank{r}.log"), "w") for r in range(2)]
        procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                                  stdout=None if args.verbose else logs[r], stderr=None if args.verbose else logs[r])
                 for r in range(2)]
        rcs = [pr.wait(timeout=1800) for pr in procs]
        for f in logs:
            f.close()
        if any(rcs):
            for r in range(2):
                with open(os.path.join(tmp, f"rank{r}.log")) as f:
                    sys.stderr.write(f.read()[-3000:])
            print(f"bench_stragglers: a worker failed ({rcs})", file=sys.stderr)
            return 1
        with open(out) as f:
            res = json.load(f)
    on, off = statistics.median(res["times"]["on"]), statistics.median(res["times"]["off"])
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except Exception:
        commit = ""
    config = {**p, "world": 2, "dp": 2, "zero_stage": 0, "precision": "32", "backend": "gloo", "device": "cpu",
              "cores": os.cpu_count(), "params": res["params"], "steps_per_mode": len(res["times"]["on"]),
              "git_commit": commit, "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
    lines = [
        ("step_time_off", off, "s"), ("step_time_on", on, "s"), ("overhead_ratio", on / off, "ratio"),
        ("overhead_ratio_paired", statistics.median(res["paired"]), "ratio"),
        ("overhead_direct_s_per_step", res["direct_s_per_step"], "s"),
        ("overhead_direct_fraction", res["direct_s_per_step"] / off, "fraction"),
    ]
    for metric, value, unit in lines:
        print(json.dumps({"bench": BENCH, "metric": metric, "value": round(value, 6), "unit": unit,
                          "config": config}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The planner's ground truth (megatron_ext/planning/measure.py, check.py): CollectiveCounter counts known
collectives and p2p calls exactly (2 gloo processes: TP2, PP2 and DP2 groups; torch.distributed, megatron-core's
import-time alias, deepspeed.comm, batch_isend_irecv), and ``trainer.plan_check`` logs the measured peak and the
bytes per step by kind of a real 2-process ZeRO-3 run (the shared session run)."""
import json
import os
import subprocess

import pytest

from helpers import REPO, launch_cmd, multiprocess_env

WORKER = os.path.join(REPO, "tests", "workers", "collective_count_worker.py")


def test_counter_counts_known_collectives_exactly():
    proc = subprocess.run(launch_cmd(2, [WORKER]), cwd=REPO, env=multiprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("COUNTS ")]
    assert len(lines) == 2
    for got in lines:  # both ranks pass the same bytes
        assert got["restored"] is True
        # TP2: all-reduce 100 + 20 fp32; all-gather outputs 16x4 fp32 + 12 bf16; reduce-scatter input 10 fp32;
        # the all-reduce on the single-rank DP group moves nothing and is not counted
        assert got["tp2"]["bytes"] == {"tp_allreduce": 480, "tp_allgather": 256 + 24, "tp_reduce_scatter": 40}
        assert got["tp2"]["calls"] == {"tp_allreduce": 2, "tp_allgather": 2, "tp_reduce_scatter": 1}
        # PP2: 3x5 fp32 each way, then 16 fp64 each way in one batch_isend_irecv
        assert got["pp2"]["bytes"] == {"pp_send": 60 + 128, "pp_recv": 60 + 128, "pp_sendrecv": 376}
        assert got["pp2"]["calls"] == {"pp_send": 2, "pp_recv": 2}
        # DP2: 50 fp16 all-reduce; _all_gather_base (6 fp32 out) counted once although it calls all_gather_single
        assert got["dp2"]["bytes"] == {"dp_allreduce": 100, "dp_allgather": 24, "dp_reduce_scatter": 32}
        assert got["dp2"]["calls"] == {"dp_allreduce": 1, "dp_allgather": 1, "dp_reduce_scatter": 1}


def test_plan_check_logs_measured_peak_and_comm_bytes(gpt_zero3_dp2_run):
    run = gpt_zero3_dp2_run
    with open(run / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    plan = [r for r in recs if "plan/measured_peak_bytes" in r]
    assert len(plan) == 1 and plan[0]["step"] == 4  # steps 2-4 measured (trainer.plan_check_steps=3)
    m = plan[0]
    ranks = json.loads((run / "plan_check_step4.json").read_text())["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["steps"] == 3 and r["peak_reset"] for r in ranks)
    for r in ranks:
        assert m[f"plan/measured_peak_bytes/rank{r['rank']}"] == r["peak_bytes"] > 1 << 20
        comm = r["comm_bytes"]
        # ZeRO-3 over 2 ranks: each step reduce-scatters the whole fp32 gradient once and all-gathers the fp32
        # parameters (the ones above DeepSpeed's persistence threshold: here all of them, once a step)
        assert comm["dp_reduce_scatter"] == comm["dp_allgather"] > 0
        assert comm["dp_reduce_scatter"] % 8 == 0  # fp32, padded to a multiple of the 2 ranks
        assert m[f"plan/comm_bytes_dp_reduce_scatter/rank{r['rank']}"] == comm["dp_reduce_scatter"]
        assert comm["dp_allreduce"] >= 8  # the trainer's loss-token count (int64), every step
    assert m["plan/measured_peak_bytes"] == max(r["peak_bytes"] for r in ranks)
    # at start-up rank 0 logged the plan's prediction for both ranks (one pipeline stage: one line)
    out = (run / "test_run_output.txt").read_text()
    (line,) = [x for x in out.splitlines() if "plan_check prediction" in x]
    assert "ranks 0-1 (stage 0): peak" in line and "of host memory" in line and "dp_reduce_scatter" in line
    assert f"peak {ranks[0]['predicted']['peak_bytes'] / 2**20:.1f} MiB" in line
    assert ranks[0]["comm_bytes"]["dp_reduce_scatter"] == ranks[1]["comm_bytes"]["dp_reduce_scatter"]
    # the planner's prediction beside it (planner.predicted_for_check): ZeRO-3 reduce-scatters the fp32 gradient
    assert m["plan/predicted_peak_bytes"] == max(r["predicted"]["peak_bytes"] for r in ranks) > 0
    for r in ranks:
        rows = {row["what"]: row for row in r["compare"]["rows"]}
        assert rows["comm_bytes_dp_reduce_scatter"]["ratio"] == pytest.approx(1.0, abs=0.05)
        assert rows["comm_bytes_dp_allgather"]["ratio"] == pytest.approx(1.0, abs=0.05)
        # every communication kind agrees within plan_check's tolerance (the peak of this tiny run, ~4 MiB of
        # which the CPU runtime term is 2, is bench/bench_plan.py's business: its grid holds 20 runs of 40-240 MiB)
        assert all(row["ok"] for what, row in rows.items() if what.startswith("comm_bytes_")), r["compare"]
        assert 0.5 < rows["peak_bytes"]["ratio"] < 2

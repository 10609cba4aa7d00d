"""Smoke test of bench/bench_scaling.py --quick: real 1- and 2-process launches (gloo), JSON-lines stdout.

Speed is not asserted (DESIGN: speed lives in bench/); what is checked is that every layout runs, stdout is pure
JSON lines in the bench format, and DP2 / TP2 train the same model on the same global batch as one process
(equal losses), which is what makes the bench's tokens/s comparable.
"""
import json
import sys

from helpers import run_script


def test_bench_scaling_quick_runs_and_layouts_agree(run_env, cache_home):
    # a real interpreter: the bench's workers import a snapshot of the package that they put on sys.path
    # themselves, which a fork-server child (the checkout's package already imported) cannot do
    r = run_script(["bench/bench_scaling.py", "--quick", "--steps", "3", "--warmup", "1",
                    "--cache-dir", cache_home], run_env, timeout=300, python=sys.executable)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [json.loads(line) for line in r.stdout.splitlines()]  # every stdout line is one JSON object
    assert lines and all(set(x) == {"bench", "metric", "value", "unit", "config"} for x in lines)
    tps = {x["config"]["layout"]: x for x in lines if x["metric"] == "tokens_per_sec"}
    assert set(tps) == {"single", "dp2_zero0", "dp2_zero1", "tp2"}
    for name, x in tps.items():
        c = x["config"]
        assert x["value"] > 0 and c["steps_measured"] == 2
        assert c["world"] == (1 if name == "single" else 2)
        assert c["global_batch"] == tps["single"]["config"]["global_batch"]
        assert c["world"] * c["threads_per_rank"] <= max(c["cores"], c["world"])  # no oversubscription
        assert abs(c["loss_step1"] - tps["single"]["config"]["loss_step1"]) < 1e-3, (name, c)
        assert abs(c["loss_last"] - tps["single"]["config"]["loss_last"]) < 1e-2, (name, c)
    assert tps["tp2"]["config"]["tp"] == 2 and tps["dp2_zero1"]["config"]["zero_stage"] == 1
    metrics = {(x["metric"], x["config"].get("layout")) for x in lines}
    for name in ("dp2_zero0", "dp2_zero1", "tp2"):
        assert ("scaling_efficiency", name) in metrics and ("speedup_vs_1proc", name) in metrics
    assert any(x["metric"] == "gloo_allreduce_time" and x["value"] > 0 for x in lines)

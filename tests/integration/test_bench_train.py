"""Smoke tests of bench/bench_train.py, bench/bench_mega_train.py and bench/bench_mega_decode.py in --quick mode.

Speed is not asserted (DESIGN: speed lives in bench/). What is checked is that the benches still build our full
stack (task, model, DeepSpeed engine) and every baseline, and print only JSON lines in the bench format with every
figure present -- a bench that silently breaks when the training code changes is caught here.
"""
import json

from helpers import run_script


def _lines(r):
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [json.loads(line) for line in r.stdout.splitlines()]  # every stdout line is one JSON object
    assert lines and all(set(x) == {"bench", "metric", "value", "unit", "config"} for x in lines)
    return lines


def test_bench_train_quick(run_env):
    lines = _lines(run_script(["bench/bench_train.py", "--quick", "--precisions", "32", "--steps", "1",
                               "--rounds", "1"], run_env, timeout=300))
    metrics = {x["metric"]: x for x in lines}
    stacks = ["ours", "nanogpt"] + (["hf_gpt2"] if "tokens_per_sec_hf_gpt2" in metrics else [])
    for stack in stacks:
        for m in ("tokens_per_sec", "tflops", "mfu"):
            x = metrics[f"{m}_{stack}"]
            assert x["value"] > 0 and x["config"]["stack"] == stack and x["config"]["precision"] == "32"
    for base in stacks[1:]:
        assert metrics[f"speedup_vs_{base}"]["value"] > 0
    assert metrics["mfu_ours"]["config"]["peak_tflops_measured"] > 0


def test_bench_mega_train_quick(run_env):
    lines = _lines(run_script(["bench/bench_mega_train.py", "--quick", "--steps", "1", "--rounds", "1"],
                              run_env, timeout=300))
    assert all(x["value"] > 0 for x in lines if isinstance(x["value"], (int, float)))
    assert any(x["metric"].startswith("tokens_per_sec") for x in lines)


def test_bench_mega_decode_quick(run_env):
    lines = _lines(run_script(["bench/bench_mega_decode.py", "--quick", "--repeats", "1"], run_env, timeout=300))
    metrics = {(x["metric"], x["config"]["batch"]) for x in lines}
    for batch in (1, 8):
        assert {("us_per_token_recurrence", batch), ("us_per_token_fft", batch),
                ("speedup_vs_fft_recurrence", batch)} <= metrics
    assert all(x["value"] > 0 and x["config"]["max_abs_diff"] < 1e-4 for x in lines)

"""What the per-step bad-step check costs (``trainer.nan_policy=skip`` + ``trainer.loss_spike_factor``: one
all-reduce of one float per rank, one host sync and an RNG-state copy per step) against the default
(``nan_policy=stop``, no spike factor: the loop syncs only on logged steps).

Runs ``pretrain_gpt.py`` with 2 processes (DP2, self-launched) alternately with and without the check, several
rounds, and compares the median ``train/step_time`` (logged every 10 steps, the first 20 steps left out). One JSON
line per figure.

    python bench/bench_bad_steps.py            # 300 steps x 3 rounds
    python bench/bench_bad_steps.py --quick    # 100 steps x 2 rounds
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = ["+experiment=cpu_smoke", "model.num_layers=2", "model.hidden_size=128", "model.num_attention_heads=4",
         "model.seq_length=128", "model.micro_batch_size=4", "model.global_batch_size=8", "trainer.devices=2",
         "trainer.val_check_interval=0", "trainer.log_every_n_steps=10", "exp_manager.create_tensorboard_logger=false",
         "exp_manager.create_checkpoint_callback=false", "exp_manager.name=bench_bad_steps"]
CHECK = ["trainer.nan_policy=skip", "trainer.loss_spike_factor=5"]


def run(exp: str, version: str, steps: int, extra: list) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MEGATRON_EXT_FAULT_INJECT")}
    p = subprocess.run([sys.executable, "pretrain_gpt.py", *SHAPE, f"trainer.max_steps={steps}",
                        f"exp_manager.exp_dir={exp}", f"exp_manager.version={version}", *extra],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"run {version} failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in open(os.path.join(exp, "bench_bad_steps", version, "metrics.jsonl"))]
    times = [r["train/step_time"] for r in rows if "train/step_time" in r and r["step"] > 20]
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps, rounds = (100, 2) if args.quick else (300, 3)
    off, on = [], []
    with tempfile.TemporaryDirectory() as exp:
        for i in range(rounds):  # alternating, so drift of the machine hits both alike
            off.append(run(exp, f"off{i}", steps, []))
            on.append(run(exp, f"on{i}", steps, CHECK))
    base, checked = statistics.median(off), statistics.median(on)
    common = {"bench": "bad_steps", "world": 2, "steps": steps, "rounds": rounds, "shape": "2x128, seq 128, gbs 8"}
    print(json.dumps({**common, "figure": "step_time_s_default", "value": round(base, 6)}))
    print(json.dumps({**common, "figure": "step_time_s_checked", "value": round(checked, 6)}))
    print(json.dumps({**common, "figure": "overhead_pct", "value": round(100 * (checked / base - 1), 2),
                      "per_round_pct": [round(100 * (b / a - 1), 2) for a, b in zip(off, on)]}))


if __name__ == "__main__":
    main()

"""How long ``tools/plan.py --search`` takes for the 7B preset on 2 nodes x 8 x 80 GB, as a user runs it (a fresh
process: imports, Hydra composition, tokenizer, search, printing). One JSON line: wall seconds (median of
``--repeats``), layouts evaluated (accepted by the checks and planned), layouts that fit, layouts listed.

    python bench/bench_plan_search.py     # -> bench/results/bench_plan_search_cpu.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMD = ["tools/plan.py", "+experiment=gpt_7b", "--nodes", "2", "--devices-per-node", "8", "--device-memory-gb", "80",
       "--search"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "bench_plan_search_cpu.jsonl"))
    args = ap.parse_args()
    times, out = [], ""
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, *CMD], cwd=REPO, capture_output=True, text=True, timeout=300)
        times.append(time.perf_counter() - t0)
        if r.returncode:
            sys.exit(f"bench_plan_search: {' '.join(CMD)} failed ({r.returncode}): {r.stderr[-2000:]}")
        out = r.stdout
    m = re.search(r"(\d+) layouts evaluated, (\d+) fit; the fastest (\d+):", out)
    if not m:
        sys.exit(f"bench_plan_search: no summary line in the output: {out[-2000:]}")
    rec = {"bench": "plan_search", "metric": "wall_seconds", "value": round(statistics.median(times), 3),
           "unit": "s", "config": {"command": " ".join(["python", *CMD]), "repeats": args.repeats,
                                   "all_seconds": [round(t, 3) for t in times], "layouts_evaluated": int(m.group(1)),
                                   "layouts_fit": int(m.group(2)), "layouts_listed": int(m.group(3))}}
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))


if __name__ == "__main__":
    main()

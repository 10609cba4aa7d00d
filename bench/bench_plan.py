"""Ground truth for the planner: measured peak memory and collective bytes of real short runs on this CPU.

Each grid point is one real run of ``pretrain_gpt.py`` / ``pretrain_bart.py`` (self-launched for 2 processes,
gloo, one intra-op thread per rank) with ``trainer.plan_check=true``: the trainer measures, on every rank, the peak
memory (``measure.PeakMemory``: anonymous resident memory under exact malloc from after the engine build, plus the
tensors the build left) and the bytes passed to collectives per
step by kind over steps 2-4 (``megatron_ext/planning/check.py``) and writes them to
``<run_dir>/plan_check_step4.json``. The grid covers GPT and BART, TP1/TP2, PP1/PP2, ZeRO 0-3, optimizer offload,
full activation checkpointing, seq 128-1024, fp32 and bf16; models are small (hidden 256-512) so a run takes seconds,
and large enough that the training state, not the interpreter, dominates the peak.

One JSON line per run and rank: ``{"bench": "plan", "name", "task", "rank", "overrides", "measured_peak_bytes",
"comm_bytes": {kind: bytes per step}, "comm_calls": {kind: calls per step}, "predicted": ...}`` where
``predicted`` is the planner's prediction for that rank (``planning.check.predict``, i.e.
``planner.predicted_for_check``: a CPU machine of ``trainer.devices`` processes).

    python bench/bench_plan.py                 # the whole grid (a few minutes on 2 cores)
    python bench/bench_plan.py --only gpt_dp2_zero1 --out -   # one point to stdout
    python bench/bench_plan.py --report           # the README's table from bench/results/bench_plan_cpu.jsonl
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "bench", "results", "bench_plan_cpu.jsonl")

COMMON = ["trainer.max_steps=4", "trainer.log_every_n_steps=1", "trainer.val_check_interval=0",
          "trainer.limit_val_batches=0", "trainer.limit_test_batches=0", "trainer.accelerator=cpu",
          "trainer.plan_check=true", "trainer.plan_check_steps=3", "exp_manager.create_checkpoint_callback=false",
          "model.data.num_workers=0"]
GPT = ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=8", "model.micro_batch_size=2"]
BART = ["model.encoder.num_layers=2", "model.encoder.hidden_size=256", "model.encoder.num_attention_heads=8",
        "model.decoder.num_layers=2", "model.decoder.hidden_size=256", "model.decoder.num_attention_heads=8",
        "model.micro_batch_size=2"]


def _gpt(seq, gbs=4, **kw):
    return ["gpt", GPT + [f"model.seq_length={seq}", f"model.global_batch_size={gbs}"] + _kw(kw)]


def _bart(seq, gbs=4, **kw):
    return ["bart", BART + [f"model.seq_length={seq}", f"model.seq_length_dec={seq}",
                            f"model.global_batch_size={gbs}"] + _kw(kw)]


def _kw(kw):
    return [f"{k.replace('__', '.')}={v}" for k, v in kw.items()]


# name -> (task, overrides); trainer.devices gives the world
GRID = {
    "gpt_single_fp32_s128": _gpt(128, 2, trainer__devices=1),
    "gpt_single_bf16_s512": _gpt(512, 2, trainer__devices=1, trainer__precision="bf16"),
    "gpt_single_ckpt_s1024": _gpt(1024, 2, trainer__devices=1, model__activations_checkpoint_granularity="full"),
    "gpt_single_s1024": _gpt(1024, 2, trainer__devices=1),
    "gpt_dp2_zero0_s256": _gpt(256, trainer__devices=2, model__zero_stage=0),
    "gpt_dp2_zero1_bf16_s256": _gpt(256, trainer__devices=2, model__zero_stage=1, trainer__precision="bf16"),
    "gpt_dp2_zero2_s256": _gpt(256, trainer__devices=2, model__zero_stage=2),
    "gpt_dp2_zero2_offload_s256": _gpt(256, trainer__devices=2, model__zero_stage=2, model__offload_optimizer="cpu"),
    "gpt_dp2_zero3_s256": _gpt(256, trainer__devices=2, model__zero_stage=3),
    "gpt_tp2_s256": _gpt(256, 2, trainer__devices=2, model__tensor_model_parallel_size=2),
    "gpt_tp2_ckpt_bf16_s512": _gpt(512, 2, trainer__devices=2, model__tensor_model_parallel_size=2,
                                   model__activations_checkpoint_granularity="full", trainer__precision="bf16"),
    "gpt_pp2_s256": _gpt(256, 4, trainer__devices=2, model__pipeline_model_parallel_size=2),
    "bart_single_s128": _bart(128, 2, trainer__devices=1),
    "bart_dp2_zero1_s256": _bart(256, trainer__devices=2, model__zero_stage=1),
    "bart_tp2_bf16_s256": _bart(256, 2, trainer__devices=2, model__tensor_model_parallel_size=2,
                                trainer__precision="bf16"),
    # the last five: a larger model and other shapes. The first three were run once the terms above were worked
    # out and led to three more (RMSNorm's fp32 saves, GQA's k/v copies, ZeRO 2's bucket of gradients); the last
    # two were added after that and run once (README "Planning a run" gives both rounds)
    "gpt_h512_l6_pp2_zero1_ckpt_s384": ["gpt", ["model.num_layers=6", "model.hidden_size=512",
                                                "model.num_attention_heads=8", "model.micro_batch_size=1",
                                                "model.seq_length=384", "model.global_batch_size=4",
                                                "trainer.devices=2", "model.pipeline_model_parallel_size=2",
                                                "model.zero_stage=1", "model.activations_checkpoint_granularity=full"]],
    "gpt_h512_swiglu_gqa_dp2_zero3_bf16_s384": ["gpt", ["model.num_layers=3", "model.hidden_size=512",
                                                        "model.num_attention_heads=8", "model.num_query_groups=2",
                                                        "model.activation=swiglu", "model.normalization=rmsnorm",
                                                        "model.micro_batch_size=2", "model.seq_length=384",
                                                        "model.global_batch_size=4", "trainer.devices=2",
                                                        "model.zero_stage=3", "trainer.precision=bf16"]],
    "bart_h384_dp2_zero2_offload_ckpt_s192": _bart(192, trainer__devices=2, model__zero_stage=2,
                                                   model__offload_optimizer="cpu",
                                                   model__encoder__hidden_size=384, model__decoder__hidden_size=384,
                                                   model__encoder__activations_checkpoint_granularity="full",
                                                   model__decoder__activations_checkpoint_granularity="full"),
    "gpt_h384_tp2_accum4_rope_bf16_s256": ["gpt", ["model.num_layers=3", "model.hidden_size=384",
                                                   "model.num_attention_heads=6", "model.position_embedding_type=rope",
                                                   "model.micro_batch_size=1", "model.seq_length=256",
                                                   "model.global_batch_size=4", "trainer.devices=2",
                                                   "model.tensor_model_parallel_size=2", "trainer.precision=bf16"]],
    "gpt_h320_dp2_zero2_dropout_ckpt_s640": ["gpt", ["model.num_layers=3", "model.hidden_size=320",
                                                     "model.num_attention_heads=5", "model.hidden_dropout=0.1",
                                                     "model.attention_dropout=0.1", "model.micro_batch_size=1",
                                                     "model.seq_length=640", "model.global_batch_size=2",
                                                     "trainer.devices=2", "model.zero_stage=2",
                                                     "model.activations_checkpoint_granularity=full"]],
}


def run_point(name: str, task: str, overrides, work: str, verbose: bool):
    exp = os.path.join(work, name)
    script = "pretrain_gpt.py" if task == "gpt" else "pretrain_bart.py"
    args = [sys.executable, os.path.join(REPO, script), *COMMON, *overrides, f"exp_manager.exp_dir={exp}",
            "exp_manager.version=v"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if verbose:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    found = glob.glob(os.path.join(exp, "*", "v", "plan_check_step*.json"))
    if proc.returncode != 0 or not found:
        raise SystemExit(f"{name}: exit {proc.returncode}, no plan_check file\n{proc.stderr[-4000:]}")
    with open(found[0]) as f:
        return json.load(f)


def predicted_for(task: str, overrides, rank: int):
    """The planner's prediction for ``rank`` (``planning.check.predict`` on the config the entry point composes)."""
    from megatron_ext.planning import check

    from hydra import compose, initialize_config_dir

    from megatron_ext.config.loader import register_schemas

    register_schemas()
    conf = "gpt" if task == "gpt" else "bart"
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs", conf), version_base=None):
        cfg = compose(config_name=f"megatron_{conf}_config", overrides=[*COMMON, *overrides])
    return check.predict(cfg, rank)


def report(path: str) -> str:
    """A markdown table of a results file: per run and rank, predicted / measured peak and their ratio, and the
    ratio of measured to predicted bytes of every communication kind of 64 KiB or more per step."""
    out = ["| run | rank | predicted peak MiB | measured peak MiB | ratio | comm bytes measured / predicted |",
           "|---|---|---|---|---|---|"]
    worst_peak, worst_comm = 1.0, 1.0
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            pred, meas = d["predicted"]["peak_bytes"], d["measured_peak_bytes"]
            pc, mc = d["predicted"]["comm_bytes"], d["comm_bytes"]
            kinds = []
            for k in sorted(set(pc) | set(mc)):
                p_, m_ = pc.get(k, 0), mc.get(k, 0)
                if k == "pp_sendrecv" or max(p_, m_) < (64 << 10):
                    continue
                r = m_ / p_ if p_ else float("inf")
                worst_comm = max(worst_comm, abs(r - 1) + 1)
                kinds.append(f"{k} {r:.3f}")
            worst_peak = max(worst_peak, abs(meas / pred - 1) + 1)
            out.append(f"| {d['name']} | {d['rank']} | {pred / 2**20:.1f} | {meas / 2**20:.1f} | {meas / pred:.3f} | "
                       f"{', '.join(kinds) or '--'} |")
    out.append(f"\nlargest peak difference {worst_peak - 1:.1%}, largest communication difference "
               f"{worst_comm - 1:.1%}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="grid points to run (default: all)")
    ap.add_argument("--out", default=OUT, help="JSON lines file (appends nothing: rewritten), '-' for stdout")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--report", nargs="?", const=OUT, help="print the markdown table of a results file and exit")
    a = ap.parse_args()
    if a.report:
        print(report(a.report))
        return
    names = a.only or list(GRID)
    unknown = [n for n in names if n not in GRID]
    if unknown:
        raise SystemExit(f"--only: unknown grid point(s) {unknown}; known: {sorted(GRID)}")
    lines = []
    with tempfile.TemporaryDirectory(prefix="bench_plan_") as work:
        for name in names:
            task, overrides = GRID[name]
            res = run_point(name, task, overrides, work, a.verbose)
            for r in res["ranks"]:
                line = {"bench": "plan", "name": name, "task": task, "rank": r["rank"], "overrides": overrides,
                        "measured_peak_bytes": r["peak_bytes"], "rss_peak_bytes": r.get("rss_peak_bytes"),
                        "file_growth_bytes": r.get("file_growth_bytes"), "peak_reset": r["peak_reset"],
                        "steps_measured": r["steps"], "comm_bytes": r["comm_bytes"], "comm_calls": r["comm_calls"],
                        "comm_bytes_by_function": r.get("comm_bytes_by_function", {}),
                        "predicted": predicted_for(task, overrides, r["rank"])}
                lines.append(line)
                print(json.dumps(line), flush=True) if a.out == "-" else \
                    sys.stderr.write(f"{name} rank {r['rank']}: peak {r['peak_bytes'] / 2**20:.1f} MiB (predicted "
                                     f"{line['predicted']['peak_bytes'] / 2**20:.1f}), comm "
                                     f"{ {k: int(v) for k, v in r['comm_bytes'].items()} }\n")
    if a.out != "-":
        with open(a.out, "w") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()

"""Multi-process scaling of GPT training through our full stack: 1 process vs 2 processes, same global batch.

What runs: ``megatron_ext.training.trainer.Trainer`` with ``GPTTask`` (byte tokenizer, built-in default corpus,
megatron-core TP layers, DeepSpeed engine, fused AdamW + cosine schedule, gradient clipping 1.0, fp32 by default).
Every layout trains the same model on the same global batch with the same seed and the same padded vocabulary, so
all layouts see the same data and initial weights (``config.loss_step1`` / ``loss_last`` agree across layouts):

  single          1 process, all cores as intra-op threads      the baseline ("1proc")
  dp2_zero0       2 processes, data parallel, ZeRO stage 0        fp32 gradient all-reduce over gloo every step
  dp2_zero1       2 processes, data parallel, ZeRO stage 1        gradient reduce + sharded AdamW + param all-gather
  tp2             2 processes, model.tensor_model_parallel_size=2 activation all-reduces in every layer, fwd + bwd
  single_1thread  1 process with cores // 2 threads (what one rank of a 2-process run has; not in --quick)

Each layout is a fresh set of real OS processes (this script re-run with ``--worker``) given RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT (a fresh free port per launch), gloo, ``trainer.devices=<world>`` and
``OMP_NUM_THREADS`` = ``torch.set_num_threads`` = cores // world, so two ranks on two cores do not oversubscribe.
Layouts run round-robin for ``--repeats`` rounds, so drift of the machine hits all of them alike. The package is
copied once at start and every launch imports that copy, so edits to the working tree during a run cannot mix code
versions (``config.git_commit`` / ``code_modified`` say what was measured).

Measurement: the trainer logs every step (``trainer.log_every_n_steps=1``); its ``train/step_time`` is the wall time
of one optimizer step on global rank 0 (data -> forward -> backward -> DeepSpeed step with its all-reduce / ZeRO
collectives -> loss all-reduce); start-up, dataset and index building, engine construction and metric writing are
outside it. The first ``--warmup`` steps of every launch are dropped (allocator, DeepSpeed lazy init, first gloo
connections); ``tokens_per_sec`` = global_batch * seq_length / median(step_time) over the remaining steps of all
rounds. ``config.tokens_per_sec_wall`` cross-checks it from the trainer's total loop time (metric writing included).
Logging every step costs one extra grad-norm pass on the ZeRO-0 fp32 path (single, dp2_zero0, tp2), ~1% of a step.

Lines: ``tokens_per_sec`` per layout; ``speedup_vs_1proc`` = tokens/s(layout) / tokens/s(single);
``scaling_efficiency`` = tokens/s(2 procs) / (2 * tokens/s(single)) -- with all ranks sharing one machine's cores
its ideal is 1/world (the baseline already uses every core); ``scaling_efficiency_vs_1proc_same_threads`` =
tokens/s(2 procs) / (2 * tokens/s(single_1thread)), the efficiency with the per-rank resources held equal (ideal
1.0); ``thread_scaling_efficiency`` of intra-op threading; ``gloo_allreduce_time`` of one fp32 all-reduce of the
model's gradient size between two processes (the communication dp2_zero0 adds per step).

    python bench/bench_scaling.py            # 4 layers, hidden 512, 8 heads, seq 256, global batch 8, micro 4
    python bench/bench_scaling.py --quick    # 2 layers, hidden 256, seq 128, global batch 4: well under a minute

stdout holds the JSON lines only; worker logs go to files in a temp directory (``--verbose`` streams them to stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = "train_scaling"

FULL = dict(layers=4, hidden=512, heads=8, seq=256, global_batch=8, micro_batch=4, steps=20, warmup=3, repeats=3)
QUICK = dict(layers=2, hidden=256, heads=4, seq=128, global_batch=4, micro_batch=2, steps=5, warmup=2, repeats=1)

# name -> (world, tp, zero_stage); threads per rank = cores // world (single_1thread: cores // 2)
LAYOUTS = {
    "single": (1, 1, 0),
    "dp2_zero0": (2, 1, 0),
    "dp2_zero1": (2, 1, 1),
    "tp2": (2, 2, 0),
    "single_1thread": (1, 1, 0),
}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(shape: dict, world: int, tp: int, zero: int, steps: int, precision: str, exp_dir: str) -> list:
    return [
        "trainer.accelerator=cpu", f"trainer.devices={world}", "trainer.num_nodes=1", f"trainer.precision={precision}",
        f"trainer.max_steps={steps}", "trainer.val_check_interval=0", "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1", "trainer.seed=1234",
        f"model.num_layers={shape['layers']}", f"model.hidden_size={shape['hidden']}",
        f"model.num_attention_heads={shape['heads']}", f"model.seq_length={shape['seq']}",
        f"model.micro_batch_size={shape['micro_batch']}", f"model.global_batch_size={shape['global_batch']}",
        "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
        f"model.tensor_model_parallel_size={tp}", "model.pipeline_model_parallel_size=1", f"model.zero_stage={zero}",
        # the vocabulary is padded to a multiple of this x tp: keep the padded size (and so the init) equal across TP
        f"model.make_vocab_size_divisible_by={max(1, 128 // tp)}",
        "model.tokenizer.library=byte", "model.data.data_prefix=[]", "model.data.num_workers=0",
        f"exp_manager.exp_dir={exp_dir}", "exp_manager.name=bench_scaling",
        "exp_manager.create_checkpoint_callback=false", "exp_manager.create_tensorboard_logger=false",
        "exp_manager.create_wandb_logger=false", "exp_manager.resume_if_exists=false",
    ]


# ----------------------------------------------------------------------------- workers (one rank each)
def _train_worker(spec: dict) -> int:
    import megatron_ext  # sets DS_ACCELERATOR=cpu before deepspeed loads
    import torch

    if not os.path.abspath(megatron_ext.__file__).startswith(os.path.abspath(spec["code"]) + os.sep):
        print(f"error: imported megatron_ext from {megatron_ext.__file__}, not the snapshot", file=sys.stderr)
        return 2
    torch.set_num_threads(spec["threads"])
    from megatron_ext.config.loader import load_config
    from megatron_ext.errors import MegatronExtError
    from megatron_ext.parallel.state import destroy_parallel
    from megatron_ext.training.gpt_task import GPTTask
    from megatron_ext.training.trainer import Trainer

    try:
        trainer = Trainer(load_config(overrides=spec["overrides"]), GPTTask)
        result = trainer.fit()
        if trainer.rank == 0:
            module = trainer.engine.module
            out = {"elapsed_s": result["elapsed_s"], "run_dir": result["run_dir"],
                   "threads": torch.get_num_threads(), "params_per_rank": sum(p.numel() for p in module.parameters()),
                   "vocab": trainer.task.tokenizer.vocab_size,
                   "padded_vocab": getattr(module, "padded_vocab_size", None),
                   "accumulation": trainer.derived.accumulate_grad_batches, "dp": trainer.dp_size}
            with open(spec["result"], "w") as f:
                json.dump(out, f)
    except MegatronExtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel()
    return 0


def _allreduce_worker(spec: dict) -> int:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(spec["threads"])
    dist.init_process_group("gloo")
    x = torch.ones(spec["numel"], dtype=torch.float32)
    times = []
    for i in range(spec["warmup"] + spec["iters"]):
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(x)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t)
    if dist.get_rank() == 0:
        with open(spec["result"], "w") as f:
            json.dump({"times": times, "threads": torch.get_num_threads()}, f)
    dist.destroy_process_group()
    return 0


def _worker(spec_path: str) -> int:
    os.dup2(2, 1)  # DeepSpeed prints on stdout (from Python and C++): keep the parent's stdout pure JSON
    sys.stdout = sys.stderr
    with open(spec_path) as f:
        spec = json.load(f)
    sys.path.insert(0, spec["code"])  # the copy of megatron_ext taken when the bench started
    return _allreduce_worker(spec) if spec["mode"] == "allreduce" else _train_worker(spec)


# ----------------------------------------------------------------------------- launcher
def _run_ranks(tag: str, world: int, threads: int, spec: dict, work: str, timeout: float, verbose: bool,
               cache_dir: str | None) -> dict:
    """Start ``world`` worker processes for ``spec``; return rank 0's result. Retries a rendezvous-port clash."""
    for attempt in range(3):
        port = _free_port()
        spec_path = os.path.join(work, f"{tag}_a{attempt}.spec.json")
        result_path = os.path.join(work, f"{tag}_a{attempt}.result.json")
        s = dict(spec, threads=threads, result=result_path, code=os.path.join(work, "code"))
        if "overrides" in s:
            s["overrides"] = [*s["overrides"], f"exp_manager.version={tag}_a{attempt}"]
        with open(spec_path, "w") as f:
            json.dump(s, f)
        procs, logs = [], []
        for rank in range(world):
            env = dict(os.environ)
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads),
                       MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
            if cache_dir:
                env["XDG_CACHE_HOME"] = cache_dir
            log_path = os.path.join(work, f"{tag}_a{attempt}.rank{rank}.log")
            logs.append(log_path)
            logf = None if verbose else open(log_path, "w")
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec_path],
                                          cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=logf or sys.stderr,
                                          stderr=subprocess.STDOUT))
            if logf is not None:
                logf.close()
        deadline = time.time() + timeout
        while time.time() < deadline:  # a rank that fails leaves the others blocked in a collective: stop them
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.05)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        codes = [p.returncode for p in procs]
        if all(c == 0 for c in codes) and os.path.exists(result_path):
            with open(result_path) as f:
                return json.load(f)
        text = ""
        for lp in logs:
            if os.path.exists(lp):
                with open(lp, errors="replace") as f:
                    text += f"--- {lp}\n" + f.read()[-4000:]
        if "address already in use" in text.lower() and attempt < 2:
            continue  # the port was taken between our probe and the rendezvous: try a fresh one
        sys.stderr.write(text)
        raise SystemExit(f"bench_scaling: {tag} failed (exit codes {codes}, timeout {timeout:.0f}s); logs above")
    raise AssertionError("unreachable")


def _launch_train(name: str, shape: dict, steps: int, precision: str, work: str, rnd: int, timeout: float,
                  verbose: bool, cache_dir: str | None) -> dict:
    world, tp, zero = LAYOUTS[name]
    cores = _cores()
    threads = max(1, cores // 2) if name == "single_1thread" else max(1, cores // world)
    spec = {"mode": "train", "overrides": _overrides(shape, world, tp, zero, steps, precision, work)}
    res = _run_ranks(f"{name}_r{rnd}", world, threads, spec, work, timeout, verbose, cache_dir)
    with open(os.path.join(res["run_dir"], "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    recs = [r for r in recs if "train/step_time" in r]
    if [r["step"] for r in recs] != list(range(1, steps + 1)):
        raise SystemExit(f"bench_scaling: layout {name}: expected per-step metrics for steps 1..{steps}")
    res.update(world=world, tp=tp, zero=zero, step_times=[r["train/step_time"] for r in recs],
               losses=[r["train/loss"] for r in recs])
    return res


def _git_info() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"git_commit": git("rev-parse", "--short", "HEAD") or None,
            "code_modified": bool(git("status", "--porcelain", "--", "megatron_ext"))}


def _emit(metric: str, value: float, unit: str, config: dict) -> None:
    print(json.dumps({"bench": BENCH, "metric": metric, "value": value, "unit": unit, "config": config}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, few steps: well under a minute")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per launch (warm-up included)")
    ap.add_argument("--warmup", type=int, default=None, help="steps dropped at the start of every launch")
    ap.add_argument("--repeats", type=int, default=None, help="round-robin rounds over the layouts")
    ap.add_argument("--layouts", default=None, help=f"comma list of {','.join(LAYOUTS)} (single is always run)")
    ap.add_argument("--precision", default="32", help="trainer.precision: 32 or bf16")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per launch")
    ap.add_argument("--cache-dir", default=None,
                    help="XDG_CACHE_HOME for the workers (built-in corpus + sample index); default: the usual one")
    ap.add_argument("--verbose", action="store_true", help="stream the workers' logs to stderr")
    ap.add_argument("--keep", action="store_true", help="keep the temp run directory (its path goes to stderr)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        raise SystemExit(_worker(args.worker))

    p = dict(QUICK if args.quick else FULL)
    steps = args.steps or p["steps"]
    warmup = p["warmup"] if args.warmup is None else args.warmup
    repeats = args.repeats or p["repeats"]
    if steps <= warmup:
        raise SystemExit(f"--steps ({steps}) must exceed --warmup ({warmup})")
    default_layouts = "single,dp2_zero0,dp2_zero1,tp2" + ("" if args.quick else ",single_1thread")
    names = [n.strip() for n in (args.layouts or default_layouts).split(",") if n.strip()]
    bad = [n for n in names if n not in LAYOUTS]
    if bad:
        raise SystemExit(f"--layouts: unknown {bad}; expected some of {list(LAYOUTS)}")
    if "single" not in names:
        names.insert(0, "single")
    shape = {k: p[k] for k in ("layers", "hidden", "heads", "seq", "global_batch", "micro_batch")}
    timeout = args.timeout or (300 if args.quick else 1200)
    cores = _cores()

    work = tempfile.mkdtemp(prefix="bench_scaling_")
    if args.keep:
        print(f"bench_scaling: run directory {work}", file=sys.stderr)
    try:
        # every launch of this command imports this copy, even if the working tree is edited meanwhile
        shutil.copytree(os.path.join(REPO, "megatron_ext"), os.path.join(work, "code", "megatron_ext"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        code = _git_info()
        code["loadavg_1m_at_start"] = round(os.getloadavg()[0], 2)  # > ~0.3 on an idle box: others share the cores
        runs = {n: [] for n in names}
        for rnd in range(repeats):
            for n in names:
                t = time.perf_counter()
                runs[n].append(_launch_train(n, shape, steps, args.precision, work, rnd, timeout, args.verbose,
                                             args.cache_dir))
                print(f"bench_scaling: {n} round {rnd + 1}/{repeats}: {time.perf_counter() - t:.1f}s, median step "
                      f"{statistics.median(runs[n][-1]['step_times'][warmup:]):.4f}s", file=sys.stderr)
        numel = runs["single"][0]["params_per_rank"]
        ar = _run_ranks("allreduce", 2, max(1, cores // 2),
                        {"mode": "allreduce", "numel": numel, "warmup": 3, "iters": 5 if args.quick else 15},
                        work, timeout, args.verbose, None)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    tokens_per_step = shape["global_batch"] * shape["seq"]
    tps, confs = {}, {}
    ref = runs["single"][0]["losses"]
    for n in names:
        rs = runs[n]
        kept = [t for r in rs for t in r["step_times"][warmup:]]
        med = statistics.median(kept)
        q = statistics.quantiles(kept, n=4) if len(kept) >= 2 else [med, med, med]
        wall = [r["elapsed_s"] - sum(r["step_times"][:warmup]) for r in rs]  # the loop's time after the warm-up
        r0 = rs[0]
        conf = {
            "layout": n, "world": r0["world"], "tp": r0["tp"], "dp": r0["dp"], "pp": 1, "zero_stage": r0["zero"],
            "threads_per_rank": r0["threads"], "cores": cores, "global_batch": shape["global_batch"],
            "micro_batch": shape["micro_batch"], "accumulation": r0["accumulation"], "layers": shape["layers"],
            "hidden": shape["hidden"], "heads": shape["heads"], "seq": shape["seq"], "vocab": r0["vocab"],
            "padded_vocab": r0["padded_vocab"], "params_per_rank": r0["params_per_rank"],
            "precision": args.precision, "backend": "gloo", "device": "cpu", **code,
            "steps_per_launch": steps, "warmup_dropped": warmup, "launches": len(rs), "steps_measured": len(kept),
            "step_time_median_s": round(med, 4), "step_time_q1_s": round(q[0], 4), "step_time_q3_s": round(q[2], 4),
            "tokens_per_sec_per_launch": [round(tokens_per_step / statistics.median(r["step_times"][warmup:]), 1)
                                          for r in rs],
            "tokens_per_sec_wall": round(tokens_per_step * (steps - warmup) * len(rs) / sum(wall), 1),
            "loss_step1": round(r0["losses"][0], 5), "loss_last": round(r0["losses"][-1], 5),
        }
        if abs(r0["losses"][0] - ref[0]) > 1e-3 or abs(r0["losses"][-1] - ref[-1]) > 1e-2:
            print(f"bench_scaling: warning: {n} losses (step 1 {r0['losses'][0]:.5f}, last {r0['losses'][-1]:.5f}) "
                  f"differ from single's ({ref[0]:.5f}, {ref[-1]:.5f}): not the same model/batch?", file=sys.stderr)
        tps[n], confs[n] = tokens_per_step / med, conf
        _emit("tokens_per_sec", round(tps[n], 1), "tokens/s", conf)
    base = tps["single"]
    one = tps.get("single_1thread")
    for n in names:
        if n == "single":
            continue
        c = confs[n]
        conf = {**c, "baseline": "single", "baseline_tokens_per_sec": round(base, 1),
                "baseline_threads": confs["single"]["threads_per_rank"]}
        _emit("speedup_vs_1proc", round(tps[n] / base, 3), "x", conf)
        if c["world"] > 1:
            # ideal (linear thread scaling): threads per rank / baseline threads, i.e. 1/world when all share the cores
            _emit("scaling_efficiency", round(tps[n] / (c["world"] * base), 3), "fraction",
                  {**conf, "ideal": round(c["threads_per_rank"] / confs["single"]["threads_per_rank"], 3)})
            if one is not None and confs["single_1thread"]["threads_per_rank"] == c["threads_per_rank"]:
                _emit("scaling_efficiency_vs_1proc_same_threads", round(tps[n] / (c["world"] * one), 3), "fraction",
                      {**c, "baseline": "single_1thread", "baseline_tokens_per_sec": round(one, 1),
                       "baseline_threads": c["threads_per_rank"], "ideal": 1.0})
    if one is not None and confs["single_1thread"]["threads_per_rank"] < confs["single"]["threads_per_rank"]:
        t1, t2 = confs["single_1thread"]["threads_per_rank"], confs["single"]["threads_per_rank"]
        _emit("thread_scaling_efficiency", round(base * t1 / (one * t2), 3), "fraction",
              {**confs["single"], "threads_from": t1, "threads_to": t2,
               "definition": "tokens/s(threads_to) / (threads_to/threads_from * tokens/s(threads_from))"})
    at = statistics.median(ar["times"])
    nbytes = numel * 4
    ar_conf = {"world": 2, "backend": "gloo", "device": "cpu", "threads_per_rank": ar["threads"], "numel": numel,
               "bytes": nbytes, "dtype": "float32", "iters": len(ar["times"]),
               "what": "one all_reduce of the model's fp32 gradient size (params of the single layout)",
               "dp2_zero0_step_time_s": confs["dp2_zero0"]["step_time_median_s"] if "dp2_zero0" in confs else None}
    _emit("gloo_allreduce_time", round(at, 5), "s", ar_conf)
    _emit("gloo_allreduce_busbw", round(2 * (2 - 1) / 2 * nbytes / at / 1e9, 3), "GB/s", ar_conf)


if __name__ == "__main__":
    main()

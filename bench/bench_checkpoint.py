"""Checkpoint cost of our stack, in one process: sync save, async save (what the training loop waits for, and the
background time after it), load, bytes on disk, and what integrity costs (the manifest's sha256, verifying before a
load).

For each model, a GPTModel from pretrain_gpt.py's task inside a DeepSpeed engine (fp32, AdamW, ZeRO 0; one training
step first, so the optimizer holds both Adam moments) is saved through ``megatron_ext.training.checkpointing.
Checkpointer`` -- the code the trainer runs, with the layout-free state as the trainer's default
(``--no-layout-free``: without) -- ``--rounds`` times each way, alternating sync and async so drift
of the machine hits both alike; the medians are reported:

  sync_save_s          Checkpointer.save with async_save off (DeepSpeed's files, RNG state, meta.json, commit)
  async_blocking_s     Checkpointer.save with async_save on: what the training loop waits (the host snapshot),
                       for every save after a run's first (which allocates the snapshot:
                       async_blocking_first_s)
  async_background_s   the rest of that save, written by the background thread (Checkpointer.finish after it)
  async_blocking_ratio async_blocking_s / sync_save_s
  load_s               Checkpointer.load (module, optimizer, scheduler) into the same engine
  checkpoint_bytes     bytes of one checkpoint directory
  sha256_s             hashing every file of one checkpoint once, page cache warm (what the writers add to a
                       save for the manifest; with N ranks each hashes its own files), and
                       sha256_share_of_sync_save
  verify_checksums_s   check_files before a load, with checksums (verify_checksums=true; shared N ways among N
                       ranks), and verify_sizes_s without

Models: ``bench`` (bench_train.py's shape: 6 layers, hidden 512, seq 512, vocab 8192, ~23M parameters) and
``gpt_100m`` (12 layers, hidden 768, 12 heads, seq 1024, vocab 32768: ~110M parameters).

    python bench/bench_checkpoint.py            # both models, 4 rounds
    python bench/bench_checkpoint.py --quick    # a tiny model, 2 rounds (smoke test)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_ext  # noqa: E402,F401  (DS_ACCELERATOR=cpu without a GPU)
import torch  # noqa: E402
from bench_train import _StdoutToStderr, gpt_engine  # noqa: E402  (_StdoutToStderr: DeepSpeed prints notices on stdout)

MODELS = {
    "bench": dict(layers=6, hidden=512, heads=8, seq=512, vocab=8192, batch=1),
    "gpt_100m": dict(layers=12, hidden=768, heads=12, seq=1024, vocab=32768, batch=1),
}
QUICK = {"tiny": dict(layers=2, hidden=64, heads=4, seq=64, vocab=512, batch=1)}


def build_engine(shape):
    """bench_train's GPT engine of ``shape`` (fp32), after one training step (the optimizer then holds both Adam
    moments): (engine, parameter count, the trainer's meta.json fields)."""
    engine, model, cfg, task = gpt_engine(shape)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g)
    loss, _, _ = task.loss(engine, {"tokens": x, "labels": x, "loss_mask": torch.ones(shape["batch"], shape["seq"])})
    engine.backward(loss)
    engine.step()
    params = sum(p.numel() for p in model.parameters())
    from omegaconf import OmegaConf

    meta = {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 0, "precision": "32", "vocab_size": shape["vocab"],
            "model_config": OmegaConf.to_container(cfg.model, resolve=True)}  # as the trainer's meta.json
    return engine, params, meta


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def measure(engine, meta, rounds, root, layout_free=None):
    """One sync and one async Checkpointer (as a training run has one), saving steps 1..rounds alternately; each
    keeps its newest checkpoint (save_top_k=1). The first async save allocates its host snapshot; later ones refill
    it, which is what every save after the first of a run costs: that is ``async_blocking_s``."""
    from megatron_ext.parallel.random import get_all_rng_states
    from megatron_ext.training.checkpointing import Checkpointer

    out = {"sync_save_s": [], "async_blocking_s": [], "async_background_s": [], "load_s": []}
    ckpts = {mode: Checkpointer(os.path.join(root, mode), save_top_k=1, async_save=mode == "async")
             for mode in ("sync", "async")}
    first_blocking, nbytes = None, 0
    for step in range(1, rounds + 1):
        for mode, ck in ckpts.items():
            t0 = time.perf_counter()
            path = ck.save(engine, step, step, get_all_rng_states(), meta, layout_free=layout_free)
            t1 = time.perf_counter()
            ck.finish()
            t2 = time.perf_counter()
            if mode == "sync":
                out["sync_save_s"].append(t1 - t0)
                nbytes = _dir_bytes(path)
                t3 = time.perf_counter()
                Checkpointer.load(engine, ck.ckpt_dir, os.path.basename(path))
                out["load_s"].append(time.perf_counter() - t3)
            elif step == 1:
                first_blocking = t1 - t0
            else:
                out["async_blocking_s"].append(t1 - t0)
                out["async_background_s"].append(t2 - t1)
    res = {k: statistics.median(v) for k, v in out.items()}
    res["async_blocking_first_s"] = first_blocking
    res["async_blocking_ratio"] = res["async_blocking_s"] / res["sync_save_s"]
    res["checkpoint_bytes"] = nbytes
    res.update(integrity(path))
    res["sha256_share_of_sync_save"] = res["sha256_s"] / res["sync_save_s"]
    return res


def integrity(path):
    """What the manifest costs for the checkpoint at ``path``: hashing its files, verifying it before a load."""
    from megatron_ext.checkpoint.files import check_files
    from megatron_ext.checkpoint.manifest import hash_file

    files = [os.path.join(r, n) for r, _, fs in os.walk(path) for n in fs]
    t = time.perf_counter()
    for f in files:
        hash_file(f)
    sha = time.perf_counter() - t
    t = time.perf_counter()
    check_files(path, checksums=True)
    with_sums = time.perf_counter() - t
    t = time.perf_counter()
    check_files(path, checksums=False)
    return {"sha256_s": sha, "verify_checksums_s": with_sums, "verify_sizes_s": time.perf_counter() - t}


UNITS = {"sha256_s": "s", "verify_checksums_s": "s", "verify_sizes_s": "s", "sha256_share_of_sync_save": "fraction",
         "sync_save_s": "s", "async_blocking_s": "s", "async_blocking_first_s": "s", "async_background_s": "s", "load_s": "s",
         "async_blocking_ratio": "fraction", "checkpoint_bytes": "bytes"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--no-layout-free", action="store_true",
                    help="without the layout-free state (exp_manager.checkpoint_callback_params.save_layout_free=false)")
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    args = ap.parse_args()
    models = QUICK if args.quick else {k: MODELS[k] for k in (args.models.split(",") if args.models else MODELS)}
    rounds = max(2, args.rounds or (2 if args.quick else 4))
    torch.set_num_threads(os.cpu_count() or 1)
    for name, shape in models.items():
        root = tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir)
        try:
            with _StdoutToStderr():
                engine, params, meta = build_engine(shape)
                layout_free = None
                if not args.no_layout_free:  # as the trainer saves by default (save_layout_free=true)
                    from megatron_ext.checkpoint import reshard

                    def layout_free():
                        return reshard.collect_state(engine, pipeline=False, num_layers=shape["layers"],
                                                     vocab_size=shape["vocab"], scheduler=None,
                                                     extra={"layout": {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 0}})
                res = measure(engine, meta, rounds, root, layout_free)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        config = {"model": name, **shape, "parameters": params, "precision": "32", "zero_stage": 0,
                  "layout_free": not args.no_layout_free,
                  "rounds": rounds, "device": "cpu", "threads": torch.get_num_threads()}
        for metric, value in res.items():
            print(json.dumps({"bench": "checkpoint", "metric": metric,
                              "value": round(value, 4) if isinstance(value, float) else value,
                              "unit": UNITS[metric], "config": config}), flush=True)
        del engine


if __name__ == "__main__":
    main()

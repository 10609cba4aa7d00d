"""What checkpoint integrity costs: saving the bench GPT (bench_train.py's shape, fp32, AdamW: weights + 2 moments)
through ``Checkpointer.save``, and the share of it spent hashing (sha256) the files for the manifest; verifying a
checkpoint before loading it with and without checksums (``verify_checksums``).

Figures (one JSON line each): ``checkpoint_mb``, ``save_s`` (median of the saves, manifest included),
``sha256_s`` (hashing every file of one checkpoint once, page cache warm: what the writers add to a save),
``sha256_share_of_save``, ``sha256_mb_per_s``, ``fsync_s`` (forcing that many fresh bytes to the disk: a save
now fsyncs every file before ``latest`` names it), ``verify_checksums_s`` and ``verify_sizes_s`` (``check_files``
with and without checksums, one process; with N ranks the checksums are shared N ways).

    python bench/bench_checkpoint.py           # bench_train's full shape (6 layers, hidden 512, vocab 8192)
    python bench/bench_checkpoint.py --quick   # 2 layers, hidden 128
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_ext  # noqa: E402,F401  (DS_ACCELERATOR=cpu without a GPU)
import torch  # noqa: E402


def _engine(shape):
    from megatron_ext.config.loader import load_config
    from megatron_ext.models.gpt import GPTModel
    from megatron_ext.parallel.state import initialize_parallel
    from megatron_ext.training.engine import build_ds_config, build_engine
    from megatron_ext.training.optim import build_optimizer

    cfg = load_config(overrides=[
        f"model.num_layers={shape['layers']}", f"model.hidden_size={shape['hidden']}",
        f"model.num_attention_heads={shape['heads']}", f"model.seq_length={shape['seq']}",
        "model.micro_batch_size=1", "model.global_batch_size=1", "model.position_embedding_type=learned_absolute",
    ])
    initialize_parallel(1, 1, accelerator="cpu")
    torch.manual_seed(0)
    model = GPTModel(cfg.model, shape["vocab"])
    opt = build_optimizer(model, {"name": "adamw", "lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.01})
    ds = build_ds_config(micro_batch_size=1, global_batch_size=1, accumulate_grad_batches=1, precision="32",
                         zero_stage=0, gradient_clip_val=1.0)
    engine, _, _ = build_engine(model, opt, None, ds)
    x = torch.randint(0, shape["vocab"], (1, shape["seq"]))
    loss = engine(x).float().mean()  # one step, so that the Adam moments exist
    engine.backward(loss)
    engine.step()
    from omegaconf import OmegaConf

    meta = {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 0, "precision": "32", "vocab_size": shape["vocab"],
            "model_config": OmegaConf.to_container(cfg.model, resolve=True)}
    return engine, meta


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--saves", type=int, default=3)
    args = ap.parse_args()
    shape = (dict(layers=2, hidden=128, heads=4, seq=128, vocab=2048) if args.quick
             else dict(layers=6, hidden=512, heads=8, seq=512, vocab=8192))
    tag = f"gpt L{shape['layers']} h{shape['hidden']} v{shape['vocab']} fp32 adamw"
    stdout = os.dup(1)
    os.dup2(2, 1)  # DeepSpeed prints notices on stdout; keep it JSON lines
    try:
        from megatron_ext.checkpoint.files import check_files
        from megatron_ext.checkpoint.manifest import hash_file
        from megatron_ext.parallel.random import get_all_rng_states
        from megatron_ext.training.checkpointing import Checkpointer

        engine, meta = _engine(shape)
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
            ck = Checkpointer(d, save_top_k=1)
            saves = []
            for i in range(args.saves):
                t = time.perf_counter()
                path = ck.save(engine, i + 1, i + 1, get_all_rng_states(), meta)
                saves.append(time.perf_counter() - t)
            files = [os.path.join(r, n) for r, _, fs in os.walk(path) for n in fs]
            nbytes = sum(os.path.getsize(f) for f in files)
            t = time.perf_counter()
            for f in files:
                hash_file(f)
            sha = time.perf_counter() - t
            fsync = 0.0  # what forcing that many fresh bytes to the disk costs (a copy of each file, then fsync)
            for i, f in enumerate(files):
                dst = os.path.join(d, f"copy{i}")
                with open(f, "rb") as src, open(dst, "wb") as out:
                    out.write(src.read())
                    out.flush()
                    t = time.perf_counter()
                    os.fsync(out.fileno())
                    fsync += time.perf_counter() - t
                os.remove(dst)
            t = time.perf_counter()
            check_files(path, checksums=True)
            ver_sum = time.perf_counter() - t
            t = time.perf_counter()
            check_files(path, checksums=False)
            ver_size = time.perf_counter() - t
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)
    save = statistics.median(saves)
    for metric, value, unit in [
        ("checkpoint_mb", nbytes / 1e6, "MB"), ("save_s", save, "s"), ("sha256_s", sha, "s"),
        ("sha256_share_of_save", sha / save, "fraction"), ("fsync_s", fsync, "s"), ("sha256_mb_per_s", nbytes / 1e6 / sha, "MB/s"),
        ("verify_checksums_s", ver_sum, "s"), ("verify_sizes_s", ver_size, "s"),
    ]:
        print(json.dumps({"bench": "checkpoint", "metric": metric, "value": round(value, 4), "unit": unit,
                          "config": tag}))


if __name__ == "__main__":
    main()

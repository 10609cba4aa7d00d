"""End-to-end training throughput of the Mega GPT (``model.arch=mega``) with each EMA implementation.

One model (pretrain_gpt.py's ``MegaGPTModel`` inside the DeepSpeed engine, fp32, fused AdamW, clipping 1.0) is
trained with its ``MultiHeadEMA`` modules switched between implementations (``impl`` attribute: the weights are
the same), round-robin, median step time per implementation. The baseline is ``fft`` (the PyTorch FFT path);
``speedup_vs_fft`` rows compare the others with it in the same process.

    python bench/bench_mega_train.py                # 4 layers, hidden 512, seq 2048, mb 2, N 16, Z 128, H 1024
    python bench/bench_mega_train.py --quick        # small shape, under a minute
    python bench/bench_mega_train.py --impls fft,fused,scan
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_ext  # noqa: E402,F401  (DS_ACCELERATOR=cpu without a GPU)
import torch  # noqa: E402


def _build(shape):
    from megatron_ext.config.loader import load_config
    from megatron_ext.models.mega_lm import MegaGPTModel
    from megatron_ext.parallel.state import initialize_parallel
    from megatron_ext.training.engine import build_ds_config, build_engine
    from megatron_ext.training.gpt_task import GPTTask
    from megatron_ext.training.optim import build_optimizer

    cfg = load_config(overrides=[
        "model.arch=mega", f"model.num_layers={shape['layers']}", f"model.hidden_size={shape['hidden']}",
        f"model.seq_length={shape['seq']}", f"model.micro_batch_size={shape['batch']}",
        f"model.global_batch_size={shape['batch']}", "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
        f"model.mega.ema_projection_size={shape['ndim']}", f"model.mega.shared_representation_size={shape['zdim']}",
        f"model.mega.intermediate_size={shape['hdim']}", f"model.mega.nffn_hidden_size={shape['hdim']}",
        f"model.mega.chunk_size={shape['chunk']}", "model.mega.ema_impl=fft",
    ])
    initialize_parallel(1, 1, accelerator="cpu")
    model = MegaGPTModel(cfg.model, shape["vocab"], init_seed=0)
    opt = build_optimizer(model, {"name": "adamw", "lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.01})
    ds = build_ds_config(micro_batch_size=shape["batch"], global_batch_size=shape["batch"], accumulate_grad_batches=1,
                         precision="32", zero_stage=0, gradient_clip_val=1.0)
    engine, _, _ = build_engine(model, opt, None, ds)
    task = GPTTask(cfg, torch.device("cpu"))  # byte tokenizer; the model keeps the bench vocab
    mask = torch.ones(shape["batch"], shape["seq"])

    def step(x, y):
        loss, _, _ = task.loss(engine, {"tokens": x, "labels": y, "loss_mask": mask})
        engine.backward(loss)
        engine.step()
        return loss.item()

    return model, step, cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--impls", default="fft,fused")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    if args.quick:
        shape = dict(layers=2, hidden=128, seq=512, batch=2, vocab=256, ndim=16, zdim=64, hdim=256, chunk=-1)
        steps, rounds = args.steps or 2, args.rounds or 2
    else:
        shape = dict(layers=4, hidden=512, seq=2048, batch=2, vocab=256, ndim=16, zdim=128, hdim=1024, chunk=-1)
        steps, rounds = args.steps or 2, args.rounds or 3
    torch.set_num_threads(os.cpu_count() or 1)

    from megatron_ext.models.flops import gpt_flops_per_iteration
    from megatron_ext.modules.mega_ema import MultiHeadEMA

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_train import _StdoutToStderr  # DeepSpeed prints op-build notices on stdout: keep it JSON only

    with _StdoutToStderr():
        model, step, cfg = _build(shape)
    emas = [m for m in model.modules() if isinstance(m, MultiHeadEMA)]
    impls = args.impls.split(",")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g)
    y = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g)

    def use(impl):
        for m in emas:
            m.impl = impl

    for impl in impls:  # warm-up (kernel build/load, allocator)
        use(impl)
        step(x, y)
    times = {k: [] for k in impls}
    for _ in range(rounds):
        for impl in impls:
            use(impl)
            for _ in range(steps):
                t = time.perf_counter()
                loss = step(x, y)
                times[impl].append(time.perf_counter() - t)
                assert math.isfinite(loss), (impl, loss)
    flops = gpt_flops_per_iteration(cfg.model, shape["vocab"], shape["batch"])
    conf = {**shape, "precision": "32", "device": "cpu", "threads": torch.get_num_threads(), "steps": steps * rounds}
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = shape["batch"] * shape["seq"]
    for impl, t in med.items():
        tag = {**conf, "ema_impl": impl}
        print(json.dumps({"bench": "mega_train", "metric": f"tokens_per_sec_{impl}", "value": round(tokens / t, 1),
                          "unit": "tokens/s", "config": tag}))
        print(json.dumps({"bench": "mega_train", "metric": f"tflops_{impl}", "value": round(flops / t / 1e12, 4),
                          "unit": "TFLOP/s", "config": tag}))
    if "fft" in med:
        for impl in med:
            if impl != "fft":
                print(json.dumps({"bench": "mega_train", "metric": f"speedup_vs_fft_{impl}",
                                  "value": round(med["fft"] / med[impl], 3), "unit": "x", "config": conf}))


if __name__ == "__main__":
    main()

"""Training throughput of our full stack vs. same-shape baselines, measured in one process.

Stacks (identical shape and model FLOPs: pre-LN GPT, learned positions, GELU MLP 4h, tied embeddings, biases,
no dropout; torch fused AdamW in all three; one micro-batch per optimizer step):
  ours     GPTModel from pretrain_gpt.py's task (megatron-core TP layers, SDPA) inside a DeepSpeed engine
           (engine.backward / engine.step, gradient clipping 1.0), precision through DeepSpeed (bf16: bf16
           weights + fp32 master copies).
  nanogpt  a lean plain-PyTorch nanoGPT-style model written here; fp32, or bf16 via torch.autocast; same
           AdamW + clip_grad_norm_.
  hf_gpt2  transformers.GPT2LMHeadModel (SDPA attention) when transformers is installed; same optimizer/precision
           handling as nanogpt.

The three are run round-robin (ours, nanogpt, hf, ours, ...) and each reports the median step time, so drift of
the machine hits all of them alike. FLOPs: model FLOPs per iteration from megatron_ext.models.flops (fwd + bwd =
3x fwd, no recompute; formula in that module's docstring). MFU = achieved FLOP/s / peak, the peak being the best
matmul FLOP/s of this machine measured in the same run, in the same dtype.

Host memory: the process runs with the trainer's CPU allocator setting (``trainer.reuse_host_memory``, see
megatron_ext/training/host_memory.py) for all three stacks alike, so the ratios compare model + engine and do not
depend on what one stack leaves in malloc's heap for the next (``--default-malloc`` leaves glibc as it is;
``page_faults_per_step_<stack>`` shows the effect).

    python bench/bench_train.py            # full shape: 6 layers, hidden 512, 8 heads, seq 512, vocab 8192, mb 4
    python bench/bench_train.py --quick    # smaller shape, under a minute
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_ext  # noqa: E402,F401  (DS_ACCELERATOR=cpu without a GPU)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# ----------------------------------------------------------------------------- nanoGPT-style baseline
class _Block(nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(h)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.ln2 = nn.LayerNorm(h)
        self.fc = nn.Linear(h, 4 * h)
        self.fc2 = nn.Linear(4 * h, h)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(h, dim=2)
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc(self.ln2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab, seq, h, layers, heads):
        super().__init__()
        self.wte = nn.Embedding(vocab, h)
        self.wpe = nn.Embedding(seq, h)
        self.blocks = nn.ModuleList(_Block(h, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(h)
        self.apply(lambda m: nn.init.normal_(m.weight, std=0.02) if isinstance(m, (nn.Linear, nn.Embedding)) else None)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def _plain_step_fn(model, precision):
    # same optimizer kernel as our stack's default (torch fused AdamW), so the comparison is model + engine
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else None

    def step(x, y):
        if ctx is None:
            loss = model(x, y)
        else:
            with ctx():
                loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def build_nanogpt(shape, precision):
    torch.manual_seed(0)
    m = NanoGPT(shape["vocab"], shape["seq"], shape["hidden"], shape["layers"], shape["heads"])
    return _plain_step_fn(m, precision)


def build_hf(shape, precision):
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    cfg = GPT2Config(vocab_size=shape["vocab"], n_positions=shape["seq"], n_embd=shape["hidden"],
                     n_layer=shape["layers"], n_head=shape["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     tie_word_embeddings=True)
    torch.manual_seed(0)
    try:
        m = GPT2LMHeadModel(cfg, attn_implementation="sdpa")
    except TypeError:
        cfg._attn_implementation = "sdpa"
        m = GPT2LMHeadModel(cfg)
    m.train()

    class Wrap(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, y):
            logits = self.inner(input_ids=x).logits
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))

    return _plain_step_fn(Wrap(m), precision)


# ----------------------------------------------------------------------------- our stack
class _StdoutToStderr:
    """DeepSpeed prints op-build notices on stdout (from Python and C++); keep stdout pure JSON lines."""

    def __enter__(self):
        sys.stdout.flush()
        self._saved = os.dup(1)
        os.dup2(2, 1)

    def __exit__(self, *exc):
        sys.stdout.flush()
        os.dup2(self._saved, 1)
        os.close(self._saved)


def build_ours(shape, precision):
    with _StdoutToStderr():
        return _build_ours(shape, precision)


def gpt_engine(shape, precision="32", overrides=()):
    """Our GPTModel of ``shape`` (dropout off, seeded) inside a DeepSpeed engine (AdamW, ZeRO 0, clip 1.0) in this
    process, with the GPT task that computes its loss: (engine, model, cfg, task). ``overrides`` are config keys on
    top (bench_checkpoint.py builds its models here too)."""
    from megatron_ext.config.loader import load_config
    from megatron_ext.parallel.random import model_parallel_manual_seed
    from megatron_ext.parallel.state import initialize_parallel
    from megatron_ext.training.engine import build_ds_config, build_engine
    from megatron_ext.training.gpt_task import GPTTask
    from megatron_ext.models.gpt import GPTModel
    from megatron_ext.training.optim import build_optimizer

    cfg = load_config(overrides=[
        f"model.num_layers={shape['layers']}", f"model.hidden_size={shape['hidden']}",
        f"model.num_attention_heads={shape['heads']}", f"model.seq_length={shape['seq']}",
        f"model.micro_batch_size={shape['batch']}", f"model.global_batch_size={shape['batch']}",
        "model.hidden_dropout=0.0", "model.attention_dropout=0.0", *overrides,
    ])
    initialize_parallel(1, 1, accelerator="cpu")
    torch.manual_seed(0)
    model_parallel_manual_seed(0)
    model = GPTModel(cfg.model, shape["vocab"])
    opt = build_optimizer(model, {"name": "adamw", "lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.01})
    ds = build_ds_config(micro_batch_size=shape["batch"], global_batch_size=shape["batch"], accumulate_grad_batches=1,
                         precision=precision, zero_stage=0, gradient_clip_val=1.0)
    engine, _, _ = build_engine(model, opt, None, ds)
    task = GPTTask(cfg, torch.device("cpu"))  # byte tokenizer; the model keeps the bench vocab
    return engine, model, cfg, task


def _build_ours(shape, precision):
    engine, _, cfg, task = gpt_engine(shape, precision, [
        "model.position_embedding_type=learned_absolute", "model.normalization=layernorm", "model.activation=gelu",
        "model.share_embeddings_and_output_weights=true", "model.bias=true", f"trainer.precision={precision}"])
    mask = torch.ones(shape["batch"], shape["seq"])

    def step(x, y):
        loss, _, _ = task.loss(engine, {"tokens": x, "labels": y, "loss_mask": mask})
        engine.backward(loss)
        engine.step()
        return loss.item()

    return step, cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--precisions", default="32,bf16")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc malloc as it is instead of the trainer's CPU setting (trainer.reuse_host_memory)")
    args = ap.parse_args()
    # The trainer's CPU default, made process-wide here so all three stacks run on the same allocator. With glibc's
    # defaults every large tensor is fresh mmap'd memory faulted in page by page, and how many faults a stack pays
    # depends on what the stack before it left in malloc's heap (ours, run after HF, measured ~0 faults per step,
    # HF ~100k): the ratios would reflect the round-robin order, not the stacks.
    from megatron_ext.training.host_memory import reuse_host_memory

    host_malloc = "default" if args.default_malloc or not reuse_host_memory() else "reuse"
    if args.quick:
        shape = dict(layers=2, hidden=256, heads=4, seq=256, vocab=8192, batch=4)
        steps, rounds = args.steps or 2, args.rounds or 2
    else:
        shape = dict(layers=6, hidden=512, heads=8, seq=512, vocab=8192, batch=4)
        steps, rounds = args.steps or 3, args.rounds or 5
    torch.set_num_threads(os.cpu_count() or 1)

    from megatron_ext.models.flops import gpt_flops_per_iteration
    from megatron_ext.training.throughput import measure_matmul_tflops

    for precision in args.precisions.split(","):
        stacks = {}
        ours, cfg = build_ours(shape, precision)
        stacks["ours"] = ours
        stacks["nanogpt"] = build_nanogpt(shape, precision)
        hf = build_hf(shape, precision)
        if hf is not None:
            stacks["hf_gpt2"] = hf
        flops = gpt_flops_per_iteration(cfg.model, shape["vocab"], shape["batch"])
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g)
        y = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g)
        for fn in stacks.values():  # warm-up (allocator, kernels, DeepSpeed lazy init)
            for _ in range(2):
                fn(x, y)
        times = {k: [] for k in stacks}
        faults = {k: 0 for k in stacks}
        for _ in range(rounds):
            for name, fn in stacks.items():
                for _ in range(steps):
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t = time.perf_counter()
                    loss = fn(x, y)
                    times[name].append(time.perf_counter() - t)
                    faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
                    assert math.isfinite(loss), (name, loss)
        peak = measure_matmul_tflops("cpu", precision, n=2048 if not args.quick else 1024, reps=5)
        conf = {**shape, "precision": precision, "device": "cpu", "threads": torch.get_num_threads(),
                "peak_tflops_measured": round(peak, 4), "steps": steps * rounds, "host_malloc": host_malloc}
        med = {k: statistics.median(v) for k, v in times.items()}
        for name, t in med.items():
            tflops = flops / t / 1e12
            tag = {**conf, "stack": name}
            print(json.dumps({"bench": "train_gpt", "metric": f"tokens_per_sec_{name}", "value": round(shape["batch"] * shape["seq"] / t, 1), "unit": "tokens/s", "config": tag}))
            print(json.dumps({"bench": "train_gpt", "metric": f"tflops_{name}", "value": round(tflops, 4), "unit": "TFLOP/s", "config": tag}))
            print(json.dumps({"bench": "train_gpt", "metric": f"mfu_{name}", "value": round(tflops / peak, 4), "unit": "fraction", "config": tag}))
            print(json.dumps({"bench": "train_gpt", "metric": f"page_faults_per_step_{name}", "value": round(faults[name] / len(times[name])), "unit": "minor faults", "config": tag}))
        for base in [k for k in med if k != "ours"]:
            print(json.dumps({"bench": "train_gpt", "metric": f"speedup_vs_{base}", "value": round(med[base] / med["ours"], 3), "unit": "x", "config": conf}))
        sys.stdout.flush()


if __name__ == "__main__":
    main()

"""Document-masked attention (``model.data.reset_attention_mask``): the packed path vs the explicit mask vs plain
causal attention.

Paths (``megatron_ext.modules.doc_attention``):
  causal   plain causal self-attention over the whole row (documents see each other): the baseline, what a run
           without reset_attention_mask costs (SDPA ``is_causal``, with the CPU split-causal kernel where it applies)
  packed   documents gathered into right-padded batches per power-of-two length class, causal SDPA, scattered back
  mask     the explicit ``[b, 1, s, s]`` boolean mask (same document and causal) built from the segment ids, SDPA
  varlen   (``--device cuda`` only) flash attention over ``cu_seqlens`` (``torch.nn.attention.varlen``)

Data: rows of ``--seqs`` tokens (512, 1024, 2048), each cut into ``--docs`` documents (default 4) at uniformly drawn
cut points (seeded: the same rows for every path).

Two measurements per (seq, path):
  attn   one self-attention kernel call, forward + backward (q, k, v ``[batch, heads, seq, head_dim]`` fp32 with
         gradients; ``out.sum().backward()``), batch 4, 8 heads of 64: tokens/s = batch * seq / time
  train  a full GPT training step (``GPTTask.loss`` on our GPTModel inside a DeepSpeed engine, backward, AdamW step),
         2 layers, hidden 256, 4 heads, vocab 8192, micro-batch 2: tokens/s
Time: the fastest of ``--repeats`` timed runs after ``--warmup`` (other load on the machine only ever slows a run
down), paths round-robin (machine drift hits all alike). ``config.loadavg`` is the 1-minute load average at the
start: figures taken with a load above the core count are only rough.

Lines (stdout and ``--out``, default bench/results/bench_docmask_<device>.jsonl, one JSON object per figure):
  {"bench": "docmask", "metric": "<attn|train>_tokens_per_s_<path>", "value": .., "unit": "tokens/s", "config": ..}
  {"bench": "docmask", "metric": "<attn|train>_speedup_packed_vs_mask", "unit": "x", ...}   packed / mask tokens/s
  {"bench": "docmask", "metric": "<attn|train>_ratio_<path>_vs_causal", "unit": "x", ...}   path / causal tokens/s

    python bench/bench_docmask.py            # seq 512, 1024, 2048 (a few minutes on 2 cores)
    python bench/bench_docmask.py --quick    # seq 512 only, fewer repeats
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_ext  # noqa: E402,F401  (DS_ACCELERATOR=cpu without a GPU)
import torch  # noqa: E402

BENCH = "docmask"


def doc_rows(batch: int, seq: int, docs: int, seed: int) -> torch.Tensor:
    """Segment ids ``[batch, seq]`` (int32): each row cut into ``docs`` documents at uniform random points."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seq - 1, generator=g)[: docs - 1] + 1
        seg = torch.zeros(seq, dtype=torch.int32)
        seg[cuts] = 1
        rows.append(seg.cumsum(0).to(torch.int32))
    return torch.stack(rows)


def _timed(fn, warmup: int, repeats: int, names, sync):
    for name in names:
        for _ in range(warmup):
            fn(name)
    times = {n: [] for n in names}
    for _ in range(repeats):
        for name in names:
            sync()
            t = time.perf_counter()
            fn(name)
            sync()
            times[name].append(time.perf_counter() - t)
    return {n: min(v) for n, v in times.items()}


def bench_attention(seq, seg, paths, device, args):
    from megatron_ext.modules.attention import _sdpa
    from megatron_ext.modules.doc_attention import DocumentMask

    b, nh, hd = seg.shape[0], 8, 64
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(b, seq, nh, hd, generator=g).to(device).transpose(1, 2) for _ in range(3)]
    seg = seg.to(device)

    def run(path):
        q, k, v = (x.detach().requires_grad_(True) for x in base)
        if path == "causal":
            out = _sdpa(q, k, v, None, True, 0.0)
        else:  # the mask / gather indices are built inside, once per call: as once per forward in the model
            out = DocumentMask(seg, path).attend(q, k, v, 0.0, _sdpa)
        out.sum().backward()

    return _timed(run, args.warmup, args.repeats, paths, _sync(device))


def bench_train(seq, paths, device, args):
    from bench_train import gpt_engine

    shape = dict(layers=2, hidden=256, heads=4, seq=seq, vocab=8192, batch=2)
    seg = doc_rows(shape["batch"], seq, args.docs, seed=seq + 1)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(1, shape["vocab"], (shape["batch"], seq), generator=g)
    y = torch.randint(1, shape["vocab"], (shape["batch"], seq), generator=g)
    from megatron_ext.modules.doc_attention import document_position_ids

    batch = {"tokens": x, "labels": y, "loss_mask": torch.ones(shape["batch"], seq), "position_ids":
             document_position_ids(seg), "segment_ids": seg}
    engine, model, cfg, task = gpt_engine(shape, "32")

    def step(path):
        task.reset_attention_mask = path != "causal"
        model.document_attention = "auto" if path == "causal" else path
        b = batch if path != "causal" else {k: v for k, v in batch.items() if k != "segment_ids"}
        loss, _, _ = task.loss(engine, b)
        engine.backward(loss)
        engine.step()

    return _timed(step, max(1, args.warmup), max(1, args.repeats // 2), paths, _sync(torch.device("cpu")))


def _sync(device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seqs", default="512,1024,2048")
    ap.add_argument("--docs", type=int, default=4, help="documents per sequence")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-train", action="store_true", help="attention only (the train step runs on CPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.seqs, args.repeats, args.warmup = "512", 3, 1
    device = torch.device(args.device)
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        f"bench_docmask_{device.type}.jsonl")
    threads = torch.get_num_threads()
    loadavg = round(os.getloadavg()[0], 1)
    lines = []

    def emit(metric, value, unit, config):
        row = {"bench": BENCH, "metric": metric, "value": round(float(value), 4), "unit": unit, "config": config}
        print(json.dumps(row), flush=True)
        lines.append(row)

    attn_paths = ["causal", "packed", "mask"] + (["varlen"] if device.type == "cuda" else [])
    for seq in (int(s) for s in args.seqs.split(",")):
        seg = doc_rows(4, seq, args.docs, seed=seq)
        conf = {"seq": seq, "docs": args.docs, "batch": 4, "heads": 8, "head_dim": 64, "dtype": "fp32",
                "device": device.type, "threads": threads, "repeats": args.repeats, "pass": "fwd_bwd",
                "loadavg": loadavg}
        if device.type == "cuda" and "varlen" in attn_paths:
            attn_paths.remove("varlen")  # fp32 here; varlen needs half precision
        med = bench_attention(seq, seg, attn_paths, device, args)
        tok = {p: 4 * seq / t for p, t in med.items()}
        for p in attn_paths:
            emit(f"attn_tokens_per_s_{p}", tok[p], "tokens/s", conf)
        emit("attn_speedup_packed_vs_mask", tok["packed"] / tok["mask"], "x", conf)
        for p in ("packed", "mask"):
            emit(f"attn_ratio_{p}_vs_causal", tok[p] / tok["causal"], "x", conf)
        if args.no_train or device.type != "cpu":
            continue
        med = bench_train(seq, ["causal", "packed", "mask"], device, args)
        conf = {"seq": seq, "docs": args.docs, "layers": 2, "hidden": 256, "heads": 4, "vocab": 8192, "batch": 2,
                "dtype": "fp32", "device": "cpu", "threads": threads, "repeats": max(1, args.repeats // 2),
                "loadavg": loadavg}
        tok = {p: 2 * seq / t for p, t in med.items()}
        for p in ("causal", "packed", "mask"):
            emit(f"train_tokens_per_s_{p}", tok[p], "tokens/s", conf)
        emit("train_speedup_packed_vs_mask", tok["packed"] / tok["mask"], "x", conf)
        for p in ("packed", "mask"):
            emit(f"train_ratio_{p}_vs_causal", tok[p] / tok["causal"], "x", conf)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        for row in lines:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {out_path}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Generation throughput on CPU: KV-cached vs uncached greedy decoding of a small GPT.

The same ``GPTModel`` (pre-LN, learned positions, GELU MLP 4h, tied embeddings, fp32, eval mode, random init) runs
``megatron_ext.inference.generation.generate`` with ``use_cache=True`` (prefill once, then one token per step
through the per-layer key/value cache) and ``use_cache=False`` (the whole sequence re-run every step), greedy,
no stop token, so both produce exactly ``new_tokens`` tokens per prompt -- and the same tokens (checked, reported
as ``config.same_tokens``). Prompts are random byte ids of ``prompt`` tokens. Each measurement is the median of
``repeats`` runs after a short warm-up run (4 new tokens); tokens/s counts generated tokens only (``batch * new_tokens`` per run,
prefill included in the time).

    python bench/bench_generate.py            # 6 layers, hidden 512, 8 heads, prompt 64, 128 new, batch 1 and 8
    python bench/bench_generate.py --quick    # 2 layers, hidden 128, prompt 16, 32 new: under a minute
    python bench/bench_generate.py --threads 1   # how bench/results/bench_generate_cpu.jsonl was taken (a 2-core
                                                 # machine shared with other jobs: one thread is the stable setting)

One JSON object per line: ``tokens_per_sec_cached``, ``tokens_per_sec_uncached`` and ``speedup_vs_uncached``
per batch size, ``{"bench": "generate", "metric", "value", "unit", "config"}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")

import torch  # noqa: E402

FULL = dict(layers=6, hidden=512, heads=8, prompt=64, new_tokens=128, batches=(1, 8), repeats=2)
QUICK = dict(layers=2, hidden=128, heads=4, prompt=16, new_tokens=32, batches=(1, 8), repeats=3)


def build_lm(shape):
    from megatron_ext.config.schema import ModelConfig
    from megatron_ext.inference.lm import LM
    from megatron_ext.models.gpt import GPTModel
    from megatron_ext.parallel.state import initialize_parallel
    from megatron_ext.tokenizers import build_tokenizer

    initialize_parallel(1, 1, accelerator="cpu")
    tok = build_tokenizer("byte")
    cfg = ModelConfig(num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
                      seq_length=shape["prompt"] + shape["new_tokens"], hidden_dropout=0.0, attention_dropout=0.0)
    return LM(GPTModel(cfg, tok.vocab_size, init_seed=1234).eval(), tok)


def timed(fn, warmup, repeats):
    warmup()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shape, under a minute")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's; one-token decode steps are tiny ops, where "
                         "OpenMP barriers on a busy machine can cost more than the math)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print("bench_generate: error: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    shape = dict(QUICK if args.quick else FULL)
    if args.repeats is not None:
        if args.repeats < 1:
            print("bench_generate: error: --repeats must be >= 1", file=sys.stderr)
            return 2
        shape["repeats"] = args.repeats
    from megatron_ext.inference.generation import generate

    lm = build_lm(shape)
    g = torch.Generator().manual_seed(0)
    for batch in shape["batches"]:
        prompts = torch.randint(0, 256, (batch, shape["prompt"]), generator=g).tolist()
        res = {}
        for mode in ("cached", "uncached"):
            def run(use_cache=(mode == "cached"), new=shape["new_tokens"]):
                return generate(lm, prompts, max_new_tokens=new, greedy=True, stop_tokens=[], use_cache=use_cache,
                                output="tokens")

            res[mode] = timed(run, lambda: run(new=4), shape["repeats"])
        same = res["cached"][1] == res["uncached"][1]
        conf = {"layers": shape["layers"], "hidden": shape["hidden"], "heads": shape["heads"],
                "prompt": shape["prompt"], "new_tokens": shape["new_tokens"], "batch": batch,
                "vocab": lm.model.vocab_size, "precision": "fp32", "device": "cpu",
                "threads": torch.get_num_threads(), "repeats": shape["repeats"], "decoding": "greedy",
                "same_tokens": same}
        tokens = batch * shape["new_tokens"]
        for mode in ("cached", "uncached"):
            print(json.dumps({"bench": "generate", "metric": f"tokens_per_sec_{mode}",
                              "value": round(tokens / res[mode][0], 1), "unit": "tokens/s",
                              "config": dict(conf, seconds=round(res[mode][0], 3))}), flush=True)
        print(json.dumps({"bench": "generate", "metric": "speedup_vs_uncached",
                          "value": round(res["uncached"][0] / res["cached"][0], 2), "unit": "x", "config": conf}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

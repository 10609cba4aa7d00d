#!/usr/bin/env python
"""Throughput of tools/preprocess_data.py vs. sentencepiece's own batch encoder, same run.

Builds a JSONL corpus of >= 40 MB (``--quick``: 8 MB) by repeating the paragraphs of
../shared/data/tinyshakespeare.txt (one paragraph = one document), trains a sentencepiece
unigram model with vocab 8000 (cached under $XDG_CACHE_HOME/megatron_ext/bench_preprocess,
keyed by the corpus hash), then alternately

  ours      runs ``tools/preprocess_data.py --workers 2`` as a subprocess (JSONL -> .bin/.idx);
  baseline  ``SentencePieceProcessor.encode(all_texts)`` -- one batched, multithreaded call on
            texts already in memory: no reading, JSON parsing or writing.

and keeps the best of ``--reps`` runs of each (the machine may be shared). Then the same corpus gzip-compressed
(level 6), as one ``.jsonl.gz`` file and as a directory of 4 ``.jsonl.gz`` shards merged into one output
(``--no-gz`` skips these). Metrics:

  tokens_per_sec       tokens / the tool's own run time (from argument checks to the renamed
                       .idx; includes starting the workers, reading, JSON, tokenizing, writing)
  tokens_per_sec_wall  tokens / subprocess wall time (adds interpreter start and the torch import)
  docs_per_sec, mb_per_sec
  spm_encode_only_tokens_per_sec
  speedup_vs_spm_encode_only = tokens_per_sec / spm_encode_only_tokens_per_sec
  tokens_per_sec_gz               the corpus as one .jsonl.gz (decompressed by the main process, streamed to the
                                  workers)
  tokens_per_sec_gz_4shards_merged  a directory of 4 .jsonl.gz shards -> one merged .bin/.idx (parts, manifest,
                                  fsync, merge included)

``--tokenizer huggingface``: the same with a Hugging Face byte-level BPE (GPT-2 style, ``--vocab`` ids, trained
with the ``tokenizers`` library on the same text and cached the same way; ``tools/preprocess_data.py
--tokenizer-library huggingface``); the baseline is then ``tokenizers``' ``encode_batch_fast(all_texts)`` (its
thread pool: all cores), reported as ``hf_encode_only_tokens_per_sec`` / ``speedup_vs_hf_encode_only``.

    python bench/bench_preprocess.py            # 40 MB
    python bench/bench_preprocess.py --quick    # 8 MB, under a minute
    python bench/bench_preprocess.py --quick --tokenizer huggingface --no-gz
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHAKESPEARE = os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare.txt")
SCRIPT = os.path.join(REPO, "tools", "preprocess_data.py")
BENCH = "preprocess"


def emit(metric, value, unit, config):
    print(json.dumps({"bench": BENCH, "metric": metric, "value": value, "unit": unit,
                      "config": config}), flush=True)


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron_ext", "bench_preprocess")


def paragraphs(text: str):
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def build_jsonl(path: str, paras, target_bytes: int):
    docs, size = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target_bytes:
            for p in paras:
                line = json.dumps({"text": p}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
                docs += 1
    return docs, size


def get_model(corpus_path: str, corpus_hash: str, vocab: int, model_type: str) -> str:
    from megatron_ext.tokenizers import train_sentencepiece

    d = cache_dir()
    os.makedirs(d, exist_ok=True)
    prefix = os.path.join(d, f"spm_{model_type}_{vocab}_{corpus_hash[:12]}")
    if not os.path.isfile(prefix + ".model"):
        tmp = f"{prefix}.tmp{os.getpid()}"
        train_sentencepiece(tmp, vocab, input_files=[corpus_path], model_type=model_type,
                            character_coverage=1.0)
        for ext in (".model", ".vocab"):
            os.replace(tmp + ext, prefix + ext)
    return prefix + ".model"


def get_hf_model(corpus_path: str, corpus_hash: str, vocab: int) -> str:
    """A GPT-2 style byte-level BPE directory (tokenizer.json + tokenizer_config.json), trained once and cached."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = os.path.join(cache_dir(), f"hf_bpe_{vocab}_{corpus_hash[:12]}")
    if not os.path.isfile(os.path.join(d, "tokenizer_config.json")):
        tmp = f"{d}.tmp{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train([corpus_path], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
        tok.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>",
                       "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
    return d


def run_hf_baseline(texts, model: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    t0 = time.perf_counter()
    enc = tok.encode_batch_fast(texts)  # batch call, the library's thread pool (all cores)
    dt = time.perf_counter() - t0
    return sum(len(e.ids) for e in enc), dt


LIBRARY = "sentencepiece"


def run_ours(jsonl: str, model: str, workers: int, work: str, env):
    out = os.path.join(work, "out", "bench")
    stats_path = os.path.join(work, "stats.json")
    if os.path.exists(stats_path):
        os.remove(stats_path)
    cmd = [sys.executable, SCRIPT, "--input", jsonl, "--output-prefix", out,
           "--tokenizer-library", LIBRARY, "--tokenizer-model", model,
           "--workers", str(workers), "--no-progress", "--stats-json", stats_path]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench_preprocess: preprocess_data.py failed:\n{proc.stderr[-2000:]}")
    with open(stats_path, encoding="utf-8") as f:
        stats = json.load(f)
    shutil.rmtree(os.path.join(work, "out"), ignore_errors=True)
    return stats, wall


def run_baseline(texts, model: str):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    t0 = time.perf_counter()
    ids = sp.encode(texts, out_type=int)  # batch call, num_threads=-1: all cores
    dt = time.perf_counter() - t0
    return sum(map(len, ids)), dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 MB corpus, 1 rep (under a minute)")
    ap.add_argument("--mb", type=float, default=None, help="corpus size in MB (default 40; quick 8)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None, help="runs of each side (default 3; quick 1)")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--model-type", default="unigram", choices=("unigram", "bpe"))
    ap.add_argument("--no-gz", action="store_true", help="skip the .gz figures")
    ap.add_argument("--tokenizer", default="sentencepiece", choices=("sentencepiece", "huggingface"),
                    help="huggingface: a byte-level BPE tokenizer.json read with the tokenizers library")
    args = ap.parse_args()
    global LIBRARY
    LIBRARY = args.tokenizer
    hf = args.tokenizer == "huggingface"
    env = dict(os.environ)  # the user's environment, before importing megatron_ext changes it
    if not os.path.isfile(SHAKESPEARE):
        print(f"bench_preprocess: {SHAKESPEARE} not found (../shared is missing); nothing to "
              f"measure, skipping", file=sys.stderr)
        return 0
    mb = args.mb if args.mb is not None else (8.0 if args.quick else 40.0)
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)

    with open(SHAKESPEARE, "rb") as f:
        raw = f.read()
    corpus_hash = hashlib.sha256(raw).hexdigest()
    paras = paragraphs(raw.decode("utf-8"))
    model = (get_hf_model(SHAKESPEARE, corpus_hash, args.vocab) if hf
             else get_model(SHAKESPEARE, corpus_hash, args.vocab, args.model_type))

    work = tempfile.mkdtemp(prefix="bench_preprocess_")
    try:
        jsonl = os.path.join(work, "corpus.jsonl")
        n_docs, n_bytes = build_jsonl(jsonl, paras, int(mb * 1e6))
        with open(jsonl, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]

        best_ours, best_wall, best_base = None, None, None
        runs = []
        for _ in range(reps):
            stats, wall = run_ours(jsonl, model, args.workers, work, env)
            if best_ours is None or stats["seconds"] < best_ours["seconds"]:
                best_ours = stats
            best_wall = wall if best_wall is None else min(best_wall, wall)
            base_tokens, base_dt = (run_hf_baseline if hf else run_baseline)(texts, model)
            best_base = base_dt if best_base is None else min(best_base, base_dt)
            runs.append([round(stats["seconds"], 3), round(wall, 3), round(base_dt, 3)])
        gz_runs = {}
        if not args.no_gz:
            import gzip

            gz_one = os.path.join(work, "corpus.jsonl.gz")
            with open(jsonl, "rb") as f:
                data = f.read()
            with gzip.open(gz_one, "wb", compresslevel=6) as f:
                f.write(data)
            shard_dir = os.path.join(work, "shards")
            os.makedirs(shard_dir)
            lines = data.splitlines(keepends=True)
            per = (len(lines) + 3) // 4
            for i in range(4):
                with gzip.open(os.path.join(shard_dir, f"part-{i:02d}.jsonl.gz"), "wb", compresslevel=6) as f:
                    f.write(b"".join(lines[i * per:(i + 1) * per]))
            del data, lines
            for label, inp in (("gz", gz_one), ("gz_4shards_merged", shard_dir)):
                best = None
                for _ in range(reps):
                    stats, _wall = run_ours(inp, model, args.workers, work, env)
                    if stats["tokens"] != best_ours["tokens"]:
                        raise SystemExit(f"bench_preprocess: {label} gave {stats['tokens']} tokens, the plain "
                                         f"file {best_ours['tokens']}")
                    best = stats if best is None or stats["seconds"] < best["seconds"] else best
                gz_runs[label] = (best, os.path.getsize(gz_one) if label == "gz" else sum(
                    os.path.getsize(os.path.join(shard_dir, n)) for n in os.listdir(shard_dir)))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    tokens = best_ours["tokens"]
    config = {
        "input": "tinyshakespeare paragraphs repeated, JSONL",
        "input_mb": round(n_bytes / 1e6, 2),
        "documents": n_docs,
        "tokens": tokens,
        "baseline_tokens": base_tokens,
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "tokenizer": (f"huggingface byte-level BPE vocab {args.vocab}" if hf
                      else f"sentencepiece {args.model_type} vocab {args.vocab}"),
        "reps": reps,
        "best_seconds": round(best_ours["seconds"], 3),
        "best_wall_seconds": round(best_wall, 3),
        "baseline_seconds": round(best_base, 3),
        "runs_seconds_wall_baseline": runs,
    }
    ours = tokens / best_ours["seconds"]
    base = base_tokens / best_base
    emit("tokens_per_sec", ours, "tokens/s", config)
    emit("tokens_per_sec_wall", tokens / best_wall, "tokens/s", config)
    emit("docs_per_sec", n_docs / best_ours["seconds"], "docs/s", config)
    emit("mb_per_sec", n_bytes / 1e6 / best_ours["seconds"], "MB/s", config)
    base_name = "hf" if hf else "spm"
    emit(f"{base_name}_encode_only_tokens_per_sec", base, "tokens/s", config)
    emit(f"speedup_vs_{base_name}_encode_only", ours / base, "x", config)
    for label, (stats, gz_bytes) in gz_runs.items():
        emit(f"tokens_per_sec_{label}", stats["tokens"] / stats["seconds"], "tokens/s",
             dict(config, best_seconds=round(stats["seconds"], 3), gz_mb=round(gz_bytes / 1e6, 2),
                  input=f"the same JSONL, gzip level 6, {'one file' if label == 'gz' else '4 shards, merged output'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

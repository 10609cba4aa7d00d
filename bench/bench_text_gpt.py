"""GPT samples read on the fly from raw text / JSONL (``model.data.data_impl=text_mmap|jsonl``) against the same
samples from the preprocessed ``.bin/.idx`` (``data_impl=mmap``): when does preprocessing pay?

    python bench/bench_text_gpt.py [--quick] [--corpus FILE] [--out bench/results/bench_text_gpt_cpu.jsonl]

Corpus: ``../shared/data/tinyshakespeare.txt`` (else Python's help topics), as lines (short documents, ~34 bytes)
and as long documents (100 lines joined, ~3.4 KB), each as a text file and as JSONL. Tokenizers: byte, and a
sentencepiece unigram model (vocab 2000) trained on the corpus first. For each combination:

* ``read_tokens_per_s``: tokens per second of ``dataset[i]`` over the first samples of the (shuffled) train split,
  one process, ``seq_length`` 512 (what one DataLoader worker delivers), the fastest of ``--repeats`` passes;
* ``first_open_s``: building the datasets the first time (newline index, document scan with token counts,
  sample indices) for text/JSONL; for mmap, ``preprocess_s`` (tools/preprocess_data.py, 1 worker, in process)
  plus the first build;
* ``reopen_s``: building them again (every cache hit).

One JSON line per figure, printed and appended to ``--out``.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare.txt")


def corpus_lines(path):
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return [line for line in f.read().split("\n") if line.strip()]
    from pydoc_data.topics import topics

    return [line for k in sorted(topics) for line in topics[k].split("\n") if line.strip()]


def write_files(d, name, docs):
    txt, jsonl = os.path.join(d, name + ".txt"), os.path.join(d, name + ".jsonl")
    with open(txt, "w", encoding="utf-8") as f:
        f.write("\n".join(docs) + "\n")
    with open(jsonl, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    return {"text_mmap": txt, "jsonl": jsonl}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer samples")
    ap.add_argument("--corpus", default=SHARED)
    ap.add_argument("--seq-length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="read passes; the fastest counts")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "bench_text_gpt_cpu.jsonl"))
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from omegaconf import OmegaConf

    from megatron_ext.cli import preprocess_data as pp
    from megatron_ext.config.schema import DataConfig
    from megatron_ext.data.gpt_data import build_gpt_datasets
    from megatron_ext.data.gpt_text import build_gpt_text_datasets
    from megatron_ext.tokenizers import build_tokenizer, train_sentencepiece

    n_samples = 300 if a.quick else 2000
    lines = corpus_lines(a.corpus)
    work = tempfile.mkdtemp(prefix="bench_text_gpt_")
    os.environ["XDG_CACHE_HOME"] = os.path.join(work, "xdg")
    out_f = open(a.out, "w") if a.out else None  # one run per results file

    def emit(metric, value, unit, **config):
        row = {"bench": "text_gpt", "metric": metric, "value": round(float(value), 3), "unit": unit,
               "config": {"device": "cpu", "seq_length": a.seq_length, **config}}
        line = json.dumps(row)
        print(line, flush=True)
        if out_f:
            out_f.write(line + "\n")
            out_f.flush()

    try:
        spm = train_sentencepiece(os.path.join(work, "spm"), 2000, sentences=lines, model_type="unigram",
                                  character_coverage=1.0)
        corpora = {"lines": lines, "long_docs": [" ".join(lines[i:i + 100]) for i in range(0, len(lines), 100)]}
        for kind, docs in corpora.items():
            files = write_files(work, kind, docs)
            for library, model in (("byte", None), ("sentencepiece", spm)):
                tok = build_tokenizer(library, model)
                sizes = (n_samples, 0, 0)
                results = {}
                for impl in ("mmap", "text_mmap", "jsonl"):
                    cache = os.path.join(work, f"cache-{kind}-{library}-{impl}")
                    cfg_kw = dict(splits_string="1,0,0", index_mapping_dir=cache)
                    t0 = time.perf_counter()
                    if impl == "mmap":
                        prefix = os.path.join(work, f"pre-{kind}-{library}")
                        args = ["--input", files["text_mmap"], "--output-prefix", prefix, "--append-eod", "--workers",
                                "1", "--tokenizer-library", library, "--no-progress", "--overwrite"]
                        assert pp.main(args + (["--tokenizer-model", model] if model else [])) == 0
                        t_pre = time.perf_counter() - t0
                        cfg = OmegaConf.structured(DataConfig(data_prefix=[prefix + "_text_document"], **cfg_kw))

                        def build():
                            return build_gpt_datasets(cfg, tok, a.seq_length, sizes, 1)[0]
                    else:
                        cfg = OmegaConf.structured(DataConfig(data_prefix=[files[impl]], data_impl=impl, **cfg_kw))

                        def build():
                            return build_gpt_text_datasets(cfg, tok, a.seq_length, sizes, 1)[0]
                    ds = build()
                    t_first = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    ds = build()
                    t_reopen = time.perf_counter() - t0
                    n = min(n_samples, len(ds))
                    ds[0]
                    best = float("inf")
                    for _ in range(a.repeats):  # the best of the repeats: the machine may be shared
                        t0 = time.perf_counter()
                        for i in range(n):
                            ds[i]
                        best = min(best, time.perf_counter() - t0)
                    tps = n * a.seq_length / best
                    results[impl] = tps
                    conf = dict(impl=impl, tokenizer=library, documents=kind, samples=n,
                                corpus_mb=round(os.path.getsize(files["text_mmap"]) / 2 ** 20, 2))
                    emit("read_tokens_per_s", tps, "tokens/s", **conf)
                    if impl == "mmap":
                        emit("preprocess_s", t_pre, "s", **conf)
                    emit("first_open_s", t_first, "s", **conf)
                    emit("reopen_s", t_reopen, "s", **conf)
                for impl in ("text_mmap", "jsonl"):
                    emit("read_speed_vs_mmap", results[impl] / results["mmap"], "x", impl=impl, tokenizer=library,
                         documents=kind)
    finally:
        if out_f:
            out_f.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

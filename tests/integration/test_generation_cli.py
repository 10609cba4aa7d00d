"""Generation across processes and through tools/generate.py: TP2 cached greedy equals TP1 (torchrun); the CLI writes
one JSON line per prompt."""
import importlib.util
import json
import os
import subprocess

import pytest
import torch

import helpers
from helpers import REPO, launch_cmd, multiprocess_env, perturb, run_main_in_process
from megatron_ext.inference.generation import generate
from megatron_ext.inference.lm import LM


def _perturb(model, seed=5, scale=0.3):
    return perturb(model, seed, scale).eval()


@pytest.mark.skipif(importlib.util.find_spec("torch.distributed.run") is None, reason="torchrun not available")
def test_tp2_cached_greedy_equals_tp1(tmp_path):
    out = tmp_path / "gen_tp.json"
    worker = os.path.join(REPO, "tests", "workers", "generation_tp_worker.py")
    proc = subprocess.run(launch_cmd(2, [worker, str(out)]), cwd=REPO, env=multiprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for name, r in res.items():
        assert r["tp2_cached"] == r["tp1"], (name, r)
        assert r["tp2_uncached"] == r["tp1"], (name, r)
        assert r["ranks_agree"], (name, r)
        assert r["max_logit_diff"] < 1e-4, (name, r)
        flat = [t for seq in r["tp1"] for t in seq]
        assert len(flat) >= 60 and len(set(flat)) > 3, (name, r)


def _cli(args, **kw):
    return subprocess.run([helpers.PYTHON, os.path.join(REPO, "tools", "generate.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=multiprocess_env(), **kw)


def _has_archive() -> bool:
    try:
        from megatron_ext.checkpoint import archive, loader
    except ImportError:
        return False
    return hasattr(loader, "load_model") and hasattr(archive, "save_to")


@pytest.mark.skipif(not _has_archive(), reason="megatron_ext.checkpoint (LM.restore_from) not available")
def test_cli_generates_one_json_line_per_prompt(tmp_path, capsys):
    from megatron_ext.config.loader import load_config

    cfg = load_config(overrides=["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                                 "model.seq_length=64", "model.hidden_dropout=0", "model.attention_dropout=0"])
    from megatron_ext.training.gpt_task import GPTTask

    task = GPTTask(cfg, torch.device("cpu"))
    lm = LM(_perturb(task.build_model()), task.tokenizer, cfg)
    path = lm.save_to(str(tmp_path / "m.mext"))
    inp = tmp_path / "prompts.txt"
    inp.write_text("from a file\n\n  \nsecond line\n", encoding="utf-8")
    r = _cli(["--model", path, "--prompt", "hello", "--input", str(inp), "--greedy", "--max-new-tokens", "12",
              "--no-stop"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["prompt"] for row in rows] == ["hello", "from a file", "second line"]
    expect = generate(lm, ["hello", "from a file", "second line"], greedy=True, max_new_tokens=12, stop_tokens=[],
                      output="both")
    assert [row["tokens"] for row in rows] == [e["tokens"] for e in expect]
    assert all(row["finish_reason"] == "length" and row["text"] == lm.decode(row["tokens"]) for row in rows)
    # the error paths through the same main in this process
    from megatron_ext.cli.generate import main as generate_main

    def _cli_here(args):
        return run_main_in_process(generate_main, args, capsys)

    r = _cli_here(["--model", path, "--prompt", "x", "--top-k", "3", "--top-p", "0.5"])
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("generate: error:") and "top_k" in err[0] and "top_p" in err[0]
    r = _cli_here(["--model", str(tmp_path / "missing.mext"), "--prompt", "x"])
    assert r.returncode == 2 and "generate: error:" in r.stderr and "missing.mext" in r.stderr
    r = _cli_here(["--model", path])
    assert r.returncode == 2 and "no prompts" in r.stderr
    r = _cli_here(["--model", path, "--input", str(tmp_path / "nope.txt")])
    assert r.returncode == 2 and "nope.txt" in r.stderr

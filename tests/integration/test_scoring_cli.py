"""tools/evaluate.py: the command line (one subprocess; its other paths through the same main in-process)."""
import json

import pytest
import torch

from helpers import perturb, run_main_in_process, run_script
from megatron_ext.inference.lm import LM
from megatron_ext.parallel.state import initialize_parallel


@pytest.fixture(autouse=True, scope="module")
def _tp1():
    initialize_parallel(1, 1, accelerator="cpu")
    yield


# ------------------------------------------------------------------------------------------------ CLI
def _archive(tmp_path):
    from megatron_ext.config.loader import load_config
    from megatron_ext.training.gpt_task import GPTTask

    cfg = load_config(overrides=["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=4",
                                 "model.seq_length=16", "model.hidden_dropout=0", "model.attention_dropout=0"])
    task = GPTTask(cfg, torch.device("cpu"))
    model = perturb(task.build_model())
    lm = LM(model.eval(), task.tokenizer, cfg)
    path = str(tmp_path / "tiny.mext")
    lm.save_to(path)
    return lm, path


def test_evaluate_cli(tmp_path, run_env, capsys):
    lm, path = _archive(tmp_path)
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n\nsecond line, longer than sixteen tokens for the window\n")
    out_json = tmp_path / "scores.json"
    r = run_script(["tools/evaluate.py", "--model", path, "--input", str(corpus), "--per-token", "--before-exp",
                    "--batch-size", "2", "--output", str(out_json)], run_env)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = json.loads(r.stdout.strip().splitlines()[-1])
    assert json.loads(out_json.read_text()) == printed
    ref = lm.perplexities(str(corpus), per_token=True, before_exp=True)
    assert printed["family"] == "gpt" and printed["metric"] == "cross_entropy"
    assert printed["total_tokens"] == ref[3]
    assert printed["mean"] == pytest.approx(ref[0], rel=1e-5) and printed["max"] == pytest.approx(ref[1], rel=1e-5)
    assert printed["min"] == pytest.approx(ref[2], rel=1e-5)
    torch.testing.assert_close(torch.tensor(printed["per_token"]), ref[4], rtol=1e-5, atol=1e-5)

    # the other paths through the same main in this process
    from megatron_ext.cli.evaluate import main as evaluate_main

    r = run_main_in_process(evaluate_main, ["--model", path, "--text", "hello", "--text", "hi there"], capsys)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    ref = lm.perplexities(["hello", "hi there"])
    assert res["metric"] == "perplexity" and res["num_texts"] == 2 and "per_token" not in res
    assert res["mean"] == pytest.approx(ref[0], rel=1e-5) and res["total_tokens"] == ref[3] == 11

    for args, msg in [
        (["--model", str(tmp_path / "nope.mext"), "--text", "a"], "--model: '"),
        (["--model", path, "--input", str(tmp_path / "missing.txt")], "--input: '"),
        (["--model", path, "--text", "ab", "--batch-size", "0"], "--batch-size: expected an integer >= 1, got 0"),
        (["--model", path, "--text", "a"], "every sequence has fewer than 2 tokens"),
    ]:
        r = run_main_in_process(evaluate_main, args, capsys)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = [ln for ln in r.stderr.strip().splitlines() if "Warning" not in ln and "warnings.warn" not in ln]
        assert lines[-1].startswith("evaluate: error: ") and msg in lines[-1], r.stderr

"""Hugging Face import into a training layout: tools/convert_from_hf.py (its main, here; it starts 2 processes) writes
a TP2 checkpoint of a tiny random Llama; it holds exactly the imported weights, and a run at another layout (one
process) continues pretraining from it with model.ckpt_path=<run dir>."""
import json
import os

import pytest
import torch

from helpers import TINY_GPT, fit_in_process, run_main_in_process

transformers = pytest.importorskip("transformers")


def test_import_to_tp2_checkpoint_and_continue_at_tp1(tmp_path, in_process, capsys):
    from megatron_ext.checkpoint.loader import read_weights
    from megatron_ext.cli.convert_from_hf import main
    from megatron_ext.inference.hf_import import import_from_hf

    cfg = transformers.LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "hf"))
    run = tmp_path / "exp" / "imported" / "tp2"
    r = run_main_in_process(main, ["--input", str(tmp_path / "hf"), "--output", str(run), "--target-tp", "2",
                                   "--tokenizer-library", "byte"], capsys)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"a tp 2 x pp 1 checkpoint in {run}" in r.stdout
    meta = json.loads((run / "checkpoints" / "step_0000000" / "meta.json").read_text())
    assert (meta["tp"], meta["pp"], meta["step"]) == (2, 1, 0)
    want = import_from_hf(str(tmp_path / "hf"))["state_dict"]
    got = read_weights(str(run))["state_dict"]
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    # the printed overrides, at TP1 (another layout than the checkpoint's): weights only, trains 2 steps
    line = r.stdout.strip().splitlines()[-1].split("pretrain_gpt.py ", 1)[1].split()
    keep = [o for o in TINY_GPT if not o.startswith(("model.num_layers", "model.hidden_size",
                                                     "model.num_attention_heads"))]
    res = fit_in_process(line + keep + [f"exp_manager.exp_dir={tmp_path / 'exp2'}", "trainer.max_steps=2",
                                        "trainer.val_check_interval=2"])
    metrics = [json.loads(x) for x in open(os.path.join(res["run_dir"], "metrics.jsonl"))]
    assert len([m for m in metrics if "train/loss" in m]) == 2

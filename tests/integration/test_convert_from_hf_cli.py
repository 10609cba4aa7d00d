"""Continued pretraining from a Hugging Face checkpoint, end to end (issue 20's acceptance run): a tiny random Llama
with grouped-query attention (8 heads, 2 key/value heads, untied) and a Llama-style tokenizer trained on the corpus
(tinyshakespeare when ../shared is there) are imported with tools/convert_from_hf.py into a .mext archive; the corpus
is preprocessed with that tokenizer (--tokenizer-library huggingface); pretrain_gpt.py continues pretraining from
the archive at TP2 on 2 processes for 20 steps with the printed overrides, and the loss falls; tools/convert_to_hf.py
exports the run back and transformers loads it, with a lower loss on the corpus than the imported model."""
import json
import os

import pytest
import torch

from helpers import make_hf_tokenizer, run_main_in_process, run_script, shakespeare_lines

transformers = pytest.importorskip("transformers")


def _train_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def _lm_loss(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_imported_llama_continues_pretraining_at_tp2_and_exports_back(tmp_path, run_env, capsys, monkeypatch):
    from megatron_ext.cli import convert_from_hf, convert_to_hf
    from megatron_ext.cli import preprocess_data as pp
    from megatron_ext.tokenizers import build_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf, lines = tmp_path / "hf", shakespeare_lines(4000)
    make_hf_tokenizer(str(hf), "llama", lines=lines)
    vocab = build_tokenizer("huggingface", str(hf)).vocab_size
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
    torch.manual_seed(0)
    imported = transformers.LlamaForCausalLM(cfg).eval()
    imported.save_pretrained(str(hf))

    mext = tmp_path / "llama.mext"
    r = run_main_in_process(convert_from_hf.main, ["--input", str(hf), "--output", str(mext)], capsys)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    overrides = r.stdout.strip().splitlines()[-1].split("pretrain_gpt.py ", 1)[1].split()
    assert "model.num_query_groups=2" in overrides and "model.tokenizer.library=huggingface" in overrides

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = run_main_in_process(pp.main, ["--input", str(corpus), "--output-prefix", str(tmp_path / "shk"),
                                      "--tokenizer-library", "huggingface", "--tokenizer-model", str(hf),
                                      "--append-eod", "--workers", "1", "--no-progress"], capsys)
    assert r.returncode == 0, r.stderr[-2000:]

    run = run_script(["pretrain_gpt.py", *overrides, f"model.ckpt_path={mext}", "trainer.devices=2",
                      "model.tensor_model_parallel_size=2", f"model.data.data_prefix=[{tmp_path / 'shk_text_document'}]",
                      "model.seq_length=64", "model.micro_batch_size=4", "model.global_batch_size=8",
                      "trainer.max_steps=20", "trainer.val_check_interval=20", "trainer.limit_val_batches=1",
                      "trainer.log_every_n_steps=1", "model.optim.lr=3e-3", "model.optim.sched.warmup_ratio=0.1",
                      f"exp_manager.exp_dir={tmp_path / 'exp'}", "exp_manager.version=tp2",
                      "exp_manager.create_tensorboard_logger=false",
                      "exp_manager.checkpoint_callback_params.save_layout_free=false"], run_env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "world 2 = tp 2 x pp 1 x dp 1" in run.stdout + run.stderr
    run_dir = tmp_path / "exp" / "megatron_gpt" / "tp2"
    losses = _train_losses(run_dir)
    assert sorted(losses) == list(range(1, 21))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (18, 19, 20)) / 3
    assert last < first - 0.5, losses  # starts near ln(vocab) from the random Llama

    out = tmp_path / "hf_out"
    r = run_main_in_process(convert_to_hf.main, ["--input", str(run_dir), "--output", str(out)], capsys)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    exported, info = transformers.LlamaForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert exported.config.num_key_value_heads == 2
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor([tok(" ".join(lines[:60]))["input_ids"][:64]])
    assert _lm_loss(exported.eval(), ids) < _lm_loss(imported, ids) - 0.5  # the export holds the trained weights

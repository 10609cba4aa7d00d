"""pretrain_bart.py end to end: the seed-000 quick-start command (without its hiddens lines) on CPU with 2
self-launched processes, bf16, a sentencepiece model from tools/train_tokenizer.py and a text_mmap data file."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA, run_script


def _text_file(d):
    """Paragraph-per-line text: tinyshakespeare if ../shared is there, else Python's help topics."""
    if os.path.isfile(SHARED_DATA):
        text = open(SHARED_DATA, encoding="utf-8").read()
        docs = [" ".join(p.split("\n")) for p in text.split("\n\n") if p.strip()]
    else:
        from pydoc_data.topics import topics

        docs = [" ".join(l.split()) for k in sorted(topics) for l in topics[k].split("\n\n") if l.strip()]
    path = d / "wiki.txt"
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("bart_data")
    txt = _text_file(d)
    p = subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input", str(txt), "--model-prefix",
                        str(d / "spm"), "--vocab-size", "1000"], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return {"txt": str(txt), "spm": str(d / "spm.model")}


def seed_command(exp_dir, data):
    """Seed 000's quick start, minus the five ++model.hiddens lines; paths changed, accelerator cpu, bf16."""
    return [
        "pretrain_bart.py",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=10",
        "trainer.limit_val_batches=2",
        "trainer.accumulate_grad_batches=1",
        "trainer.max_steps=10",
        "trainer.precision=bf16",
        "trainer.gradient_clip_val=1.0",
        f"exp_manager.exp_dir={exp_dir}",
        "model.micro_batch_size=2",
        "model.global_batch_size=4",
        "model.seq_length=128",
        "model.encoder.num_layers=4",
        "model.encoder.hidden_size=64",
        "model.encoder.arch=perceiver",
        "model.encoder.num_attention_heads=8",
        "model.decoder.num_layers=4",
        "model.decoder.hidden_size=64",
        "model.decoder.num_attention_heads=8",
        "model.data.data_impl=text_mmap",
        f"model.data.data_prefix=[1.0,{data['txt']}]",
        "model.data.splits_string='\"800,100,100\"'",
        "model.data.whole_word_masking=False",
        "model.tokenizer.library=sentencepiece",
        f"model.tokenizer.model={data['spm']}",
    ]


def test_seed_quickstart_without_hiddens(tmp_path, data, run_env):
    exp = tmp_path / "megatron_mim"
    p = run_script(seed_command(exp, data), run_env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    (run,) = list((exp / "megatron_bart").iterdir())
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 11))
    assert all(0.0 <= r["train/accuracy"] <= 1.0 for r in train)
    (val,) = [r for r in rows if "val/loss" in r]
    assert val["step"] == 10 and val["val/loss"] > 0 and 0.0 <= val["val/accuracy"] <= 1.0
    assert (run / "checkpoints" / "step_0000010" / "meta.json").is_file()
    assert (run / "config.yaml").is_file()


def test_fp16_on_cpu_suggests_bf16(tmp_path, data, run_env):
    cmd = seed_command(tmp_path, data)
    cmd[cmd.index("trainer.precision=bf16")] = "trainer.precision=16"
    p = run_script(cmd, run_env, timeout=300)
    assert p.returncode == 2
    assert "bf16" in p.stderr.strip().splitlines()[-1]


def test_pipeline_is_refused_with_message(tmp_path, run_env):
    p = run_script(["pretrain_bart.py", "trainer.devices=2", "model.pipeline_model_parallel_size=2",
                    f"exp_manager.exp_dir={tmp_path}"], run_env, timeout=300)
    assert p.returncode == 2
    assert "does not support pipeline parallelism" in p.stderr.strip().splitlines()[-1]


def test_unknown_key_named(tmp_path, run_env):
    p = run_script(["pretrain_bart.py", "model.encoder.hiden_size=64", f"exp_manager.exp_dir={tmp_path}"],
                   run_env, timeout=300)
    assert p.returncode != 0 and "hiden_size" in p.stderr


@pytest.mark.parametrize("arch", ["transformer", "perceiver"])
def test_tp2_matches_tp1_through_the_trainer(tmp_path, run_env, arch):
    """Same tolerance as GPT's layouts: step-1 loss rel. 1e-4, step-10 loss rel. 1e-3 (built-in corpus, fp32)."""
    base = ["pretrain_bart.py", "trainer.max_steps=10", "trainer.log_every_n_steps=1", "trainer.val_check_interval=0",
            "exp_manager.create_checkpoint_callback=false", "exp_manager.create_tensorboard_logger=false",
            "model.micro_batch_size=2", "model.global_batch_size=4", "model.seq_length=64",
            f"model.encoder.arch={arch}", "model.encoder.hidden_steps=8",
            "model.encoder.hidden_dropout=0", "model.encoder.attention_dropout=0",
            "model.decoder.hidden_dropout=0", "model.decoder.attention_dropout=0", "exp_manager.version=v"]
    losses = {}
    for tp in (1, 2):
        exp = tmp_path / f"tp{tp}"
        p = run_script(base + [f"exp_manager.exp_dir={exp}", f"trainer.devices={tp}",
                               f"model.tensor_model_parallel_size={tp}"], run_env, timeout=600)
        assert p.returncode == 0, p.stderr[-4000:]
        rows = [json.loads(l) for l in (exp / "megatron_bart" / "v" / "metrics.jsonl").read_text().splitlines()]
        losses[tp] = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert abs(losses[2][1] - losses[1][1]) / losses[1][1] < 1e-4, (losses[1][1], losses[2][1])
    assert abs(losses[2][10] - losses[1][10]) / losses[1][10] < 1e-3, (losses[1][10], losses[2][10])
    assert losses[1][10] < losses[1][1] - 0.1

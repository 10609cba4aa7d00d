"""pretrain_bart.py end to end: the seed-000 quick-start command (without its hiddens lines) on CPU with 2
self-launched processes, bf16, a sentencepiece model from tools/train_tokenizer.py and a text_mmap data file."""
import json
import math
import os
import subprocess

import pytest

import helpers
from helpers import REPO, SHARED_DATA, fit_in_process, run_script


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
    p = subprocess.run([helpers.PYTHON, "tools/train_tokenizer.py", "--input", str(txt), "--model-prefix",
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
def test_tp2_matches_tp1_through_the_trainer(tmp_path, run_env, arch, in_process):
    """Same tolerance as GPT's layouts: step-1 loss rel. 1e-4, step-10 loss rel. 1e-3 (built-in corpus, fp32). The
    Perceiver TP2 run keeps its checkpoint: the latent tools read it (consolidated at TP1 in the tool's process)."""
    keep = arch == "perceiver"
    base = ["pretrain_bart.py", "trainer.max_steps=10", "trainer.log_every_n_steps=1", "trainer.val_check_interval=0",
            f"exp_manager.create_checkpoint_callback={str(keep).lower()}", "exp_manager.create_tensorboard_logger=false",
            "model.micro_batch_size=2", "model.global_batch_size=4", "model.seq_length=64",
            f"model.encoder.arch={arch}", "model.encoder.hidden_steps=8",
            "model.encoder.hidden_dropout=0", "model.encoder.attention_dropout=0",
            "model.decoder.hidden_dropout=0", "model.decoder.attention_dropout=0", "exp_manager.version=v"]
    losses = {}
    for tp in (1, 2):  # TP1 in this process, TP2 through the CLI (self-launched workers)
        exp = tmp_path / f"tp{tp}"
        over = [f"exp_manager.exp_dir={exp}", f"trainer.devices={tp}", f"model.tensor_model_parallel_size={tp}"]
        if tp == 1:
            fit_in_process(base[1:] + over, bart=True)
        else:
            p = run_script(base + over, run_env, timeout=600)
            assert p.returncode == 0, p.stderr[-4000:]
        rows = [json.loads(l) for l in (exp / "megatron_bart" / "v" / "metrics.jsonl").read_text().splitlines()]
        losses[tp] = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert abs(losses[2][1] - losses[1][1]) / losses[1][1] < 1e-4, (losses[1][1], losses[2][1])
    assert abs(losses[2][10] - losses[1][10]) / losses[1][10] < 1e-3, (losses[1][10], losses[2][10])
    assert losses[1][10] < losses[1][1] - 0.1
    if keep:  # a TP2 checkpoint's latents: encoder output [hidden_steps, hidden]
        run = tmp_path / "tp2" / "megatron_bart" / "v"
        p = run_script(["tools/latents.py", "encode", "--ckpt", str(run), "--text", "To be or not"], run_env,
                       timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        (line,) = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
        assert line["shape"][0] == 8 and math.isfinite(line["norm"]) and line["norm"] > 0


HIDDENS_LINES = [
    "++model.hiddens.enc_output_name=z",
    "++model.hiddens.transform.q_z_given_x.cls_name=cond_gaussian",
    "++model.hiddens.transform.q_z_given_x.hidden_size=64",
    "++model.hiddens.loss.mim.cls_name=a_mim",
    "++model.hiddens.loss.mim.loss_weight=1.0",
]


def test_seed_quickstart_with_hiddens_mim(tmp_path, data, run_env):
    """The full seed-000 command (all five ++model.hiddens lines), 2 processes, logs the MIM terms."""
    exp = tmp_path / "megatron_mim"
    p = run_script(seed_command(exp, data) + HIDDENS_LINES, run_env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    (run,) = list((exp / "megatron_bart").iterdir())
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert len(train) == 10
    for r in train:
        # joint loss = 1.0 * tokens_loss + 1.0 * mim
        assert abs(r["train/loss"] - (r["train/tokens_loss"] + r["train/hiddens/mim"])) < 1e-2 * abs(r["train/loss"])
        for k in ("train/hiddens/mim_unweighted", "train/hiddens/mim/log_prob_P_z",
                  "train/hiddens/mim/log_prob_q_z_given_x"):
            assert k in r
    (val,) = [r for r in rows if "val/loss" in r]
    assert "val/hiddens/mim" in val and "val/tokens_loss" in val


def test_mim_and_vae_configs_train_restore_and_latent_tools(tmp_path, run_env, in_process):
    """Both configs train in this process; the latent tools run through their CLI for the MIM run and through the
    same LatentTools calls in-process for the VAE run (one line per text either way)."""
    for name in ("mim", "vae"):
        fit_in_process(["trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
                        f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=v"], bart=True, config_name=name)
        run = tmp_path / f"megatron_{name}" / "v"
        rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        key = "train/hiddens/mim" if name == "mim" else "train/hiddens/vae/kl_div"
        assert key in rows[0]
        # the checkpoint holds the hiddens module; latent tools restore it and decode
        import torch

        sd = torch.load(run / "checkpoints" / "step_0000004" / "mp_rank_00_model_states.pt", weights_only=False)
        assert any(k.startswith("hiddens_module.") for k in sd["module"])
        held = tmp_path / "held.txt"
        held.write_text("To be, or not to be\nAll the world's a stage\n")
        if name == "vae":
            from megatron_ext.inference.latents import LatentTools

            lt = LatentTools.from_checkpoint(str(run))
            dec = dict(greedy=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=16,
                       generator=torch.Generator().manual_seed(0))
            assert len(lt.interpolate("To be or not", "All the world", steps=3, **dec)) == 3
            dec.update(greedy=False, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
            assert len(lt.sample_prior(2, **dec)[1]) == 2
            res = lt.reconstruction_accuracy(str(held), max_lines=200)
            assert 0.0 <= res["teacher_forced_token_accuracy"] <= 1.0 and res["lines"] == 2.0
            continue
        p = run_script(["tools/latents.py", "interpolate", "--ckpt", str(run), "--text", "To be or not",
                        "--text", "All the world", "--steps", "3", "--max-new-tokens", "16"], run_env, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.count("\n") == 3  # one line per text (a generated text may be empty)
        p = run_script(["tools/latents.py", "sample", "--ckpt", str(run), "--num", "2", "--sample",
                        "--max-new-tokens", "8"], run_env, timeout=300)
        assert p.returncode == 0 and p.stdout.count("\n") == 2, p.stderr[-3000:]
        p = run_script(["tools/latents.py", "reconstruct", "--ckpt", str(run), "--input", str(held)], run_env,
                       timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        res = json.loads(p.stdout.strip().splitlines()[-1])
        assert 0.0 <= res["teacher_forced_token_accuracy"] <= 1.0 and res["lines"] == 2.0


def test_seed_example_hiddens_yaml_with_guided_cls_from_jsonl(tmp_path, run_env, in_process):
    """The seed's whole hiddens YAML (configs/bart/hiddens/seed_example.yaml: cond_gaussian + two guided_cls heads,
    a_mim + vae + two guided_cls_loss) on a JSONL dataset whose attribute columns feed the heads."""
    rows = []
    for i in range(400):
        text = ("the cat sat on the mat " if i % 2 else "a dog ran in the park ") * (1 + i % 3)
        rows.append(json.dumps({"text": text.strip(), "logP": 0.5 * (i % 2), "QED": float(i % 7) / 7}))
    path = tmp_path / "mols.jsonl"
    path.write_text("\n".join(rows) + "\n")
    fit_in_process([
        "+hiddens@model.hiddens=seed_example", "trainer.max_steps=6",
        "trainer.val_check_interval=6", "trainer.limit_val_batches=1", f"exp_manager.exp_dir={tmp_path}",
        "exp_manager.version=v", "model.data.data_impl=jsonl", f"model.data.data_prefix=[{path}]",
        "model.data.attribute_keys=[logP,QED]",
    ], bart=True, config_name="perceiver")
    rows = [json.loads(l) for l in
            (tmp_path / "megatron_bart_perceiver" / "v" / "metrics.jsonl").read_text().splitlines()]
    for k in ("train/hiddens/mim", "train/hiddens/vae", "train/hiddens/logP_cls", "train/hiddens/QED_cls",
              "train/tokens_loss"):
        assert k in rows[0], (k, sorted(rows[0]))
    r = rows[0]
    total = r["train/tokens_loss"] + r["train/hiddens/loss"]
    assert abs(r["train/loss"] - total) < 1e-3 * abs(total)

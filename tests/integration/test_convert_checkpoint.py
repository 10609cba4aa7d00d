"""Checkpoint conversion between layouts: consolidate (TP2xPP2, DP2 ZeRO-3) -> one fp32 state dict -> TP1 gives
the same validation loss; back out to a new layout; a layout change on resume loads the layout-free state (an old
checkpoint without it: refused with a how-to)."""
import json
import os
import shutil
import subprocess

import pytest
import torch

import helpers
from helpers import GPT_ZERO3_DP2_RUN, REPO, fit_in_process, launch_cmd, multiprocess_env

SMALL = ["+experiment=cpu_smoke", "model.num_layers=4", "model.micro_batch_size=2", "model.global_batch_size=4",
         "trainer.max_steps=6", "trainer.val_check_interval=6", "trainer.limit_val_batches=2",
         "exp_manager.create_tensorboard_logger=false", "exp_manager.checkpoint_callback_params.every_n_train_steps=6"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return multiprocess_env(XDG_CACHE_HOME=str(tmp_path_factory.mktemp("xdg_conv")))


def _pretrain(env, exp, version, world, extra, check=True):
    args = SMALL + [f"exp_manager.exp_dir={exp}", f"exp_manager.version={version}", f"trainer.devices={world}"] + extra
    cmd = launch_cmd(world, ["pretrain_gpt.py"] + args)
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def _val_losses(run_dir, key="val/loss"):
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r[key] for r in rows if key in r]


def _convert(env, *args):
    return subprocess.run([helpers.PYTHON, "tools/convert_checkpoint.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tp2pp2_run(tmp_path_factory, env):
    exp = tmp_path_factory.mktemp("conv")
    _pretrain(env, exp, "tp2pp2", 4, ["model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2"])
    return exp


def test_tp2pp2_to_tp1_same_val_loss(tp2pp2_run, env, in_process):
    exp = tp2pp2_run
    run = exp / "gpt_smoke" / "tp2pp2"
    trained_val = _val_losses(run)[-1]
    out = exp / "consolidated.pt"
    p = _convert(env, "--input", str(run / "checkpoints" / "step_0000006"), "--output", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    obj = torch.load(out, weights_only=False)
    assert obj["format"] == "megatron_ext.consolidated.v1" and obj["step"] == 6
    assert obj["state_dict"]["embedding.word_embeddings.weight"].shape[0] == obj["vocab_size"]
    assert all(t.dtype == torch.float32 for t in obj["state_dict"].values())
    fit_in_process(SMALL + [f"exp_manager.exp_dir={exp}", "exp_manager.version=eval_tp1",
                            "trainer.limit_train_batches=0", f"model.ckpt_path={out}"])  # one process: in this one
    (val,) = _val_losses(exp / "gpt_smoke" / "eval_tp1")
    assert abs(val - trained_val) < 1e-5, (val, trained_val)
    # the test split ("949,50,1"), evaluated after training by the pipeline engine and in the evaluation-only run
    (trained_test,), (test,) = _val_losses(run, "test/loss"), _val_losses(exp / "gpt_smoke" / "eval_tp1", "test/loss")
    assert abs(test - trained_test) < 1e-5 and abs(test - val) > 1e-4, (test, trained_test, val)


def test_back_out_to_new_layout_and_resume(tp2pp2_run, env):
    exp = tp2pp2_run
    run = exp / "gpt_smoke" / "tp2pp2"
    trained_val = _val_losses(run)[-1]
    target = exp / "gpt_smoke" / "tp2"
    p = _convert(env, "--input", str(run), "--target-tp", "2", "--target-pp", "1", "--output-dir", str(target))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    meta = json.loads((target / "checkpoints" / "step_0000006" / "meta.json").read_text())
    assert (meta["tp"], meta["pp"], meta["step"]) == (2, 1, 6)
    # evaluate the converted checkpoint directory at its new layout
    _pretrain(env, exp, "eval_tp2", 2, ["model.tensor_model_parallel_size=2", "trainer.limit_train_batches=0",
                                        f"model.ckpt_path={target / 'checkpoints'}"])
    (val,) = _val_losses(exp / "gpt_smoke" / "eval_tp2")
    assert abs(val - trained_val) < 1e-5, (val, trained_val)
    # and keep training it there
    _pretrain(env, exp, "tp2", 2, ["model.tensor_model_parallel_size=2", "exp_manager.resume_if_exists=true",
                                   "trainer.max_steps=8"])
    rows = [json.loads(l) for l in open(target / "metrics.jsonl")]
    assert [r["step"] for r in rows if "train/loss" in r] == [7, 8]
    # every checkpoint written by several ranks (4 training, 2 converting, 2 resumed) carries a manifest of all
    # ranks' files that verifies
    from megatron_ext.checkpoint.files import check_files

    for d in (run / "checkpoints" / "step_0000006", target / "checkpoints" / "step_0000006",
              target / "checkpoints" / "step_0000008"):
        man = json.loads((d / "manifest.json").read_text())
        world = man["layout"]["world_size"]
        assert {f"rng_state_rank{r:05d}.pt" for r in range(world)} | {"meta.json", "mp_rank_01_model_states.pt"} \
            <= set(man["files"]), sorted(man["files"])
        check_files(str(d))
    # one flipped byte in a file that rank 1 hashes (the manifest's names, shared round-robin between the 2 ranks)
    # of 'latest': both ranks fall back to step 6, the warning names the file
    names = sorted(json.loads((target / "checkpoints" / "step_0000008" / "manifest.json").read_text())["files"])
    bad = target / "checkpoints" / "step_0000008" / next(n for i, n in enumerate(names)
                                                         if i % 2 and n.endswith(".pt") and "/" not in n)
    with open(bad, "r+b") as f:
        f.seek(os.path.getsize(bad) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    p = _pretrain(env, exp, "tp2", 2, ["model.tensor_model_parallel_size=2", "exp_manager.resume_if_exists=true",
                                       "trainer.max_steps=8"])
    assert f"cannot resume from {bad.parent}: {bad} is corrupt: its sha256" in p.stderr, p.stderr[-3000:]
    assert f"resumed from {target / 'checkpoints' / 'step_0000006'} at step 6" in p.stderr, p.stderr[-3000:]
    check_files(str(bad.parent))  # step 8 written again, complete


def test_resume_with_other_layout(tp2pp2_run, env):
    from megatron_ext.checkpoint import manifest

    """A TP2 x PP2 run resumes in one process (its layout-free state, checkpoint/reshard.py); a checkpoint without
    that state (an older version's) is refused with how to convert it."""
    src = tp2pp2_run / "gpt_smoke" / "tp2pp2"
    for version, drop in (("tp2pp2_in_one", False), ("tp2pp2_old", True)):
        dst = tp2pp2_run / "gpt_smoke" / version
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
        if drop:  # as an older version wrote it: no layout_free/, and a manifest without it
            step6 = dst / "checkpoints" / "step_0000006"
            shutil.rmtree(step6 / "layout_free")
            manifest.write(str(step6), manifest.build(str(step6), {}, json.loads((step6 / "meta.json").read_text())))
        p = _pretrain(env, tp2pp2_run, version, 1, ["exp_manager.resume_if_exists=true", "trainer.max_steps=8"],
                      check=not drop)
        if drop:
            assert p.returncode == 2
            msg = p.stderr.strip().splitlines()[-1]
            assert msg.startswith("error: ") and "tensor_model_parallel_size 2 -> 1" in msg and \
                "convert_checkpoint.py" in msg
        else:
            rows = [json.loads(l) for l in open(dst / "metrics.jsonl")]
            assert [r["step"] for r in rows if "train/loss" in r][-2:] == [7, 8]


def test_zero3_dp2_consolidates(tmp_path, env, gpt_zero3_dp2_run, in_process):
    """The session's shared ZeRO-3 DP2 run, consolidated by the tool; evaluated at TP1 in this process."""
    run = gpt_zero3_dp2_run
    out = tmp_path / "z3.pt"
    p = _convert(env, "--input", str(run / "checkpoints"), "--output", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    one = [o for o in GPT_ZERO3_DP2_RUN if o not in ("trainer.devices=2", "model.zero_stage=3")]
    fit_in_process(one + [f"exp_manager.exp_dir={tmp_path}", "exp_manager.name=gpt_smoke", "exp_manager.version=eval",
                          "trainer.limit_train_batches=0", f"model.ckpt_path={out}"])
    (val,) = _val_losses(tmp_path / "gpt_smoke" / "eval")
    assert abs(val - _val_losses(run)[-1]) < 1e-5


def test_bad_inputs(tmp_path, env):
    p = _convert(env, "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "x.pt"))
    assert p.returncode == 2 and "no such file" in p.stderr
    bad = tmp_path / "bad.pt"
    torch.save({"hello": 1}, bad)
    p = _convert(env, "--input", str(bad), "--output-dir", str(tmp_path / "o" / "v"))
    assert p.returncode == 2 and "not a consolidated megatron_ext checkpoint" in p.stderr


def test_partition_rules_match_megatron_attributes():
    from megatron_ext.config.schema import ModelConfig
    from megatron_ext.models.gpt import GPTModel
    from megatron_ext.checkpoint.consolidated import merge_shards, partition_rule, shard_of
    from megatron_ext.parallel.state import initialize_parallel

    initialize_parallel(1, 1, accelerator="cpu")  # building a model needs the parallel state (it creates none)
    for act in ("gelu", "swiglu"):
        cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, activation=act,
                          share_embeddings_and_output_weights=False)
        m = GPTModel(cfg, 100, init_seed=1)
        for n, p in m.named_parameters():
            rule = partition_rule(n, act)
            if getattr(p, "tensor_model_parallel", False):
                assert rule == (p.partition_dim, p.partition_stride), (n, rule)
            else:
                assert rule is None, n
    full = torch.arange(48.0).reshape(12, 4)
    for dim, stride in ((0, 1), (0, 2), (1, 1)):
        shards = [shard_of(full, dim, stride, r, 2) for r in range(2)]
        assert torch.equal(merge_shards(shards, dim, stride), full)
    # stride 2: rank r holds [gate_r; up_r]
    assert torch.equal(shard_of(full, 0, 2, 1, 2), torch.cat([full[3:6], full[9:12]]))

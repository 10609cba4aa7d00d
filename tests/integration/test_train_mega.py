"""Mega as a toolkit architecture: model.arch=mega (pretrain_gpt.py) and arch: mega on either side of
pretrain_bart.py -- training end to end, data parallelism + ZeRO equal to one process, clear refusals."""
import json
import os
import subprocess

import pytest
import torch

from helpers import REPO, entry_error_in_process, fit_in_process, launch_cmd, multiprocess_env, run_script

GPT_MEGA = [
    "--config-path=configs/mega", "--config-name=gpt_mega",
    "model.num_layers=2", "model.hidden_size=32", "model.seq_length=32",
    "model.mega.shared_representation_size=16", "model.mega.intermediate_size=64", "model.mega.nffn_hidden_size=64",
    "model.mega.ema_projection_size=4",
    "model.micro_batch_size=2", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=1",
]
BART_MEGA = [
    "--config-path=configs/mega", "--config-name=bart_mega",
    "model.seq_length=32", "model.seq_length_dec=32", "model.micro_batch_size=2", "model.global_batch_size=4",
    "trainer.log_every_n_steps=1", "trainer.limit_val_batches=1",
] + [f"model.{side}.{k}" for side in ("encoder", "decoder") for k in (
    "hidden_size=32", "mega.shared_representation_size=16", "mega.intermediate_size=64",
    "mega.nffn_hidden_size=64", "mega.ema_projection_size=4")]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_gpt_mega_trains_checkpoints_and_resumes(run_env, tmp_path):
    common = [*GPT_MEGA, "model.global_batch_size=4", "trainer.max_steps=30", "trainer.val_check_interval=15",
              "exp_manager.checkpoint_callback_params.every_n_train_steps=15", f"exp_manager.exp_dir={tmp_path}",
              "model.optim.lr=3e-3"]
    r = run_script(["pretrain_gpt.py", *common, "exp_manager.version=v0"], run_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = tmp_path / "megatron_gpt_mega" / "v0"
    rows = _metrics(run_dir)
    losses = {m["step"]: m["train/loss"] for m in rows if "train/loss" in m}
    assert sorted(losses) == list(range(1, 31))
    assert sum(losses[s] for s in (28, 29, 30)) / 3 < sum(losses[s] for s in (1, 2, 3)) / 3 - 1.0
    first = next(m for m in rows if "train/loss" in m)
    assert first["train/tflops"] > 0 and first["train/grad_norm"] == first["train/grad_norm"]
    assert [m["step"] for m in rows if "val/loss" in m] == [15, 30]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000030"
    # resume from step 15 continues the same curve
    r = run_script(["pretrain_gpt.py", *common, "exp_manager.version=v0", "trainer.max_steps=30",
                    "exp_manager.resume_if_exists=true"], run_env)
    assert r.returncode == 0, r.stderr[-3000:]


def test_gpt_mega_variants_run(tmp_path, in_process):
    """Chunked laplace attention with the simple bias, layernorm, the scan EMA: one step each way (in-process)."""
    res = fit_in_process([*GPT_MEGA[2:], "model.global_batch_size=2", "trainer.max_steps=2",
                          "trainer.val_check_interval=0", f"exp_manager.exp_dir={tmp_path}",
                          "exp_manager.create_checkpoint_callback=false", "model.mega.chunk_size=8",
                          "model.mega.attention_activation=laplace", "model.mega.relative_positional_bias=simple",
                          "model.mega.normalization_type=layernorm", "model.mega.ema_impl=scan"],
                         config_dir="configs/mega", config_name="gpt_mega")
    assert res["step"] == 2


@pytest.mark.parametrize("over, key", [
    (["model.pipeline_model_parallel_size=2", "trainer.devices=2"], "model.pipeline_model_parallel_size=2"),
    (["model.mega.attention_activation=gelu"], "model.mega.attention_activation"),
    (["model.mega.chunk_size=0"], "model.mega.chunk_size"),
    (["model.mega.relative_positional_bias=simple", "model.mega.max_positions=16"], "model.mega.max_positions"),
    (["model.mega.normalization_type=syncbatchnorm"], "model.mega.normalization_type"),
    (["model.mega.ema_impl=magic"], "model.mega.ema_impl"),
    (["model.arch=rnn"], "model.arch"),
])
def test_gpt_mega_bad_config_one_clear_error(run_env, tmp_path, over, key, in_process):
    """The PP case through the CLI (exit status 2, one line, before any worker starts); the model.* cases through
    the same config composition and Trainer in-process."""
    args = [*GPT_MEGA, "model.global_batch_size=4", "trainer.max_steps=1", f"exp_manager.exp_dir={tmp_path}", *over]
    if "trainer.devices=2" not in over:
        assert key in entry_error_in_process(args[2:], config_dir="configs/mega", config_name="gpt_mega")
        return
    r = run_script(["pretrain_gpt.py", *args], run_env, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and key in err[0], r.stderr[-2000:]


def test_gpt_mega_unknown_key_named(run_env, tmp_path):
    r = run_script(["pretrain_gpt.py", *GPT_MEGA, "trainer.max_steps=1", f"exp_manager.exp_dir={tmp_path}",
                    "model.mega.chunksize=8"], run_env, timeout=300)
    assert r.returncode != 0 and "model.mega.chunksize" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def _steps(tmp_path, env, name, world, overrides):
    exp = tmp_path / name
    args = [*GPT_MEGA, "model.global_batch_size=8", "trainer.max_steps=6", "trainer.val_check_interval=0",
            "exp_manager.create_checkpoint_callback=false", "exp_manager.create_tensorboard_logger=false",
            f"exp_manager.exp_dir={exp}", "exp_manager.version=v", f"trainer.devices={world}", *overrides]
    cmd = launch_cmd(world, ["pretrain_gpt.py"] + args)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name}: {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return {m["step"]: m for m in _metrics(exp / "megatron_gpt_mega" / "v") if "train/loss" in m}


def test_gpt_mega_data_parallel_zero_matches_one_process(tmp_path, cache_home):
    env = multiprocess_env(XDG_CACHE_HOME=cache_home)
    ref = _steps(tmp_path, env, "one", 1, [])
    for name, over in (("dp2_z1", ["model.zero_stage=1"]), ("dp2_z3", ["model.zero_stage=3"])):
        got = _steps(tmp_path, env, name, 2, over)
        assert got[1]["train/loss"] == pytest.approx(ref[1]["train/loss"], rel=1e-4), name
        assert got[1]["train/grad_norm"] == pytest.approx(ref[1]["train/grad_norm"], rel=1e-4), name
        assert got[6]["train/loss"] == pytest.approx(ref[6]["train/loss"], rel=1e-3), name


def test_bart_mega_both_sides_and_mixed(run_env, tmp_path, in_process):
    r = run_script(["pretrain_bart.py", *BART_MEGA, "trainer.max_steps=20", "trainer.val_check_interval=20",
                    f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=v0", "model.optim.lr=3e-3",
                    "exp_manager.checkpoint_callback_params.every_n_train_steps=20"], run_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _metrics(tmp_path / "megatron_bart_mega" / "v0")
    losses = [m["train/loss"] for m in rows if "train/loss" in m]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    # a Mega encoder under a transformer decoder (and the reverse) build and train
    for side in ("encoder", "decoder"):
        other = "decoder" if side == "encoder" else "encoder"
        res = fit_in_process([*BART_MEGA[2:], "trainer.max_steps=1", "trainer.val_check_interval=0",
                              f"exp_manager.exp_dir={tmp_path}", f"exp_manager.version={side}",
                              "exp_manager.create_checkpoint_callback=false", f"model.{other}.arch=transformer",
                              f"model.{other}.num_attention_heads=4"],
                             bart=True, config_dir="configs/mega", config_name="bart_mega")
        assert res["step"] == 1


def test_encoder_decoder_model_with_mega_stacks_in_process():
    """EncoderDecoderModel with Mega on both sides: bidirectional encoder, causal decoder, padding respected."""
    from megatron_ext.config.loader import load_config
    from megatron_ext.config.schema import BARTConfig
    from megatron_ext.models.encoder_decoder import EncoderDecoderModel
    from megatron_ext.parallel.state import initialize_parallel

    initialize_parallel(1, 1, accelerator="cpu")
    over = [f"model.{side}.{k}" for side in ("encoder", "decoder") for k in (
        "arch=mega", "hidden_size=32", "hidden_dropout=0", "attention_dropout=0", "mega.shared_representation_size=16",
        "mega.intermediate_size=32", "mega.nffn_hidden_size=32", "mega.ema_projection_size=4")]
    cfg = load_config(BARTConfig, overrides=over + ["model.seq_length=12", "model.seq_length_dec=10"]).model
    torch.manual_seed(0)
    m = EncoderDecoderModel(cfg, 50, init_seed=3).eval()
    g = torch.Generator().manual_seed(0)
    enc = torch.randint(0, 50, (2, 12), generator=g)
    dec = torch.randint(0, 50, (2, 10), generator=g)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False
    with torch.no_grad():
        h = m.encode(enc, mask)["hiddens"]
        assert h.shape == (12, 2, 32)
        enc2 = enc.clone()
        enc2[0, 7] = (enc2[0, 7] + 1) % 50
        h2 = m.encode(enc2, mask)["hiddens"]
        assert not torch.allclose(h2[6, 0], h[6, 0])  # bidirectional: position 7 reaches position 6
        enc3 = enc.clone()
        enc3[1, 10] = (enc3[1, 10] + 1) % 50  # padding of sample 1 changes nothing real
        torch.testing.assert_close(m.encode(enc3, mask)["hiddens"][:8, 1], h[:8, 1])
        logits = m(enc, dec, mask)
        dec2 = dec.clone()
        dec2[:, 6] = (dec2[:, 6] + 1) % 50
        logits2 = m(enc, dec2, mask)
        torch.testing.assert_close(logits2[:, :6], logits[:, :6])  # causal decoder
        assert not torch.allclose(logits2[:, 6:], logits[:, 6:])

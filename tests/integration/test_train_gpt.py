"""End-to-end GPT pretraining through pretrain_gpt.py (subprocesses, CPU, tiny model)."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, TINY_GPT as TINY, entry_error_in_process, run_script


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _train_losses(run_dir):
    return {r["step"]: r["train/loss"] for r in _metrics(run_dir) if "train/loss" in r}


def test_fresh_run_writes_everything_and_loss_falls(run_env, tmp_path):
    r = run_script(
        ["pretrain_gpt.py", *TINY, "trainer.max_steps=40", "trainer.val_check_interval=20",
         "exp_manager.checkpoint_callback_params.every_n_train_steps=20", f"exp_manager.exp_dir={tmp_path}",
         "exp_manager.version=v0", "model.optim.lr=3e-3"],
        run_env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from megatron_ext.training.host_memory import _glibc

    # CPU default trainer.reuse_host_memory=null -> applied (glibc)
    assert ("host memory: glibc malloc keeps freed blocks for reuse" in r.stderr) == (_glibc() is not None)
    run_dir = tmp_path / "megatron_gpt" / "v0"
    losses = _train_losses(run_dir)
    assert sorted(losses) == list(range(1, 41))
    first, last = sum(losses[s] for s in range(1, 4)) / 3, sum(losses[s] for s in range(38, 41)) / 3
    assert last < first - 1.0, (first, last)  # byte-level loss starts ~5.5 (ln 256)
    vals = [m for m in _metrics(run_dir) if "val/loss" in m]
    assert [m["step"] for m in vals] == [20, 40]
    rec = _metrics(run_dir)[0]
    for k in ("train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tflops", "train/mfu"):
        assert k in rec and rec[k] == rec[k]  # present and not NaN
    assert (run_dir / "config.yaml").exists()
    assert glob.glob(str(run_dir / "events.out.tfevents.*"))
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000040"
    assert (ckpts / "step_0000020" / "meta.json").exists()
    assert not glob.glob(str(ckpts / ".tmp-*"))
    # TensorBoard events hold the scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert {"train/loss", "val/loss", "train/lr"} <= set(acc.Tags()["scalars"])
    assert len(acc.Scalars("train/loss")) == 40

    # evaluation only from the checkpoint
    r = run_script(
        ["pretrain_gpt.py", *TINY, "trainer.limit_train_batches=0", f"model.ckpt_path={ckpts}",
         f"exp_manager.exp_dir={tmp_path}", "exp_manager.name=eval", "exp_manager.version=e0",
         "trainer.reuse_host_memory=false"],
        run_env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "host memory:" not in r.stderr
    ev = _metrics(tmp_path / "eval" / "e0")
    assert [sorted(m) for m in ev] == [["step", "val/loss", "val/ppl"], ["step", "test/loss", "test/ppl"]]
    assert ev[0]["step"] == ev[1]["step"] == 40
    assert ev[0]["val/loss"] == pytest.approx(vals[-1]["val/loss"], abs=1e-6)
    # the list form's test split ("949,50,1"): evaluated after training, and again by the evaluation-only run
    (trained_test,) = [m for m in _metrics(run_dir) if "test/loss" in m]
    assert trained_test["step"] == 40 and ev[1]["test/loss"] == pytest.approx(trained_test["test/loss"], abs=1e-6)


def test_sigkill_then_resume_matches_uninterrupted(run_env, tmp_path):
    common = [*TINY, "model.hidden_dropout=0.1", "model.attention_dropout=0.1",  # dropout: RNG must be restored
              "trainer.max_steps=30", "trainer.val_check_interval=10",
              "exp_manager.checkpoint_callback_params.every_n_train_steps=5", f"exp_manager.exp_dir={tmp_path}"]
    r = run_script(["pretrain_gpt.py", *common, "exp_manager.version=full"], run_env)
    assert r.returncode == 0, r.stderr[-3000:]
    full = _train_losses(tmp_path / "megatron_gpt" / "full")

    run_dir = tmp_path / "megatron_gpt" / "killed"
    latest = run_dir / "checkpoints" / "latest"
    p = subprocess.Popen([sys.executable, "pretrain_gpt.py", *common, "exp_manager.version=killed"], cwd=REPO,
                         env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None:
            if latest.exists() and latest.read_text().strip() >= "step_0000010":
                break
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = int(latest.read_text().strip().split("_")[1])
    assert 10 <= killed_at < 30
    from megatron_ext.checkpoint.files import check_files

    # 'latest' names a checkpoint whose manifest verifies (sizes and sha256 of every file), whenever the kill came
    assert check_files(str(latest.parent / latest.read_text().strip()))["step"] == killed_at

    r = run_script(["pretrain_gpt.py", *common, "exp_manager.version=killed", "exp_manager.resume_if_exists=true"],
                   run_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cannot resume from" not in r.stderr and f"resumed from {latest.parent}" in r.stderr, r.stderr[-3000:]
    resumed = _train_losses(run_dir)
    assert sorted(resumed) == list(range(1, 31))
    for step in range(killed_at + 1, 31):
        assert abs(resumed[step] - full[step]) <= 1e-6, (step, resumed[step], full[step])
    vals_full = {m["step"]: m["val/loss"] for m in _metrics(tmp_path / "megatron_gpt" / "full") if "val/loss" in m}
    vals_res = {m["step"]: m["val/loss"] for m in _metrics(run_dir) if "val/loss" in m}
    assert vals_res.keys() == vals_full.keys()
    for s in vals_full:
        assert abs(vals_res[s] - vals_full[s]) <= 1e-6


def test_resume_without_checkpoint_can_be_required(run_env, tmp_path):
    r = run_script(["pretrain_gpt.py", *TINY, "trainer.max_steps=2", f"exp_manager.exp_dir={tmp_path}",
                    "exp_manager.version=none", "exp_manager.resume_if_exists=true",
                    "exp_manager.resume_ignore_no_checkpoint=false"], run_env)
    assert r.returncode == 2
    assert "holds no complete checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_bad_inputs_give_one_clear_message(run_env, tmp_path, in_process):
    """The first case through the CLI (exit status 2, one line); the others through the same Trainer in-process."""
    cases = [
        (["model.global_batch_size=5", "model.micro_batch_size=2"], "model.global_batch_size (5)"),
        (["model.data.data_prefix=[/nonexistent/corpus]"], "/nonexistent/corpus"),
        (["model.tokenizer.library=sentencepiece", "model.tokenizer.model=/nonexistent/spm.model"],
         "/nonexistent/spm.model"),
    ]
    for i, (over, needle) in enumerate(cases):
        args = [*TINY, "trainer.max_steps=1", f"exp_manager.exp_dir={tmp_path}", *over]
        if i == 0:
            r = run_script(["pretrain_gpt.py", *args], run_env, timeout=300)
            assert r.returncode == 2, (over, r.stderr[-2000:])
            assert needle in r.stderr, (over, r.stderr[-2000:])
            assert "Traceback" not in r.stderr, (over, r.stderr[-2000:])
        else:
            assert needle in entry_error_in_process(args), over


def _write_dataset(prefix, docs, dtype):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        b.add_item(torch.tensor(d, dtype=torch.int64))
        b.end_document()
    b.finalize(prefix + ".idx")


def test_bad_data_files_through_pretrain_gpt(run_env, tmp_path, in_process):
    import numpy as np

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 250, size=200).tolist() for _ in range(200)]
    # token ids beyond the byte tokenizer's vocabulary (259)
    big = str(tmp_path / "big")
    _write_dataset(big, docs[:-1] + [docs[-1][:-1] + [300]], np.uint16)
    # a truncated .idx
    trunc = str(tmp_path / "trunc")
    _write_dataset(trunc, docs, np.uint16)
    with open(trunc + ".idx", "rb") as f:
        raw = f.read()
    with open(trunc + ".idx", "wb") as f:
        f.write(raw[: len(raw) // 2])
    # the truncated index through the CLI (exit status 2, one line), the out-of-vocabulary ids in-process
    r = run_script(["pretrain_gpt.py", *TINY, "trainer.max_steps=1", f"exp_manager.exp_dir={tmp_path}",
                    f"model.data.data_prefix=[{trunc}]"], run_env, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "trunc.idx" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1
    assert "300" in entry_error_in_process([*TINY, "trainer.max_steps=1", f"exp_manager.exp_dir={tmp_path}",
                                            f"model.data.data_prefix=[{big}]"])


def test_wandb_offline_beside_tensorboard(run_env, tmp_path):
    pytest.importorskip("wandb")
    env = dict(run_env, WANDB_SILENT="true")
    env.pop("WANDB_MODE", None)
    r = run_script(["pretrain_gpt.py", "+experiment=cpu_smoke", f"exp_manager.exp_dir={tmp_path}",
                    "exp_manager.version=w", "exp_manager.create_wandb_logger=true"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "gpt_smoke" / "w"
    runs = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    assert runs and glob.glob(os.path.join(runs[0], "*.wandb"))
    assert glob.glob(str(run_dir / "events.out.tfevents.*"))

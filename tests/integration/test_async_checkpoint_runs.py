"""Checkpoints written in the background (``exp_manager.checkpoint_callback_params.async_save=true``) as commands:
a run killed (SIGKILL) at random moments resumes from a complete checkpoint with the losses of an uninterrupted
run, and two ranks commit their background saves over their own process group."""
import json
import os
import random
import signal
import subprocess
import time

import helpers
from helpers import REPO, TINY_GPT as TINY, run_script

ASYNC = "exp_manager.checkpoint_callback_params.async_save=true"


def _train_losses(run_dir):
    out = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            m = json.loads(line)
            if "train/loss" in m:
                out[m["step"]] = m["train/loss"]
    return out


def _complete(ckpt_dir):
    tag = (ckpt_dir / "latest").read_text().strip()
    assert (ckpt_dir / tag / "meta.json").is_file(), f"'latest' names {tag}, which is not complete"
    return int(tag.split("_")[1])


def test_sigkill_during_async_saves_resumes_like_an_uninterrupted_run(run_env, tmp_path):
    common = [*TINY, "model.hidden_dropout=0.1", "model.attention_dropout=0.1", "trainer.max_steps=30",
              "trainer.val_check_interval=0", "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
              f"exp_manager.exp_dir={tmp_path}", ASYNC]
    r = run_script(["pretrain_gpt.py", *common, "exp_manager.version=full"], run_env)
    assert r.returncode == 0, r.stderr[-3000:]
    full = _train_losses(tmp_path / "megatron_gpt" / "full")
    assert sorted(full) == list(range(1, 31))

    rnd = random.Random(0)
    for k in range(int(os.environ.get("MEXT_ASYNC_KILLS", "3"))):  # more moments: MEXT_ASYNC_KILLS=20
        version = f"killed{k}"
        ckpts = tmp_path / "megatron_gpt" / version / "checkpoints"
        p = subprocess.Popen([helpers.PYTHON, "pretrain_gpt.py", *common, f"exp_manager.version={version}"],
                             cwd=REPO, env=run_env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{version}.err", "w"))
        try:
            # a random moment: shortly after 'latest' reaches a random early step, while the next saves run
            after, delay = f"step_{2 * rnd.randint(1, 4):07d}", rnd.uniform(0.0, 0.05)
            deadline = time.time() + 300
            while time.time() < deadline and p.poll() is None and not (
                    (ckpts / "latest").exists() and (ckpts / "latest").read_text().strip() >= after):
                time.sleep(0.002)
            # the training process itself (the run directory's lock names it), wherever it was started from
            pid = int((ckpts.parent / ".lock").read_text().split()[1])
            time.sleep(delay)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # finished already: the assertion below says so
        finally:
            p.wait()
        assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        killed_at = _complete(ckpts)
        r = run_script(["pretrain_gpt.py", *common, f"exp_manager.version={version}",
                        "exp_manager.resume_if_exists=true"], run_env)
        assert r.returncode == 0, r.stderr[-3000:]
        resumed = _train_losses(tmp_path / "megatron_gpt" / version)
        assert sorted(resumed) == list(range(1, 31))
        for step in range(killed_at + 1, 31):
            assert abs(resumed[step] - full[step]) <= 1e-6, (k, step, resumed[step], full[step])


def test_two_ranks_save_in_the_background_and_resume(run_env, tmp_path):
    common = [*TINY, "trainer.devices=2", "model.zero_stage=1", "trainer.val_check_interval=0",
              "exp_manager.checkpoint_callback_params.every_n_train_steps=2", f"exp_manager.exp_dir={tmp_path}",
              "exp_manager.version=v", ASYNC]
    r = run_script(["pretrain_gpt.py", *common, "trainer.max_steps=4"], run_env)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = tmp_path / "megatron_gpt" / "v" / "checkpoints"
    assert _complete(ckpts) == 4
    assert sorted(d for d in os.listdir(ckpts) if d.startswith("step_")) == ["step_0000002", "step_0000004"]
    assert len([f for f in os.listdir(ckpts / "step_0000004") if f.endswith("optim_states.pt")]) == 2
    r = run_script(["pretrain_gpt.py", *common, "trainer.max_steps=6", "exp_manager.resume_if_exists=true"],
                   run_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and _complete(ckpts) == 6

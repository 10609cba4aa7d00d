"""Checkpoints written in the background (``exp_manager.checkpoint_callback_params.async_save=true``), in-process:
the snapshot is a copy, a background error reaches the training thread naming the checkpoint, and an async save
writes exactly the files and tensors a sync save writes (DeepSpeed's and the layout-free state)."""
import json
import os

import pytest
import torch
from helpers import TINY_GPT, fit_in_process

from megatron_ext.checkpoint import reshard
from megatron_ext.checkpoint.async_save import BackgroundSaver, host_snapshot
from megatron_ext.checkpoint.safe_load import load_untrusted
from megatron_ext.errors import CheckpointError


def test_host_snapshot_is_a_copy_that_training_cannot_change():
    w = torch.nn.Parameter(torch.ones(3))
    state = {"module": {"w": w}, "optimizer": [{"exp_avg": torch.zeros(2)}, (torch.ones(1), 5)], "step": 7}
    snap = host_snapshot(state)
    with torch.no_grad():
        w.add_(1)
        state["optimizer"][0]["exp_avg"].add_(3)
    assert torch.equal(snap["module"]["w"], torch.ones(3)) and not snap["module"]["w"].requires_grad
    assert torch.equal(snap["optimizer"][0]["exp_avg"], torch.zeros(2))
    assert isinstance(snap["optimizer"][1], tuple) and snap["optimizer"][1][1] == 5 and snap["step"] == 7


def test_a_background_error_reaches_the_training_thread_naming_the_checkpoint():
    saver = BackgroundSaver()

    def job():
        raise OSError(28, "No space left on device")

    saver.submit("step_0000010", job)
    with pytest.raises(CheckpointError, match="step_0000010.*No space left"):
        saver.finish()
    saver.submit("step_0000020", lambda: None)  # the error was reported once; the saver goes on
    saver.finish()


def _files(run_dir):
    ck = run_dir / "checkpoints"
    return {str(p.relative_to(ck)): p for p in ck.rglob("*") if p.is_file()}


def _same(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")


@pytest.mark.parametrize("zero", [0, 1])
def test_async_save_writes_what_sync_save_writes(tmp_path, in_process, zero):
    common = [*TINY_GPT, "trainer.max_steps=4", "trainer.val_check_interval=0", f"model.zero_stage={zero}",
              "exp_manager.checkpoint_callback_params.every_n_train_steps=2", f"exp_manager.exp_dir={tmp_path}",
              "exp_manager.create_tensorboard_logger=false"]
    fit_in_process([*common, "exp_manager.version=sync"])
    fit_in_process([*common, "exp_manager.version=async", "exp_manager.checkpoint_callback_params.async_save=true"])
    sync, asyn = (tmp_path / "megatron_gpt" / v for v in ("sync", "async"))
    fs, fa = _files(sync), _files(asyn)
    assert set(fs) == set(fa) and "step_0000004/meta.json" in fa, (sorted(fs), sorted(fa))
    assert (asyn / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert not [d for d in os.listdir(asyn / "checkpoints") if d.startswith(".")]  # no .tmp-/.del- leftovers
    for step in ("step_0000002", "step_0000004"):  # the layout-free state (DCP), written from the host snapshot
        a = reshard.read_tensors(str(sync / "checkpoints" / step))
        b = reshard.read_tensors(str(asyn / "checkpoints" / step))
        assert a and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), step
    for name in fs:
        if name.endswith(".pt"):
            _same(load_untrusted(str(fs[name]), "test"), load_untrusted(str(fa[name]), "test"), name)
        elif name.endswith("meta.json"):
            assert json.loads(fs[name].read_text()) == json.loads(fa[name].read_text())

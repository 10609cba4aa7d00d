"""Bad inputs around run directories and checkpoints (issue 15, runs): a run owns its directory, a fresh run never
writes beside an earlier run's checkpoints, a non-finite state never becomes a checkpoint, pruning leaves no
fragments, and a truncated/corrupt checkpoint file, a full disk or an ``exp_dir`` that is a file give one clear
message. One tiny run is trained in this process (module fixture) and copied by the tests that need checkpoints."""
import contextlib
import errno
import logging
import os
import shutil
import subprocess
import sys
import uuid

import pytest
import torch

from conftest import run_script

_RUNS_TINY = [
    "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_length=16",
    "model.micro_batch_size=2", "model.global_batch_size=2", "model.make_vocab_size_divisible_by=8",
    "trainer.log_every_n_steps=1", "trainer.val_check_interval=0", "trainer.accelerator=cpu",
    "exp_manager.create_tensorboard_logger=false",
]


def _runs_cfg(exp_dir, *extra, corpus=None):
    from megatron_ext.config.loader import load_config

    over = [*_RUNS_TINY, f"exp_manager.exp_dir={exp_dir}", *extra]
    if corpus is not None:
        over.append(f"model.data.default_corpus_dir={corpus}")
    return load_config(overrides=over)


def _runs_fit(exp_dir, corpus, *extra):
    from megatron_ext.training.gpt_task import GPTTask
    from megatron_ext.training.trainer import Trainer

    return Trainer(_runs_cfg(exp_dir, *extra, corpus=corpus), GPTTask).fit()


@pytest.fixture(scope="module")
def _runs_trained(tmp_path_factory):
    """(exp_dir, corpus dir): ``<exp_dir>/megatron_gpt/src`` trained 3 steps with a checkpoint at every step."""
    from megatron_ext.parallel.state import initialize_parallel

    initialize_parallel(1, 1, accelerator="cpu")
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    corpus = str(root / "corpus")
    exp = str(root / "exp")
    res = _runs_fit(exp, corpus, "trainer.max_steps=3", "exp_manager.version=src",
                    "exp_manager.checkpoint_callback_params.every_n_train_steps=1")
    assert res["step"] == 3
    return exp, corpus


def _runs_copy(trained, tmp_path, version="v"):
    """A copy of the trained run as ``<tmp_path>/megatron_gpt/<version>``; returns its checkpoints directory."""
    exp, _ = trained
    dst = tmp_path / "megatron_gpt" / version
    shutil.copytree(os.path.join(exp, "megatron_gpt", "src"), dst, ignore=shutil.ignore_patterns(".lock"))
    return dst / "checkpoints"


# ------------------------------------------------------------------------------ 4. run-directory collisions
def test_runs_default_versions_started_together_get_their_own_directories(tmp_path):
    from megatron_ext.training.exp_manager import resolve_run_dir

    em = _runs_cfg(tmp_path).exp_manager
    dirs = [resolve_run_dir(em, 0) for _ in range(3)]  # same second (or not): never the same directory
    assert len(set(dirs)) == 3, dirs
    assert all(os.path.isdir(d) for d in dirs)  # created atomically when chosen


def test_runs_second_run_on_a_locked_directory_stops_with_the_holder(tmp_path):
    from megatron_ext.errors import ConfigError
    from megatron_ext.training.exp_manager import ExpManager

    cfg = _runs_cfg(tmp_path, "exp_manager.version=shared")
    (tmp_path / "megatron_gpt" / "shared").mkdir(parents=True)
    (tmp_path / "megatron_gpt" / "shared" / ".lock").write_text("pid 999999 on host gone\n")  # a crashed run's
    first = ExpManager(cfg, 0)  # a stale lock file (no flock held) does not block
    try:
        with pytest.raises(ConfigError) as e:
            ExpManager(cfg, 0)
        msg = str(e.value)
        assert first.run_dir in msg and f"pid {os.getpid()}" in msg and "\n" not in msg
    finally:
        first.close()
    ExpManager(cfg, 0).close()  # released by close


def test_runs_lock_of_a_killed_run_is_not_stale(tmp_path):
    """The holder is SIGKILLed: the kernel releases its flock, the next run starts."""
    from megatron_ext.training.exp_manager import ExpManager

    cfg = _runs_cfg(tmp_path, "exp_manager.version=crashed")
    run_dir = tmp_path / "megatron_gpt" / "crashed"
    run_dir.mkdir(parents=True)
    code = ("import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write('pid %d' % os.getpid()); f.flush(); print('locked', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        from megatron_ext.errors import ConfigError

        with pytest.raises(ConfigError, match="in use by another run"):
            ExpManager(cfg, 0)
        p.kill()
        p.wait()
        ExpManager(cfg, 0).close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_runs_fresh_run_refused_beside_old_checkpoints_unless_overwrite(_runs_trained, tmp_path, caplog):
    from megatron_ext.errors import ConfigError
    from megatron_ext.training.exp_manager import ExpManager

    ckpts = _runs_copy(_runs_trained, tmp_path)
    with pytest.raises(ConfigError) as e:
        ExpManager(_runs_cfg(tmp_path, "exp_manager.version=v"), 0)
    msg = str(e.value)
    assert str(ckpts) in msg and "exp_manager.resume_if_exists=true" in msg and "exp_manager.overwrite=true" in msg
    assert sorted(os.listdir(ckpts)) == ["latest", "step_0000001", "step_0000002", "step_0000003"]  # untouched
    ExpManager(_runs_cfg(tmp_path, "exp_manager.version=v", "exp_manager.resume_if_exists=true"), 0).close()
    with caplog.at_level(logging.WARNING):
        ExpManager(_runs_cfg(tmp_path, "exp_manager.version=v", "exp_manager.overwrite=true"), 0).close()
    assert os.listdir(ckpts) == []  # no step of the earlier run survives beside the new run's
    assert "exp_manager.overwrite=true: deleted" in caplog.text and str(ckpts) in caplog.text


# ------------------------------------------------------------------------------ 6a. non-finite checkpoints
def test_runs_nonfinite_state_never_becomes_a_checkpoint(_runs_trained, tmp_path, caplog):
    from megatron_ext.errors import MegatronExtError

    _, corpus = _runs_trained
    with caplog.at_level(logging.WARNING), pytest.raises(MegatronExtError, match="loss is nan"):
        _runs_fit(tmp_path, corpus, "trainer.max_steps=3", "exp_manager.version=nan", "model.optim.lr=1e39",
                  "exp_manager.checkpoint_callback_params.every_n_train_steps=1")
    ckpts = tmp_path / "megatron_gpt" / "nan" / "checkpoints"
    assert os.listdir(ckpts) == []  # step 1's inf/nan weights were not saved, no 'latest'
    assert "step 1: not writing a checkpoint because" in caplog.text and "inf/nan" in caplog.text


# ------------------------------------------------------------------------------ 7. pruning fragments
def test_runs_incomplete_step_directories_older_than_latest_are_removed(_runs_trained, tmp_path):
    from megatron_ext.training.exp_manager import ExpManager

    ckpts = _runs_copy(_runs_trained, tmp_path)
    os.remove(ckpts / "step_0000001" / "meta.json")  # a prune killed mid-delete (old layout)
    shutil.copytree(ckpts / "step_0000002", ckpts / ".del-step_0000000")  # a prune killed mid-delete
    shutil.copytree(ckpts / "step_0000002", ckpts / ".tmp-step_0000002")  # a save killed before the rename
    (ckpts / ".tmp-step_0000009").mkdir()  # newer than latest: possibly being written, kept
    ExpManager(_runs_cfg(tmp_path, "exp_manager.version=v", "exp_manager.resume_if_exists=true"), 0).close()
    assert sorted(os.listdir(ckpts)) == [".tmp-step_0000009", "latest", "step_0000002", "step_0000003"]


def test_runs_prune_leaves_only_complete_checkpoints(_runs_trained, tmp_path):
    """save_top_k prunes through an atomic rename, and sweeps fragments an earlier kill left."""
    from megatron_ext.training.checkpointing import Checkpointer

    ckpts = _runs_copy(_runs_trained, tmp_path)
    os.remove(ckpts / "step_0000001" / "meta.json")
    Checkpointer(str(ckpts), save_top_k=1)._prune()
    assert sorted(os.listdir(ckpts)) == ["latest", "step_0000003"]


# ------------------------------------------------------------------------------ 11b. corrupt files, full disk
def _runs_truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("bad", ["rng_state_rank00000.pt", "mp_rank_00_model_states.pt", "meta.json"])
def test_runs_resume_falls_back_past_a_corrupt_latest(_runs_trained, tmp_path, caplog, bad):
    ckpts = _runs_copy(_runs_trained, tmp_path)
    path = ckpts / "step_0000003" / bad
    if bad == "meta.json":
        path.write_text('{"step": 3, "consum')
    else:
        _runs_truncate(path)
    with caplog.at_level(logging.INFO):
        res = _runs_fit(tmp_path, _runs_trained[1], "trainer.max_steps=3", "exp_manager.version=v",
                        "exp_manager.resume_if_exists=true",
                        "exp_manager.checkpoint_callback_params.every_n_train_steps=1")
    assert f"cannot resume from {ckpts / 'step_0000003'}: {path}" in caplog.text
    assert f"resumed from {ckpts / 'step_0000002'} at step 2" in caplog.text
    assert res["step"] == 3  # one step retrained, checkpoint 3 rewritten complete
    assert (ckpts / "latest").read_text() == "step_0000003"


def test_runs_no_loadable_checkpoint_is_one_clear_error(_runs_trained, tmp_path):
    from megatron_ext.errors import CheckpointError

    ckpts = _runs_copy(_runs_trained, tmp_path)
    for step in (1, 2, 3):
        _runs_truncate(ckpts / f"step_000000{step}" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError) as e:
        _runs_fit(tmp_path, _runs_trained[1], "trainer.max_steps=3", "exp_manager.version=v",
                  "exp_manager.resume_if_exists=true")
    msg = str(e.value)
    assert "no checkpoint in" in msg and "3 tried" in msg and "mp_rank_00_model_states.pt" in msg
    assert "\n" not in msg


@contextlib.contextmanager
def _runs_small_disk(tmp_path, size="48k"):
    """A real tmpfs of ``size`` (root); None where mounting is not permitted."""
    d = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield d
    finally:
        import gc

        gc.collect()  # file objects of the failed write
        if subprocess.run(["umount", str(d)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(d)], check=False)


def test_runs_disk_full_while_saving_names_the_path_and_keeps_latest(_runs_trained, tmp_path, monkeypatch):
    from megatron_ext.errors import CheckpointError
    from megatron_ext.training.gpt_task import GPTTask
    from megatron_ext.training.trainer import Trainer

    trainer = Trainer(_runs_cfg(tmp_path, "exp_manager.version=t", corpus=_runs_trained[1]), GPTTask)
    try:
        trainer._build()
        with _runs_small_disk(tmp_path) as disk:
            ckpts = (disk or tmp_path) / "checkpoints"
            ckpts.mkdir()
            (ckpts / "latest").write_text("step_0000001")
            (ckpts / "step_0000001").mkdir()  # a complete previous checkpoint (meta.json marks it)
            (ckpts / "step_0000001" / "meta.json").write_text('{"step": 1, "consumed_samples": 2}')
            if disk is None:  # no tmpfs here: the write fails as on a full disk
                def full(*a, **k):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                monkeypatch.setattr(torch, "save", full)
            from megatron_ext.training.checkpointing import Checkpointer

            with pytest.raises(CheckpointError) as e:
                Checkpointer(str(ckpts)).save(trainer.engine, 2, 4, trainer._rng_states(), trainer._meta())
            msg = str(e.value)
            assert "the disk is full" in msg and str(ckpts / ".tmp-step_0000002") in msg
            assert "'latest' still names step_0000001" in msg
            assert (ckpts / "latest").read_text() == "step_0000001"
            assert sorted(os.listdir(ckpts)) == ["latest", "step_0000001"]  # no .tmp-step_* left
    finally:
        trainer.exp.close()


def test_runs_exp_dir_that_is_a_file_is_one_line(tmp_path, run_env):
    from megatron_ext.errors import ConfigError
    from megatron_ext.training.exp_manager import ExpManager

    f = tmp_path / "not_a_dir"
    f.write_text("x")
    with pytest.raises(ConfigError, match=f"exp_manager.exp_dir=.*{f} is a file, expected a directory"):
        ExpManager(_runs_cfg(f), 0)
    with pytest.raises(ConfigError, match="is a file"):
        ExpManager(_runs_cfg(f, "exp_manager.version=v"), 0)
    r = run_script(["pretrain_gpt.py", *_RUNS_TINY, f"exp_manager.exp_dir={f}", "trainer.max_steps=1"], run_env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{f} is a file, expected a directory" in r.stderr

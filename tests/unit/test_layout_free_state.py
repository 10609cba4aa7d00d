"""The layout-free state (checkpoint/reshard.py) in one process: a resume under the same layout goes on bit for
bit; a resume that changes the ZeRO stage loads it through the layout-free state (weights, Adam moments, step,
scheduler); the tensors read back are the run's; DCP's pickled metadata is read without running code."""
import json
import os
import pickle
import shutil

import pytest
import torch

from helpers import entry_error_in_process, fit_in_process

RUN = ["+experiment=cpu_smoke", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
       "model.seq_length=32", "model.micro_batch_size=2", "model.global_batch_size=4", "trainer.max_steps=6",
       "trainer.val_check_interval=0", "trainer.log_every_n_steps=1", "exp_manager.create_tensorboard_logger=false",
       "exp_manager.checkpoint_callback_params.every_n_train_steps=3", "exp_manager.name=rs"]


def _losses(run):
    return {r["step"]: r["train/loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if "train/loss" in r}


def _from_step3(src, dst):
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / "step_0000003", dst / "checkpoints" / "step_0000003")
    (dst / "checkpoints" / "latest").write_text("step_0000003")


def test_resume_same_and_other_zero_stage(tmp_path, in_process):
    from megatron_ext.checkpoint.reshard import read_extra, read_tensors

    fit_in_process(RUN + [f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=a"])
    a = tmp_path / "rs" / "a"
    state3 = read_tensors(str(a / "checkpoints" / "step_0000003"))
    extra = read_extra(str(a / "checkpoints" / "step_0000003"))
    assert (extra["step"], extra["consumed_samples"], extra["layout"]["zero_stage"]) == (3, 12, 0)
    assert extra["lr_scheduler"] is not None
    names = {k.rsplit("/", 1)[0] for k in state3}
    assert {k.rsplit("/", 1)[1] for k in state3} == {"param", "exp_avg", "exp_avg_sq", "step"}
    for n in names:
        assert state3[f"{n}/step"].item() == 3 and state3[f"{n}/param"].dtype == torch.float32
    assert state3["embedding.word_embeddings.weight/param"].shape[0] == 259  # the tokenizer's rows, no padding
    # the same layout: DeepSpeed's own files; steps 4-6 and the state at 6 bit for bit
    _from_step3(a, tmp_path / "rs" / "same")
    fit_in_process(RUN + [f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=same",
                          "exp_manager.resume_if_exists=true"])
    same = tmp_path / "rs" / "same"
    assert {s: v for s, v in _losses(a).items() if s > 3} == _losses(same)
    want6 = read_tensors(str(a / "checkpoints" / "step_0000006"))
    got6 = read_tensors(str(same / "checkpoints" / "step_0000006"))
    assert sorted(got6) == sorted(want6) and all(torch.equal(got6[k], want6[k]) for k in want6)
    # ZeRO 0 -> ZeRO 1: the layout-free state (DeepSpeed could not load the other stage's optimizer files)
    _from_step3(a, tmp_path / "rs" / "z1")
    fit_in_process(RUN + [f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=z1", "model.zero_stage=1",
                          "exp_manager.resume_if_exists=true"])
    la, lz = _losses(a), _losses(tmp_path / "rs" / "z1")
    assert sorted(lz) == [4, 5, 6]
    for s in lz:
        assert abs(lz[s] - la[s]) <= 1e-5 * abs(la[s]), (s, lz[s], la[s])
    # another optimizer: refused (its state would be dropped), naming both
    _from_step3(a, tmp_path / "rs" / "adam")
    msg = entry_error_in_process(RUN + [f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=adam",
                                        "model.zero_stage=1", "model.optim.name=adam",
                                        "exp_manager.resume_if_exists=true"])
    assert "holds the state of a AdamW optimizer but this run's is Adam" in msg, msg
    z6 = read_tensors(str(tmp_path / "rs" / "z1" / "checkpoints" / "step_0000006"))
    assert sorted(z6) == sorted(want6)
    assert all(torch.allclose(z6[k], want6[k], rtol=1e-4, atol=1e-6) for k in want6)


def test_metadata_is_read_without_running_code(tmp_path):
    import torch.distributed.checkpoint as dcp

    from megatron_ext.checkpoint.safe_load import load_dcp_metadata
    from megatron_ext.errors import CorruptCheckpointError, UnsafeFileError

    out = tmp_path / "state"
    with pytest.warns(UserWarning):  # no process group: DCP says it writes from this process alone
        dcp.save({"w/param": torch.arange(6.0).reshape(2, 3), "w/step": torch.tensor(2.0)},
                 storage_writer=dcp.FileSystemWriter(str(out), single_file_per_rank=True, thread_count=1),
                 no_dist=True)
    md = load_dcp_metadata(str(out / ".metadata"))
    assert tuple(md.state_dict_metadata["w/param"].size) == (2, 3)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.metadata"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafeFileError, match="evil.metadata.*system"):
        load_dcp_metadata(str(evil))
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "cut.metadata").write_bytes((out / ".metadata").read_bytes()[:40])
    with pytest.raises(CorruptCheckpointError, match="cut.metadata"):
        load_dcp_metadata(str(tmp_path / "cut.metadata"))


def test_save_layout_free_off(tmp_path, in_process):
    """exp_manager.checkpoint_callback_params.save_layout_free=false: DeepSpeed's files only; a resume that
    changes the layout is then refused, saying how to convert."""
    run = RUN + [f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=off", "trainer.max_steps=3",
                 "exp_manager.checkpoint_callback_params.save_layout_free=false"]
    fit_in_process(run)
    step3 = tmp_path / "rs" / "off" / "checkpoints" / "step_0000003"
    assert (step3 / "meta.json").exists() and not (step3 / "layout_free").exists()
    msg = entry_error_in_process(run + ["model.zero_stage=1", "exp_manager.resume_if_exists=true",
                                        "trainer.max_steps=4"])
    assert "zero_stage 0 -> 1" in msg and "holds no layout-free state" in msg and "convert_checkpoint.py" in msg



def test_ckpt_path_of_another_layout_loads_weights(tmp_path, in_process):
    """model.ckpt_path=<checkpoint dir> of another TP layout loads its weights from layout_free/ (one process
    cannot run TP2, so the checkpoint's meta.json is edited to say tp=2 and its manifest rewritten: DeepSpeed's own
    loader is not used); evaluation gives the val/loss of the same-layout load."""
    from megatron_ext.checkpoint import manifest

    fit_in_process(RUN + [f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=a", "trainer.max_steps=3"])
    ckpts = tmp_path / "rs" / "a" / "checkpoints"
    other = tmp_path / "other" / "step_0000003"
    shutil.copytree(ckpts / "step_0000003", other)
    for f in other.glob("*.pt"):
        f.unlink()  # DeepSpeed's files gone: only the layout-free state can give the weights
    meta = {**json.loads((other / "meta.json").read_text()), "tp": 2}
    (other / "meta.json").write_text(json.dumps(meta))
    manifest.write(str(other), manifest.build(str(other), {}, meta))  # sealed again: it verifies
    vals = []
    for version, path in (("same", ckpts), ("other", other)):
        fit_in_process(RUN + [f"exp_manager.exp_dir={tmp_path}", f"exp_manager.version={version}",
                              "trainer.limit_train_batches=0", f"model.ckpt_path={path}"])
        rows = [json.loads(l) for l in open(tmp_path / "rs" / version / "metrics.jsonl")]
        vals.append([(r["step"], r["val/loss"]) for r in rows if "val/loss" in r])
    assert vals[0] == vals[1] and vals[0][0][0] == 3, vals


def _tree(path):
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


def test_resume_from_checkpoint_starts_a_new_run_with_the_full_state(tmp_path, in_process):
    """exp_manager.resume_from_checkpoint=<another run's step 3>: the new run goes on from step 3 with the weights,
    Adam's moments, scheduler and data position (same layout: bit for bit; ZeRO 0 -> 1: through the layout-free
    state), writes into its own directory and leaves the source untouched; once it has checkpoints of its own, a
    restart with resume_if_exists goes on from those. Bad settings name the key."""
    from megatron_ext.errors import CorruptCheckpointError

    fit_in_process(RUN + [f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=a"])
    a = tmp_path / "rs" / "a"
    step3 = a / "checkpoints" / "step_0000003"
    before = _tree(a / "checkpoints")
    la = _losses(a)
    # the same layout, the step directory named
    fit_in_process(RUN + [f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=b",
                          f"exp_manager.resume_from_checkpoint={step3}"])
    b = tmp_path / "rs" / "b"
    assert _losses(b) == {s: v for s, v in la.items() if s > 3}
    assert sorted(p.name for p in (b / "checkpoints").glob("step_*")) == ["step_0000006"]
    # ZeRO 0 -> 1 (the layout-free state), the source run directory named (its latest is step 6: train to 8)
    fit_in_process(RUN + [f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=c", "model.zero_stage=1",
                          "trainer.max_steps=8", f"exp_manager.resume_from_checkpoint={a}"])
    c = tmp_path / "rs" / "c"
    assert sorted(_losses(c)) == [7, 8]
    fit_in_process(RUN + [f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=c3", "model.zero_stage=1",
                          f"exp_manager.resume_from_checkpoint={step3}"])
    lc3 = _losses(tmp_path / "rs" / "c3")
    assert sorted(lc3) == [4, 5, 6] and all(abs(lc3[s] - la[s]) <= 1e-5 * abs(la[s]) for s in lc3), (lc3, la)
    # a restarted job (resume_if_exists) goes on from its own checkpoint, not from the source's step 3 again
    fit_in_process(RUN + [f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=b", "trainer.max_steps=7",
                          "exp_manager.resume_if_exists=true", f"exp_manager.resume_from_checkpoint={step3}"])
    assert sorted(_losses(b)) == [4, 5, 6, 7]
    assert _tree(a / "checkpoints") == before  # the source is read, never written
    # bad settings
    msg = entry_error_in_process(RUN + [f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=d",
                                        f"exp_manager.resume_from_checkpoint={step3}", f"model.ckpt_path={step3}"])
    assert "model.ckpt_path=" in msg and "exp_manager.resume_from_checkpoint=" in msg and "set one of them" in msg
    msg = entry_error_in_process(RUN + [f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=d",
                                        f"exp_manager.resume_from_checkpoint={tmp_path / 'nowhere'}"])
    assert f"exp_manager.resume_from_checkpoint: {tmp_path / 'nowhere'} does not exist" in msg, msg
    bad = tmp_path / "bad" / "step_0000003"
    shutil.copytree(step3, bad)
    victim = sorted(bad.glob("*.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match=f"exp_manager.resume_from_checkpoint={bad}.*{victim.name}"):
        fit_in_process(RUN + [f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=d",
                              f"exp_manager.resume_from_checkpoint={bad}"])
    assert not (tmp_path / "rs" / "d" / "checkpoints").exists() or \
        not list((tmp_path / "rs" / "d" / "checkpoints").glob("step_*"))

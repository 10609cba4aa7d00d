"""trainer.nan_policy=skip with real processes (training/bad_steps.py, faults injected by MEGATRON_EXT_FAULT_INJECT).

One DP2 run (A) gets a NaN loss on rank 1 at step 5 and a 100x loss on rank 0 at step 7 (a spike with
loss_spike_factor=3 over a 2-step window): both steps are skipped on every rank and recorded. Its final state --
parameters, Adam moments and step count, LR scheduler, RNG states, every tensor of DeepSpeed's files -- equals
bitwise that of a run (B) whose data omits those two batches (``trainer.skip_steps``: never read); a resume (C) from
A's checkpoint at step 4, written before the bad steps, skips them again at the same steps (from the run
directory's skipped_batches.jsonl) and ends bitwise equal too. ZeRO 0 fp32 for A, B, C; A and B are compared under
ZeRO 3, bf16 ZeRO 2 and PP2 (the pipeline engine) too, and with ``MEXT_BADSTEPS_LAYOUTS=1`` under ZeRO 1, ZeRO 2, bf16
ZeRO 0, ZeRO 2 with CPU offload of the optimizer, TP2 and PP2 with ZeRO 1 as well.
Also: the consecutive-skip limit stops a run naming the steps, and 1,000 clean steps of the tiny model skip
nothing.
"""
import json
import os
import shutil
import subprocess

import pytest
import torch

from helpers import REPO, launch_cmd, multiprocess_env

COMMON = ["+experiment=cpu_smoke", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
          "model.seq_length=32", "model.micro_batch_size=2", "model.global_batch_size=8", "trainer.max_steps=8",
          "trainer.val_check_interval=0", "trainer.log_every_n_steps=1", "exp_manager.create_tensorboard_logger=false",
          "exp_manager.checkpoint_callback_params.every_n_train_steps=4", "exp_manager.name=bad",
          "trainer.nan_policy=skip", "trainer.loss_spike_factor=3", "trainer.loss_spike_window=2"]
FAULTS = "nan:rank=1:steps=5;spike:rank=0:steps=7:factor=100"
GBS = 8


def _run(exp, version, world=2, faults=None, extra=(), check=True, cache=None, common=COMMON):
    env = multiprocess_env(XDG_CACHE_HOME=cache)
    env.pop("MEGATRON_EXT_FAULT_INJECT", None)
    if faults:
        env["MEGATRON_EXT_FAULT_INJECT"] = faults
    p = subprocess.run(launch_cmd(world, ["pretrain_gpt.py", *common, f"trainer.devices={world}",
                                          f"exp_manager.exp_dir={exp}", f"exp_manager.version={version}", *extra]),
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def _metrics(run):
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def _state(step_dir):
    """Every value of DeepSpeed's files and the RNG states of a checkpoint, by file and key path."""
    from megatron_ext.checkpoint.safe_load import load_untrusted

    def flat(x, pre):
        if torch.is_tensor(x):
            return {pre: x}
        if isinstance(x, dict):
            return {k2: v2 for k, v in x.items() for k2, v2 in flat(v, f"{pre}/{k}").items()}
        if isinstance(x, (list, tuple)):
            return {k2: v2 for i, v in enumerate(x) for k2, v2 in flat(v, f"{pre}/{i}").items()}
        return {pre: vars(x) if hasattr(x, "__dict__") else x}  # DeepSpeed's LossScaler: its fields

    out = {}
    for name in sorted(os.listdir(step_dir)):
        if name.endswith(".pt"):
            out.update(flat(load_untrusted(str(step_dir / name), "test"), name))
    return out


def _differ(a, b):
    assert a.keys() == b.keys()
    return [k for k in a if not (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k])]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_home):
    exp = tmp_path_factory.mktemp("bad_steps")
    _run(exp, "A", faults=FAULTS, cache=cache_home)
    _run(exp, "B", extra=["trainer.skip_steps=[5,7]"], cache=cache_home)
    # C: A's run directory as it was after step 4, plus the record of what A skipped later
    a, c = exp / "bad" / "A", exp / "bad" / "C"
    (c / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "step_0000004", c / "checkpoints" / "step_0000004")
    (c / "checkpoints" / "latest").write_text("step_0000004")
    shutil.copy(a / "skipped_batches.jsonl", c / "skipped_batches.jsonl")
    _run(exp, "C", extra=["exp_manager.resume_if_exists=true"], cache=cache_home)
    return exp / "bad"


def test_skipped_steps_leave_no_trace(runs):
    a, b, c = (_state(runs / v / "checkpoints" / "step_0000008") for v in "ABC")
    assert not _differ(a, b)  # A computed the bad batches and dropped them; B never read them
    assert not _differ(a, c)  # C resumed from step 4 and skipped them again, unread
    # the comparison sees a difference where there is one (A's state 4 steps earlier)
    assert _differ(a, _state(runs / "A" / "checkpoints" / "step_0000004"))


def test_skips_are_recorded(runs):
    rows = _metrics(runs / "A")
    skipped = {r["step"]: r for r in rows if r.get("train/skipped")}
    assert sorted(skipped) == [5, 7]
    assert [skipped[5]["train/skipped_samples_start"], skipped[5]["train/skipped_samples_end"]] == [4 * GBS, 5 * GBS]
    assert [skipped[7]["train/skipped_samples_start"], skipped[7]["train/skipped_samples_end"]] == [6 * GBS, 7 * GBS]
    assert not any("train/loss" in r for r in rows if r["step"] in (5, 7))
    recs = [json.loads(line) for line in open(runs / "A" / "skipped_batches.jsonl")]
    assert [(r["step"], r["samples"]) for r in recs] == [(5, [32, 40]), (7, [48, 56])]
    assert "not finite on rank 1" in recs[0]["reason"] and "loss spike" in recs[1]["reason"]
    meta = json.load(open(runs / "A" / "checkpoints" / "step_0000008" / "meta.json"))
    assert [(r["step"], r["samples"]) for r in meta["bad_steps"]["skipped"]] == [(5, [32, 40]), (7, [48, 56])]
    assert len(meta["bad_steps"]["loss_window"]) == 2
    # the resumed run skipped the same batches at the same steps, and its losses are A's
    rows_c = _metrics(runs / "C")
    assert sorted(r["step"] for r in rows_c if r.get("train/skipped")) == [5, 7]
    loss = {v: {r["step"]: r["train/loss"] for r in _metrics(runs / v) if "train/loss" in r} for v in "ABC"}
    assert loss["A"] == loss["B"] and {s: loss["A"][s] for s in (6, 8)} == {s: loss["C"][s] for s in (6, 8)}


PP2 = ["model.pipeline_model_parallel_size=2"]
LAYOUTS = [["model.zero_stage=3"], ["trainer.precision=bf16", "model.zero_stage=2"], PP2]
if os.environ.get("MEXT_BADSTEPS_LAYOUTS") == "1":
    LAYOUTS += [["model.zero_stage=1"], ["model.zero_stage=2"], ["trainer.precision=bf16"],
                ["model.zero_stage=2", "model.offload_optimizer=cpu"], ["model.tensor_model_parallel_size=2"],
                PP2 + ["model.zero_stage=1"]]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "-".join(v.split(".")[-1] for v in x))
def test_skip_under_other_layouts(tmp_path, cache_home, layout):
    # the pipeline computes the loss on its last stage (rank 1): both faults go there
    faults = FAULTS.replace("rank=0", "rank=1") if PP2[0] in layout else FAULTS
    _run(tmp_path, "A", faults=faults, extra=layout, cache=cache_home)
    _run(tmp_path, "B", extra=["trainer.skip_steps=[5,7]", *layout], cache=cache_home)
    step8 = [tmp_path / "bad" / v / "checkpoints" / "step_0000008" for v in "AB"]
    assert not _differ(_state(step8[0]), _state(step8[1]))


def test_consecutive_skips_stop_the_run(tmp_path, cache_home):
    p = _run(tmp_path, "v", world=1, faults="nan:rank=0:steps=2-8", check=False, cache=cache_home,
             common=[x for x in COMMON if not x.startswith("trainer.max_steps=")],
             extra=["trainer.max_consecutive_skips=2", "trainer.max_steps=6"])
    assert p.returncode == 2, p.stderr[-3000:]
    assert "steps 2-4: 3 consecutive steps were bad" in p.stderr and "trainer.max_consecutive_skips=2" in p.stderr
    rows = _metrics(tmp_path / "bad" / "v")
    assert sorted(r["step"] for r in rows if r.get("train/skipped")) == [2, 3, 4]
    assert not (tmp_path / "bad" / "v" / "checkpoints" / "step_0000004").exists()


def test_no_false_positives_over_1000_clean_steps(tmp_path, cache_home):
    """The tiny model, one process, 1,000 steps with a spike factor of 2 over the default 100-step window (stricter
    than a typical 3-5) and nan_policy=skip: nothing is skipped."""
    _run(tmp_path, "v", world=1, cache=cache_home, common=[
        "+experiment=cpu_smoke", "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2",
        "model.seq_length=16", "model.micro_batch_size=2", "model.global_batch_size=2", "trainer.max_steps=1000",
        "trainer.val_check_interval=0", "trainer.log_every_n_steps=100", "exp_manager.create_tensorboard_logger=false",
        "exp_manager.create_checkpoint_callback=false", "exp_manager.name=bad", "trainer.nan_policy=skip",
        "trainer.loss_spike_factor=2", "trainer.loss_spike_window=100"])
    rows = _metrics(tmp_path / "bad" / "v")
    assert max(r["step"] for r in rows) == 1000
    assert not any(r.get("train/skipped") for r in rows)
    assert not (tmp_path / "bad" / "v" / "skipped_batches.jsonl").exists()

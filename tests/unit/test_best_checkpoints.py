"""Best checkpoints (``checkpoint_callback_params.monitor/mode/save_top_k/filename``), early stopping
(``exp_manager.early_stopping_callback_params``) and the NeMo trainer keys (``max_epochs``, float
``val_check_interval`` / ``limit_val_batches``, ``fast_dev_run``): training/best.py, training/run_length.py.

One tiny GPT run (constant lr 0.02: val/loss falls to a minimum at step 6, then rises) checks save_top_k=2 by
val/loss, the filename aliases and early stopping together; its resume checks that both the ranking and the
early-stopping counter come back from the checkpoints. The rest is in-process without training, or a few steps.
"""
import json
import os

import pytest
from helpers import entry_error_in_process, fit_in_process

from megatron_ext.errors import ConfigError
from megatron_ext.training.best import BestCheckpoints, EarlyStopping, FilenameTemplate, metric_name, select_keep

CKPT = "exp_manager.checkpoint_callback_params"
TINY = ["+experiment=cpu_smoke", "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2",
        "model.seq_length=32", "model.micro_batch_size=4", "model.global_batch_size=4", "trainer.log_every_n_steps=2",
        "trainer.limit_val_batches=1", "exp_manager.create_tensorboard_logger=false",
        f"{CKPT}.save_layout_free=false", "~model.optim.sched", "model.optim.weight_decay=0.0"]


def _vals(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["val/loss"] for r in map(json.loads, f) if "val/loss" in r}


def _steps(ckpt_dir):
    return sorted(int(d[5:]) for d in os.listdir(ckpt_dir) if d.startswith("step_"))


# ------------------------------------------------------------------------------------------------ pieces
def test_metric_names_modes_and_templates():
    assert metric_name("val_loss", "k") == "val/loss" and metric_name("val/loss/wiki", "k") == "val/loss/wiki"
    for bad in ("train/loss", "loss", "val/", None):
        with pytest.raises(ConfigError, match=r"^k=.*expected a validation metric: val/loss"):
            metric_name(bad, "k")
    t = FilenameTemplate("megatron_gpt--{val_loss:.2f}-{step}-{consumed_samples}")
    assert t.render({"val_loss": 2.3149, "step": 40, "consumed_samples": 320}) == \
        "megatron_gpt--val_loss=2.31-step=40-consumed_samples=320"
    assert t.render({"step": 40, "consumed_samples": 320}) is None  # a checkpoint without the metric: no name
    assert FilenameTemplate("{step}").render({"step": 5}) == "step=5"
    for bad, why in (("{val_loss:.2f}-{foo}", "unknown field {foo}"), ("{step.real}", "unknown field"),
                     ("{0}", "unknown field"), ("plain", "names no field"), ("{val_loss:d}", "bad format spec"),
                     ("{step", "not a format template")):
        with pytest.raises(ConfigError, match=r"^exp_manager\.checkpoint_callback_params\.filename=.*" + why):
            FilenameTemplate(bad)


def test_select_keep_ranks_scored_checkpoints_and_keeps_the_newest():
    e = [(2, "s2", 3.0), (4, "s4", 1.0), (6, "s6", None), (8, "s8", 2.0), (10, "s10", float("nan")), (12, "s12", 5.0)]
    assert select_keep(e, 2, "min") == ({"s4", "s8", "s12"}, ["s4", "s8"])
    assert select_keep(e, 2, "max") == ({"s12", "s2"}, ["s12", "s2"])
    assert select_keep(e, 0, "min") == ({"s12"}, [])
    assert select_keep(e, -1, "min")[0] == {t for _, t, _ in e}
    assert select_keep([(2, "a", 1.0), (4, "b", 1.0), (6, "c", 9.0)], 1, "min") == ({"a", "c"}, ["a"])  # ties: older


def test_early_stopping_counts_patience_and_carries_its_state():
    es = EarlyStopping("val/loss", "min", patience=2, min_delta=0.1)
    assert [es.update(s, v) for s, v in ((1, 5.0), (2, 4.0), (3, 3.95))] == [None, None, None]
    assert es.wait == 1 and es.best == 4.0  # 3.95 is not better by more than min_delta
    again = EarlyStopping("val/loss", "min", patience=2, min_delta=0.1)
    assert again.load(json.loads(json.dumps(es.state())))
    why = again.update(4, 4.5)
    assert why.startswith("val/loss did not improve by more than min_delta=0.1 for 2 validations (patience 2; best 4")
    assert not EarlyStopping("val/ppl", "min", 2, 0.0).load(es.state())  # another metric: not taken
    assert "is nan" in EarlyStopping("val/loss", "max", 5, 0.0).update(1, float("nan"))


def test_prune_by_score_names_the_best_and_leaves_other_files_alone(tmp_path):
    from megatron_ext.training.checkpointing import Checkpointer

    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    for step, val in ((2, 3.0), (4, 1.0), (5, None), (6, 2.0), (8, 4.0)):
        d = ckpt / f"step_{step:07d}"
        d.mkdir()
        meta = {"step": step, "consumed_samples": 4 * step, **({"val_metrics": {"val/loss": val}} if val else {})}
        (d / "meta.json").write_text(json.dumps(meta))
    (ckpt / "val_loss=3.00-step=2").write_text("the user's own file")  # same name as an alias would get: kept
    c = Checkpointer(str(ckpt), 2, best=BestCheckpoints("val/loss", "min", 2, "{val_loss:.2f}-{step}"))
    c._prune()
    assert _steps(ckpt) == [4, 6, 8]  # the 2 best + the newest (resume needs it), scored or not
    assert os.readlink(ckpt / "val_loss=1.00-step=4") == "step_0000004"
    assert os.readlink(ckpt / "val_loss=2.00-step=6") == "step_0000006"
    assert (ckpt / "val_loss=3.00-step=2").read_text() == "the user's own file"
    best = json.loads((ckpt / "best.json").read_text())
    assert [(r["tag"], r["score"]) for r in best["best"]] == [("step_0000004", 1.0), ("step_0000006", 2.0)]
    # a better checkpoint arrives: step 6 drops out of the best, its alias goes with it (only aliases this run made)
    (ckpt / "step_0000010").mkdir()
    (ckpt / "step_0000010" / "meta.json").write_text(json.dumps({"step": 10, "consumed_samples": 40,
                                                                 "val_metrics": {"val/loss": 0.5}}))
    c._prune()
    assert _steps(ckpt) == [4, 10]
    assert sorted(p.name for p in ckpt.iterdir() if p.is_symlink()) == ["val_loss=0.50-step=10", "val_loss=1.00-step=4"]


# ------------------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize("overrides, expected", [
    ([f"{CKPT}.monitor=val/bogus"], f"error: {CKPT}.monitor: val/bogus is not logged by this run; its validation "
                                    f"logs val/loss, val/ppl"),
    ([f"{CKPT}.monitor=train_loss"], f"error: {CKPT}.monitor='train_loss': expected a validation metric"),
    ([f"{CKPT}.monitor=val_loss", "trainer.val_check_interval=0"], f"error: {CKPT}.monitor=val_loss: the run never "
                                                                   f"validates"),
    ([f'{CKPT}.filename="{{val_loss}}-{{epochs}}"', f"{CKPT}.monitor=val_loss"],
     f"error: {CKPT}.filename='{{val_loss}}-{{epochs}}': unknown field {{epochs}}"),
    ([f"{CKPT}.monitor=val_loss", "exp_manager.create_checkpoint_callback=false"],
     f"error: {CKPT}.monitor=val_loss chooses which checkpoints to keep, but exp_manager.create_checkpoint_callback="
     f"false writes none"),
    ([f'{CKPT}.filename="{{step}}"'], f"error: {CKPT}.filename='{{step}}' names the best checkpoints, which needs "
                                      f"{CKPT}.monitor"),
    (["exp_manager.create_early_stopping_callback=true", "exp_manager.early_stopping_callback_params.patience=0"],
     "error: exp_manager.early_stopping_callback_params.patience=0: expected an integer >= 1"),
    (["trainer.max_steps=-1"], "error: trainer.max_steps=-1 (no step limit) needs trainer.max_epochs"),
    (["trainer.val_check_interval=1.5"], "error: trainer.val_check_interval=1.5: expected an integer number of steps"),
    (["trainer.limit_val_batches=-0.5"], "error: trainer.limit_val_batches=-0.5: expected an integer number"),
    (["trainer.limit_train_batches=0.5"], "error: trainer.limit_train_batches=0.5 (a fraction of each epoch) needs "
                                          "trainer.max_epochs"),
    (["trainer.max_epochs=0"], "error: trainer.max_epochs=0: expected null or an integer >= 1"),
    (["+trainer.fast_dev_run=-1"], "error: trainer.fast_dev_run=-1: expected null, true/false or an integer N >= 0"),
    (["trainer.max_steps=-1", "trainer.max_epochs=1", "model.data.task=copy", "model.tokenizer.library=char",
      "model.seq_length=18", "+model.data.task_params.max_len=8"],
     "error: trainer.max_epochs: the synthetic task 'copy' draws its train examples on the fly"),
])
def test_bad_keys_are_refused_naming_the_key(in_process, tmp_path, overrides, expected):
    line = entry_error_in_process([*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2", *overrides,
                                   f"exp_manager.exp_dir={tmp_path}"])
    assert line.startswith(expected), line


# ------------------------------------------------------------------------------------------------ runs
def test_top_k_by_val_loss_and_early_stopping_survive_a_resume(in_process, tmp_path):
    """lr 0.02: val/loss (every 2 steps) is lowest at step 6, then rises. save_top_k=2 by val_loss keeps the two
    best and the newest; early stopping (patience 3, min_delta 0) stops after the third validation without
    improvement, writing that step. A resume to max_steps 16 goes on from the stopping step's checkpoint with its
    counter (3 >= patience): the next validation stops it again, and the ranking holds the same two best."""
    run = [*TINY, "model.optim.lr=0.02", "trainer.val_check_interval=2", f"{CKPT}.every_n_train_steps=0",
           f"{CKPT}.monitor=val_loss", f"{CKPT}.save_top_k=2", f"{CKPT}.filename=\"{{val_loss:.3f}}-{{step}}\"",
           "exp_manager.create_early_stopping_callback=true", "exp_manager.early_stopping_callback_params.patience=3",
           "exp_manager.early_stopping_callback_params.min_delta=0", f"exp_manager.exp_dir={tmp_path}",
           "exp_manager.version=v"]
    res = fit_in_process([*run, "trainer.max_steps=16"])
    vals, ckpt = _vals(res["run_dir"]), os.path.join(res["run_dir"], "checkpoints")
    best_step = min(vals, key=vals.get)
    stop = best_step + 3 * 2  # three validations (every 2 steps) without improvement
    assert vals[max(vals)] > vals[best_step] and stop < 16, vals  # the run's val/loss rises after its minimum
    assert res["step"] == stop == max(vals) and "did not improve" in res["stopped_early"]
    top2 = sorted(vals, key=vals.get)[:2]
    assert stop not in top2 and _steps(ckpt) == sorted(top2 + [stop])  # the 2 best + the newest (resume needs it)
    aliases = {p: os.readlink(os.path.join(ckpt, p)) for p in os.listdir(ckpt) if os.path.islink(os.path.join(ckpt, p))}
    assert aliases == {f"val_loss={vals[s]:.3f}-step={s}": f"step_{s:07d}" for s in top2}
    with open(os.path.join(ckpt, f"step_{stop:07d}", "meta.json")) as f:
        meta = json.load(f)
    assert meta["val_metrics"]["val/loss"] == vals[stop] and meta["early_stopping"]["wait"] == 3

    res2 = fit_in_process([*run, "trainer.max_steps=16", "exp_manager.resume_if_exists=true"])
    vals2 = _vals(res2["run_dir"])
    assert res2["step"] == stop + 2 and "for 4 validations" in res2["stopped_early"]  # the counter went on
    assert sorted(vals2, key=vals2.get)[:2] == top2 and _steps(ckpt) == sorted(top2 + [stop + 2])


def test_epochs_fractions_and_fast_dev_run(in_process, tmp_path):
    """A synthetic task with a fixed train split of 24 examples, global batch 4: an epoch is 6 steps. max_epochs=2
    with max_steps=-1 runs 12 steps; val_check_interval=0.5 validates every 3; limit_val_batches=0.5 of a 16-example
    validation split is 2 global batches. Then fast_dev_run=2 in a fresh run: 2 steps, one validation, no checkpoint,
    no metrics.jsonl."""
    from megatron_ext.data.gpt_data import build_gpt_datasets
    from megatron_ext.tokenizers import build_tokenizer_from_config
    from megatron_ext.training.run_length import samples_per_epoch

    syn = ["model.data.task=copy", "model.tokenizer.library=char", "model.seq_length=18",
           "+model.data.task_params.max_len=8",
           "+model.data.task_params.num_train=24", "+model.data.task_params.num_val=16", "model.optim.lr=0.003",
           "trainer.max_steps=-1", "trainer.max_epochs=2", "trainer.val_check_interval=0.5",
           "trainer.limit_val_batches=0.5", f"{CKPT}.every_n_train_steps=0", f"exp_manager.exp_dir={tmp_path}"]
    res = fit_in_process([*TINY, *syn, "exp_manager.version=epochs"])
    assert res["step"] == 12 and sorted(_vals(res["run_dir"])) == [3, 6, 9, 12]
    with open(os.path.join(res["run_dir"], "config.yaml")) as f:
        text = f.read()
    assert "max_steps: 12" in text and "val_check_interval: 3" in text and "limit_val_batches: 2" in text
    with open(os.path.join(res["run_dir"], "checkpoints", "step_0000012", "meta.json")) as f:
        assert json.load(f)["epoch"] == 1

    res = fit_in_process([*TINY, *syn, "exp_manager.version=dev", "+trainer.fast_dev_run=2"])
    assert res["step"] == 2 and res["val_loss"] is not None
    assert not os.path.exists(os.path.join(res["run_dir"], "metrics.jsonl"))
    assert os.listdir(os.path.join(res["run_dir"], "checkpoints")) == []

    # GPT .bin/.idx: an epoch is the train split's tokens (less the extra token) // seq_length, the count
    # megatron-core builds for one epoch (a dataset asked for fewer samples holds the whole epoch)
    from megatron_ext.config.loader import load_config

    cfg = load_config()
    tok = build_tokenizer_from_config(cfg.model.tokenizer)
    train, _, _ = build_gpt_datasets(cfg.model.data, tok, 32, (4, 0, 0), 1234)
    assert samples_per_epoch(train) == len(train) > 1000

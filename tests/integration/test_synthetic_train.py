"""Synthetic tasks through pretrain_gpt.py: the copy_task preset learns the copy task end to end; bad task configs
are one clear error."""
import json
import os
import time

from helpers import entry_error_in_process, fit_in_process, run_script


def test_bad_task_config_through_pretrain_gpt(run_env, tmp_path, in_process):
    """The first case through the CLI (exit status 2, one line), the second through the same Trainer in-process."""
    for i, (over, needle) in enumerate(((["model.tokenizer.library=byte"], "model.tokenizer.library"),
                                        (["model.data.task=palindrome"], "reverse, sort"))):
        args = ["+experiment=copy_task", "trainer.max_steps=1", f"exp_manager.exp_dir={tmp_path}", *over]
        if i:
            assert needle in entry_error_in_process(args)
            continue
        r = run_script(["pretrain_gpt.py", *args], dict(run_env, OMP_NUM_THREADS="1"), timeout=300)
        assert r.returncode == 2, r.stderr[-2000:]
        assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1


# ------------------------------------------------------------------------------------------- end to end
def test_copy_task_preset_learns_copy_end_to_end(tmp_path, in_process):
    """The preset as ``pretrain_gpt.py +experiment=copy_task`` composes it, trained in this process (one thread:
    2 shared cores); the command line's composition of the preset is checked by the bad-config test above. 800 of
    its 1000 steps (the schedule then decays sooner: > 0.99 exact match from step 400; the whole preset gets
    there at step 600), to keep the suite's time."""
    t0 = time.perf_counter()
    fit_in_process(["+experiment=copy_task", "trainer.max_steps=800", f"exp_manager.exp_dir={tmp_path}",
                    "exp_manager.version=e2e"])
    wall = time.perf_counter() - t0
    run_dir = tmp_path / "copy_task" / "e2e"
    with open(run_dir / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    vals = [m for m in recs if "val/exact_match" in m]
    assert [m["step"] for m in vals] == [200, 400, 600, 800]
    first, last = vals[0], vals[-1]
    assert last["val/exact_match"] > 0.99, vals
    assert first["val/exact_match"] < last["val/exact_match"] and last["val/loss"] < first["val/loss"]
    assert last["val/token_accuracy"] >= last["val/exact_match"]
    assert any("train/exact_match" in m for m in recs)
    steps_needed = next(m["step"] for m in vals if m["val/exact_match"] > 0.99)
    cfg = (run_dir / "config.yaml").read_text()
    assert "task: copy" in cfg and "library: char" in cfg
    print(f"\ncopy_task: val/exact_match {last['val/exact_match']:.4f} at step {last['step']} (first > 0.99 at "
          f"step {steps_needed}); {wall:.1f}s wall for the whole run")
    assert os.path.isdir(run_dir / "checkpoints")

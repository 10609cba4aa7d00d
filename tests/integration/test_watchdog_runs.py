"""Hangs and stragglers with real processes (2 self-launched CPU ranks, gloo): trainer.step_timeout_minutes (a rank
stopped with SIGSTOP: every rank's stacks in <run_dir>/stacks/, exit status 4 within the timeout + 30 s, one line
naming who waited in a collective), and trainer.straggler_every_n_steps (a rank slowed by 30% with the test-only
sleep fault is named; no rank is named while none is slowed)."""
import glob
import json
import os
import sys

from helpers import run_script
from test_launch import _stop_rank1_mid_training, env  # noqa: F401

from megatron_ext.training.watchdog import read_header

TIMEOUT_MIN = 0.1  # 6 s


def test_stopped_rank_dumps_every_stack_and_exits_4(env, tmp_path):  # noqa: F811
    """SIGSTOP rank 1 mid-training with trainer.step_timeout_minutes=0.1 (the collective timeout is 5 minutes): rank
    0's watchdog dumps its stacks (waiting in a collective), the parent finds rank 1 stopped and takes its stacks,
    and the job exits 4 within 6 + 30 s with one line naming both."""
    rc, out, elapsed = _stop_rank1_mid_training(
        ["trainer.dist_timeout_minutes=5", f"trainer.step_timeout_minutes={TIMEOUT_MIN}"], env, tmp_path)
    print(f"exit 4 came {elapsed:.1f} s after the SIGSTOP")
    assert rc == 4, out[-3000:]
    assert elapsed < TIMEOUT_MIN * 60 + 30, elapsed
    lines = [x for x in out.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, out[-3000:]
    line = lines[0]
    assert f"exceeded trainer.step_timeout_minutes={TIMEOUT_MIN:g} (6 s)" in line, line
    assert "waiting in a collective: rank 0 (" in line and "not in a collective: none" in line, line
    assert "not responding: rank 1 (stopped" in line, line
    assert "Traceback" not in out, out[-3000:]
    stacks = glob.glob(str(tmp_path / "gpt_smoke" / "*" / "stacks"))
    assert len(stacks) == 1 and f"stacks in {stacks[0]}" in line, (stacks, line)
    h = read_header(os.path.join(stacks[0], "rank0.txt"))
    assert h is not None and h["rank"] == 0 and h["collective"] is True, h
    assert "called from " in h["where"] and "at megatron_ext/training/" in h["where"], h  # trainer / preemption check
    with open(os.path.join(stacks[0], "rank0.txt")) as f:
        text0 = f.read()
    assert "in _train_steps" in text0 and "step-watchdog" not in text0.split("\n", 1)[0]
    with open(os.path.join(stacks[0], "rank1.txt")) as f:  # written by faulthandler when the parent woke it
        text1 = f.read()
    assert "most recent call first" in text1 and "in _train_steps" in text1, text1[:2000]


def test_straggler_named_only_while_slowed(run_env, tmp_path):
    """20 steps of 2 ranks; rank 1 sleeps 30% of its compute time in steps 11-20 (MEGATRON_EXT_FAULT_INJECT). The
    gather every 10 steps names no straggler at step 10 (clean) and rank 1 at step 20; the metrics carry
    train/step_time_min/_max/_slowest_rank."""
    e = dict(run_env, OMP_NUM_THREADS="1", MEGATRON_EXT_FAULT_INJECT="sleep:rank=1:steps=11-20:fraction=0.3")
    r = run_script(["pretrain_gpt.py", "+experiment=cpu_smoke", "model.seq_length=128", "model.hidden_size=256",
                    "trainer.max_steps=20", "trainer.val_check_interval=0", "trainer.log_every_n_steps=10",
                    "exp_manager.create_checkpoint_callback=false", "exp_manager.create_tensorboard_logger=false",
                    "trainer.devices=2", "trainer.straggler_every_n_steps=10", f"exp_manager.exp_dir={tmp_path}"],
                   e, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    warnings = [x for x in out.splitlines() if "straggler:" in x]
    assert len(warnings) == 1, (warnings, out[-3000:])
    assert "straggler: rank 1 computed" in warnings[0] and "over steps 11-20;" in warnings[0], warnings
    metrics_path, = glob.glob(str(tmp_path / "gpt_smoke" / "*" / "metrics.jsonl"))
    with open(metrics_path) as f:
        rows = {m["step"]: m for m in map(json.loads, f) if "train/loss" in m}  # (not the test/loss row)
    for step in (10, 20):
        m = rows[step]
        assert 0 < m["train/step_time_min"] <= m["train/step_time_max"], m
        assert m["train/step_time_slowest_rank"] in (0.0, 1.0), m
    assert rows[20]["train/step_time_slowest_rank"] == 1.0
    # (the verdict above is the median per-step ratio; the window means only need to show rank 1 slower)
    assert rows[20]["train/step_time_max"] > 1.1 * rows[20]["train/step_time_min"], rows[20]


def test_parent_prints_the_reporters_line_and_names_its_stopped_worker(tmp_path, capfd):
    """run_workers with a step-timeout report file: rank 1 stops itself (SIGSTOP), rank 0 writes the watchdog's
    report and exits 4; the parent prints one line from the report with rank 1 named stopped, wakes rank 1 with the
    dump signal (its default action ends it here), and returns 4."""
    from megatron_ext.parallel.launch import run_workers

    report = {"step": 3, "timeout_minutes": 0.1, "stacks_dir": str(tmp_path), "collective": {"0": "all_reduce at x"},
              "not_collective": {}, "silent": [1]}
    path = tmp_path / "report.json"
    code = ("import json, os, signal, sys, time\n"
            "r = int(os.environ['RANK'])\n"
            "if r == 1:\n    os.kill(os.getpid(), signal.SIGSTOP)\n    time.sleep(60)\n"
            "time.sleep(1.0)\n"
            f"open({str(path)!r} + '.tmp', 'w').write({json.dumps(report)!r})\n"
            f"os.replace({str(path)!r} + '.tmp', {str(path)!r})\n"
            "sys.exit(4)\n")
    rc = run_workers([sys.executable, "-c", code], 2, dict(os.environ), grace_s=5, settle_s=0.5,
                     step_timeout_report=str(path))
    err = capfd.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert rc == 4 and len(lines) == 1, err
    assert lines[0] == ("error: step 3 exceeded trainer.step_timeout_minutes=0.1 (6 s); waiting in a collective: "
                        "rank 0 (all_reduce at x); not in a collective: none; not responding: rank 1 (stopped "
                        f"(SIGSTOP?); the launcher took its stacks); stacks in {tmp_path}"), lines[0]

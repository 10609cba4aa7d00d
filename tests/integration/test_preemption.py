"""Preemption (SIGTERM / SIGUSR1 -> checkpoint at the next step boundary, exit 75), the SLURM templates' requeue,
and automatic restarts (self-launch trainer.max_restarts, torchrun --max-restarts) resuming without losing steps.

The training runs are tiny GPTs on 2 CPU processes (gloo, one thread each); the uninterrupted run that the
interrupted ones must match (fp32, 1e-6) is trained once for the module. Tests that signal processes start them
with the real interpreter, each in its own session (test_launch.py's helpers)."""
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import REPO, run_script
from test_launch import _children, _finish, _kill_group, _start

from megatron_ext.parallel.launch import EXIT_REQUEUE, RESTART_ENV, run_with_restarts, run_workers

STEPS = 150
COMMON = ["+experiment=cpu_smoke", "model.seq_length=32", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=0",
          "trainer.log_every_n_steps=1", "exp_manager.create_tensorboard_logger=false",
          "exp_manager.checkpoint_callback_params.every_n_train_steps=25", "trainer.devices=2"]


@pytest.fixture
def env(run_env):
    e = dict(run_env, OMP_NUM_THREADS="1", PYTHON=sys.executable, SRUN="")
    for k in list(e):
        if k.startswith(("SLURM_", "TORCHELASTIC_", "MEGATRON_EXT_")) or k in (
                "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "NPROC_PER_NODE", "NNODES", "MASTER_PORT",
                "MAX_RESTARTS"):
            del e[k]
    return e


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["train/loss"] for r in map(json.loads, filter(str.strip, f)) if "train/loss" in r}


def _assert_same_losses(run_dir, ref):
    got = _losses(run_dir)
    assert sorted(got) == sorted(ref), (sorted(set(ref) - set(got))[:10], sorted(set(got) - set(ref))[:10])
    worst = max(abs(got[s] - ref[s]) for s in ref)
    assert worst <= 1e-6, worst


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_home):
    """The uninterrupted run's losses (2 self-launched processes, DP2)."""
    from helpers import script_env

    exp = tmp_path_factory.mktemp("preempt_ref")
    e = dict(script_env(cache_home), OMP_NUM_THREADS="1")
    r = run_script(["pretrain_gpt.py", *COMMON, f"exp_manager.exp_dir={exp}", "exp_manager.version=ref"], e)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    losses = _losses(exp / "gpt_smoke" / "ref")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _wait_for(pred, proc, what, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if pred():
            return
        time.sleep(0.02)
    pytest.fail(f"{what} (exit status {proc.poll()})")


def _metric_lines(path):
    try:
        with open(path) as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


# ------------------------------------------------------------------------------------------------ acceptance
def test_sigusr1_to_rank1_checkpoints_exits_75_and_resumes_the_same(env, tmp_path, reference):
    """SIGUSR1 to rank 1 only: both ranks stop after the same step, write a checkpoint of it and exit 75 (the
    parent too) within 30 s; the resumed run's losses equal the uninterrupted run's at every step."""
    run_dir = tmp_path / "gpt_smoke" / "v"
    cmd = [sys.executable, "pretrain_gpt.py", *COMMON, f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=v"]
    p = _start(cmd, env, tmp_path / "preempt.log")
    try:
        kids = _children(p.pid, 2)
        _wait_for(lambda: _metric_lines(run_dir / "metrics.jsonl") >= 3, p, "training did not reach step 3")
        kids[1].send_signal(signal.SIGUSR1)
        t_sig = time.monotonic()
        (rc, out), = _finish([p], timeout=120)
        elapsed = time.monotonic() - t_sig
    finally:
        _kill_group(p)
    assert rc == EXIT_REQUEUE, out[-4000:]
    assert elapsed < 30, elapsed
    stopped = max(_losses(run_dir))
    assert 3 <= stopped < STEPS, stopped
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped:07d}" or latest.endswith(f"_{stopped}") or int(latest.split("_")[-1]) == stopped
    assert f"preempted: preempted by SIGUSR1 (received by another rank): stopped after step {stopped}" in out, out[-3000:]
    assert "[launch] preempted: the workers wrote a checkpoint and exited 75" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]

    r = run_script(["pretrain_gpt.py", *COMMON, f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=v",
                    "exp_manager.resume_if_exists=true"], env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"at step {stopped}" in r.stderr, r.stderr[-3000:]
    _assert_same_losses(run_dir, reference)


def test_torchrun_max_restarts_resumes_after_a_killed_rank(env, tmp_path, reference):
    """launch/torchrun.sh with MAX_RESTARTS=2 (torchrun --max-restarts=2), exp_manager.version null and no
    resume_if_exists: rank 1 is SIGKILLed once after the first checkpoint; torchrun restarts both workers, which
    resume from latest in the same run directory, and the run completes with the uninterrupted run's losses."""
    e = dict(env, NPROC_PER_NODE="2", MAX_RESTARTS="2")
    p = _start(["bash", "launch/torchrun.sh", *COMMON, f"exp_manager.exp_dir={tmp_path}"], e, tmp_path / "tr.log")
    try:
        _wait_for(lambda: glob.glob(str(tmp_path / "gpt_smoke" / "*" / "checkpoints" / "latest")), p,
                  "no checkpoint was written")
        kids = _children(p.pid, 2)
        kids[1].kill()
        (rc, out), = _finish([p], timeout=240)
    finally:
        _kill_group(p)
    assert rc == 0, out[-4000:]
    assert "--max-restarts=2" in out
    runs = glob.glob(str(tmp_path / "gpt_smoke" / "*"))
    assert len(runs) == 1, runs
    assert "torchrun restarted this worker group (TORCHELASTIC_RESTART_COUNT=1" in out, out[-4000:]
    assert "exp_manager.resume_if_exists=true for this restart" in out
    _assert_same_losses(runs[0], reference)


# ------------------------------------------------------------------------------------------------ SLURM templates
def _fake_scontrol(tmp_path):
    """An ``scontrol`` on PATH that records its arguments (and answers ``show hostnames``)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bindir / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        f"echo \"$*\" >> {calls}\n"
        "if [[ \"$1 $2\" == \"show hostnames\" ]]; then echo \"${3%%,*}\"; fi\n")
    (bindir / "scontrol").chmod(0o755)
    return bindir, calls


STUB = ("import json, os, sys\n"
        "print(json.dumps(sys.argv[1:]))\n"
        "rc = int(os.environ['STUB_RC'])\n"
        "f = os.environ.get('MEGATRON_EXT_REQUEUE_FILE')\n"
        "if os.environ.get('STUB_MARK') and f and os.environ.get('RANK', '0') == '0':\n"
        "    open(f, 'w').write('preempted\\n')\n"
        "sys.exit(rc)\n")


@pytest.mark.parametrize("stub_rc,mark,requeued", [(75, False, True), (3, False, False), (0, False, False)])
def test_slurm_per_task_requeues_on_exit_75(env, tmp_path, stub_rc, mark, requeued):
    """slurm_per_task.sbatch (srun simulated: SRUN=): exit 75 from the task -> `scontrol requeue $SLURM_JOB_ID`;
    any other status -> no requeue, the status passes through. The run directory is pinned to the job id and the
    task resumes from it."""
    bindir, calls = _fake_scontrol(tmp_path)
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    e = dict(env, PATH=f"{bindir}{os.pathsep}{env['PATH']}", SCRIPT=str(stub), STUB_RC=str(stub_rc),
             SLURM_NTASKS="1", SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4242",
             SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_SUBMIT_DIR=str(tmp_path))
    r = subprocess.run(["bash", "launch/slurm_per_task.sbatch", "a=1"], cwd=REPO, env=e, capture_output=True,
                       text=True, timeout=60)
    argv = json.loads(r.stdout.strip().splitlines()[0])
    assert argv[-1] == "a=1" and "exp_manager.version=slurm-4242" in argv, argv
    assert "exp_manager.resume_if_exists=true" in argv, argv
    recorded = calls.read_text().splitlines() if calls.exists() else []
    if requeued:
        assert "requeue 4242" in recorded, (recorded, r.stderr)
        assert r.returncode == 0, r.stderr
    else:
        assert not any(c.startswith("requeue") for c in recorded), recorded
        assert r.returncode == stub_rc, r.stderr


def test_slurm_torchrun_requeues_on_the_requeue_file(env, tmp_path):
    """slurm_torchrun.sbatch: torchrun turns a worker's 75 into its own failure status; the worker's requeue file
    (MEGATRON_EXT_REQUEUE_FILE, set by the template) still makes the template requeue the job."""
    bindir, calls = _fake_scontrol(tmp_path)
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    e = dict(env, PATH=f"{bindir}{os.pathsep}{env['PATH']}", SCRIPT=str(stub), STUB_RC="75", STUB_MARK="1",
             SLURM_NNODES="1", SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4343",
             NPROC_PER_NODE="1", SLURM_SUBMIT_DIR=str(tmp_path), MASTER_PORT=str(__import__("helpers").free_port()))
    r = subprocess.run(["bash", "launch/slurm_torchrun.sbatch", "a=1"], cwd=REPO, env=e, capture_output=True,
                       text=True, timeout=120)
    assert "--max-restarts=0" in r.stderr, r.stderr[-3000:]
    assert "requeue 4343" in calls.read_text().splitlines(), r.stderr[-3000:]
    assert r.returncode == 0, r.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ self-launch parent
def test_max_restarts_restarts_failed_workers_not_bad_input(capfd):
    """run_with_restarts: a rank that fails on the first attempt is restarted (with MEGATRON_EXT_RESTART_COUNT=1) and
    the run succeeds; a line names the restart and its cause. Bad input (2) and preemption (75) are not restarted."""
    flaky = ("import os, sys\n"
             f"n = int(os.environ.get('{RESTART_ENV}', '0'))\n"
             "sys.exit(7 if n == 0 and os.environ['RANK'] == '1' else 0)\n")
    assert run_with_restarts([sys.executable, "-c", flaky], 2, dict(os.environ), max_restarts=2, settle_s=0.5) == 0
    err = capfd.readouterr().err
    assert "[launch] restart 1/2 (trainer.max_restarts) after: rank 1 exited with status 7" in err, err
    assert "restart 2/2" not in err
    always = "import sys; sys.exit(7)"
    assert run_with_restarts([sys.executable, "-c", always], 1, dict(os.environ), max_restarts=1, settle_s=0.5) == 7
    err = capfd.readouterr().err
    assert "restart 1/1" in err and "giving up after 1 restart(s) (trainer.max_restarts=1)" in err, err
    for rc in (2, EXIT_REQUEUE):
        code = f"import sys; sys.exit({rc})"
        assert run_with_restarts([sys.executable, "-c", code], 2, dict(os.environ), max_restarts=3,
                                 settle_s=0.5) == rc
        assert "restart" not in capfd.readouterr().err


def test_parent_forwards_sigusr1_and_reports_75(tmp_path, capfd):
    """SIGUSR1 to the self-launching parent reaches every worker; workers that exit 75 make the parent return 75
    (no failure line)."""
    worker = ("import os, signal, sys, time\n"
              "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))\n"
              f"open(os.path.join({str(tmp_path)!r}, 'ready' + os.environ['RANK']), 'w').close()\n"
              "time.sleep(60)\n"
              "sys.exit(1)\n")

    def signal_when_ready():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all((tmp_path / f"ready{r}").exists() for r in range(2)):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGUSR1)

    th = threading.Thread(target=signal_when_ready)
    th.start()
    t0 = time.monotonic()
    rc = run_workers([sys.executable, "-c", worker], 2, dict(os.environ), grace_s=5, settle_s=0.5)
    th.join()
    assert rc == EXIT_REQUEUE and time.monotonic() - t0 < 50
    err = capfd.readouterr().err
    assert "[launch] SIGUSR1: forwarded to 2 worker processes" in err, err
    assert "error:" not in err, err


def test_max_restarts_is_refused_under_a_launcher(monkeypatch):
    """Under torchrun, trainer.max_restarts would do nothing: refused, naming torchrun's --max-restarts."""
    from helpers import compose_entry_config
    from megatron_ext.errors import ConfigError
    from megatron_ext.parallel.launch import maybe_self_launch

    cfg = compose_entry_config(["+experiment=cpu_smoke", "trainer.max_restarts=2"])
    monkeypatch.setenv("RANK", "0")  # as a launcher sets them
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"trainer.max_restarts=2 .*--max-restarts"):
        maybe_self_launch(cfg)

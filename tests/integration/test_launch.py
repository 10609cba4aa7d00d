"""Launching: self-launch (trainer.devices>1 without a launcher), launch/ scripts (torchrun, deepspeed, SLURM
templates simulated on this machine), and clear errors when a rank dies or hangs.

Every multi-process run trains a tiny GPT for a few steps on 2 CPU processes (gloo) with OMP_NUM_THREADS=1, a
fresh port and a timeout; each process group is started in its own session so a timeout kills all of it.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, free_port

from megatron_ext.parallel.launch import describe_dist_failure, run_workers, strip_launcher_args

TINY = [
    "+experiment=cpu_smoke",
    "model.seq_length=32",
    "trainer.max_steps=3",
    "trainer.val_check_interval=0",
    "exp_manager.create_checkpoint_callback=false",
    "exp_manager.create_tensorboard_logger=false",
]
TIMEOUT = 240


@pytest.fixture
def env(run_env):
    e = dict(run_env, OMP_NUM_THREADS="1", PYTHON=sys.executable, SRUN="")
    for k in list(e):
        if k.startswith(("SLURM_", "TORCHELASTIC_")) or k in ("LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                                                                "NPROC_PER_NODE", "NNODES", "HOSTFILE"):
            del e[k]
    return e


def _start(cmd, env, log_path):
    f = open(log_path, "w")
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    p._log = (f, log_path)  # type: ignore[attr-defined]
    return p


def _kill_group(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _finish(procs, timeout=TIMEOUT):
    """Wait for every process (killing all groups on timeout); returns [(returncode, output)]."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            _kill_group(p)
        for p in procs:
            p.wait()
        outs = [open(p._log[1]).read()[-4000:] for p in procs]
        pytest.fail(f"timed out after {timeout}s:\n" + "\n----\n".join(outs))
    finally:
        for p in procs:
            _kill_group(p)  # leftovers (e.g. workers of a failed launcher)
    res = []
    for p in procs:
        p._log[0].close()
        with open(p._log[1]) as f:
            res.append((p.returncode, f.read()))
    return res


def _run(cmd, env, tmp_path, name="run", timeout=TIMEOUT):
    return _finish([_start(cmd, env, tmp_path / f"{name}.log")], timeout)[0]


def _steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, filter(str.strip, f)) if "train/loss" in r]  # (not test/loss)


def _ok(rc_out):
    rc, out = rc_out
    assert rc == 0, out[-4000:]
    return out


# ------------------------------------------------------------------------------------------------ unit
def test_strip_launcher_args():
    assert strip_launcher_args(["x.py", "--local_rank=1", "a=1", "--local-rank", "0", "b=2"]) == ["x.py", "a=1", "b=2"]
    assert strip_launcher_args(["x.py", "a=--local_rank=1"]) == ["x.py", "a=--local_rank=1"]


def test_describe_dist_failure():
    peer = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:36530. This is typically caused by a remote worker crashing. Check the logs")
    line = describe_dist_failure(peer, 10)
    assert line.startswith("error: rank ") and "died" in line and "trainer.dist_timeout_minutes=10" in line
    assert line.endswith("Connection closed by peer [127.0.0.1]:36530.")
    timeout = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 6000ms for recv operation")
    line = describe_dist_failure(timeout, 0.1)
    assert "timed out after trainer.dist_timeout_minutes=0.1 (6 s)" in line and "hung" in line
    wrapped = ValueError("wrapper")
    wrapped.__cause__ = timeout
    assert describe_dist_failure(wrapped, 0.1) is not None
    assert describe_dist_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), 1) is None
    assert describe_dist_failure(KeyError("x"), 1) is None


def test_run_workers_names_the_failed_rank(capfd):
    code = ("import os, sys, time\n"
            "r = int(os.environ['RANK'])\n"
            "sys.exit(5) if r == 1 else time.sleep(60)\n")
    t0 = time.monotonic()
    rc = run_workers([sys.executable, "-c", code], 3, dict(os.environ), grace_s=5, settle_s=0.5)
    assert rc == 5 and time.monotonic() - t0 < 30
    err = capfd.readouterr().err
    assert "error: rank 1 exited with status 5" in err
    rc = run_workers([sys.executable, "-c", "import os; assert os.environ['WORLD_SIZE'] == os.environ['WORLD_SIZE']"],
                     2, dict(os.environ, WORLD_SIZE="2"))
    assert rc == 0


def test_failure_line_names_the_cause():
    from megatron_ext.parallel.launch import _failure_line

    line, status = _failure_line({0: 3, 1: -signal.SIGKILL}, {})
    assert line.startswith("error: rank 1 was killed by SIGKILL") and "rank 0 exited with status 3" in line
    assert status == 1
    line, status = _failure_line({0: 3}, {1: "stopped"})
    assert line.startswith("error: rank 0 exited with status 3") and status == 3
    assert "rank 1 was still running (stopped: hung?)" in line and line.endswith("stopped the other ranks")
    line, status = _failure_line({2: 3, 1: 2}, {0: "running"})
    assert line.startswith("error: rank 1 exited with status 2") and status == 2 and "rank 0" not in line


def test_pinned_version_lets_run_dir_errors_through(tmp_path):
    """The version the self-launcher gives its workers is the one rank 0 resolves (resume_if_exists: the newest
    version with a checkpoint); an error resolving it reaches the user instead of becoming a fresh start-time
    version (which would silently start a new run beside the one to resume)."""
    from omegaconf import OmegaConf

    from megatron_ext.errors import ConfigError
    from megatron_ext.parallel.launch import _pinned_version

    def cfg(exp_dir, **em):
        return OmegaConf.create({"exp_manager": {"exp_dir": str(exp_dir), "name": "run", "version": None,
                                                 "resume_if_exists": True, **em}})

    for version, age in (("old", 100), ("new", 10), ("newer_no_ckpt", 0)):
        d = tmp_path / "exp" / "run" / version
        d.mkdir(parents=True)
        if version != "newer_no_ckpt":
            (d / "checkpoints").mkdir()
            (d / "checkpoints" / "latest").write_text("step_1")
            t = time.time() - age
            os.utime(d / "checkpoints" / "latest", (t, t))
    assert _pinned_version(cfg(tmp_path / "exp")) == "new"
    assert _pinned_version(cfg(tmp_path / "exp", version="fixed")) is None  # the same in every worker already

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        _pinned_version(cfg(tmp_path / "file"))
    with pytest.raises(Exception) as info:  # a config without resume_if_exists is a bug, not a new run
        _pinned_version(OmegaConf.create({"exp_manager": {"exp_dir": str(tmp_path / "exp"), "name": "run",
                                                          "version": None}}))
    assert "resume_if_exists" in str(info.value)


def test_slurm_task_env_and_arguments(env, tmp_path):
    """slurm_task.sh python mode: rank/world from SLURM_*, MASTER_ADDR = first host of a bracketed node list,
    MASTER_PORT from the job id, trainer.devices = tasks per node (a stub stands in for pretrain_gpt.py)."""
    stub = tmp_path / "stub.py"
    stub.write_text("import json, os, sys\nprint(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ)}))\n")
    e = dict(env, SCRIPT=str(stub), SLURM_JOB_NODELIST="gpu[07-10,12],cpu3", SLURM_NNODES="2", SLURM_NTASKS="8",
             SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_JOB_ID="123456", SLURM_CPUS_PER_TASK="3")
    e.pop("OMP_NUM_THREADS")
    r = subprocess.run(["bash", "launch/slurm_task.sh", "python", "a=1"], cwd=REPO, env=e, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["argv"] == ["trainer.devices=4", "trainer.num_nodes=2", "a=1"]
    assert got["env"]["MASTER_ADDR"] == "gpu07" and got["env"]["MASTER_PORT"] == str(20000 + 123456 % 20000)
    assert got["env"]["SLURM_PROCID"] == "5" and got["env"]["OMP_NUM_THREADS"] == "3"


def test_num_nodes_without_launcher_is_a_clear_error(env, tmp_path):
    rc, out = _run([sys.executable, "pretrain_gpt.py", *TINY, "trainer.num_nodes=2", f"exp_manager.exp_dir={tmp_path}"],
                   env, tmp_path, timeout=120)
    assert rc == 2, out[-3000:]
    assert "error: trainer.num_nodes=2" in out and "launch/" in out and "Traceback" not in out


# ------------------------------------------------------------------------------------------------ self-launch
def test_self_launch_tp2(env, tmp_path):
    """python pretrain_gpt.py trainer.devices=2 model.tensor_model_parallel_size=2: the parent starts 2 ranks that
    agree on one run directory (exp_manager.version is null: the parent pins it)."""
    out = _ok(_run([sys.executable, "pretrain_gpt.py", *TINY, "trainer.devices=2",
                    "model.tensor_model_parallel_size=2", f"exp_manager.exp_dir={tmp_path}"], env, tmp_path))
    assert "[launch] starting 2 processes" in out
    runs = glob.glob(str(tmp_path / "gpt_smoke" / "*"))
    assert len(runs) == 1, runs
    assert _steps(runs[0]) == [1, 2, 3]
    assert "world 2 = tp 2 x pp 1 x dp 1" in out


def _children(pid, n, timeout=120):
    """{rank: psutil.Process} of the workers a self-launching parent started."""
    psutil = pytest.importorskip("psutil")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = {}
        for c in psutil.Process(pid).children():
            try:
                kids[int(c.environ()["RANK"])] = c
            except (KeyError, psutil.Error):
                pass
        if len(kids) == n:
            return kids
        time.sleep(0.1)
    pytest.fail("workers not found")


def _wait_for_steps(run_glob, proc, n=2, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for m in glob.glob(run_glob):
            with open(m) as f:
                if sum(1 for line in f if line.strip()) >= n:
                    return
        time.sleep(0.05)
    pytest.fail(f"training did not reach step {n} (parent exit status {proc.poll()})")


LONG = [*TINY, "trainer.max_steps=100000", "trainer.log_every_n_steps=1", "trainer.devices=2"]


def test_killed_rank_gives_clear_errors(env, tmp_path):
    """SIGKILL one rank mid-training: the other exits at once with 'error: rank 0: a collective operation failed'
    (not after the 5-minute timeout), and the parent names rank 1 and the signal."""
    p = _start([sys.executable, "pretrain_gpt.py", *LONG, "trainer.dist_timeout_minutes=5",
                f"exp_manager.exp_dir={tmp_path}"], env, tmp_path / "kill.log")
    try:
        kids = _children(p.pid, 2)
        _wait_for_steps(str(tmp_path / "gpt_smoke" / "*" / "metrics.jsonl"), p)
        kids[1].kill()
        t_kill = time.monotonic()
        (rc, out), = _finish([p], timeout=120)
        elapsed = time.monotonic() - t_kill
    finally:
        _kill_group(p)
    assert rc != 0, out[-3000:]
    assert elapsed < 60, elapsed
    assert "error: rank 0: a collective operation failed: another rank probably died" in out, out[-3000:]
    assert "error: rank 1 was killed by SIGKILL" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert not kids[0].is_running() or kids[0].status() == "zombie"


def _stop_rank1_mid_training(overrides, env, tmp_path):
    """A self-launched 2-process run of many steps: once it logs steps, rank 1 is SIGSTOPped (a hang, not a death).
    Returns (the parent's exit status, its output, seconds from the stop to its end); every process is gone after."""
    p = _start([sys.executable, "pretrain_gpt.py", *LONG, *overrides, f"exp_manager.exp_dir={tmp_path}"], env,
               tmp_path / "stop.log")
    kids = {}
    try:
        kids = _children(p.pid, 2)
        _wait_for_steps(str(tmp_path / "gpt_smoke" / "*" / "metrics.jsonl"), p)
        kids[1].suspend()
        t_stop = time.monotonic()
        (rc, out), = _finish([p], timeout=120)
        return rc, out, time.monotonic() - t_stop
    finally:
        for k in kids.values():
            try:
                k.kill()
            except Exception:
                pass
        _kill_group(p)


def test_hung_rank_times_out_with_clear_error(env, tmp_path):
    """SIGSTOP one rank (a hang, not a death): with trainer.dist_timeout_minutes=0.1 the other rank reports the
    timed-out collective after ~6 s and exits 3; the parent names the stopped rank."""
    rc, out, elapsed = _stop_rank1_mid_training(["trainer.dist_timeout_minutes=0.1"], env, tmp_path)
    assert rc == 3, out[-3000:]
    assert 0.1 * 60 * 0.8 < elapsed < 0.1 * 60 + 45, elapsed
    assert ("error: rank 0: a collective operation timed out after trainer.dist_timeout_minutes=0.1 (6 s): another "
            "rank probably hung or died") in out, out[-3000:]
    assert "rank 1 was still running (stopped" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_launcher_world_size_mismatch_is_a_clear_error(env, tmp_path):
    """Two processes started as a launcher would (RANK/WORLD_SIZE), but trainer.devices=1: exit 2, naming the key."""
    port = str(free_port())
    procs = [_start([sys.executable, "pretrain_gpt.py", *TINY, "trainer.devices=1", f"exp_manager.exp_dir={tmp_path}"],
                    dict(env, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=port), tmp_path / f"r{r}.log") for r in range(2)]
    for rc, out in _finish(procs, timeout=120):
        assert rc == 2, out[-3000:]
        assert "error: trainer.devices (1) x trainer.num_nodes (1) = 1 but the launcher started 2" in out, out[-3000:]
        assert "Traceback" not in out


# ------------------------------------------------------------------------------------------------ launch/ scripts
def _check_run(tmp_path, version="v", steps=(1, 2, 3)):
    assert _steps(tmp_path / "gpt_smoke" / version) == list(steps)


def test_torchrun_single_node(env, tmp_path):
    e = dict(env, NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    out = _ok(_run(["bash", "launch/torchrun.sh", *TINY, f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=v"],
                   e, tmp_path))
    assert "world 2 = tp 1 x pp 1 x dp 2" in out
    _check_run(tmp_path)


def test_torchrun_two_nodes_static(env, tmp_path):
    """Two torchrun 'nodes' on localhost (NNODES=2, NODE_RANK=0/1, one process each), TP2 across them."""
    port = str(free_port())
    procs = [_start(["bash", "launch/torchrun.sh", *TINY, "model.tensor_model_parallel_size=2",
                     f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=v"],
                    dict(env, NNODES="2", NODE_RANK=str(n), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=port), tmp_path / f"node{n}.log") for n in range(2)]
    outs = [_ok(r) for r in _finish(procs)]
    assert "world 2 = tp 2 x pp 1 x dp 1" in outs[0]
    _check_run(tmp_path)


def test_deepspeed_launcher_localhost_hostfile(env, tmp_path):
    e = dict(env, HOSTFILE=os.path.join(REPO, "launch", "hostfile.example"), MASTER_PORT=str(free_port()))
    out = _ok(_run(["bash", "launch/deepspeed.sh", *TINY, f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=v"],
                   e, tmp_path))
    assert "deepspeed.launcher.launch" in out and "world 2 = tp 1 x pp 1 x dp 2" in out
    _check_run(tmp_path)


def test_slurm_per_task(env, tmp_path):
    """slurm_per_task.sbatch with srun simulated: the per-task part started twice (SLURM_PROCID=0/1)."""
    base = dict(env, SLURM_NTASKS="2", SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4242",
                MASTER_PORT=str(free_port()))
    procs = [_start(["bash", "launch/slurm_per_task.sbatch", *TINY, f"exp_manager.exp_dir={tmp_path}",
                     "exp_manager.version=v"], dict(base, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
                    tmp_path / f"task{r}.log") for r in range(2)]
    outs = [_ok(r) for r in _finish(procs)]
    assert "[slurm_task] task 0/2" in outs[0] and "world 2 = tp 1 x pp 1 x dp 2" in outs[0]
    _check_run(tmp_path)


def test_slurm_torchrun_two_nodes(env, tmp_path):
    """slurm_torchrun.sbatch with srun simulated: two 'nodes' (SLURM_NODEID=0/1) each run torchrun with one
    process; c10d rendezvous on the first host of SLURM_JOB_NODELIST."""
    base = dict(env, SLURM_NNODES="2", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4243", NPROC_PER_NODE="1",
                MASTER_PORT=str(free_port()))
    procs = [_start(["bash", "launch/slurm_torchrun.sbatch", *TINY, f"exp_manager.exp_dir={tmp_path}",
                     "exp_manager.version=v"], dict(base, SLURM_NODEID=str(n)), tmp_path / f"node{n}.log")
             for n in range(2)]
    outs = [_ok(r) for r in _finish(procs)]
    assert "rendezvous localhost:" in outs[0]
    assert any("world 2 = tp 1 x pp 1 x dp 2" in o for o in outs)
    _check_run(tmp_path)

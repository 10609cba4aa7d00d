"""Hydra multirun (``pretrain_gpt.py -m a=1,2 b=3,4``): one run directory per job, nothing overwritten."""
import json
import os

from omegaconf import OmegaConf

from helpers import REPO, run_script

SCRIPT = os.path.join(REPO, "pretrain_gpt.py")
TINY = ["+experiment=cpu_smoke", "model.seq_length=32", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1"]


def _sweep(tmp_path, env, *args, timeout=600):
    # cwd and hydra.sweep.dir in tmp_path: Hydra's own multirun/ directory stays out of the repository
    return run_script([SCRIPT, "-m", *TINY, f"exp_manager.exp_dir={tmp_path / 'exp'}",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}", *args], dict(env, OMP_NUM_THREADS="1"),
                      timeout=timeout, cwd=str(tmp_path))


def _runs(tmp_path):
    base = tmp_path / "exp" / "gpt_smoke"
    return sorted(base.iterdir()) if base.exists() else []


def _metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_two_by_two_sweep_gives_four_run_directories(run_env, tmp_path):
    r = _sweep(tmp_path, run_env, "trainer.max_steps=2", "model.hidden_size=32,64", "model.optim.lr=1e-3,3e-4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = _runs(tmp_path)
    assert len(runs) == 4, runs
    combos = set()
    for d in runs:
        cfg = OmegaConf.load(d / "config.yaml")
        combos.add((cfg.model.hidden_size, cfg.model.optim.lr))
        # the directory name carries the job number and its swept values; the sweep's jobs share one start time
        assert f"model.hidden_size-{cfg.model.hidden_size}" in d.name and "model.optim.lr-" in d.name
        m = _metrics(d)
        assert sorted(x["step"] for x in m if "train/loss" in x) == [1, 2]
        assert [x["step"] for x in m if "val/loss" in x] == [2]
        first_lr = next(x["train/lr"] for x in m if x["step"] == 1)
        assert first_lr <= cfg.model.optim.lr
        # nothing of another job landed here
        assert sorted(p.name for p in d.iterdir() if p.name.startswith(("config", "metrics"))) == \
            ["config.yaml", "metrics.jsonl"]
        assert (d / "checkpoints" / "latest").exists()
    assert combos == {(32, 1e-3), (32, 3e-4), (64, 1e-3), (64, 3e-4)}
    assert sorted(d.name.split("_job")[1][0] for d in runs) == ["0", "1", "2", "3"]
    assert len({d.name.split("_job")[0] for d in runs}) == 1


def test_sweep_resumes_each_job_and_explicit_version(run_env, tmp_path):
    r = _sweep(tmp_path, run_env, "trainer.max_steps=2", "model.optim.lr=1e-3,3e-4")
    assert r.returncode == 0, r.stderr[-3000:]
    first = _runs(tmp_path)
    assert len(first) == 2
    # the same sweep again with resume: each job continues its own directory (same job number and values)
    r = _sweep(tmp_path, run_env, "trainer.max_steps=4", "model.optim.lr=1e-3,3e-4", "exp_manager.resume_if_exists=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _runs(tmp_path) == first
    for d in first:
        steps = sorted(x["step"] for x in _metrics(d) if "train/loss" in x)
        assert steps == [1, 2, 3, 4], (d, steps)
        assert (d / "checkpoints" / "latest").read_text().strip() == "step_0000004"
        lr = OmegaConf.load(d / "config.yaml").model.optim.lr
        assert ("lr-0.001" in d.name) == (lr == 1e-3)
    # a fixed exp_manager.version becomes <version>_job<N>_<swept values>
    r = _sweep(tmp_path, run_env, "trainer.max_steps=2", "model.optim.lr=1e-3,3e-4", "exp_manager.version=sw")
    assert r.returncode == 0, r.stderr[-3000:]
    names = {d.name for d in _runs(tmp_path)} - {d.name for d in first}
    assert names == {"sw_job0_model.optim.lr-0.001", "sw_job1_model.optim.lr-0.0003"}


def test_fixed_version_with_self_launched_workers_is_refused(run_env, tmp_path):
    r = _sweep(tmp_path, run_env, "trainer.devices=2", "trainer.max_steps=1", "model.optim.lr=1e-3,3e-4",
               "exp_manager.version=fixed", timeout=300)
    assert r.returncode == 2
    assert "exp_manager.version='fixed'" in r.stderr and "Traceback" not in r.stderr
    assert _runs(tmp_path) == []

"""Bad inputs, config part: every accepted key does something, and a bad config fails before any process starts
with one line and the documented exit status (2)."""
import json
import os

import pytest
from omegaconf import OmegaConf

from conftest import REPO, run_script

_CFG_TINY = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.seq_length=32",
    "model.micro_batch_size=2",
    "model.global_batch_size=4",
    "trainer.log_every_n_steps=1",
    "trainer.limit_val_batches=1",
    "trainer.val_check_interval=0",
]
_CFG_YAML = os.path.join(REPO, "configs", "gpt", "megatron_gpt_config.yaml")


def _cfg_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _cfg_lrs(run_dir):
    return {r["step"]: r["train/lr"] for r in _cfg_metrics(run_dir) if "train/lr" in r}


def _cfg_bad(run_env, *args):
    """Run pretrain_gpt.py with a bad config: it must exit 2 with one ``error:`` line and start no worker."""
    r = run_script(["pretrain_gpt.py", *_CFG_TINY, *args], run_env, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "[launch] starting" not in r.stderr, r.stderr[-2000:]
    return r.stderr


# ----------------------------------------------------------------------------------- 6b: resume with a new config
def test_cfg_resume_with_new_lr_and_schedule_takes_effect(run_env, tmp_path):
    common = [*_CFG_TINY, "trainer.max_steps=4", f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=r",
              "model.optim.sched.warmup_ratio=0", "exp_manager.checkpoint_callback_params.every_n_train_steps=2"]
    r = run_script(["pretrain_gpt.py", *common, "model.optim.lr=1e-2", "model.optim.sched.min_lr=1e-3",
                    "trainer.limit_train_batches=2"], run_env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script(["pretrain_gpt.py", *common, "model.optim.lr=1e-3", "model.optim.sched.min_lr=1e-4",
                    "exp_manager.resume_if_exists=true"], run_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model.optim.lr: 0.01 -> 0.001" in r.stderr, r.stderr[-3000:]
    assert "model.optim.sched.min_lr: 0.001 -> 0.0001" in r.stderr, r.stderr[-3000:]
    lrs = _cfg_lrs(tmp_path / "megatron_gpt" / "r")
    assert lrs[1] == pytest.approx(1e-2)  # the first run
    import math

    for step in (3, 4):  # cosine from the new lr to the new min_lr over 4 steps; lr(s) logged at step s + 1
        s = step - 1
        want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * s / 4))
        assert lrs[step] == pytest.approx(want, rel=1e-6), (step, lrs)


# ------------------------------------------------------------------------------- 8: removed optimizer keys stay out
def test_cfg_removed_sched_key_stays_removed_through_hydra():
    from hydra import compose, initialize_config_dir

    from megatron_ext.config.loader import check_schema, register_schemas
    from megatron_ext.config.schema import GPTConfig

    register_schemas()
    with initialize_config_dir(config_dir=os.path.dirname(_CFG_YAML), version_base=None):
        cfg = compose(config_name="megatron_gpt_config", overrides=["~model.optim.sched", "~model.optim.betas"])
    checked = check_schema(cfg, GPTConfig)
    assert "sched" not in checked.model.optim and "betas" not in checked.model.optim


def test_cfg_switch_to_sgd_and_constant_schedule():
    import torch

    from megatron_ext.config.loader import check_schema, load_config
    from megatron_ext.config.schema import GPTConfig
    from megatron_ext.training.lr_schedulers import ConstantPolicy, build_scheduler
    from megatron_ext.training.optim import build_optimizer

    model = torch.nn.Linear(2, 2)
    for overrides in (["model.optim={name: sgd, lr: 0.1, sched: {name: constant}}"],
                      ["~model.optim.betas", "model.optim.name=sgd", "model.optim.sched={name: constant}"]):
        cfg = check_schema(load_config(GPTConfig, _CFG_YAML, overrides), GPTConfig)
        opt = build_optimizer(model, cfg.model.optim)
        assert isinstance(opt, torch.optim.SGD), overrides
        assert isinstance(build_scheduler(opt, cfg.model.optim.sched, 10), ConstantPolicy)
    # a YAML that names sgd and no betas: SGD's own defaults, nothing merged from the schema
    y = OmegaConf.load(_CFG_YAML)
    y.model.optim = {"name": "sgd", "lr": 0.1}
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"cfg_sgd_{os.getpid()}.yaml")
    OmegaConf.save(y, path)
    try:
        cfg = check_schema(load_config(GPTConfig, path), GPTConfig)
    finally:
        os.remove(path)
    assert dict(cfg.model.optim) == {"name": "sgd", "lr": 0.1}
    assert isinstance(build_optimizer(model, cfg.model.optim), torch.optim.SGD)


def test_cfg_sgd_dict_override_on_the_command_line(run_env, tmp_path):
    r = run_script(["pretrain_gpt.py", *_CFG_TINY, "trainer.max_steps=1", f"exp_manager.exp_dir={tmp_path}",
                    "exp_manager.version=s", "model.optim={name: sgd, lr: 0.05, sched: {name: constant}}"], run_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _cfg_lrs(tmp_path / "megatron_gpt" / "s") == {1: pytest.approx(0.05)}


# ------------------------------------------------------------------------------------- 9: no accepted no-op keys
def test_cfg_reset_attention_mask_is_refused(run_env):
    err = _cfg_bad(run_env, "model.data.reset_attention_mask=true")
    assert "model.data.reset_attention_mask" in err


# ---------------------------------------------------------------------- 11c: one line, exit 2, before any process
def test_cfg_dist_timeout_must_be_positive(run_env):
    assert "trainer.dist_timeout_minutes" in _cfg_bad(run_env, "trainer.dist_timeout_minutes=0")


def test_cfg_tp_not_dividing_heads_fails_before_workers_start(run_env):
    err = _cfg_bad(run_env, "trainer.devices=2", "model.tensor_model_parallel_size=2", "model.num_attention_heads=1",
                   "model.hidden_size=64")
    assert "model.num_attention_heads=1" in err and "tensor_model_parallel_size=2" in err


@pytest.mark.parametrize("override", ["model.hiden_size=64", "model.hidden_size=[64"])
def test_cfg_hydra_config_errors_exit_2(run_env, override):
    r = run_script(["pretrain_gpt.py", override], run_env, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])

"""The bad-step rules in one process (training/bad_steps.py) and the test-only fault injector (training/faults.py).
Real runs: tests/integration/test_bad_steps_runs.py."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from megatron_ext.config.loader import parse_skip_steps, validate_bad_steps
from megatron_ext.config.schema import TrainerConfig
from megatron_ext.errors import CheckpointError, ConfigError, MegatronExtError
from megatron_ext.training import bad_steps, faults


def _t(**kw):
    return OmegaConf.merge(OmegaConf.structured(TrainerConfig), kw)


def test_fault_syntax():
    fs = faults.parse("nan:rank=1:steps=5 ; spike:rank=0:steps=2,7-9:factor=50")
    assert [(f.kind, f.rank, sorted(f.steps), f.args) for f in fs] == [
        ("nan", 1, [5], {}), ("spike", 0, [2, 7, 8, 9], {"factor": 50.0})]
    assert faults.parse("spike:rank=0:steps=3")[0].args == {"factor": 100.0}
    assert faults.parse(None) == [] and faults.parse("  ") == []
    for bad, why in [("nan:rank=1", "'steps=' is missing"), ("boom:rank=0:steps=1", "unknown kind 'boom'"),
                     ("nan:rank=x:steps=1", "rank is not an integer"), ("nan:rank=0:steps=3-1", "A <= B"),
                     ("nan:rank=0:steps=1:factor=2", "unknown argument(s) factor"),
                     ("spike:rank=0:steps=1:factor=-1", "factor must be > 0"), ("nan:rank:steps=1", "not name=value")]:
        with pytest.raises(ConfigError, match="MEGATRON_EXT_FAULT_INJECT") as e:
            faults.parse(bad)
        assert why in str(e.value), (bad, str(e.value))


def test_fault_active(monkeypatch):
    monkeypatch.setenv(faults.ENV, "nan:rank=1:steps=5-6")
    assert faults.active("nan", 1, 5).rank == 1 and faults.active("nan", 1, 6) is not None
    assert faults.active("nan", 0, 5) is None and faults.active("nan", 1, 7) is None
    assert faults.active("spike", 1, 5) is None
    monkeypatch.delenv(faults.ENV)
    assert faults.active("nan", 1, 5) is None


def test_config_checks():
    assert parse_skip_steps([5, "7-9", 8]) == [5, 7, 8, 9]
    for val in (["x"], [0], ["5-3"]):
        with pytest.raises(ConfigError, match="trainer.skip_steps"):
            parse_skip_steps(val)
    validate_bad_steps(_t(nan_policy="skip", loss_spike_factor=3.0), precision="bf16")
    for kw, prec, key in [
        ({"nan_policy": "ignore"}, "32", "trainer.nan_policy='ignore'"),
        ({"loss_spike_factor": 1.0}, "32", "trainer.loss_spike_factor=1.0"),
        ({"loss_spike_window": 0}, "32", "trainer.loss_spike_window=0"),
        ({"max_consecutive_skips": -1}, "32", "trainer.max_consecutive_skips=-1"),
        ({"nan_policy": "skip"}, "16", "precision=16"),
        ({"loss_spike_factor": 3.0}, "16", "precision=16"),
    ]:
        with pytest.raises(ConfigError, match="trainer.") as e:
            validate_bad_steps(_t(**kw), precision=prec)
        assert key in str(e.value), (kw, str(e.value))


def _guard(**kw):
    return bad_steps.BadSteps(_t(**kw), global_batch_size=4, rank=0, device=torch.device("cpu"))


def test_verdict_nan_and_spike_window(tmp_path):
    g = _guard(nan_policy="skip", loss_spike_factor=3.0, loss_spike_window=3)
    g.start(str(tmp_path), consumed=0, meta=None, own_run=False)
    why, _ = g.verdict(1, torch.tensor(float("nan")), None)
    assert "not finite on rank 0 (nan)" in why
    why, _ = g.verdict(1, torch.tensor(2.0), torch.tensor(float("inf")))
    assert "gradient norm is inf" in why
    for loss in (2.0, 2.0):  # the window is not full: no spike check yet
        assert g.verdict(2, torch.tensor(100.0), None)[0] is None
        g.good(loss)
    g.good(2.0)
    assert g.verdict(5, torch.tensor(5.9), None)[0] is None
    why, mean = g.verdict(5, torch.tensor(6.1), None)
    assert mean == pytest.approx(6.1) and "loss spike: 6.1 > trainer.loss_spike_factor=3 x the running mean 2" in why
    stop = _guard(loss_spike_factor=3.0, loss_spike_window=1)
    stop.good(1.0)
    with pytest.raises(MegatronExtError, match="step 9: loss spike.*nan_policy=stop"):
        stop.verdict(9, torch.tensor(4.0), None)


def test_records_resume_and_limit(tmp_path):
    g = _guard(nan_policy="skip", max_consecutive_skips=1, skip_steps=[3])
    g.start(str(tmp_path), consumed=0, meta=None, own_run=False)
    assert g.recorded(0) is None and g.recorded(8) == "trainer.skip_steps"  # step 3 = samples [8, 12)
    m = g.skipped(5, 16, "the loss is not finite on rank 1 (nan)", computed=True)
    assert m["train/skipped_samples_start"] == 16 and m["train/skipped_samples_end"] == 20
    g.check_consecutive(5, "x")
    g.skipped(6, 20, "again", computed=True)
    with pytest.raises(MegatronExtError, match="steps 5-6: 2 consecutive steps.*max_consecutive_skips=1"):
        g.check_consecutive(6, "again")
    lines = [json.loads(x) for x in open(tmp_path / bad_steps.RUN_FILE)]
    assert [(r["step"], r["samples"]) for r in lines] == [(5, [16, 20]), (6, [20, 24])]
    # a resume from a checkpoint at step 2 (8 samples): both batches come from the run file and are skipped unread
    r = _guard(nan_policy="skip")
    r.start(str(tmp_path), consumed=8, meta={"bad_steps": {"skipped": [], "loss_window": [1.5]}}, own_run=True)
    assert list(r.window) == [1.5]
    assert r.recorded(8) is None and r.recorded(12) is None
    assert r.recorded(16) == "recorded: the loss is not finite on rank 1 (nan)" and r.recorded(20) == "recorded: again"
    assert r.recorded(24) is None
    r.skipped(5, 16, "recorded: the loss is not finite on rank 1 (nan)", computed=False)  # listed already: not again
    assert len(open(tmp_path / bad_steps.RUN_FILE).readlines()) == 2
    # a fresh run in that directory puts the old record aside instead of obeying it
    f = _guard()
    f.start(str(tmp_path), consumed=0, meta=None, own_run=False)
    assert not (tmp_path / bad_steps.RUN_FILE).exists() and (tmp_path / "skipped_batches.1.jsonl").exists()
    assert f.recorded(16) is None


def test_run_file_checks(tmp_path):
    p = tmp_path / bad_steps.RUN_FILE
    p.write_text('{"step": 5, "samples": [16, 20], "reason": "x"}\n{"step": 6, "sam')  # torn last line: ignored
    assert [r["step"] for r in bad_steps.read_run_file(str(p))] == [5]
    p.write_text('{"step": 5, "samples": [20, 16]}\n{"step": 6, "samples": [20, 24]}\n')
    with pytest.raises(CheckpointError, match="line 1: expected a skipped-batch record"):
        bad_steps.read_run_file(str(p))
    g = _guard()
    with pytest.raises(CheckpointError, match="loss_window"):
        g.start(str(tmp_path), 0, {"bad_steps": {"skipped": [], "loss_window": ["a"]}}, own_run=False)

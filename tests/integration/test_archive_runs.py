""".mext archives from real runs: exported from multi-process runs (ZeRO-3, TP2; restored at TP2 too), the export
tool's errors, save_to from a pipeline."""
import json
import os
import subprocess

import pytest
import torch

from helpers import (GPT_ZERO3_DP2_RUN, REPO, greedy_ids, launch_cmd, multiprocess_env, run_main_in_process,
                     run_script)
from megatron_ext.config.loader import load_config
from megatron_ext.inference.lm import LM
from megatron_ext.parallel.state import initialize_parallel
from megatron_ext.checkpoint import archive as A


WORKER = os.path.join(REPO, "tests", "workers", "archive_tp_worker.py")


@pytest.fixture(autouse=True, scope="module")
def _tp1():
    initialize_parallel(1, 1, accelerator="cpu")
    yield


# ------------------------------------------------------------------------------------------- from real runs
def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


RUN = [o for o in GPT_ZERO3_DP2_RUN if o != "model.zero_stage=3"]  # 2 self-launched processes, 6 steps


@pytest.mark.parametrize("layout", [["model.zero_stage=3"], ["model.tensor_model_parallel_size=2"]],
                         ids=["zero3_dp2", "tp2"])
def test_export_from_run_reproduces_val_loss_andgreedy_ids(tmp_path, run_env, layout, request, capsys):
    """ZeRO-3: the session's shared run (helpers.GPT_ZERO3_DP2_RUN = RUN + ZeRO-3), exported through the tool's
    CLI; TP2: a run of its own, exported through the same main in-process."""
    from megatron_ext.cli.export_archive import main as export_main
    from megatron_ext.inference.runs import validation_loss, verify_stable_load

    if layout == ["model.zero_stage=3"]:
        run_dir = str(request.getfixturevalue("gpt_zero3_dp2_run"))
    else:
        r = run_script(["pretrain_gpt.py", *RUN, *layout, f"exp_manager.exp_dir={tmp_path}",
                        "exp_manager.version=v"], run_env)
        assert r.returncode == 0, r.stderr[-3000:]
        run_dir = str(tmp_path / "megatron_gpt" / "v")
    logged = [m["val/loss"] for m in _metrics(run_dir) if "val/loss" in m and m["step"] == 6]
    assert len(logged) == 1
    out = str(tmp_path / "run.mext")
    if layout == ["model.zero_stage=3"]:
        r = run_script(["tools/export_archive.py", "--input", run_dir, "--output", out], run_env)
    else:
        r = run_main_in_process(export_main, ["--input", run_dir, "--output", out], capsys)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 6" in r.stdout
    lm = LM.restore_from(out)  # one CPU process, TP=1
    assert lm.info["source"]["step"] == 6
    assert abs(validation_loss(lm) - logged[0]) < 1e-5
    report = verify_stable_load(run_dir)  # the run directory directly, same figure
    assert report["abs_diff"] < 1e-5 and report["deterministic"]
    direct = LM.restore_from(run_dir)
    assert greedy_ids(lm, [10, 20, 30], 12) == greedy_ids(direct, [10, 20, 30], 12)
    if "tensor_model_parallel_size=2" in layout[0]:
        # restore the archive at TP2 (2 processes): same loss and greedy; a live save_to there gathers the shards
        res = tmp_path / "tp2.json"
        proc = subprocess.run(launch_cmd(2, [WORKER, out, str(tmp_path / "from_tp2.mext"), str(res)]), cwd=REPO,
                              env=multiprocess_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        got = json.loads(res.read_text())
        assert got["tp"] == 2
        assert abs(got["val_loss"] - logged[0]) < 1e-5
        assert got["greedy"] == greedy_ids(lm, [10, 20, 30], 12)
        regathered = A.read_archive(str(tmp_path / "from_tp2.mext"))["state_dict"]
        original = A.read_archive(out)["state_dict"]
        assert regathered.keys() == original.keys()
        for k in original:
            assert torch.equal(regathered[k], original[k]), k


def test_export_archive_cli_errors(tmp_path, run_env):
    r = run_script(["tools/export_archive.py", "--input", str(tmp_path / "nope"), "--output", "x.mext"], run_env)
    assert r.returncode == 2 and "not a directory" in r.stderr
    r = run_script(["tools/export_archive.py", "--input", str(tmp_path), "--output", str(tmp_path / "x.mext")],
                   run_env)
    assert r.returncode == 2 and "error:" in r.stderr


def test_save_to_from_a_pipeline(tmp_path):
    """PP=2 stages (2 processes) -> one archive under the plain model's names == the same config built at TP1."""
    out = str(tmp_path / "pp.mext")
    proc = subprocess.run(launch_cmd(2, [WORKER, "--pipeline", out]), cwd=REPO, env=multiprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from megatron_ext.training.gpt_task import GPTTask

    cfg = load_config(overrides=["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                                 "model.seq_length=16"])
    ref = GPTTask(cfg, torch.device("cpu")).build_model()
    back = LM.restore_from(out)
    assert back.family == "gpt" and back.config["model"]["pipeline_model_parallel_size"] == 1
    sd, ref_sd = back.model.state_dict(), ref.state_dict()
    assert set(sd) == set(ref_sd)
    vocab = ref.vocab_size
    for k in ref_sd:
        if k.endswith("_extra_state"):
            continue
        a, b = sd[k], ref_sd[k]
        if k.endswith(A.VOCAB_SUFFIXES):
            a, b = a[:vocab], b[:vocab]
        assert torch.equal(a, b), k

"""The encoder-decoder model at TP2 (torchrun, gloo) equals TP1."""
import importlib.util
import json
import os
import subprocess

import pytest

from helpers import REPO
from megatron_ext.parallel.state import initialize_parallel


S_ENC, S_DEC = 12, 10


WORKER = os.path.join(REPO, "tests", "workers", "encdec_tp_worker.py")


@pytest.fixture(autouse=True, scope="module")
def _tp1():
    initialize_parallel(1, 1, accelerator="cpu")
    yield


@pytest.mark.skipif(importlib.util.find_spec("torch.distributed.run") is None, reason="torchrun not available")
def test_tp2_matches_tp1(tmp_path):
    from helpers import launch_cmd, multiprocess_env

    out = tmp_path / "encdec_tp.json"
    env = multiprocess_env()
    cmd = launch_cmd(2, [WORKER, str(out)])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res) == {"transformer", "transformer_rope_untied", "perceiver", "perceiver_rope_untied_recompute"}
    for name, r in res.items():
        assert r["init_diff"] == 0.0, (name, r)  # same seed -> same full weights at TP1 and TP2
        assert r["loss_diff"] < 1e-5, (name, r)
        assert r["logits_diff"] < 1e-5, (name, r)
        assert r["emb_grad_diff"] < 1e-5, (name, r)
        assert r["max_grad_diff"] < 1e-5, (name, r)
        assert r["trimmed_shape"] == [2, 8, 60], (name, r)

"""GPTModel at TP=2 (2 gloo processes on CPU) equals TP=1: loss, gathered logits, gradients (multi-head and
grouped-query attention; also the Mega LM imported from Hugging Face's MegaForCausalLM: logits vs transformers',
greedy tokens); packed documents (segment ids) at TP=2 give each document's loss as if it ran alone (fp64)."""
import importlib.util
import json
import os
import subprocess

import pytest

from helpers import REPO, launch_cmd, multiprocess_env

WORKER = os.path.join(REPO, "tests", "workers", "model_tp_worker.py")


@pytest.mark.skipif(importlib.util.find_spec("torch.distributed.run") is None, reason="torchrun not available")
def test_tp2_matches_tp1(tmp_path):
    out = tmp_path / "tp_results.json"
    env = multiprocess_env()
    cmd = launch_cmd(2, [WORKER, str(out)])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for name in ("gpt2_like", "llama_like", "gpt2_like_recompute", "llama_gqa"):
        r = res[name]
        assert r["init_diff"] == 0.0, (name, r)  # same seed -> same full weights at TP1 and TP2
        assert r["loss_diff"] < 1e-5, (name, r)
        assert r["logits_diff"] < 1e-5, (name, r)
        assert r["emb_grad_diff"] < 1e-5, (name, r)
        assert r["max_grad_diff"] < 1e-5, (name, r)
        assert r["trimmed_shape"] == [2, 12, 60], (name, r)
    ce = res["cross_entropy"]  # ours vs megatron-core's vocab_parallel_cross_entropy across 2 vocab shards
    assert ce["loss_diff"] < 1e-5 and ce["grad_diff"] < 1e-6 and ce["loss_mean"] > 1.0, ce
    assert res["rng"]["default_same"] and res["rng"]["tp_differs"], res["rng"]
    for name, r in res["mega_hf"].items():  # HF Mega imported at TP2: vocabulary-parallel head, replicated layers
        assert r["padded_vocab"] == 512 and r["same_params"], (name, r)
        assert r["logits_diff"] < 1e-4 and r["loss_diff"] < 1e-5 and r["max_grad_diff"] < 1e-5, (name, r)
        assert r["greedy"] == r["hf_greedy"], (name, r)
    assert len(res["mega_hf"]["causal_rotary"]["greedy"]) == 8
    for name in ("learned", "rope", "rope_gqa"):  # packed documents at TP2: each document's loss as if alone (fp64)
        dm = res["docmask"][name]
        assert dm["max_diff"] < 1e-6 and dm["unmasked_diff"] > 1e-3, (name, dm)

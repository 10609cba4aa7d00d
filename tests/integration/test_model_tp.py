"""GPTModel at TP=2 (2 gloo processes on CPU) equals TP=1: loss, gathered logits, gradients (multi-head and
grouped-query attention; also the Mega LM imported from Hugging Face's MegaForCausalLM: logits vs transformers',
greedy tokens; GPT-2 and a grouped-query Llama imported with tools/convert_from_hf.py: logits vs transformers');
packed documents (segment ids) at TP=2 give each document's loss as if it ran alone (fp64)."""
import importlib.util
import json
import os
import subprocess

import pytest

from helpers import REPO, launch_cmd, multiprocess_env

WORKER = os.path.join(REPO, "tests", "workers", "model_tp_worker.py")


def _hf_imports(tmp_path):
    """Tiny random HF GPT-2 and Llama (GQA 8 heads / 2 KV heads when model.num_query_groups exists), imported
    with tools/convert_from_hf.py, and transformers' logits of some tokens; None without transformers."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    from megatron_ext.cli.convert_from_hf import main as convert_from_hf
    from megatron_ext.config.schema import ModelConfig
    from megatron_ext.inference.hf_import import import_from_hf

    gqa = "num_query_groups" in ModelConfig.__dataclass_fields__
    d = tmp_path / "hf_imports"
    d.mkdir()
    models = {
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=259, n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)),
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2 if gqa else 8, max_position_embeddings=64, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    }
    tokens = torch.randint(0, 259, (2, 20), generator=torch.Generator().manual_seed(3))
    cases = {}
    g = torch.Generator().manual_seed(0)
    for name, hf in models.items():
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 0.2))
            logits = hf.eval()(tokens).logits
        hf.save_pretrained(str(d / f"{name}_hf"))
        torch.save({"tokens": tokens, "logits": logits}, str(d / f"{name}_logits.pt"))
        assert convert_from_hf(["--input", str(d / f"{name}_hf"), "--output", str(d / f"{name}.mext"),
                                "--tokenizer-library", "byte"]) == 0
        mc = import_from_hf(str(d / f"{name}_hf"))["model_config"]
        cases[name] = {"model": {**mc, "seq_length": 32}, "vocab_size": 259}
    (d / "cases.json").write_text(json.dumps(cases))
    return d


@pytest.mark.skipif(importlib.util.find_spec("torch.distributed.run") is None, reason="torchrun not available")
def test_tp2_matches_tp1(tmp_path):
    out = tmp_path / "tp_results.json"
    env = multiprocess_env()
    hf_dir = _hf_imports(tmp_path)
    cmd = launch_cmd(2, [WORKER, str(out)] + ([str(hf_dir)] if hf_dir is not None else []))
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
    if hf_dir is not None:  # imported HF models at TP2 (as model.ckpt_path=X.mext loads them) give HF's logits
        for name in ("gpt2", "llama"):
            r = res["hf_import"][name]
            assert r["logits_diff"] < 1e-4 and r["shape"] == [2, 20, 259] and r["padded"] == 512, (name, r)
    for name, r in res["mega_hf"].items():  # HF Mega imported at TP2: vocabulary-parallel head, replicated layers
        assert r["padded_vocab"] == 512 and r["same_params"], (name, r)
        assert r["logits_diff"] < 1e-4 and r["loss_diff"] < 1e-5 and r["max_grad_diff"] < 1e-5, (name, r)
        assert r["greedy"] == r["hf_greedy"], (name, r)
    assert len(res["mega_hf"]["causal_rotary"]["greedy"]) == 8
    for name in ("learned", "rope", "rope_gqa"):  # packed documents at TP2: each document's loss as if alone (fp64)
        dm = res["docmask"][name]
        assert dm["max_diff"] < 1e-6 and dm["unmasked_diff"] > 1e-3, (name, dm)

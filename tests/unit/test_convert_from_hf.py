"""Hugging Face import (megatron_ext/inference/hf_import.py, tools/convert_from_hf.py): tiny random GPT-2 and Llama
models made here give HF's logits and greedy tokens once imported, go back to HF as identical tensors, continue
pretraining from the archive; bad directories give one clear error each."""
import dataclasses
import json
import os
import shutil

import pytest
import torch

from helpers import VOCAB, fit_in_process, run_main_in_process, TINY_GPT

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megatron_ext.cli import convert_from_hf, convert_to_hf  # noqa: E402
from megatron_ext.config.schema import ModelConfig  # noqa: E402
from megatron_ext.errors import CheckpointError, ConfigError  # noqa: E402
from megatron_ext.inference.hf_import import import_from_hf  # noqa: E402

pytestmark = pytest.mark.usefixtures("tp1_one_thread")

TOL = 1e-4
HAS_GQA = "num_query_groups" in ModelConfig.__dataclass_fields__


def _perturb(model, seed=0):
    """Move every HF parameter off its init (norm weights != 1, biases != 0), so the comparison sees each one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 0.2))
    return model


def make_gpt2(path, **kw):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-4,
                                  bos_token_id=None, eos_token_id=None, **kw)
    torch.manual_seed(0)
    model = _perturb(transformers.GPT2LMHeadModel(cfg).eval())
    model.save_pretrained(str(path))
    return model


def make_llama(path, **kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 500.0}, bos_token_id=None,
                eos_token_id=None, pad_token_id=None)
    base.update(kw)
    torch.manual_seed(1)
    model = _perturb(transformers.LlamaForCausalLM(transformers.LlamaConfig(**base)).eval(), seed=1)
    model.save_pretrained(str(path))
    return model


def _hf_tensors(d):
    from safetensors.torch import load_file

    return load_file(os.path.join(d, "model.safetensors"))


def check_import(tmp_path, capsys, hf, hf_dir, name):
    """Import to .mext through the tool; logits, greedy generation and the way back through tools/convert_to_hf."""
    from megatron_ext.inference.generation import generate
    from megatron_ext.inference.lm import LM

    out = str(tmp_path / f"{name}.mext")
    r = run_main_in_process(convert_from_hf.main, ["--input", str(hf_dir), "--output", out,
                                                   "--tokenizer-library", "byte"], capsys)
    assert r.returncode == 0, r.stderr
    assert f"model.ckpt_path={out}" in r.stdout and "model.num_layers=2" in r.stdout
    lm = LM.restore_from(out)
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = lm.model.gather_logits(lm.model(tokens))
    diff = (got - ref).abs().max().item()
    print(f"{name}: imported logits vs transformers: max |diff| = {diff:.2e}")
    assert got.shape == ref.shape and diff <= TOL and ref.std() > 0.1
    # greedy generation, token for token (no stop token on either side)
    prompt = tokens[0, :6].tolist()
    ids = torch.tensor([prompt])
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                       min_new_tokens=12, eos_token_id=None, pad_token_id=VOCAB - 1)[0, 6:].tolist()
    mine = generate(lm, [prompt], max_new_tokens=12, greedy=True, stop_tokens=[], output="tokens")[0]
    assert list(mine) == want, (mine, want)
    # HF -> ours -> HF: the same tensors
    back = tmp_path / f"{name}_back"
    r = run_main_in_process(convert_to_hf.main, ["--input", out, "--output", str(back)], capsys)
    assert r.returncode == 0, r.stderr
    a, b = _hf_tensors(hf_dir), _hf_tensors(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    src = json.loads((hf_dir / "config.json").read_text())
    dst = json.loads((back / "config.json").read_text())
    return lm, src, dst


def test_gpt2_import(tmp_path, capsys):
    hf_dir = tmp_path / "hf_gpt2"
    hf = make_gpt2(hf_dir)
    lm, src, dst = check_import(tmp_path, capsys, hf, hf_dir, "gpt2")
    mc = lm.model.config
    assert (mc.activation, mc.layernorm_epsilon, mc.max_position_embeddings) == ("gelu_tanh", 1e-4, 32)
    assert lm.model.padded_vocab_size == 384  # 259 rows padded with zeros to a multiple of 128
    for k in ("activation_function", "n_positions", "n_embd", "layer_norm_epsilon", "tie_word_embeddings"):
        assert src[k] == dst[k], k


def test_llama_import(tmp_path, capsys):
    hf_dir = tmp_path / "hf_llama"
    hf = make_llama(hf_dir)
    lm, src, dst = check_import(tmp_path, capsys, hf, hf_dir, "llama")
    assert (lm.model.config.rotary_base, lm.model.config.share_embeddings_and_output_weights) == (500.0, False)
    for k in ("rope_parameters", "rms_norm_eps", "intermediate_size", "num_key_value_heads", "tie_word_embeddings"):
        assert src[k] == dst[k], k


@pytest.mark.skipif(not HAS_GQA, reason="model.num_query_groups is not in this version's schema")
def test_llama_gqa_import(tmp_path, capsys):
    hf_dir = tmp_path / "hf_gqa"
    hf = make_llama(hf_dir, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    lm, src, dst = check_import(tmp_path, capsys, hf, hf_dir, "gqa")
    assert lm.model.config.num_query_groups == 2 and dst["num_key_value_heads"] == 2


def test_gqa_refused_without_num_query_groups(tmp_path):
    if HAS_GQA:
        pytest.skip("this version has model.num_query_groups")
    make_llama(tmp_path, num_attention_heads=8, num_key_value_heads=2)
    with pytest.raises(ConfigError, match="num_key_value_heads=2: .*model.num_query_groups"):
        import_from_hf(str(tmp_path))


def test_continue_pretraining_from_imported_archive(tmp_path, capsys, cache_home, monkeypatch):
    """pretrain_gpt.py model.ckpt_path=imported.mext (weights only) trains, starting from the imported weights;
    a run whose architecture keys differ from the archive's is refused naming the key."""
    monkeypatch.chdir(tmp_path)
    hf_dir = tmp_path / "hf"
    hf = make_llama(hf_dir, tie_word_embeddings=True, num_hidden_layers=1, max_position_embeddings=32)
    out = str(tmp_path / "imp.mext")
    r = run_main_in_process(convert_from_hf.main, ["--input", str(hf_dir), "--output", out,
                                                   "--tokenizer-library", "byte"], capsys)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1].split("pretrain_gpt.py ", 1)[1].split()
    keep = [o for o in TINY_GPT if not o.startswith(("model.num_layers", "model.hidden_size",
                                                     "model.num_attention_heads"))]
    overrides = line + keep + [f"exp_manager.exp_dir={tmp_path / 'exp'}", "trainer.max_steps=3",
                               "trainer.val_check_interval=3", "model.optim.lr=1e-3"]
    res = fit_in_process(overrides)
    metrics = [json.loads(x) for x in open(os.path.join(res["run_dir"], "metrics.jsonl"))]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(losses) == 3 and all(map(lambda v: v == v, losses))
    import math
    assert losses[0] < 0.9 * math.log(VOCAB) or losses[0] > 1.1 * math.log(VOCAB)  # the weights are not an init's
    bad = [o if not o.startswith("model.layernorm_epsilon") else "model.layernorm_epsilon=0.001" for o in overrides]
    with pytest.raises(CheckpointError, match="model.layernorm_epsilon=1e-05 but this model has "
                                              "model.layernorm_epsilon=0.001"):
        fit_in_process(bad)

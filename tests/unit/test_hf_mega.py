"""Hugging Face Mega <-> our Mega LM (megatron_ext/inference/hf_import_mega.py, tools/convert_from_hf.py, the Mega
route of tools/convert_to_hf.py), against the reference outputs of transformers 4.39's own MegaForCausalLM stored in
tests/data/hf_mega/ (made by tests/data/hf_mega/make_fixtures.py; transformers 5 has no Mega). TP=2:
tests/workers/model_tp_worker.py."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import REPO

from megatron_ext.checkpoint.archive import load_full_state_dict
from megatron_ext.checkpoint.loader import build_model
from megatron_ext.errors import CheckpointError, ConfigError
from megatron_ext.inference.generation import CausalLMSession
from megatron_ext.inference.hf_import_mega import mega_from_hf, mega_to_hf, read_hf_dir, write_hf_mega_dir
from megatron_ext.models.families import get_family

FIX = os.path.join(REPO, "tests", "data", "hf_mega")
CAUSAL = ("causal_rotary", "causal_simple_chunked")
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def fixture(name):
    d = os.path.join(FIX, name)
    sd, cfg = read_hf_dir(d)
    return d, sd, cfg, load_file(os.path.join(d, "reference.safetensors"))


def build(mcfg, vocab, ours):
    model, _, _ = build_model({"model": mcfg}, get_family("mega"), vocab_size=vocab, device=torch.device("cpu"))
    load_full_state_dict(model, ours, "test")
    return model.eval()


@pytest.fixture(scope="module")
def imported():
    out = {}
    for name in CAUSAL:
        d, sd, cfg, ref = fixture(name)
        ours, mcfg = mega_from_hf(sd, cfg)
        out[name] = dict(dir=d, hf=sd, cfg=cfg, ref=ref, ours=ours, mcfg=mcfg,
                         model=build(mcfg, cfg["vocab_size"], ours))
    return out


@pytest.mark.parametrize("name", CAUSAL)
def test_imported_logits_equal_transformers(imported, name):
    """Rotary bias, scale norm, pre-norm, tied head + dense layer; simple bias read around chunk_size - 1 with two
    chunks, layernorm, post-norm, untied head, gelu: logits within 1e-4 of transformers' (fp32)."""
    r = imported[name]
    assert r["mcfg"]["mega"]["final_norm"] is False and r["mcfg"]["mega"]["lm_head_bias"] is True
    with torch.no_grad():
        logits = r["model"].gather_logits(r["model"](r["ref"]["input_ids"]))
    assert logits.shape == r["ref"]["logits"].shape
    assert (logits - r["ref"]["logits"]).abs().max().item() < 1e-4
    assert r["ref"]["logits"].std().item() > 0.3  # the fixture's logits are not flat


def test_greedy_generation_equals_transformers_generate(imported):
    """8 greedy tokens with and without our cache == transformers' generate(do_sample=False) (non-trivial ids)."""
    r = imported["causal_rotary"]
    prompt = r["ref"]["prompt"]
    want = r["ref"]["generated"][0, prompt.shape[1]:].tolist()
    assert len(set(want)) > 3
    for use_cache in (True, False):
        s = CausalLMSession(r["model"], [prompt[0].tolist()], max_new_tokens=8, use_cache=use_cache, pad_id=257)
        got = []
        for i in range(8):
            t = s.logits.argmax(-1)
            got.append(int(t[0]))
            if i < 7:
                s.step(t)
        assert got == want, (use_cache, got, want)


def test_hf_to_ours_to_hf_identical(imported, tmp_path):
    r = imported["causal_rotary"]
    ids = {k: r["cfg"][k] for k in TOKEN_IDS}
    back, cfg = mega_to_hf(r["ours"], r["mcfg"], r["cfg"]["vocab_size"], **ids)
    assert set(back) == set(r["hf"]) and all(torch.equal(back[k], r["hf"][k]) for k in back)
    write_hf_mega_dir(str(tmp_path / "hf"), back, cfg)
    sd2, cfg2 = read_hf_dir(str(tmp_path / "hf"))
    assert all(torch.equal(sd2[k], r["hf"][k]) for k in r["hf"]) and set(sd2) == set(r["hf"])
    differ = {k: (v, cfg2.get(k)) for k, v in r["cfg"].items() if cfg2.get(k) != v}
    assert set(differ) <= {"transformers_version"}, differ
    # the simple bias of a chunked HF model keeps the 2 * chunk_size - 1 entries HF reads (the same function)
    c = imported["causal_simple_chunked"]
    back, cfg = mega_to_hf(c["ours"], c["mcfg"], c["cfg"]["vocab_size"], **ids)
    for k, v in c["hf"].items():
        if k.endswith("rel_pos_bias.rel_pos_bias"):
            assert torch.equal(back[k], v[:15]) and v.numel() == 63
        else:
            assert torch.equal(back[k], v), k
    assert cfg["max_positions"] == 8 and c["cfg"]["max_positions"] == 32
    again, mcfg2 = mega_from_hf(back, cfg)
    assert set(again) == set(c["ours"]) and all(torch.equal(again[k], c["ours"][k]) for k in again)


def test_cli_archive_restore_generate_and_export(tmp_path, capsys):
    """tools/convert_from_hf.py -> .mext -> LM.restore_from: HF's logits and greedy tokens; tools/convert_to_hf.py
    of that archive -> the original HF tensors."""
    from megatron_ext.cli import convert_from_hf, convert_to_hf
    from megatron_ext.inference.generation import generate
    from megatron_ext.inference.lm import LM

    d, sd, cfg, ref = fixture("causal_rotary")
    arc = str(tmp_path / "mega.mext")
    assert convert_from_hf.main(["--input", d, "--output", arc, "--tokenizer-library", "byte"]) == 0
    assert '"lm_hidden_dense_layer": true' in capsys.readouterr().out
    assert convert_from_hf.main(["--input", d, "--output", arc, "--tokenizer-library", "byte"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    lm = LM.restore_from(arc)
    with torch.no_grad():
        logits = lm.model.gather_logits(lm.model(ref["input_ids"]))
    assert (logits - ref["logits"]).abs().max().item() < 1e-4
    out = generate(lm, [ref["prompt"][0].tolist()], max_new_tokens=8, greedy=True, stop_tokens=[], output="tokens")
    assert out[0] == ref["generated"][0, ref["prompt"].shape[1]:].tolist()
    hf_out = str(tmp_path / "hf")
    assert convert_to_hf.main(["--input", arc, "--output", hf_out]) == 0, capsys.readouterr().err
    sd2, cfg2 = read_hf_dir(hf_out)
    assert set(sd2) == set(sd) and all(torch.equal(sd2[k], sd[k]) for k in sd)
    assert cfg2["architectures"] == ["MegaForCausalLM"] and cfg2["model_type"] == "mega"
    assert os.path.isfile(os.path.join(hf_out, "tokenizer.json"))


@pytest.mark.parametrize("key, value, match", [
    ("is_decoder", False, r"is_decoder=False: a causal language model must be a decoder"),
    ("bidirectional", True, r"bidirectional=True: a causal language model needs a causal EMA"),
    ("normalization_type", "rmsnorm", r"normalization_type='rmsnorm': transformers' Mega RMS norm only multiplies"),
    ("add_token_type_embeddings", True, r"add_token_type_embeddings=True: our Mega LM has no token-type"),
    ("add_cross_attention", True, r"add_cross_attention=True: cross-attention belongs to an encoder-decoder"),
    ("hidden_dropout_prob", 0.2, r"dropout_prob=.*one dropout probability"),
    ("activation", "mish", r"activation='mish': expected one of"),
    ("model_type", "gpt2", r"model_type='gpt2': expected 'mega'"),
])
def test_unsupported_hf_options_refused_naming_the_key(key, value, match):
    _, sd, cfg, _ = fixture("causal_rotary")
    with pytest.raises(ConfigError, match=match):
        mega_from_hf(sd, dict(cfg, **{key: value}))


def test_masked_lm_and_bad_directories_refused(tmp_path, capsys):
    from megatron_ext.cli import convert_from_hf

    d, sd, cfg, _ = fixture("masked_lm")
    with pytest.raises(ConfigError, match=r"MegaForMaskedLM is an encoder and megatron_ext has no encoder-only"):
        mega_from_hf(sd, cfg)
    assert convert_from_hf.main(["--input", d, "--output", str(tmp_path / "m.mext"),
                                 "--tokenizer-library", "byte"]) == 2
    assert "MegaForMaskedLM" in capsys.readouterr().err and not os.path.exists(tmp_path / "m.mext")
    _, sd, cfg, _ = fixture("causal_rotary")
    del sd["lm_head.bias"]
    with pytest.raises(CheckpointError, match=r"lack output_layer.bias"):
        mega_from_hf(sd, cfg)
    _, sd, cfg, _ = fixture("causal_rotary")
    with pytest.raises(CheckpointError, match=r"mega.pooler.dense.weight: a pooler"):
        mega_from_hf(dict(sd, **{"mega.pooler.dense.weight": torch.zeros(2)}), cfg)
    # sharded: the index names shards; one outside the directory is refused, a good index reads back
    shard = tmp_path / "sharded"
    shard.mkdir()
    shutil.copy(os.path.join(FIX, "causal_rotary", "config.json"), shard)
    names = sorted(sd)
    save_file({k: sd[k] for k in names[:10]}, str(shard / "a.safetensors"))
    save_file({k: sd[k] for k in names[10:]}, str(shard / "b.safetensors"))
    index = {"weight_map": {k: ("a.safetensors" if i < 10 else "b.safetensors") for i, k in enumerate(names)}}
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    got, _ = read_hf_dir(str(shard))
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    index["weight_map"][names[0]] = "../a.safetensors"
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"shard name '\.\./a\.safetensors' is not a plain file name"):
        read_hf_dir(str(shard))
    # .bin through the safe loader: tensors load, a pickle that would run code does not
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(os.path.join(FIX, "causal_rotary", "config.json"), binary)
    torch.save(sd, str(binary / "pytorch_model.bin"))
    got, _ = read_hf_dir(str(binary))
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    torch.save({"x": shutil.rmtree}, str(binary / "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin"):
        read_hf_dir(str(binary))


def test_export_refuses_what_transformers_lacks(imported):
    r = imported["causal_rotary"]
    mcfg = json.loads(json.dumps(r["mcfg"]))
    mcfg["mega"]["final_norm"] = True
    with pytest.raises(ConfigError, match=r"model.mega.final_norm=true: transformers' MegaModel has no norm"):
        mega_to_hf(r["ours"], mcfg, 259)
    mcfg["mega"].update(final_norm=False, normalization_type="rmsnorm")
    with pytest.raises(ConfigError, match=r"normalization_type=rmsnorm: transformers' Mega RMS norm does not"):
        mega_to_hf(r["ours"], mcfg, 259)


def test_mega_head_keys_and_tensor_parallel_config():
    """The LM-head keys exist for model.arch=mega only; TP > 1 is accepted there (vocabulary-parallel), refused for the
    Mega stacks of pretrain_bart.py; a non-boolean is named."""
    from megatron_ext.config.model_validation import check_mega_arch
    from megatron_ext.config.schema import MegaArchConfig, ModelConfig

    ModelConfig(arch="mega", tensor_model_parallel_size=2, mega=MegaArchConfig(lm_head_bias=True))
    with pytest.raises(ConfigError, match=r"model.encoder.mega.lm_head_bias=True: only the Mega language model"):
        check_mega_arch(MegaArchConfig(lm_head_bias=True), "encoder.mega", 64, tp=1, pp=1)
    with pytest.raises(ConfigError, match=r"model.tensor_model_parallel_size=2: the Mega architecture "
                                          r"\(model.decoder.mega\) does not support tensor parallelism"):
        check_mega_arch(MegaArchConfig(), "decoder.mega", 64, tp=2, pp=1)
    with pytest.raises(ConfigError, match=r"model.mega.final_norm='no': expected true or false"):
        check_mega_arch(MegaArchConfig(final_norm="no"), "mega", 64, tp=1, pp=1, lm=True)
    with pytest.raises(ConfigError, match=r"model.pipeline_model_parallel_size=2"):
        check_mega_arch(MegaArchConfig(), "mega", 64, tp=2, pp=2, lm=True)

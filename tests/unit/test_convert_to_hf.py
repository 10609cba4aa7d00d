"""Hugging Face export (megatron_ext/inference/hf_export.py, tools/convert_to_hf.py): GPT-2 and Llama targets give
our logits, the exported tokenizer gives our ids, bad inputs give one clear message; end to end from a checkpoint."""
import dataclasses
import json
import os
import sys

import pytest
import torch

from helpers import (LLAMA, NON_ASCII, TOL, VOCAB, check_hf_tokenizer, hf_logits, our_logits, perturbed_model,
                     random_tokens, shakespeare_lines, tiny_cfg)

transformers = pytest.importorskip("transformers")

from megatron_ext.cli import convert_to_hf  # noqa: E402
from megatron_ext.config.schema import ModelConfig  # noqa: E402
from megatron_ext.errors import CheckpointError, ConfigError  # noqa: E402
from megatron_ext.inference.hf_export import (  # noqa: E402
    HFExportWarning,
    consolidated_from_model,
    export_to_hf,
    resolve_arch,
)
from megatron_ext.models.gpt import GPTModel  # noqa: E402


pytestmark = pytest.mark.usefixtures("tp1_one_thread")


# --------------------------------------------------------------------------------------------- weights / logits
@pytest.mark.parametrize("tied,bias", [(True, True), (False, False)], ids=["tied-bias", "untied-nobias"])
def test_gpt2_export_gives_our_logits(tmp_path, tied, bias):
    cfg = tiny_cfg(share_embeddings_and_output_weights=tied, bias=bias, layernorm_epsilon=1e-3,
                   max_position_embeddings=24)
    model = perturbed_model(cfg)
    assert model.padded_vocab_size == 264
    info = export_to_hf(consolidated_from_model(model), str(tmp_path), tokenizer={"library": "byte"})
    assert info["arch"] == "gpt2" and info["tokenizer_mismatches"] == []
    tokens = random_tokens()
    hf, got = hf_logits(str(tmp_path), tokens)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    c = hf.config
    assert (c.vocab_size, c.n_positions, c.n_inner, c.activation_function) == (VOCAB, 24, 128, "gelu")
    assert c.layer_norm_epsilon == 1e-3 and c.tie_word_embeddings == tied
    assert hf.get_input_embeddings().weight.shape == (VOCAB, 32)
    ref = our_logits(model, tokens)
    assert got.shape == ref.shape == (2, 16, VOCAB)
    diff = (got - ref).abs().max().item()
    print(f"gpt2 tied={tied} bias={bias}: max |logits diff| = {diff:.3e}")
    assert diff <= TOL
    assert ref.std() > 0.1  # not a degenerate comparison
    if tied:  # the comparison sees the GELU variant: GPT-2's tanh "gelu_new" is not our exact GELU
        cfg_json = json.loads((tmp_path / "config.json").read_text())
        cfg_json["activation_function"] = "gelu_new"
        (tmp_path / "config.json").write_text(json.dumps(cfg_json))
        _, tanh = hf_logits(str(tmp_path), tokens)
        print(f"gpt2 with gelu_new instead: max |logits diff| = {(tanh - ref).abs().max().item():.3e}")
        assert (tanh - ref).abs().max().item() > 10 * TOL


@pytest.mark.parametrize("tied,bias,extra", [
    (True, False, {}),
    (False, True, dict(rotary_base=500.0, layernorm_epsilon=1e-3, ffn_hidden_size=48, num_attention_heads=2)),
    (False, True, dict(num_attention_heads=8, num_query_groups=2)),  # grouped-query attention: 8 heads, 2 kv heads
], ids=["tied-nobias", "untied-bias-theta500", "untied-bias-gqa-8h-2kv"])
def test_llama_export_gives_our_logits(tmp_path, tied, bias, extra):
    cfg = tiny_cfg(share_embeddings_and_output_weights=tied, bias=bias, **{**LLAMA, **extra})
    model = perturbed_model(cfg)
    info = export_to_hf(consolidated_from_model(model), str(tmp_path), tokenizer={"library": "byte"})
    assert info["arch"] == "llama"
    tokens = random_tokens()
    hf, got = hf_logits(str(tmp_path), tokens)
    assert type(hf).__name__ == "LlamaForCausalLM"
    c = hf.config
    heads = extra.get("num_attention_heads", 4)
    kv_heads = extra.get("num_query_groups", heads)
    assert (c.vocab_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (VOCAB, heads, kv_heads,
                                                                                       32 // heads)
    assert hf.model.layers[0].self_attn.k_proj.weight.shape == (kv_heads * 32 // heads, 32)
    assert c.intermediate_size == model.ffn_hidden_size and c.tie_word_embeddings == tied
    assert c.attention_bias == bias and c.mlp_bias == bias
    assert c.rms_norm_eps == extra.get("layernorm_epsilon", 1e-5)
    ref = our_logits(model, tokens)
    diff = (got - ref).abs().max().item()
    print(f"llama tied={tied} bias={bias}: max |logits diff| = {diff:.3e}")
    assert diff <= TOL
    assert ref.std() > 0.1


def test_llama_rotary_mapping_is_position_sensitive(tmp_path):
    """Swapping the q/k halves (what an interleaved-vs-half-split mix-up does) must break the match: the comparison
    sees the rotary convention."""
    cfg = tiny_cfg(**LLAMA, bias=False)
    model = perturbed_model(cfg)
    obj = consolidated_from_model(model)
    w = obj["state_dict"]["decoder.layers.0.self_attention.linear_qkv.weight"]
    g = w.view(4, 3, 8, 32).clone()
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # interleaved order of the q and k rows
    g[:, 0], g[:, 1] = g[:, 0, perm], g[:, 1, perm]
    obj["state_dict"]["decoder.layers.0.self_attention.linear_qkv.weight"] = g.view(96, 32)
    export_to_hf(obj, str(tmp_path), tokenizer=False)
    _, got = hf_logits(str(tmp_path), random_tokens())
    assert (got - our_logits(model, random_tokens())).abs().max().item() > 1e-2


def test_bfloat16_export(tmp_path):
    model = perturbed_model(tiny_cfg(**LLAMA, bias=False))
    export_to_hf(consolidated_from_model(model), str(tmp_path), tokenizer={"library": "byte"})
    assert os.path.exists(tmp_path / "tokenizer.json")  # ... and an export without a tokenizer removes it
    info = export_to_hf(consolidated_from_model(model), str(tmp_path), tokenizer=False, dtype="bfloat16")
    assert info["dtype"] == "bfloat16" and info["tokenizer"] is None
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype="auto")
    assert hf.get_input_embeddings().weight.dtype == torch.bfloat16
    assert not os.path.exists(tmp_path / "tokenizer.json")


# --------------------------------------------------------------------------------------------- tokenizers
def test_byte_tokenizer_roundtrip_and_generation_ids(tmp_path):
    from megatron_ext.tokenizers import ByteTokenizer

    ours = ByteTokenizer()
    export_to_hf(consolidated_from_model(perturbed_model(tiny_cfg())), str(tmp_path), tokenizer=ours)
    texts = shakespeare_lines() + NON_ASCII + ["<eod> <pad> <bos> literal specials", "\x00\x7f\u00ff"]
    tok = check_hf_tokenizer(str(tmp_path), ours, texts)
    for t in NON_ASCII:
        assert tok.decode(ours.tokenize(t)) == t
    assert tok.decode([104, 105, ours.eod, ours.bos, ours.pad], skip_special_tokens=True) == "hi"
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (ours.eod, ours.eod, ours.pad)
    assert len(tok) == VOCAB
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (256, 256, 257)


def test_char_tokenizer_roundtrip(tmp_path):
    char = pytest.importorskip("megatron_ext.tokenizers.char")
    chars = tmp_path / "chars.txt"
    chars.write_text("\n" + "".join(chr(c) for c in range(0x20, 0x7F)) + "éöñ日本語😀\t", encoding="utf-8")
    ours = char.CharTokenizer(str(chars))
    model = perturbed_model(tiny_cfg(), vocab=ours.vocab_size)
    info = export_to_hf(consolidated_from_model(model), str(tmp_path / "hf"), tokenizer=ours)
    assert info["tokenizer_mismatches"] == []  # the probe texts it cannot encode are skipped, see below
    known = set(chars.read_text(encoding="utf-8"))  # the corpus lines the character list covers
    texts = [t for t in shakespeare_lines() if set(t) <= known] + ["héllo wörld ñ 日本語 😀\tend",
                                                                   "<pad> <eod> <bos> <sep> literal"]
    assert len(texts) > 100
    tok = check_hf_tokenizer(str(tmp_path / "hf"), ours, texts)
    assert tok.decode(ours.tokenize(texts[-2]) + [ours.eod], skip_special_tokens=True) == texts[-2]
    assert (tok.eos_token_id, tok.pad_token_id) == (ours.eod, ours.pad)


@pytest.mark.parametrize("kind", ["unigram", "bpe-bytefallback"])
def test_sentencepiece_tokenizer_roundtrip(tmp_path, spm_models, kind):
    from megatron_ext.tokenizers import SentencePieceTokenizer

    ours = SentencePieceTokenizer(spm_models[kind])
    model = perturbed_model(tiny_cfg(**LLAMA, bias=False), vocab=ours.vocab_size)
    info = export_to_hf(consolidated_from_model(model), str(tmp_path), tokenizer=ours)
    assert info["tokenizer_mismatches"] == []
    assert (tmp_path / "tokenizer.model").read_bytes() == open(spm_models[kind], "rb").read()
    texts = shakespeare_lines() + NON_ASCII + ["", " ", "x" * 300, "Cañón 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u3000 fin",
                                               "a<mask>b", " <mask> hear <mask>", "<mask><mask>!", "<ma<mask>sk>"]
    tok = check_hf_tokenizer(str(tmp_path), ours, texts)
    assert ours.tokenize("a<mask>b").count(ours.processor.piece_to_id("<mask>")) == 1
    assert (tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (ours.eod, ours.pad, ours.unk)
    sample = "First Citizen: hear me speak. héllo café"
    assert tok.decode(ours.tokenize(sample), skip_special_tokens=True) == ours.detokenize(ours.tokenize(sample))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["eos_token_id"], cfg["bos_token_id"], cfg["pad_token_id"]) == (2, 2, 3)


def test_tokenizer_vocab_mismatch_and_missing_model_file(tmp_path, spm_models):
    model = perturbed_model(tiny_cfg())
    obj = consolidated_from_model(model)
    with pytest.raises(ConfigError, match=r"has 320 ids but the model was trained with vocab_size=259"):
        export_to_hf(obj, str(tmp_path), tokenizer={"library": "sentencepiece", "model": spm_models["unigram"]})
    obj["model_config"]["tokenizer"] = {"library": "sentencepiece", "model": str(tmp_path / "moved.model")}
    with pytest.raises(ConfigError, match=r"model.tokenizer.model \(the checkpoint's model.tokenizer\).*moved.model"
                                          r".*does not exist.*--tokenizer-model"):
        export_to_hf(obj, str(tmp_path))


# --------------------------------------------------------------------------------------------- refused models
@pytest.mark.parametrize("kw,arch,expect", [
    (dict(position_embedding_type="rope"), "auto",
     r"no Hugging Face architecture matches this model: gpt2 \(GPT2LMHeadModel\) needs "
     r"model.position_embedding_type=learned_absolute \(this model has rope\); llama \(LlamaForCausalLM\) needs "
     r"model.activation=swiglu \(this model has gelu\), model.normalization=rmsnorm \(this model has layernorm\)"),
    (dict(normalization="rmsnorm"), "auto", r"gpt2 \(GPT2LMHeadModel\) needs model.normalization=layernorm "
                                            r"\(this model has rmsnorm\)"),
    (dict(LLAMA), "gpt2", r"cannot export as arch=gpt2: gpt2 \(GPT2LMHeadModel\) needs "
                          r"model.position_embedding_type=learned_absolute \(this model has rope\), "
                          r"model.activation=gelu or gelu_tanh \(this model has swiglu\)"),
    (dict(), "llama", r"cannot export as arch=llama: .*model.position_embedding_type=rope \(this model has "
                      r"learned_absolute\)"),
    (dict(), "opt", r"arch='opt': expected one of auto, gpt2, llama"),
    (dict(num_query_groups=2), "auto", r"gpt2 \(GPT2LMHeadModel\) needs model.num_query_groups=null, multi-head "
                                       r"attention \(GPT-2 has no grouped-query attention; this model has 2 query "
                                       r"groups for 4 heads\); llama"),
])
def test_unsupported_combinations_are_refused(tmp_path, kw, arch, expect):
    model = GPTModel(tiny_cfg(**kw), VOCAB, init_seed=0)
    with pytest.raises(ConfigError, match=expect):
        export_to_hf(consolidated_from_model(model), str(tmp_path), arch=arch, tokenizer=False)
    assert not os.path.exists(tmp_path / "config.json")


def test_mega_targets_and_encoder_decoder_are_refused():
    mega = dataclasses.asdict(ModelConfig(arch="mega"))  # Mega exports to MegaForCausalLM (tests/unit/test_hf_mega.py)
    assert resolve_arch(mega) == "mega"
    with pytest.raises(ConfigError, match=r"arch='gpt2': a Mega language model .*MegaForCausalLM only"):
        resolve_arch(mega, "gpt2")
    with pytest.raises(ConfigError, match=r"arch=mega: model.arch='transformer' is not a Mega language model"):
        resolve_arch(dataclasses.asdict(ModelConfig()), "mega")
    with pytest.raises(ConfigError, match=r"model.mega.final_norm=true: transformers' MegaModel has no norm"):
        export_to_hf({"state_dict": {}, "vocab_size": 10, "model_config": mega}, "unused", tokenizer=False)
    from megatron_ext.config.schema import EncoderDecoderModelConfig

    encdec = dataclasses.asdict(EncoderDecoderModelConfig())
    with pytest.raises(ConfigError, match=r"encoder-decoder model .*only decoder-only GPT models"):
        export_to_hf({"state_dict": {}, "vocab_size": 10, "model_config": encdec}, "unused")
    with pytest.raises(ConfigError, match=r"encoder-decoder"):
        resolve_arch(dataclasses.asdict(ModelConfig()), family="encdec")


def test_weights_that_do_not_match_the_config(tmp_path):
    obj = consolidated_from_model(GPTModel(tiny_cfg(), VOCAB, init_seed=0))
    del obj["state_dict"]["decoder.layers.1.mlp.linear_fc2.weight"]
    with pytest.raises(CheckpointError, match=r"no weights for decoder.layers.1.mlp.linear_fc2.weight"):
        export_to_hf(obj, str(tmp_path), tokenizer=False)
    obj = consolidated_from_model(GPTModel(tiny_cfg(), VOCAB, init_seed=0))
    obj["model_config"]["num_layers"] = 1
    with pytest.raises(CheckpointError, match=r"weights not used by the export .*decoder.layers.1"):
        export_to_hf(obj, str(tmp_path), tokenizer=False)
    obj = consolidated_from_model(GPTModel(tiny_cfg(), VOCAB, init_seed=0))
    obj["vocab_size"] = 264  # untrimmed rows would be a different vocabulary
    with pytest.raises(CheckpointError, match=r"embedding.word_embeddings.weight has shape \(259, 32\), expected "
                                              r"\(264, 32\)"):
        export_to_hf(obj, str(tmp_path), tokenizer=False)
    with pytest.raises(ConfigError, match=r"dtype='float8': expected one of float32, bfloat16, float16"):
        export_to_hf(consolidated_from_model(GPTModel(tiny_cfg(), VOCAB, init_seed=0)), str(tmp_path),
                     tokenizer=False, dtype="float8")


def test_missing_transformers_says_pip_install(tmp_path, monkeypatch):
    obj = consolidated_from_model(GPTModel(tiny_cfg(), VOCAB, init_seed=0))
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an uninstalled package looks like to import
    with pytest.raises(ConfigError, match=r"needs the optional 'transformers' package.*pip install transformers"):
        export_to_hf(obj, str(tmp_path), tokenizer={"library": "byte"})


def test_probe_mismatch_refused_or_warned(tmp_path, spm_models):
    """Literal control pieces are exact now; a text the bpe export still cuts differently (a user-defined symbol
    glued to a control piece: tokenizers takes the rest as one whole vocabulary entry) refuses the export, or warns
    when asked to go on."""
    from megatron_ext.inference.hf_export import TokenizerMismatchError
    from megatron_ext.tokenizers import SentencePieceTokenizer

    ours = SentencePieceTokenizer(spm_models["unigram"])
    obj = consolidated_from_model(perturbed_model(tiny_cfg(), vocab=ours.vocab_size))
    info = export_to_hf(obj, str(tmp_path), tokenizer=ours, probe_texts=["say </s> and <s>"])
    assert info["tokenizer_mismatches"] == []
    ours = SentencePieceTokenizer(spm_models["bpe-bytefallback"])
    obj = consolidated_from_model(perturbed_model(tiny_cfg(), vocab=ours.vocab_size))
    with pytest.raises(TokenizerMismatchError, match=r"encodes 1 of \d+ lines differently from sentencepiece"):
        export_to_hf(obj, str(tmp_path / "b"), tokenizer=ours, probe_texts=["<mask></s>"])
    assert not (tmp_path / "b").exists()
    with pytest.warns(HFExportWarning, match=r"encodes 1 of \d+ lines differently from sentencepiece"):
        info = export_to_hf(obj, str(tmp_path / "b"), tokenizer=ours, probe_texts=["<mask></s>"],
                            allow_tokenizer_mismatch=True)
    assert [t for _, t, _, _ in info["tokenizer_mismatches"]] == ["<mask></s>"]


# --------------------------------------------------------------------------------------------- command line
def _cli(capsys, *args):
    rc = convert_to_hf.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_errors(tmp_path, capsys):
    rc, _, err = _cli(capsys, "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "hf"))
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("convert_to_hf: error: --input ") and "no such file or directory" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = _cli(capsys, "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "hf"))
    assert rc == 2 and "convert_to_hf: error: --input: no complete checkpoint in" in err
    torch.save({"something": 1}, tmp_path / "x.pt")
    rc, _, err = _cli(capsys, "--input", str(tmp_path / "x.pt"), "--output", str(tmp_path / "hf"))
    assert rc == 2 and "is not a consolidated megatron_ext checkpoint" in err and err.count("\n") == 1
    mega = {"format": "megatron_ext.consolidated.v1", "state_dict": {}, "vocab_size": 259,
            "model_config": dataclasses.asdict(ModelConfig(arch="mega")), "source": {}}
    torch.save(mega, tmp_path / "mega.pt")
    rc, _, err = _cli(capsys, "--input", str(tmp_path / "mega.pt"), "--output", str(tmp_path / "hf"))
    assert rc == 2 and "convert_to_hf: error: model.mega.final_norm=true: transformers' MegaModel" in err
    bart = tmp_path / "bart_run" / "checkpoints" / "step_0000005"
    bart.mkdir(parents=True)
    from megatron_ext.config.schema import EncoderDecoderModelConfig

    (bart / "meta.json").write_text(json.dumps({"step": 5, "vocab_size": VOCAB,
                                                "model_config": dataclasses.asdict(EncoderDecoderModelConfig())}))
    rc, _, err = _cli(capsys, "--input", str(tmp_path / "bart_run"), "--output", str(tmp_path / "hf"))
    assert rc == 2 and "convert_to_hf: error: this is an encoder-decoder model" in err and err.count("\n") == 1
    (tmp_path / "file").write_text("x")
    rc, _, err = _cli(capsys, "--input", str(tmp_path / "mega.pt"), "--output", str(tmp_path / "file"))
    assert rc == 2 and "--output" in err and "is not a directory" in err
    with pytest.raises(SystemExit) as e:
        convert_to_hf.main(["--input", "x", "--output", "y", "--dtype", "float64"])
    assert e.value.code == 2


def test_cli_consolidated_pt_with_tokenizer_override(tmp_path, capsys, spm_models):
    from megatron_ext.tokenizers import SentencePieceTokenizer
    from megatron_ext.checkpoint.consolidated import FORMAT, save_consolidated

    ours = SentencePieceTokenizer(spm_models["unigram"])
    model = perturbed_model(tiny_cfg(), vocab=ours.vocab_size)
    obj = consolidated_from_model(model)
    obj["model_config"]["tokenizer"] = {"library": "sentencepiece", "model": "/gone/spm.model"}
    obj.update(format=FORMAT, source={"path": "test"}, step=7)
    save_consolidated(obj, str(tmp_path / "m.pt"))
    rc, _, err = _cli(capsys, "--input", str(tmp_path / "m.pt"), "--output", str(tmp_path / "hf"))
    assert rc == 2 and "/gone/spm.model" in err and "--tokenizer-model" in err
    rc, out, err = _cli(capsys, "--input", str(tmp_path / "m.pt"), "--output", str(tmp_path / "hf"),
                        "--tokenizer-model", spm_models["unigram"])
    assert rc == 0, err
    assert "GPT2LMHeadModel (step 7)" in out and "sentencepiece tokenizer, tokenizer exact" in out
    tokens = random_tokens(ours.vocab_size)
    _, got = hf_logits(str(tmp_path / "hf"), tokens)
    assert (got - our_logits(model, tokens)).abs().max().item() <= TOL
    check_hf_tokenizer(str(tmp_path / "hf"), ours, shakespeare_lines(500) + NON_ASCII)


def test_cli_mext_archive(tmp_path, capsys, spm_models):
    archive = pytest.importorskip("megatron_ext.checkpoint.archive")
    from megatron_ext.tokenizers import SentencePieceTokenizer

    ours = SentencePieceTokenizer(spm_models["bpe-bytefallback"])
    cfg = tiny_cfg(**LLAMA, bias=False, share_embeddings_and_output_weights=False)
    model = perturbed_model(cfg, vocab=ours.vocab_size)
    obj = consolidated_from_model(model)
    run_config = {"model": {**obj["model_config"], "tokenizer": {"library": "sentencepiece",
                                                                 "model": spm_models["bpe-bytefallback"]}}}
    path = str(tmp_path / "gpt.mext")
    archive.write_archive(path, state_dict=obj["state_dict"], config=run_config, family="gpt",
                          vocab_size=ours.vocab_size, tokenizer_library="sentencepiece",
                          tokenizer_file=spm_models["bpe-bytefallback"])
    rc, out, err = _cli(capsys, "--input", path, "--output", str(tmp_path / "hf"), "--arch", "llama")
    assert rc == 0, err
    assert "LlamaForCausalLM" in out and "sentencepiece tokenizer, tokenizer exact" in out
    tokens = random_tokens(ours.vocab_size)
    _, got = hf_logits(str(tmp_path / "hf"), tokens)
    diff = (got - our_logits(model, tokens)).abs().max().item()
    print(f"mext llama: max |logits diff| = {diff:.3e}")
    assert diff <= TOL
    check_hf_tokenizer(str(tmp_path / "hf"), ours, shakespeare_lines(500) + NON_ASCII)


# --------------------------------------------------------------------------------------------- end to end

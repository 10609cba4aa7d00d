"""Hugging Face export (megatron_ext/inference/hf_export.py, tools/convert_to_hf.py): GPT-2 and Llama targets give
our logits, the exported tokenizer gives our ids, bad inputs give one clear message; end to end from a checkpoint."""
import dataclasses
import json
import os
import sys

import pytest
import torch

from helpers import SHARED_DATA

transformers = pytest.importorskip("transformers")

from megatron_ext.config.schema import ModelConfig  # noqa: E402
from megatron_ext.errors import CheckpointError, ConfigError  # noqa: E402
from megatron_ext.inference.hf_export import (  # noqa: E402
    HFExportWarning,
    consolidated_from_model,
    export_to_hf,
    resolve_arch,
)
from megatron_ext.models.gpt import GPTModel  # noqa: E402


VOCAB = 259  # the byte tokenizer's; padded to 264 with make_vocab_size_divisible_by=8
TOL = 1e-4
NON_ASCII = ["héllo wörld, naïve café, Ærøskøbing", "日本語のテキスト、中文文本", "Привет, мир! Ελληνικά. עברית",
             "emoji 😀🎉👍🏽 ∑∫√∞", "full-width ＡＢＣ１２３ ligature ﬁ", "  two  spaces\tand tab\n"]
LLAMA = dict(position_embedding_type="rope", activation="swiglu", normalization="rmsnorm")


pytestmark = pytest.mark.usefixtures("tp1_one_thread")


def shakespeare_lines(n=None):
    """tinyshakespeare lines when ../shared is there, else English text every Python ships (help topics), so a
    clean clone without ../shared trains the same kind of tokenizer."""
    if os.path.isfile(SHARED_DATA):
        with open(SHARED_DATA, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    else:
        from pydoc_data.topics import topics

        lines = [" ".join(p.split()) for k in sorted(topics) for p in topics[k].split("\n") if p.strip()]
        # prose lines only: a long run of one symbol ("=====") can segment differently in HF tokenizers than in
        # sentencepiece's unigram Viterbi (a known limit, README "Hugging Face export")
        lines = [t for t in lines if sum(c.isalpha() or c == " " for c in t) >= 0.7 * len(t)]
    return lines[:n] if n else lines


def tiny_cfg(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, hidden_dropout=0.0,
                attention_dropout=0.0, make_vocab_size_divisible_by=8)
    base.update(kw)
    return ModelConfig(**base)


def perturbed_model(cfg, vocab=VOCAB, seed=0):
    """A GPTModel whose every parameter is moved off its init (biases != 0, norm weights != 1)."""
    model = GPTModel(cfg, vocab, init_seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 0.2))
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.abs().min() > 0, name
        if "layernorm" in name and name.endswith("weight"):
            assert (p - 1).abs().max() > 0.1, name
    return model


def our_logits(model, tokens):
    with torch.no_grad():
        return model.gather_logits(model(tokens))


def hf_logits(out_dir, tokens):
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        return hf, hf(tokens).logits


def random_tokens(vocab=VOCAB, b=2, s=16, seed=3):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


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
], ids=["tied-nobias", "untied-bias-theta500"])
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
    assert (c.vocab_size, c.num_key_value_heads, c.head_dim) == (VOCAB, heads, 32 // heads)
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
def _check_tokenizer(out_dir, ours, texts):
    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    bad = [t for t in texts if tok(t, add_special_tokens=False)["input_ids"] != ours.tokenize(t)]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ, e.g. {bad[:3]!r}"
    assert tok(texts[0])["input_ids"] == ours.tokenize(texts[0])  # nothing added by default either
    return tok


def test_byte_tokenizer_roundtrip_and_generation_ids(tmp_path):
    from megatron_ext.tokenizers import ByteTokenizer

    ours = ByteTokenizer()
    export_to_hf(consolidated_from_model(perturbed_model(tiny_cfg())), str(tmp_path), tokenizer=ours)
    texts = shakespeare_lines() + NON_ASCII + ["<eod> <pad> <bos> literal specials", "\x00\x7f\u00ff"]
    tok = _check_tokenizer(str(tmp_path), ours, texts)
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
    tok = _check_tokenizer(str(tmp_path / "hf"), ours, texts)
    assert tok.decode(ours.tokenize(texts[-2]) + [ours.eod], skip_special_tokens=True) == texts[-2]
    assert (tok.eos_token_id, tok.pad_token_id) == (ours.eod, ours.pad)


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    from megatron_ext.tokenizers import train_sentencepiece

    d = tmp_path_factory.mktemp("spm")
    sentences = (shakespeare_lines(4000) or ["To be, or not to be, that is the question."] * 50) + NON_ASCII * 20
    mask = {"user_defined_symbols": ["<mask>"]}  # always one piece, also inside words
    uni = train_sentencepiece(str(d / "uni"), 320, sentences=sentences, model_type="unigram",
                              character_coverage=1.0, extra_options=mask)
    bpe = train_sentencepiece(str(d / "bpe"), 600, sentences=sentences, model_type="bpe", byte_fallback=True,
                              character_coverage=0.98, extra_options=mask)
    return {"unigram": uni, "bpe-bytefallback": bpe}


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
    tok = _check_tokenizer(str(tmp_path), ours, texts)
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
                          r"model.activation=gelu \(this model has swiglu\)"),
    (dict(), "llama", r"cannot export as arch=llama: .*model.position_embedding_type=rope \(this model has "
                      r"learned_absolute\)"),
    (dict(), "opt", r"arch='opt': expected one of auto, gpt2, llama"),
])
def test_unsupported_combinations_are_refused(tmp_path, kw, arch, expect):
    model = GPTModel(tiny_cfg(**kw), VOCAB, init_seed=0)
    with pytest.raises(ConfigError, match=expect):
        export_to_hf(consolidated_from_model(model), str(tmp_path), arch=arch, tokenizer=False)
    assert not os.path.exists(tmp_path / "config.json")


def test_mega_and_encoder_decoder_are_refused():
    mega = dataclasses.asdict(ModelConfig(arch="mega"))
    with pytest.raises(ConfigError, match=r"model.arch=mega: .*only model.arch=transformer GPT models"):
        resolve_arch(mega)
    with pytest.raises(ConfigError, match=r"model.arch=mega"):
        export_to_hf({"state_dict": {}, "vocab_size": 10, "model_config": mega}, "unused")
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



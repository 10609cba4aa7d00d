"""tools/convert_to_hf.py as a command: its errors, consolidated .pt and .mext inputs, and end to end from a training
checkpoint."""
import dataclasses
import json
import os

import pytest
import torch

from helpers import SHARED_DATA, fit_in_process, run_script
from megatron_ext.cli import convert_to_hf
from megatron_ext.config.schema import ModelConfig
from megatron_ext.inference.hf_export import consolidated_from_model
from megatron_ext.models.gpt import GPTModel


transformers = pytest.importorskip("transformers")


VOCAB = 259  # the byte tokenizer's; padded to 264 with make_vocab_size_divisible_by=8


TOL = 1e-4


NON_ASCII = ["héllo wörld, naïve café, Ærøskøbing", "日本語のテキスト、中文文本", "Привет, мир! Ελληνικά. עברית",
             "emoji 😀🎉👍🏽 ∑∫√∞", "full-width ＡＢＣ１２３ ligature ﬁ", "  two  spaces\tand tab\n"]


LLAMA = dict(position_embedding_type="rope", activation="swiglu", normalization="rmsnorm")


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


# --------------------------------------------------------------------------------------------- tokenizers
def _check_tokenizer(out_dir, ours, texts):
    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    bad = [t for t in texts if tok(t, add_special_tokens=False)["input_ids"] != ours.tokenize(t)]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ, e.g. {bad[:3]!r}"
    assert tok(texts[0])["input_ids"] == ours.tokenize(texts[0])  # nothing added by default either
    return tok


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
    mega = {"format": "megatron_ext.consolidated.v1", "state_dict": {}, "vocab_size": 10,
            "model_config": dataclasses.asdict(ModelConfig(arch="mega")), "source": {}}
    torch.save(mega, tmp_path / "mega.pt")
    rc, _, err = _cli(capsys, "--input", str(tmp_path / "mega.pt"), "--output", str(tmp_path / "hf"))
    assert rc == 2 and "convert_to_hf: error: model.arch=mega" in err
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
    from megatron_ext.training.consolidated import FORMAT, save_consolidated

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
    _check_tokenizer(str(tmp_path / "hf"), ours, shakespeare_lines(500) + NON_ASCII)


def test_cli_mext_archive(tmp_path, capsys, spm_models):
    archive = pytest.importorskip("megatron_ext.training.archive")
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
    _check_tokenizer(str(tmp_path / "hf"), ours, shakespeare_lines(500) + NON_ASCII)


# --------------------------------------------------------------------------------------------- end to end
def test_end_to_end_from_training_checkpoint(run_env, tmp_path, in_process):
    """pretrain_gpt.py (byte tokenizer, built-in corpus, a few steps) -> tools/convert_to_hf.py --input <run dir>
    -> the HF model's logits equal our model's loaded from the same checkpoint."""
    from omegaconf import OmegaConf

    from megatron_ext.config.loader import check_schema
    from megatron_ext.config.schema import GPTConfig
    from megatron_ext.tokenizers import ByteTokenizer

    fit_in_process(["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                    "model.seq_length=32", "model.micro_batch_size=2", "model.global_batch_size=2",
                    "model.position_embedding_type=rope", "model.activation=swiglu", "model.normalization=rmsnorm",
                    "model.bias=false", "model.share_embeddings_and_output_weights=false",
                    "trainer.max_steps=2", "trainer.val_check_interval=0", "trainer.log_every_n_steps=1",
                    "exp_manager.create_tensorboard_logger=false", f"exp_manager.exp_dir={tmp_path}",
                    "exp_manager.version=v0"])  # training in this process; the export through the tool's CLI
    run_dir = tmp_path / "megatron_gpt" / "v0"
    out = tmp_path / "hf"
    r = run_script(["tools/convert_to_hf.py", "--input", str(run_dir), "--output", str(out)], run_env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "LlamaForCausalLM (step 2)" in r.stdout and "byte tokenizer, tokenizer exact" in r.stdout

    # our model, straight from the checkpoint's model states (no consolidation code involved)
    typed = check_schema(OmegaConf.load(run_dir / "config.yaml"), GPTConfig)
    mcfg = OmegaConf.to_object(typed.model)
    model = GPTModel(mcfg, VOCAB, init_seed=0).eval()
    states = torch.load(run_dir / "checkpoints" / "step_0000002" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    model.load_state_dict({k: v for k, v in states.items() if not k.endswith("_extra_state")})
    text = "def main():\n    return 0  # héllo"
    ours = ByteTokenizer()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == ours.tokenize(text)
    _, got = hf_logits(str(out), ids)
    ref = our_logits(model, ids)
    diff = (got - ref).abs().max().item()
    print(f"end to end (llama, trained 2 steps): max |logits diff| = {diff:.3e}")
    assert diff <= TOL

"""Bad inputs for the Hugging Face export (issue 15, item 12): text that spells a control / special piece
literally (``<unk>``, ``<s>``, ``</s>``, ``<pad>``, ``<eod>``, byte pieces ``<0x41>``, user-defined symbols) must
encode to the training ids through both ``tokenizers.Tokenizer.from_file`` and ``AutoTokenizer`` with their
defaults, and an export whose tokenizer would still differ on the training text is refused (exit 2)."""
import os
import random
import sys

import pytest
import torch

from conftest import REPO, SHARED_DATA

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from megatron_ext.config.schema import ModelConfig  # noqa: E402
from megatron_ext.inference.hf_export import consolidated_from_model, export_to_hf  # noqa: E402
from megatron_ext.models.gpt import GPTModel  # noqa: E402
from megatron_ext.parallel.state import initialize_parallel  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "tools"))
import convert_to_hf  # noqa: E402

_HF_LITERALS = ["<unk>", "<s>", "</s>", "<pad>", "<mask>", "<eod>", "<bos>", "<0x41>", "<0x0A>", "▁</s>"]


@pytest.fixture(autouse=True, scope="module")
def _hf_tp1():
    initialize_parallel(1, 1, accelerator="cpu")
    torch.set_num_threads(1)
    yield


def _hf_corpus_lines(n=1500):
    """Corpus lines (tinyshakespeare when ../shared has it, else the built-in corpus) with a literal control piece
    inserted into two lines of three (at word boundaries and glued to words)."""
    if os.path.isfile(SHARED_DATA):
        with open(SHARED_DATA, encoding="utf-8") as f:
            base = [line.strip() for line in f if line.strip()]
    else:
        from megatron_ext.data.default_corpus import corpus_documents

        base = [" ".join(p.split()) for d in corpus_documents() for p in d.split("\n") if p.strip()]
    rnd = random.Random(0)
    out = []
    for i, line in enumerate(base[:n]):
        words = line.split()
        if i % 3 != 2 and words:
            sym, k = rnd.choice(_HF_LITERALS), rnd.randrange(len(words))
            if i % 2:
                words.insert(k, sym)
            else:
                words[k] += sym
        out.append(" ".join(words))
    return out


@pytest.fixture(scope="module")
def _hf_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_corpus") / "train.txt"
    lines = _hf_corpus_lines()
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path), lines


def _hf_tokenizer(kind, corpus_path, tmp_path):
    from megatron_ext.tokenizers import SentencePieceTokenizer, build_tokenizer, train_sentencepiece

    if kind in ("byte", "char"):
        return build_tokenizer(kind)
    model_type, opts = {"sp-unigram": ("unigram", {}), "sp-bpe": ("bpe", {}), "sp-char": ("char", {}),
                        "sp-unigram-bytes": ("unigram", {"byte_fallback": True}),
                        "sp-unigram-mask": ("unigram", {"extra_options": {"user_defined_symbols": ["<mask>"]}}),
                        "sp-bpe-mask": ("bpe", {"extra_options": {"user_defined_symbols": ["<mask>"]}})}[kind]
    path = train_sentencepiece(str(tmp_path / kind), 400, input_files=[corpus_path], model_type=model_type,
                               **opts)
    return SentencePieceTokenizer(path)


def _hf_consolidated(vocab):
    cfg = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=16, hidden_dropout=0.0,
                      attention_dropout=0.0, make_vocab_size_divisible_by=8)
    return consolidated_from_model(GPTModel(cfg, vocab, init_seed=0).eval())


@pytest.mark.parametrize("kind", ["byte", "char", "sp-unigram", "sp-bpe", "sp-char", "sp-unigram-bytes",
                                  "sp-unigram-mask"])
def test_hf_literal_control_pieces_encode_to_training_ids(tmp_path, _hf_corpus, kind):
    """Every corpus line (two in three spell a control piece) gets our ids from tokenizer.json and from
    AutoTokenizer (defaults), and our ids decode to our text through both."""
    import warnings

    from megatron_ext.errors import DataError

    corpus_path, lines = _hf_corpus
    ours = _hf_tokenizer(kind, corpus_path, tmp_path)
    out = tmp_path / "hf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_to_hf(_hf_consolidated(ours.vocab_size), str(out), tokenizer=ours)
    raw = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    auto.model_max_length = 1 << 40
    checked, bad_raw, bad_auto, bad_decode = 0, [], [], []
    for line in lines + _HF_LITERALS + ["".join(_HF_LITERALS), " ".join(_HF_LITERALS)]:
        try:
            ids = ours.tokenize(line)
        except DataError:  # the char tokenizer's unknown characters
            continue
        checked += 1
        if raw.encode(line, add_special_tokens=False).ids != ids:
            bad_raw.append(line)
        if auto(line, add_special_tokens=False)["input_ids"] != ids:
            bad_auto.append(line)
        if auto.decode(ids) != ours.detokenize(ids) or raw.decode(ids) != ours.detokenize(ids):
            bad_decode.append(line)
    assert checked > 1000
    assert not bad_raw, f"tokenizers: {len(bad_raw)} of {checked} lines differ, e.g. {bad_raw[:2]}"
    assert not bad_auto, f"AutoTokenizer: {len(bad_auto)} of {checked} lines differ, e.g. {bad_auto[:2]}"
    assert not bad_decode, f"decode: {len(bad_decode)} of {checked} lines differ, e.g. {bad_decode[:2]}"
    # the special pieces are still known by name and skipped when asked
    assert (auto.eos_token_id, auto.pad_token_id) == (ours.eod, ours.pad)
    assert auto.decode(ours.tokenize("hi") + [ours.eod, ours.pad], skip_special_tokens=True) == \
        ours.detokenize(ours.tokenize("hi"))


def _hf_cli(capsys, *argv):
    rc = convert_to_hf.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _hf_pt(tmp_path, ours):
    from megatron_ext.training.consolidated import FORMAT, save_consolidated

    obj = _hf_consolidated(ours.vocab_size)
    obj["model_config"]["tokenizer"] = {"library": "sentencepiece", "model": ours.model_path}
    obj.update(format=FORMAT, source={"path": "test"}, step=3)
    save_consolidated(obj, str(tmp_path / "m.pt"))
    return str(tmp_path / "m.pt")


def test_hf_export_refuses_a_tokenizer_that_differs_on_the_training_text(tmp_path, capsys):
    """A sentencepiece bpe model with a user-defined symbol: a line where the symbol is glued to a literal control
    piece (``<mask></s>``) is still cut differently by tokenizers' BPE (the piece after the symbol is a whole
    vocabulary entry). The export checks the tokenizer's own training text by default and refuses, naming the
    line and both id lists; nothing is written. --allow-tokenizer-mismatch exports and counts the lines."""
    from megatron_ext.tokenizers import SentencePieceTokenizer, train_sentencepiece

    lines = _hf_corpus_lines(600)
    lines[123] = "a line with <mask></s> glued"
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = train_sentencepiece(str(tmp_path / "bpe"), 400, input_files=[str(corpus)], model_type="bpe",
                               extra_options={"user_defined_symbols": ["<mask>"]})
    ours = SentencePieceTokenizer(path)
    pt = _hf_pt(tmp_path, ours)
    out = tmp_path / "hf"
    rc, _, err = _hf_cli(capsys, "--input", pt, "--output", str(out))
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{corpus}:124" in err and "'a line with <mask></s> glued'" in err
    assert "ours [" in err and "vs Hugging Face [" in err and "--allow-tokenizer-mismatch" in err
    assert not out.exists() or not os.listdir(out)
    # an explicit --verify-text is checked too
    other = tmp_path / "other.txt"
    other.write_text("fine line\nsay <mask></s> here\n", encoding="utf-8")
    os.remove(str(corpus))
    rc, _, err = _hf_cli(capsys, "--input", pt, "--output", str(out), "--verify-text", str(other))
    assert rc == 2 and f"{other}:2" in err
    rc, out_text, err = _hf_cli(capsys, "--input", pt, "--output", str(out), "--verify-text", str(other),
                                "--allow-tokenizer-mismatch")
    assert rc == 0, err
    assert "encodes 1 of" in err and "NOT exact on 1 of" in out_text
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_hf_export_checks_the_training_text_by_default(tmp_path, capsys, _hf_corpus):
    """Without --verify-text the sentencepiece model's recorded training input is sampled; the summary says so."""
    corpus_path, lines = _hf_corpus
    ours = _hf_tokenizer("sp-unigram", corpus_path, tmp_path)
    rc, out, err = _hf_cli(capsys, "--input", _hf_pt(tmp_path, ours), "--output", str(tmp_path / "hf"))
    assert rc == 0, err
    assert corpus_path in out
    from megatron_ext.inference.hf_export import PROBE_TEXTS

    n = int(out.split("tokenizer exact on ")[1].split(" ")[0])
    assert n >= len(PROBE_TEXTS) + len(lines)

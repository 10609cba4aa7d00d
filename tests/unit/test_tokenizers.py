"""Tokenizers: byte round trip, sentencepiece training + encode/decode, registry and errors."""
import json
import os
import pickle
import random

import numpy as np
import pytest

from megatron_ext.errors import ConfigError
from megatron_ext.tokenizers import (
    AVAILABLE_TOKENIZERS,
    ByteTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
    build_tokenizer_from_config,
    register_tokenizer,
    train_sentencepiece,
)


UNICODE_TEXTS = [
    "plain ascii",
    "héllo wörld — ça va? naïve café",
    "日本語のテキスト、中文，한국어",
    "emoji 🎉👩‍👩‍👧 and flags 🇫🇷",
    "combining e\u0301 and zero-width\u200bjoiner",
    "tabs\tand\nnewlines\r\nand NUL \x00 end",
    "",
    "   ",
]

def _make_words(n=400, seed=42):
    rng = random.Random(seed)
    onsets, vowels = "b c d f g h k l m n p r s t v w st tr pl qu".split(), "a e i o u ai ea ou".split()
    return sorted({
        "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 4)))
        for _ in range(n)
    })


WORDS = _make_words()


def make_corpus(n_lines=1500, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))))
    return lines


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    path = train_sentencepiece(
        str(d / "tiny"), 120, sentences=iter(make_corpus()), model_type="unigram",
        character_coverage=1.0,
    )
    return path


# ----------------------------------------------------------------------------- byte
def test_byte_round_trip_unicode():
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    for text in UNICODE_TEXTS:
        ids = tok.tokenize(text)
        assert ids == list(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)
        assert tok.detokenize(ids) == text
        assert tok.detokenize(np.asarray(ids, dtype=np.int64)) == text
    assert tok.tokenize_batch(UNICODE_TEXTS) == [tok.tokenize(t) for t in UNICODE_TEXTS]


def test_byte_specials_and_identity():
    tok = build_tokenizer("BYTE")  # case-insensitive
    assert tok.vocab_size == 259
    assert len({tok.eod, tok.pad, tok.bos}) == 3
    assert all(256 <= i < tok.vocab_size for i in (tok.eod, tok.pad, tok.bos))
    assert tok.eos == tok.eod
    # special ids are dropped on decode; invalid byte sequences become U+FFFD only there
    ids = [tok.bos] + tok.tokenize("ok é") + [tok.eod, tok.pad]
    assert tok.detokenize(ids) == "ok é"
    assert tok.detokenize([0xC3]) == "\ufffd"  # a cut 2-byte character
    assert tok.detokenize([104, 0xFF, 105]) == "h\ufffdi"
    with pytest.raises(ValueError, match="out of range"):
        tok.detokenize([259])
    with pytest.raises(ValueError, match="out of range"):
        tok.detokenize([-1])
    # megatron-core hashes unique_identifiers with json.dumps(default=obj.unique_identifiers)
    desc = json.dumps({"tokenizer": tok}, default=lambda o: o.unique_identifiers)
    assert '"ByteTokenizer"' in desc
    assert tok.describe()["library"] == "byte"
    assert tok.name == "byte"


def test_byte_flat_batch_matches_lists():
    tok = build_tokenizer("byte")
    texts = UNICODE_TEXTS
    tokens, lengths = tok.tokenize_batch_flat(texts)
    assert tokens.dtype == np.int32 and lengths.dtype == np.int64
    assert lengths.tolist() == [len(tok.tokenize(t)) for t in texts]
    assert tokens.tolist() == [i for t in texts for i in tok.tokenize(t)]
    tokens, lengths = tok.tokenize_batch_flat(texts, append_eod=True)
    assert tokens.tolist() == [i for t in texts for i in tok.tokenize(t) + [tok.eod]]
    assert lengths.tolist() == [len(tok.tokenize(t)) + 1 for t in texts]
    empty_tokens, empty_lengths = tok.tokenize_batch_flat([])
    assert empty_tokens.size == 0 and empty_lengths.size == 0


def test_byte_lone_surrogate_does_not_crash():
    tok = build_tokenizer("byte")
    ids = tok.tokenize("a\ud800b")  # possible from a JSON "\ud800" escape
    out = tok.detokenize(ids)
    assert out.startswith("a") and out.endswith("b") and "\ufffd" in out


# ----------------------------------------------------------------------------- sentencepiece
def test_sentencepiece_train_encode_decode(spm_model):
    tok = build_tokenizer("sentencepiece", spm_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 120
    assert (tok.unk, tok.bos, tok.eod, tok.pad) == (0, 1, 2, 3)
    assert tok.eos == tok.eod
    texts = make_corpus(50, seed=1)
    for text in texts:
        ids = tok.tokenize(text)
        assert ids and all(4 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text
    # batched paths agree with the single-text path
    assert tok.tokenize_batch(texts) == [tok.tokenize(t) for t in texts]
    tokens, lengths = tok.tokenize_batch_flat(texts, append_eod=True)
    assert tokens.tolist() == [i for t in texts for i in tok.tokenize(t) + [tok.eod]]
    assert lengths.tolist() == [len(tok.tokenize(t)) + 1 for t in texts]
    # the eod appended to a document does not show up in the decoded text
    assert tok.detokenize(tok.tokenize(texts[0]) + [tok.eod]) == texts[0]
    with pytest.raises(ValueError, match="out of range"):
        tok.detokenize([tok.vocab_size])


def test_sentencepiece_pickle_and_identity(spm_model, tmp_path):
    tok = build_tokenizer("sentencepiece", spm_model)
    clone = pickle.loads(pickle.dumps(tok))
    text = "the noble queen speaks"
    assert clone.tokenize(text) == tok.tokenize(text)
    assert clone.unique_identifiers == tok.unique_identifiers
    ident = tok.unique_identifiers
    assert ident["tokenizer_path"] == [os.path.abspath(spm_model)]
    json.dumps(ident)  # serialisable for megatron-core's cache hash
    # a different model at another path gives different identifiers
    other = train_sentencepiece(
        str(tmp_path / "other"), 100, sentences=iter(make_corpus(800, seed=5)),
        character_coverage=1.0,
    )
    assert build_tokenizer("sentencepiece", other).unique_identifiers["model_md5"] != ident["model_md5"]


def test_train_tokenizer_cli_text_and_jsonl(tmp_path, capsys):
    from megatron_ext.cli import train_tokenizer

    lines = make_corpus(1200, seed=3)
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rc = train_tokenizer.main(
        ["--input", str(txt), "--model-prefix", str(tmp_path / "out" / "t"), "--vocab-size", "90",
         "--model-type", "bpe", "--character-coverage", "1.0"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    model = str(tmp_path / "out" / "t.model")
    assert model in out and os.path.isfile(model)
    tok = build_tokenizer("sentencepiece", model)
    assert tok.vocab_size == 90 and tok.eod == 2 and tok.pad == 3
    assert tok.detokenize(tok.tokenize(lines[0])) == lines[0]

    jl = tmp_path / "corpus.jsonl"
    jl.write_text("".join(json.dumps({"body": l, "n": i}) + "\n" for i, l in enumerate(lines)))
    rc = train_tokenizer.main(
        ["--input", str(jl), "--json-keys", "body", "--model-prefix", str(tmp_path / "j"),
         "--vocab-size", "90", "--character-coverage", "1.0"]
    )
    assert rc == 0
    assert build_tokenizer("sentencepiece", str(tmp_path / "j.model")).vocab_size == 90

    # errors: one message, exit code 2, no model written
    rc = train_tokenizer.main(
        ["--input", str(tmp_path / "missing.txt"), "--model-prefix", str(tmp_path / "m"),
         "--vocab-size", "90"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "missing.txt" in err and "does not exist" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "a b"}) + "\n" + '{"body": "x"\n')
    rc = train_tokenizer.main(
        ["--input", str(bad), "--json-keys", "body", "--model-prefix", str(tmp_path / "b"),
         "--vocab-size", "20"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "line 2" in err and "not valid JSON" in err
    assert not os.path.exists(tmp_path / "b.model")
    rc = train_tokenizer.main(
        ["--input", str(txt), "--model-prefix", str(tmp_path / "big"), "--vocab-size", "100000"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Vocabulary size too high" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- errors / registry
def test_sentencepiece_missing_model_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.tokenizer\.model") as e:
        build_tokenizer("sentencepiece", None)
    assert "None" in str(e.value)
    missing = str(tmp_path / "nope.model")
    with pytest.raises(ConfigError) as e:
        build_tokenizer("sentencepiece", missing)
    assert "model.tokenizer.model" in str(e.value) and missing in str(e.value)
    with pytest.raises(ConfigError, match="is not a file"):
        build_tokenizer("sentencepiece", str(tmp_path))
    # command-line tools name their flag instead of the config key
    with pytest.raises(ConfigError, match="--tokenizer-model"):
        build_tokenizer("sentencepiece", None, model_key="--tokenizer-model")


def test_sentencepiece_corrupt_or_eosless_model(tmp_path):
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"\x00\x01 definitely not a protobuf \xff" * 10)
    with pytest.raises(ConfigError) as e:
        build_tokenizer("sentencepiece", str(corrupt))
    assert str(corrupt) in str(e.value) and "not a valid sentencepiece model" in str(e.value)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match="empty"):
        build_tokenizer("sentencepiece", str(empty))
    no_eos = train_sentencepiece(
        str(tmp_path / "noeos"), 60, sentences=iter(make_corpus(600)),
        character_coverage=1.0, extra_options={"eos_id": -1, "pad_id": -1},
    )
    with pytest.raises(ConfigError) as e:
        build_tokenizer("sentencepiece", no_eos)
    assert "eos" in str(e.value) and no_eos in str(e.value)


def test_sentencepiece_pad_defaults_to_eod(tmp_path):
    path = train_sentencepiece(
        str(tmp_path / "nopad"), 60, sentences=iter(make_corpus(600)),
        character_coverage=1.0, extra_options={"pad_id": -1},
    )
    tok = build_tokenizer("sentencepiece", path)
    assert tok.pad == tok.eod == 2 and tok.bos == 1


def test_unknown_library_lists_choices():
    with pytest.raises(ConfigError) as e:
        build_tokenizer("wordpiece")
    msg = str(e.value)
    assert "model.tokenizer.library" in msg and "wordpiece" in msg
    for name in AVAILABLE_TOKENIZERS:
        assert name in msg
    with pytest.raises(ConfigError, match="model.tokenizer.library"):
        build_tokenizer(None)


def test_registry_and_config_builder():
    class Shifted(ByteTokenizer):
        name = "shifted-byte"

    register_tokenizer("shifted-byte", Shifted)
    try:
        assert "shifted-byte" in AVAILABLE_TOKENIZERS
        assert isinstance(build_tokenizer("shifted-byte"), Shifted)
        with pytest.raises(ValueError, match="already registered"):
            register_tokenizer("shifted-byte", ByteTokenizer)
        register_tokenizer("shifted-byte", ByteTokenizer, overwrite=True)
        assert type(build_tokenizer("shifted-byte")) is ByteTokenizer
    finally:
        AVAILABLE_TOKENIZERS.pop("shifted-byte", None)

    from megatron_ext.config.schema import TokenizerConfig

    assert isinstance(build_tokenizer_from_config(TokenizerConfig()), ByteTokenizer)
    assert isinstance(build_tokenizer_from_config({"library": "byte"}), ByteTokenizer)
    with pytest.raises(ConfigError, match="model.tokenizer.model"):
        build_tokenizer_from_config({"library": "sentencepiece", "model": None})


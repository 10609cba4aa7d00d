"""tools/preprocess_data.py: outputs read back with megatron-core's IndexedDataset."""
import filecmp
import json
import os
import random

import numpy as np
import pytest

from megatron_ext.tokenizers import (
    AVAILABLE_TOKENIZERS,
    ByteTokenizer,
    build_tokenizer,
    register_tokenizer,
    train_sentencepiece,
)

from helpers import REPO  # noqa: E402
SHAKESPEARE = os.environ.get("TEST_SHAKESPEARE", os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare.txt"))

from megatron_ext.cli import preprocess_data as pp  # noqa: E402  (the code of tools/preprocess_data.py)


def _indexed_dataset(prefix):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(prefix)


def _corpus_lines():
    """~1500 lines of tinyshakespeare (or generated text) plus non-ASCII and blank lines."""
    if os.path.isfile(SHAKESPEARE):
        with open(SHAKESPEARE, encoding="utf-8") as f:
            lines = f.read().split("\n")[:1500]
    else:
        # no ../shared: real English that ships with Python (the help topics), rich enough for a 300-piece vocab
        from pydoc_data.topics import topics

        text = "\n".join(topics[k] for k in sorted(topics))
        lines = text.split("\n")[:1500]
    extra = ["Ça va, naïve café — 日本語 🎉", "   ", "", "tab\there", "Ωμέγα ∑ ≠ ∞"]
    for i, line in enumerate(extra):
        lines.insert(100 + 37 * i, line)
    return lines


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    lines = _corpus_lines()
    txt = d / "corpus.txt"
    txt.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = [l for l in lines if l.strip()]
    return {"dir": d, "txt": str(txt), "docs": docs}


@pytest.fixture(scope="module")
def spm_model(corpus):
    return train_sentencepiece(
        str(corpus["dir"] / "spm"), 300, input_files=[corpus["txt"]], character_coverage=1.0
    )


def run_pp(args, capsys=None):
    rc = pp.main([str(a) for a in args] + ["--no-progress"])
    out = capsys.readouterr() if capsys is not None else None
    return rc, out


def read_docs(prefix):
    ds = _indexed_dataset(prefix)
    return ds, [ds[i].tolist() for i in range(len(ds))]


def check_dataset(prefix, tok, docs, append_eod):
    ds, got = read_docs(prefix)
    expected = [tok.tokenize(d) + ([tok.eod] if append_eod else []) for d in docs]
    assert len(ds) == len(docs)
    assert ds.index.dtype == (np.uint16 if tok.vocab_size < 65500 else np.int32)
    assert ds.document_indices.tolist() == list(range(len(docs) + 1))
    assert got == expected
    assert ds.sequence_lengths.tolist() == [len(e) for e in expected]


@pytest.mark.parametrize("append_eod", [False, True])
def test_byte_text_roundtrip(corpus, tmp_path, capsys, append_eod):
    prefix = tmp_path / "out" / "byte"
    args = ["--input", corpus["txt"], "--output-prefix", prefix, "--tokenizer-library", "byte",
            "--workers", 2, "--chunk-bytes", 4096]
    if append_eod:
        args.append("--append-eod")
    rc, out = run_pp(args, capsys)
    assert rc == 0, out.err
    ds_prefix = f"{prefix}_text_document"
    assert f"{ds_prefix}.bin" in out.out and f"{len(corpus['docs'])} docs" in out.out
    tok = build_tokenizer("byte")
    check_dataset(ds_prefix, tok, corpus["docs"], append_eod)
    # decoding what was stored gives back the text
    _, got = read_docs(ds_prefix)
    assert [tok.detokenize(ids) for ids in got] == corpus["docs"]
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".tmp")]


@pytest.mark.parametrize("append_eod", [False, True])
def test_sentencepiece_jsonl_roundtrip(corpus, spm_model, tmp_path, capsys, append_eod):
    jl = tmp_path / "corpus.jsonl"
    with open(jl, "w", encoding="utf-8") as f:
        for i, d in enumerate(corpus["docs"]):
            f.write(json.dumps({"text": d, "id": i}, ensure_ascii=(i % 2 == 0)) + "\n")
            if i % 50 == 0:
                f.write("\n")  # blank lines are skipped
    prefix = tmp_path / "spm"
    args = ["--input", jl, "--output-prefix", prefix, "--tokenizer-library", "sentencepiece",
            "--tokenizer-model", spm_model, "--workers", 2, "--chunk-bytes", 8192]
    if append_eod:
        args.append("--append-eod")
    rc, out = run_pp(args, capsys)
    assert rc == 0, out.err
    tok = build_tokenizer("sentencepiece", spm_model)
    check_dataset(f"{prefix}_text_document", tok, corpus["docs"], append_eod)


def test_sentencepiece_plain_text(corpus, spm_model, tmp_path, capsys):
    prefix = tmp_path / "spmtxt"
    rc, out = run_pp(["--input", corpus["txt"], "--output-prefix", prefix,
                      "--tokenizer-library", "sentencepiece", "--tokenizer-model", spm_model,
                      "--workers", 1, "--append-eod"], capsys)
    assert rc == 0, out.err
    check_dataset(f"{prefix}_text_document", build_tokenizer("sentencepiece", spm_model),
                  corpus["docs"], True)


def test_jsonl_two_keys_two_complete_datasets(tmp_path, capsys):
    rng = random.Random(1)
    rows = [{"title": f"title {i} é", "body": " ".join(str(rng.random()) for _ in range(i % 7)),
             "other": i} for i in range(300)]
    jl = tmp_path / "two.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    prefix = tmp_path / "two"
    rc, out = run_pp(["--input", jl, "--output-prefix", prefix, "--json-keys", "title", "body",
                      "--workers", 2, "--chunk-bytes", 2048, "--append-eod"], capsys)
    assert rc == 0, out.err
    tok = build_tokenizer("byte")
    for key in ("title", "body"):
        p = f"{prefix}_{key}_document"
        assert os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx")
        check_dataset(p, tok, [r[key] for r in rows], True)  # empty bodies stay aligned: [eod]


def test_workers_1_and_2_byte_identical(corpus, spm_model, tmp_path):
    outs = []
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        rc, _ = run_pp(["--input", corpus["txt"], "--output-prefix", prefix,
                        "--tokenizer-library", "sentencepiece", "--tokenizer-model", spm_model,
                        "--workers", workers, "--chunk-bytes", 3000, "--append-eod"])
        assert rc == 0
        outs.append(f"{prefix}_text_document")
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(outs[0] + ext, outs[1] + ext, shallow=False)
    # the chunk size does not change the output either
    rc, _ = run_pp(["--input", corpus["txt"], "--output-prefix", tmp_path / "big",
                    "--tokenizer-library", "sentencepiece", "--tokenizer-model", spm_model,
                    "--workers", 2, "--append-eod"])
    assert rc == 0
    assert filecmp.cmp(outs[0] + ".bin", f"{tmp_path}/big_text_document.bin", shallow=False)
    assert filecmp.cmp(outs[0] + ".idx", f"{tmp_path}/big_text_document.idx", shallow=False)


def test_format_detection_crlf_and_bom(tmp_path, capsys):
    # JSONL content under a .txt name is detected from the first non-blank line
    f = tmp_path / "data.txt"
    f.write_bytes(b"\xef\xbb\xbf\n" + b'{"text": "hello"}\r\n{"text": "w\\u00f6rld"}\r\n')
    rc, out = run_pp(["--input", f, "--output-prefix", tmp_path / "a", "--workers", 1], capsys)
    assert rc == 0, out.err
    _, got = read_docs(f"{tmp_path}/a_text_document")
    assert got == [list(b"hello"), list("wörld".encode())]
    # plain text with CRLF line ends and a BOM
    g = tmp_path / "plain.txt"
    g.write_bytes(b"\xef\xbb\xbfline one\r\n\r\nline two\r\n")
    rc, out = run_pp(["--input", g, "--output-prefix", tmp_path / "b", "--workers", 1], capsys)
    assert rc == 0, out.err
    _, got = read_docs(f"{tmp_path}/b_text_document")
    assert got == [list(b"line one"), list(b"line two")]
    # forcing text on a JSONL file keeps the raw lines
    rc, out = run_pp(["--input", f, "--output-prefix", tmp_path / "c", "--workers", 1,
                      "--input-format", "text"], capsys)
    assert rc == 0
    _, got = read_docs(f"{tmp_path}/c_text_document")
    assert got[0] == list(b'{"text": "hello"}')


def test_large_vocab_uses_int32(tmp_path, capsys):
    class WideByte(ByteTokenizer):
        """Byte tokenizer whose ids are shifted above 65,500 (to exercise the int32 path)."""

        name = "wide-byte"
        OFFSET = 70000

        @property
        def vocab_size(self):
            return self.OFFSET + 259

        def tokenize_batch_flat(self, texts, append_eod=False):
            tokens, lengths = super().tokenize_batch_flat(texts, append_eod)
            return tokens + self.OFFSET, lengths

        def tokenize(self, text):
            return [i + self.OFFSET for i in super().tokenize(text)]

    register_tokenizer("wide-byte", WideByte)
    try:
        f = tmp_path / "t.txt"
        docs = ["abc", "dé"]
        f.write_text("\n".join(docs) + "\n", encoding="utf-8")
        rc, out = run_pp(["--input", f, "--output-prefix", tmp_path / "w", "--workers", 1,
                          "--tokenizer-library", "wide-byte"], capsys)
        assert rc == 0, out.err
        ds, got = read_docs(f"{tmp_path}/w_text_document")
        assert ds.index.dtype == np.int32
        assert got == [WideByte().tokenize(d) for d in docs]
    finally:
        AVAILABLE_TOKENIZERS.pop("wide-byte", None)


def _assert_clean_error(rc, out, *needles):
    assert rc == 2
    assert "Traceback" not in out.err
    msg = out.err.strip().splitlines()[-1]
    assert msg.startswith("preprocess_data: error: ")
    for n in needles:
        assert str(n) in msg, msg


def test_bad_json_line_names_file_and_line(tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(500)]
    lines[421] = '{"text": "unterminated'
    f.write_text("\n".join(lines) + "\n")
    prefix = tmp_path / "bad"
    rc, out = run_pp(["--input", f, "--output-prefix", prefix, "--workers", 2,
                      "--chunk-bytes", 1024], capsys)
    _assert_clean_error(rc, out, f, "line 422", "not valid JSON")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("bad_")]  # nothing half-written


def test_missing_key_and_wrong_type(tmp_path, capsys):
    f = tmp_path / "k.jsonl"
    f.write_text('{"text": "a"}\n\n{"body": "b"}\n')
    rc, out = run_pp(["--input", f, "--output-prefix", tmp_path / "k", "--workers", 1], capsys)
    _assert_clean_error(rc, out, f, "line 3", "missing key 'text'")
    f.write_text('{"text": "a"}\n{"text": ["b"]}\n')
    rc, out = run_pp(["--input", f, "--output-prefix", tmp_path / "k", "--workers", 1], capsys)
    _assert_clean_error(rc, out, "line 2", "'text'", "expected a string")
    f.write_text('{"text": "a"}\n[1, 2]\n')
    rc, out = run_pp(["--input", f, "--output-prefix", tmp_path / "k", "--workers", 1], capsys)
    _assert_clean_error(rc, out, "line 2", "expected a JSON object")


def test_input_and_tokenizer_errors(tmp_path, corpus, capsys):
    rc, out = run_pp(["--input", tmp_path / "missing.jsonl", "--output-prefix", tmp_path / "x",
                      "--workers", 1], capsys)
    _assert_clean_error(rc, out, "missing.jsonl", "does not exist")
    rc, out = run_pp(["--input", corpus["txt"], "--output-prefix", tmp_path / "x", "--workers", 1,
                      "--tokenizer-library", "sentencepiece"], capsys)
    _assert_clean_error(rc, out, "--tokenizer-model")
    rc, out = run_pp(["--input", corpus["txt"], "--output-prefix", tmp_path / "x", "--workers", 1,
                      "--tokenizer-library", "sentencepiece", "--tokenizer-model",
                      tmp_path / "none.model"], capsys)
    _assert_clean_error(rc, out, "none.model", "does not exist")
    rc, out = run_pp(["--input", corpus["txt"], "--output-prefix", tmp_path / "x", "--workers", 1,
                      "--tokenizer-library", "wordpiece"], capsys)
    _assert_clean_error(rc, out, "--tokenizer-library", "wordpiece", "byte", "sentencepiece")
    rc, out = run_pp(["--input", corpus["txt"], "--output-prefix", tmp_path / "x", "--workers", 1,
                      "--json-keys", "a", "b"], capsys)
    _assert_clean_error(rc, out, "--json-keys", "plain-text")
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"ok\ncaf\xe9\n")
    rc, out = run_pp(["--input", f, "--output-prefix", tmp_path / "x", "--workers", 1], capsys)
    _assert_clean_error(rc, out, "line 2", "UTF-8")


def test_output_feeds_megatron_gpt_dataset(corpus, tmp_path):
    """The written dataset + our tokenizer drive megatron-core's GPTDataset end to end."""
    import warnings

    prefix = tmp_path / "gpt"
    rc, _ = run_pp(["--input", corpus["txt"], "--output-prefix", prefix, "--workers", 2,
                    "--append-eod"])
    assert rc == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        tok = build_tokenizer("byte")
        cfg = GPTDatasetConfig(
            random_seed=1, sequence_length=32, blend=([f"{prefix}_text_document"], None),
            split="90,5,5", path_to_cache=str(tmp_path / "cache"), tokenizer=tok,
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        )
        train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [20, 2, 2], lambda: True, cfg).build()
        sample = train[0]
    tokens = sample["tokens"].numpy()
    labels = sample["labels"].numpy()
    assert tokens.shape == (32,) and (tokens < tok.vocab_size).all()
    assert (tokens[1:] == labels[:-1]).all()
    # the 33-token window is made of (shuffled) documents separated by eod: every piece
    # between two eods is a whole document, the pieces at the ends are part of one
    window = np.concatenate([tokens, labels[-1:]]).tolist()
    pieces, cur = [], []
    for t in window:
        if t == tok.eod:
            pieces.append(cur)
            cur = []
        else:
            cur.append(t)
    pieces.append(cur)
    doc_bytes = [d.encode("utf-8") for d in corpus["docs"]]
    whole = set(doc_bytes)
    for i, piece in enumerate(pieces):
        b = bytes(piece)
        if 0 < i < len(pieces) - 1:
            assert b in whole
        elif b:
            assert any(b in d for d in doc_bytes)


def test_merge_equals_megatron_core_add_index(tmp_path):
    """tools/merge_datasets.py's merge (megatron_ext/indexed_files.py) is byte for byte megatron-core's
    IndexedDatasetBuilder.add_index of the same inputs -- one of them with a document of two sequences -- and
    IndexedDataset reads it."""
    import warnings

    import helpers
    from megatron_ext.cli import merge_datasets as md

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    a = helpers.write_dataset(str(tmp_path / "a"), [[1, 2, 3], [4], [5, 6]])
    b = str(tmp_path / "b")
    builder = IndexedDatasetBuilder(b + ".bin", dtype=np.uint16)
    builder.add_document(np.array([7, 8, 9, 10], dtype=np.int64), [1, 3])  # one document, two sequences
    builder.add_document(np.array([11], dtype=np.int64), [1])
    builder.finalize(b + ".idx")
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for p in (a, b):
        ref.add_index(p)
    ref.finalize(str(tmp_path / "ref.idx"))

    assert md.main(["--input", a, b + ".idx", "--output-prefix", str(tmp_path / "out" / "m")]) == 0
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(tmp_path / ("ref" + ext), tmp_path / "out" / ("m" + ext), shallow=False)
    ds = _indexed_dataset(str(tmp_path / "out" / "m"))
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2, 3], [4], [5, 6], [7], [8, 9, 10], [11]]
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 5, 6]

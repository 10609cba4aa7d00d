"""data_impl=jsonl: JSONL documents with numeric attribute columns (for a guided_cls head). Attribute values in
samples and batches, long documents keep their attributes when chunked, samples identical to text_mmap on the
same texts, splits, blends, the cached per-file check, and one clear error per kind of bad line or config."""
from __future__ import annotations

import json
import os
import pickle
import re

import numpy as np
import pytest
import torch

from megatron_ext.config.schema import BARTDataConfig
from megatron_ext.data import samplers, text_mmap
from megatron_ext.data.bart import (
    SAMPLE_KEYS,
    BARTDataset,
    BARTNoiser,
    BlendedBARTDataset,
    JSONLDocuments,
    TextDocuments,
    build_bart_datasets,
    collate_bart_batch,
)
from megatron_ext.data.text_mmap import JSONLMemMapDataset
from megatron_ext.errors import ConfigError, DataError
from megatron_ext.tokenizers import build_tokenizer, ensure_mask_token

ATTRS = ["logP", "label"]


@pytest.fixture(scope="module")
def btok():
    return ensure_mask_token(build_tokenizer("byte"))


def doc_text(i, reps=3):
    return f"<{i:03d}> " * reps


def logp(i, offset=0.0):
    return offset + i * 0.25 - 3.0


def write_jsonl(path, records, tail=""):
    """``records``: dicts (dumped as JSON), or raw strings written as the line itself."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
        f.write(tail)
    return str(path)


def marker_records(n, offset=0.0, reps=3, long_docs=()):
    return [{"text": doc_text(i, 200 if i in long_docs else reps), "logP": logp(i, offset), "label": i % 3}
            for i in range(n)]


def cfg(prefix, tmp_path, **kw):
    base = dict(data_prefix=prefix if isinstance(prefix, list) else [prefix], data_impl="jsonl",
                attribute_keys=list(ATTRS), index_mapping_dir=str(tmp_path / "cache"))
    base.update(kw)
    return BARTDataConfig(**base)


def doc_of_target(tok, ds, i):
    m = re.search(r"<(\d{3})>", tok.detokenize(ds.target_tokens(i)))
    return None if m is None else int(m.group(1))


# ----------------------------------------------------------------------------- samples and batches
def test_attribute_values_in_samples_and_batches(tmp_path, btok):
    path = write_jsonl(tmp_path / "d" / "mols.jsonl", marker_records(40))
    train = build_bart_datasets(cfg(path, tmp_path, splits_string="1,0,0"), btok, 32, 40, (90, 0, 0), seed=4)[0]
    assert train.attribute_keys == ("logP", "label") and train.sample_keys == SAMPLE_KEYS + ("logP", "label")
    for i in range(len(train)):
        s = train[i]
        assert list(s) == list(SAMPLE_KEYS) + ATTRS or sorted(s) == sorted(SAMPLE_KEYS + tuple(ATTRS))
        doc = train.sample_source(i)[0]
        assert doc_of_target(btok, train, i) == doc
        for key in ATTRS:
            assert isinstance(s[key], np.float32) and s[key].shape == ()
        assert s["logP"] == np.float32(logp(doc)) and s["label"] == np.float32(doc % 3)
        # the usual keys are untouched, noised_mask included
        n = int(s["loss_mask"].sum()) - 1
        assert s["labels"][:n].tolist() == train.target_tokens(i).tolist()
        assert s["noised_mask"].dtype == np.float32 and s["noised_mask"][n:].sum() == 0
    batch = collate_bart_batch([train[i] for i in range(6)])
    assert sorted(batch) == sorted(SAMPLE_KEYS + tuple(ATTRS))
    docs = [train.sample_source(i)[0] for i in range(6)]
    assert batch["logP"].dtype == torch.float32 and batch["logP"].shape == (6,)
    assert batch["logP"].tolist() == [float(np.float32(logp(d))) for d in docs]
    assert batch["label"].dtype == torch.float32 and batch["label"].long().tolist() == [d % 3 for d in docs]
    assert batch["noised_mask"].shape == (6, 40) and batch["text_enc"].shape == (6, 32)
    # DataLoader workers (pickled dataset) and the resumable pretraining loader give the same batches
    loader = torch.utils.data.DataLoader(train, batch_size=3, num_workers=2, collate_fn=collate_bart_batch)
    first = next(iter(loader))
    for key in batch:
        assert torch.equal(first[key], batch[key][:3])
    pre = next(iter(samplers.build_pretraining_dataloader(train, consumed_samples=0, micro_batch_size=6, dp_rank=0,
                                                          dp_size=1)))
    for key in batch:
        assert torch.equal(pre[key], batch[key])


def test_long_documents_keep_their_attributes(tmp_path, btok):
    records = marker_records(6, long_docs=(0, 3))  # 1200-byte documents 0 and 3
    path = write_jsonl(tmp_path / "d" / "long.jsonl", records)
    train = build_bart_datasets(cfg(path, tmp_path, splits_string="1,0,0"), btok, 64, 64, (60, 0, 0), seed=1)[0]
    assert train.chunk_length == 63 and train.num_chunks == 2 * 20 + 4
    pieces = {}
    for i in range(len(train)):
        doc, beg, end = train.sample_source(i)
        pieces.setdefault(doc, set()).add((beg, end))
        s = train[i]
        assert s["logP"] == np.float32(logp(doc)) and s["label"] == np.float32(doc % 3)
    for doc in (0, 3):  # cut evenly into 20 chunks that cover the document
        spans = sorted(pieces[doc])
        assert len(spans) == 20 and spans[0][0] == 0 and spans[-1][1] == 1200
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_same_samples_as_text_mmap(tmp_path, btok):
    """Chunking, seeds, splits and blending are those of text_mmap: the same texts give the same samples."""
    records = marker_records(30, long_docs=(4, 17))
    records[7]["text"] = ""  # a document without text: skipped by both
    for name in ("a", "b"):
        write_jsonl(tmp_path / "j" / f"{name}.data", [dict(r, logP=r["logP"] + (name == "b")) for r in records])
        (tmp_path / "t").mkdir(exist_ok=True)
        (tmp_path / "t" / f"{name}.data").write_text("".join(r["text"] + "\n" for r in records))
    for prefix in (["{}/a.data"], [2, "{}/a.data", 1, "{}/b.data"]):
        def paths(sub):
            return [p.format(str(tmp_path / sub)) if isinstance(p, str) else p for p in prefix]

        kw = dict(splits_string="7,2,1", whole_word_masking=True, delete_mask_prob=0.1)
        js = build_bart_datasets(cfg(paths("j"), tmp_path, **kw), btok, 48, 48, (80, 20, 5), seed=9)
        tx = build_bart_datasets(cfg(paths("t"), tmp_path, data_impl="text_mmap", attribute_keys=[], **kw),
                                 btok, 48, 48, (80, 20, 5), seed=9)
        for a, b in zip(js, tx):
            assert len(a) == len(b)
            for i in range(len(a)):
                sa, sb = a[i], b[i]
                for key in SAMPLE_KEYS:
                    np.testing.assert_array_equal(sa[key], sb[key])
                assert set(sa) - set(sb) == set(ATTRS)


def test_jsonl_dataset_lines_blank_lines_crlf_bom(tmp_path, btok):
    raw = ("\ufeff" + json.dumps({"text": "héllo", "logP": 1.5, "label": 2}) + "\r\n"
           + "\n"  # blank line: a document without text (line numbers still count it)
           + "   \t\n"  # whitespace only: blank too
           + json.dumps({"label": 0, "logP": -2, "text": "", "extra": [1, 2]}) + "\n"  # empty text, extra keys ok
           + json.dumps({"text": "x\ud800y", "logP": 10 ** 6, "label": 1}))  # lone surrogate; no final newline
    path = tmp_path / "lines.jsonl"
    path.write_bytes(raw.encode("utf-8", errors="surrogatepass"))
    ds = JSONLMemMapDataset(str(path), attribute_keys=ATTRS)
    assert len(ds) == 5
    assert [ds[i] for i in range(5)] == ["héllo", "", "", "", "x\ud800y"]
    assert ds.get_record(1) is None and ds.get_record(3)["extra"] == [1, 2]
    table = ds.attribute_table()
    assert table.dtype == np.float32 and table.shape == (5, 2)
    np.testing.assert_array_equal(table[[0, 3, 4]], [[1.5, 2], [-2, 0], [1e6, 1]])
    assert np.isnan(table[1]).all() and np.isnan(ds.attributes(2)).all()
    assert ds.attributes(-1).tolist() == [1e6, 1.0]
    tds = JSONLMemMapDataset(str(path), tokenizer=btok, attribute_keys=ATTRS)
    assert tds.token_lengths().tolist() == [6, 0, 0, 0, 5]
    assert tds[0].tolist() == list("héllo".encode()) and tds[4].tolist() == btok.tokenize("x\ud800y")
    again = pickle.loads(pickle.dumps(tds))
    assert again[0].tolist() == tds[0].tolist() and again.attributes(4).tolist() == [1e6, 1.0]
    # BART skips the documents without tokens
    train = build_bart_datasets(cfg(str(path), tmp_path, splits_string="1,0,0"), btok, 32, 32, (4, 0, 0), 0)[0]
    assert train.num_chunks == 2 and {train.sample_source(i)[0] for i in range(4)} == {0, 4}


def test_text_key_and_no_attributes(tmp_path, btok):
    path = write_jsonl(tmp_path / "d" / "smiles.jsonl",
                       [{"smiles": doc_text(i), "text": 5, "logP": "n/a"} for i in range(20)])
    train = build_bart_datasets(cfg(path, tmp_path, text_key="smiles", attribute_keys=[], splits_string="1,0,0"),
                                btok, 32, 32, (10, 0, 0), seed=0)[0]
    for i in range(10):  # the text comes from 'smiles'; the other keys are not looked at
        assert sorted(train[i]) == sorted(SAMPLE_KEYS)
        assert doc_of_target(btok, train, i) == train.sample_source(i)[0]
    assert sorted(collate_bart_batch([train[0], train[1]])) == sorted(SAMPLE_KEYS)
    # a dict config without text_key / attribute_keys (an older schema) means "text" and []
    plain = write_jsonl(tmp_path / "d" / "plain.jsonl", [{"text": doc_text(i)} for i in range(10)])
    old = dict(data_prefix=[plain], data_impl="jsonl", splits_string="1,0,0", index_mapping_dir=str(tmp_path / "c"))
    ds = build_bart_datasets(old, btok, 32, 32, (5, 0, 0), seed=0)[0]
    assert sorted(ds[0]) == sorted(SAMPLE_KEYS)


def test_sentencepiece_token_counts_follow_text_key(tmp_path, monkeypatch):
    from megatron_ext.tokenizers import train_sentencepiece

    texts = [f"line number {i} with some words" for i in range(300)]
    model = train_sentencepiece(str(tmp_path / "spm"), 60, sentences=iter(texts), character_coverage=1.0)
    tok = ensure_mask_token(build_tokenizer("sentencepiece", model))
    path = write_jsonl(tmp_path / "d.jsonl", [{"a": t, "b": t[:5], "y": i} for i, t in enumerate(texts)])
    cache = str(tmp_path / "cache")
    da = JSONLMemMapDataset(path, tokenizer=tok, index_mapping_dir=cache, text_key="a", attribute_keys=["y"])
    db = JSONLMemMapDataset(path, tokenizer=tok, index_mapping_dir=cache, text_key="b")
    assert da.token_lengths().tolist() == [len(tok.tokenize(t)) for t in texts]
    assert db.token_lengths().tolist() == [len(tok.tokenize(t[:5])) for t in texts]
    assert da[3].tolist() == tok.tokenize(texts[3])

    def boom(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(type(tok), "tokenize_batch_flat", boom)
    monkeypatch.setattr(JSONLMemMapDataset, "_scan_columns", boom)
    again = JSONLMemMapDataset(path, tokenizer=tok, index_mapping_dir=cache, text_key="a", attribute_keys=["y"])
    assert again.token_lengths().tolist() == da.token_lengths().tolist()
    assert again.attributes(7).tolist() == [7.0]


# ----------------------------------------------------------------------------- splits and blends
def test_splits_are_disjoint_and_carry_their_attributes(tmp_path, btok):
    path = write_jsonl(tmp_path / "d" / "docs.jsonl", marker_records(40))
    train, valid, test = build_bart_datasets(cfg(path, tmp_path, splits_string="8,1,1"), btok, 64, 64,
                                             (200, 30, 30), seed=3)
    seen = []
    for ds, (beg, end) in zip((train, valid, test), [(0, 32), (32, 36), (36, 40)]):
        assert ds.doc_range == (beg, end)
        docs = set()
        for i in range(len(ds)):
            doc = ds.sample_source(i)[0]
            docs.add(doc)
            s = ds[i]
            assert doc_of_target(btok, ds, i) == doc and s["logP"] == np.float32(logp(doc))
        assert docs == set(range(beg, end))
        seen.append(docs)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_blend_of_two_jsonl_files(tmp_path, btok):
    a = write_jsonl(tmp_path / "d" / "a.jsonl", marker_records(20, offset=100.0))
    b = write_jsonl(tmp_path / "d" / "b.jsonl",  # other key order and extra keys: fine
                    [{"label": 7, "id": i, "logP": logp(i, 200.0), "text": f"[{i:03d}] " * 3} for i in range(20)])
    train = build_bart_datasets(cfg([3, a, 1, b], tmp_path, splits_string="1,0,0"), btok, 64, 64, (400, 0, 0),
                                seed=5)[0]
    assert isinstance(train, BlendedBARTDataset) and train.attribute_keys == tuple(ATTRS)
    which = np.array([train.source_of(i)[0] for i in range(400)])
    for n in (4, 40, 400):
        assert abs(np.mean(which[:n] == 0) * n - 0.75 * n) <= 1
    for i in range(0, 400, 9):
        s = train[i]
        j, k = train.source_of(i)
        doc = train.datasets[j].sample_source(k)[0]
        text = btok.detokenize(s["labels"])
        if j == 0:
            assert f"<{doc:03d}>" in text and s["logP"] == np.float32(logp(doc, 100.0)) and s["label"] == doc % 3
        else:
            assert f"[{doc:03d}]" in text and s["logP"] == np.float32(logp(doc, 200.0)) and s["label"] == 7
    batch = collate_bart_batch([train[i] for i in range(8)])
    assert batch["logP"].shape == (8,) and sorted(batch) == sorted(SAMPLE_KEYS + tuple(ATTRS))
    assert ((batch["logP"] > 150) == torch.as_tensor(which[:8] == 1)).all()


def test_blend_needs_the_attributes_in_every_file(tmp_path, btok):
    a = write_jsonl(tmp_path / "d" / "a.jsonl", marker_records(20))
    b = write_jsonl(tmp_path / "d" / "b.jsonl", [{"text": doc_text(i), "logP": 1.0} for i in range(20)])
    with pytest.raises(DataError, match=re.escape(f"{b}, line 1: missing attribute key 'label'")):
        build_bart_datasets(cfg([1, a, 1, b], tmp_path, splits_string="1,0,0"), btok, 64, 64, (40, 0, 0), seed=5)
    # datasets with different attribute columns are never blended or batched together
    txt = tmp_path / "d" / "c.txt"
    txt.write_text("".join(doc_text(i) + "\n" for i in range(20)))
    noiser = BARTNoiser(btok)
    with_attrs = BARTDataset(JSONLDocuments(a, btok, str(tmp_path / "c"), "text", ATTRS), (0, 20), 10, 32, 32,
                             noiser, 0)
    without = BARTDataset(TextDocuments(str(txt), btok, str(tmp_path / "c")), (0, 20), 10, 32, 32, noiser, 0)
    with pytest.raises(DataError, match="different attribute columns"):
        BlendedBARTDataset([with_attrs, without], [1, 1], 20)
    with pytest.raises(DataError, match="different keys"):
        collate_bart_batch([with_attrs[0], without[0]])


# ----------------------------------------------------------------------------- the check is cached
def test_check_runs_once_and_again_when_the_file_changes(tmp_path, btok, monkeypatch):
    path = write_jsonl(tmp_path / "docs.jsonl", marker_records(10))
    calls = []
    real = JSONLMemMapDataset._scan_columns

    def counting(self, f):
        calls.append(self.paths[f])
        return real(self, f)

    monkeypatch.setattr(JSONLMemMapDataset, "_scan_columns", counting)
    JSONLMemMapDataset(path, attribute_keys=ATTRS)
    JSONLMemMapDataset(path, attribute_keys=ATTRS)
    assert len(calls) == 1
    assert os.path.isfile(path + ".idx.npy")  # the line index of text_mmap, shared
    JSONLMemMapDataset(path, attribute_keys=["logP"])  # other keys: checked again (other cache)
    assert len(calls) == 2
    with open(path, "a") as f:
        f.write('{"text": "new", "logP": "high", "label": 1}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}, line 11: attribute key 'logP' holds a JSON string")):
        JSONLMemMapDataset(path, attribute_keys=ATTRS)


# ----------------------------------------------------------------------------- errors
GOOD = {"text": "fine", "logP": 1.0, "label": 1}


@pytest.mark.parametrize("line, fragment", [
    ('{"text": "a", "logP": 1.0, "label": 1', "not valid JSON"),
    ("text without json", "not valid JSON"),
    ('{"text": "a", "logP": NaN, "label": 1}', "'logP' holds NaN, expected a finite number"),
    ('{"text": "a", "logP": -Infinity, "label": 1}', "'logP' holds -Infinity, expected a finite number"),
    ('{"text": "a", "logP": 1e39, "label": 1}', "'logP' holds 1e+39, expected a finite number that fits float32"),
    ('{"text": "a", "logP": 1.0, "label": ' + "9" * 400 + "}", "'label' holds 9999"),
    ('["text", "logP"]', "expected a JSON object with the key 'text' (model.data.text_key), got a JSON array"),
    ('"just a string"', "got a JSON string"),
    ('{"txt": "a", "logP": 1.0, "label": 1}', "missing key 'text' (model.data.text_key); the object has keys: txt"),
    ('{"text": 3, "logP": 1.0, "label": 1}', "key 'text' (model.data.text_key) holds a JSON number (3)"),
    ('{"text": null, "logP": 1.0, "label": 1}', "key 'text' (model.data.text_key) holds a JSON null"),
    ('{"text": "a", "label": 1}', "missing attribute key 'logP' (model.data.attribute_keys)"),
    ('{"text": "a", "logP": "1.5", "label": 1}', "attribute key 'logP' holds a JSON string (1.5), expected a number"),
    ('{"text": "a", "logP": null, "label": 1}', "attribute key 'logP' holds a JSON null"),
    ('{"text": "a", "logP": [1.0], "label": 1}', "attribute key 'logP' holds a JSON array"),
    ('{"text": "a", "logP": 1.0, "label": true}', "attribute key 'label' holds a JSON boolean (true); attribute values "
                                                  "must be numbers (write 1/0 for yes/no)"),
])
def test_bad_lines(tmp_path, btok, line, fragment):
    path = write_jsonl(tmp_path / "d" / "bad.jsonl", [GOOD, "", line, GOOD])  # the bad line is line 3
    with pytest.raises(DataError) as err:
        build_bart_datasets(cfg(path, tmp_path, splits_string="1,0,0"), btok, 32, 32, (4, 0, 0), seed=0)
    msg = str(err.value)
    assert msg.startswith(f"{path}, line 3: ") and fragment in msg, msg


@pytest.mark.parametrize("change, err, fragment", [
    (dict(data_impl="text_mmap"), ConfigError, "attribute columns need data_impl=jsonl"),
    (dict(data_impl="mmap"), ConfigError, "attribute columns need data_impl=jsonl"),
    (dict(attribute_keys=["logP", "labels"]), ConfigError, "labels would overwrite the BART sample key"),
    (dict(attribute_keys=["logP", "noised_mask"]), ConfigError, "noised_mask would overwrite"),
    (dict(attribute_keys=["logP", "logP"]), ConfigError, "logP listed more than once"),
    (dict(attribute_keys=["logP", ""]), ConfigError, "not a JSON key name"),
    (dict(attribute_keys=["text"]), ConfigError, "contains model.data.text_key='text'"),
    (dict(text_key=""), ConfigError, "model.data.text_key=''"),
    (dict(data_prefix=[]), ConfigError, "data_impl=jsonl needs JSONL files"),
    (dict(data_prefix=["/nonexistent/x.jsonl"]), DataError, "JSONL file /nonexistent/x.jsonl does not exist"),
    (dict(data_impl="parquet"), ConfigError, "'jsonl'"),
])
def test_bad_config(tmp_path, btok, change, err, fragment):
    path = write_jsonl(tmp_path / "d" / "ok.jsonl", marker_records(10))
    with pytest.raises(err, match=re.escape(fragment)):
        build_bart_datasets(cfg(path, tmp_path, **change), btok, 32, 32, (4, 0, 0), seed=0)


def test_attribute_keys_as_a_string_is_rejected(tmp_path, btok):
    path = write_jsonl(tmp_path / "d" / "ok.jsonl", marker_records(10))
    bad = dict(data_prefix=[path], data_impl="jsonl", attribute_keys="logP", index_mapping_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match=re.escape("expected a list of JSON key names")):
        build_bart_datasets(bad, btok, 32, 32, (4, 0, 0), seed=0)
    assert text_mmap.check_jsonl_keys("text", None) == ("text", ())

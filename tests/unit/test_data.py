"""Data pipeline: built-in corpus, GPT datasets (blend, splits, index cache), sampler resume,
and the one-message errors for bad data files / data_prefix values."""
from __future__ import annotations

import glob
import json
import os
import re
import struct
import threading

import numpy as np
import pytest
import torch

from helpers import marker_docs, text_docs, write_dataset
from megatron_ext.config.schema import DataConfig
from megatron_ext.data.default_corpus import corpus_documents, ensure_default_corpus, read_manifest
from megatron_ext.data.gpt_data import build_gpt_datasets, parse_data_prefix
from megatron_ext.data.samplers import (
    PretrainingBatchSampler,
    build_pretraining_dataloader,
    compute_num_samples,
)
from megatron_ext.data.validation import validate_indexed_dataset
from megatron_ext.errors import ConfigError, DataError, MegatronExtError
from megatron_ext.tokenizers import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("byte")


def doc_ids(tok, tokens) -> set:
    return {int(m) for m in re.findall(r"<(\d{3})>", tok.detokenize(tokens))}


def data_cfg(prefix, cache, **kw) -> DataConfig:
    return DataConfig(data_prefix=prefix, index_mapping_dir=str(cache), **kw)


# ----------------------------------------------------------------------------- default corpus
@pytest.fixture(scope="module")
def corpus_home(tmp_path_factory, tok):
    """An XDG cache holding the built-in corpus (built once for the tests that only use it)."""
    home = str(tmp_path_factory.mktemp("xdg"))
    ensure_default_corpus(tok, os.path.join(home, "megatron_ext", "default_corpus"))
    return home


def test_default_corpus_builds_is_cached_and_reads_back(tmp_path, monkeypatch, tok):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    prefix = ensure_default_corpus(tok)
    assert prefix.startswith(os.path.join(str(tmp_path), "megatron_ext", "default_corpus") + os.sep)
    manifest = read_manifest(prefix)
    assert manifest is not None and manifest["tokens"] >= 1_000_000 and manifest["documents"] > 1000

    files = [prefix + ext for ext in (".bin", ".idx", ".json")]
    before = [(os.stat(f).st_ino, os.stat(f).st_mtime_ns) for f in files]
    assert ensure_default_corpus(tok) == prefix  # cached: same prefix, files untouched
    assert [(os.stat(f).st_ino, os.stat(f).st_mtime_ns) for f in files] == before
    assert not glob.glob(prefix + ".tmp-*")

    ds = IndexedDataset(prefix)
    docs = corpus_documents()
    assert len(ds) == len(docs) == manifest["documents"]
    assert int(ds.sequence_lengths.sum()) == manifest["tokens"]
    for i in (0, 1, len(docs) // 2, len(docs) - 1):
        ids = ds[i]
        assert int(ids[-1]) == tok.eod
        assert tok.detokenize(ids[:-1]) == docs[i]
    # the valid range of a 949,50,1 split has both help topics and docstrings of many modules
    assert validate_indexed_dataset(prefix, tok.vocab_size).max_token_id == tok.eod


def test_default_corpus_concurrent_builders_and_stale_partial(tmp_path, tok):
    from megatron_ext.data.default_corpus import corpus_prefix

    cache = str(tmp_path / "corpus")
    prefix = corpus_prefix(tok, cache)
    os.makedirs(cache)
    with open(prefix + ".bin", "wb") as f:  # a crashed build's leftovers: no manifest
        f.write(b"\x00" * 100)
    results, errors = [], []

    def run():
        try:
            results.append(ensure_default_corpus(tok, cache))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [prefix, prefix]
    manifest = read_manifest(prefix)
    assert manifest is not None
    info = validate_indexed_dataset(prefix, tok.vocab_size)
    assert (info.num_sequences, info.num_tokens) == (manifest["documents"], manifest["tokens"])
    assert not glob.glob(prefix + ".tmp-*")


# ----------------------------------------------------------------------------- GPT datasets
def test_gpt_datasets_default_corpus_batches_and_index_cache(corpus_home, monkeypatch, tok):
    monkeypatch.setenv("XDG_CACHE_HOME", corpus_home)
    cfg = DataConfig()  # data_prefix [] -> built-in corpus
    train, valid, test = build_gpt_datasets(cfg, tok, 32, (64, 16, 0), seed=7)
    assert test is None  # 0 samples requested
    assert len(train) >= 64 and len(valid) >= 16

    cache = os.path.join(corpus_home, "megatron_ext", "default_corpus", "cache")
    npys = sorted(glob.glob(os.path.join(cache, "*.npy")))
    assert len(npys) == 6  # document/sample/shuffle index for train and valid
    stamps = [os.stat(p).st_mtime_ns for p in npys]

    batch = next(iter(build_pretraining_dataloader(train, 0, 4, 0, 1)))
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert batch["tokens"].shape == (4, 32) and batch["tokens"].dtype == torch.int64
    assert batch["labels"].dtype == torch.int64 and batch["position_ids"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    assert torch.equal(batch["position_ids"], torch.arange(32).expand(4, 32))
    assert int(batch["tokens"].max()) < tok.vocab_size

    train2, valid2, _ = build_gpt_datasets(cfg, tok, 32, (64, 16, 0), seed=7)
    assert sorted(glob.glob(os.path.join(cache, "*.npy"))) == npys  # reused, not rebuilt
    assert [os.stat(p).st_mtime_ns for p in npys] == stamps
    for i in (0, 5, 63):
        assert torch.equal(train[i]["tokens"], train2[i]["tokens"])
    assert torch.equal(valid[3]["tokens"], valid2[3]["tokens"])

    build_gpt_datasets(cfg, tok, 32, (64, 16, 0), seed=8)  # another seed -> other indices
    assert len(glob.glob(os.path.join(cache, "*.npy"))) == 12


def test_eod_mask_loss_and_reset_position_ids(tmp_path, tok):
    prefix = write_dataset(str(tmp_path / "d"), text_docs(tok, ["abc"] * 50))
    cfg = data_cfg([prefix], tmp_path / "c", eod_mask_loss=True, reset_position_ids=True, splits_string="1,0,0")
    train, valid, test = build_gpt_datasets(cfg, tok, 16, (8, 0, 0), seed=1)
    assert valid is None and test is None
    s = train[0]
    eod = s["tokens"] == tok.eod
    assert eod.any()
    assert torch.all(s["loss_mask"][eod] == 0) and torch.all(s["loss_mask"][~eod] == 1)
    first = int(torch.nonzero(eod)[0])
    assert int(s["position_ids"][first + 1]) == 0  # positions restart after each eod


def test_blend_follows_weights(tmp_path, tok):
    a = write_dataset(str(tmp_path / "a" / "a"), text_docs(tok, ["a" * 40] * 200))
    b = write_dataset(str(tmp_path / "b" / "b"), text_docs(tok, ["b" * 40] * 200))
    cfg = data_cfg([3, a, 1.0, b], tmp_path / "cache", splits_string="1,0,0")
    train, _, _ = build_gpt_datasets(cfg, tok, 16, (400, 0, 0), seed=3)
    assert len(train) >= 400
    from_a = 0
    for i in range(400):
        ids = set(train[i]["tokens"].tolist()) - {tok.eod}
        assert ids in ({ord("a")}, {ord("b")})
        from_a += ids == {ord("a")}
    assert abs(from_a / 400 - 0.75) < 0.02

    # a weight-prefix pair of one is just that dataset (and weights may be numeric strings)
    assert parse_data_prefix(["1.0", a]) == ([a], None)
    assert parse_data_prefix(a + ".bin") == ([a], None)
    assert parse_data_prefix(["0.5", a, 2, b]) == ([a, b], [0.5, 2.0])


def test_splits_take_disjoint_document_ranges(tmp_path, tok):
    prefix = write_dataset(str(tmp_path / "d"), marker_docs(tok, 100))
    cfg = data_cfg(prefix, tmp_path / "c", splits_string="80,10,10")
    train, valid, test = build_gpt_datasets(cfg, tok, 24, (100, 30, 30), seed=5)
    seen = []
    for ds, lo, hi in ((train, 0, 80), (valid, 80, 90), (test, 90, 100)):
        ids = set()
        for i in range(len(ds)):
            ids |= doc_ids(tok, ds[i]["tokens"])
        assert ids and min(ids) >= lo and max(ids) < hi, (lo, hi, sorted(ids))
        seen.append(ids)
    assert len(seen[0]) > 60  # train covers most of its documents


# ----------------------------------------------------------------------------- sampler
@pytest.fixture(scope="module")
def small_train(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("sampler")
    prefix = write_dataset(str(d / "d"), marker_docs(tok, 60))
    train, _, _ = build_gpt_datasets(data_cfg(prefix, d / "c", splits_string="1,0,0"), tok, 16, (40, 0, 0), 11)
    return train


def take(loader, n):
    it = iter(loader)
    return [next(it)["tokens"] for _ in range(n)]


def test_sampler_resume_matches_uninterrupted_run_dp2(small_train):
    mbs, dp, steps = 2, 2, 9
    full = {r: take(build_pretraining_dataloader(small_train, 0, mbs, r, dp), steps) for r in range(dp)}
    # each micro-step covers samples [t*G, (t+1)*G) in order; rank r takes its contiguous slice
    for t in range(steps):
        both = torch.cat([full[0][t], full[1][t]])
        expected = torch.stack([small_train[(t * mbs * dp + j) % len(small_train)]["tokens"] for j in range(mbs * dp)])
        assert torch.equal(both, expected)
    for k_steps in (1, 4):
        consumed = k_steps * mbs * dp
        for r in range(dp):
            resumed = take(build_pretraining_dataloader(small_train, consumed, mbs, r, dp), steps - k_steps)
            assert all(torch.equal(x, y) for x, y in zip(resumed, full[r][k_steps:]))
    # the same with worker processes
    resumed = take(build_pretraining_dataloader(small_train, 3 * mbs * dp, mbs, 1, dp, num_workers=2), 4)
    assert all(torch.equal(x, y) for x, y in zip(resumed, full[1][3:7]))


def test_sampler_wraps_and_stops():
    s = PretrainingBatchSampler(10, consumed_samples=8, micro_batch_size=2, dp_rank=1, dp_size=2)
    it = iter(s)
    assert [next(it) for _ in range(3)] == [[0, 1], [4, 5], [8, 9]]  # samples 10,11 / 14,15 / 18,19 wrap
    bounded = PretrainingBatchSampler(10, consumed_samples=0, micro_batch_size=2, dp_rank=0, dp_size=2,
                                      total_samples=10)
    assert list(bounded) == [[0, 1], [4, 5]] and len(bounded) == 2
    with pytest.raises(ConfigError, match="data-parallel rank 2"):
        PretrainingBatchSampler(10, 0, 2, 2, 2)
    with pytest.raises(DataError, match="0 samples"):
        PretrainingBatchSampler(0, 0, 2, 0, 1)


def test_compute_num_samples():
    assert compute_num_samples(100, 8, 50, 4) == (800, 3 * 4 * 8, 0)
    assert compute_num_samples(100, 8, 0, 4) == (800, 0, 0)
    assert compute_num_samples(10, 4, 3, 2, limit_test_batches=5) == (40, 4 * 2 * 4, 20)
    with pytest.raises(ConfigError, match="model.global_batch_size"):
        compute_num_samples(10, 0, 5, 2)


# ----------------------------------------------------------------------------- errors
@pytest.fixture
def good(tmp_path, tok):
    return write_dataset(str(tmp_path / "data" / "corpus"), text_docs(tok, [f"document {i} " * 4 for i in range(40)]))


def build(prefix, tmp_path, tok, sizes=(16, 4, 0), **kw):
    return build_gpt_datasets(data_cfg(prefix, tmp_path / "cache", **kw), tok, 16, sizes, seed=1)


def check_message(excinfo, *fragments):
    """One user-facing error (no megatron-core assert / numpy traceback) naming what is wrong."""
    err = excinfo.value
    assert isinstance(err, MegatronExtError)
    msg = str(err)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    assert "\n" not in msg


def test_missing_bin_or_idx(good, tmp_path, tok):
    os.remove(good + ".bin")
    with pytest.raises(DataError) as ei:
        build([good], tmp_path, tok)
    check_message(ei, good + ".bin", ".bin (token data)", "tools/preprocess_data.py")
    other = write_dataset(str(tmp_path / "other"), text_docs(tok, ["x" * 30] * 10))
    os.remove(other + ".idx")
    with pytest.raises(DataError) as ei:
        build(other, tmp_path, tok)
    check_message(ei, other + ".idx", ".idx (index)", "missing")
    third = write_dataset(str(tmp_path / "third"), text_docs(tok, ["y" * 30] * 10))
    with pytest.raises(DataError) as ei:
        build([1, third, 1, str(tmp_path / "nope")], tmp_path, tok)
    check_message(ei, "model.data.data_prefix[3]", str(tmp_path / "nope.bin"), str(tmp_path / "nope.idx"))


def corrupt_idx(prefix, offset=None, data=None, truncate=None):
    path = prefix + ".idx"
    raw = bytearray(open(path, "rb").read())
    if data is not None:
        raw[offset : offset + len(data)] = data
    if truncate is not None:
        raw = raw[:truncate]
    open(path, "wb").write(bytes(raw))
    return path


@pytest.mark.parametrize(
    "change, fragments",
    [
        (dict(truncate=-10), ["truncated index file", "needs"]),
        (dict(truncate=20), ["truncated index file", "header alone"]),
        (dict(offset=0, data=b"NOTANIDX\x00"), ["bad magic"]),
        (dict(offset=9, data=struct.pack("<Q", 2)), ["unsupported index version 2"]),
        (dict(offset=17, data=bytes([9])), ["unknown dtype code 9"]),
        (dict(offset=17, data=bytes([7])), ["float32", "must be integer"]),
        (dict(offset=34, data=struct.pack("<i", 999)), ["sequence 1 starts at byte"]),
    ],
)
def test_corrupt_idx(good, tmp_path, tok, change, fragments):
    if change.get("truncate") == -10:
        change["truncate"] = os.path.getsize(good + ".idx") - 10
    path = corrupt_idx(good, **change)
    with pytest.raises(DataError) as ei:
        build(good, tmp_path, tok)
    check_message(ei, path, *fragments)


def test_bin_size_mismatch(good, tmp_path, tok):
    with open(good + ".bin", "ab") as f:
        f.write(b"\x01\x00" * 3)
    with pytest.raises(DataError) as ei:
        build(good, tmp_path, tok)
    check_message(ei, good + ".bin", "size is", "describes")


def test_token_id_beyond_vocab_and_stats_cache(tmp_path, tok):
    prefix = write_dataset(str(tmp_path / "big"), [[5, 6, 7, 300, 8, tok.eod]] * 20, dtype=np.int32)
    with pytest.raises(DataError) as ei:
        build(prefix, tmp_path, tok)
    check_message(ei, prefix + ".bin", "token id 300", "vocab_size 259", "document 0")

    # the full scan is cached by size+mtime of the pair: a cached entry is used as is...
    ok = write_dataset(str(tmp_path / "ok"), text_docs(tok, ["fine text"] * 30))
    cache = str(tmp_path / "stats")
    info = validate_indexed_dataset(ok, tok.vocab_size, cache)
    assert (info.num_sequences, info.num_tokens, info.max_token_id) == (30, 300, tok.eod)
    (stats_file,) = glob.glob(os.path.join(cache, "data_stats", "*.json"))
    entry = json.load(open(stats_file))
    entry["info"]["num_tokens"] = 12345
    json.dump(entry, open(stats_file, "w"))
    assert validate_indexed_dataset(ok, tok.vocab_size, cache).num_tokens == 12345
    # ...a changed file (new mtime) is scanned again...
    st = os.stat(ok + ".bin")
    os.utime(ok + ".bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert validate_indexed_dataset(ok, tok.vocab_size, cache).num_tokens == 300
    # ...and a cached verdict that the file contradicts never produces a false error
    entry = json.load(open(stats_file))
    entry["info"]["max_token_id"] = 999
    json.dump(entry, open(stats_file, "w"))
    assert validate_indexed_dataset(ok, tok.vocab_size, cache).max_token_id == tok.eod
    assert json.load(open(stats_file))["info"]["max_token_id"] == tok.eod


def test_empty_dataset_and_empty_split(tmp_path, tok):
    empty = write_dataset(str(tmp_path / "empty"), [])
    with pytest.raises(DataError) as ei:
        build(empty, tmp_path, tok)
    check_message(ei, empty + ".idx", "empty")
    few = write_dataset(str(tmp_path / "few"), marker_docs(tok, 5))
    with pytest.raises(DataError) as ei:
        build(few, tmp_path, tok, splits_string="949,50,1")
    check_message(ei, few, "validation split gets 0 of the 5 documents", "model.data.splits_string")
    train, valid, test = build(few, tmp_path, tok, sizes=(8, 0, 0), splits_string="949,50,1")
    assert valid is None and test is None and len(train) >= 8  # not needed -> not built, no error


@pytest.mark.parametrize(
    "value, fragment",
    [
        ([1.0, "/a", 2.0], "has 3 entries"),
        (["w", "/a", 1, "/b"], "model.data.data_prefix[0]='w'"),
        ([-1, "/a", 1, "/b"], "model.data.data_prefix[0]=-1"),
        ([1, "/a", 0, "/b"], "model.data.data_prefix[2]=0"),
        ([True, "/a", 1, "/b"], "model.data.data_prefix[0]=True"),
        ([1, "/a", 1, 5], "model.data.data_prefix[3]=5"),
        ([1, ""], "model.data.data_prefix[1]=''"),
        ([3], "model.data.data_prefix[0]=3"),
        ({"a": 1}, "unknown split 'a'; the dict form takes the keys train, validation, test"),
    ],
)
def test_bad_data_prefix_shapes(tmp_path, tok, value, fragment):
    with pytest.raises(ConfigError) as ei:
        build(value, tmp_path, tok)
    check_message(ei, "model.data.data_prefix", fragment)


def test_bad_splits_string(good, tmp_path, tok):
    with pytest.raises(ConfigError) as ei:
        build(good, tmp_path, tok, splits_string="90,x,10")
    check_message(ei, "model.data.splits_string", "'90,x,10'")
    with pytest.raises(ConfigError) as ei:
        build(good, tmp_path, tok, splits_string="0,0,0")
    check_message(ei, "model.data.splits_string")



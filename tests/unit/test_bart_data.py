"""BART data: the mask token, text-infilling statistics (masked fraction, Poisson span lengths, one mask per
span, whole-word alignment, sentence permutation), deterministic samples, splits, blending, text_mmap on a
real text file, errors, and batching through the pretraining DataLoader."""
from __future__ import annotations

import os
import pickle
import random
import re

import numpy as np
import pytest
import torch

from megatron_ext.config.schema import BARTDataConfig
from megatron_ext.data import samplers
from megatron_ext.data.bart import (
    SAMPLE_KEYS,
    BARTNoiser,
    bart_noise,
    blending_indices,
    build_bart_datasets,
    collate_bart_batch,
    sentence_start_fn,
    split_ranges,
    word_start_fn,
)
from megatron_ext.errors import ConfigError, DataError
from megatron_ext.tokenizers import build_tokenizer, ensure_mask_token, with_added_special_tokens

from helpers import REPO  # noqa: E402
SHAKESPEARE = os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare.txt")
MASK = 259  # byte tokenizer: 256 eod, 257 pad, 258 bos, 259 mask


# ----------------------------------------------------------------------------- fixtures / helpers
@pytest.fixture(scope="module")
def btok():
    return ensure_mask_token(build_tokenizer("byte"))


def _words(seed=0, n=300):
    rng = random.Random(seed)
    syll = "ka lo mi ne ru ta shi po ve da".split()
    return ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def make_text_lines(n_lines=400, seed=0):
    rng = random.Random(seed)
    words = _words(seed)
    lines = []
    for _ in range(n_lines):
        sents = []
        for _ in range(rng.randint(1, 4)):
            w = [rng.choice(words) for _ in range(rng.randint(3, 9))]
            sents.append(" ".join(w).capitalize() + rng.choice(".!?"))
        lines.append(" ".join(sents))
    return lines


@pytest.fixture(scope="module")
def spm_with_mask(tmp_path_factory):
    """A sentencepiece model trained by tools/train_tokenizer.py with --user-defined-symbols '<mask>'."""
    from megatron_ext.cli import train_tokenizer

    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(make_text_lines(800)) + "\n")
    rc = train_tokenizer.main(["--input", str(corpus), "--model-prefix", str(d / "m"), "--vocab-size", "150",
                               "--character-coverage", "1.0", "--user-defined-symbols", "<mask>"])
    assert rc == 0
    return str(d / "m.model")


def write_indexed(prefix, docs, dtype=np.uint16):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=np.int64), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def marker_docs(tok, n, reps=3):
    """Document i is '<iii> ' repeated (+ eod), so a target tells which document it came from."""
    return [tok.tokenize(f"<{i:03d}> " * reps) + [tok.eod] for i in range(n)]


def cfg(prefix, tmp_path, **kw):
    return BARTDataConfig(data_prefix=prefix, index_mapping_dir=str(tmp_path / "cache"), **kw)


def reconstruct(noised, info, mask_id):
    """Undo the infilling: replace the k-th mask with span k's original tokens (all spans kept, none deleted)."""
    out, spans = [], list(zip(info.span_starts.tolist(), info.span_tokens.tolist()))
    original = info.permuted
    k = 0
    for t in noised.tolist():
        if t == mask_id:
            start, length = spans[k]
            out.extend(original[start:start + length].tolist())
            k += 1
        else:
            out.append(t)
    assert k == len(spans)
    return np.array(out)


# ----------------------------------------------------------------------------- mask token
def test_mask_token_byte(btok):
    plain = build_tokenizer("byte")
    assert (btok.mask, btok.vocab_size, plain.vocab_size) == (259, 260, 259)
    assert (btok.eod, btok.pad, btok.bos) == (plain.eod, plain.pad, plain.bos)
    ids = btok.tokenize("a b") + [btok.mask]
    assert btok.detokenize(ids) == "a b"
    assert btok.detokenize(ids, keep_added=True) == "a b<mask>"
    assert btok.unique_identifiers != plain.unique_identifiers
    assert ensure_mask_token(btok) is btok
    assert pickle.loads(pickle.dumps(btok)).mask == 259
    assert with_added_special_tokens(btok, ["<sep>"]).added_tokens == {"<mask>": 259, "<sep>": 260}


def test_mask_token_sentencepiece(spm_with_mask, tmp_path):
    from megatron_ext.tokenizers import train_sentencepiece

    tok = build_tokenizer("sentencepiece", spm_with_mask)
    wrapped = ensure_mask_token(tok)
    assert wrapped.mask == 4 and wrapped.vocab_size == tok.vocab_size == 150  # the model's own piece
    assert wrapped.detokenize(tok.tokenize("Kalo mi.") + [4]) == "Kalo mi."
    assert wrapped.processor is tok.processor
    # a model without a <mask> piece: appended after the vocabulary
    plain_model = train_sentencepiece(str(tmp_path / "plain"), 60, sentences=iter(make_text_lines(200)),
                                      character_coverage=1.0)
    plain = ensure_mask_token(build_tokenizer("sentencepiece", plain_model))
    assert plain.mask == 60 and plain.vocab_size == 61
    assert pickle.loads(pickle.dumps(plain)).detokenize(plain.tokenize("Kalo") + [60]) == "Kalo"


def test_noiser_needs_mask_token():
    with pytest.raises(ConfigError, match="ensure_mask_token"):
        BARTNoiser(build_tokenizer("byte"))


# ----------------------------------------------------------------------------- noising statistics
def test_masked_fraction_and_poisson_spans():
    p, lam, n_tok = 0.15, 3.0, 301
    tokens = (np.arange(n_tok) * 7) % 250
    masked, total, lengths = 0, 0, []
    for i in range(1500):
        out, info = bart_noise(tokens, np.random.default_rng(i), mask_id=MASK, masked_lm_prob=p,
                               poisson_lambda=lam, max_length=n_tok, return_info=True)
        masked += info.num_masked_tokens
        total += n_tok
        lengths.extend(info.span_units[:-1].tolist())  # the last span of a sample is cut to the budget
        # one mask per span (length-0 spans are inserted masks), nothing else changed
        assert int((out == MASK).sum()) == len(info.span_units)
        assert len(out) == n_tok - info.num_masked_tokens + len(info.span_units) - info.dropped_insertions
        assert len(out) <= n_tok
        np.testing.assert_array_equal(reconstruct(out, info, MASK), tokens)
    assert abs(masked / total - p) < 0.003
    lengths = np.array(lengths)
    assert abs(lengths.mean() - lam) < 0.1
    assert abs(lengths.var() - lam) < 0.3
    assert abs(np.mean(lengths == 0) - np.exp(-lam)) < 0.015  # zero-length spans (insertions) do occur


def test_short_samples_keep_the_expected_fraction():
    tokens = np.arange(10)
    masked = sum(bart_noise(tokens, np.random.default_rng(i), mask_id=MASK, masked_lm_prob=0.15,
                            return_info=True)[1].num_masked_tokens for i in range(4000))
    assert abs(masked / 40000 - 0.15) < 0.01  # stochastic rounding of the budget, no floor/ceil bias


def test_delete_mask_prob_and_specials():
    tokens = np.arange(200) % 200
    tokens[::25] = 256  # eod inside: never masked
    deleted, spans = 0, 0
    for i in range(300):
        out, info = bart_noise(tokens, np.random.default_rng(i), mask_id=MASK, masked_lm_prob=0.3,
                               delete_mask_prob=0.5, special_ids=[256, 257, 258, MASK], return_info=True)
        real = info.span_units > 0
        deleted += int(info.deleted[real].sum())
        spans += int(real.sum())
        assert int((out == MASK).sum()) == int((~info.deleted).sum())
        assert int((out == 256).sum()) == 8
    assert abs(deleted / spans - 0.5) < 0.05


def test_max_length_drops_insertions_only():
    tokens = np.arange(40)
    for i in range(200):
        out, info = bart_noise(tokens, np.random.default_rng(i), mask_id=MASK, masked_lm_prob=0.1,
                               poisson_lambda=0.3, max_length=40, return_info=True)
        assert len(out) <= 40
    free = [bart_noise(tokens, np.random.default_rng(i), mask_id=MASK, masked_lm_prob=0.1, poisson_lambda=0.3)
            for i in range(200)]
    assert max(len(o) for o in free) > 40  # without a limit, insertions can lengthen a sample


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
def test_whole_word_spans_align_to_word_starts(kind, btok, spm_with_mask):
    tok = btok if kind == "byte" else ensure_mask_token(build_tokenizer("sentencepiece", spm_with_mask))
    starts_fn = word_start_fn(tok)
    noiser = BARTNoiser(tok, masked_lm_prob=0.3, whole_word_masking=True)
    text = " ".join(make_text_lines(6, seed=3))
    ids = np.array(tok.tokenize(text))
    ws = starts_fn(ids)
    if kind == "byte":
        assert ws.tolist() == [i == 0 or (text[i - 1] == " " and text[i] != " ") for i in range(len(text))]
    else:
        pieces = tok.processor.id_to_piece(ids.tolist())
        assert ws[1:].tolist() == [p.startswith("\u2581") for p in pieces[1:]]
    n_words = int(ws.sum())
    masked_words = 0
    for i in range(200):
        out, info = noiser(ids, np.random.default_rng(i), return_info=True)
        for s, n in zip(info.span_starts.tolist(), info.span_tokens.tolist()):
            assert s == len(ids) or ws[s]
            assert s + n == len(ids) or ws[s + n]
        masked_words += int(info.span_units.sum())
        np.testing.assert_array_equal(reconstruct(out, info, tok.mask), ids)
    assert abs(masked_words / (200 * n_words) - 0.3) < 0.02


def test_sentence_permutation(btok):
    text = "One two three. Four five! Six seven? Eight nine ten."
    ids = np.array(btok.tokenize(text))
    starts = sentence_start_fn(btok)(ids)
    assert [text[i] for i in np.flatnonzero(starts)] == ["O", "F", "S", "E"]
    assert not sentence_start_fn(btok)(np.array(btok.tokenize("Pi is 3.14 ok.")))[1:].any()
    noiser = BARTNoiser(btok, masked_lm_prob=0.01, permute_sentences=True)
    orders = set()
    for i in range(30):
        _, info = noiser(ids, np.random.default_rng(i), return_info=True)
        perm = btok.detokenize(info.permuted)
        assert sorted(re.findall(r"[^.!?]+[.!?] ?", perm)) == sorted(re.findall(r"[^.!?]+[.!?] ?", text))
        orders.add(tuple(info.sentence_order.tolist()))
    assert len(orders) > 5


# ----------------------------------------------------------------------------- datasets
def test_samples_layout_and_determinism(tmp_path, btok):
    prefix = write_indexed(str(tmp_path / "d" / "docs"), marker_docs(btok, 50, reps=4))
    data_cfg = cfg(prefix, tmp_path, splits_string="1,0,0")
    train, valid, test = build_bart_datasets(data_cfg, btok, 32, 40, (120, 0, 0), seed=7)
    assert valid is None and test is None and len(train) == 120
    s = train[5]
    assert sorted(s) == sorted(SAMPLE_KEYS)
    assert s["text_enc"].shape == (32,) and s["enc_mask"].shape == (32,)
    for key in ("text_dec", "labels", "loss_mask", "dec_mask"):
        assert s[key].shape == (40,)
    assert s["text_enc"].dtype == np.int64 and s["enc_mask"].dtype == bool and s["loss_mask"].dtype == np.float32
    for i in range(len(train)):
        s = train[i]
        doc, beg, end = train.sample_source(i)
        target = train.target_tokens(i)
        n = len(target)
        assert 1 <= n <= 32 and n == end - beg
        assert btok.eod not in target.tolist()  # the stored eod is not part of the text
        assert s["text_dec"][0] == btok.bos and s["text_dec"][1:n + 1].tolist() == target.tolist()
        assert s["labels"][:n].tolist() == target.tolist() and s["labels"][n] == btok.eod
        assert (s["labels"][n + 1:] == btok.pad).all() and (s["text_dec"][n + 1:] == btok.pad).all()
        assert s["loss_mask"].sum() == n + 1 and (s["dec_mask"] == (s["loss_mask"] > 0)).all()
        n_enc = int(s["enc_mask"].sum())
        assert s["enc_mask"][:n_enc].all() and (s["text_enc"][n_enc:] == btok.pad).all()
        assert f"<{doc:03d}>"[1:] in btok.detokenize(target) or n < 6
    # the same sample every time, also after rebuilding or pickling; different samples differ
    again = build_bart_datasets(data_cfg, btok, 32, 40, (120, 0, 0), seed=7)[0]
    copy = pickle.loads(pickle.dumps(train))
    for i in (0, 17, 119):
        for key in SAMPLE_KEYS:
            np.testing.assert_array_equal(train[i][key], again[i][key])
            np.testing.assert_array_equal(train[i][key], copy[i][key])
    other_seed = build_bart_datasets(data_cfg, btok, 32, 40, (120, 0, 0), seed=8)[0]
    assert any((train[i]["text_enc"] != other_seed[i]["text_enc"]).any() for i in range(5))
    # every epoch visits every chunk once
    chunks = [train.chunk_of_sample(i) for i in range(len(train))]
    n_chunks = train.num_chunks
    assert sorted(chunks[:n_chunks]) == list(range(n_chunks))


def test_long_documents_are_chunked_not_truncated(tmp_path, btok):
    doc = btok.tokenize("word " * 200)  # 1000 tokens
    prefix = write_indexed(str(tmp_path / "d" / "long"), [doc + [btok.eod], btok.tokenize("short one")])
    train = build_bart_datasets(cfg(prefix, tmp_path, splits_string="1,0,0"), btok, 64, 64, (40, 0, 0), seed=1)[0]
    assert train.chunk_length == 63 and train.num_chunks == 16 + 1
    pieces = sorted({train.sample_source(i) for i in range(len(train))})
    long_pieces = [(b, e) for d, b, e in pieces if d == 0]
    assert long_pieces[0][0] == 0 and long_pieces[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(long_pieces, long_pieces[1:]))
    assert all(58 <= e - b <= 63 for b, e in long_pieces)  # even chunks, no tiny remainder


def test_splits_are_disjoint_and_cover_the_documents(tmp_path, btok):
    n_docs = 40
    prefix = write_indexed(str(tmp_path / "d" / "docs"), marker_docs(btok, n_docs))
    ranges = split_ranges(n_docs, "8,1,1")
    assert ranges == [(0, 32), (32, 36), (36, 40)]
    train, valid, test = build_bart_datasets(cfg(prefix, tmp_path, splits_string="8,1,1"), btok, 64, 64,
                                             (200, 30, 30), seed=3)
    seen = []
    for ds, (beg, end) in zip((train, valid, test), ranges):
        docs = {ds.sample_source(i)[0] for i in range(len(ds))}
        assert docs == set(range(beg, end))
        for i in range(0, len(ds), 7):  # the target text is that document's
            doc = ds.sample_source(i)[0]
            assert f"<{doc:03d}>" in btok.detokenize(ds.target_tokens(i))
        seen.append(docs)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert set().union(*seen) == set(range(n_docs))


def test_blend_follows_weights(tmp_path, btok):
    a = write_indexed(str(tmp_path / "d" / "a"), marker_docs(btok, 20))
    b = write_indexed(str(tmp_path / "d" / "b"), [btok.tokenize(f"[{i:03d}] ") * 3 for i in range(20)])
    train = build_bart_datasets(cfg([3, a, 1, b], tmp_path, splits_string="1,0,0"), btok, 64, 64, (400, 0, 0),
                                seed=5)[0]
    assert len(train) == 400
    which = np.array([train.source_of(i)[0] for i in range(400)])
    for n in (4, 40, 100, 400):
        assert abs(np.mean(which[:n] == 0) * n - 0.75 * n) <= 1  # greedy deficit: never off by more than 1
    for i in (0, 1, 2, 3, 50):
        text = btok.detokenize(train[i]["labels"])
        assert ("<" in text) == (which[i] == 0) and ("[" in text) == (which[i] == 1)
    idx, sidx = blending_indices([0.5, 0.25, 0.25], 8)
    assert np.bincount(idx).tolist() == [4, 2, 2]
    assert all(sidx[idx == j].tolist() == list(range(int((idx == j).sum()))) for j in range(3))


def _shakespeare(tmp_path):
    if os.path.isfile(SHAKESPEARE):
        return SHAKESPEARE
    path = tmp_path / "generated.txt"
    path.write_text("\n".join(make_text_lines(2000, seed=9)) + "\n")
    return str(path)


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
def test_text_mmap_bart(tmp_path, kind, btok, spm_with_mask):
    from megatron_ext.data.text_mmap import TextMemMapDataset

    path = _shakespeare(tmp_path)
    tok = btok if kind == "byte" else ensure_mask_token(build_tokenizer("sentencepiece", spm_with_mask))
    data_cfg = cfg([path], tmp_path, data_impl="text_mmap", splits_string="90,5,5", whole_word_masking=True,
                   permute_sentences=True, delete_mask_prob=0.2)
    train, valid, test = build_bart_datasets(data_cfg, tok, 64, 64, (64, 16, 0), seed=11)
    assert test is None and len(train) == 64 and len(valid) == 16
    lines = TextMemMapDataset(path, index_mapping_dir=str(tmp_path / "cache"))
    n_train_docs = train.doc_range[1]
    assert valid.doc_range[0] == n_train_docs  # text_mmap honours splits_string
    for ds in (train, valid):
        for i in range(len(ds)):
            s = ds[i]
            doc, beg, end = ds.sample_source(i)
            assert ds.doc_range[0] <= doc < ds.doc_range[1]
            ids = np.array(tok.tokenize(lines[doc]))
            n = end - beg
            assert s["labels"][:n].tolist() == ids[beg:end].tolist() and s["labels"][n] == tok.eod
            if kind == "byte" and end - beg == len(ids):  # (the small sentencepiece model has unknowns)
                assert tok.detokenize(s["labels"][:n]) == lines[doc]
            assert int(s["enc_mask"].sum()) <= 64
    # the indexes went to index_mapping_dir, the data directory is left alone
    assert train.source.text.index_paths[0].startswith(str(tmp_path / "cache"))


def test_default_corpus_when_data_prefix_is_empty(tmp_path, btok, cache_home):
    corpus_dir = os.path.join(cache_home, "megatron_ext", "default_corpus")  # shared with other tests
    train, valid, _ = build_bart_datasets(
        BARTDataConfig(default_corpus_dir=corpus_dir, index_mapping_dir=str(tmp_path / "c")),
        btok, 128, 128, (16, 8, 0), seed=1)
    assert len(train) == 16 and len(valid) == 8
    assert train[0]["labels"].max() < btok.vocab_size


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("change, err, fragment", [
    (dict(data_impl="lazy"), ConfigError, "data_impl"),
    (dict(data_prefix=[1.0, "x", 2.0]), ConfigError, "even number"),
    (dict(data_prefix=[0, "a", 1, "b"]), ConfigError, "positive number"),
    (dict(data_prefix=[-1, "a", 1, "b"]), ConfigError, "positive number"),
    (dict(masked_lm_prob=0.0), ConfigError, "masked_lm_prob"),
    (dict(masked_lm_prob=1.0), ConfigError, "masked_lm_prob"),
    (dict(poisson_lambda=0), ConfigError, "poisson_lambda"),
    (dict(delete_mask_prob=1.5), ConfigError, "delete_mask_prob"),
    (dict(splits_string="1,2,x"), ConfigError, "splits_string"),
    (dict(data_impl="text_mmap", data_prefix=[]), ConfigError, "text files"),
    (dict(data_impl="text_mmap", data_prefix=["/nonexistent/corpus.txt"]), DataError, "/nonexistent/corpus.txt"),
    (dict(data_prefix=["/nonexistent/prefix"]), DataError, "/nonexistent/prefix"),
])
def test_bad_config(tmp_path, btok, change, err, fragment):
    with pytest.raises(err, match=re.escape(fragment)):
        base = dict(data_prefix=["/nonexistent/prefix"], index_mapping_dir=str(tmp_path / "c"))
        build_bart_datasets(BARTDataConfig(**{**base, **change}), btok, 64, 64, (8, 0, 0), seed=1)


def test_empty_split_and_small_seq_length(tmp_path, btok):
    prefix = write_indexed(str(tmp_path / "d" / "docs"), marker_docs(btok, 5))
    with pytest.raises(DataError, match="validation split gets 0 of the 5 documents"):
        build_bart_datasets(cfg(prefix, tmp_path, splits_string="98,1,1"), btok, 64, 64, (8, 4, 0), seed=1)
    # a 0 share with 0 samples is fine
    assert build_bart_datasets(cfg(prefix, tmp_path, splits_string="1,0,0"), btok, 64, 64, (8, 0, 0), 1)[1] is None
    empty = write_indexed(str(tmp_path / "d" / "empties"), [[btok.eod]] * 4 + [btok.tokenize("hi")])
    with pytest.raises(DataError, match="has no tokens"):
        build_bart_datasets(cfg(empty, tmp_path, splits_string="4,1,0"), btok, 64, 64, (8, 2, 0), seed=1)
    with pytest.raises(ConfigError, match="too small"):
        build_bart_datasets(cfg(prefix, tmp_path), btok, 64, 2, (8, 0, 0), seed=1)
    with pytest.raises(ConfigError, match="whole_word_masking"):
        word_start_fn(object())


# ----------------------------------------------------------------------------- batching
@pytest.fixture(scope="module")
def small_bart(tmp_path_factory):
    tok = ensure_mask_token(build_tokenizer("byte"))
    d = tmp_path_factory.mktemp("bart_loader")
    path = d / "lines.txt"
    path.write_text("\n".join(make_text_lines(300, seed=4)) + "\n")
    data_cfg = BARTDataConfig(data_prefix=[str(path)], data_impl="text_mmap", splits_string="1,0,0",
                              index_mapping_dir=str(d / "cache"))
    return build_bart_datasets(data_cfg, tok, 48, 48, (64, 0, 0), seed=2)[0]


def _check_batch(batch, ds, indices):
    assert sorted(batch) == sorted(SAMPLE_KEYS)
    assert batch["text_enc"].shape == (len(indices), 48) and batch["text_enc"].dtype == torch.long
    assert batch["enc_mask"].dtype == torch.bool and batch["loss_mask"].dtype == torch.float32
    for row, i in enumerate(indices):
        for key in SAMPLE_KEYS:
            assert torch.equal(batch[key][row], torch.as_tensor(ds[i][key]))


def test_dataloader_workers_collate_batches(small_bart):
    loader = torch.utils.data.DataLoader(small_bart, batch_size=4, num_workers=2, collate_fn=collate_bart_batch)
    for step, batch in enumerate(loader):
        _check_batch(batch, small_bart, range(step * 4, step * 4 + 4))
        if step == 2:
            break


def test_pretraining_sampler_with_bart_collate(small_bart):
    loader = samplers.build_pretraining_dataloader(small_bart, consumed_samples=6, micro_batch_size=4, dp_rank=1,
                                                   dp_size=2)
    batch = next(iter(loader))
    _check_batch(batch, small_bart, [10, 11, 12, 13])


def test_build_pretraining_dataloader_batches_bart_samples(small_bart):
    loader = samplers.build_pretraining_dataloader(small_bart, 0, 4, 0, 1)
    _check_batch(next(iter(loader)), small_bart, [0, 1, 2, 3])


def test_noised_mask_marks_exactly_the_masked_target_tokens(tmp_path, btok):
    """Rebuild the input from target + noised_mask: every run of marked tokens is one <mask> (or gone)."""
    prefix = write_indexed(str(tmp_path / "d" / "docs"), marker_docs(btok, 50, reps=4))
    data_cfg = cfg(prefix, tmp_path, splits_string="1,0,0")
    train, _, _ = build_bart_datasets(data_cfg, btok, 32, 40, (60, 0, 0), seed=3)
    total = 0
    for i in range(60):
        s = train[i]
        n_t = int(s["loss_mask"].sum()) - 1
        target, marked = s["labels"][:n_t], s["noised_mask"][:n_t] > 0
        assert s["noised_mask"][n_t:].sum() == 0
        rebuilt, j = [], 0
        while j < n_t:
            if marked[j]:
                while j < n_t and marked[j]:
                    j += 1
                rebuilt.append(-1)
            else:
                rebuilt.append(int(target[j]))
                j += 1
        enc = s["text_enc"][s["enc_mask"]].tolist()
        kept = [t if t != btok.mask else -1 for t in enc]
        # deletions and zero-length insertions aside, the input is the target with each span collapsed
        strip = lambda seq: [t for t in seq if t != -1]
        assert strip(kept) == strip(rebuilt)
        total += int(marked.sum())
    assert total > 0

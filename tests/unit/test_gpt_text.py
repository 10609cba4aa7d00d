"""GPT on raw text / JSONL (model.data.data_impl=text_mmap|jsonl): the samples of preprocessing the file first."""
import glob
import json
import os
import pickle

import numpy as np
import pytest
from omegaconf import OmegaConf

from helpers import SHARED_DATA, TINY_GPT, fit_in_process
from megatron_ext.cli import preprocess_data as pp
from megatron_ext.config.schema import DataConfig
from megatron_ext.data.gpt_data import build_gpt_datasets
from megatron_ext.data.gpt_text import TextDocumentTokens, build_gpt_text_datasets
from megatron_ext.errors import ConfigError, DataError
from megatron_ext.tokenizers import build_tokenizer

SHAKESPEARE = os.environ.get("TEST_SHAKESPEARE", SHARED_DATA)


def preprocess(path, prefix, library="byte", model=None, key="text"):
    args = ["--input", str(path), "--output-prefix", str(prefix), "--append-eod", "--workers", "1",
            "--tokenizer-library", library, "--json-keys", key, "--no-progress"]
    assert pp.main(args + (["--tokenizer-model", model] if model else [])) == 0
    return f"{prefix}_{key}_document"


def data_cfg(**kw):
    return OmegaConf.structured(DataConfig(**kw))


def assert_same_samples(a, b, n):
    """The first ``n`` samples of every split: the same tokens, labels, loss masks and positions."""
    for split, (x, y) in enumerate(zip(a, b)):
        assert (x is None) == (y is None), split
        if x is None:
            continue
        assert len(x) == len(y), (split, len(x), len(y))
        for i in range(min(n, len(x))):
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                assert np.array_equal(np.asarray(x[i][key]), np.asarray(y[i][key])), (split, i, key)


@pytest.mark.skipif(not os.path.isfile(SHAKESPEARE), reason="no ../shared/data/tinyshakespeare.txt")
def test_text_mmap_gives_the_samples_of_the_preprocessed_tinyshakespeare(tmp_path, cache_home, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", cache_home)  # the corpus directory may be read-only
    tok = build_tokenizer("byte")
    prefix = preprocess(SHAKESPEARE, tmp_path / "shk", "byte")
    sizes, seed = (400, 40, 40), 1234
    text = build_gpt_text_datasets(
        data_cfg(data_impl="text_mmap", data_prefix=[1.0, SHAKESPEARE], splits_string="98,1,1",
                 index_mapping_dir=str(tmp_path / "c1")), tok, 128, sizes, seed)
    mmap = build_gpt_datasets(data_cfg(data_prefix=[prefix], splits_string="98,1,1",
                                       index_mapping_dir=str(tmp_path / "c2")), tok, 128, sizes, seed)
    assert_same_samples(text, mmap, 64)
    assert len(text[0]) > 8000  # the whole corpus, not a slice


def _odd_text_file(path, lines):
    """BOM, \\r\\n and \\n line ends, blank and whitespace-only lines (skipped), non-ASCII, a stray \\r inside a line,
    a last line without a newline."""
    odd = ["   ", "\u00a0\u3000", "naïve café — 日本語 🎉", "\t tab first", "", "a\rb", "Ωμέγα ∑ ≠ ∞"]
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf")
        for i, line in enumerate(lines):
            f.write((line + ("\r\n" if i % 3 == 0 else "\n")).encode("utf-8"))
            if i % 50 == 0:
                f.write((odd[i // 50 % len(odd)] + "\n").encode("utf-8"))
        f.write("the end, no newline".encode("utf-8"))


def _jsonl_file(path, lines, key):
    with open(path, "w", encoding="utf-8") as f:
        for i, line in enumerate(lines):
            f.write(json.dumps({"id": i, key: line if i % 97 else "", "other": "x"}, ensure_ascii=i % 2 == 0) + "\n")
            if i % 60 == 0:
                f.write("\n  \r\n")


@pytest.fixture(scope="module")
def corpus_lines():
    if os.path.isfile(SHAKESPEARE):
        with open(SHAKESPEARE, encoding="utf-8") as f:
            lines = f.read().split("\n")[:1200]
    else:
        from pydoc_data.topics import topics

        lines = "\n".join(topics[k] for k in sorted(topics)).split("\n")[:1200]
    return [line for line in lines if line.strip()] + ["Ça va 🎉 \\u00e9"]


@pytest.mark.parametrize("impl", ["text_mmap", "jsonl"])
def test_odd_files_and_blends_give_the_preprocessed_samples(tmp_path, spm_models, corpus_lines, impl):
    """sentencepiece; a two-file weighted blend; the whole of each split compared."""
    model = spm_models["unigram"]
    tok = build_tokenizer("sentencepiece", model)
    key = "text" if impl == "text_mmap" else "body"
    files, prefixes = [], []
    for j, part in enumerate((corpus_lines[:700], corpus_lines[700:])):
        path = tmp_path / (f"f{j}.txt" if impl == "text_mmap" else f"f{j}.jsonl")
        (_odd_text_file if impl == "text_mmap" else lambda p, l: _jsonl_file(p, l, key))(path, part)
        files.append(str(path))
        prefixes.append(preprocess(path, tmp_path / f"pre{j}", "sentencepiece", model, key))
    sizes, seed = (60, 12, 12), 5
    text = build_gpt_text_datasets(
        data_cfg(data_impl=impl, text_key=key, data_prefix=[0.6, files[0], 0.4, files[1]], splits_string="80,10,10"),
        tok, 32, sizes, seed)
    mmap = build_gpt_datasets(data_cfg(data_prefix=[0.6, prefixes[0], 0.4, prefixes[1]], splits_string="80,10,10"),
                              tok, 32, sizes, seed)
    assert_same_samples(text, mmap, 10 ** 9)
    # the documents themselves, one by one, are preprocess_data's
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs, ref = TextDocumentTokens(files[1], impl, tok, text_key=key), IndexedDataset(prefixes[1])
    assert len(docs) == len(ref) and np.array_equal(docs.sequence_lengths, ref.sequence_lengths)
    long_docs = np.flatnonzero(ref.sequence_lengths >= 8)[::5]
    assert len(long_docs) > 20 and all(np.array_equal(docs.get(i, 3, 5), ref.get(i, 3, 5)) for i in long_docs)
    assert all(np.array_equal(docs.get(i), ref.get(i)) for i in range(0, len(ref), 3))
    # DataLoader workers get a pickled copy: the same samples
    again = pickle.loads(pickle.dumps(text[0]))
    assert all(np.array_equal(again[i]["tokens"], text[0][i]["tokens"]) for i in range(8))


def test_caches_are_reused_and_keyed_on_file_tokenizer_and_impl(tmp_path, monkeypatch):
    tok = build_tokenizer("byte")
    path = tmp_path / "c.txt"
    path.write_text("".join(f"line {i} " * (i % 7 + 1) + "\n" for i in range(300)), encoding="utf-8")
    cache = tmp_path / "cache"
    cfg = data_cfg(data_impl="text_mmap", data_prefix=[str(path)], splits_string="8,1,1", index_mapping_dir=str(cache))
    first = build_gpt_text_datasets(cfg, tok, 16, (40, 8, 8), 3)
    descriptions = sorted(glob.glob(str(cache / "*description.txt")))
    assert len(descriptions) == 3 and "TextGPTDataset" in descriptions[0]
    described = open(descriptions[0]).read()
    assert '"data_impl": "text_mmap"' in described and '"lengths_md5"' in described and "byte" in described

    def no_scan(self):
        raise AssertionError("the document scan ran again")

    monkeypatch.setattr(TextDocumentTokens, "_scan", no_scan)
    again = build_gpt_text_datasets(cfg, tok, 16, (40, 8, 8), 3)  # every cache hit
    assert sorted(glob.glob(str(cache / "*description.txt"))) == descriptions
    assert_same_samples(first, again, 40)
    monkeypatch.undo()
    with open(path, "a", encoding="utf-8") as f:  # a changed file: scanned again, new sample indices
        f.write("one more line\n")
    build_gpt_text_datasets(cfg, tok, 16, (40, 8, 8), 3)
    assert len(glob.glob(str(cache / "*description.txt"))) == 6
    # another tokenizer: its own token counts (the char tokenizer has other ids than the byte one)
    doc_caches = glob.glob(str(cache / "**" / "c.txt.gptdocs-*.json"), recursive=True)
    TextDocumentTokens(str(path), "text_mmap", build_tokenizer("char"), str(cache))
    assert len(glob.glob(str(cache / "**" / "c.txt.gptdocs-*.json"), recursive=True)) == len(doc_caches) + 1
    assert not glob.glob(str(cache / "**" / ".tmp-*"), recursive=True)


@pytest.mark.parametrize("case", ["missing", "empty", "blank", "utf8", "json", "json-key", "json-type", "impl",
                                  "text-key", "no-files"])
def test_bad_inputs_give_one_clear_error(tmp_path, case):
    tok = build_tokenizer("byte")
    f = tmp_path / ("d.jsonl" if case.startswith("json") else "d.txt")
    impl = "jsonl" if case.startswith("json") else "text_mmap"
    body = {
        "empty": b"", "blank": b"\n  \n\t\n", "utf8": b"fine\nalso fine\nbad \xff byte\n",
        "json": b'{"text": "a"}\n{"text": "b",}\n', "json-key": b'{"text": "a"}\n\n{"txt": "b"}\n',
        "json-type": b'{"text": "a"}\n{"text": 3}\n',
    }.get(case, b"one\ntwo\n")
    if case != "missing":
        f.write_bytes(body)
    kw = dict(data_impl=impl, data_prefix=[str(f)], index_mapping_dir=str(tmp_path / "c"))
    if case == "impl":
        kw["data_impl"] = "textmmap"
    if case == "text-key":
        kw["text_key"] = "body"
    if case == "no-files":
        kw["data_prefix"] = []
    expected = {
        "missing": (DataError, f"{f} does not exist"),
        "empty": (DataError, f"{f}: no documents (empty file)"),
        "blank": (DataError, f"{f}: no documents (only blank lines)"),
        "utf8": (DataError, f"{f}, line 3: not valid UTF-8 (byte 0xff"),
        "json": (DataError, f"{f}, line 2: not valid JSON"),
        "json-key": (DataError, f"{f}, line 3: missing key 'text' (model.data.text_key)"),
        "json-type": (DataError, f"{f}, line 2: key 'text' (model.data.text_key) holds a JSON number"),
        "impl": (ConfigError, "model.data.data_impl='textmmap': expected 'mmap'"),
        "text-key": (ConfigError, "model.data.text_key='body' with model.data.data_impl=text_mmap"),
        "no-files": (ConfigError, "model.data.data_prefix is empty but model.data.data_impl=text_mmap"),
    }[case]
    with pytest.raises(expected[0]) as ei:
        build_gpt_text_datasets(data_cfg(**kw), tok, 16, (8, 2, 2), 1)
    msg = str(ei.value)
    assert expected[1] in msg and "\n" not in msg, msg


def test_bart_only_keys_are_refused_for_gpt():
    from megatron_ext.config.loader import load_config

    for key in ("attribute_keys=[a]", "masked_lm_prob=0.2"):
        with pytest.raises(ConfigError) as ei:
            load_config(overrides=[f"model.data.{key}"])
        assert f"model.data.{key.split('=')[0]} is a key of pretrain_bart.py's data section" in str(ei.value)


def test_pretrain_gpt_on_text_trains_on_the_preprocessed_samples(tmp_path, in_process, corpus_lines):
    """The same run on the raw files and on their preprocessed .bin/.idx -- with the dict form of data_prefix (two
    named validation files, a test file), packed documents masked from each other, and its length in epochs (a
    fraction of one): the same losses, step by step, for every split."""
    parts = {"train": corpus_lines[:700], "v1": corpus_lines[700:800], "v2": corpus_lines[800:880],
             "te": corpus_lines[880:]}
    files, prefixes = {}, {}
    for name, lines in parts.items():
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
        prefixes[name] = preprocess(files[name], tmp_path / f"pre_{name}", "byte")

    def form(p):
        return f"model.data.data_prefix={{train: [1.0, {p['train']}], validation: {{v1: {p['v1']}, v2: {p['v2']}}}, " \
               f"test: [{p['te']}]}}"

    common = [*TINY_GPT, "trainer.max_steps=-1", "trainer.max_epochs=1", "trainer.limit_train_batches=0.02",
              "trainer.val_check_interval=1.0", "model.data.reset_attention_mask=true",
              "model.data.reset_position_ids=true", f"exp_manager.exp_dir={tmp_path}",
              "exp_manager.create_tensorboard_logger=false"]
    text = fit_in_process([*common, "exp_manager.version=text", "model.data.data_impl=text_mmap", form(files)])
    fit_in_process([*common, "exp_manager.version=mmap", form(prefixes)])

    def losses(version):
        rows = [json.loads(line) for line in (tmp_path / "megatron_gpt" / version / "metrics.jsonl").open()]
        return [(r["step"], k, r[k]) for r in rows for k in sorted(r) if "loss" in k]

    text_rows, mmap_rows = losses("text"), losses("mmap")
    keys = {k for _, k, _ in text_rows}
    assert {"train/loss", "val/loss", "val/loss/v1", "val/loss/v2", "test/loss"} <= keys, keys
    assert text["step"] > 1 and ("val/loss", text["step"]) in {(k, s) for s, k, _ in text_rows}  # an epoch's end
    assert text_rows == mmap_rows, (text_rows, mmap_rows)


def test_blend_per_split_uses_each_file_whole(tmp_path):
    """The splits helper's entry: (paths, weights) per split, each used whole -- as the file alone with the whole
    split given to that split."""
    tok = build_tokenizer("byte")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(f"alpha {i} " * (i % 5 + 1) + "\n" for i in range(120)), encoding="utf-8")
    b.write_text("".join(f"beta {i} " * (i % 3 + 1) + "\n" for i in range(80)), encoding="utf-8")
    cfg = data_cfg(data_impl="text_mmap", index_mapping_dir=str(tmp_path / "c"))
    train, valid, test = build_gpt_text_datasets(cfg, tok, 16, (20, 6, 0), 4,
                                                 blend_per_split=[([str(a)], None), ([str(b)], None), ([str(b)], None)])
    assert test is None  # no test samples requested
    alone = build_gpt_text_datasets(data_cfg(data_impl="text_mmap", data_prefix=[str(b)], splits_string="0,1,0",
                                             index_mapping_dir=str(tmp_path / "c")), tok, 16, (0, 6, 0), 4)[1]
    assert len(valid) == len(alone) and all(np.array_equal(valid[i]["tokens"], alone[i]["tokens"]) for i in range(6))
    text = bytes(int(t) for i in range(20) for t in train[i]["tokens"] if t < 256)
    assert b"alpha" in text and b"beta" not in text


def test_a_file_changed_during_the_run_is_an_error(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "abcd"}\n{"text": "efgh"}\n')
    docs = TextDocumentTokens(str(f), "jsonl", build_tokenizer("byte"), str(tmp_path / "c"))
    assert list(docs.get(1)) == [101, 102, 103, 104, 256]
    with open(f, "r+b") as fh:  # same size, same lines, another text length
        fh.seek(17)
        fh.write(b'{"text": "ef"}  ')
    with pytest.raises(DataError, match=r"d.jsonl, line 2: has 3 tokens now but 5 when the dataset was built"):
        docs.get(1)

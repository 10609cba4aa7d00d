"""TextMemMapDataset: exact lines, several files, the cached newline index (reuse, rebuild on change,
fallback location when the data directory is read-only), token counts, clear errors."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from megatron_ext.data import text_mmap
from megatron_ext.data.text_mmap import TextMemMapDataset
from megatron_ext.errors import DataError
from megatron_ext.tokenizers import build_tokenizer, ensure_mask_token


def expected_lines(data: bytes):
    """Reference: the lines as bytes.split gives them (final newline does not open a line), \\r stripped."""
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts = parts[:-1]
    return [(p[:-1] if p.endswith(b"\r") else p).decode("utf-8", errors="replace") for p in parts]


CASES = {
    "plain": b"first line\nsecond line\nthird\n",
    "no_final_newline": b"alpha\nbeta\ngamma",
    "empty_lines": b"\n\na\n\n\nb\n\n",
    "only_newline": b"\n",
    "empty_file": b"",
    "crlf": b"win\r\ndows\r\n\r\nlast\r",
    "unicode_and_bad_utf8": "héllo wörld ☃\n".encode() + b"bad \xff byte\n" + "日本語".encode(),
    "cr_inside": b"a\rb\nc\r\r\n",
    "single_no_newline": b"x",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_lines(tmp_path, name):
    data = CASES[name]
    path = tmp_path / f"{name}.txt"
    path.write_bytes(data)
    ds = TextMemMapDataset(str(path))
    want = expected_lines(data)
    assert len(ds) == len(want)
    assert [ds[i] for i in range(len(ds))] == want
    assert list(ds) == want
    if want:
        assert ds[-1] == want[-1]
    with pytest.raises(IndexError):
        ds[len(want)]
    # byte lengths agree with the lines' raw bytes
    raw = [b.encode("utf-8", errors="surrogateescape") for b in want]
    if name != "unicode_and_bad_utf8":
        assert ds.byte_lengths().tolist() == [len(r) for r in raw]


def test_chunked_scan_matches_reference(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    data = bytes(rng.choice(np.frombuffer(b"ab \n\r", dtype=np.uint8), size=5000).tolist())
    path = tmp_path / "rand.txt"
    path.write_bytes(data)
    monkeypatch.setattr(text_mmap, "_SCAN_CHUNK", 37)  # many chunk boundaries
    ds = TextMemMapDataset(str(path))
    assert list(ds) == expected_lines(data)


def test_several_files_concatenated_and_tokens(tmp_path):
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    a.write_bytes(b"a1\na2\n")
    b.write_bytes(b"")
    c.write_bytes("c1\nc2 é".encode())
    ds = TextMemMapDataset([str(a), str(b), str(c)])
    assert list(ds) == ["a1", "a2", "c1", "c2 é"]
    assert ds.file_line_counts() == [2, 0, 2]
    assert ds.locate(2) == (2, 0) and ds.locate(-1) == (2, 1)
    tok = ensure_mask_token(build_tokenizer("byte"))
    tds = TextMemMapDataset([str(a), str(b), str(c)], tokenizer=tok)
    assert tds[3].dtype == np.int64 and tds[3].tolist() == list("c2 é".encode())
    assert tds.token_lengths().tolist() == [2, 2, 2, 5]
    # pickles (DataLoader workers) and reads the same after
    again = pickle.loads(pickle.dumps(tds))
    assert [again[i].tolist() for i in range(4)] == [tds[i].tolist() for i in range(4)]


def test_index_is_cached_and_reused(tmp_path, monkeypatch):
    path = tmp_path / "data.txt"
    path.write_bytes(b"one\ntwo\nthree\n")
    ds = TextMemMapDataset(str(path))
    assert ds.index_paths == [str(path) + ".idx.npy"]
    assert os.path.isfile(str(path) + ".idx.npy") and os.path.isfile(str(path) + ".idx.json")

    def boom(*a, **k):
        raise AssertionError("the index was rebuilt although the file did not change")

    monkeypatch.setattr(text_mmap, "scan_newlines", boom)
    again = TextMemMapDataset(str(path))
    assert list(again) == ["one", "two", "three"]


def test_index_rebuilt_when_file_changes(tmp_path):
    path = tmp_path / "data.txt"
    path.write_bytes(b"one\ntwo\n")
    assert list(TextMemMapDataset(str(path))) == ["one", "two"]
    # appended (other size)
    with open(path, "ab") as f:
        f.write(b"three\n")
    assert list(TextMemMapDataset(str(path))) == ["one", "two", "three"]
    # same size, new mtime
    path.write_bytes(b"one\ntwo three\n")
    assert list(TextMemMapDataset(str(path))) == ["one", "two three"]
    # same size and the old mtime put back: the checksum of the first/last 64 KiB notices
    st = os.stat(path)
    path.write_bytes(b"one two\nthree\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns
    assert list(TextMemMapDataset(str(path))) == ["one two", "three"]


def _readonly(monkeypatch, directory):
    """Make ``directory`` read-only (root ignores permissions, so also tell the writability check)."""
    os.chmod(directory, 0o555)
    real = text_mmap._dir_writable
    monkeypatch.setattr(
        text_mmap, "_dir_writable",
        lambda d: False if os.path.abspath(d) == os.path.abspath(directory) else real(d),
    )


def test_readonly_data_dir_falls_back_to_index_mapping_dir(tmp_path, monkeypatch, caplog):
    data_dir, cache = tmp_path / "data", tmp_path / "cache"
    data_dir.mkdir()
    path = data_dir / "corpus.txt"
    path.write_bytes(b"x\ny\n")
    _readonly(monkeypatch, str(data_dir))
    try:
        ds = TextMemMapDataset(str(path), index_mapping_dir=str(cache))
        mirrored = str(cache) + str(path)
        assert ds.index_paths == [mirrored + ".idx.npy"]
        assert os.path.isfile(mirrored + ".idx.json")
        assert not os.path.exists(str(path) + ".idx.npy")
        assert list(ds) == ["x", "y"]
        # without index_mapping_dir: the user cache (XDG_CACHE_HOME), with a log line
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        with caplog.at_level("INFO", logger="megatron_ext.data.text_mmap"):
            ds2 = TextMemMapDataset(str(path))
        assert ds2.index_paths[0].startswith(str(tmp_path / "xdg"))
        assert "not writable" in caplog.text
    finally:
        os.chmod(data_dir, 0o755)


def test_index_mapping_dir_used_when_given(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"x\ny\n")
    cache = tmp_path / "idx"
    ds = TextMemMapDataset(str(path), index_mapping_dir=str(cache))
    assert ds.index_paths[0].startswith(str(cache))
    assert not os.path.exists(str(path) + ".idx.npy")


def test_nothing_writable_names_both_dirs(tmp_path, monkeypatch):
    data_dir, cache = tmp_path / "data", tmp_path / "cache"
    data_dir.mkdir()
    cache.mkdir()
    path = data_dir / "corpus.txt"
    path.write_bytes(b"x\n")
    monkeypatch.setattr(text_mmap, "_dir_writable", lambda d: False)
    with pytest.raises(DataError) as err:
        TextMemMapDataset(str(path), index_mapping_dir=str(cache))
    msg = str(err.value)
    assert str(data_dir) in msg and str(cache) in msg and "index_mapping_dir" in msg


def test_missing_file_and_bad_newline(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="nope.txt"):
        TextMemMapDataset(str(missing))
    (tmp_path / "ok.txt").write_bytes(b"a\n")
    with pytest.raises(DataError, match="nope.txt"):
        TextMemMapDataset([str(tmp_path / "ok.txt"), str(missing)])
    with pytest.raises(DataError, match="not a regular file"):
        TextMemMapDataset(str(tmp_path))
    with pytest.raises(ValueError, match="newline"):
        TextMemMapDataset(str(tmp_path / "ok.txt"), newline=b"ab")


def test_custom_newline(tmp_path):
    path = tmp_path / "rec.txt"
    path.write_bytes(b"a\nb\x00c\x00")
    assert list(TextMemMapDataset(str(path), newline=b"\x00")) == ["a\nb", "c"]


def test_sentencepiece_token_counts_cached(tmp_path, monkeypatch):
    from megatron_ext.tokenizers import train_sentencepiece

    lines = [f"line number {i} with some words" if i % 5 else "" for i in range(300)]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(lines) + "\n")
    model = train_sentencepiece(str(tmp_path / "spm"), 60, sentences=iter(lines), character_coverage=1.0)
    tok = build_tokenizer("sentencepiece", model)
    ds = TextMemMapDataset(str(corpus), tokenizer=tok, index_mapping_dir=str(tmp_path / "cache"))
    lengths = ds.token_lengths()
    assert lengths.tolist() == [len(tok.tokenize(line)) for line in lines]
    assert ds[1].tolist() == tok.tokenize(lines[1]) and ds[0].tolist() == []

    def boom(*a, **k):
        raise AssertionError("token counts were recomputed")

    monkeypatch.setattr(type(tok), "tokenize_batch_flat", boom)
    again = TextMemMapDataset(str(corpus), tokenizer=tok, index_mapping_dir=str(tmp_path / "cache"))
    assert again.token_lengths().tolist() == lengths.tolist()


def test_a_directory_marked_read_only_gets_no_index_even_for_root(tmp_path, monkeypatch):
    """A corpus directory whose mode has no write bit is read-only for the caches even when os.access lets root in:
    the index goes to the fallback cache and nothing is written beside the file."""
    data = tmp_path / "ro"
    data.mkdir()
    (data / "a.txt").write_text("one\ntwo\nthree\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data.chmod(0o555)
    try:
        ds = TextMemMapDataset([str(data / "a.txt")])
        assert len(ds) == 3 and ds.get_text(1) == "two"
        assert sorted(os.listdir(data)) == ["a.txt"]
        assert list((tmp_path / "xdg").rglob("a.txt.idx.npy"))
    finally:
        data.chmod(0o755)

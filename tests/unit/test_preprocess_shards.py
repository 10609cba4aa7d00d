"""tools/preprocess_data.py with shards (issue 19, item 6), in process: compressed inputs read as the plain file,
input expansion, what a resumed run refuses, tools/merge_datasets.py's input checks. (The kill-and-resume run:
tests/integration/test_preprocess_resume.py.)"""
import filecmp
import gzip
import json
import os

import numpy as np
import pytest
import zstandard

from megatron_ext.cli import merge_datasets as md
from megatron_ext.cli import preprocess_data as pp

LINES = [f"document {i}: " + "to be or not to be " * (i % 5 + 1) for i in range(60)]


def _run(tool, capsys, *args):
    rc = tool.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _pp(capsys, *args, ok=True):
    rc, out, err = _run(pp, capsys, *args, "--workers", "1", "--no-progress")
    if ok:
        assert rc == 0, err
    else:
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return out if ok else err


def test_gz_zst_and_plain_give_the_same_dataset(tmp_path, capsys):
    """.txt, .txt.gz, .jsonl.zst of two zstd frames: the same tokens (format detected through the compression)."""
    d = tmp_path / "in"
    d.mkdir()
    text = "\n".join(LINES) + "\n"
    (d / "a.txt").write_text(text)
    with gzip.open(d / "b.txt.gz", "wt") as f:
        f.write(text)
    jl = "".join(json.dumps({"text": l}) + "\n" for l in LINES).encode()
    cctx = zstandard.ZstdCompressor()
    (d / "c.jsonl.zst").write_bytes(cctx.compress(jl[:1000]) + cctx.compress(jl[1000:]))
    (d / ".hidden.txt").write_text("skipped\n")
    out = _pp(capsys, "--input", d, "--output-prefix", tmp_path / "o" / "x", "--per-shard", "--chunk-bytes", "300")
    assert "3 shard(s) in this order: a, b, c" in out and "1 other file(s) skipped" in out
    for name in ("b", "c"):
        for ext in (".bin", ".idx"):
            assert filecmp.cmp(tmp_path / "o" / f"x_a_text_document{ext}", tmp_path / "o" / f"x_{name}_text_document{ext}",
                               shallow=False)
    stats = tmp_path / "stats.json"
    _pp(capsys, "--input", d / "b.txt.gz", "--output-prefix", tmp_path / "o1" / "x", "--stats-json", stats)
    s = json.loads(stats.read_text())
    assert s["mode"] == "single" and s["documents"] == len(LINES) and s["tokens"] == s["tokens_processed"] > 0
    assert filecmp.cmp(tmp_path / "o1" / "x_text_document.bin", tmp_path / "o" / "x_a_text_document.bin",
                       shallow=False)


def test_input_expansion_errors(tmp_path, capsys):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.md").write_text("x\n")
    err = _pp(capsys, "--input", tmp_path / "e", "--output-prefix", tmp_path / "o", ok=False)
    assert f"{tmp_path / 'e'} holds no input file" in err and ".jsonl" in err
    err = _pp(capsys, "--input", str(tmp_path / "nothing*.txt"), "--output-prefix", tmp_path / "o", ok=False)
    assert "matches no file" in err
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    (tmp_path / "d1" / "x.txt").write_text("a\n")
    (tmp_path / "d2" / "x.jsonl").write_text('{"text": "b"}\n')
    err = _pp(capsys, "--input", tmp_path / "d1", tmp_path / "d2", "--output-prefix", tmp_path / "o", ok=False)
    assert "both give the shard name 'x'" in err
    err = _pp(capsys, "--input", tmp_path / "d1", tmp_path / "d1" / "x.txt", "--output-prefix", tmp_path / "o",
              ok=False)
    assert "is given twice" in err
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(gzip.compress(("\n".join(LINES) + "\n").encode())[:-30])  # truncated
    err = _pp(capsys, "--input", bad, tmp_path / "d1" / "x.txt", "--output-prefix", tmp_path / "out" / "o", ok=False)
    assert str(bad) in err and "cannot decompress" in err
    assert not [n for n in os.listdir(tmp_path / "out" / "o.parts") if n.startswith("bad")]  # nothing of it left


def test_resume_refuses_what_it_cannot_trust(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(2):
        (d / f"s{i}.txt").write_text("\n".join(LINES[i::2]) + "\n")
    prefix = tmp_path / "o" / "p"
    _pp(capsys, "--input", d, "--output-prefix", prefix, "--per-shard")
    manifest = tmp_path / "o" / "p.manifest.json"
    assert sorted(json.loads(manifest.read_text())["shards"]) == ["s0", "s1"]
    out = _pp(capsys, "--input", d, "--output-prefix", prefix, "--per-shard")
    assert out.count("finished in an earlier run") == 2 and "2 skipped" in out
    # other settings than the manifest's
    err = _pp(capsys, "--input", d, "--output-prefix", prefix, "--per-shard", "--append-eod", ok=False)
    assert str(manifest) in err and "append_eod" in err and "--overwrite" in err
    # a recorded output changed
    b1 = tmp_path / "o" / "p_s1_text_document.bin"
    data = bytearray(b1.read_bytes())
    data[0] ^= 1
    b1.write_bytes(bytes(data))
    err = _pp(capsys, "--input", d, "--output-prefix", prefix, "--per-shard", ok=False)
    assert str(b1) in err and "does not match" in err
    # an input changed
    with open(d / "s0.txt", "a") as f:
        f.write("one more document\n")
    err = _pp(capsys, "--input", d, "--output-prefix", prefix, "--per-shard", ok=False)
    assert str(d / "s0.txt") in err and "differs from the input" in err
    # a new shard whose output exists without being recorded
    (d / "s2.txt").write_text("new\n")
    (tmp_path / "o" / "p_s2_text_document.bin").write_bytes(b"")
    out = _pp(capsys, "--input", d, "--output-prefix", prefix, "--per-shard", "--overwrite")
    assert "3 shard(s) (0 skipped)" in out
    assert json.loads(manifest.read_text())["shards"]["s0"]["stats"]["documents"] == 31


def test_merge_refuses_mixed_dtypes_and_corrupt_inputs(tmp_path, capsys):
    from megatron_ext.indexed_files import DatasetWriter

    for name, dtype in (("u16", np.uint16), ("i32", np.int32)):
        w = DatasetWriter(str(tmp_path / name), dtype)
        w.add_documents(np.arange(5), np.array([2, 3]))
        w.finalize()
        w.commit()
    rc, _, err = _run(md, capsys, "--input", tmp_path / "u16", tmp_path / "i32", "--output-prefix", tmp_path / "m")
    assert rc == 2 and str(tmp_path / "i32.idx") in err and "int32" in err and "uint16" in err
    with open(tmp_path / "i32.bin", "ab") as f:
        f.write(b"\0\0")
    rc, _, err = _run(md, capsys, "--input", tmp_path / "i32", "--output-prefix", tmp_path / "m")
    assert rc == 2 and str(tmp_path / "i32.bin") in err and "truncated or does not belong" in err
    rc, _, err = _run(md, capsys, "--input", tmp_path / "nope", "--output-prefix", tmp_path / "m")
    assert rc == 2 and str(tmp_path / "nope.bin") in err
    rc, _, err = _run(md, capsys, "--input", tmp_path / "u16", "--output-prefix", tmp_path / "u16")
    assert rc == 2 and "is the input" in err
    assert not list(tmp_path.glob("m*"))


def test_zst_without_zstandard_names_the_package(tmp_path, capsys, monkeypatch):
    f = tmp_path / "a.jsonl.zst"
    f.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "x"}\n'))
    monkeypatch.setitem(__import__("sys").modules, "zstandard", None)  # as if not installed: import fails
    err = _pp(capsys, "--input", f, "--output-prefix", tmp_path / "o" / "x", ok=False)
    assert str(f) in err and "'zstandard'" in err and "pip install zstandard" in err

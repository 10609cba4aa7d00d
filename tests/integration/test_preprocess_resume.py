"""tools/preprocess_data.py on a directory of compressed shards: killed after 2 of 4 shards (for real: SIGKILL) and
rerun, the outputs equal a clean run's (sha256); tools/merge_datasets.py of the per-shard outputs equals the merged
output (issue 19, item 6)."""
import gzip
import hashlib
import json
import os
import signal
import sys

import numpy as np

import helpers
from helpers import REPO, run_script

from megatron_ext.cli import merge_datasets as md
from megatron_ext.cli import preprocess_data as pp
from megatron_ext.indexed_files import read_index
from megatron_ext.tokenizers import ByteTokenizer

SCRIPT = os.path.join(REPO, "tools", "preprocess_data.py")


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _shas(directory):
    return {n: _sha(os.path.join(directory, n)) for n in sorted(os.listdir(directory)) if n.endswith((".bin", ".idx"))}


def _shards(d):
    lines = helpers.shakespeare_lines(400)
    os.makedirs(d)
    for i in range(4):
        with gzip.open(os.path.join(d, f"part-{i:02d}.txt.gz"), "wt", encoding="utf-8") as f:
            f.write("\n".join(lines[i * 100:(i + 1) * 100]) + "\n")
    with open(os.path.join(d, "README.md"), "w") as f:  # not an input: skipped, and said so
        f.write("not a shard\n")
    return [l for l in lines if l.strip()]


def _pp(capsys, *args):
    rc = pp.main([*map(str, args), "--workers", "2", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def _killed_run(inp, prefix, run_env, *extra):
    env = dict(run_env, **{pp.KILL_ENV: "2"})
    proc = run_script([SCRIPT, "--input", inp, "--output-prefix", prefix, "--workers", "2", "--no-progress",
                       "--chunk-bytes", "1024", *extra], env, timeout=120,
                      python=sys.executable)  # the tool imports no torch: a plain interpreter starts in ~0.2 s
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    return proc


def test_gz_shards_killed_after_two_resume_identical_and_merge_equals_merged(tmp_path, run_env, capsys):
    inp = str(tmp_path / "shards")
    docs = _shards(inp)

    # a clean run: one merged dataset
    clean = tmp_path / "clean"
    out = _pp(capsys, "--input", inp, "--output-prefix", clean / "c")
    assert "1 other file(s) skipped" in out and "part-00, part-01, part-02, part-03" in out
    assert sorted(os.listdir(clean)) == ["c_text_document.bin", "c_text_document.idx"]  # no .parts left
    merged = _shas(clean)
    one = tmp_path / "one.txt"  # the shards' text as one file: the same dataset
    with open(one, "wb") as f:
        for i in range(4):
            with gzip.open(os.path.join(inp, f"part-{i:02d}.txt.gz")) as g:
                f.write(g.read())
    _pp(capsys, "--input", one, "--output-prefix", tmp_path / "one" / "c")
    assert _shas(tmp_path / "one") == merged

    # killed after 2 shards: 2 recorded, the 3rd half-written under a .tmp name, no merged output
    res = tmp_path / "res"
    proc = _killed_run(inp, res / "r", run_env)
    assert "[2/4] part-01" in proc.stdout and "[3/4]" not in proc.stdout
    parts = res / "r.parts"
    with open(parts / "manifest.json") as f:
        assert sorted(json.load(f)["shards"]) == ["part-00", "part-01"]
    assert (parts / "part-02_text_document.bin.tmp").stat().st_size > 0
    assert not (res / "r_text_document.bin").exists()
    out = _pp(capsys, "--input", inp, "--output-prefix", res / "r")
    assert out.count("finished in an earlier run") == 2 and "[3/4] part-02: " in out and "[4/4] part-03: " in out
    assert sorted(os.listdir(res)) == ["r_text_document.bin", "r_text_document.idx"]
    assert {k.replace("r_", "c_"): v for k, v in _shas(res).items()} == merged

    # per shard: killed + rerun equals a clean per-shard run; merging those equals the merged output
    ps = tmp_path / "ps"
    _killed_run(inp, ps / "p", run_env, "--per-shard")
    _pp(capsys, "--input", inp, "--output-prefix", ps / "p", "--per-shard")
    ps_clean = tmp_path / "ps_clean"
    _pp(capsys, "--input", os.path.join(inp, "*.gz"), "--output-prefix", ps_clean / "p", "--per-shard")
    assert _shas(ps) == _shas(ps_clean) and len(_shas(ps)) == 8
    assert md.main(["--input", str(ps), "--output-prefix", str(tmp_path / "m" / "all")]) == 0
    assert _sha(tmp_path / "m" / "all.bin") == merged["c_text_document.bin"]
    assert _sha(tmp_path / "m" / "all.idx") == merged["c_text_document.idx"]

    # the documents, in input order (megatron-core's IndexedDataset reads such a merge: tests/unit/test_preprocess.py)
    ix = read_index(str(tmp_path / "m" / "all.idx"))
    tokens = np.fromfile(tmp_path / "m" / "all.bin", dtype=ix.dtype)
    tok = ByteTokenizer()
    assert ix.lengths.tolist() == [len(tok.tokenize(d)) for d in docs]
    assert tokens.tolist() == [t for d in docs for t in tok.tokenize(d)]

"""Bad inputs to the tools and builds: no silent hangs on a dead builder's lock, tools never destroy their inputs
or replace existing outputs unasked, and write / empty-data failures are one clear line.

Each test fails on the code before issue 15 (an input overwritten with rc 0, a run waiting forever on a
``lock`` file, a traceback, or an empty dataset reported as "multimodal").
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from megatron_ext.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tools_import(name):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def _tools_preprocess(capsys, *args):
    pre = _tools_import("preprocess_data")
    rc = pre.main([*map(str, args), "--workers", "1", "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def _tools_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


# ------------------------------------------------------------------ outputs that are inputs / that already exist
@pytest.mark.parametrize("how", ["same_path", "symlink", "hard_link"])
def test_tools_preprocess_never_overwrites_its_input(tmp_path, capsys, how):
    data = tmp_path / "x_text_document.bin"
    data.write_text("first document\nsecond document\n")
    before = data.read_bytes()
    inp = data
    if how == "symlink":
        inp = tmp_path / "corpus.txt"
        inp.symlink_to(data)
    elif how == "hard_link":
        inp = tmp_path / "corpus.txt"
        os.link(data, inp)
    rc, _, err = _tools_preprocess(capsys, "--input", inp, "--input-format", "text",
                                   "--output-prefix", tmp_path / "x")
    assert rc == 2 and err.count("\n") == 1, err
    assert "--output-prefix" in err and str(data) in err and "is the input" in err
    assert data.read_bytes() == before
    assert not (tmp_path / "x_text_document.idx").exists()


def test_tools_preprocess_existing_output_needs_overwrite(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("one document\nanother one\n")
    prefix = tmp_path / "out" / "c"
    assert _tools_preprocess(capsys, "--input", corpus, "--output-prefix", prefix)[0] == 0
    bin_path = str(prefix) + "_text_document.bin"
    first = open(bin_path, "rb").read()
    corpus.write_text("different text now\n")
    rc, _, err = _tools_preprocess(capsys, "--input", corpus, "--output-prefix", prefix)
    assert rc == 2 and bin_path in err and "already exists" in err and "--overwrite" in err
    assert open(bin_path, "rb").read() == first
    rc, _, err = _tools_preprocess(capsys, "--input", corpus, "--output-prefix", prefix, "--overwrite")
    assert rc == 0, err
    assert open(bin_path, "rb").read() != first


def test_tools_other_tools_refuse_an_output_that_is_an_input(tmp_path, capsys):
    """The same rule, through the same helper, in every tool that writes files derived from its inputs."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some words\n" * 50)
    before = corpus.read_bytes()
    train_tokenizer = _tools_import("train_tokenizer")
    os.link(corpus, tmp_path / "tok.model")
    rc = train_tokenizer.main(["--input", str(corpus), "--model-prefix", str(tmp_path / "tok"), "--vocab-size", "20"])
    err = capsys.readouterr().err
    assert rc == 2 and "--model-prefix" in err and "is the input" in err and corpus.read_bytes() == before

    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"not read")
    convert_checkpoint = _tools_import("convert_checkpoint")
    rc = convert_checkpoint.main(["--input", str(ckpt), "--output", str(ckpt)])
    err = capsys.readouterr().err
    assert rc == 2 and "--output" in err and "is the input" in err and ckpt.read_bytes() == b"not read"
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_1").mkdir(parents=True)
    rc = convert_checkpoint.main(["--input", str(run_dir / "checkpoints" / "step_1"), "--output-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and "--output-dir" in err and "contains the input" in err

    convert_to_hf = _tools_import("convert_to_hf")
    rc = convert_to_hf.main(["--input", str(ckpt), "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--output" in err and "contains the input" in err

    evaluate = _tools_import("evaluate")
    rc = evaluate.main(["--model", str(run_dir), "--input", str(corpus), "--output", str(corpus)])
    err = capsys.readouterr().err
    assert rc == 2 and "--output" in err and "is the input" in err and corpus.read_bytes() == before
    existing = tmp_path / "scores.json"
    existing.write_text("{}")
    rc = evaluate.main(["--model", str(run_dir), "--input", str(corpus), "--output", str(existing)])
    err = capsys.readouterr().err
    assert rc == 2 and "already exists" in err and "--overwrite" in err


# ------------------------------------------------------------------ empty inputs / datasets
@pytest.mark.parametrize("content", ["", "\n   \n\t\n"])
def test_tools_preprocess_empty_input_is_reported_as_empty(tmp_path, capsys, content):
    corpus = tmp_path / "blank.txt"
    corpus.write_text(content)
    rc, _, err = _tools_preprocess(capsys, "--input", corpus, "--output-prefix", tmp_path / "out" / "b")
    assert rc == 2 and err.count("\n") == 1, err
    assert str(corpus) in err and "empty" in err and "no documents" in err
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []


def test_tools_empty_dataset_is_reported_as_empty_not_multimodal(tmp_path):
    """The .idx that tools/preprocess_data.py wrote for a blank input: 0 sequences, document table [0]."""
    from megatron_ext.data.validation import IDX_MAGIC, validate_indexed_dataset

    prefix = str(tmp_path / "empty_text_document")
    with open(prefix + ".idx", "wb") as f:
        f.write(IDX_MAGIC + np.uint64(1).tobytes() + bytes([8]) + np.uint64(0).tobytes() + np.uint64(1).tobytes()
                + np.int64(0).tobytes())
    open(prefix + ".bin", "wb").close()
    with pytest.raises(DataError) as ei:
        validate_indexed_dataset(prefix, 256, None)
    msg = str(ei.value)
    assert prefix + ".idx" in msg and "empty" in msg and "multimodal" not in msg


# ------------------------------------------------------------------ read-only directory / full disk
def _tools_mount_tmpfs(directory, options):
    directory.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], capture_output=True)
    return r.returncode == 0


@pytest.mark.parametrize("case", ["read_only", "disk_full"])
def test_tools_preprocess_unwritable_output_is_one_line(tmp_path, capsys, monkeypatch, case):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"document number {i} " * 30 + "\n" for i in range(400)))  # ~250 kB
    out = tmp_path / "out"
    options = "size=1m,ro" if case == "read_only" else "size=64k"
    mounted = _tools_mount_tmpfs(out, options)
    if not mounted:  # no permission to mount: inject the error at the write of the .bin
        import builtins

        code = errno.EROFS if case == "read_only" else errno.ENOSPC
        real_open = builtins.open

        def failing_open(file, *a, **k):
            if str(file).endswith(".bin.tmp"):
                raise OSError(code, os.strerror(code), str(file))
            return real_open(file, *a, **k)

        monkeypatch.setattr(builtins, "open", failing_open)
    try:
        rc, _, err = _tools_preprocess(capsys, "--input", corpus, "--output-prefix", out / "c")
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert str(out / "c_text_document.bin") in err
        assert ("read-only" in err) if case == "read_only" else ("disk full" in err)
        assert os.listdir(out) == []  # no partial .bin/.idx, temporary or final
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=False)


# ------------------------------------------------------------------ build locks left by killed builders
_TINY_SOURCES = {name: f"extern \"C\" int megatron_ext_test_{i}() {{ return {i}; }}\n"
                 for i, name in enumerate(("ema_cpu.cpp", "ema_cpu_avx512.cpp", "ema_cpu_avx2.cpp",
                                           "ema_cpu_generic.cpp"))}


def test_tools_kernel_build_does_not_wait_on_a_dead_builders_lock(tmp_path, monkeypatch):
    """A killed build leaves torch's empty ``lock`` file in the build directory; the next build goes on."""
    from megatron_ext.kernels import _build

    csrc = tmp_path / "csrc"
    csrc.mkdir()
    for name, text in _TINY_SOURCES.items():  # seconds to build, instead of the EMA kernels' minute and more
        (csrc / name).write_text(text)
    for name in ("ema_cpu_kernel.h", "ema_cpu_impl.h"):
        (csrc / name).write_text("")
    env = {"MEGATRON_EXT_CSRC": str(csrc), "MEGATRON_EXT_KERNELS_CACHE": str(tmp_path / "cache"),
           "MEGATRON_EXT_DISABLE_KERNELS": "0"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    directory = _build.build_dir("cpu")
    directory.mkdir(parents=True)
    (directory / "lock").touch()  # what torch's FileBaton leaves behind when its builder is SIGKILLed
    code = "from megatron_ext.kernels import _build; print('BUILT', _build.load_library('cpu'))"
    try:
        r = subprocess.run([sys.executable, "-c", code], env=_tools_env(**env), capture_output=True, text=True,
                           timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the build waited on {directory / 'lock'} (a dead builder's lock) without end")
    assert r.returncode == 0 and "BUILT" in r.stdout, r.stderr
    assert f"removing {directory / 'lock'}" in r.stderr
    assert not (directory / "lock").exists()


def test_tools_build_lock_names_a_live_holder_and_ignores_a_dead_one(tmp_path, capsys):
    from megatron_ext.kernels._build import BuildLock, KernelUnavailableError

    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from megatron_ext.kernels._build import BuildLock
            BuildLock({str(tmp_path)!r}, "test").acquire()
            print("HELD", flush=True)
            time.sleep(600)
        """)], env=_tools_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        with pytest.raises(KernelUnavailableError) as ei:
            BuildLock(tmp_path, "test", timeout=1.0, report_after=0.0).acquire()
        lock = str(tmp_path / "megatron_ext.build.lock")
        assert lock in str(ei.value) and f"pid {holder.pid}" in str(ei.value)
        assert f"waiting 0 s for the build lock {lock}, held by pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with BuildLock(tmp_path, "test", timeout=30.0):  # the builder is gone: its lock went with it
        assert f"pid {os.getpid()}" in open(tmp_path / "megatron_ext.build.lock").read()


_TOOLS_ENGINE_SCRIPT = """
import torch
from megatron_ext.parallel.state import initialize_parallel
from megatron_ext.training.engine import build_engine
initialize_parallel(accelerator="cpu")
m = torch.nn.Linear(4, 4)
engine, _, _ = build_engine(m, torch.optim.SGD(m.parameters(), lr=0.1), None,
                            {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1})
print("ENGINE", type(engine).__name__, flush=True)
"""


def test_tools_deepspeed_cpu_init_does_not_build_the_shm_op(tmp_path):
    """A killed build of DeepSpeed's deepspeed_shm_comm op leaves its lock; CPU training does not need the op."""
    ext = tmp_path / "torch_extensions"
    (ext / "deepspeed_shm_comm").mkdir(parents=True)
    (ext / "deepspeed_shm_comm" / "lock").touch()
    try:
        r = subprocess.run([sys.executable, "-c", _TOOLS_ENGINE_SCRIPT], capture_output=True, text=True,
                           timeout=150, env=_tools_env(TORCH_EXTENSIONS_DIR=str(ext), DS_ACCELERATOR="cpu",
                                                       CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"deepspeed init waited on {ext / 'deepspeed_shm_comm' / 'lock'} without end")
    assert r.returncode == 0 and "ENGINE DeepSpeedEngine" in r.stdout, r.stderr[-2000:]
    assert os.listdir(ext / "deepspeed_shm_comm") == ["lock"]  # not built at all

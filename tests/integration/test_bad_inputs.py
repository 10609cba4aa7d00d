"""The catalogue of bad inputs (issue 15): every way a hostile or careless user broke a run, one test each, so the
list can only grow. Each test failed on the code before the fix it guards and names the attempt it replays.

Sections:

1. Loading never runs code or writes outside its place (items 1-3, 11: truncated archive).
2. Runs own their directories; checkpoints are never lost, mixed or non-finite (items 4, 6, 7, 11).
3. Every accepted key does something; config errors before any process starts (items 6, 8, 9, 11).
4. Tools never destroy inputs; no silent wait on a build lock; clear data errors (items 5, 10, 11).
5. An exported Hugging Face tokenizer gives exactly the training ids (item 12).

Test names carry their section's prefix (``test_sec_``, ``test_runs_``, ``test_cfg_``, ``test_tools_``, ``test_hf_``)
and so do the helpers; ``pytest tests/test_bad_inputs.py -k runs`` runs one section.
"""
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import tokenizers
import torch
import transformers
from omegaconf import OmegaConf

from helpers import REPO, SHARED_DATA, TINY_GPT, run_script

from megatron_ext.config.schema import ModelConfig
from megatron_ext.errors import CheckpointError, CorruptCheckpointError, DataError
from megatron_ext.inference.hf_export import consolidated_from_model, export_to_hf
from megatron_ext.models.gpt import GPTModel

from megatron_ext.cli import convert_to_hf


# ----------------------------------------------------------------------------------------- shared helpers
@contextlib.contextmanager
def _tmpfs(directory, options="size=48k"):
    """``directory`` (created) as a real tmpfs with mount ``options`` (``size=48k`` for a nearly full disk, ``ro``
    for a read-only one); yields whether mounting was permitted (root), else the plain directory."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            import gc

            gc.collect()  # file objects of the failed write
            if subprocess.run(["umount", str(directory)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(directory)], check=False)



######################################################################################################################
# 1. Loading never runs code or writes outside its place (items 1-3, 11: truncated archive)
#
# Bad inputs, security part: loading a received file never runs its code or writes outside its place.
#
# - every reader of ``.pt`` files (consolidated checkpoints, checkpoint directories through DeepSpeed or
#   zero_to_fp32, RNG states, latents) refuses a pickle that would run code, naming the file; the payload (it would
#   create a marker file) never runs;
# - a ``.mext`` archive is checked against its manifest before any member is written: a sparse member declaring far
#   more than it stores, a member absent from the manifest or of another size is refused with nothing written;
# - every path in the manifest (``tokenizer.file`` included) is a checked member of the archive;
# - a truncated archive is one clear error naming the file.
######################################################################################################################

# ----------------------------------------------------------------------------------------------- helpers
class _SecPayload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _sec_evil_pt(path, marker, obj=None):
    """A torch file whose pickle would create ``marker``; otherwise shaped like ``obj``."""
    obj = dict(obj or {})
    obj["payload"] = _SecPayload(marker)
    torch.save(obj, str(path))
    return str(path)


_SEC_MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
              "micro_batch_size": 2, "global_batch_size": 4, "tokenizer": {"library": "byte", "model": None}}


def _sec_evil_checkpoint(root, marker, zero_stage=0):
    """A run directory ``root`` (config.yaml, checkpoints/latest, checkpoints/step_0000002/meta.json) whose DeepSpeed
    files carry the payload."""
    step = root / "checkpoints" / "step_0000002"
    step.mkdir(parents=True)
    (root / "config.yaml").write_text(json.dumps({"model": _SEC_MODEL}))
    (root / "checkpoints" / "latest").write_text("step_0000002")
    meta = {"step": 2, "consumed_samples": 8, "world_size": 1, "tp": 1, "pp": 1, "dp": 1, "zero_stage": zero_stage,
            "precision": "32", "vocab_size": 259, "model_config": _SEC_MODEL}
    (step / "meta.json").write_text(json.dumps(meta))
    _sec_evil_pt(step / "mp_rank_00_model_states.pt", marker, {"module": {"w": torch.zeros(2)}})
    if zero_stage:
        _sec_evil_pt(step / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker, {"optimizer_state_dict": {}})
    _sec_evil_pt(step / "rng_state_rank00000.pt", marker, {"python": 1})
    return root


def _sec_encdec_checkpoint(root):
    """A genuine tiny encoder-decoder checkpoint directory (what tools/latents.py --ckpt reads)."""
    from omegaconf import OmegaConf

    from megatron_ext.config.schema import EncoderDecoderModelConfig, TransformerStackConfig
    from megatron_ext.models.encoder_decoder import EncoderDecoderModel
    from megatron_ext.parallel.state import initialize_parallel
    from megatron_ext.tokenizers import build_tokenizer, ensure_mask_token

    initialize_parallel(1, 1, accelerator="cpu")
    common = dict(num_layers=1, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0)
    cfg = EncoderDecoderModelConfig(encoder=TransformerStackConfig(**common), decoder=TransformerStackConfig(**common),
                                    seq_length=12, seq_length_dec=10, make_vocab_size_divisible_by=8)
    vocab = ensure_mask_token(build_tokenizer("byte")).vocab_size
    model = EncoderDecoderModel(cfg, vocab, init_seed=4)
    step = root / "step_0000001"
    step.mkdir(parents=True)
    meta = {"step": 1, "consumed_samples": 0, "tp": 1, "pp": 1, "dp": 1, "zero_stage": 0, "precision": "32",
            "vocab_size": vocab, "model_config": OmegaConf.to_container(OmegaConf.structured(cfg))}
    (step / "meta.json").write_text(json.dumps(meta))
    torch.save({"module": model.state_dict()}, str(step / "mp_rank_00_model_states.pt"))
    return str(step)


def _sec_one_error_line(r, name):
    """The process failed with exit 2 and one error line naming ``name``, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln and name in ln]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------------------------- pickled code
def test_sec_every_pt_entry_point_refuses_pickled_code(run_env, tmp_path):
    """The four entry points the issue names, plus a checkpoint directory given to training (DeepSpeed's loader)
    and to tools/export_archive.py: the payload never runs, one line names the file."""
    marker = tmp_path / "pwned"
    evil = _sec_evil_pt(tmp_path / "evil.pt", marker, {"format": "megatron_ext.consolidated.v1"})
    run = _sec_evil_checkpoint(tmp_path / "run", marker)
    step_file = str(run / "checkpoints" / "step_0000002" / "mp_rank_00_model_states.pt")
    latents_ckpt = _sec_encdec_checkpoint(tmp_path / "bart")
    out = tmp_path / "out"
    tiny = [f"model.{k}={v}" for k, v in _SEC_MODEL.items() if k != "tokenizer"]
    cases = [
        (["tools/convert_to_hf.py", "--input", evil, "--output", str(out / "hf")], evil),
        (["tools/convert_checkpoint.py", "--input", evil, "--output", str(out / "c.pt")], evil),
        (["tools/latents.py", "decode", "--ckpt", latents_ckpt, "--latents", evil], evil),
        (["tools/export_archive.py", "--input", str(run), "--output", str(out / "a.mext")], step_file),
        (["pretrain_gpt.py", *tiny, f"model.ckpt_path={evil}", "trainer.limit_train_batches=0",
          f"exp_manager.exp_dir={out}", "exp_manager.version=a"], evil),
        (["pretrain_gpt.py", *tiny, f"model.ckpt_path={run / 'checkpoints'}", "trainer.max_steps=1",
          f"exp_manager.exp_dir={out}", "exp_manager.version=b"], step_file),
    ]
    for args, name in cases:
        r = run_script(args, run_env, timeout=300)
        assert not marker.exists(), f"{args[0]} ran the pickled payload"
        line = _sec_one_error_line(r, name)
        assert "refused" in line, line


def test_sec_in_process_readers_refuse_pickled_code(tmp_path):
    """The library readers behind those entry points: consolidated files, checkpoint directories (plain and ZeRO,
    whose zero_to_fp32 reader unpickles in full) and RNG states."""
    from megatron_ext.training.checkpointing import Checkpointer
    from megatron_ext.checkpoint.consolidated import consolidate_checkpoint, read_consolidated

    marker = tmp_path / "pwned"
    evil = _sec_evil_pt(tmp_path / "evil.pt", marker)
    plain = _sec_evil_checkpoint(tmp_path / "plain", marker)
    zero = _sec_evil_checkpoint(tmp_path / "zero", marker, zero_stage=1)
    calls = [
        (lambda: read_consolidated(evil), "evil.pt"),
        (lambda: consolidate_checkpoint(str(plain)), "mp_rank_00_model_states.pt"),
        (lambda: consolidate_checkpoint(str(zero)), "_states.pt"),
        (lambda: Checkpointer.load_rng(str(plain / "checkpoints"), "step_0000002"), "rng_state_rank00000.pt"),
    ]
    for fn, name in calls:
        with pytest.raises(CheckpointError, match=rf"{name}: refused: .* \(global posix\.system\)") as ei:
            fn()
        assert "\n" not in str(ei.value)
        assert not marker.exists()


def test_sec_safe_loader_reads_what_runs_write_and_names_bad_files(tmp_path):
    """The allow-list covers DeepSpeed's optimizer-state types (a loss scaler, the ZeRO stage enum, fragment
    addresses); a truncated or non-torch file is one error naming it."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from megatron_ext.checkpoint.safe_load import load_untrusted

    p = tmp_path / "optim.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1), "zero_stage": ZeroStageEnum.optimizer_states,
                                         "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}]},
                "ds_version": "0.19", "t": torch.ones(3)}, str(p))
    obj = load_untrusted(str(p))
    assert obj["optimizer_state_dict"]["zero_stage"] == 1
    assert obj["optimizer_state_dict"]["param_slice_mappings"][0]["w"].numel == 4
    good = p.read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: checkpoint file could not be read \(truncated"):
        load_untrusted(str(tmp_path / "cut.pt"))
    with pytest.raises(CheckpointError, match=r"gone\.pt: no such checkpoint file"):
        load_untrusted(str(tmp_path / "gone.pt"))


# ----------------------------------------------------------------------------------------------- archives
def _sec_archive(tmp_path, tokenizer_file=None):
    """A small genuine archive (write_archive) and its members {name: bytes}."""
    from megatron_ext.checkpoint.archive import write_archive

    path = write_archive(str(tmp_path / "good.mext"), state_dict={"w": torch.ones(4)},
                         config={"model": {"num_layers": 1}}, family="gpt", vocab_size=259,
                         tokenizer_library="sentencepiece" if tokenizer_file else "byte", tokenizer_file=tokenizer_file)
    with tarfile.open(path) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    return path, members


def _sec_tar(path, entries):
    """entries: [(TarInfo or raw 512-byte header bytes, data bytes)]"""
    with open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tf:
            for info, data in entries:
                if isinstance(info, (bytes, bytearray)):
                    tf.fileobj.write(bytes(info))
                    tf.offset += len(info)
                    continue
                tf.addfile(info, io.BytesIO(data))
    return str(path)


def _sec_file(name, data):
    i = tarfile.TarInfo(name)
    i.size = len(data)
    return i, data


def _sec_sparse_header(name, real_size):
    """A GNU sparse member header storing no data but declaring ``real_size`` bytes (all a hole)."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 0
    buf = bytearray(info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict"))
    buf[386:398] = tarfile.itn(0, 12, tarfile.GNU_FORMAT)     # one map entry: offset 0,
    buf[398:410] = tarfile.itn(0, 12, tarfile.GNU_FORMAT)     # 0 bytes of data
    buf[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)  # real size
    buf[148:156] = b" " * 8
    buf[148:155] = b"%06o\0" % tarfile.calc_chksums(bytes(buf))[0]
    return bytes(buf)


def _sec_tree_bytes(d):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def test_sec_sparse_bomb_refused_before_anything_is_written(tmp_path):
    """A sparse model_weights.pt of 64 MiB (the issue's was 100 GiB) in an archive of a few kB: refused naming the
    member, the extraction directory stays empty."""
    from megatron_ext.checkpoint.archive import extract_archive

    _, good = _sec_archive(tmp_path)
    bomb = _sec_tar(tmp_path / "bomb.mext", [_sec_file("manifest.json", good["manifest.json"]),
                                             _sec_file("config.yaml", good["config.yaml"]),
                                             (_sec_sparse_header("model_weights.pt", 64 << 20), b"")])
    assert os.path.getsize(bomb) < (1 << 20)
    dest = tmp_path / "x"
    dest.mkdir()
    try:
        with pytest.raises(CheckpointError, match=r"bomb\.mext: refused: member 'model_weights\.pt' is a sparse"):
            extract_archive(bomb, str(dest))
    finally:
        used = _sec_tree_bytes(dest)
        assert used < (1 << 20) and os.listdir(dest) == [], (used, os.listdir(dest))


def test_sec_archive_members_checked_against_manifest_before_writing(tmp_path):
    """A member absent from the manifest, or whose size differs from the manifest's, is refused with nothing
    written."""
    from megatron_ext.checkpoint.archive import extract_archive

    _, good = _sec_archive(tmp_path)
    manifest = json.loads(good["manifest.json"])
    cases = []
    # a bigger model_weights.pt than the manifest says, with the manifest's checksum of it (the base checks only
    # the checksum after writing)
    big = good["model_weights.pt"] + b"\0" * (8 << 20)
    m = json.loads(json.dumps(manifest))
    m["files"]["model_weights.pt"]["sha256"] = hashlib.sha256(big).hexdigest()
    cases.append(([_sec_file("manifest.json", json.dumps(m).encode()), _sec_file("config.yaml", good["config.yaml"]),
                   _sec_file("model_weights.pt", big)], r"'model_weights\.pt' declares \d+ bytes but manifest"))
    # a tokenizer member the manifest does not list
    cases.append(([_sec_file(n, d) for n, d in good.items()] + [_sec_file("tokenizer/x.model", b"\0" * (4 << 20))],
                  r"'tokenizer/x\.model' is not listed in manifest\.json"))
    for i, (entries, match) in enumerate(cases):
        p = _sec_tar(tmp_path / f"bad{i}.mext", entries)
        dest = tmp_path / f"d{i}"
        dest.mkdir()
        with pytest.raises(CheckpointError, match=match):
            extract_archive(p, str(dest))
        assert os.listdir(dest) == [], (match, os.listdir(dest))


def test_sec_manifest_tokenizer_path_must_be_a_member(tmp_path):
    """``tokenizer.file`` pointing outside the archive is refused; a restored archive never names a foreign file."""
    from megatron_ext.checkpoint.archive import read_archive

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "other.model").write_bytes(b"foreign")
    _, good = _sec_archive(tmp_path)
    manifest = json.loads(good["manifest.json"])
    dest = tmp_path / "x"
    dest.mkdir()
    rel = os.path.relpath(victim / "other.model", dest)
    for file in (rel, "tokenizer/absent.model"):
        manifest["tokenizer"] = {"library": "sentencepiece", "file": file}
        p = _sec_tar(tmp_path / "esc.mext", [_sec_file("manifest.json", json.dumps(manifest).encode())] +
                     [_sec_file(n, d) for n, d in good.items() if n != "manifest.json"])
        for f in os.listdir(dest):
            os.remove(dest / f)
        with pytest.raises(CheckpointError, match=r"esc\.mext: refused: manifest\.json tokenizer\.file"):
            read_archive(p, str(dest))


def test_sec_truncated_archive_is_one_error_naming_it(tmp_path):
    from megatron_ext.checkpoint.archive import read_archive

    path, _ = _sec_archive(tmp_path)
    data = open(path, "rb").read()
    for cut in (len(data) // 2, 700):
        bad = tmp_path / f"cut{cut}.mext"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=rf"cut{cut}\.mext: truncated or corrupt \.mext archive"):
            read_archive(str(bad), str(tmp_path / f"d{cut}"))



def test_sec_disk_full_while_unpacking_is_one_error_naming_it(tmp_path):
    from megatron_ext.errors import MegatronExtError
    from megatron_ext.checkpoint.archive import write_archive, read_archive

    path = write_archive(str(tmp_path / "big.mext"), state_dict={"w": torch.ones(100_000)},  # 400 kB of weights
                         config={"model": {"num_layers": 1}}, family="gpt", vocab_size=259, tokenizer_library="byte")
    disk = tmp_path / "disk"
    with _tmpfs(disk, "size=64k") as mounted:
        if not mounted:
            pytest.skip("mounting a small tmpfs is not permitted here")
        with pytest.raises(MegatronExtError) as e:
            read_archive(path, str(disk / "d"))
    msg = str(e.value)
    assert "disk full" in msg and str(disk / "d") in msg and "big.mext" in msg and "\n" not in msg, msg

######################################################################################################################
# 2. Runs own their directories; checkpoints are never lost, mixed or non-finite (items 4, 6, 7, 11)
#
# Bad inputs around run directories and checkpoints (issue 15, runs): a run owns its directory, a fresh run never
# writes beside an earlier run's checkpoints, a non-finite state never becomes a checkpoint, pruning leaves no
# fragments, and a truncated/corrupt checkpoint file, a full disk or an ``exp_dir`` that is a file give one clear
# message. One tiny run is trained in this process (module fixture) and copied by the tests that need checkpoints.
######################################################################################################################

_RUNS_TINY = [
    "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_length=16",
    "model.micro_batch_size=2", "model.global_batch_size=2", "model.make_vocab_size_divisible_by=8",
    "trainer.log_every_n_steps=1", "trainer.val_check_interval=0", "trainer.accelerator=cpu",
    "exp_manager.create_tensorboard_logger=false",
]


def _runs_cfg(exp_dir, *extra, corpus=None):
    from megatron_ext.config.loader import load_config

    over = [*_RUNS_TINY, f"exp_manager.exp_dir={exp_dir}", *extra]
    if corpus is not None:
        over.append(f"model.data.default_corpus_dir={corpus}")
    return load_config(overrides=over)


def _runs_fit(exp_dir, corpus, *extra):
    from megatron_ext.training.gpt_task import GPTTask
    from megatron_ext.training.trainer import Trainer

    return Trainer(_runs_cfg(exp_dir, *extra, corpus=corpus), GPTTask).fit()


@pytest.fixture(scope="module")
def _runs_trained(tmp_path_factory):
    """(exp_dir, corpus dir): ``<exp_dir>/megatron_gpt/src`` trained 3 steps with a checkpoint at every step."""
    from megatron_ext.parallel.state import initialize_parallel

    initialize_parallel(1, 1, accelerator="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: OpenMP barriers cost more than the math
    root = tmp_path_factory.mktemp("runs")
    corpus = str(root / "corpus")
    exp = str(root / "exp")
    res = _runs_fit(exp, corpus, "trainer.max_steps=3", "exp_manager.version=src",
                    "exp_manager.checkpoint_callback_params.every_n_train_steps=1")
    assert res["step"] == 3
    yield exp, corpus
    torch.set_num_threads(threads)


def _runs_copy(trained, tmp_path, version="v"):
    """A copy of the trained run as ``<tmp_path>/megatron_gpt/<version>``; returns its checkpoints directory."""
    exp, _ = trained
    dst = tmp_path / "megatron_gpt" / version
    shutil.copytree(os.path.join(exp, "megatron_gpt", "src"), dst, ignore=shutil.ignore_patterns(".lock"))
    return dst / "checkpoints"


# ------------------------------------------------------------------------------ 4. run-directory collisions
def test_runs_default_versions_started_together_get_their_own_directories(tmp_path):
    from megatron_ext.training.exp_manager import resolve_run_dir

    em = _runs_cfg(tmp_path).exp_manager
    dirs = [resolve_run_dir(em, 0) for _ in range(3)]  # same second (or not): never the same directory
    assert len(set(dirs)) == 3, dirs
    assert all(os.path.isdir(d) for d in dirs)  # created atomically when chosen


def test_runs_second_run_on_a_locked_directory_stops_with_the_holder(tmp_path):
    from megatron_ext.errors import ConfigError
    from megatron_ext.training.exp_manager import ExpManager

    cfg = _runs_cfg(tmp_path, "exp_manager.version=shared")
    (tmp_path / "megatron_gpt" / "shared").mkdir(parents=True)
    (tmp_path / "megatron_gpt" / "shared" / ".lock").write_text("pid 999999 on host gone\n")  # a crashed run's
    first = ExpManager(cfg, 0)  # a stale lock file (no flock held) does not block
    try:
        with pytest.raises(ConfigError) as e:
            ExpManager(cfg, 0)
        msg = str(e.value)
        assert first.run_dir in msg and f"pid {os.getpid()}" in msg and "\n" not in msg
    finally:
        first.close()
    ExpManager(cfg, 0).close()  # released by close


def test_runs_lock_of_a_killed_run_is_not_stale(tmp_path):
    """The holder is SIGKILLed: the kernel releases its flock, the next run starts."""
    from megatron_ext.training.exp_manager import ExpManager

    cfg = _runs_cfg(tmp_path, "exp_manager.version=crashed")
    run_dir = tmp_path / "megatron_gpt" / "crashed"
    run_dir.mkdir(parents=True)
    code = ("import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write('pid %d' % os.getpid()); f.flush(); print('locked', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        from megatron_ext.errors import ConfigError

        with pytest.raises(ConfigError, match="in use by another run"):
            ExpManager(cfg, 0)
        p.kill()
        p.wait()
        ExpManager(cfg, 0).close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_runs_fresh_run_refused_beside_old_checkpoints_unless_overwrite(_runs_trained, tmp_path, caplog):
    from megatron_ext.errors import ConfigError
    from megatron_ext.training.exp_manager import ExpManager

    ckpts = _runs_copy(_runs_trained, tmp_path)
    with pytest.raises(ConfigError) as e:
        ExpManager(_runs_cfg(tmp_path, "exp_manager.version=v"), 0)
    msg = str(e.value)
    assert str(ckpts) in msg and "exp_manager.resume_if_exists=true" in msg and "exp_manager.overwrite=true" in msg
    assert sorted(os.listdir(ckpts)) == ["latest", "step_0000001", "step_0000002", "step_0000003"]  # untouched
    ExpManager(_runs_cfg(tmp_path, "exp_manager.version=v", "exp_manager.resume_if_exists=true"), 0).close()
    with caplog.at_level(logging.WARNING):
        ExpManager(_runs_cfg(tmp_path, "exp_manager.version=v", "exp_manager.overwrite=true"), 0).close()
    assert os.listdir(ckpts) == []  # no step of the earlier run survives beside the new run's
    assert "exp_manager.overwrite=true: deleted" in caplog.text and str(ckpts) in caplog.text


# ------------------------------------------------------------------------------ 6a. non-finite checkpoints
def test_runs_nonfinite_state_never_becomes_a_checkpoint(_runs_trained, tmp_path, caplog):
    from megatron_ext.errors import MegatronExtError

    _, corpus = _runs_trained
    with caplog.at_level(logging.WARNING), pytest.raises(MegatronExtError, match="loss is nan"):
        _runs_fit(tmp_path, corpus, "trainer.max_steps=3", "exp_manager.version=nan", "model.optim.lr=1e39",
                  "exp_manager.checkpoint_callback_params.every_n_train_steps=1")
    ckpts = tmp_path / "megatron_gpt" / "nan" / "checkpoints"
    assert os.listdir(ckpts) == []  # step 1's inf/nan weights were not saved, no 'latest'
    assert "step 1: not writing a checkpoint because" in caplog.text and "inf/nan" in caplog.text


# ------------------------------------------------------------------------------ 7. pruning fragments
def test_runs_incomplete_step_directories_older_than_latest_are_removed(_runs_trained, tmp_path):
    from megatron_ext.training.exp_manager import ExpManager

    ckpts = _runs_copy(_runs_trained, tmp_path)
    os.remove(ckpts / "step_0000001" / "meta.json")  # a prune killed mid-delete (old layout)
    shutil.copytree(ckpts / "step_0000002", ckpts / ".del-step_0000000")  # a prune killed mid-delete
    shutil.copytree(ckpts / "step_0000002", ckpts / ".tmp-step_0000002")  # a save killed before the rename
    (ckpts / ".tmp-step_0000009").mkdir()  # newer than latest: possibly being written, kept
    ExpManager(_runs_cfg(tmp_path, "exp_manager.version=v", "exp_manager.resume_if_exists=true"), 0).close()
    assert sorted(os.listdir(ckpts)) == [".tmp-step_0000009", "latest", "step_0000002", "step_0000003"]


def test_runs_prune_leaves_only_complete_checkpoints(_runs_trained, tmp_path):
    """save_top_k prunes through an atomic rename, and sweeps fragments an earlier kill left."""
    from megatron_ext.training.checkpointing import Checkpointer

    ckpts = _runs_copy(_runs_trained, tmp_path)
    os.remove(ckpts / "step_0000001" / "meta.json")
    Checkpointer(str(ckpts), save_top_k=1)._prune()
    assert sorted(os.listdir(ckpts)) == ["latest", "step_0000003"]


# ------------------------------------------------------------------------------ 11b. corrupt files, full disk
def _runs_truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("bad", ["rng_state_rank00000.pt", "mp_rank_00_model_states.pt", "meta.json"])
def test_runs_resume_falls_back_past_a_corrupt_latest(_runs_trained, tmp_path, caplog, bad):
    ckpts = _runs_copy(_runs_trained, tmp_path)
    path = ckpts / "step_0000003" / bad
    if bad == "meta.json":
        path.write_text('{"step": 3, "consum')
    else:
        _runs_truncate(path)
    with caplog.at_level(logging.INFO):
        res = _runs_fit(tmp_path, _runs_trained[1], "trainer.max_steps=3", "exp_manager.version=v",
                        "exp_manager.resume_if_exists=true",
                        "exp_manager.checkpoint_callback_params.every_n_train_steps=1")
    assert f"cannot resume from {ckpts / 'step_0000003'}: {path}" in caplog.text
    assert f"resumed from {ckpts / 'step_0000002'} at step 2" in caplog.text
    assert res["step"] == 3  # one step retrained, checkpoint 3 rewritten complete
    assert (ckpts / "latest").read_text() == "step_0000003"


def test_runs_no_loadable_checkpoint_is_one_clear_error(_runs_trained, tmp_path):
    from megatron_ext.errors import CheckpointError

    ckpts = _runs_copy(_runs_trained, tmp_path)
    for step in (1, 2, 3):
        _runs_truncate(ckpts / f"step_000000{step}" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError) as e:
        _runs_fit(tmp_path, _runs_trained[1], "trainer.max_steps=3", "exp_manager.version=v",
                  "exp_manager.resume_if_exists=true")
    msg = str(e.value)
    assert "no checkpoint in" in msg and "3 tried" in msg and "mp_rank_00_model_states.pt" in msg
    assert "\n" not in msg


def test_runs_disk_full_while_saving_names_the_path_and_keeps_latest(_runs_trained, tmp_path, monkeypatch):
    from megatron_ext.errors import CheckpointError
    from megatron_ext.training.gpt_task import GPTTask
    from megatron_ext.training.trainer import Trainer

    trainer = Trainer(_runs_cfg(tmp_path, "exp_manager.version=t", corpus=_runs_trained[1]), GPTTask)
    try:
        trainer._build()
        disk = tmp_path / "disk"
        with _tmpfs(disk) as mounted:
            ckpts = disk / "checkpoints"
            ckpts.mkdir()
            (ckpts / "latest").write_text("step_0000001")
            (ckpts / "step_0000001").mkdir()  # a complete previous checkpoint (meta.json marks it)
            (ckpts / "step_0000001" / "meta.json").write_text('{"step": 1, "consumed_samples": 2}')
            if not mounted:  # no tmpfs here: the write fails as on a full disk
                def full(*a, **k):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                monkeypatch.setattr(torch, "save", full)
            from megatron_ext.training.checkpointing import Checkpointer

            with pytest.raises(CheckpointError) as e:
                Checkpointer(str(ckpts)).save(trainer.engine, 2, 4, trainer._rng_states(), trainer._meta())
            msg = str(e.value)
            assert "the disk is full" in msg and str(ckpts / ".tmp-step_0000002") in msg
            assert "'latest' still names step_0000001" in msg
            assert (ckpts / "latest").read_text() == "step_0000001"
            assert sorted(os.listdir(ckpts)) == ["latest", "step_0000001"]  # no .tmp-step_* left
    finally:
        trainer.exp.close()


@pytest.mark.parametrize("stage", ["directory", "latest"])
def test_runs_failed_first_or_last_write_of_a_save_keeps_latest(_runs_trained, tmp_path, monkeypatch, stage):
    """The steps around the guarded writes: creating ``.tmp-step_N`` (a read-only checkpoints directory) and
    replacing ``latest`` (the disk full at that moment)."""
    from megatron_ext.errors import CheckpointError
    from megatron_ext.training import checkpointing
    from megatron_ext.training.gpt_task import GPTTask
    from megatron_ext.training.trainer import Trainer

    trainer = Trainer(_runs_cfg(tmp_path, f"exp_manager.version={stage}", corpus=_runs_trained[1]), GPTTask)
    try:
        trainer._build()
        ckpts = _runs_copy(_runs_trained, tmp_path / "copy")
        if stage == "latest":
            real_fsync = os.fsync

            def fsync(fd):  # a full disk often shows only here (delayed allocation)
                if os.readlink(f"/proc/self/fd/{fd}").startswith(str(ckpts / "latest.tmp.")):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                real_fsync(fd)

            monkeypatch.setattr(os, "fsync", fsync)
            ctx = contextlib.nullcontext(True)
        else:
            ctx = _tmpfs(ckpts, "ro")  # an empty read-only checkpoints directory over the copy
        with ctx as mounted:
            if not mounted:
                pytest.skip("mounting a read-only tmpfs is not permitted here")
            before = sorted(os.listdir(ckpts))
            with pytest.raises(CheckpointError) as e:
                checkpointing.Checkpointer(str(ckpts)).save(trainer.engine, 9, 18, trainer._rng_states(),
                                                           trainer._meta())
            msg = str(e.value)
            assert str(ckpts / (".tmp-step_0000009" if stage == "directory" else "step_0000009")) in msg, msg
            assert ("disk is full" in msg) if stage == "latest" else ("Read-only" in msg), msg
            assert sorted(os.listdir(ckpts)) == before  # no new step, no temporary file, latest unchanged
    finally:
        trainer.exp.close()

# ------------------------------------------------------------------- 11c. manifests: verify before load (issue 17)
def _runs_flip_byte(path):
    """Flip one byte in the middle of ``path``: the size and the zip directory stay intact."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


def test_runs_manifest_lists_every_file_with_its_checksum(_runs_trained, tmp_path):
    from megatron_ext.checkpoint.files import check_files
    from megatron_ext.checkpoint.manifest import config_hash

    ckpts = _runs_copy(_runs_trained, tmp_path)
    for step in (1, 2, 3):
        d = ckpts / f"step_000000{step}"
        man = json.loads((d / "manifest.json").read_text())
        meta = json.loads((d / "meta.json").read_text())
        on_disk = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != "manifest.json")
        assert sorted(man["files"]) == on_disk and "meta.json" in on_disk and "rng_state_rank00000.pt" in on_disk
        for rel, e in man["files"].items():
            data = (d / rel).read_bytes()
            assert e == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
        assert (man["step"], man["consumed_samples"], meta["manifest"]) == (step, 2 * step, "manifest.json")
        assert man["layout"] == {"tp": 1, "pp": 1, "dp": 1, "zero_stage": meta["zero_stage"], "precision": "32",
                                 "world_size": 1}
        assert man["config_hash"] == config_hash(meta["model_config"])
        assert check_files(str(d))["step"] == step
    # verify_checksums=false checks sizes and zip directories only: a flipped byte inside the data passes
    _runs_flip_byte(ckpts / "step_0000003" / "mp_rank_00_model_states.pt")
    assert check_files(str(ckpts / "step_0000003"), checksums=False)["step"] == 3
    with pytest.raises(CorruptCheckpointError, match=r"mp_rank_00_model_states\.pt is corrupt: its sha256"):
        check_files(str(ckpts / "step_0000003"))


def _runs_manifest_edit(d, edit):
    man = json.loads((d / "manifest.json").read_text())
    edit(man)
    (d / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize("bad", ["flipped byte", "missing file", "added file", "manifest missing",
                                 "manifest sizes tampered", "manifest names a path outside",
                                 "manifest names a NUL path"])
def test_runs_resume_verifies_latest_and_falls_back_naming_the_file(_runs_trained, tmp_path, caplog, bad):
    ckpts = _runs_copy(_runs_trained, tmp_path)
    d = ckpts / "step_0000003"
    named, why = {
        "flipped byte": (d / "mp_rank_00_model_states.pt", "is corrupt: its sha256"),
        "missing file": (d / "rng_state_rank00000.pt", "is missing (listed in"),
        "added file": (d / "extra.pt", "is not listed in"),
        "manifest missing": (d / "manifest.json", "is missing (meta.json says"),
        "manifest sizes tampered": (d / "meta.json", "is truncated or altered"),
        "manifest names a path outside": (d / "manifest.json", "is corrupt or tampered"),
        "manifest names a NUL path": (d / "manifest.json", "is corrupt or tampered"),
    }[bad]
    if bad == "flipped byte":
        _runs_flip_byte(named)
    elif bad in ("missing file", "manifest missing"):
        os.remove(named)
    elif bad == "added file":
        shutil.copy(d / "rng_state_rank00000.pt", named)
    elif bad == "manifest sizes tampered":
        _runs_manifest_edit(d, lambda m: m["files"]["meta.json"].update(size=m["files"]["meta.json"]["size"] + 1))
    elif bad == "manifest names a path outside":
        _runs_manifest_edit(d, lambda m: m["files"].update({"../step_0000002/meta.json": m["files"]["meta.json"]}))
    else:
        _runs_manifest_edit(d, lambda m: m["files"].update({"meta.json\x00x": m["files"]["meta.json"]}))
    with caplog.at_level(logging.INFO):
        res = _runs_fit(tmp_path, _runs_trained[1], "trainer.max_steps=3", "exp_manager.version=v",
                        "exp_manager.resume_if_exists=true",
                        "exp_manager.checkpoint_callback_params.every_n_train_steps=1")
    assert f"cannot resume from {d}: {named} {why}" in caplog.text, caplog.text[-3000:]
    assert f"resumed from {ckpts / 'step_0000002'} at step 2" in caplog.text
    assert "the model config differs" not in caplog.text  # same config: same hash, no line
    assert res["step"] == 3 and (ckpts / "latest").read_text() == "step_0000003"
    from megatron_ext.checkpoint.files import check_files

    check_files(str(d))  # rewritten complete, with a manifest that verifies


def test_runs_checkpoint_written_before_manifests_loads_with_one_warning(_runs_trained, tmp_path, caplog):
    ckpts = _runs_copy(_runs_trained, tmp_path)
    d = ckpts / "step_0000003"
    os.remove(d / "manifest.json")  # as an older version wrote it: no manifest, no "manifest" key in meta.json
    meta = json.loads((d / "meta.json").read_text())
    del meta["manifest"]
    (d / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.INFO):
        res = _runs_fit(tmp_path, _runs_trained[1], "trainer.max_steps=4", "exp_manager.version=v",
                        "exp_manager.resume_if_exists=true", "model.optim.lr=3e-4")
    assert caplog.text.count("was written before checkpoint manifests") == 1
    assert f"{d} was written before checkpoint manifests (no manifest.json): its files are not verified" \
        in caplog.text
    assert f"resumed from {d} at step 3" in caplog.text and res["step"] == 4
    assert "the model config differs" not in caplog.text  # no manifest, no recorded hash to compare
    assert sorted(os.listdir(ckpts)) == ["latest", "step_0000001", "step_0000002", "step_0000003", "step_0000004"]


def test_runs_resume_with_another_config_names_what_changed(_runs_trained, tmp_path, caplog):
    ckpts = _runs_copy(_runs_trained, tmp_path)
    with caplog.at_level(logging.INFO):
        _runs_fit(tmp_path, _runs_trained[1], "trainer.max_steps=4", "exp_manager.version=v",
                  "exp_manager.resume_if_exists=true", "model.optim.lr=3e-4", "model.hidden_dropout=0.0")
    line = next(ln for ln in caplog.text.splitlines() if "the model config differs" in ln)
    assert str(ckpts / "step_0000003") in line and "model.hidden_dropout: 0.1 -> 0.0" in line
    assert "model.optim.lr: 0.001 -> 0.0003" in line and "model.num_layers" not in line


def test_runs_offline_readers_refuse_a_corrupt_checkpoint_naming_the_file(_runs_trained, tmp_path):
    from megatron_ext.checkpoint.consolidated import consolidate_checkpoint
    from megatron_ext.checkpoint.loader import load_model

    ckpts = _runs_copy(_runs_trained, tmp_path)
    assert consolidate_checkpoint(str(ckpts / "step_0000002"))["step"] == 2
    bad = ckpts / "step_0000003" / "mp_rank_00_model_states.pt"
    _runs_flip_byte(bad)
    for read in (consolidate_checkpoint, load_model):
        with pytest.raises(CorruptCheckpointError, match=rf"^{bad} is corrupt: its sha256"):
            read(str(ckpts.parent))  # the run directory: its latest


def test_runs_failed_manifest_write_never_reaches_latest(_runs_trained, tmp_path, monkeypatch):
    """The manifest is the last write of a save: when it fails (the disk full at its fsync) no ``step_N`` and no
    ``latest`` name the unverified checkpoint."""
    from megatron_ext.training import checkpointing
    from megatron_ext.training.gpt_task import GPTTask
    from megatron_ext.training.trainer import Trainer

    trainer = Trainer(_runs_cfg(tmp_path, "exp_manager.version=m", corpus=_runs_trained[1]), GPTTask)
    try:
        trainer._build()
        ckpts = _runs_copy(_runs_trained, tmp_path / "copy")
        real_fsync = os.fsync

        def fsync(fd):
            if "/manifest.json.tmp." in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        before = sorted(os.listdir(ckpts))
        with pytest.raises(CheckpointError, match=r"disk is full.*'latest' still names step_0000003"):
            checkpointing.Checkpointer(str(ckpts)).save(trainer.engine, 9, 18, trainer._rng_states(),
                                                       trainer._meta())
        assert sorted(os.listdir(ckpts)) == before and (ckpts / "latest").read_text() == "step_0000003"
    finally:
        trainer.exp.close()


def test_runs_exp_dir_that_is_a_file_is_one_line(tmp_path, run_env):
    from megatron_ext.errors import ConfigError
    from megatron_ext.training.exp_manager import ExpManager

    f = tmp_path / "not_a_dir"
    f.write_text("x")
    with pytest.raises(ConfigError, match=f"exp_manager.exp_dir=.*{f} is a file, expected a directory"):
        ExpManager(_runs_cfg(f), 0)
    with pytest.raises(ConfigError, match="is a file"):
        ExpManager(_runs_cfg(f, "exp_manager.version=v"), 0)
    r = run_script(["pretrain_gpt.py", *_RUNS_TINY, f"exp_manager.exp_dir={f}", "trainer.max_steps=1"], run_env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{f} is a file, expected a directory" in r.stderr


######################################################################################################################
# 3. Every accepted key does something; config errors before any process starts (items 6, 8, 9, 11)
#
# Bad inputs, config part: every accepted key does something, and a bad config fails before any process starts
# with one line and the documented exit status (2).
######################################################################################################################

_CFG_TINY = [*TINY_GPT, "trainer.val_check_interval=0"]
_CFG_YAML = os.path.join(REPO, "configs", "gpt", "megatron_gpt_config.yaml")


def _cfg_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _cfg_lrs(run_dir):
    return {r["step"]: r["train/lr"] for r in _cfg_metrics(run_dir) if "train/lr" in r}


def _cfg_bad(run_env, *args):
    """Run pretrain_gpt.py with a bad config: it must exit 2 with one ``error:`` line and start no worker."""
    r = run_script(["pretrain_gpt.py", *_CFG_TINY, *args], run_env, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "[launch] starting" not in r.stderr, r.stderr[-2000:]
    return r.stderr


# ----------------------------------------------------------------------------------- 6b: resume with a new config
def test_cfg_resume_with_new_lr_and_schedule_takes_effect(run_env, tmp_path):
    common = [*_CFG_TINY, "trainer.max_steps=4", f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=r",
              "model.optim.sched.warmup_ratio=0", "exp_manager.checkpoint_callback_params.every_n_train_steps=2"]
    r = run_script(["pretrain_gpt.py", *common, "model.optim.lr=1e-2", "model.optim.sched.min_lr=1e-3",
                    "trainer.limit_train_batches=2"], run_env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script(["pretrain_gpt.py", *common, "model.optim.lr=1e-3", "model.optim.sched.min_lr=1e-4",
                    "exp_manager.resume_if_exists=true"], run_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model.optim.lr: 0.01 -> 0.001" in r.stderr, r.stderr[-3000:]
    assert "model.optim.sched.min_lr: 0.001 -> 0.0001" in r.stderr, r.stderr[-3000:]
    lrs = _cfg_lrs(tmp_path / "megatron_gpt" / "r")
    assert lrs[1] == pytest.approx(1e-2)  # the first run
    import math

    for step in (3, 4):  # cosine from the new lr to the new min_lr over 4 steps; lr(s) logged at step s + 1
        s = step - 1
        want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * s / 4))
        assert lrs[step] == pytest.approx(want, rel=1e-6), (step, lrs)


# ------------------------------------------------------------------------------- 8: removed optimizer keys stay out
def test_cfg_removed_sched_key_stays_removed_through_hydra():
    from hydra import compose, initialize_config_dir

    from megatron_ext.config.loader import check_schema, register_schemas
    from megatron_ext.config.schema import GPTConfig

    register_schemas()
    with initialize_config_dir(config_dir=os.path.dirname(_CFG_YAML), version_base=None):
        cfg = compose(config_name="megatron_gpt_config", overrides=["~model.optim.sched", "~model.optim.betas"])
    checked = check_schema(cfg, GPTConfig)
    assert "sched" not in checked.model.optim and "betas" not in checked.model.optim


def test_cfg_switch_to_sgd_and_constant_schedule():
    import torch

    from megatron_ext.config.loader import check_schema, load_config
    from megatron_ext.config.schema import GPTConfig
    from megatron_ext.training.lr_schedulers import ConstantPolicy, build_scheduler
    from megatron_ext.training.optim import build_optimizer

    model = torch.nn.Linear(2, 2)
    for overrides in (["model.optim={name: sgd, lr: 0.1, sched: {name: constant}}"],
                      ["~model.optim.betas", "model.optim.name=sgd", "model.optim.sched={name: constant}"]):
        cfg = check_schema(load_config(GPTConfig, _CFG_YAML, overrides), GPTConfig)
        opt = build_optimizer(model, cfg.model.optim)
        assert isinstance(opt, torch.optim.SGD), overrides
        assert isinstance(build_scheduler(opt, cfg.model.optim.sched, 10), ConstantPolicy)
    # a YAML that names sgd and no betas: SGD's own defaults, nothing merged from the schema
    y = OmegaConf.load(_CFG_YAML)
    y.model.optim = {"name": "sgd", "lr": 0.1}
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"cfg_sgd_{os.getpid()}.yaml")
    OmegaConf.save(y, path)
    try:
        cfg = check_schema(load_config(GPTConfig, path), GPTConfig)
    finally:
        os.remove(path)
    assert dict(cfg.model.optim) == {"name": "sgd", "lr": 0.1}
    assert isinstance(build_optimizer(model, cfg.model.optim), torch.optim.SGD)


def test_cfg_sgd_dict_override_on_the_command_line(run_env, tmp_path):
    r = run_script(["pretrain_gpt.py", *_CFG_TINY, "trainer.max_steps=1", f"exp_manager.exp_dir={tmp_path}",
                    "exp_manager.version=s", "model.optim={name: sgd, lr: 0.05, sched: {name: constant}}"], run_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _cfg_lrs(tmp_path / "megatron_gpt" / "s") == {1: pytest.approx(0.05)}


# ------------------------------------------------------------------------------------- 9: no accepted no-op keys
# (model.data.reset_attention_mask works now; where it cannot -- Mega, synthetic tasks, document_attention without
# it -- the refusals are checked in process: tests/unit/test_docmask.py::test_config_refusals)


# ---------------------------------------------------------------------- 11c: one line, exit 2, before any process
def test_cfg_dist_timeout_must_be_positive(run_env):
    assert "trainer.dist_timeout_minutes" in _cfg_bad(run_env, "trainer.dist_timeout_minutes=0")


def test_cfg_tp_not_dividing_heads_fails_before_workers_start(run_env):
    err = _cfg_bad(run_env, "trainer.devices=2", "model.tensor_model_parallel_size=2", "model.num_attention_heads=1",
                   "model.hidden_size=64")
    assert "model.num_attention_heads=1" in err and "tensor_model_parallel_size=2" in err


@pytest.mark.parametrize("override", ["model.hiden_size=64", "model.hidden_size=[64"])
def test_cfg_hydra_config_errors_exit_2(run_env, override):
    r = run_script(["pretrain_gpt.py", override], run_env, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])


######################################################################################################################
# 4. Tools never destroy inputs; no silent wait on a build lock; clear data errors (items 5, 10, 11)
#
# Bad inputs to the tools and builds: no silent hangs on a dead builder's lock, tools never destroy their inputs
# or replace existing outputs unasked, and write / empty-data failures are one clear line.
#
# Each test fails on the code before issue 15 (an input overwritten with rc 0, a run waiting forever on a
# ``lock`` file, a traceback, or an empty dataset reported as "multimodal").
######################################################################################################################

def _tools_import(name):
    """The module behind ``tools/<name>.py`` (its code lives in ``megatron_ext.cli``)."""
    import importlib

    return importlib.import_module(f"megatron_ext.cli.{name}")


def _tools_preprocess(capsys, *args):
    pre = _tools_import("preprocess_data")
    rc = pre.main([*map(str, args), "--workers", "1", "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def _tools_env(**extra):
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # (left by an in-process run)
        env.pop(k, None)
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
@pytest.mark.parametrize("case", ["read_only", "disk_full"])
def test_tools_preprocess_unwritable_output_is_one_line(tmp_path, capsys, monkeypatch, case):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"document number {i} " * 30 + "\n" for i in range(400)))  # ~250 kB
    out = tmp_path / "out"
    options = "size=1m,ro" if case == "read_only" else "size=64k"
    with _tmpfs(out, options) as mounted:
        if not mounted:  # no permission to mount: inject the error at the write of the .bin
            import builtins

            code = errno.EROFS if case == "read_only" else errno.ENOSPC
            real_open = builtins.open

            def failing_open(file, *a, **k):
                if str(file).endswith(".bin.tmp"):
                    raise OSError(code, os.strerror(code), str(file))
                return real_open(file, *a, **k)

            monkeypatch.setattr(builtins, "open", failing_open)
        rc, _, err = _tools_preprocess(capsys, "--input", corpus, "--output-prefix", out / "c")
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert str(out / "c_text_document.bin") in err
        assert ("read-only" in err) if case == "read_only" else ("disk full" in err)
        assert os.listdir(out) == []  # no partial .bin/.idx, temporary or final


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


_TOOLS_DS_SCRIPTS = {
    # deepspeed.initialize (every training run)
    "engine": """
import torch
from megatron_ext.parallel.state import initialize_parallel
from megatron_ext.training.engine import build_engine
initialize_parallel(accelerator="cpu")
m = torch.nn.Linear(4, 4)
engine, _, _ = build_engine(m, torch.optim.SGD(m.parameters(), lr=0.1), None,
                            {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1})
print("BUILT", type(engine).__name__, flush=True)
""",
    # deepspeed.init_distributed of the pipeline builder (runs before deepspeed.initialize)
    "pipeline": """
from megatron_ext.config.schema import ModelConfig
from megatron_ext.models.gpt_pipe import build_gpt_pipeline
from megatron_ext.parallel.state import initialize_parallel
initialize_parallel(accelerator="cpu")
m = build_gpt_pipeline(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16), 64,
                       init_seed=1)
print("BUILT", type(m).__name__, flush=True)
""",
}


@pytest.mark.parametrize("path", sorted(_TOOLS_DS_SCRIPTS))
def test_tools_deepspeed_cpu_init_does_not_build_the_shm_op(tmp_path, path):
    """A killed build of DeepSpeed's deepspeed_shm_comm op leaves its lock; CPU training does not need the op, on
    any path that hands the world to DeepSpeed."""
    ext = tmp_path / "torch_extensions"
    (ext / "deepspeed_shm_comm").mkdir(parents=True)
    (ext / "deepspeed_shm_comm" / "lock").touch()
    try:
        r = subprocess.run([sys.executable, "-c", _TOOLS_DS_SCRIPTS[path]], capture_output=True, text=True,
                           timeout=150, env=_tools_env(TORCH_EXTENSIONS_DIR=str(ext), DS_ACCELERATOR="cpu",
                                                       CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"deepspeed init waited on {ext / 'deepspeed_shm_comm' / 'lock'} without end")
    assert r.returncode == 0 and "BUILT" in r.stdout, r.stderr[-2000:]
    assert os.listdir(ext / "deepspeed_shm_comm") == ["lock"]  # not built at all
_TOOLS_CPU_ADAM_SCRIPT = """
import torch
from megatron_ext.training.optim import build_optimizer
opt = build_optimizer(torch.nn.Linear(4, 4), {"name": "cpu_adam", "lr": 0.01})
print("OPTIMIZER", type(opt).__name__, flush=True)
"""


def test_tools_deepspeed_op_build_does_not_wait_on_a_dead_builders_lock(prebuilt_ops):
    """A killed JIT build of DeepSpeed's cpu_adam op leaves torch's ``lock`` in its build directory; building the
    optimizer later must not wait on it forever (before: no output, no end). Runs in the suite's own
    TORCH_EXTENSIONS_DIR, so the op it builds is the one the optimizer tests use."""
    from megatron_ext.kernels import torch_extension_lock
    from megatron_ext.training.optim import AVAILABLE_OPTIMIZERS

    if "cpu_adam" not in AVAILABLE_OPTIMIZERS:
        pytest.skip("DeepSpeed's cpu_adam op cannot be built here")
    lock = torch_extension_lock("cpu_adam").directory / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()  # as a build killed between creating the lock and removing it leaves it
    try:
        r = subprocess.run([sys.executable, "-c", _TOOLS_CPU_ADAM_SCRIPT], capture_output=True, text=True,
                           timeout=480, env=_tools_env(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES=""))
    except subprocess.TimeoutExpired:
        pytest.fail(f"building cpu_adam waited on {lock} without end")
    finally:
        lock.unlink(missing_ok=True)
    assert r.returncode == 0 and "OPTIMIZER DeepSpeedCPUAdam" in r.stdout, r.stderr[-2000:]
    assert f"removing {lock}, left by a build that did not finish" in r.stderr


######################################################################################################################
# 5. An exported Hugging Face tokenizer gives exactly the training ids (item 12)
#
# Bad inputs for the Hugging Face export (issue 15, item 12): text that spells a control / special piece
# literally (``<unk>``, ``<s>``, ``</s>``, ``<pad>``, ``<eod>``, byte pieces ``<0x41>``, user-defined symbols) must
# encode to the training ids through both ``tokenizers.Tokenizer.from_file`` and ``AutoTokenizer`` with their
# defaults, and an export whose tokenizer would still differ on the training text is refused (exit 2).
######################################################################################################################

_HF_LITERALS = ["<unk>", "<s>", "</s>", "<pad>", "<mask>", "<eod>", "<bos>", "<0x41>", "<0x0A>", "▁</s>"]


def _hf_corpus_lines(n=1500):
    """Corpus lines (tinyshakespeare when ../shared has it, else the built-in corpus) with a literal control piece
    inserted into two lines of three (at word boundaries and glued to words)."""
    if os.path.isfile(SHARED_DATA):
        with open(SHARED_DATA, encoding="utf-8") as f:
            base = [line.strip() for line in f if line.strip()]
    else:
        from megatron_ext.data.default_corpus import corpus_documents

        base = [" ".join(p.split()) for d in corpus_documents() for p in d.split("\n") if p.strip()]
    rnd = random.Random(0)
    out = []
    for i, line in enumerate(base[:n]):
        words = line.split()
        if i % 3 != 2 and words:
            sym, k = rnd.choice(_HF_LITERALS), rnd.randrange(len(words))
            if i % 2:
                words.insert(k, sym)
            else:
                words[k] += sym
        out.append(" ".join(words))
    return out


@pytest.fixture(scope="module")
def _hf_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_corpus") / "train.txt"
    lines = _hf_corpus_lines()
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path), lines


def _hf_tokenizer(kind, corpus_path, tmp_path):
    from megatron_ext.tokenizers import SentencePieceTokenizer, build_tokenizer, train_sentencepiece

    if kind in ("byte", "char"):
        return build_tokenizer(kind)
    model_type, opts = {"sp-unigram": ("unigram", {}), "sp-bpe": ("bpe", {}), "sp-char": ("char", {}),
                        "sp-unigram-bytes": ("unigram", {"byte_fallback": True}),
                        "sp-unigram-mask": ("unigram", {"extra_options": {"user_defined_symbols": ["<mask>"]}}),
                        "sp-bpe-mask": ("bpe", {"extra_options": {"user_defined_symbols": ["<mask>"]}})}[kind]
    path = train_sentencepiece(str(tmp_path / kind), 400, input_files=[corpus_path], model_type=model_type,
                               **opts)
    return SentencePieceTokenizer(path)


def _hf_consolidated(vocab):
    cfg = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=16, hidden_dropout=0.0,
                      attention_dropout=0.0, make_vocab_size_divisible_by=8)
    return consolidated_from_model(GPTModel(cfg, vocab, init_seed=0).eval())


@pytest.mark.parametrize("kind", ["byte", "char", "sp-unigram", "sp-bpe", "sp-char", "sp-unigram-bytes",
                                  "sp-unigram-mask"])
@pytest.mark.usefixtures("tp1_one_thread")
def test_hf_literal_control_pieces_encode_to_training_ids(tmp_path, _hf_corpus, kind):
    """Every corpus line (two in three spell a control piece) gets our ids from tokenizer.json and from
    AutoTokenizer (defaults), and our ids decode to our text through both."""
    import warnings

    corpus_path, lines = _hf_corpus
    ours = _hf_tokenizer(kind, corpus_path, tmp_path)
    out = tmp_path / "hf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_to_hf(_hf_consolidated(ours.vocab_size), str(out), tokenizer=ours)
    raw = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    auto.model_max_length = 1 << 40
    checked, bad_raw, bad_auto, bad_decode = 0, [], [], []
    for line in lines + _HF_LITERALS + ["".join(_HF_LITERALS), " ".join(_HF_LITERALS)]:
        try:
            ids = ours.tokenize(line)
        except DataError:  # the char tokenizer's unknown characters
            continue
        checked += 1
        if raw.encode(line, add_special_tokens=False).ids != ids:
            bad_raw.append(line)
        if auto(line, add_special_tokens=False)["input_ids"] != ids:
            bad_auto.append(line)
        if auto.decode(ids) != ours.detokenize(ids) or raw.decode(ids) != ours.detokenize(ids):
            bad_decode.append(line)
    assert checked > 1000
    assert not bad_raw, f"tokenizers: {len(bad_raw)} of {checked} lines differ, e.g. {bad_raw[:2]}"
    assert not bad_auto, f"AutoTokenizer: {len(bad_auto)} of {checked} lines differ, e.g. {bad_auto[:2]}"
    assert not bad_decode, f"decode: {len(bad_decode)} of {checked} lines differ, e.g. {bad_decode[:2]}"
    # the special pieces are still known by name and skipped when asked
    assert (auto.eos_token_id, auto.pad_token_id) == (ours.eod, ours.pad)
    assert auto.decode(ours.tokenize("hi") + [ours.eod, ours.pad], skip_special_tokens=True) == \
        ours.detokenize(ours.tokenize("hi"))


def _hf_cli(capsys, *argv):
    rc = convert_to_hf.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _hf_pt(tmp_path, ours):
    from megatron_ext.checkpoint.consolidated import FORMAT, save_consolidated

    obj = _hf_consolidated(ours.vocab_size)
    obj["model_config"]["tokenizer"] = {"library": "sentencepiece", "model": ours.model_path}
    obj.update(format=FORMAT, source={"path": "test"}, step=3)
    save_consolidated(obj, str(tmp_path / "m.pt"))
    return str(tmp_path / "m.pt")


@pytest.mark.usefixtures("tp1_one_thread")
def test_hf_export_refuses_a_tokenizer_that_differs_on_the_training_text(tmp_path, capsys):
    """A sentencepiece bpe model with a user-defined symbol: a line where the symbol is glued to a literal control
    piece (``<mask></s>``) is still cut differently by tokenizers' BPE (the piece after the symbol is a whole
    vocabulary entry). The export checks the tokenizer's own training text by default and refuses, naming the
    line and both id lists; nothing is written. --allow-tokenizer-mismatch exports and counts the lines."""
    from megatron_ext.tokenizers import SentencePieceTokenizer, train_sentencepiece

    lines = _hf_corpus_lines(600)
    lines[123] = "a line with <mask></s> glued"
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = train_sentencepiece(str(tmp_path / "bpe"), 400, input_files=[str(corpus)], model_type="bpe",
                               extra_options={"user_defined_symbols": ["<mask>"]})
    ours = SentencePieceTokenizer(path)
    pt = _hf_pt(tmp_path, ours)
    out = tmp_path / "hf"
    rc, _, err = _hf_cli(capsys, "--input", pt, "--output", str(out))
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{corpus}:124" in err and "'a line with <mask></s> glued'" in err
    assert "ours [" in err and "vs Hugging Face [" in err and "--allow-tokenizer-mismatch" in err
    assert not out.exists() or not os.listdir(out)
    # an explicit --verify-text is checked too
    other = tmp_path / "other.txt"
    other.write_text("fine line\nsay <mask></s> here\n", encoding="utf-8")
    os.remove(str(corpus))
    rc, _, err = _hf_cli(capsys, "--input", pt, "--output", str(out), "--verify-text", str(other))
    assert rc == 2 and f"{other}:2" in err
    rc, out_text, err = _hf_cli(capsys, "--input", pt, "--output", str(out), "--verify-text", str(other),
                                "--allow-tokenizer-mismatch")
    assert rc == 0, err
    assert "encodes 1 of" in err and "NOT exact on 1 of" in out_text
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


@pytest.mark.usefixtures("tp1_one_thread")
def test_hf_export_checks_the_training_text_by_default(tmp_path, capsys, _hf_corpus):
    """Without --verify-text the sentencepiece model's recorded training input is sampled; the summary says so."""
    corpus_path, lines = _hf_corpus
    ours = _hf_tokenizer("sp-unigram", corpus_path, tmp_path)
    rc, out, err = _hf_cli(capsys, "--input", _hf_pt(tmp_path, ours), "--output", str(tmp_path / "hf"))
    assert rc == 0, err
    assert corpus_path in out
    from megatron_ext.inference.hf_export import PROBE_TEXTS

    n = int(out.split("tokenizer exact on ")[1].split(" ")[0])
    assert n >= len(PROBE_TEXTS) + len(lines)

"""Bad inputs, security part: loading a received file never runs its code or writes outside its place.

- every reader of ``.pt`` files (consolidated checkpoints, checkpoint directories through DeepSpeed or
  zero_to_fp32, RNG states, latents) refuses a pickle that would run code, naming the file; the payload (it would
  create a marker file) never runs;
- a ``.mext`` archive is checked against its manifest before any member is written: a sparse member declaring far
  more than it stores, a member absent from the manifest or of another size is refused with nothing written;
- every path in the manifest (``tokenizer.file`` included) is a checked member of the archive;
- a truncated archive is one clear error naming the file.
"""
import hashlib
import io
import json
import os
import tarfile

import pytest
import torch

from conftest import REPO, run_script

from megatron_ext.errors import CheckpointError


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
    from megatron_ext.training.consolidated import consolidate_checkpoint, read_consolidated

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
    from megatron_ext.training.archive import write_archive

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
    from megatron_ext.training.archive import extract_archive

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
    from megatron_ext.training.archive import extract_archive

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
    from megatron_ext.training.archive import read_archive

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
    from megatron_ext.training.archive import read_archive

    path, _ = _sec_archive(tmp_path)
    data = open(path, "rb").read()
    for cut in (len(data) // 2, 700):
        bad = tmp_path / f"cut{cut}.mext"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=rf"cut{cut}\.mext: truncated or corrupt \.mext archive"):
            read_archive(str(bad), str(tmp_path / f"d{cut}"))

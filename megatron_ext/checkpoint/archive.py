"""``.mext`` archives: one file that restores a trained model -- weights, config and tokenizer -- on any layout.

    save_to(model, "gpt.mext", tokenizer=..., config=...)   # any TP / PP / ZeRO layout (collective when split)
    contents = read_archive("gpt.mext")                      # weights, config, tokenizer file, manifest
    python tools/export_archive.py --input experiments/megatron_gpt/<version> --output gpt.mext

This module knows the file format only; building a model from an archive is ``megatron_ext.checkpoint.loader``
(``load_model``), and ``megatron_ext.inference.lm.LM.restore_from`` wraps that model for sampling and scoring.

Format: an uncompressed tar with exactly these members::

    manifest.json       {"format": "megatron_ext.archive.v1", "family": "gpt"|"encdec"|"mega", "vocab_size",
                         "created", "versions": {megatron_ext, torch, megatron_core, python},
                         "tokenizer": {"library", "file": "tokenizer/<name>" or null},
                         "files": {member: {"sha256", "bytes"}}, "source": {...}}
    config.yaml         the resolved run config (trainer / exp_manager / model); model.tokenizer.model names the
                        archive member, not a path on the machine that wrote it
    model_weights.pt    {name: full fp32 tensor}: the model's state dict with every tensor-parallel shard
                        gathered (megatron-core's partition_dim / partition_stride), ZeRO-3 partitions gathered,
                        pipeline stages merged under the plain model's names, vocabulary rows trimmed to
                        vocab_size (padding rows are never used: the logits mask them)
    tokenizer/<file>    the tokenizer model file (sentencepiece), when the tokenizer has one; a Hugging Face
                        tokenizer (library huggingface) travels as tokenizer/tokenizer.json (the manifest's
                        tokenizer.file) with the tokenizer_config.json / special_tokens_map.json it was read with

Reading is defensive: the manifest is read first (size-capped) and every member header is checked against it
before anything is written (no absolute paths, no ``..``, regular files only -- no sparse files, links or devices --,
nothing outside the list above or absent from the manifest, no duplicates, each declared size equal to the
manifest's ``bytes``); members are then written by us into a fresh temporary directory (never ``extractall``) with
a running byte cap, hashed as they are written and checked against the manifest's SHA-256. Every path the manifest
names (``files``, ``tokenizer.file``) is such a checked member. The weights are read by
``megatron_ext.checkpoint.safe_load`` -- a pickle that would run code is refused, with a message naming the file.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import platform
import posixpath
import shutil
import tarfile
import tempfile
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state as ps
from omegaconf import DictConfig, OmegaConf

from megatron_ext.checkpoint.consolidated import merge_shards, shard_of
from megatron_ext.checkpoint.safe_load import load_untrusted
from megatron_ext.errors import CheckpointError, ConfigError
from megatron_ext.models.families import FAMILIES, family_of_model
from megatron_ext.models.gpt_pipe import canonical_name
from megatron_ext.modules.common import tp_group, tp_rank, tp_world_size
from megatron_ext.output_files import write_error
from megatron_ext.tokenizers.huggingface import hf_tokenizer_files

FORMAT = "megatron_ext.archive.v1"
MANIFEST, CONFIG, WEIGHTS, TOKENIZER_DIR = "manifest.json", "config.yaml", "model_weights.pt", "tokenizer"
VOCAB_SUFFIXES = ("word_embeddings.weight", "output_layer.weight", "output_layer.bias")


# ----------------------------------------------------------------------------------------------- helpers
def _versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("megatron_ext", "megatron-core", "deepspeed"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _unwrap(model):
    """The DeepSpeed engine (or any ``.module`` wrapper) -> the model."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), torch.nn.Module):
        model = model.module
    return model


def _is_vocab_partitioned(name: str) -> bool:
    return name.endswith(VOCAB_SUFFIXES)


def _tp():
    """(TP rank, TP size, TP group); a plain single-process model (no parallel state set up) is (0, 1, None)."""
    if not ps.model_parallel_is_initialized():
        return 0, 1, None
    return tp_rank(), tp_world_size(), tp_group()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain(config) -> Dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return json.loads(json.dumps(config))  # a deep copy that fails loudly on non-plain values


# ----------------------------------------------------------------------------------------------- gathering
def gather_full_state_dict(model) -> Dict[str, torch.Tensor]:
    """The whole model as ``{name: full fp32 CPU tensor}`` from this process's part of it.

    Collective when the model is split: every tensor-parallel rank (and, for a pipeline, every stage; with ZeRO-3,
    every data-parallel rank) must call it. Tensor-parallel shards are merged along megatron-core's
    ``partition_dim`` / ``partition_stride`` attributes, so any of our model families works without a name table.
    Vocabulary-partitioned matrices are trimmed to ``model.vocab_size`` rows.
    """
    model = _unwrap(model)
    rank, world, group = _tp()
    zero3 = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if zero3:
        import deepspeed  # start-up cost: only a ZeRO-3 model needs it

        ctx = deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)
    else:
        ctx = contextlib.nullcontext()
    vocab = int(getattr(model, "vocab_size"))
    out: Dict[str, torch.Tensor] = {}
    with ctx, torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name.endswith("_extra_state") or not isinstance(t, torch.Tensor):
                continue
            full = t.detach()
            if world > 1 and getattr(t, "tensor_model_parallel", False):
                shards = [torch.empty_like(full) for _ in range(world)]
                dist.all_gather(shards, full.contiguous(), group=group)
                full = merge_shards([s.cpu() for s in shards], int(t.partition_dim), int(t.partition_stride))
            full = full.to("cpu", torch.float32 if full.is_floating_point() else full.dtype).clone()
            if _is_vocab_partitioned(name):
                full = full[:vocab].clone()
            out[name] = full
    if getattr(model, "is_pipeline", False):
        out = _merge_pipeline_stages(model, out)
    return out


def _merge_pipeline_stages(model, stage_sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    num_layers = int(model.num_layers) if hasattr(model, "num_layers") else int(model.cfg.num_layers)
    mine = {}
    for k, v in stage_sd.items():
        c = canonical_name(k, num_layers)
        if c is not None and c not in mine:
            mine[c] = v
    parts = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(parts, mine, group=ps.get_pipeline_model_parallel_group())
    merged: Dict[str, torch.Tensor] = {}
    for part in parts:
        for k, v in part.items():
            merged.setdefault(k, v)
    return merged


# ----------------------------------------------------------------------------------------------- writing
def _tokenizer_file(tokenizer, config: Dict[str, Any]) -> Optional[str]:
    path = ((config.get("model") or {}).get("tokenizer") or {}).get("model")
    if path:
        return str(path)
    return getattr(tokenizer, "model_path", None)


def write_archive(path: str, *, state_dict: Dict[str, torch.Tensor], config: Dict[str, Any], family: str,
                  vocab_size: int, tokenizer_library: str, tokenizer_file: Optional[str] = None,
                  source: Optional[Dict[str, Any]] = None) -> str:
    """Write a ``.mext`` archive from already-gathered weights (one process). Atomic: a temp name, then rename."""
    if family not in FAMILIES:
        raise CheckpointError(f"family={family!r}: expected one of {', '.join(FAMILIES)}")
    if not str(path).endswith(".mext"):
        raise CheckpointError(f"{path}: an archive path must end in .mext")
    config = _plain(config)
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".mext-") as tmp:
        members = {}
        tok_member = None
        if tokenizer_file and str(tokenizer_library).strip().lower() == "huggingface":
            # a Hugging Face tokenizer: tokenizer.json (the manifest's tokenizer.file) and the config files beside it
            try:
                main, extra = hf_tokenizer_files(tokenizer_file)
            except ConfigError as e:
                raise CheckpointError(f"{e} (the archive must carry the tokenizer the model was trained with)") \
                    from None
            for k, src in enumerate([main] + extra):
                member = posixpath.join(TOKENIZER_DIR, os.path.basename(src))
                shutil.copyfile(src, os.path.join(tmp, f"tok{k}"))
                members[member] = os.path.join(tmp, f"tok{k}")
                tok_member = tok_member or member
        elif tokenizer_file:
            if not os.path.isfile(tokenizer_file):
                raise CheckpointError(f"model.tokenizer.model={tokenizer_file}: file not found (the archive must "
                                      f"carry the tokenizer the model was trained with)")
            tok_member = posixpath.join(TOKENIZER_DIR, os.path.basename(tokenizer_file))
            shutil.copyfile(tokenizer_file, os.path.join(tmp, "tok"))
            members[tok_member] = os.path.join(tmp, "tok")
        config.setdefault("model", {}).setdefault("tokenizer", {})
        config["model"]["tokenizer"]["library"] = tokenizer_library
        config["model"]["tokenizer"]["model"] = tok_member
        config["model"]["ckpt_path"] = None
        cfg_path = os.path.join(tmp, CONFIG)
        with open(cfg_path, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        members[CONFIG] = cfg_path
        w_path = os.path.join(tmp, WEIGHTS)
        torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, w_path)
        members[WEIGHTS] = w_path
        manifest = {
            "format": FORMAT,
            "family": family,
            "vocab_size": int(vocab_size),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            "tokenizer": {"library": tokenizer_library, "file": tok_member},
            "files": {m: {"sha256": _sha256(p), "bytes": os.path.getsize(p)} for m, p in members.items()},
            "source": source or {},
        }
        tmp_tar = os.path.join(tmp, "archive.tar")
        with tarfile.open(tmp_tar, "w", format=tarfile.PAX_FORMAT) as tf:
            data = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime, info.mode = len(data), int(_dt.datetime.now().timestamp()), 0o644
            tf.addfile(info, io.BytesIO(data))
            for m, p in members.items():
                info = tf.gettarinfo(p, arcname=m)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o644
                with open(p, "rb") as f:
                    tf.addfile(info, f)
        os.replace(tmp_tar, path)
    return path


def save_to(model, path: str, *, tokenizer=None, config=None, source: Optional[Dict[str, Any]] = None) -> str:
    """Gather ``model`` (any TP / PP / ZeRO layout; collective when split) and write ``path`` (global rank 0).
    ``config``: the run config (DictConfig or dict) -- at least its ``model`` section. ``tokenizer`` / ``config``
    default to the ones a model from :func:`megatron_ext.checkpoint.loader.restore_model` carries (``.tokenizer``,
    ``.run_config``)."""
    inner = _unwrap(model)
    tokenizer = tokenizer if tokenizer is not None else getattr(inner, "tokenizer", None)
    config = config if config is not None else getattr(inner, "run_config", None)
    if tokenizer is None or config is None:
        raise CheckpointError("save_to: this model carries no tokenizer / run config; pass them: "
                              "save_to(model, path, tokenizer=tokenizer, config=cfg)")
    family = family_of_model(inner).name
    sd = gather_full_state_dict(inner)
    config = _plain(config)
    if "model" not in config:
        raise CheckpointError("config: expected the run config with a 'model' section")
    library = ((config["model"].get("tokenizer") or {}).get("library")) or getattr(tokenizer, "name", None)
    if not library:
        raise CheckpointError("config model.tokenizer.library is missing: the archive must say which tokenizer")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        write_archive(path, state_dict=sd, config=config, family=family, vocab_size=int(inner.vocab_size),
                      tokenizer_library=str(library), tokenizer_file=_tokenizer_file(tokenizer, config),
                      source=source)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return path


# ----------------------------------------------------------------------------------------------- reading
MANIFEST_MAX_BYTES = 1 << 20  # a manifest is a few kB; a larger one is refused before it is read


def _check_name(name: str, path: str, what: str = "member") -> None:
    parts = name.split("/")
    if name.startswith("/") or os.path.isabs(name) or "\\" in name or ".." in parts or ":" in parts[0]:
        raise CheckpointError(f"{path}: refused: {what} {name!r} points outside the archive")
    if name in (MANIFEST, CONFIG, WEIGHTS):
        return
    if len(parts) == 2 and parts[0] == TOKENIZER_DIR and parts[1] and not parts[1].startswith("."):
        return
    raise CheckpointError(f"{path}: refused: unexpected {what} {name!r} (expected {MANIFEST}, {CONFIG}, {WEIGHTS}, "
                          f"{TOKENIZER_DIR}/<file>)")


def _check_member(m: tarfile.TarInfo, path: str) -> None:
    """A member's header: a plain regular file (no sparse file, link, device or fifo) with an expected name, or the
    ``tokenizer`` directory entry."""
    name = m.name
    if m.isdir() and name.rstrip("/") == TOKENIZER_DIR:
        return
    _check_name(name, path)
    if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or m.sparse is not None:
        kind = "sparse file" if (m.type == tarfile.GNUTYPE_SPARSE or m.sparse is not None) else \
            "directory" if m.isdir() else "link or special file"
        raise CheckpointError(f"{path}: refused: member {name!r} is a {kind} (only regular files are accepted)")


def _read_manifest(tf: tarfile.TarFile, m: tarfile.TarInfo, path: str) -> Dict[str, Any]:
    """The manifest member, read into memory (size-capped) and checked: format, and a ``files`` table whose every
    name is an expected member with a SHA-256 and a size; ``tokenizer.file`` one of those names."""
    if m.size > MANIFEST_MAX_BYTES:
        raise CheckpointError(f"{path}: refused: {MANIFEST} declares {m.size} bytes (at most {MANIFEST_MAX_BYTES})")
    try:
        manifest = json.loads(tf.extractfile(m).read(MANIFEST_MAX_BYTES + 1).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {MANIFEST}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{path}: {MANIFEST} has format {got!r}, expected {FORMAT!r}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{path}: {MANIFEST} has no 'files' table")
    for name, meta in files.items():
        _check_name(name, path, f"{MANIFEST} file")
        if name == MANIFEST:
            raise CheckpointError(f"{path}: refused: {MANIFEST} lists itself")
        sha, size = (meta or {}).get("sha256") if isinstance(meta, dict) else None, \
            meta.get("bytes") if isinstance(meta, dict) else None
        if not (isinstance(sha, str) and len(sha) == 64) or not (isinstance(size, int) and size >= 0):
            raise CheckpointError(f"{path}: {MANIFEST} entry {name!r} needs a 'sha256' (64 hex digits) and "
                                  f"'bytes' (a size)")
    for required in (CONFIG, WEIGHTS):
        if required not in files:
            raise CheckpointError(f"{path}: incomplete archive, no {required} in {MANIFEST}")
    tok = manifest.get("tokenizer")
    tok_file = tok.get("file") if isinstance(tok, dict) else None
    if tok_file is not None and (not isinstance(tok_file, str) or tok_file not in files
                                 or not tok_file.startswith(TOKENIZER_DIR + "/")):
        raise CheckpointError(f"{path}: refused: {MANIFEST} tokenizer.file {tok_file!r} is not a {TOKENIZER_DIR}/ "
                              f"member listed in its files")
    return manifest


def _check_end(tf: tarfile.TarFile, members, path: str) -> None:
    """tarfile stops quietly at the end of the data: a tar cut short must still hold its last member's data and the
    end-of-archive marker (two zero blocks) after it."""
    end = max((m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for m in members), default=0)
    tf.fileobj.seek(end)
    if tf.fileobj.read(2 * tarfile.BLOCKSIZE) != tarfile.NUL * (2 * tarfile.BLOCKSIZE):
        raise CheckpointError(f"{path}: truncated or corrupt .mext archive (it ends before its end-of-archive "
                              f"marker)")


def extract_archive(path: str, dest: str) -> Dict[str, Any]:
    """Check and unpack ``path`` into the (empty) directory ``dest``; returns the manifest.

    Nothing is written before every member header is checked against the manifest (names, regular files only,
    declared size equal to the manifest's ``bytes``, every listed file present once); members are then streamed
    out with a byte cap per member and in total (the manifest's sum), hashed while written. A truncated or corrupt
    tar is a ``CheckpointError`` naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such archive")
    try:
        return _extract(path, dest)
    except (tarfile.TarError, EOFError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt .mext archive ({e})") from None
    except OSError as e:  # unpacking into dest: a full disk, a read-only or missing temp directory
        raise write_error(e, dest, note=f"could not unpack {path} (it needs the sizes its {MANIFEST} lists)") from None


def _extract(path: str, dest: str) -> Dict[str, Any]:
    try:
        tf = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as e:
        raise CheckpointError(f"{path} is not a .mext archive (not an uncompressed tar file: {e})") from None
    with tf:
        members = tf.getmembers()  # headers only
        seen: Dict[str, tarfile.TarInfo] = {}
        for m in members:
            _check_member(m, path)
            if m.name in seen:
                raise CheckpointError(f"{path}: refused: member {m.name!r} appears twice")
            seen[m.name] = m
        _check_end(tf, members, path)
        if MANIFEST not in seen:
            raise CheckpointError(f"{path}: incomplete archive, no {MANIFEST}")
        manifest = _read_manifest(tf, seen[MANIFEST], path)
        files = manifest["files"]
        for name, m in seen.items():
            if name == MANIFEST or m.isdir():
                continue
            if name not in files:
                raise CheckpointError(f"{path}: refused: member {name!r} is not listed in {MANIFEST}")
            if m.size != files[name]["bytes"]:
                raise CheckpointError(f"{path}: refused: member {name!r} declares {m.size} bytes but {MANIFEST} "
                                      f"lists {files[name]['bytes']} (the archive is corrupt or was modified)")
        for name in files:
            if name not in seen:
                raise CheckpointError(f"{path}: incomplete archive, no {name} ({MANIFEST} lists it)")
        budget = sum(int(v["bytes"]) for v in files.values())
        for name, m in seen.items():
            if name == MANIFEST or m.isdir():
                continue
            target = os.path.join(dest, *name.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            cap = min(int(files[name]["bytes"]), budget)
            h, n = hashlib.sha256(), 0
            src = tf.extractfile(m)
            with open(target, "xb") as f:
                while True:
                    chunk = src.read(min(1 << 20, cap - n + 1))
                    if not chunk:
                        break
                    n += len(chunk)
                    if n > cap:
                        raise CheckpointError(f"{path}: refused: member {name!r} holds more than the "
                                              f"{files[name]['bytes']} bytes {MANIFEST} lists")
                    h.update(chunk)
                    f.write(chunk)
            budget -= n
            if n != files[name]["bytes"]:
                raise CheckpointError(f"{path}: member {name!r} is truncated ({n} of {files[name]['bytes']} bytes)")
            if h.hexdigest() != files[name]["sha256"]:
                raise CheckpointError(f"{path}: checksum mismatch for {name!r}: the archive is corrupt or was "
                                      f"modified")
    with open(os.path.join(dest, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def load_weights(path: str, where: str) -> Dict[str, torch.Tensor]:
    sd = load_untrusted(path, WEIGHTS, where=where)
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{where}: {WEIGHTS} must be a dict of name -> tensor")
    return sd


def read_archive(path: str, extract_dir: Optional[str] = None) -> Dict[str, Any]:
    """An archive's contents: ``{"format", "family", "state_dict", "vocab_size", "model_config", "config",
    "tokenizer": {"library", "model": extracted file or None}, "manifest", "extract_dir"}`` (the same keys as a
    consolidated checkpoint, plus the rest). Files are unpacked into ``extract_dir`` (default: a new temporary
    directory the caller owns)."""
    dest = extract_dir or tempfile.mkdtemp(prefix="mext-")
    manifest = extract_archive(path, dest)
    with open(os.path.join(dest, CONFIG)) as f:
        try:
            config = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise CheckpointError(f"{path}: {CONFIG} is not valid YAML: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{path}: {CONFIG} has no model section")
    tok = manifest.get("tokenizer") or {}
    tok_file = os.path.join(dest, *tok["file"].split("/")) if tok.get("file") else None
    return {
        "format": FORMAT,
        "family": manifest.get("family"),
        "state_dict": load_weights(os.path.join(dest, WEIGHTS), path),
        "vocab_size": int(manifest["vocab_size"]),
        "model_config": config["model"],
        "config": config,
        "tokenizer": {"library": tok.get("library"), "model": tok_file},
        "manifest": manifest,
        "extract_dir": dest,
    }


# ----------------------------------------------------------------------------------------------- restoring
def load_full_state_dict(model, sd: Dict[str, torch.Tensor], where: str) -> None:
    """Copy full (gathered) tensors into ``model``, taking this rank's tensor-parallel shard of each."""
    model = _unwrap(model)
    rank, world, _ = _tp()
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items()
               if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)}
    missing = [k for k in targets if k not in sd]
    unexpected = [k for k in sd if k not in targets]
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match the model built from its config "
                              f"(missing: {', '.join(missing[:5]) or '-'}; unexpected: {', '.join(unexpected[:5]) or '-'})")
    with torch.no_grad():
        for name, t in targets.items():
            full = sd[name]
            if _is_vocab_partitioned(name):
                padded = t.shape[0] * (world if getattr(t, "tensor_model_parallel", False) else 1)
                if full.shape[0] > padded:
                    raise CheckpointError(f"{where}: {name} has {full.shape[0]} rows, more than the padded "
                                          f"vocabulary {padded}")
                full = torch.cat([full, full.new_zeros(padded - full.shape[0], *full.shape[1:])], dim=0)
            if world > 1 and getattr(t, "tensor_model_parallel", False):
                full = shard_of(full, int(t.partition_dim), int(t.partition_stride), rank, world)
            if tuple(full.shape) != tuple(t.shape):
                raise CheckpointError(f"{where}: {name} has shape {tuple(full.shape)} but the model expects "
                                      f"{tuple(t.shape)}")
            t.copy_(full.to(t.dtype))


__all__ = ["FORMAT", "save_to", "read_archive", "extract_archive", "write_archive", "gather_full_state_dict",
           "load_full_state_dict", "load_weights"]

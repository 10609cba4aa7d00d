"""Checkpoint manifests: what a complete checkpoint holds, so that a reader can prove it is the one written.

``step_N/manifest.json`` (written LAST, by rank 0, after every rank reported and fsync'd its files)::

    {"format": "megatron_ext.manifest.v1", "step": int, "consumed_samples": int,
     "layout": {"tp", "pp", "dp", "zero_stage", "precision", "world_size"},
     "config_hash": sha256 of the resolved model config (see :func:`config_hash`),
     "files": {relative path: {"size": bytes, "sha256": hex}}}       # every file of the directory but itself

The manifest is generic: it lists every file found in the checkpoint directory, whoever wrote it (DeepSpeed,
the trainer's RNG states, any later writer of the save). Each rank hashes the files it wrote (they are still in
its page cache) and reports names, sizes and digests; rank 0 hashes only what no rank reported.

:func:`verify` checks a directory against its manifest: every listed file exists with its size (always) and its
sha256 (``checksums=True``; the work can be shared between ranks), no unlisted file is present, and the manifest
agrees with ``meta.json``. Every failure is one :class:`CorruptCheckpointError` starting with the bad file's path.
A checkpoint whose ``meta.json`` carries no ``"manifest"`` key was written before manifests existed ("legacy"):
:func:`verify` returns None and the caller loads it with a warning that it is unverified.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Iterable, Optional

from megatron_ext.errors import CorruptCheckpointError
from megatron_ext.output_files import fsync_path

MANIFEST = "manifest.json"
FORMAT = "megatron_ext.manifest.v1"
_CHUNK = 1 << 22


def config_hash(model_config: Any) -> str:
    """sha256 of the resolved model config (``cfg.model`` with interpolations resolved: architecture, tokenizer,
    data, optimizer/scheduler, parallel sizes) as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(model_config or {}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def hash_file(path: str, fsync: bool = False) -> Dict[str, Any]:
    """``{"size", "sha256"}`` of ``path`` (read in 4 MiB chunks); ``fsync``: also force it to stable storage."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                break
            h.update(b)
            size += len(b)
        if fsync:
            os.fsync(f.fileno())
    return {"size": size, "sha256": h.hexdigest()}


def describe(root: str, paths: Iterable[str], fsync: bool = True) -> Dict[str, Dict[str, Any]]:
    """{path relative to ``root``: hash_file(path)} for the files this rank wrote under ``root`` (fsync'd)."""
    out = {}
    for p in paths:
        rel = os.path.relpath(os.path.abspath(p), os.path.abspath(root))
        if rel.startswith("..") or not os.path.isfile(p):
            continue
        out[rel] = hash_file(p, fsync=fsync)
    return out


def _walk(root: str) -> list:
    out = []
    for d, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(d, name), root)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def fsync_dirs(root: str) -> None:
    """fsync ``root`` and every directory below it (their entries: the names of the files just written)."""
    for d, _, _ in os.walk(root):
        fsync_path(d)


def build(root: str, reported: Dict[str, Dict[str, Any]], meta: Dict[str, Any]) -> Dict[str, Any]:
    """The manifest of the finished directory ``root``: ``reported`` entries (sizes re-checked against the disk)
    plus every file nobody reported, hashed (and fsync'd) here. An OSError if a reported file is gone or changed
    size since its writer hashed it."""
    files = {}
    for rel in _walk(root):
        p = os.path.join(root, rel)
        e = reported.get(rel)
        if e is None:
            e = hash_file(p, fsync=True)
        elif os.path.getsize(p) != e["size"]:
            raise OSError(f"{p} changed size after it was written ({e['size']} -> {os.path.getsize(p)} bytes)")
        files[rel] = {"size": int(e["size"]), "sha256": e["sha256"]}
    missing = sorted(set(reported) - set(files))
    if missing:
        raise OSError(f"{os.path.join(root, missing[0])} was written but is gone")
    return {
        "format": FORMAT,
        "step": int(meta["step"]),
        "consumed_samples": int(meta["consumed_samples"]),
        "layout": {k: meta.get(k) for k in ("tp", "pp", "dp", "zero_stage", "precision", "world_size")},
        "config_hash": config_hash(meta.get("model_config")),
        "files": files,
    }


def write(root: str, manifest: Dict[str, Any]) -> None:
    """Write ``root/manifest.json`` atomically and fsync it and the directory tree."""
    atomic_write_text(os.path.join(root, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
    fsync_dirs(root)


def atomic_write_text(path: str, text: str) -> None:
    """``text`` into ``path`` through a temporary file that is fsync'd and renamed over it: a reader sees the old
    file or the whole new one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read(ckpt_path: str) -> Dict[str, Any]:
    """``ckpt_path/manifest.json``, validated in shape (file names stay inside the directory); a
    CorruptCheckpointError naming it when missing or malformed."""
    path = os.path.join(ckpt_path, MANIFEST)
    try:
        with open(path) as f:
            man = json.load(f)
        if not isinstance(man, dict) or man.get("format") != FORMAT:
            raise ValueError(f"expected a JSON object with format {FORMAT!r}")
        files = man.get("files")
        if not isinstance(files, dict) or not files:
            raise ValueError("no 'files' object")
        for rel, e in files.items():
            norm = os.path.normpath(rel) if isinstance(rel, str) and "\x00" not in rel else ""
            if not norm or os.path.isabs(rel) or norm.startswith("..") or norm != rel or rel == MANIFEST:
                raise ValueError(f"file name {rel!r} is not a plain path inside the checkpoint")
            if not isinstance(e, dict) or not isinstance(e.get("size"), int) or e["size"] < 0 \
                    or not isinstance(e.get("sha256"), str) or len(e["sha256"]) != 64:
                raise ValueError(f"entry of {rel!r} is not {{'size': int, 'sha256': 64 hex digits}}")
        int(man["step"]), int(man["consumed_samples"])
        return man
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path} is missing (meta.json says this checkpoint has one; it was "
                                     f"deleted, or the directory is not the one written)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{path} is corrupt or tampered ({str(e).splitlines()[0] if str(e) else e!r})"
                                     ) from None


def verify(ckpt_path: str, meta: Dict[str, Any], checksums: bool = True, rank: int = 0,
           world: int = 1) -> Optional[Dict[str, Any]]:
    """Check ``ckpt_path`` against its manifest (see the module docstring); None for a legacy checkpoint (no
    ``"manifest"`` in ``meta`` and no manifest file). With ``world`` > 1 the checksums are shared: this call hashes the listed files
    ``i`` with ``i % world == rank`` (all ranks together cover them); rank 0 also does the directory-wide checks.
    Raises CorruptCheckpointError starting with the path of the first bad file."""
    if not meta.get("manifest") and not os.path.lexists(os.path.join(ckpt_path, MANIFEST)):
        return None  # written before manifests (a manifest.json beside a meta.json without the key is verified)
    man = read(ckpt_path)
    mpath = os.path.join(ckpt_path, MANIFEST)
    if int(man["step"]) != int(meta["step"]) or int(man["consumed_samples"]) != int(meta["consumed_samples"]):
        raise CorruptCheckpointError(
            f"{mpath} does not match {os.path.join(ckpt_path, 'meta.json')} (step {man['step']} vs {meta['step']}, "
            f"consumed samples {man['consumed_samples']} vs {meta['consumed_samples']})")
    files = man["files"]
    names = sorted(files)
    for rel in names:  # sizes: cheap, every rank (each may stop on a different file otherwise)
        p = os.path.join(ckpt_path, rel)
        try:
            size = os.path.getsize(p)
        except OSError:
            raise CorruptCheckpointError(f"{p} is missing (listed in {mpath})") from None
        if size != files[rel]["size"]:
            raise CorruptCheckpointError(f"{p} is truncated or altered: {size} bytes, the manifest says "
                                         f"{files[rel]['size']}")
    if rank == 0:
        extra = [rel for rel in _walk(ckpt_path) if rel not in files]
        if extra:
            raise CorruptCheckpointError(f"{os.path.join(ckpt_path, extra[0])} is not listed in {mpath} (a file "
                                         f"added after the checkpoint was written)")
    if checksums:
        for i, rel in enumerate(names):
            if i % world != rank:
                continue
            p = os.path.join(ckpt_path, rel)
            try:
                got = hash_file(p)["sha256"]
            except OSError as e:
                raise CorruptCheckpointError(f"{p} could not be read ({e.strerror or e})") from None
            if got != files[rel]["sha256"]:
                raise CorruptCheckpointError(f"{p} is corrupt: its sha256 {got[:16]}... differs from the manifest's "
                                             f"{files[rel]['sha256'][:16]}...")
    return man


__all__ = ["MANIFEST", "FORMAT", "config_hash", "hash_file", "describe", "fsync_dirs", "build", "write", "read",
           "verify"]

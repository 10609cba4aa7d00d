"""The on-disk checkpoint directory, without DeepSpeed: names, completeness, ``latest``, ``meta.json``.

Layout (written by ``megatron_ext.training.checkpointing.Checkpointer``)::

    checkpoints/
        step_0000010/                 one complete checkpoint (DeepSpeed files + ours)
            mp_rank_00_model_states.pt    (DeepSpeed: module, scheduler, client state)
            *_optim_states.pt              (DeepSpeed: optimizer / ZeRO partitions)
            rng_state_rank00000.pt         every rank's python/numpy/torch/CUDA/tracker RNG states
            meta.json                      step, consumed samples, layout, model config
            manifest.json                  every other file's size and sha256, step, layout, config hash: LAST
        latest                         text file naming the newest complete checkpoint, replaced atomically

A ``step_N`` directory exists only once it is complete: it is renamed from ``.tmp-step_N`` after every rank's files,
``meta.json`` and then ``manifest.json`` were written and fsync'd (:mod:`megatron_ext.checkpoint.manifest`).
:func:`is_complete` (cheap, for listing and pruning) looks for ``meta.json``; :func:`check_files` proves it: the
directory verifies against its manifest (sizes, sha256, no missing or extra file), so a truncated, corrupt or
tampered file is reported by name. A checkpoint written before manifests (its ``meta.json`` has no ``"manifest"``
key) gets the older zip-directory check of every ``.pt`` file and one warning that it is unverified. A ``latest``
pointing at a missing or incomplete directory falls back to the newest complete one (with a warning).
``.tmp-step_N`` (never renamed) and ``.del-step_N`` (an interrupted prune) are leftovers that
:func:`remove_incomplete` deletes.

Everything here reads or removes files only; nothing starts a process group.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from typing import Any, Dict, Optional, Tuple

from megatron_ext.checkpoint import manifest
from megatron_ext.errors import CheckpointError, CorruptCheckpointError

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d+)$")
META = "meta.json"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def is_complete(ckpt_path: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_path, META))


def list_complete(ckpt_dir: str) -> list[tuple[int, str]]:
    out = []
    if os.path.isdir(ckpt_dir):
        for d in os.listdir(ckpt_dir):
            m = _STEP_RE.match(d)
            if m and is_complete(os.path.join(ckpt_dir, d)):
                out.append((int(m.group(1)), d))
    return sorted(out)


def find_latest(ckpt_dir: str) -> Optional[str]:
    """Tag of the newest complete checkpoint in ``ckpt_dir`` (None if there is none)."""
    latest_file = os.path.join(ckpt_dir, "latest")
    if os.path.isfile(latest_file):
        with open(latest_file) as f:
            tag = f.read().strip()
        if tag and is_complete(os.path.join(ckpt_dir, tag)):
            return tag
        log.warning("%s names %r which is missing or incomplete; using the newest complete checkpoint", latest_file, tag)
    done = list_complete(ckpt_dir)
    return done[-1][1] if done else None


def _tag_step(name: str) -> Optional[int]:
    m = re.match(r"^(?:\.tmp-|\.del-)?step_(\d+)$", name)
    return int(m.group(1)) if m else None


def remove_incomplete(ckpt_dir: str) -> list:
    """Delete ``.del-step_N`` leftovers of an interrupted prune, ``.tmp-step_N`` (never renamed) and ``step_N``
    without ``meta.json`` whose step is older than the newest complete checkpoint (a newer one may be being written).
    Rank 0 only, by the run that holds the directory's lock. Returns the names removed."""
    done = list_complete(ckpt_dir)
    newest = done[-1][0] if done else None
    removed = []
    for d in sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []:
        step = _tag_step(d)
        path = os.path.join(ckpt_dir, d)
        if step is None or not os.path.isdir(path):
            continue
        if d.startswith(".del-") or (newest is not None and step < newest
                                      and (d.startswith(".tmp-") or not is_complete(path))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(d)
    if removed:
        log.warning("removed incomplete checkpoint directories in %s: %s", ckpt_dir, ", ".join(removed))
    return removed


def read_meta(path: str, keys: Tuple[str, ...] = ("step", "consumed_samples")) -> Dict[str, Any]:
    """``<checkpoint>/meta.json`` as a dict holding an integer under each of ``keys`` (resume needs ``step`` and
    ``consumed_samples``; reading the weights needs ``vocab_size``); CorruptCheckpointError naming the file
    otherwise."""
    meta_path = os.path.join(path, META)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        for k in keys:
            int(meta[k])
        return meta
    except (OSError, ValueError, KeyError, TypeError) as e:
        wanted = " and ".join(f"'{k}'" for k in keys)
        raise CorruptCheckpointError(
            f"{meta_path} is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}); "
            f"expected a JSON object" + (f" with {wanted}" if keys else "")
        ) from None


def check_files(path: str, checksums: bool = True, rank: int = 0, world: int = 1,
                keys: Tuple[str, ...] = ("step", "consumed_samples")) -> Dict[str, Any]:
    """Check one checkpoint directory without loading tensors: ``meta.json`` parses (holding ``keys``) and the
    directory verifies against its manifest (sizes; sha256 when ``checksums``, shared among ``world`` callers
    by ``rank``: see :func:`megatron_ext.checkpoint.manifest.verify`); without checksums, and for a legacy
    checkpoint without a manifest (warned about once, by rank 0), every ``*.pt`` file must also be a readable
    zip archive (a truncated torch file has lost its zip directory). Returns the meta; raises
    CorruptCheckpointError naming the first bad file."""
    meta = read_meta(path, keys=tuple(dict.fromkeys(("step", "consumed_samples") + tuple(keys))))
    man = manifest.verify(path, meta, checksums=checksums, rank=rank, world=world)
    if man is None and rank == 0:
        log.warning("%s was written before checkpoint manifests (no manifest.json): its files are not verified "
                    "(only their zip directories are checked)", path)
    if man is not None and checksums:
        return meta
    for i, (root, name) in enumerate(sorted((r, n) for r, _, fs in os.walk(path) for n in fs)):
        if not name.endswith(".pt") or i % world != rank:
            continue
        fp = os.path.join(root, name)
        try:
            with zipfile.ZipFile(fp) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{fp} is truncated or corrupt ({e}); expected a complete torch.save file"
                                         ) from None
    return meta


def resolve_ckpt_path(path: str, key: str = "model.ckpt_path") -> tuple[str, str]:
    """``path`` is a checkpoints dir (uses its latest), a run directory holding ``checkpoints/``, or one
    checkpoint dir. Returns (ckpt_dir, tag); errors name ``key``, the config key that gave the path."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{key}: {path} does not exist")
    if is_complete(path):
        return os.path.dirname(path), os.path.basename(path)
    for cand in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(cand):
            tag = find_latest(cand)
            if tag is not None:
                return cand, tag
    raise CheckpointError(
        f"{key}: no complete checkpoint in {path} (expected a step_N directory with {META}, or a "
        f"directory holding such directories and a 'latest' file)"
    )


__all__ = ["META", "tag_for", "is_complete", "list_complete", "find_latest", "remove_incomplete", "read_meta",
           "check_files", "resolve_ckpt_path"]

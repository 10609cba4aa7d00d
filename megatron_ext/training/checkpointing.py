"""Atomic, resumable checkpoints over DeepSpeed's engine.save_checkpoint / load_checkpoint.

The directory layout, completeness (``meta.json``), ``latest`` and the checks that read files without DeepSpeed live
in :mod:`megatron_ext.checkpoint.files`; this module writes and loads checkpoints through a DeepSpeed engine.

A save goes to ``.tmp-step_N/``. Every rank hashes (sha256) and fsyncs the files it wrote (DeepSpeed's, recorded
from its checkpoint engine, and its RNG state; rank 0 also ``meta.json``) and sends names, sizes and digests to rank
0, which hashes any file nobody reported, writes ``manifest.json`` LAST (:mod:`megatron_ext.checkpoint.manifest`),
checks the directory against it and fsyncs the directory tree. Only then is ``.tmp-step_N`` renamed to ``step_N``
(parent directory fsync'd) and ``latest`` replaced with ``os.replace`` (fsync'd). A crash at any point leaves
either the previous checkpoint as "latest" or the new one, never a half-written or unverified one.
The layout-free state (``megatron_ext.checkpoint.reshard``, through the ``layout_free`` hook of ``save``) is
written into ``.tmp-step_N/`` before the commit, so the manifest lists its files too.

Pruning (``save_top_k``) first renames ``step_N`` to ``.del-step_N`` and then deletes it, so a kill mid-prune never
leaves a ``step_N`` fragment; ``remove_incomplete`` (after every save and at the start of a run, which owns the
directory) deletes ``.del-*`` leftovers and incomplete ``step_N`` / ``.tmp-step_N`` directories older than the newest
complete checkpoint -- never a newer one, which may be the one being written.

A save stops with one line (CheckpointError) when the disk is full, naming the path; the partial ``.tmp-step_N`` is
removed and ``latest`` still names the previous checkpoint. On resume, ``check_files`` verifies the checkpoint
against its manifest first (sizes, and sha256 unless exp_manager.checkpoint_callback_params.verify_checksums=false,
shared among the ranks), so a truncated, corrupt, missing or added file is reported by name and the previous
complete checkpoint is loaded instead (``Trainer._resume``).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_ext.checkpoint import manifest, reshard
from megatron_ext.checkpoint.async_save import (BackgroundSaver, capture_saves, host_snapshot,
                                                patched_saves, write_synced)
from megatron_ext.checkpoint.files import META, find_latest, list_complete, read_meta, remove_incomplete, tag_for
from megatron_ext.checkpoint.safe_load import load_untrusted
from megatron_ext.errors import CheckpointError, CorruptCheckpointError
from megatron_ext.output_files import fsync_path

log = logging.getLogger(__name__)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _gather_to_rank0(entries: Dict[str, Any], group=None) -> Dict[str, Any]:
    """Every rank's ``{relative path: {size, sha256}}`` merged, on rank 0 (an empty dict elsewhere)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(entries)
    out = [None] * dist.get_world_size() if _rank() == 0 else None
    dist.gather_object(entries, out, dst=0, group=group)
    merged: Dict[str, Any] = {}
    for part in out or []:
        merged.update(part or {})
    return merged


def is_disk_full(exc: BaseException, path: str) -> bool:
    """Whether ``exc`` (raised while writing under ``path``) means the disk or quota is full: an OSError
    ENOSPC/EDQUOT, or any write error (torch's zip writer raises a RuntimeError without the errno, e.g.
    "basic_ios::clear: iostream error") while the filesystem of ``path`` has less than 1 MiB left."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(exc):
        return True
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


@dataclass
class LoadedState:
    step: int
    consumed_samples: int
    meta: Dict[str, Any]


class Checkpointer:
    """Writes (``save``) and reads (``load``) checkpoints of a DeepSpeed engine in ``ckpt_dir``.

    With ``async_save`` a save returns after a host snapshot of the state; the files are written, synced and
    committed in the background (:mod:`megatron_ext.checkpoint.async_save`), one save at a time, over a process
    group of their own. :meth:`finish` waits for the last one (the trainer calls it before training ends)."""

    def __init__(self, ckpt_dir: str, save_top_k: int = -1, async_save: bool = False, best=None):
        self.ckpt_dir = ckpt_dir
        self.save_top_k = save_top_k
        self.best = best  # training.best.BestCheckpoints: keep the k best by a monitored metric (+ the newest)
        self.saver = BackgroundSaver() if async_save else None
        self._snapshots: Dict[str, Any] = {}  # file name -> its host snapshot from the last async save
        # collective, so every rank builds its Checkpointer at the same point (the trainer does, in the train loop)
        self.group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() and \
            dist.get_world_size() > 1 else None

    def finish(self, quiet: bool = False) -> None:
        """Wait for a background save in flight; raise its error (CheckpointError naming the checkpoint), or with
        ``quiet`` (training is already stopping with an error of its own) log it."""
        if self.saver is None:
            return
        try:
            self.saver.finish()
        except CheckpointError as e:
            if not quiet:
                raise
            log.error("%s", e)

    def save(self, engine, step: int, consumed_samples: int, rng_states: Dict[str, Any], meta_extra: Dict[str, Any],
             layout_free: Optional[Callable[[str], None]] = None):
        """``layout_free()``: collects the layout-free state (``checkpoint.reshard.collect_state``; every rank calls
        it, in this thread), which is written into the step directory with DeepSpeed's files (with ``async_save``
        from a host snapshot, in the background, over the save's own process group)."""
        tag = tag_for(step)
        tmp_tag = ".tmp-" + tag
        tmp_path = os.path.join(self.ckpt_dir, tmp_tag)
        final_path = os.path.join(self.ckpt_dir, tag)
        rank = _rank()
        failure = None
        if self.saver is not None:
            self.saver.wait(f"checkpoint {tag}")  # one save in flight; the previous one's error is raised here
            self.saver.finish()
        if rank == 0:
            try:
                if os.path.exists(tmp_path):
                    shutil.rmtree(tmp_path)
                os.makedirs(tmp_path)
            except OSError as e:
                failure = e
        self._all_ok(failure, tmp_path)  # in place of a barrier; every rank stops if the directory is not there
        client_state = {"step": step, "consumed_samples": consumed_samples}
        meta = {"step": step, "consumed_samples": consumed_samples,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1, **meta_extra,
                "manifest": manifest.MANIFEST}
        rng_path = os.path.join(tmp_path, f"rng_state_rank{rank:05d}.pt")
        meta_path = os.path.join(tmp_path, META)
        if self.saver is not None:
            with capture_saves(engine, self._snapshots) as files:  # DeepSpeed's files, as host snapshots
                engine.save_checkpoint(self.ckpt_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
            files.append((rng_path, host_snapshot(rng_states, self._snapshots.get(os.path.basename(rng_path)))))
            collected = layout_free() if layout_free is not None else None  # collectives: in this thread
            if collected is not None:
                collected = host_snapshot(collected, self._snapshots.get(reshard.STATE_DIR))
            # kept for the next save to refill (it waits until these are written)
            self._snapshots = {os.path.basename(path): obj for path, obj in files}
            self._snapshots[reshard.STATE_DIR] = collected

            def job():
                written, hashed, failure = [], {}, None
                try:
                    for path, obj in files:  # hashed while written: the commit need not read them back
                        hashed[os.path.relpath(path, tmp_path)] = write_synced(path, obj)
                    if collected is not None:  # DCP's files are hashed by rank 0 as files nobody reported
                        reshard.write_state(tmp_path, *collected, group=self.group)
                    if rank == 0:
                        manifest.atomic_write_text(meta_path, json.dumps(meta, indent=2))
                        written.append(meta_path)
                except (OSError, RuntimeError) as e:
                    failure = e
                self._commit(failure, written, meta, tmp_path, final_path, self.group, hashed)

            self.saver.submit(tag, job)
            return final_path
        failure = None
        written: List[str] = []  # this rank's files, hashed by this rank
        try:
            def record(state_dict, path, inner):  # DeepSpeed's files: hashed by this rank in the commit
                inner(state_dict, path)
                written.append(path)

            with patched_saves(engine, record):
                engine.save_checkpoint(self.ckpt_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
            collected = layout_free() if layout_free is not None else None
            if collected is not None:  # its files (DCP's) are hashed by rank 0 as files nobody reported
                reshard.write_state(tmp_path, *collected)
            torch.save(rng_states, rng_path)
            written.append(rng_path)
            if rank == 0:
                manifest.atomic_write_text(meta_path, json.dumps(meta, indent=2))
                written.append(meta_path)
        except (OSError, RuntimeError) as e:
            failure = e
        self._commit(failure, written, meta, tmp_path, final_path, None)
        return final_path

    def _commit(self, failure: Optional[BaseException], written: List[str], meta: Dict[str, Any], tmp_path: str,
                final_path: str, group, hashed: Optional[Dict[str, Any]] = None) -> None:
        """After each rank wrote its files (``written``) into ``tmp_path``: every rank hashes and fsyncs its own,
        rank 0 writes the manifest LAST and checks the directory against it, renames ``tmp_path`` to ``final_path``,
        points ``latest`` at it (each step fsync'd) and prunes. Collectives over ``group`` (None: the default one).
        Any rank's failure: one CheckpointError on every rank, the partial directory removed, ``latest`` unchanged."""
        rank = _rank()
        mine: Dict[str, Any] = dict(hashed or {})  # files already hashed (and fsync'd) while they were written
        if failure is None:
            try:  # the rest this rank wrote is hashed and fsync'd here; rank 0 hashes files nobody reported
                mine.update(manifest.describe(tmp_path, written))
            except (OSError, RuntimeError) as e:
                failure = e
        self._all_ok(failure, tmp_path, group)
        reported = _gather_to_rank0(mine, group)
        failure = None
        if rank == 0:
            try:  # written last: the checkpoint is complete once its manifest exists and verifies
                man = manifest.build(tmp_path, reported, meta)
                manifest.write(tmp_path, man)
                manifest.verify(tmp_path, meta, checksums=False)  # sizes and names as on disk now
            except (OSError, CorruptCheckpointError) as e:
                failure = e
        self._all_ok(failure, tmp_path, group)
        if rank == 0:
            try:
                if os.path.exists(final_path):
                    shutil.rmtree(final_path)
                os.rename(tmp_path, final_path)
                fsync_path(self.ckpt_dir)  # the rename is durable before 'latest' names it
                manifest.atomic_write_text(os.path.join(self.ckpt_dir, "latest"), os.path.basename(final_path))
                fsync_path(self.ckpt_dir)
            except OSError as e:  # 'latest' not updated: the new step goes too, so 'latest' stays the newest
                failure = e
                shutil.rmtree(final_path, ignore_errors=True)
        self._all_ok(failure, final_path, group)
        if rank == 0:
            self._prune()
            log.info("saved checkpoint %s", final_path)
        _barrier(group)

    def _all_ok(self, failure: Optional[BaseException], path: str, group=None) -> None:
        """In place of a barrier after a step of a save: when any rank failed, rank 0 removes the partial checkpoint
        directory ``path`` and every rank raises one CheckpointError naming it (saying so when the disk is full)."""
        failed = torch.tensor([0 if failure is None else (2 if is_disk_full(failure, self.ckpt_dir) else 1)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
        if int(failed) == 0:
            return
        if _rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
        _barrier(group)
        latest = find_latest(self.ckpt_dir)
        still = f"'latest' still names {latest}" if latest else "no earlier checkpoint exists"
        if int(failed) == 2:
            raise CheckpointError(
                f"the disk is full: could not write checkpoint {path} (free space where "
                f"{self.ckpt_dir} lives, or set exp_manager.checkpoint_callback_params.save_top_k); {still}"
            ) from None
        if failure is None:
            raise CheckpointError(f"another rank failed to write checkpoint {path}; {still}")
        cause = (failure.strerror if isinstance(failure, OSError) and failure.strerror else str(failure))
        raise CheckpointError(f"could not write checkpoint {path} ({(cause.splitlines() or [''])[0]}); {still}") \
            from None

    def _prune(self) -> None:
        """Rank 0, after a commit. Without ``best``: keep the ``save_top_k`` newest complete checkpoints (-1: all).
        With ``best`` (``monitor``): keep the ``save_top_k`` best by the score in their ``meta.json`` plus the
        newest, then point the best-checkpoint aliases and ``best.json`` at them (``training.best``)."""
        done = list_complete(self.ckpt_dir)
        if self.best is not None:
            keep, ranked, metas = self.best.prune_plan(self.ckpt_dir, done)
            drop = [d for _, d in done if d not in keep]
        elif self.save_top_k is None or self.save_top_k < 0:
            return
        else:
            drop = [d for _, d in done[: max(0, len(done) - max(1, self.save_top_k))]]
        if self.best is not None:  # the aliases move to the kept checkpoints before any goes
            self.best.publish(self.ckpt_dir, ranked, metas)
            if drop:
                log.info("save_top_k=%d by %s (%s): best %s; removing %s", self.best.k, self.best.monitor,
                         self.best.mode, ", ".join(ranked) or "(none scored yet)", ", ".join(drop))
        for d in drop:
            gone = os.path.join(self.ckpt_dir, ".del-" + d)
            os.rename(os.path.join(self.ckpt_dir, d), gone)  # atomic: no step_N fragment if killed while deleting
            shutil.rmtree(gone, ignore_errors=True)
        remove_incomplete(self.ckpt_dir)

    @staticmethod
    def load(engine, ckpt_dir: str, tag: str, load_optimizer: bool = True) -> LoadedState:
        path = os.path.join(ckpt_dir, tag)
        meta = read_meta(path)
        try:
            load_path, client = engine.load_checkpoint(
                ckpt_dir,
                tag=tag,
                load_optimizer_states=load_optimizer,
                load_lr_scheduler_states=load_optimizer,
                load_module_only=not load_optimizer,
            )
        except CheckpointError:  # a file refused by the safe loader (names the file)
            raise
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint {path} does not match this model/layout (saved with tp={meta.get('tp')}, "
                f"pp={meta.get('pp')}, dp={meta.get('dp')}): {str(e).splitlines()[0]}"
            ) from None
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint at {path}")
        return LoadedState(step=int(meta["step"]), consumed_samples=int(meta["consumed_samples"]), meta=meta)

    @staticmethod
    def load_rng(ckpt_dir: str, tag: str) -> Optional[Dict[str, Any]]:
        path = os.path.join(ckpt_dir, tag, f"rng_state_rank{_rank():05d}.pt")
        if not os.path.exists(path):
            log.warning("no RNG state for this rank in %s (different world size?); RNG not restored", path)
            return None
        return load_untrusted(path, "RNG state")

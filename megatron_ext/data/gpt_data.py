"""GPT train/valid/test datasets over Megatron ``.bin``/``.idx`` files (megatron-core underneath).

``build_gpt_datasets`` turns ``model.data`` into megatron-core's ``GPTDatasetConfig`` and lets
``BlendedMegatronDatasetBuilder`` do the work: the train/valid/test split of each dataset's
documents by ``splits_string`` ("949,50,1"), the weighted blend across datasets, and the
shuffled document/sample/shuffle indices, cached as ``.npy`` files and reused by later runs
with the same data, sequence length, seed, split and sizes.

Raw text and JSONL (``data_impl=text_mmap`` / ``jsonl``) go through :mod:`megatron_ext.data.gpt_text`, which
reuses the builder and the cache planning below with its own ``GPTDataset`` subclass.

``model.data.data_prefix`` forms:

* ``[]`` -- the built-in corpus (:mod:`megatron_ext.data.default_corpus`);
* ``"/p/x"`` or ``["/p/x"]`` (or ``[w, "/p/x"]``) -- one dataset, ``/p/x.bin`` + ``/p/x.idx``;
* ``[w1, "/p/a", w2, "/p/b", ...]`` -- a blend; samples are drawn in proportion to the
  (positive) weights.
* ``{train: [...], validation: [...], test: [...]}`` -- separate files per split (NeMo's dict form,
  Megatron-LM's ``--train-data-path/--valid-data-path/--test-data-path``), each used whole (megatron-core's
  ``blend_per_split``; ``splits_string`` is not used). ``train`` is one of the forms above;
  ``validation``/``test`` may also hold several datasets evaluated separately: ``[p1, p2]`` (named by file
  stem) or ``{name: prefix or blend}`` (:func:`megatron_ext.data.prefixes.parse_split_prefixes`). Such a
  split comes back as an ordered ``{name: dataset}`` dict.

With the list form, the test split ``splits_string`` leaves without tokens (a small dataset) is dropped with a
warning rather than failing the run (it was not named).

A trailing ``.bin``/``.idx`` on a prefix is accepted and removed; ``~`` is expanded and the
prefix made absolute (so the cache key does not depend on the working directory).

Every file is checked first (:mod:`megatron_ext.data.validation`), so a bad input is one
``DataError``/``ConfigError`` naming the file or key, never an assert from megatron-core.

Sample-index cache (``model.data.index_mapping_dir``, default ``<dir of first prefix>/cache``)
------------------------------------------------------------------------------------------
megatron-core builds the indices on *global rank 0* and lets the other ranks load them after a
barrier, which assumes the cache directory is shared by all ranks: on node-local disks the
other nodes find no files. Here, before megatron-core runs, every rank checks whether it can see
a probe file that rank 0 wrote into the cache directory:

* ranks that see it share rank 0's filesystem and load what rank 0 builds (megatron-core's
  usual path);
* of the ranks that do not, the lowest rank on each host builds the indices into its own
  (node-local) cache directory first, in a short-lived child process that has a world of one
  (megatron-core only builds on rank 0), and the other ranks of that host load them.

Cache files are only read after every builder has finished (megatron-core's barrier), and
builders of the same directory produce byte-identical files. Every rank then holds the full
datasets (``is_built_on_rank`` is always true): datasets are memory-mapped, so this is cheap,
and the training loop does not depend on which ranks have data.

Batches (via :mod:`megatron_ext.data.samplers`) hold ``tokens``/``labels`` (int64, ``[b, s]``),
``loss_mask`` (float32) and ``position_ids`` (int64). No attention mask is built
(``create_attention_mask=False``): the model uses causal SDPA. ``reset_position_ids`` and
``eod_mask_loss`` act on the batch (megatron-core); with ``reset_attention_mask=true`` the GPT task
wraps the datasets so that samples also carry ``segment_ids`` (int32 ``[s]``, the document of each
token: :mod:`megatron_ext.data.doc_segments`), from which the model keeps attention within documents.
"""
from __future__ import annotations

import logging
import os
import socket
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ext.data.collective import all_gather, collective_check, world
from megatron_ext.data.default_corpus import ensure_default_corpus
from megatron_ext.data.prefixes import (PREFIX_KEY, SPLITS_KEY, is_split_dict, parse_data_prefix, parse_split_prefixes,
                                        parse_splits_string)
from megatron_ext.data.validation import HEADER_BYTES, check_splits, split_document_ranges, validate_indexed_dataset
from megatron_ext.errors import ConfigError, DataError

logger = logging.getLogger(__name__)



# ------------------------------------------------------------------------ tokenizer proxy
@dataclass
class TokenizerInfo:
    """The part of a tokenizer megatron-core's GPT datasets read; small and picklable.

    The datasets (and DataLoader workers, and the index-building child process) carry this
    instead of the tokenizer itself. ``unique_identifiers`` goes into the cache key.
    """

    vocab_size: int
    eod: int
    pad: int
    unique_identifiers: "OrderedDict[str, Any]"

    @property
    def eos(self) -> int:
        return self.eod

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TokenizerInfo":
        pad = getattr(tokenizer, "pad", None)
        return cls(
            vocab_size=int(tokenizer.vocab_size),
            eod=int(tokenizer.eod),
            pad=-1 if pad is None else int(pad),
            unique_identifiers=OrderedDict(tokenizer.unique_identifiers),
        )


def plan_index_builders(cache_dir: str) -> bool:
    """Decide who builds the sample-index cache. Returns True if this rank (not rank 0) must
    build it locally before megatron-core runs. Collective: call on every rank."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return False
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = os.path.join(cache_dir, f".shared-probe-{token[0]}")
    if rank == 0:
        with open(probe, "w") as f:
            f.write("probe\n")
    dist.barrier()
    sees = os.path.exists(probe)
    if not sees:  # refresh possibly stale negative lookups on network filesystems
        try:
            sees = os.path.basename(probe) in os.listdir(cache_dir)
        except OSError:
            sees = False
    host = socket.gethostname()
    table = all_gather((host, sees))
    dist.barrier()
    if rank == 0:
        try:
            os.remove(probe)
        except OSError:
            pass
    if sees:
        return False
    local_builder = min(r for r, (h, s) in enumerate(table) if h == host and not s)
    if rank == local_builder:
        logger.info(
            "rank %d: the index cache %s is not shared with rank 0; building it on this node", rank, cache_dir
        )
    return rank == local_builder


# ------------------------------------------------------------------------ building
_SPLITS = ("train", "validation", "test")


@dataclass
class _Job:
    """One call of megatron-core's builder: the list form (one blend split by ``splits_string``) or one dataset of
    one split of the dict form (``blend_per_split``, files used whole). ``keys``: the config key of each path."""

    prefixes: List[str]
    weights: Optional[List[float]]
    keys: List[str]
    sizes: List[int]
    split: Optional[str] = None  # splits_string of the list form; None: per split
    split_index: Optional[int] = None  # the dict form's split
    name: Optional[str] = None  # the dict form's dataset name
    cfg: Any = None

    def split_matrix(self):
        if self.split_index is None:
            return self.cfg.split_matrix
        return [(0.0, 1.0) if i == self.split_index else None for i in range(3)]


def _dataset_config(job: _Job, seq_length: int, seed: int, cache_dir: str, tok: TokenizerInfo, data_cfg):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    blend = (list(job.prefixes), None if job.weights is None else list(job.weights))
    if job.split_index is None:
        where = dict(blend=blend, split=job.split)
    else:
        where = dict(blend_per_split=[blend if i == job.split_index else None for i in range(3)])
    cfg = GPTDatasetConfig(
        random_seed=int(seed),
        sequence_length=int(seq_length),
        path_to_cache=cache_dir,
        mmap_bin_files=True,
        tokenizer=tok,
        reset_position_ids=bool(data_cfg.reset_position_ids),
        reset_attention_mask=bool(data_cfg.reset_attention_mask),
        eod_mask_loss=bool(data_cfg.eod_mask_loss),
        create_attention_mask=False,
        num_dataset_builder_threads=1,
        **where,
    )
    if job.split_index is None:
        # splits nobody asks samples from are not built at all (returned as None)
        cfg.split_matrix = [m if job.sizes[i] else None for i, m in enumerate(cfg.split_matrix)]
    return cfg


class _SingleProcessGroup:
    """A world of one for megatron-core code that calls ``torch.distributed.get_rank()``
    unguarded (``BlendedDataset`` on a cache miss). No-op when a group already exists."""

    def __enter__(self):
        import torch.distributed as dist

        self.created = not dist.is_initialized()
        if self.created:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        if self.created and dist.is_initialized():
            dist.destroy_process_group()
        return False


def _run_builder(cfg, sizes: Sequence[int], dataset_cls=None):
    """megatron-core's builder over ``dataset_cls`` (default ``GPTDataset``; the raw-text GPT datasets of
    :mod:`megatron_ext.data.gpt_text` pass their subclass)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    cls = GPTDataset if dataset_cls is None else dataset_cls
    builder = BlendedMegatronDatasetBuilder(cls, [int(s) for s in sizes], lambda: True, cfg)
    return builder.build()


def _child_main(payload_path: str) -> int:
    """Entry point of the index-building child process (see :func:`_prebuild_in_child`)."""
    import pickle

    with open(payload_path, "rb") as f:  # written by _prebuild_in_child of this run, never a user's file
        jobs, dataset_cls = pickle.load(f)
    with _SingleProcessGroup():
        for cfg, sizes in jobs:
            _run_builder(cfg, sizes, dataset_cls)
    return 0


def _prebuild_in_child(jobs: Sequence[_Job], dataset_cls=None) -> None:
    """Build the sample-index cache of every job (anything with ``.cfg`` and ``.sizes``) in a fresh interpreter
    with a world of one, over ``dataset_cls`` (default ``GPTDataset``).

    A plain subprocess (not ``multiprocessing``'s spawn, which re-imports the user's main
    script and would re-run an unguarded training script).
    """
    import pickle
    import subprocess
    import sys
    import tempfile

    fd, payload = tempfile.mkstemp(prefix="megatron_ext_index_", suffix=".pkl")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(([(j.cfg, [int(s) for s in j.sizes]) for j in jobs], dataset_cls), f)
        code = (
            "import sys; sys.path[:0] = {path!r}; "
            "from megatron_ext.data.gpt_data import _child_main; sys.exit(_child_main({payload!r}))"
        ).format(path=[p for p in sys.path if p], payload=payload)
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    finally:
        os.remove(payload)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise DataError(
            f"building the sample-index cache in {jobs[0].cfg.path_to_cache} failed (exit code {proc.returncode}): "
            f"{tail}"
        )


def _resolve_cache_dir(data_cfg, first_prefix: str) -> str:
    if data_cfg.index_mapping_dir:
        cache_dir = os.path.abspath(os.path.expanduser(str(data_cfg.index_mapping_dir)))
        key = "model.data.index_mapping_dir"
    else:
        cache_dir = os.path.join(os.path.dirname(first_prefix), "cache")
        key = f"the default sample-index cache next to {first_prefix} (set model.data.index_mapping_dir)"
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the sample-index cache directory {cache_dir} ({key}): {err}") from err
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise DataError(
            f"the sample-index cache directory {cache_dir} is not writable; set model.data.index_mapping_dir "
            f"to a writable directory"
        )
    return cache_dir


def _noop(*args, **kwargs):
    return None


def _validate_inputs(jobs: Sequence[_Job], tokenizer, cache_dir, splits_string):
    """Check every file (once) and that each split samples are asked from has tokens; returns the files' infos.
    The list form's test split, when ``splits_string`` leaves it no documents in some dataset, is dropped from the
    job (it was not asked for by name; one warning) instead of failing the run."""
    name = getattr(tokenizer, "name", None)
    infos = OrderedDict()
    for job in jobs:
        for prefix, key in zip(job.prefixes, job.keys):
            if prefix not in infos:
                infos[prefix] = validate_indexed_dataset(prefix, int(tokenizer.vocab_size), cache_dir, name, key)
        if job.split_index is None and job.sizes[2]:
            empty = _empty_test_split([infos[p] for p in job.prefixes], job.cfg.split_matrix)
            if empty:
                logger.warning(
                    "%s=%r leaves the test split of %s without tokens: no test split (evaluated after training "
                    "otherwise; give it a larger share, or name test files with the dict form of %s)",
                    SPLITS_KEY, splits_string, empty, PREFIX_KEY)
                job.sizes[2] = 0
                job.cfg.split_matrix[2] = None
        shown = splits_string if job.split_index is None else None
        where = SPLITS_KEY if job.split_index is None else f"{job.keys[0]} (the whole file)"
        for prefix in job.prefixes:
            check_splits(infos[prefix], job.split_matrix(), job.sizes, where, shown)
    return list(infos.values())


def _empty_test_split(infos, split_matrix) -> Optional[str]:
    """The first dataset whose test range (``split_matrix[2]``) holds no tokens, or None."""
    for info in infos:
        rng = split_document_ranges(info.num_sequences, split_matrix)[2]
        if rng is None:
            continue
        beg, end = rng
        if end <= beg:
            return info.prefix
        lengths = np.fromfile(info.idx_path, dtype=np.int32, count=info.num_sequences, offset=HEADER_BYTES)
        if int(lengths[beg:end].astype(np.int64).sum()) == 0:
            return info.prefix
    return None


def _jobs(data_cfg, tokenizer, sizes: List[int]) -> List[_Job]:
    """The builder calls ``model.data.data_prefix`` asks for (see :class:`_Job`)."""
    if is_split_dict(data_cfg.data_prefix):
        splits = parse_split_prefixes(data_cfg.data_prefix, "prefix", data_cfg.splits_string)
        if sizes[0] and splits.train is None:
            raise ConfigError(
                f"{PREFIX_KEY} has no 'train' entry but {sizes[0]} training samples are needed; add "
                f"{PREFIX_KEY}.train=[...] (only an evaluation-only run, trainer.limit_train_batches=0, needs none)"
            )
        jobs = []
        for i, split in enumerate(_SPLITS):
            if not sizes[i]:
                continue
            for name, blend in splits.sets(split).items():
                size = [0, 0, 0]
                size[i] = sizes[i]
                jobs.append(_Job(list(blend.paths), None if blend.weights is None else list(blend.weights),
                                 list(blend.keys), size, split_index=i, name=name))
        return jobs
    split = parse_splits_string(data_cfg.splits_string)
    prefixes, weights = parse_data_prefix(data_cfg.data_prefix)
    if not prefixes:
        prefixes = [collective_check(ensure_default_corpus, tokenizer, data_cfg.default_corpus_dir)]
    keys = [f"{PREFIX_KEY}[{2 * i + 1}]" if weights is not None else PREFIX_KEY for i in range(len(prefixes))]
    return [_Job(prefixes, weights, keys, list(sizes), split=split)]


def build_gpt_datasets(data_cfg, tokenizer, seq_length: int, num_samples: Tuple[int, int, int], seed: int):
    """Build ``(train, valid, test)`` GPT datasets from ``model.data`` (a ``DataConfig``).

    ``num_samples`` is the number of samples each split must provide (see
    :func:`megatron_ext.data.samplers.compute_num_samples`); a split with 0 samples, or a 0 share
    in ``splits_string``, is not built and comes back as ``None``. With the dict form of ``data_prefix``
    (``{train, validation, test}``: files per split, used whole) a split with several named datasets comes back
    as an ordered ``{name: dataset}`` dict. ``seed`` is used unless ``data_cfg.seed`` is set. Call on every rank
    when ``torch.distributed`` is initialized.
    """
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise ConfigError(f"model.seq_length={seq_length!r}: expected a positive integer")
    sizes = list(num_samples)
    if len(sizes) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sizes):
        raise ConfigError(f"num_samples={num_samples!r}: expected three non-negative integers (train, valid, test)")
    if str(getattr(data_cfg, "data_impl", "mmap")) not in ("mmap", "lazy", "cached"):
        raise ConfigError(
            f"model.data.data_impl={data_cfg.data_impl!r}: expected 'mmap' (Megatron .bin/.idx files from "
            f"tools/preprocess_data.py), 'text_mmap' (text files, one document per line) or 'jsonl' (JSONL files, "
            f"the text under model.data.text_key)"
        )
    data_seed = seed if getattr(data_cfg, "seed", None) is None else data_cfg.seed
    rank, size = world()

    jobs = _jobs(data_cfg, tokenizer, sizes)
    if not jobs:
        return None, None, None
    cache_dir = collective_check(_resolve_cache_dir, data_cfg, jobs[0].prefixes[0])

    tok = TokenizerInfo.from_tokenizer(tokenizer)
    for job in jobs:
        job.cfg = _dataset_config(job, seq_length, data_seed, cache_dir, tok, data_cfg)

    check = (jobs, tokenizer, cache_dir, data_cfg.splits_string)
    if size == 1:
        infos = _validate_inputs(*check)
    else:
        local_builder = plan_index_builders(cache_dir)
        is_builder = rank == 0 or local_builder
        # builders check first (filling the data-stats cache), then the others; an error on any
        # rank is raised on every rank, so none is left waiting in a barrier
        infos = collective_check(_validate_inputs if is_builder else _noop, *check)
        infos = collective_check(_noop if is_builder else _validate_inputs, *check) or infos
        # ranks that cannot see rank 0's cache fill their own (rank 0 builds inside megatron-core)
        collective_check(_prebuild_in_child if local_builder else _noop, jobs)

    for info in infos or []:
        logger.info(
            "dataset %s: %d documents, %d tokens (%s)", info.prefix, info.num_sequences, info.num_tokens, info.dtype
        )

    out: List[Any] = [None, None, None]
    try:
        with _SingleProcessGroup():
            for job in jobs:
                built = _run_builder(job.cfg, job.sizes)
                if job.split_index is None:
                    out = list(built)
                    continue
                i = job.split_index
                if out[i] is None:
                    out[i] = OrderedDict()
                out[i][job.name] = built[i]
    except OSError as err:
        raise DataError(f"reading the datasets or the sample-index cache in {cache_dir} failed: {err}") from err
    for i, ds in enumerate(out):
        if isinstance(ds, OrderedDict) and len(ds) == 1:
            out[i] = next(iter(ds.values()))  # one dataset: as the list form gives it
    for i, (name, ds) in enumerate(zip(("train", "valid", "test"), out)):
        for label, d in (ds.items() if isinstance(ds, OrderedDict) else [(None, ds)]):
            if d is not None:
                logger.info("%s dataset%s: %d samples of %d tokens (%d requested)", name,
                            f" {label!r}" if label else "", len(d), seq_length, sizes[i])
    return tuple(out)

"""BART denoising datasets over token documents: samples, blends, and the builder from ``model.data``.

The noising itself is :mod:`megatron_ext.data.bart_noising` (text infilling, sentence permutation, the special ids);
the document sources (``.bin``/``.idx``, text, JSONL) are :mod:`megatron_ext.data.documents`; ``data_prefix`` /
``splits_string`` parsing is shared with the GPT datasets (:mod:`megatron_ext.data.prefixes`). Their public names
are importable from here too. The ids a sample uses (pad, bos, eos, mask) are the noiser's (:mod:`bart_noising`).

Samples (:class:`BARTDataset`)
------------------------------
Documents are cut into chunks of at most ``C = min(seq_length, seq_length_dec - 1)`` tokens,
evenly (a document of ``T`` tokens gives ``ceil(T / C)`` chunks of ``T // k`` or ``T // k + 1``
tokens), so nothing is truncated and no chunk is a tiny remainder; documents without tokens
give no chunk. A trailing ``eod`` stored in a ``.bin`` document is dropped (the decoder target
gets its own). Each chunk is one sample; short documents are not packed together. The dataset
has exactly ``num_samples`` samples: epoch ``e`` visits all chunks in a random order drawn from
``(seed, dataset, split, e)``, and sample ``i`` is noised with a generator seeded by
``(seed, dataset, split, i)`` -- so a sample depends only on its index and resume is exact.

A sample is a dict of numpy arrays::

    text_enc    int64   [seq_length]      noised chunk, then pad
    enc_mask    bool    [seq_length]      True on real tokens
    text_dec    int64   [seq_length_dec]  bos + chunk, then pad
    labels      int64   [seq_length_dec]  chunk + eos, then pad
    loss_mask   float32 [seq_length_dec]  1.0 on chunk + eos, 0.0 on padding
    dec_mask    bool    [seq_length_dec]  True on real tokens (== loss_mask > 0)
    noised_mask float32 [seq_length_dec]  1.0 on target tokens masked/deleted in the input
    <attribute> float32 scalar            data_impl=jsonl only: one per model.data.attribute_keys
                                          entry, the value of the chunk's document (all chunks
                                          of a document carry it)

:func:`collate_bart_batch` stacks them into ``[batch, seq]`` tensors and each attribute into a
float32 ``[batch]`` tensor. Attribute values are always float32, also integer class labels (stored
exactly up to 2**24): a consumer that needs class ids casts (``batch["label"].long()``).

Datasets (:func:`build_bart_datasets`)
--------------------------------------
``model.data.data_impl``: ``mmap`` (``.bin``/``.idx`` prefixes, megatron-core's
``IndexedDataset``, checked first by :mod:`megatron_ext.data.validation`; an empty
``data_prefix`` means the built-in corpus), ``text_mmap`` (text files, one document per line,
:class:`~megatron_ext.data.text_mmap.TextMemMapDataset`, tokenized in ``__getitem__`` so it
works in DataLoader workers) or ``jsonl`` (JSONL files, one JSON object per line: the text under
``model.data.text_key``, numeric columns ``model.data.attribute_keys`` that every sample carries;
:class:`~megatron_ext.data.text_mmap.JSONLMemMapDataset`; otherwise exactly like ``text_mmap``:
same chunking, seeds, splits and blending, blank lines are skipped documents). Attribute columns
need ``jsonl`` (a ``ConfigError`` otherwise), and every file of a blend must have all of them.
``splits_string`` cuts *each* dataset's documents (sequences of a
``.bin``, lines of a text file) into contiguous, disjoint train/valid/test ranges, rounded like
megatron-core's GPT datasets. ``data_prefix = [w1, p1, w2, p2, ...]`` blends the datasets:
sample ``i`` goes to the dataset with the largest deficit ``w_j * max(i, 1) - count_j``
(megatron-core's ``build_blending_indices``), deterministic, and each dataset is built with
exactly the number of samples the blend takes from it. The dict form ``data_prefix = {train: [...],
validation: [...], test: [...]}`` names each split's files instead (used whole, ``splits_string`` unused); a
validation/test entry with several datasets (``[p1, p2]`` or ``{name: path}``,
:func:`megatron_ext.data.prefixes.parse_split_prefixes`) comes back as an ordered ``{name: dataset}`` dict.
With the list form, a test split that ``splits_string`` leaves without tokens is dropped with a warning.
"""
from __future__ import annotations

import logging
import os
import zlib
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_ext.data.bart_noising import (
    BARTNoiser,
    NoiseInfo,
    bart_noise,
    check_noise_settings,
    permute_sentences,
    sentence_start_fn,
    word_start_fn,
)
from megatron_ext.data.collective import collective_check
from megatron_ext.data.default_corpus import ensure_default_corpus
from megatron_ext.data.documents import IndexedDocuments, JSONLDocuments, TextDocuments
from megatron_ext.data.prefixes import (as_list, is_split_dict, parse_data_prefix, parse_split_prefixes,
                                        parse_splits_string, parse_text_paths)
from megatron_ext.data.text_mmap import _dir_writable, check_jsonl_keys
from megatron_ext.data.validation import split_document_ranges, validate_indexed_dataset
from megatron_ext.errors import ConfigError, DataError
from megatron_ext.tokenizers.special_tokens import unwrap_tokenizer

logger = logging.getLogger(__name__)

SAMPLE_KEYS = ("text_enc", "enc_mask", "text_dec", "labels", "loss_mask", "dec_mask", "noised_mask")
_TORCH_DTYPES = {
    "text_enc": torch.long,
    "enc_mask": torch.bool,
    "text_dec": torch.long,
    "labels": torch.long,
    "loss_mask": torch.float32,
    "dec_mask": torch.bool,
    "noised_mask": torch.float32,
}
_SPLIT_NAMES = ("train", "validation", "test")


# ============================================================================ the dataset
def chunk_length(seq_length: int, seq_length_dec: int) -> int:
    """Most tokens per chunk: the noised input fits ``seq_length``, bos + chunk fit ``seq_length_dec``."""
    return min(int(seq_length), int(seq_length_dec) - 1)


def make_sample(noised: np.ndarray, target: np.ndarray, seq_length: int, seq_length_dec: int, pad: int, bos: int,
                eos: int, masked_target: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """``masked_target`` (bool per target token): which target tokens were masked or deleted in the input; it
    becomes ``noised_mask`` (float32 over the labels), used for the accuracy on masked spans."""
    n_enc, n_t = int(noised.shape[0]), int(target.shape[0])
    if n_enc > seq_length or n_t + 1 > seq_length_dec:
        raise DataError(f"internal error: sample of {n_enc}/{n_t} tokens does not fit {seq_length}/{seq_length_dec}")
    text_enc = np.full(seq_length, pad, dtype=np.int64)
    text_enc[:n_enc] = noised
    enc_mask = np.zeros(seq_length, dtype=bool)
    enc_mask[:n_enc] = True
    text_dec = np.full(seq_length_dec, pad, dtype=np.int64)
    text_dec[0] = bos
    text_dec[1: n_t + 1] = target
    labels = np.full(seq_length_dec, pad, dtype=np.int64)
    labels[:n_t] = target
    labels[n_t] = eos
    dec_mask = np.zeros(seq_length_dec, dtype=bool)
    dec_mask[: n_t + 1] = True
    noised_mask = np.zeros(seq_length_dec, dtype=np.float32)
    if masked_target is not None:
        noised_mask[:n_t] = np.asarray(masked_target, dtype=np.float32)
    return {
        "noised_mask": noised_mask,
        "text_enc": text_enc,
        "enc_mask": enc_mask,
        "text_dec": text_dec,
        "labels": labels,
        "loss_mask": dec_mask.astype(np.float32),
        "dec_mask": dec_mask,
    }


def collate_bart_batch(samples: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """Stack BART samples into ``[batch, seq]`` tensors (int64 ids, bool masks, float32 loss_mask and
    noised_mask); the attribute scalars of ``data_impl=jsonl`` samples become float32 ``[batch]`` tensors."""
    out = {key: torch.stack([torch.as_tensor(s[key]) for s in samples]).to(dtype)
           for key, dtype in _TORCH_DTYPES.items()}
    extra = [key for key in samples[0] if key not in _TORCH_DTYPES] if samples else []
    if extra or any(len(s) != len(samples[0]) for s in samples):
        keys = set(samples[0])
        for s in samples[1:]:
            if set(s) != keys:
                raise DataError(
                    f"cannot batch BART samples with different keys: {sorted(keys ^ set(s))} in some samples "
                    f"only (datasets with different model.data.attribute_keys in one batch?)"
                )
    for key in extra:
        out[key] = torch.stack([torch.as_tensor(np.asarray(s[key], dtype=np.float32)) for s in samples])
    return out


class BARTDataset(torch.utils.data.Dataset):
    """``num_samples`` BART samples over documents ``[doc_begin, doc_end)`` of ``source`` (module docstring)."""

    def __init__(
        self,
        source,
        doc_range: Tuple[int, int],
        num_samples: int,
        seq_length: int,
        seq_length_dec: int,
        noiser: BARTNoiser,
        seed: int,
        split: str = "train",
        salt: Optional[int] = None,
    ) -> None:
        self.source = source
        self.doc_range = (int(doc_range[0]), int(doc_range[1]))
        self.seq_length = int(seq_length)
        self.seq_length_dec = int(seq_length_dec)
        self.chunk_length = chunk_length(self.seq_length, self.seq_length_dec)
        self.noiser = noiser
        self.seed = int(seed)
        self.split = split
        self.num_samples = int(num_samples)
        self.attribute_keys: Tuple[str, ...] = tuple(getattr(source, "attribute_keys", ()))
        b, e = self.doc_range
        lengths = np.asarray(source.lengths(), dtype=np.int64)[b:e]
        n_chunks = -(-lengths // self.chunk_length)  # ceil; 0 for empty documents
        keep = np.flatnonzero(n_chunks > 0)
        self._docs = (keep + b).astype(np.int64)
        self._doc_len = lengths[keep]
        self._doc_chunks = n_chunks[keep]
        self._chunk_cum = np.concatenate([[0], np.cumsum(self._doc_chunks)]).astype(np.int64)
        self.num_chunks = int(self._chunk_cum[-1])
        self.num_tokens = int(self._doc_len.sum())
        if self.num_samples > 0 and self.num_chunks == 0:
            raise DataError(
                f"{source.name}: the {split} split (documents {b}..{e - 1}) has no tokens, but {self.num_samples} "
                f"{split} samples are needed; check model.data.splits_string and the data"
            )
        if salt is None:  # the file name, not its directory: moving the data keeps the samples
            salt = zlib.crc32(os.path.basename(str(source.name)).encode("utf-8"))
        self._key = [self.seed & 0xFFFFFFFFFFFFFFFF, int(salt) & 0xFFFFFFFF, _SPLIT_NAMES.index(split) if split in _SPLIT_NAMES else 9]
        self._perm_cache: Dict[int, np.ndarray] = {}

    # ---------------------------------------------------------------- index
    def __len__(self) -> int:
        return self.num_samples

    @property
    def num_epochs(self) -> int:
        return -(-self.num_samples // self.num_chunks) if self.num_chunks else 0

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perm_cache.get(epoch)
        if perm is None:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self._key + [epoch, 0x5EED])))
            perm = rng.permutation(self.num_chunks)
            perm = perm.astype(np.int32 if self.num_chunks < 2 ** 31 else np.int64)
            if len(self._perm_cache) >= 2:
                self._perm_cache.pop(next(iter(self._perm_cache)))
            self._perm_cache[epoch] = perm
        return perm

    def chunk_of_sample(self, idx: int) -> int:
        idx = self._check_index(idx)
        epoch, j = divmod(idx, self.num_chunks)
        return int(self._perm(epoch)[j])

    def sample_source(self, idx: int) -> Tuple[int, int, int]:
        """``(document, first token, end token)`` of the chunk that sample ``idx`` is made of."""
        c = self.chunk_of_sample(idx)
        d = int(np.searchsorted(self._chunk_cum, c, side="right")) - 1
        k = c - int(self._chunk_cum[d])
        n, length = int(self._doc_chunks[d]), int(self._doc_len[d])
        return int(self._docs[d]), (k * length) // n, ((k + 1) * length) // n

    def _check_index(self, idx: int) -> int:
        i = int(idx)
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample index {idx} out of range for {self.num_samples} samples")
        return i

    def rng(self, idx: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(self._key + [int(idx), 1])))

    # ---------------------------------------------------------------- samples
    def target_tokens(self, idx: int) -> np.ndarray:
        doc, beg, end = self.sample_source(idx)
        return self.source.tokens(doc, beg, end)

    @property
    def sample_keys(self) -> Tuple[str, ...]:
        """The keys of every sample: :data:`SAMPLE_KEYS`, then the attribute keys."""
        return SAMPLE_KEYS + self.attribute_keys

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        idx = self._check_index(idx)
        doc, beg, end = self.sample_source(idx)
        target = self.source.tokens(doc, beg, end)
        noised, info = self.noiser(target, self.rng(idx), max_length=self.seq_length, return_info=True)
        sample = make_sample(noised, target, self.seq_length, self.seq_length_dec, self.noiser.pad_id,
                             self.noiser.bos_id, self.noiser.eos_id, masked_target=info.masked_original_positions())
        if self.attribute_keys:
            values = self.source.attributes(doc)
            for key, value in zip(self.attribute_keys, values.tolist()):
                sample[key] = np.float32(value)
        return sample

    collate_fn = staticmethod(collate_bart_batch)


class BlendedBARTDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights`` (greedy largest deficit)."""

    def __init__(self, datasets: Sequence[Any], weights: Sequence[float], size: int,
                 dataset_index: Optional[np.ndarray] = None, dataset_sample_index: Optional[np.ndarray] = None
                 ) -> None:
        self.datasets = list(datasets)
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.size = int(size)
        if dataset_index is None:
            dataset_index, dataset_sample_index = blending_indices(self.weights, self.size)
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index
        keys = {tuple(getattr(ds, "attribute_keys", ())) for ds in self.datasets if ds is not None}
        if len(keys) > 1:
            raise DataError(f"cannot blend datasets with different attribute columns {sorted(keys)}: every sample "
                            f"of a batch needs the same keys (model.data.attribute_keys)")
        self.attribute_keys: Tuple[str, ...] = keys.pop() if keys else ()
        for j, ds in enumerate(self.datasets):
            need = int(np.count_nonzero(dataset_index == j))
            if need and (ds is None or len(ds) < need):
                raise DataError(f"internal error: blended dataset {j} has {0 if ds is None else len(ds)} samples, "
                                f"the blend needs {need}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        i = int(idx)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"sample index {idx} out of range for {self.size} samples")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]

    def source_of(self, idx: int) -> Tuple[int, int]:
        """``(dataset number, sample index in it)``."""
        return int(self.dataset_index[idx]), int(self.dataset_sample_index[idx])

    collate_fn = staticmethod(collate_bart_batch)


def blending_indices(weights: Sequence[float], size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Greedy deficit assignment: sample ``i`` -> argmax_j ``w_j * max(i, 1) - count_j`` (ties: lowest j).

    megatron-core's compiled ``build_blending_indices`` when available, else the same loop in numpy.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    if size == 0:
        return dataset_index, dataset_sample_index
    try:
        from megatron.core.datasets import helpers_cpp  # optional: the compiled helpers (numpy loop below)

        helpers_cpp.build_blending_indices(dataset_index, dataset_sample_index, w, len(w), int(size), False)
        return dataset_index, dataset_sample_index
    except ImportError:  # pragma: no cover - the compiled helpers ship in the megatron-core wheel
        pass
    counts = np.zeros(len(w), dtype=np.int64)
    for i in range(size):
        j = int(np.argmax(w * max(i, 1) - counts))
        dataset_index[i] = j
        dataset_sample_index[i] = counts[j]
        counts[j] += 1
    return dataset_index, dataset_sample_index


# ============================================================================ building
def _cfg(data_cfg, key: str, default: Any) -> Any:
    value = getattr(data_cfg, key, default) if not isinstance(data_cfg, dict) else data_cfg.get(key, default)
    return default if value is None and default is not None else value


def _split_matrix(splits_string: str, sizes: Sequence[int]) -> List[Optional[Tuple[float, float]]]:
    values = [float(v) for v in parse_splits_string(splits_string).split(",")]
    total = sum(values)
    cum = np.concatenate([[0.0], np.cumsum(np.asarray(values) / total)])
    return [(float(cum[i]), float(cum[i + 1])) if sizes[i] else None for i in range(3)]


def split_ranges(num_documents: int, splits_string: str, sizes: Sequence[int] = (1, 1, 1)
                 ) -> List[Optional[Tuple[int, int]]]:
    """Disjoint, contiguous ``[begin, end)`` document ranges of train/valid/test (None: not built)."""
    return split_document_ranges(int(num_documents), _split_matrix(splits_string, sizes))


def data_keys(data_cfg) -> Tuple[str, Tuple[str, ...]]:
    """Validated ``(model.data.text_key, model.data.attribute_keys)``; read defensively (a config without
    these keys means ``"text"`` and ``()``)."""
    text_key = _cfg(data_cfg, "text_key", "text")
    attribute_keys = as_list(_cfg(data_cfg, "attribute_keys", []))
    text_key, attribute_keys = check_jsonl_keys(text_key, attribute_keys)
    clash = [k for k in attribute_keys if k in SAMPLE_KEYS]
    if clash:
        raise ConfigError(
            f"model.data.attribute_keys={list(attribute_keys)!r}: {', '.join(clash)} would overwrite the BART sample "
            f"key(s) of the same name ({', '.join(SAMPLE_KEYS)}); rename the column(s) in the data"
        )
    return text_key, attribute_keys


def _stats_cache_dir(data_cfg, first_prefix: str) -> Optional[str]:
    mapping = _cfg(data_cfg, "index_mapping_dir", None)
    d = os.path.abspath(os.path.expanduser(str(mapping))) if mapping else os.path.join(os.path.dirname(first_prefix),
                                                                                         "cache")
    return d if _dir_writable(d) else None


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ConfigError(f"{name}={value!r}: expected an integer >= {minimum}")
    return int(value)


def _list_sources(data_cfg, tokenizer, impl: str) -> Tuple[List[str], Optional[List[float]], List[str]]:
    """The list form of ``model.data.data_prefix``: ``(paths, weights or None, config key of each path)``."""
    if impl in ("text_mmap", "jsonl"):
        what = "text file (one document per line)" if impl == "text_mmap" else "JSONL file (one JSON object per line)"
        paths, weights = parse_text_paths(_cfg(data_cfg, "data_prefix", []), what)
        if not paths:
            files = "text files" if impl == "text_mmap" else "JSONL files"
            raise ConfigError(
                f"model.data.data_prefix is empty but model.data.data_impl={impl} needs {files}: "
                f"[file] or [w1, file1, w2, file2, ...]; use data_impl=mmap for the built-in corpus"
            )
    else:
        paths, weights = parse_data_prefix(_cfg(data_cfg, "data_prefix", []))
        if not paths:
            # the plain tokenizer's ids are the wrapped one's, so the corpus cache is shared with GPT runs
            paths = [collective_check(ensure_default_corpus, unwrap_tokenizer(tokenizer),
                                      _cfg(data_cfg, "default_corpus_dir", None))]
    keys = [f"model.data.data_prefix[{2 * i + 1}]" if weights is not None else "model.data.data_prefix"
            for i in range(len(paths))]
    return paths, weights, keys


def _open_sources(data_cfg, tokenizer, impl: str, paths: Sequence[str], keys: Sequence[str], text_key: str = "text",
                  attribute_keys: Sequence[str] = ()) -> List[Any]:
    """The document sources of ``paths`` (text/JSONL files or ``.bin``/``.idx`` prefixes, checked first)."""
    if impl in ("text_mmap", "jsonl"):
        mapping = _cfg(data_cfg, "index_mapping_dir", None)

        def open_all():
            out = []
            for p in paths:
                if impl == "jsonl":  # checks every line of the file (once; cached)
                    src = JSONLDocuments(p, tokenizer, mapping, text_key, attribute_keys)
                else:
                    src = TextDocuments(p, tokenizer, mapping)
                src.lengths()  # build/load the token counts now (not in every DataLoader worker)
                out.append(src)
            return out

        return collective_check(open_all)

    cache_dir = _stats_cache_dir(data_cfg, paths[0])

    def open_all():
        out = []
        for p, key in zip(paths, keys):
            info = validate_indexed_dataset(p, int(tokenizer.vocab_size), cache_dir, getattr(tokenizer, "name", None),
                                            key)
            logger.info("dataset %s: %d documents, %d tokens", p, info.num_sequences, info.num_tokens)
            out.append(IndexedDocuments(p, int(tokenizer.eod)))
        return out

    return collective_check(open_all)


def _empty_split(sources: Sequence[Any], bookends: Tuple[float, float], chunk: int) -> Optional[str]:
    """The first source whose ``bookends`` share of documents gives no chunk (no tokens), or None."""
    for src in sources:
        beg, end = split_document_ranges(len(src), [bookends])[0]
        lengths = np.asarray(src.lengths(), dtype=np.int64)[beg:end]
        if end <= beg or not int((-(-lengths // chunk)).sum()):
            return str(src.name)
    return None


def _split_dataset(sources: Sequence[Any], weights: Optional[Sequence[float]], s: int, size: int,
                   bookends: Tuple[float, float], where: str, seq_length: int, seq_length_dec: int,
                   noiser: BARTNoiser, data_seed: int):
    """The ``size``-sample dataset of split ``s`` over the ``bookends`` share of each source's documents (a blend
    when ``weights``). ``where`` says what chose the documents (for errors)."""
    name = _SPLIT_NAMES[s]
    if weights is None:
        idx, sidx, per = None, None, [size]
    else:
        idx, sidx = blending_indices(weights, size)
        per = [int(np.count_nonzero(idx == j)) for j in range(len(sources))]
    parts = []
    for j, src in enumerate(sources):
        beg, end = split_document_ranges(len(src), [bookends])[0]
        if not per[j]:
            parts.append(None)
            continue
        if end <= beg:
            raise DataError(
                f"{src.name}: the {name} split gets 0 of the {len(src)} documents with {where}, but {per[j]} {name} "
                f"samples are needed; use more documents or give the {name} split a larger share in "
                f"model.data.splits_string"
            )
        salt = zlib.crc32(f"{j}:{os.path.basename(str(src.name))}".encode("utf-8"))
        parts.append(BARTDataset(src, (beg, end), per[j], seq_length, seq_length_dec, noiser, data_seed, name,
                                 salt=salt))
    ds = parts[0] if weights is None else BlendedBARTDataset(parts, weights, size, idx, sidx)
    for p in parts:
        if p is not None:
            logger.info(
                "BART %s split of %s: documents %d..%d, %d chunks (%d tokens) of <= %d tokens, %d samples "
                "(%d epochs)", name, p.source.name, p.doc_range[0], p.doc_range[1] - 1, p.num_chunks,
                p.num_tokens, p.chunk_length, len(p), p.num_epochs,
            )
    return ds


def build_bart_datasets(data_cfg, tokenizer, seq_length: int, seq_length_dec: int,
                        num_samples: Tuple[int, int, int], seed: int):
    """``(train, valid, test)`` BART datasets from ``model.data`` (a ``BARTDataConfig``); see the module docstring.

    ``tokenizer`` must have a ``mask`` id (:func:`megatron_ext.tokenizers.ensure_mask_token`). A split with
    0 requested samples (or a 0 share in ``splits_string``) comes back as ``None``. ``data_cfg.seed``
    overrides ``seed`` when set. Call on every rank (each builds the same datasets; caches are written
    atomically, so ranks need not share a filesystem).
    """
    seq_length = _check_int("model.seq_length", seq_length, 1)
    seq_length_dec = _check_int("model.seq_length_dec", seq_length_dec, 1)
    if chunk_length(seq_length, seq_length_dec) < 2:
        raise ConfigError(
            f"model.seq_length={seq_length}, model.seq_length_dec={seq_length_dec}: too small for BART samples; "
            f"a sample holds min(seq_length, seq_length_dec - 1) tokens of text, which must be at least 2 "
            f"(the decoder also needs room for bos/eos)"
        )
    sizes = list(num_samples) if isinstance(num_samples, (list, tuple)) else None
    if sizes is None or len(sizes) != 3:
        raise ConfigError(f"num_samples={num_samples!r}: expected three non-negative integers (train, valid, test)")
    sizes = [_check_int("num_samples", s, 0) for s in sizes]
    impl = str(_cfg(data_cfg, "data_impl", "mmap")).strip()
    if impl not in ("mmap", "text_mmap", "jsonl"):
        raise ConfigError(
            f"model.data.data_impl={impl!r}: expected 'mmap' (.bin/.idx prefixes from tools/preprocess_data.py), "
            f"'text_mmap' (text files, one document per line) or 'jsonl' (JSONL files, one JSON object per line, "
            f"with optional numeric attribute columns)"
        )
    text_key, attribute_keys = data_keys(data_cfg)
    if attribute_keys and impl != "jsonl":
        raise ConfigError(
            f"model.data.attribute_keys={list(attribute_keys)!r} with model.data.data_impl={impl}: attribute columns "
            f"need data_impl=jsonl (JSONL files with the attributes as numeric keys); set "
            f"model.data.attribute_keys=[] or use JSONL data"
        )
    noiser = BARTNoiser(
        tokenizer,
        masked_lm_prob=_cfg(data_cfg, "masked_lm_prob", 0.15),
        poisson_lambda=_cfg(data_cfg, "poisson_lambda", 3.0),
        delete_mask_prob=_cfg(data_cfg, "delete_mask_prob", 0.0),
        whole_word_masking=bool(_cfg(data_cfg, "whole_word_masking", False)),
        permute_sentences=bool(_cfg(data_cfg, "permute_sentences", False)),
    )
    splits_string = _cfg(data_cfg, "splits_string", "949,50,1")
    matrix = _split_matrix(splits_string, sizes)  # validates splits_string
    data_seed = _cfg(data_cfg, "seed", None)
    data_seed = int(seed if data_seed is None else data_seed)

    build = dict(seq_length=seq_length, seq_length_dec=seq_length_dec, noiser=noiser, data_seed=data_seed)
    data_prefix = _cfg(data_cfg, "data_prefix", [])
    if is_split_dict(data_prefix):  # files per split, each used whole; a split may hold several named datasets
        splits = parse_split_prefixes(data_prefix, "prefix" if impl == "mmap" else "file", splits_string)
        if sizes[0] and splits.train is None:
            raise ConfigError(
                f"model.data.data_prefix has no 'train' entry but {sizes[0]} training samples are needed; add "
                f"model.data.data_prefix.train=[...] (only an evaluation-only run, trainer.limit_train_batches=0, "
                f"needs none)"
            )
        out: List[Optional[Any]] = [None, None, None]
        for s, name in enumerate(_SPLIT_NAMES):
            sets: "OrderedDict[str, Any]" = OrderedDict()
            for set_name, blend in (splits.sets(name).items() if sizes[s] else ()):
                sources = _open_sources(data_cfg, tokenizer, impl, blend.paths, blend.keys, text_key, attribute_keys)
                weights = None if blend.weights is None else list(blend.weights)
                sets[set_name] = _split_dataset(sources, weights, s, sizes[s], (0.0, 1.0),
                                                f"{blend.keys[0]} (the whole file)", **build)
            out[s] = None if not sets else next(iter(sets.values())) if len(sets) == 1 else sets
        return tuple(out)

    paths, weights, keys = _list_sources(data_cfg, tokenizer, impl)
    sources = _open_sources(data_cfg, tokenizer, impl, paths, keys, text_key, attribute_keys)
    if sizes[2] and matrix[2] is not None:
        empty = _empty_split(sources, matrix[2], chunk_length(seq_length, seq_length_dec))
        if empty:
            logger.warning(
                "model.data.splits_string=%r leaves the test split of %s without tokens: no test split (evaluated "
                "after training otherwise; give it a larger share, or name test files with the dict form of "
                "model.data.data_prefix)", splits_string, empty)
            matrix[2] = None
    out = []
    for s, size in enumerate(sizes):
        if not size or matrix[s] is None:
            out.append(None)
            continue
        out.append(_split_dataset(sources, weights, s, size, matrix[s],
                                  f"model.data.splits_string={splits_string!r}", **build))
    return tuple(out)


__all__ = [
    # this module
    "SAMPLE_KEYS", "BARTDataset", "BlendedBARTDataset", "blending_indices", "build_bart_datasets", "chunk_length",
    "collate_bart_batch", "data_keys", "make_sample", "split_ranges",
    # re-exported from bart_noising / documents
    "BARTNoiser", "NoiseInfo", "bart_noise", "check_noise_settings", "permute_sentences", "sentence_start_fn",
    "word_start_fn", "IndexedDocuments", "JSONLDocuments", "TextDocuments",
]

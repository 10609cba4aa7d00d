"""BART denoising data: text infilling (+ optional sentence permutation) over token documents.

Noising (:func:`bart_noise`, a pure function of the tokens and a ``numpy.random.Generator``)
----------------------------------------------------------------------------------------------
1. ``permute_sentences``: the sentences of the sample are put in a random order (BART's
   sentence permutation). A sentence starts at a word start whose previous non-whitespace text
   ends in ``.``, ``!`` or ``?`` (optionally followed by a closing quote or bracket); see
   :func:`sentence_start_fn`.
2. Text infilling. The *units* are the tokens, or the words with ``whole_word_masking`` (a word
   runs from one word start to the next: sentencepiece pieces starting with ``"▁"``; for the
   byte tokenizer a non-whitespace byte after whitespace, so a word carries its trailing
   whitespace). Special ids (eod, pad, bos, mask) are never masked: a span that would cover one is
   split there into two spans (two masks). The budget is
   ``m = floor(masked_lm_prob * n + u)``, ``u ~ U[0, 1)``, units of the ``n`` maskable ones --
   stochastic rounding, so the masked fraction is exactly ``masked_lm_prob`` in expectation,
   also for short samples. Span lengths are drawn from ``Poisson(poisson_lambda)`` until they
   add up to ``m`` (the last one is cut to fit). The spans are placed uniformly at random,
   without overlap and with at least one unmasked unit between two spans, so every span is
   visible as its own mask (when ``masked_lm_prob`` is so high that there are not enough unmasked
   units to separate them, the last spans are merged). Each span becomes **one** mask token, or is deleted outright with
   probability ``delete_mask_prob``.
   **Length-0 spans insert a mask without removing anything**, as in BART ("0-length spans
   correspond to the insertion of [MASK] tokens"). They are the only thing that can lengthen a
   sample; when ``max_length`` is given, insertions beyond it are dropped (the last ones first),
   so the noised input always fits.
3. The target is the original (un-permuted, un-masked) token sequence.

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

Ids: ``mask`` = ``tokenizer.mask`` (wrap the tokenizer with
:func:`megatron_ext.tokenizers.ensure_mask_token` first); ``pad`` = ``tokenizer.pad``;
``eos`` = ``tokenizer.eod``; ``bos`` = ``tokenizer.bos``, or ``eod`` when the tokenizer has no
bos (the decoder then starts from eos, like T5/BART's decoder-start token). Byte tokenizer:
eod 256, pad 257, bos 258, mask 259 (vocab 260). Sentencepiece models from
``tools/train_tokenizer.py``: unk 0, bos 1, eos 2, pad 3, mask = the model's ``<mask>`` piece
when it has one (``--user-defined-symbols "<mask>"``) else ``vocab_size`` (appended).

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
exactly the number of samples the blend takes from it.
"""
from __future__ import annotations

import logging
import math
import os
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_ext.data.default_corpus import ensure_default_corpus
from megatron_ext.data.gpt_data import (PREFIX_KEY, _as_list, _collective_check, _parse_weight, parse_data_prefix,
                                        parse_splits_string)
from megatron_ext.data.text_mmap import JSONLMemMapDataset, TextMemMapDataset, _dir_writable, check_jsonl_keys
from megatron_ext.data.validation import split_document_ranges, validate_indexed_dataset
from megatron_ext.errors import ConfigError, DataError
from megatron_ext.tokenizers.byte import ByteTokenizer
from megatron_ext.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer
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
_WS_BYTES = (9, 10, 11, 12, 13, 32)
_TERMINATORS = ".!?"
_CLOSERS = "\"')]\u2019\u201d"


# ============================================================================ word / sentence starts
def _byte_word_starts(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    n = ids.shape[0]
    if n == 0:
        return np.zeros(0, dtype=bool)
    sep = np.isin(ids, _WS_BYTES) | (ids >= 256)  # specials separate words too
    starts = np.zeros(n, dtype=bool)
    starts[0] = True
    starts[1:] = sep[:-1] & ~sep[1:]
    starts |= ids >= 256
    return starts


def _prev_nonspace(ids: np.ndarray, space: np.ndarray) -> np.ndarray:
    """Index of the last non-space token strictly before each position (-1 if none)."""
    n = ids.shape[0]
    idx = np.where(~space, np.arange(n), -1)
    last = np.maximum.accumulate(idx) if n else idx
    out = np.full(n, -1, dtype=np.int64)
    out[1:] = last[:-1]
    return out


def _byte_sentence_starts(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    n = ids.shape[0]
    starts = _byte_word_starts(ids)
    if n == 0:
        return starts
    space = np.isin(ids, _WS_BYTES)
    prev = _prev_nonspace(ids, space)
    term_ids = np.array([ord(c) for c in _TERMINATORS])
    closer_ids = np.array([ord(c) for c in _CLOSERS if ord(c) < 128])
    ok = prev >= 0
    p = np.where(ok, prev, 0)
    ends = np.isin(ids[p], term_ids)
    p2 = np.where(p > 0, p - 1, 0)
    ends |= np.isin(ids[p], closer_ids) & (p > 0) & np.isin(ids[p2], term_ids)
    # a sentence start needs whitespace right before it (so "3.14" and "e.g.x" do not split)
    ws_before = np.zeros(n, dtype=bool)
    ws_before[1:] = space[:-1]
    out = starts & ok & ends & ws_before
    out[0] = True
    return out


class _PieceTables:
    """Per-id tables of a sentencepiece vocabulary: word start, ends a sentence."""

    def __init__(self, sp, vocab_size: int) -> None:
        n = int(sp.get_piece_size())
        pieces = sp.id_to_piece(list(range(n)))
        word = np.zeros(vocab_size, dtype=bool)
        term = np.zeros(vocab_size, dtype=bool)
        for i, piece in enumerate(pieces):
            special = sp.is_control(i) or sp.is_unused(i)
            word[i] = piece.startswith("\u2581") or special
            stripped = piece.rstrip(_CLOSERS)
            term[i] = (not special) and stripped.endswith(tuple(_TERMINATORS))
        word[n:] = True  # ids appended after the model's vocabulary (mask, ...) stand alone
        self.word = word
        self.term = term

    def word_starts(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = self.word[ids]
        if out.shape[0]:
            out[0] = True
        return out

    def sentence_starts(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = self.word_starts(ids)
        if out.shape[0] == 0:
            return out
        prev_term = np.zeros_like(out)
        prev_term[1:] = self.term[ids[:-1]]
        out = out & prev_term
        out[0] = True
        return out


def _kind(tokenizer) -> Tuple[str, Any]:
    base = unwrap_tokenizer(tokenizer)
    if isinstance(base, ByteTokenizer):
        return "byte", None
    if isinstance(base, SentencePieceTokenizer):
        return "sentencepiece", _PieceTables(base.processor, int(tokenizer.vocab_size))
    return "other", base


def word_start_fn(tokenizer) -> Callable[[np.ndarray], np.ndarray]:
    """``f(ids) -> bool array``: True where a word starts (position 0 always does).

    byte: a non-whitespace byte after whitespace; sentencepiece: a piece starting with ``"▁"``
    (or a control piece); another tokenizer: its own ``word_starts(ids)`` method.
    """
    kind, extra = _kind(tokenizer)
    if kind == "byte":
        return _byte_word_starts
    if kind == "sentencepiece":
        return extra.word_starts
    fn = getattr(extra, "word_starts", None) or getattr(tokenizer, "word_starts", None)
    if fn is None:
        raise ConfigError(
            f"model.data.whole_word_masking=true: the {getattr(tokenizer, 'name', type(tokenizer).__name__)!r} "
            f"tokenizer has no notion of word starts (supported: byte, sentencepiece, or a tokenizer with a "
            f"word_starts(ids) method); set model.data.whole_word_masking=false"
        )
    return fn


def sentence_start_fn(tokenizer) -> Callable[[np.ndarray], np.ndarray]:
    """``f(ids) -> bool array``: True where a sentence starts (position 0 always does)."""
    kind, extra = _kind(tokenizer)
    if kind == "byte":
        return _byte_sentence_starts
    if kind == "sentencepiece":
        return extra.sentence_starts
    fn = getattr(extra, "sentence_starts", None) or getattr(tokenizer, "sentence_starts", None)
    if fn is None:
        raise ConfigError(
            f"model.data.permute_sentences=true: sentence boundaries are not known for the "
            f"{getattr(tokenizer, 'name', type(tokenizer).__name__)!r} tokenizer (supported: byte, "
            f"sentencepiece); set model.data.permute_sentences=false"
        )
    return fn


# ============================================================================ noising
@dataclass
class NoiseInfo:
    """What :func:`bart_noise` did (positions refer to the sequence after sentence permutation)."""

    span_starts: np.ndarray  # token position where each span starts (or where a mask was inserted)
    span_units: np.ndarray  # span length in units (tokens, or words with whole-word masking); 0 = insertion
    span_tokens: np.ndarray  # span length in tokens
    deleted: np.ndarray  # bool: span removed without a mask
    permuted: np.ndarray  # tokens after sentence permutation (== the input without it)
    sentence_order: Optional[np.ndarray]  # order of the sentences, None when not permuted
    num_units: int  # maskable units
    dropped_insertions: int  # length-0 spans left out to respect max_length
    source_index: Optional[np.ndarray] = None  # permuted[i] == original[source_index[i]]

    def masked_original_positions(self) -> np.ndarray:
        """Bool per ORIGINAL token: it was inside a masked (or deleted) span of the input."""
        n = int(self.permuted.shape[0])
        hit = np.zeros(n, dtype=bool)
        for st, ln in zip(self.span_starts.tolist(), self.span_tokens.tolist()):
            if ln > 0:
                hit[st:st + ln] = True
        if self.source_index is None:
            return hit
        out = np.zeros(n, dtype=bool)
        out[self.source_index[hit]] = True
        return out

    @property
    def num_masked_tokens(self) -> int:
        return int(self.span_tokens.sum())


def permute_sentences(tokens: np.ndarray, sentence_starts: np.ndarray, rng: np.random.Generator
                      ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Shuffle the sentences; returns ``(tokens, source index of every output token, order)``."""
    n = tokens.shape[0]
    starts = np.flatnonzero(sentence_starts)
    if n == 0 or starts.shape[0] < 2:
        return tokens, np.arange(n), None
    bounds = np.concatenate([starts, [n]])
    order = rng.permutation(starts.shape[0])
    src = np.concatenate([np.arange(bounds[k], bounds[k + 1]) for k in order])
    return tokens[src], src, order


def _poisson_spans(m: int, lam: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson(lam) lengths drawn until they sum to >= m; the last is cut so they sum to m."""
    if m <= 0:
        return np.zeros(0, dtype=np.int64)
    out = []
    total = 0
    batch = max(8, int(2 * m / max(lam, 1e-3)) + 8)
    while total < m:
        draw = rng.poisson(lam, size=batch).astype(np.int64)
        cs = total + np.cumsum(draw)
        hit = np.flatnonzero(cs >= m)
        if hit.shape[0]:
            k = int(hit[0])
            draw = draw[: k + 1].copy()
            draw[k] -= int(cs[k]) - m
            out.append(draw)
            total = m
        else:
            out.append(draw)
            total = int(cs[-1])
    return np.concatenate(out)


def bart_noise(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_id: int,
    masked_lm_prob: float = 0.15,
    poisson_lambda: float = 3.0,
    delete_mask_prob: float = 0.0,
    word_starts: Optional[np.ndarray] = None,
    sentence_starts: Optional[np.ndarray] = None,
    special_ids: Sequence[int] = (),
    max_length: Optional[int] = None,
    return_info: bool = False,
):
    """BART noising of one token sequence (see the module docstring); returns the noised int64 array.

    ``word_starts`` (bool per token): whole-word units; None = every token is a unit.
    ``sentence_starts`` (bool per token): permute the sentences first; None = no permutation.
    ``max_length``: length-0 insertions beyond it are dropped, so the result fits (``len(tokens) <=
    max_length`` is required; nothing else lengthens a sample).
    With ``return_info`` returns ``(noised, NoiseInfo)``.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    n_tok = tokens.shape[0]
    if max_length is not None and n_tok > max_length:
        raise ValueError(f"bart_noise: {n_tok} tokens do not fit max_length={max_length}")
    order = None
    src = None
    if sentence_starts is not None:
        tokens, src, order = permute_sentences(tokens, np.asarray(sentence_starts, dtype=bool), rng)
        if word_starts is not None:
            ws = np.asarray(word_starts, dtype=bool)[src].copy()
            if order is not None:  # every sentence start is a word start
                ss = np.asarray(sentence_starts, dtype=bool)
                ws |= ss[src]
            word_starts = ws
    permuted = tokens

    # ---- units
    special = np.isin(tokens, np.asarray(list(special_ids), dtype=np.int64)) if len(special_ids) else \
        np.zeros(n_tok, dtype=bool)
    boundary = np.ones(n_tok, dtype=bool) if word_starts is None else np.asarray(word_starts, dtype=bool).copy()
    if n_tok:
        boundary[0] = True
        boundary[1:] |= special[1:] | special[:-1]
    unit_start = np.flatnonzero(boundary)
    unit_end = np.concatenate([unit_start[1:], [n_tok]]).astype(np.int64)
    maskable_units = ~special[unit_start] if n_tok else np.zeros(0, dtype=bool)
    m_start = unit_start[maskable_units]
    m_end = unit_end[maskable_units]
    n = int(m_start.shape[0])

    # ---- budget and span lengths
    m = int(math.floor(masked_lm_prob * n + rng.random())) if n else 0
    m = min(m, n)
    lengths = _poisson_spans(m, float(poisson_lambda), rng)
    k = int(lengths.shape[0])
    free_units = n - m
    while k > 1 and k - 1 > free_units:  # not enough unmasked units to separate the spans: merge
        lengths = np.concatenate([lengths[:-2], [lengths[-2] + lengths[-1]]])
        k -= 1

    # ---- placement: gaps g0 >= 0, g1..g_{k-1} >= 1, g_k >= 0, sum = free_units (uniform)
    if k:
        slack = free_units - (k - 1)
        bars = np.sort(rng.choice(slack + k, size=k, replace=False))
        gaps = np.diff(np.concatenate([[-1], bars, [slack + k]])) - 1
        gaps[1:k] += 1
        starts_u = np.cumsum(np.concatenate([[gaps[0]], (lengths + gaps[1:])[:-1]])).astype(np.int64)
        deleted = rng.random(k) < delete_mask_prob if delete_mask_prob > 0 else np.zeros(k, dtype=bool)
    else:
        starts_u = np.zeros(0, dtype=np.int64)
        deleted = np.zeros(0, dtype=bool)

    # ---- token-level effect. A span never removes a special token: where one lies inside a span, the
    # span is split there into pieces, each of which becomes its own mask (or is deleted).
    unit_len = (m_end - m_start).astype(np.int64)
    real = lengths > 0
    ru = np.repeat(starts_u[real], lengths[real]) + _ranges(lengths[real])  # removed units, span by span
    sid = np.repeat(np.arange(int(real.sum())), lengths[real])
    first = np.ones(ru.shape[0], dtype=bool)
    if ru.shape[0] > 1:
        # maskable units u-1, u are separated by a special when their tokens are not adjacent
        first[1:] = (sid[1:] != sid[:-1]) | (m_start[ru[1:]] != m_end[ru[1:] - 1])
    piece_units = np.diff(np.concatenate([np.flatnonzero(first), [ru.shape[0]]])).astype(np.int64)
    piece_start_u = ru[first]
    piece_deleted = deleted[real][sid[first]]
    cum_len = np.concatenate([[0], np.cumsum(unit_len)])
    piece_tokens = cum_len[piece_start_u + piece_units] - cum_len[piece_start_u]
    piece_start_tok = m_start[piece_start_u]

    code = np.zeros(n_tok, dtype=np.int8)  # 0 keep, 1 drop, 2 -> mask
    if ru.shape[0]:
        code[np.repeat(m_start[ru], unit_len[ru]) + _ranges(unit_len[ru])] = 1
        code[piece_start_tok[~piece_deleted]] = 2

    # length-0 spans (not deleted): a mask inserted before unit starts_u (at the end when == n)
    ins = (~real) & (~deleted)
    ins_units = starts_u[ins]
    ins_pos = np.where(ins_units < n, m_start[np.minimum(ins_units, max(n - 1, 0))] if n else 0, n_tok)
    ins_pos = np.asarray(ins_pos, dtype=np.int64).reshape(-1)
    keep_tok = code != 1
    base_len = int(keep_tok.sum())
    dropped = 0
    if max_length is not None and base_len + ins_pos.shape[0] > max_length:
        allowed = max(0, max_length - base_len)
        dropped = ins_pos.shape[0] - allowed
        ins_pos = ins_pos[:allowed]
    out = np.where(code == 2, mask_id, tokens)[keep_tok]
    if ins_pos.shape[0]:
        kept_before = np.concatenate([[0], np.cumsum(keep_tok)])
        out = np.insert(out, kept_before[ins_pos], mask_id)
    out = out.astype(np.int64, copy=False)
    if not return_info:
        return out
    n_ins = ins_pos.shape[0]
    starts_all = np.concatenate([piece_start_tok, ins_pos]).astype(np.int64)
    order_all = np.argsort(starts_all, kind="stable")
    info = NoiseInfo(
        span_starts=starts_all[order_all],
        span_units=np.concatenate([piece_units, np.zeros(n_ins, dtype=np.int64)])[order_all],
        span_tokens=np.concatenate([piece_tokens, np.zeros(n_ins, dtype=np.int64)])[order_all],
        deleted=np.concatenate([piece_deleted, np.zeros(n_ins, dtype=bool)])[order_all],
        permuted=permuted,
        sentence_order=order,
        num_units=n,
        dropped_insertions=int(dropped),
        source_index=None if src is None else np.asarray(src, dtype=np.int64),
    )
    return out, info


def _ranges(lengths: np.ndarray) -> np.ndarray:
    """concatenate(arange(l) for l in lengths), vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total, dtype=np.int64) - offsets


class BARTNoiser:
    """:func:`bart_noise` with the settings of ``model.data`` and the tokenizer's ids and word rules."""

    def __init__(
        self,
        tokenizer,
        masked_lm_prob: float = 0.15,
        poisson_lambda: float = 3.0,
        delete_mask_prob: float = 0.0,
        whole_word_masking: bool = False,
        permute_sentences: bool = False,
    ) -> None:
        check_noise_settings(masked_lm_prob, poisson_lambda, delete_mask_prob)
        mask = getattr(tokenizer, "mask", None)
        if mask is None:
            raise ConfigError(
                f"the {getattr(tokenizer, 'name', 'given')} tokenizer has no mask token; wrap it with "
                f"megatron_ext.tokenizers.ensure_mask_token(tokenizer) (and size the model's vocabulary from "
                f"the wrapped tokenizer's vocab_size)"
            )
        self.mask_id = int(mask)
        self.pad_id = int(tokenizer.pad)
        self.eos_id = int(tokenizer.eod)
        self.bos_id = int(tokenizer.bos) if tokenizer.bos is not None else self.eos_id
        self.special_ids = sorted({self.mask_id, self.pad_id, self.eos_id, self.bos_id,
                                   *getattr(tokenizer, "special_ids", [])})
        self.masked_lm_prob = float(masked_lm_prob)
        self.poisson_lambda = float(poisson_lambda)
        self.delete_mask_prob = float(delete_mask_prob)
        self.word_starts = word_start_fn(tokenizer) if whole_word_masking else None
        self.sentence_starts = sentence_start_fn(tokenizer) if permute_sentences else None

    def __call__(self, tokens: np.ndarray, rng: np.random.Generator, max_length: Optional[int] = None,
                 return_info: bool = False):
        tokens = np.asarray(tokens, dtype=np.int64)
        return bart_noise(
            tokens,
            rng,
            mask_id=self.mask_id,
            masked_lm_prob=self.masked_lm_prob,
            poisson_lambda=self.poisson_lambda,
            delete_mask_prob=self.delete_mask_prob,
            word_starts=None if self.word_starts is None else self.word_starts(tokens),
            sentence_starts=None if self.sentence_starts is None else self.sentence_starts(tokens),
            special_ids=self.special_ids,
            max_length=max_length,
            return_info=return_info,
        )


def check_noise_settings(masked_lm_prob: Any, poisson_lambda: Any, delete_mask_prob: Any) -> None:
    def num(v):
        return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(float(v))

    if not num(masked_lm_prob) or not 0.0 < float(masked_lm_prob) < 1.0:
        raise ConfigError(
            f"model.data.masked_lm_prob={masked_lm_prob!r}: expected a fraction strictly between 0 and 1 (e.g. 0.15)"
        )
    if not num(poisson_lambda) or float(poisson_lambda) <= 0:
        raise ConfigError(
            f"model.data.poisson_lambda={poisson_lambda!r}: expected a positive mean span length (BART uses 3.0)"
        )
    if not num(delete_mask_prob) or not 0.0 <= float(delete_mask_prob) <= 1.0:
        raise ConfigError(f"model.data.delete_mask_prob={delete_mask_prob!r}: expected a probability in [0, 1]")


# ============================================================================ document sources
class IndexedDocuments:
    """Documents of a megatron ``.bin``/``.idx`` pair (one sequence = one document), trailing eod dropped."""

    attribute_keys: Tuple[str, ...] = ()

    def __init__(self, prefix: str, eod: int) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.name = prefix
        self.prefix = prefix
        self.eod = int(eod)
        ds = IndexedDataset(prefix, mmap=True)
        lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
        pointers = np.asarray(ds.index.sequence_pointers, dtype=np.int64)
        itemsize = np.dtype(ds.index.dtype).itemsize
        has_eod = np.zeros(lengths.shape[0], dtype=bool)
        nz = np.flatnonzero(lengths > 0)
        if nz.shape[0]:
            binmm = np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r")
            for beg in range(0, nz.shape[0], 1 << 20):
                sel = nz[beg: beg + (1 << 20)]
                last = pointers[sel] // itemsize + lengths[sel] - 1
                has_eod[sel] = np.asarray(binmm[last]) == self.eod
            del binmm
        self._lengths = lengths - has_eod
        self._ds = ds

    def __getstate__(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_ds"}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._ds = None

    def __len__(self) -> int:
        return int(self._lengths.shape[0])

    def lengths(self) -> np.ndarray:
        return self._lengths

    def tokens(self, doc: int, begin: int, end: int) -> np.ndarray:
        if self._ds is None:
            from megatron.core.datasets.indexed_dataset import IndexedDataset

            self._ds = IndexedDataset(self.prefix, mmap=True)
        return np.asarray(self._ds.get(int(doc), offset=int(begin), length=int(end - begin)), dtype=np.int64)


class TextDocuments:
    """Lines of a text file (:class:`TextMemMapDataset`), tokenized when read."""

    attribute_keys: Tuple[str, ...] = ()

    def __init__(self, path: str, tokenizer, index_mapping_dir: Optional[str] = None) -> None:
        self.name = path
        self.text = TextMemMapDataset(path, tokenizer=tokenizer, index_mapping_dir=index_mapping_dir)
        self.tokenizer = tokenizer
        self._lengths: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.text)

    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = self.text.token_lengths(self.tokenizer)
        return self._lengths

    def tokens(self, doc: int, begin: int, end: int) -> np.ndarray:
        ids = self.text.get_tokens(int(doc))
        expected = None if self._lengths is None else int(self._lengths[doc])
        if expected is not None and ids.shape[0] != expected:
            raise DataError(
                f"{self.name}, line {int(doc) + 1}: has {ids.shape[0]} tokens now but {expected} when the dataset "
                f"was built; the file changed during the run"
            )
        return ids[begin:end]


class JSONLDocuments(TextDocuments):
    """Lines of a JSONL file (:class:`JSONLMemMapDataset`): the text of ``text_key`` tokenized when read, and
    the float32 values of ``attribute_keys`` per document."""

    def __init__(self, path: str, tokenizer, index_mapping_dir: Optional[str] = None, text_key: str = "text",
                 attribute_keys: Sequence[str] = ()) -> None:
        self.name = path
        self.text = JSONLMemMapDataset(path, tokenizer=tokenizer, index_mapping_dir=index_mapping_dir,
                                       text_key=text_key, attribute_keys=attribute_keys)
        self.tokenizer = tokenizer
        self.attribute_keys = tuple(self.text.attribute_keys)
        self._lengths = None

    def attributes(self, doc: int) -> np.ndarray:
        """float32 ``[len(attribute_keys)]`` of document ``doc``."""
        return self.text.attributes(int(doc))


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
        from megatron.core.datasets import helpers_cpp

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


def _parse_text_paths(data_prefix: Any, what: str = "text file (one document per line)"
                      ) -> Tuple[List[str], Optional[List[float]]]:
    value = _as_list(data_prefix)
    if value is None:
        return [], None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{PREFIX_KEY}={value!r}: expected a list of files: [file] or [w1, file1, w2, file2, ...]")
    items = list(items)
    if not items:
        return [], None

    def path(v, i):
        where = PREFIX_KEY if i is None else f"{PREFIX_KEY}[{i}]"
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{where}={v!r}: expected the path of a {what}")
        return os.path.abspath(os.path.expanduser(v.strip()))

    if len(items) == 1:
        return [path(items[0], None if isinstance(value, str) else 0)], None
    if len(items) % 2:
        raise ConfigError(
            f"{PREFIX_KEY} has {len(items)} entries: {items!r}; expected one file, or weight/file pairs "
            f"[w1, file1, w2, file2, ...] (an even number of entries)"
        )
    weights = [_parse_weight(items[i], i) for i in range(0, len(items), 2)]
    paths = [path(items[i], i) for i in range(1, len(items), 2)]
    return paths, (weights if len(paths) > 1 else None)


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
    attribute_keys = _as_list(_cfg(data_cfg, "attribute_keys", []))
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


def _open_sources(data_cfg, tokenizer, impl: str, text_key: str = "text", attribute_keys: Sequence[str] = ()
                  ) -> Tuple[List[Any], Optional[List[float]]]:
    if impl in ("text_mmap", "jsonl"):
        what = "text file (one document per line)" if impl == "text_mmap" else "JSONL file (one JSON object per line)"
        paths, weights = _parse_text_paths(_cfg(data_cfg, "data_prefix", []), what)
        if not paths:
            files = "text files" if impl == "text_mmap" else "JSONL files"
            raise ConfigError(
                f"model.data.data_prefix is empty but model.data.data_impl={impl} needs {files}: "
                f"[file] or [w1, file1, w2, file2, ...]; use data_impl=mmap for the built-in corpus"
            )
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

        return _collective_check(open_all), weights

    prefixes, weights = parse_data_prefix(_cfg(data_cfg, "data_prefix", []))
    if not prefixes:
        # the plain tokenizer's ids are the wrapped one's, so the corpus cache is shared with GPT runs
        prefixes = [_collective_check(ensure_default_corpus, unwrap_tokenizer(tokenizer),
                                      _cfg(data_cfg, "default_corpus_dir", None))]
    cache_dir = _stats_cache_dir(data_cfg, prefixes[0])

    def open_all():
        out = []
        for i, p in enumerate(prefixes):
            key = f"model.data.data_prefix[{2 * i + 1}]" if weights is not None else "model.data.data_prefix"
            info = validate_indexed_dataset(p, int(tokenizer.vocab_size), cache_dir, getattr(tokenizer, "name", None),
                                            key)
            logger.info("dataset %s: %d documents, %d tokens", p, info.num_sequences, info.num_tokens)
            out.append(IndexedDocuments(p, int(tokenizer.eod)))
        return out

    return _collective_check(open_all), weights


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

    sources, weights = _open_sources(data_cfg, tokenizer, impl, text_key, attribute_keys)

    out: List[Optional[Any]] = []
    for s, (name, size) in enumerate(zip(_SPLIT_NAMES, sizes)):
        if not size or matrix[s] is None:
            out.append(None)
            continue
        if weights is None:
            idx, sidx, per = None, None, [size]
        else:
            idx, sidx = blending_indices(weights, size)
            per = [int(np.count_nonzero(idx == j)) for j in range(len(sources))]
        parts = []
        for j, src in enumerate(sources):
            beg, end = split_document_ranges(len(src), [matrix[s]])[0]
            if not per[j]:
                parts.append(None)
                continue
            if end <= beg:
                raise DataError(
                    f"{src.name}: the {name} split gets 0 of the {len(src)} documents with "
                    f"model.data.splits_string={splits_string!r}, but {per[j]} {name} samples are needed; use more "
                    f"documents or give the {name} split a larger share in model.data.splits_string"
                )
            salt = zlib.crc32(f"{j}:{os.path.basename(str(src.name))}".encode("utf-8"))
            parts.append(BARTDataset(src, (beg, end), per[j], seq_length, seq_length_dec, noiser, data_seed, name,
                                     salt=salt))
        ds = parts[0] if weights is None else BlendedBARTDataset(parts, weights, size, idx, sidx)
        for j, p in enumerate(parts):
            if p is not None:
                logger.info(
                    "BART %s split of %s: documents %d..%d, %d chunks (%d tokens) of <= %d tokens, %d samples "
                    "(%d epochs)", name, p.source.name, p.doc_range[0], p.doc_range[1] - 1, p.num_chunks,
                    p.num_tokens, p.chunk_length, len(p), p.num_epochs,
                )
        out.append(ds)
    return tuple(out)

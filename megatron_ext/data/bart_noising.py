"""BART noising: text infilling (+ optional sentence permutation), a pure function of the tokens and a
``numpy.random.Generator`` (:func:`bart_noise`), and :class:`BARTNoiser`, which binds it to ``model.data``'s
settings and a tokenizer's ids and word rules.

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

Ids: ``mask`` = ``tokenizer.mask`` (wrap the tokenizer with
:func:`megatron_ext.tokenizers.ensure_mask_token` first); ``pad`` = ``tokenizer.pad``;
``eos`` = ``tokenizer.eod``; ``bos`` = ``tokenizer.bos``, or ``eod`` when the tokenizer has no
bos (the decoder then starts from eos, like T5/BART's decoder-start token). Byte tokenizer:
eod 256, pad 257, bos 258, mask 259 (vocab 260). Sentencepiece models from
``tools/train_tokenizer.py``: unk 0, bos 1, eos 2, pad 3, mask = the model's ``<mask>`` piece
when it has one (``--user-defined-symbols "<mask>"``) else ``vocab_size`` (appended).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np

from megatron_ext.errors import ConfigError
from megatron_ext.tokenizers.byte import ByteTokenizer
from megatron_ext.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer
from megatron_ext.tokenizers.special_tokens import unwrap_tokenizer

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


__all__ = ["NoiseInfo", "BARTNoiser", "bart_noise", "check_noise_settings", "permute_sentences",
           "sentence_start_fn", "word_start_fn"]

"""Perplexity / cross-entropy scoring of an ``LM`` (seed 003's ``perplexities``).

    mean_p, max_p, min_p, n, per_tok = lm.perplexities(["hello", "hi there"], per_token=True)
    mean_l, max_l, min_l, n, per_tok = lm.perplexities(loader, before_exp=True)     # CE (nats) instead

What is scored
    Every *prediction*: a token predicted from the tokens before it. A sequence of ``n`` tokens gives ``n - 1``
    predictions (the first token is context only; nothing is prepended). ``c_t = -ln p(token_t | context)`` is
    the per-token cross entropy in nats, computed by the model itself (``model(tokens, labels=...)``, the
    vocab-parallel CE of training; equal to ``F.cross_entropy`` on the gathered full-vocabulary logits).

The returned numbers, over all ``N`` = ``total_tokens`` predictions of all sequences
    * ``before_exp=True``:  ``mean`` = ``sum(c_t) / N`` (the mean per-token CE), ``max`` / ``min`` = the largest /
      smallest ``c_t``;
    * ``before_exp=False`` (default): ``mean`` = ``exp(sum(c_t) / N)`` -- the **corpus perplexity**, exp of the
      token-weighted mean CE (the standard definition; not the mean of per-token perplexities, which a single
      badly predicted token would dominate); ``max`` / ``min`` = ``exp(max c_t)`` / ``exp(min c_t)``, the
      largest / smallest per-token perplexity ``1 / p``.
    * ``per_token_res``: with ``per_token=True`` a float32 tensor ``[num_sequences, max_len - 1]``: row ``i``,
      column ``j`` is the value (``c`` or ``exp(c)``) of the prediction of token ``j + 1`` of sequence ``i``;
      ``dummy_res`` wherever no prediction was made (past the end of a shorter sequence, or a position with
      ``loss_mask == 0``). ``per_token=False``: an empty list.

Inputs (``data``)
    * a list/tuple of sequences: strings (tokenized with ``lm.tokenizer``), lists of token ids or 1-D tensors;
    * a path to a text file: one sequence per line (blank lines skipped, ``\\r\\n`` accepted), or JSONL (name ending
      in ``.json``/``.jsonl``, or a first non-blank line that is a JSON object; ``tools/preprocess_data.py``'s
      conventions): one object per line, the sequence under ``text_key`` (default ``text``);
    * a ``torch.utils.data.DataLoader`` (or a single ``[b, s]`` tensor) whose batches are ``[b, s]`` token tensors
      (each row one sequence, every token scored) or dicts as our GPT datasets give: ``tokens`` ``[b, s]`` and
      optionally ``labels`` (default: ``tokens`` shifted by one), ``loss_mask`` (positions with 0 are not scored)
      and ``position_ids``. With ``labels`` a row gives ``s`` predictions: ``per_token_res`` has ``s`` columns.
      A DataLoader's batches are re-grouped into forward passes of ``batch_size`` rows.

Sequences longer than the model's context (``model.seq_length``, or ``max_length``) are scored with a **sliding
window**, never truncated: windows of ``W = max_length`` input tokens start every ``stride`` tokens (default
``W // 2``); each prediction is made once, in the first window that holds it, so every prediction after the
first window sees at least ``W - stride + 1`` tokens of context (the standard strided evaluation; ``stride = W``
gives disjoint windows). Rows that come with explicit ``position_ids`` must fit one window (a DataError otherwise).

Packed documents (GPT, ``reset_attention_mask`` / ``reset_position_ids``, by default the LM's training config):
the documents of a sequence (separated by ``eod``; a batch may give ``segment_ids``) attend only to themselves and
their positions restart, so each is scored as if it were alone (see :func:`perplexities`).

Encoder-decoder LMs (``lm.family == "encdec"``) score the target given the source, as in BART training: the
decoder reads ``bos + target`` and predicts ``target + eos`` (``bos`` = ``tokenizer.bos``, or eod when the
tokenizer has none; ``eos`` = eod), so a target of ``n`` tokens gives ``n + 1`` predictions (``per_token_res``
row ``i`` holds them: the decoder sequence ``bos + target + eos`` is the "sequence" of ``n + 2`` tokens).
``data``: a list of ``(source, target)`` pairs, a JSONL file with ``source`` and ``target`` keys, or a DataLoader
of our BART batches (dicts with ``text_enc``, ``enc_mask``, ``text_dec``, ``labels``, ``loss_mask``). The source
must fit ``model.seq_length`` and ``bos + target`` ``model.seq_length_dec`` (no sliding window here: a
DataError names the pair).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from megatron_ext.errors import ConfigError, DataError
from megatron_ext.models.encoder_decoder import resolve_seq_length_dec
from megatron_ext.modules.doc_attention import document_position_ids, segment_ids_from_tokens
from megatron_ext.text_files import detect_format

PAIR_KEYS = ("source", "target")


@dataclass
class _Item:
    """One scored sequence: ``tokens`` (model input) and ``labels`` (what each position predicts), ``mask`` (which
    predictions count); encoder-decoder items also carry the encoder input."""

    tokens: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long
    mask: torch.Tensor  # [L] bool
    position_ids: Optional[torch.Tensor] = None  # [L] long
    segment_ids: Optional[torch.Tensor] = None  # [L] int (document numbers of a packed row)
    source: Optional[torch.Tensor] = None  # [S] long (encdec)
    source_mask: Optional[torch.Tensor] = None  # [S] bool (encdec)
    where: str = ""


@dataclass
class _Piece:
    item: int  # index of the item
    begin: int  # window [begin, end) of the item's positions
    end: int
    score_from: int  # predictions at positions >= score_from (and < end) are counted


# ------------------------------------------------------------------------------------------------ arguments
def _check_args(per_token, before_exp, dummy_res, batch_size, max_length, stride):
    for name, value in (("per_token", per_token), ("before_exp", before_exp)):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: expected True or False")
    if isinstance(dummy_res, bool) or not isinstance(dummy_res, (int, float)):
        raise ConfigError(f"dummy_res={dummy_res!r}: expected a number")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: expected a positive integer")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ConfigError(f"max_length={max_length!r}: expected a positive integer or None (the model's seq_length)")
    if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or stride < 1):
        raise ConfigError(f"stride={stride!r}: expected a positive integer or None (max_length // 2)")


def _window(lm, max_length: Optional[int], stride: Optional[int]) -> Tuple[int, int]:
    """(W, stride) of the sliding window for a decoder-only LM."""
    cfg = lm.model.config
    seq_length = int(cfg.seq_length)
    W = seq_length if max_length is None else int(max_length)
    emb = getattr(lm.model, "embedding", None)
    max_pos = getattr(emb, "max_position_embeddings", None)
    if max_pos is not None and W > int(max_pos):
        raise ConfigError(f"max_length={W}: the model's learned position embeddings cover "
                          f"model.max_position_embeddings={max_pos} positions; use max_length <= {max_pos}")
    step = max(1, W // 2) if stride is None else int(stride)
    if step > W:
        raise ConfigError(f"stride={step}: expected at most the window length max_length={W} (a larger stride would "
                          f"skip tokens)")
    return W, step


# ------------------------------------------------------------------------------------------------ inputs
def _ids(lm, x, where: str) -> List[int]:
    if isinstance(x, str):
        return lm.encode(x)
    if isinstance(x, torch.Tensor):
        if x.dim() != 1:
            raise DataError(f"{where}: expected a 1-D tensor of token ids, got shape {tuple(x.shape)}")
        if x.is_floating_point() and not torch.equal(x, x.round()):
            raise DataError(f"{where}: a tensor of token ids must hold integers")
        return [int(t) for t in x.tolist()]
    if isinstance(x, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
        return [int(t) for t in x]
    raise DataError(f"{where}: expected a string, a list of token ids or a 1-D tensor, got {type(x).__name__}")


def _check_ids(ids: Sequence[int], vocab: int, where: str) -> None:
    bad = [t for t in ids if t < 0 or t >= vocab]
    if bad:
        raise DataError(f"{where}: token id {bad[0]} is outside the model's vocabulary [0, {vocab})")


def _lm_item(ids: List[int], where: str) -> _Item:
    t = torch.tensor(ids, dtype=torch.long)
    n = max(len(ids) - 1, 0)
    return _Item(tokens=t[:n], labels=t[1:n + 1], mask=torch.ones(n, dtype=torch.bool), where=where)


def _bos_eos(lm) -> Tuple[int, int]:
    tok = lm.tokenizer
    eos = int(tok.eod)
    bos = int(tok.bos) if getattr(tok, "bos", None) is not None else eos
    return bos, eos


def _pair_item(lm, src_ids: List[int], tgt_ids: List[int], where: str) -> _Item:
    bos, eos = _bos_eos(lm)
    cfg = lm.model.config

    s_enc, s_dec = int(cfg.seq_length), resolve_seq_length_dec(cfg)
    if not src_ids:
        raise DataError(f"{where}: the source is empty; the target is scored given a non-empty source")
    if len(src_ids) > s_enc:
        raise DataError(f"{where}: the source has {len(src_ids)} tokens, more than model.seq_length={s_enc} the "
                        f"encoder takes; split or shorten it")
    if len(tgt_ids) + 1 > s_dec:
        raise DataError(f"{where}: bos + the target is {len(tgt_ids) + 1} tokens, more than model.seq_length_dec="
                        f"{s_dec} the decoder takes; split or shorten it")
    dec = torch.tensor([bos] + tgt_ids, dtype=torch.long)
    labels = torch.tensor(tgt_ids + [eos], dtype=torch.long)
    src = torch.tensor(src_ids, dtype=torch.long)
    return _Item(tokens=dec, labels=labels, mask=torch.ones(len(dec), dtype=torch.bool), source=src,
                 source_mask=torch.ones(len(src), dtype=torch.bool), where=where)


def _sequence_item(lm, x, where: str) -> _Item:
    vocab = int(lm.model.vocab_size)
    if lm.family == "encdec":
        if not (isinstance(x, (list, tuple)) and len(x) == 2 and not all(isinstance(t, int) for t in x)):
            raise DataError(f"{where}: an encoder-decoder LM scores (source, target) pairs; got "
                            f"{type(x).__name__}" + (f" of length {len(x)}" if isinstance(x, (list, tuple)) else ""))
        src = _ids(lm, x[0], f"{where}[0] (source)")
        tgt = _ids(lm, x[1], f"{where}[1] (target)")
        _check_ids(src, vocab, f"{where}[0] (source)")
        _check_ids(tgt, vocab, f"{where}[1] (target)")
        return _pair_item(lm, src, tgt, where)
    ids = _ids(lm, x, where)
    _check_ids(ids, vocab, where)
    return _lm_item(ids, where)


def _file_items(lm, path: str, text_key: str) -> Iterator[_Item]:
    shown = os.fspath(path)
    if not os.path.exists(shown):
        raise DataError(f"data='{shown}': no such file (pass a list of strings to score text directly)")
    if not os.path.isfile(shown):
        raise DataError(f"data='{shown}': not a file")
    jsonl = detect_format(shown) == "jsonl"
    if lm.family == "encdec" and not jsonl:
        raise DataError(f"data='{shown}': an encoder-decoder LM scores (source, target) pairs; expected a JSONL file "
                        f"with '{PAIR_KEYS[0]}' and '{PAIR_KEYS[1]}' keys")
    keys = PAIR_KEYS if lm.family == "encdec" else (text_key,)
    with open(shown, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{shown}, line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not valid UTF-8") from None
            if lineno == 1:
                line = line.lstrip("\ufeff")
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if not jsonl:
                yield _sequence_item(lm, line, where)
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object with key(s) {', '.join(keys)}, got a JSON "
                                f"{type(obj).__name__}")
            for key in keys:
                if key not in obj:
                    have = ", ".join(list(obj)[:10]) or "(none)"
                    raise DataError(f"{where}: missing key '{key}'; the object has keys: {have}")
                if not isinstance(obj[key], str):
                    raise DataError(f"{where}: key '{key}' holds a JSON {type(obj[key]).__name__}, expected a string")
            x = (obj[keys[0]], obj[keys[1]]) if lm.family == "encdec" else obj[text_key]
            yield _sequence_item(lm, x, where)


def _as_long(t, name: str, where: str, shape=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise DataError(f"{where}: '{name}' is a {type(t).__name__}, expected a tensor")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise DataError(f"{where}: '{name}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t.detach().cpu()


def _batch_items(lm, batch, where: str) -> Iterator[_Item]:
    vocab = int(lm.model.vocab_size)
    if lm.family == "encdec":
        need = ("text_enc", "text_dec", "labels")
        if not isinstance(batch, dict) or any(k not in batch for k in need):
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise DataError(f"{where}: an encoder-decoder LM expects BART batches (dicts with {', '.join(need)}, "
                            f"enc_mask, loss_mask), got {got}")
        enc = _as_long(batch["text_enc"], "text_enc", where)
        if enc.dim() != 2:
            raise DataError(f"{where}: 'text_enc' has shape {tuple(enc.shape)}, expected [batch, seq]")
        dec = _as_long(batch["text_dec"], "text_dec", where)
        if dec.dim() != 2 or dec.shape[0] != enc.shape[0]:
            raise DataError(f"{where}: 'text_dec' has shape {tuple(dec.shape)}, expected [{enc.shape[0]}, seq_dec]")
        labels = _as_long(batch["labels"], "labels", where, dec.shape)
        loss_mask = batch.get("loss_mask")
        mask = (torch.ones_like(dec, dtype=torch.bool) if loss_mask is None
                else _as_long(loss_mask, "loss_mask", where, dec.shape) > 0)
        enc_mask = batch.get("enc_mask")
        enc_mask = (torch.ones_like(enc, dtype=torch.bool) if enc_mask is None
                    else _as_long(enc_mask, "enc_mask", where, enc.shape).bool())
        for r in range(enc.shape[0]):
            w = f"{where}, row {r}"
            for name, t in (("text_enc", enc[r]), ("text_dec", dec[r]), ("labels", labels[r][mask[r]])):
                _check_ids(t.tolist(), vocab, f"{w} ('{name}')")
            yield _Item(tokens=dec[r].long(), labels=labels[r].long(), mask=mask[r], source=enc[r].long(),
                        source_mask=enc_mask[r], where=w)
        return
    if isinstance(batch, torch.Tensor):
        batch = {"tokens": batch}
    if not isinstance(batch, dict) or "tokens" not in batch:
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{where}: expected a [batch, seq] tensor of token ids or a dict with 'tokens' (and optionally "
                        f"'labels', 'loss_mask', 'position_ids'), got {got}")
    tokens = _as_long(batch["tokens"], "tokens", where)
    if tokens.dim() != 2:
        raise DataError(f"{where}: 'tokens' has shape {tuple(tokens.shape)}, expected [batch, seq]")
    if tokens.is_floating_point():
        raise DataError(f"{where}: 'tokens' must be an integer tensor, got {tokens.dtype}")
    labels = batch.get("labels")
    loss_mask = batch.get("loss_mask")
    pos = batch.get("position_ids")
    seg = batch.get("segment_ids")
    if seg is not None:
        seg = _as_long(seg, "segment_ids", where, tokens.shape)
        if seg.is_floating_point() or seg.dtype == torch.bool:
            raise DataError(f"{where}: 'segment_ids' must be an integer tensor (document numbers), got {seg.dtype}")
    if labels is None:
        if loss_mask is not None or pos is not None or seg is not None:
            raise DataError(f"{where}: 'loss_mask' / 'position_ids' / 'segment_ids' need 'labels' (they are aligned "
                            f"with the labels)")
        for r in range(tokens.shape[0]):
            ids = tokens[r].tolist()
            _check_ids(ids, vocab, f"{where}, row {r}")
            yield _lm_item(ids, f"{where}, row {r}")
        return
    labels = _as_long(labels, "labels", where, tokens.shape)
    mask = (torch.ones_like(tokens, dtype=torch.bool) if loss_mask is None
            else _as_long(loss_mask, "loss_mask", where, tokens.shape) > 0)
    if pos is not None:
        pos = _as_long(pos, "position_ids", where, tokens.shape).long()
    for r in range(tokens.shape[0]):
        w = f"{where}, row {r}"
        _check_ids(tokens[r].tolist(), vocab, f"{w} ('tokens')")
        _check_ids(labels[r][mask[r]].tolist(), vocab, f"{w} ('labels')")
        yield _Item(tokens=tokens[r].long(), labels=labels[r].long(), mask=mask[r],
                    position_ids=None if pos is None else pos[r], segment_ids=None if seg is None else seg[r],
                    where=w)


def iter_items(lm, data, text_key: str = "text") -> Iterator[_Item]:
    """The sequences of ``data`` (see the module docstring) as scoring items; raises DataError on bad input."""
    from torch.utils.data import DataLoader

    if isinstance(data, (str, os.PathLike)):
        yield from _file_items(lm, data, text_key)
    elif isinstance(data, DataLoader):
        for i, batch in enumerate(data):
            yield from _batch_items(lm, batch, f"DataLoader batch {i}")
    elif isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise DataError(f"data: a tensor must be a [batch, seq] batch of token ids, got shape "
                            f"{tuple(data.shape)} (wrap a single sequence in a list)")
        yield from _batch_items(lm, data, "data")
    elif isinstance(data, (list, tuple)):
        for i, x in enumerate(data):
            yield _sequence_item(lm, x, f"data[{i}]")
    else:
        raise DataError(f"data: expected a list of sequences (strings, token-id lists, 1-D tensors"
                        f"{'; (source, target) pairs' if lm.family == 'encdec' else ''}), a path to a text/JSONL file "
                        f"or a torch DataLoader, got {type(data).__name__}")


# ------------------------------------------------------------------------------------------------ scoring
def _pieces(item: _Item, index: int, W: Optional[int], stride: int) -> List[_Piece]:
    L = int(item.tokens.numel())
    if L == 0 or not bool(item.mask.any()):
        return []
    if W is None or L <= W:
        return [_Piece(index, 0, L, 0)]
    if item.position_ids is not None:
        raise DataError(f"{item.where}: {L} positions with explicit position_ids do not fit the model's context of "
                        f"{W} tokens (a sliding window cannot reuse them)")
    out, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + W, L)
        out.append(_Piece(index, begin, end, prev_end))
        prev_end = end
        if end == L:
            return out
        begin += stride


def _pad_stack(rows: List[torch.Tensor], value, dtype) -> torch.Tensor:
    n = max(int(r.numel()) for r in rows)
    out = torch.full((len(rows), n), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


def _documents(lm, reset_attention_mask: Optional[bool], reset_position_ids: Optional[bool]) -> Tuple[bool, bool]:
    """(keep attention within documents, restart positions per document) for scoring: the arguments, or where
    None the LM's training config (``model.data.reset_attention_mask`` / ``reset_position_ids``)."""
    for name, value in (("reset_attention_mask", reset_attention_mask), ("reset_position_ids", reset_position_ids)):
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: expected True, False or None (the model's training config)")
    data = ((lm.config or {}).get("model") or {}).get("data") or {}
    attn = bool(data.get("reset_attention_mask", False)) if reset_attention_mask is None else reset_attention_mask
    pos = bool(data.get("reset_position_ids", False)) if reset_position_ids is None else reset_position_ids
    if (attn or pos) and lm.family != "gpt":
        if reset_attention_mask or reset_position_ids:
            raise ConfigError(f"reset_attention_mask / reset_position_ids: packed documents are scored by GPT "
                              f"(transformer) LMs only, this LM is {lm.family!r}")
        return False, False
    return attn, pos


@torch.no_grad()
def _forward(lm, items: List[_Item], pieces: List[_Piece], docs: Tuple[bool, bool] = (False, False)
             ) -> List[torch.Tensor]:
    """Per-token CE of every piece (``[end - begin]`` fp32 CPU tensors). ``docs``: (attention within documents,
    positions restarted per document) -- documents end at eod (or as the item's ``segment_ids`` say)."""
    device = lm.device
    pad = 0
    toks = [items[p.item].tokens[p.begin:p.end] for p in pieces]
    labs = [items[p.item].labels[p.begin:p.end] for p in pieces]
    # positions whose label is masked may hold any id (e.g. -100 or pad); they are not counted, so use 0 there
    labs = [torch.where(items[p.item].mask[p.begin:p.end], lab, torch.zeros_like(lab)) for p, lab in zip(pieces, labs)]
    tokens = _pad_stack(toks, pad, torch.long).to(device)
    labels = _pad_stack(labs, 0, torch.long).to(device)
    model = lm.model
    if lm.family == "encdec":
        srcs = [items[p.item].source for p in pieces]
        enc = _pad_stack(srcs, pad, torch.long).to(device)
        enc_mask = _pad_stack([items[p.item].source_mask for p in pieces], False, torch.bool).to(device)
        ce = model(enc, tokens, enc_mask, labels=labels)
    else:
        position_ids, segs, extra = None, None, {}
        if lm.family == "gpt" and any(docs):
            eod = int(lm.tokenizer.eod)
            segs = []
            for p, tok in zip(pieces, toks):
                given = items[p.item].segment_ids
                segs.append(given[p.begin:p.end].long() if given is not None else
                            segment_ids_from_tokens(tok, eod).long())
        if lm.family == "gpt" and (docs[1] or any(items[p.item].position_ids is not None for p in pieces)):
            rows = []
            for i, p in enumerate(pieces):
                given = items[p.item].position_ids
                if given is not None:
                    rows.append(given[p.begin:p.end])
                elif docs[1]:
                    rows.append(document_position_ids(segs[i]))
                else:
                    rows.append(torch.arange(p.end - p.begin))
            position_ids = _pad_stack(rows, 0, torch.long).to(device)
        if docs[0]:
            # right padding is one more document of its own (real tokens never attend to it: causal)
            extra["segment_ids"] = _pad_stack(segs, 2**30, torch.long).to(device=device, dtype=torch.int32)
        ce = model(tokens, position_ids=position_ids, labels=labels, **extra)
    ce = ce.float().cpu()
    return [ce[i, : p.end - p.begin] for i, p in enumerate(pieces)]


def perplexities(lm, data, *, per_token: bool = False, before_exp: bool = False, dummy_res: float = -1.0,
                 batch_size: int = 8, max_length: Optional[int] = None, stride: Optional[int] = None,
                 text_key: str = "text", reset_attention_mask: Optional[bool] = None,
                 reset_position_ids: Optional[bool] = None) -> Tuple[float, float, float, int, Union[torch.Tensor, list]]:
    """``(mean, max, min, total_tokens, per_token_res)`` of ``lm`` on ``data``; see the module docstring for the
    definitions, the accepted inputs and the sliding window (``max_length`` = window length, default the model's
    ``seq_length``; ``stride`` default ``max_length // 2``; decoder-only LMs only). ``batch_size``: rows (windows)
    per forward pass. The model runs in eval mode (no dropout) and is put back in its previous mode afterwards.

    Packed documents (GPT): with ``reset_attention_mask`` every document of a row (ending at ``eod``, or as a
    batch's ``segment_ids`` say) attends only to itself, and with ``reset_position_ids`` its positions restart at
    0 -- together a document is scored as if it were alone (the prediction of a document's first token from the
    previous document's ``eod`` is still made, from that ``eod``'s document). Both default to the LM's training
    config (``model.data.reset_attention_mask`` / ``reset_position_ids``)."""
    _check_args(per_token, before_exp, dummy_res, batch_size, max_length, stride)
    docs = _documents(lm, reset_attention_mask, reset_position_ids)
    if lm.family == "encdec":
        if max_length is not None or stride is not None:
            raise ConfigError("max_length / stride: the sliding window is for decoder-only LMs; an encoder-decoder "
                              "LM scores each (source, target) pair in one pass")
        W, step = None, 1
    else:
        W, step = _window(lm, max_length, stride)

    items: List[_Item] = []
    rows: List[torch.Tensor] = []
    total, count = 0.0, 0
    hi, lo = -math.inf, math.inf
    queue: List[_Piece] = []

    def flush():
        nonlocal total, count, hi, lo
        if not queue:
            return
        for p, ce in zip(queue, _forward(lm, items, queue, docs)):
            item = items[p.item]
            keep = item.mask[p.begin:p.end].clone()
            keep[: max(0, p.score_from - p.begin)] = False
            vals = ce[keep].double()
            if vals.numel():
                total += float(vals.sum())
                count += int(vals.numel())
                hi = max(hi, float(vals.max()))
                lo = min(lo, float(vals.min()))
            if per_token:
                seg = rows[p.item][p.begin:p.end]
                seg[keep] = ce[keep]
        queue.clear()

    model = lm.model
    was_training = model.training
    model.eval()
    try:
        for item in iter_items(lm, data, text_key):
            idx = len(items)
            items.append(item)
            if per_token:
                rows.append(torch.full((int(item.tokens.numel()),), math.nan, dtype=torch.float32))
            for piece in _pieces(item, idx, W, step):
                queue.append(piece)
                if len(queue) >= batch_size:
                    flush()
            # items are only needed until their pieces ran: keep memory flat on long DataLoaders
            if not queue:
                _release(items)
        flush()
    finally:
        model.train(was_training)

    if not items:
        raise DataError("data: no sequences to score (empty list, empty file or empty DataLoader)")
    if count == 0:
        raise DataError("data: nothing to score: every sequence has fewer than 2 tokens (or every loss_mask is 0); "
                        "a prediction needs at least one token of context")
    mean_ce = total / count
    if before_exp:
        mean, mx, mn = mean_ce, hi, lo
    else:
        mean, mx, mn = _exp(mean_ce), _exp(hi), _exp(lo)
    per_token_res: Union[torch.Tensor, list] = []
    if per_token:
        width = max(int(r.numel()) for r in rows)
        res = torch.full((len(rows), width), float(dummy_res), dtype=torch.float32)
        for i, r in enumerate(rows):
            done = ~torch.isnan(r)
            vals = r[done] if before_exp else torch.exp(r[done])
            res[i, : r.numel()][done] = vals
        per_token_res = res
    return mean, mx, mn, count, per_token_res


def _release(items: List[Any]) -> None:
    """Drop the tensors of items whose pieces have all run (their slot stays, so indices do not move)."""
    for i in range(len(items) - 1, -1, -1):
        if items[i] is None:
            break
        items[i] = None


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


__all__ = ["perplexities", "iter_items", "PAIR_KEYS"]

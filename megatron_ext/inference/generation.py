"""Batched text generation for every model family: GPT (``GPTModel``), Mega GPT (``MegaGPTModel``) and the
encoder-decoder (``EncoderDecoderModel``), with a KV cache.

    from megatron_ext.inference.generation import generate, sample
    generate(lm, ["To be", "or not"], max_new_tokens=50, temperature=0.7, top_p=0.9, seed=1)
    generate(lm, "To be", max_new_tokens=50, greedy=True, output="both")     # {"text", "tokens", ...}
    generate(lm, ["To be"], num_beams=4, length_penalty=1.0)                  # beam search
    sample(lm, pref="To be", max_seq_len=50, temperature=0.5)                 # seed 003's LM.sample

``lm`` is a :class:`megatron_ext.inference.lm.LM` (model + tokenizer + family).

Prompts
    A string, a list of token ids or a 1-D tensor (one prompt: one result), or a list of those / a 2-D tensor
    (a batch: a list of results). GPT / Mega: the prompt is the start of the text, and an empty prompt starts
    from the end-of-document token (what precedes a document in training). Encoder-decoder: the prompt is the
    source text, encoded like the BART task's encoder input (right-padded, padding masked) and the decoder
    starts from ``bos`` (``eod`` when the tokenizer has none), as ``text_dec`` does in training.

Batches of different lengths
    GPT / Mega prompts are left-padded into one batch. ``padding_mask`` makes every row behave as if it were
    alone: its positions count from its first real token and padding keys are masked out. Mega with chunked
    attention (``model.mega.chunk_size > 0``) is the exception -- the chunk boundaries would move with the
    padding -- so there prompts of different lengths run as separate sub-batches (one per length). A row that
    stops is dropped from the batch (the others keep going).

Decoding (each step, on the full-vocabulary logits, in this order)
    banned tokens (default: pad; for the encoder-decoder also bos and the mask token, which training never
    asks it to produce) -> repetition penalty (CTRL: a logit of a token already present -- in the prompt or
    generated -- is divided by the penalty when positive, multiplied when negative) -> greedy argmax when
    ``greedy`` or ``temperature == 0``, else ``logits / temperature`` -> top-k *or* nucleus (top-p) filtering
    -> a draw from the softmax with ``generator`` / ``seed``. ``num_beams > 1`` runs beam search instead
    (deterministic, scored like Hugging Face: summed log-probabilities of the processed logits, a finished
    hypothesis scored ``sum_logprobs / generated_length ** length_penalty``; ``temperature``/``seed`` do not
    apply, and ``top_k``/``top_p`` are refused).

Stopping
    ``stop_tokens``: ids, strings (tokenized; a multi-token string is a stop *sequence*) or id lists; default
    the tokenizer's eos/eod; ``[]`` = only ``max_new_tokens``. The stop sequence is not part of the output.

Caching (``use_cache=True``, the default): the prompt runs once (prefill) and each step feeds only the new
token, reusing the per-layer key/value cache (``megatron_ext.modules.attention.KVCache``; Mega: its own EMA /
key-value state, ``MegaInferenceCache``). ``use_cache=False`` re-runs the model over the whole sequence every
step (the reference; a truncated-EMA Mega model, which has no finite state, always runs that way). Both give the
same tokens. Under tensor parallelism every rank calls ``generate`` with the same arguments: the logits are
gathered over TP, so every rank takes the same decisions (and draws, with the same seed).

Options: the keyword arguments of :func:`generate` are the fields of :class:`GenerationConfig`, which checks and
normalizes them once, when it is built (``generate(lm, prompts, config=GenerationConfig(...))`` reuses one config
for many calls, as ``tools/generate.py`` does); :meth:`GenerationConfig.for_model` resolves the ones that need the
model's tokenizer (stop and banned tokens) and the generator.

Errors: every bad argument raises :class:`GenerationError` (a ``ValueError``) naming the argument and what was
expected, before the model runs -- including a request that needs more positions than a model with learned
positions has (the message names ``model.max_position_embeddings``).

The lower-level pieces are public too: :func:`process_logits` / :func:`filter_logits` / :func:`choose_tokens`
(shared with ``megatron_ext.inference.encdec_generation``) and the decoding sessions (:func:`open_session`,
``CausalLMSession``, ``EncDecSession``: ``.logits`` = next-token logits of every row, ``.step(tokens)``,
``.select(rows)``), which is how the tests compare cached and uncached logits step by step.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from megatron_ext.errors import MegatronExtError

OUTPUTS = ("text", "tokens", "both")


class GenerationError(MegatronExtError, ValueError):
    """A generation argument has a bad value (the message names it and what was expected)."""


# ---------------------------------------------------------------------------------------------------------------
# options


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass
class GenerationConfig:
    """Every option of :func:`generate` (module docstring), checked once when the config is built: a bad value is a
    :class:`GenerationError` naming the option and what was expected, and the fields are normalized (ints, floats,
    ``nucleus`` merged into ``top_p``, ``beam`` decided from ``num_beams`` when not given). The options that need
    the model's tokenizer and vocabulary (``stop_tokens``, ``banned_tokens``) and the generator (built from
    ``seed`` on the model's device) are resolved by :meth:`for_model`, which also checks them."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    greedy: bool = False
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    nucleus: Optional[float] = None
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    stop_tokens: Any = None
    banned_tokens: Optional[Sequence[int]] = None
    use_cache: bool = True
    seed: Optional[int] = None
    generator: Optional[torch.Generator] = None
    output: str = "text"
    beam: Optional[bool] = None  # None: beam search when num_beams > 1

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, value: Any, expected: str) -> None:
            if not ok:
                raise GenerationError(f"{name}={value!r}: {expected}")

        v = self.max_new_tokens
        need(_is_int(v) and int(v) >= 1, "max_new_tokens", v, "expected an integer >= 1")
        v = self.temperature
        need(_is_num(v) and math.isfinite(float(v)) and float(v) >= 0, "temperature", v,
             "expected a number >= 0 (0 = greedy argmax)")
        need(isinstance(self.greedy, bool), "greedy", self.greedy, "expected True or False")
        v = self.top_k
        need(v is None or (_is_int(v) and int(v) >= 1), "top_k", v, "expected an integer >= 1")
        if self.top_p is not None and self.nucleus is not None:
            raise GenerationError(f"top_p={self.top_p!r} and nucleus={self.nucleus!r}: they are the same option "
                                  f"(nucleus sampling); pass only one")
        top_p_name = "top_p" if self.nucleus is None else "nucleus"
        v = self.top_p if self.nucleus is None else self.nucleus
        need(v is None or (_is_num(v) and 0.0 < float(v) <= 1.0), top_p_name, v, "expected a probability in (0, 1]")
        self.max_new_tokens = int(self.max_new_tokens)
        self.temperature = float(self.temperature)
        self.top_k = None if self.top_k is None else int(self.top_k)
        self.top_p, self.nucleus = (None if v is None else float(v)), None
        if self.top_k is not None and self.top_p is not None:
            raise GenerationError(f"top_k={self.top_k} and {top_p_name}={self.top_p}: top_k and top_p (nucleus) are "
                                  f"mutually exclusive; pass one of them")
        v = self.repetition_penalty
        need(_is_num(v) and math.isfinite(float(v)) and float(v) > 0, "repetition_penalty", v,
             "expected a number > 0 (1.0 = off)")
        self.repetition_penalty = float(v)
        v = self.num_beams
        need(_is_int(v) and int(v) >= 1, "num_beams", v, "expected an integer >= 1")
        self.num_beams = int(v)
        v = self.length_penalty
        need(_is_num(v) and math.isfinite(float(v)), "length_penalty", v, "expected a finite number")
        self.length_penalty = float(v)
        need(isinstance(self.use_cache, bool), "use_cache", self.use_cache, "expected True or False")
        need(self.output in OUTPUTS, "output", self.output, f"expected one of {', '.join(OUTPUTS)}")
        self.beam = self.num_beams > 1 if self.beam is None else bool(self.beam)
        if self.beam and (self.top_k is not None or self.top_p is not None):
            raise GenerationError(f"num_beams={self.num_beams} with top_k/top_p: beam search is deterministic; drop "
                                  f"top_k and top_p (or use num_beams=1 to sample)")
        if self.seed is not None and self.generator is not None:
            raise GenerationError("seed and generator: pass only one (seed builds a generator)")
        need(self.generator is None or isinstance(self.generator, torch.Generator), "generator", self.generator,
             "expected a torch.Generator")
        need(self.seed is None or (_is_int(self.seed) and int(self.seed) >= 0), "seed", self.seed,
             "expected an integer >= 0")

    def for_model(self, lm) -> Dict[str, Any]:
        """The options that depend on ``lm``, checked against its tokenizer and vocabulary: ``stops`` (stop
        sequences as id tuples), ``banned`` (ids) and ``generator`` (``generator``, or a new one seeded with
        ``seed`` on ``lm.device``, or None)."""
        vocab = int(lm.model.vocab_size)
        generator = self.generator
        if generator is None and self.seed is not None:
            generator = torch.Generator(device=lm.device).manual_seed(int(self.seed))
        return dict(stops=_stop_sequences(lm, self.stop_tokens, vocab),
                    banned=_banned_ids(lm, self.banned_tokens, vocab), generator=generator)


# ---------------------------------------------------------------------------------------------------------------
# logits processing (shared with encdec_generation)


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Keep the ``top_k`` largest logits and/or the smallest set of most probable tokens whose probability mass
    reaches ``top_p`` (always at least one token); the rest become -inf. ``None`` (or ``top_k <= 0`` /
    ``top_p >= 1``) = no filter."""
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, int(top_k), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        remove = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def apply_repetition_penalty(logits: torch.Tensor, present: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: for every token with ``present[row, token]`` True, a positive logit is divided by
    ``penalty`` and a negative one multiplied by it."""
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(present, scaled, logits)


def process_logits(logits: torch.Tensor, *, banned: Optional[Sequence[int]] = None,
                   present: Optional[torch.Tensor] = None, repetition_penalty: float = 1.0) -> torch.Tensor:
    """Banned tokens -> -inf, then the repetition penalty (``present`` ``[n, V]`` bool). fp32 ``[n, V]``."""
    logits = logits.float()
    if banned:
        logits = logits.clone()
        logits[:, list(banned)] = float("-inf")
    if present is not None and repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, present, repetition_penalty)
    return logits


def choose_tokens(logits: torch.Tensor, *, greedy: bool, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row ``[n]`` from processed logits ``[n, V]``: argmax when ``greedy`` or
    ``temperature == 0``, else a draw from ``softmax(filter(logits / temperature))``."""
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# decoding sessions: next-token logits of a batch of rows, advanced one token at a time


class DecodingSession:
    """``logits``: next-token logits ``[n, vocab_size]`` (fp32, full vocabulary) of the ``n`` current rows;
    ``step(tokens [n])`` appends one token per row; ``select(rows)`` keeps / reorders / repeats rows."""

    logits: torch.Tensor

    def step(self, tokens: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def select(self, rows: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _last_logits(self, vocab_parallel: torch.Tensor) -> torch.Tensor:
        return self.model.gather_logits(vocab_parallel[:, -1:, :])[:, 0, :].float()


class CausalLMSession(DecodingSession):
    """GPT / Mega GPT: left-padded prompts ``[n, P]``; with ``use_cache`` the prompt runs once and each step
    feeds one token through the model's inference cache, else the whole sequence runs every step."""

    def __init__(self, model, prompts: List[List[int]], *, max_new_tokens: int, use_cache: bool, pad_id: int):
        self.model = model
        device = next(model.parameters()).device
        n, width = len(prompts), max(len(p) for p in prompts)
        tokens = torch.full((n, width), int(pad_id), dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.bool)
        for i, p in enumerate(prompts):
            tokens[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = True
        self.tokens, self.mask = tokens.to(device), mask.to(device)
        self.padded = any(len(p) < width for p in prompts)
        self.use_cache = bool(use_cache)
        self.cache = None
        with torch.no_grad():
            if self.use_cache:
                self.cache = model.new_inference_cache(n, width + max(int(max_new_tokens) - 1, 0))
                out = model(self.tokens, padding_mask=self.mask if self.padded else None, inference_cache=self.cache)
                self.tokens = self.mask = None  # the cache holds everything from here on
            else:
                out = model(self.tokens, padding_mask=self.mask if self.padded else None)
            self.logits = self._last_logits(out)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> None:
        new = tokens.view(-1, 1).to(dtype=torch.long)
        if self.use_cache:
            out = self.model(new, inference_cache=self.cache)
        else:
            self.tokens = torch.cat([self.tokens, new.to(self.tokens.device)], dim=1)
            if self.padded:
                self.mask = torch.cat([self.mask, torch.ones_like(new, dtype=torch.bool)], dim=1)
            out = self.model(self.tokens, padding_mask=self.mask if self.padded else None)
        self.logits = self._last_logits(out)

    def select(self, rows: torch.Tensor) -> None:
        rows = rows.to(device=self.logits.device, dtype=torch.long)
        if self.use_cache:
            self.cache.index_select(rows)
        else:
            self.tokens = self.tokens.index_select(0, rows)
            if self.padded:
                self.mask = self.mask.index_select(0, rows)
        self.logits = self.logits.index_select(0, rows)


class EncDecSession(DecodingSession):
    """Encoder-decoder from an encoder memory ``[S, n, h]`` (+ mask ``[n, S]``, True = attend): the decoder
    starts from ``start_id``; with ``use_cache`` each step runs the decoder on the new token only (self-attention
    cache, cross-attention keys/values projected once)."""

    def __init__(self, model, memory: torch.Tensor, memory_mask: Optional[torch.Tensor], *, start_id: int,
                 max_new_tokens: int, use_cache: bool):
        self.model = model
        self.memory, self.memory_mask = memory, memory_mask
        n = memory.shape[1]
        self.tokens = torch.full((n, 1), int(start_id), dtype=torch.long, device=memory.device)
        self.use_cache = bool(use_cache)
        self.cache = model.new_inference_cache(n, max(int(max_new_tokens), 1)) if self.use_cache else None
        with torch.no_grad():
            self.logits = self._last_logits(self._run(self.tokens))

    def _run(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens, self.memory, self.memory_mask, inference_cache=self.cache)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> None:
        new = tokens.view(-1, 1).to(device=self.memory.device, dtype=torch.long)
        if self.use_cache:
            out = self._run(new)
        else:
            self.tokens = torch.cat([self.tokens, new], dim=1)
            out = self._run(self.tokens)
        self.logits = self._last_logits(out)

    def select(self, rows: torch.Tensor) -> None:
        rows = rows.to(device=self.memory.device, dtype=torch.long)
        self.memory = self.memory.index_select(1, rows)
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, rows)
        if self.use_cache:
            self.cache.index_select(rows)
        else:
            self.tokens = self.tokens.index_select(0, rows)
        self.logits = self.logits.index_select(0, rows.to(self.logits.device))


def _encode_sources(lm, sources: List[List[int]]):
    """Source ids -> encoder memory ``[S, n, h]`` and its mask (right-padded, like the BART task's encoder input;
    the hiddens module's transforms applied, as in training). An empty source is one (attended) pad token, in a
    batch as alone."""
    model = lm.model
    device = lm.device
    sources = [s if s else [int(lm.tokenizer.pad)] for s in sources]
    n, width = len(sources), max(len(s) for s in sources)
    enc = torch.full((n, width), int(lm.tokenizer.pad), dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.bool)
    for i, s in enumerate(sources):
        enc[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    with torch.no_grad():
        outs = model.encode_latents(enc.to(device), mask.to(device))
    return outs["enc_output"], outs["enc_output_mask"]


def open_session(lm, prompts: List[List[int]], *, max_new_tokens: int, use_cache: bool = True) -> DecodingSession:
    """A decoding session over token-id prompts (already validated: non-empty for GPT/Mega), on ``lm.model`` in
    its current mode (call under ``model.eval()``). ``use_cache`` falls back to False for a model that cannot
    cache."""
    model = lm.model
    use_cache = bool(use_cache) and bool(getattr(model, "supports_inference_cache", False))
    if lm.family == "encdec":
        memory, memory_mask = _encode_sources(lm, prompts)
        return EncDecSession(model, memory, memory_mask, start_id=_decoder_start(lm.tokenizer),
                             max_new_tokens=max_new_tokens, use_cache=use_cache)
    return CausalLMSession(model, prompts, max_new_tokens=max_new_tokens, use_cache=use_cache,
                           pad_id=int(lm.tokenizer.pad))


# ---------------------------------------------------------------------------------------------------------------
# prompts, stop sequences, limits


def _decoder_start(tok) -> int:
    """The decoder's first token in training (``text_dec[0]``): bos, or eod when the tokenizer has no bos."""
    return int(tok.bos) if getattr(tok, "bos", None) is not None else int(tok.eod)


def _eos_ids(tok) -> List[int]:
    ids = [int(tok.eod)]
    eos = getattr(tok, "eos", None)
    if eos is not None and int(eos) not in ids:
        ids.append(int(eos))
    return ids


def _prompt_ids(lm, prompt, name: str, vocab: int) -> List[int]:
    if isinstance(prompt, str):
        ids = list(lm.tokenizer.tokenize(prompt))
    elif isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1:
            raise GenerationError(f"{name}: expected a 1-D tensor of token ids, got shape {tuple(prompt.shape)}")
        if prompt.is_floating_point() or prompt.is_complex():
            raise GenerationError(f"{name}: expected an integer tensor of token ids, got dtype {prompt.dtype}")
        ids = [int(t) for t in prompt.tolist()]
    elif isinstance(prompt, (list, tuple)) and all(_is_int(t) for t in prompt):
        ids = [int(t) for t in prompt]
    else:
        raise GenerationError(f"{name}={prompt!r}: expected a string, a list of token ids or a 1-D tensor")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise GenerationError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
    return ids


def _normalize_prompts(lm, prompts, vocab: int) -> Tuple[List[List[int]], bool]:
    """-> (list of id lists, single) where ``single`` says one prompt was given (one result returned)."""
    if isinstance(prompts, str) or (isinstance(prompts, torch.Tensor) and prompts.dim() == 1):
        return [_prompt_ids(lm, prompts, "prompts", vocab)], True
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.shape[0] < 1:
            raise GenerationError(f"prompts: expected a 1-D (one prompt) or 2-D (a batch) tensor of token ids, "
                                  f"got shape {tuple(prompts.shape)}")
        return [_prompt_ids(lm, row, f"prompts[{i}]", vocab) for i, row in enumerate(prompts)], False
    if isinstance(prompts, (list, tuple)):
        if len(prompts) == 0:
            raise GenerationError("prompts=[]: expected at least one prompt (a string, a list of token ids or a "
                                  "1-D tensor)")
        if all(_is_int(t) for t in prompts):
            return [_prompt_ids(lm, list(prompts), "prompts", vocab)], True
        return [_prompt_ids(lm, p, f"prompts[{i}]", vocab) for i, p in enumerate(prompts)], False
    raise GenerationError(f"prompts={prompts!r}: expected a string, a list of token ids, a tensor, or a list of "
                          f"those")


def _stop_sequences(lm, stop_tokens, vocab: int) -> List[Tuple[int, ...]]:
    if stop_tokens is None:
        return [(t,) for t in _eos_ids(lm.tokenizer)]
    items = [stop_tokens] if isinstance(stop_tokens, (str, int)) and not isinstance(stop_tokens, bool) \
        else stop_tokens
    if not isinstance(items, (list, tuple, set)):
        raise GenerationError(f"stop_tokens={stop_tokens!r}: expected token ids, strings or lists of ids")
    out: List[Tuple[int, ...]] = []
    for item in items:
        if _is_int(item):
            seq = (int(item),)
        elif isinstance(item, str):
            seq = tuple(int(t) for t in lm.tokenizer.tokenize_plain(item))  # no bos around it
            if not seq:
                raise GenerationError(f"stop_tokens: {item!r} tokenizes to nothing; expected a non-empty string")
        elif isinstance(item, (list, tuple)) and item and all(_is_int(t) for t in item):
            seq = tuple(int(t) for t in item)
        else:
            raise GenerationError(f"stop_tokens: {item!r} is not a token id, a string or a non-empty list of ids")
        bad = [t for t in seq if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"stop_tokens: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        out.append(seq)
    return out


def _banned_ids(lm, banned_tokens, vocab: int) -> List[int]:
    tok = lm.tokenizer
    if banned_tokens is None:
        out = [int(tok.pad)]
        if lm.family == "encdec":
            mask = getattr(tok, "mask", None)
            if mask is not None:
                out.append(int(mask))
            if _decoder_start(tok) not in _eos_ids(tok):
                out.append(_decoder_start(tok))
        return sorted({t for t in out if 0 <= t < vocab})
    if not isinstance(banned_tokens, (list, tuple, set)) or not all(_is_int(t) for t in banned_tokens):
        raise GenerationError(f"banned_tokens={banned_tokens!r}: expected a list of token ids")
    bad = [t for t in banned_tokens if not 0 <= int(t) < vocab]
    if bad:
        raise GenerationError(f"banned_tokens: token id {bad[0]} is outside the vocabulary [0, {vocab})")
    return sorted({int(t) for t in banned_tokens})


def _check_limits(lm, prompts: List[List[int]], max_new_tokens: int) -> None:
    """Position limits of the model, before anything runs."""
    model = lm.model
    limit = getattr(model, "max_positions", None)
    if lm.family == "encdec":
        if limit is not None:
            longest = max(len(p) for p in prompts)
            if longest > limit:
                raise GenerationError(f"a source of {longest} tokens is longer than model.max_position_embeddings="
                                      f"{limit} (learned positions)")
            if max_new_tokens > limit:
                raise GenerationError(f"max_new_tokens={max_new_tokens}: the decoder (bos + generated tokens) has "
                                      f"model.max_position_embeddings={limit} learned positions; expected <= {limit}")
        return
    longest = max(len(p) for p in prompts)
    if limit is not None and longest + max_new_tokens - 1 > limit:
        raise GenerationError(
            f"max_new_tokens={max_new_tokens}: a prompt of {longest} tokens plus {max_new_tokens} new tokens needs "
            f"{longest + max_new_tokens - 1} positions but model.max_position_embeddings={limit} (learned "
            f"positions); expected max_new_tokens <= {max(limit - longest + 1, 0)}")
    if lm.family == "mega":
        mcfg = model.decoder.config
        if mcfg.relative_positional_bias == "simple":
            window = longest + max_new_tokens - 1 if not mcfg.use_chunking else min(mcfg.chunk_size,
                                                                                   longest + max_new_tokens - 1)
            if window > mcfg.max_positions:
                raise GenerationError(
                    f"max_new_tokens={max_new_tokens}: a prompt of {longest} tokens plus the new tokens gives an "
                    f"attention window of {window} positions but the simple relative bias covers "
                    f"model.mega.max_positions={mcfg.max_positions}")


def _groups(lm, prompts: List[List[int]]) -> List[List[int]]:
    """Row groups that run as one batch: all rows, except for chunked Mega (one group per prompt length)."""
    if lm.family == "mega" and lm.model.decoder.config.use_chunking:
        by_len: Dict[int, List[int]] = {}
        for i, p in enumerate(prompts):
            by_len.setdefault(len(p), []).append(i)
        return list(by_len.values())
    return [list(range(len(prompts)))]


def _ends_with(seq: List[int], stops: List[Tuple[int, ...]]) -> int:
    """Length of the stop sequence ``seq`` ends with (0 = none)."""
    for stop in stops:
        n = len(stop)
        if len(seq) >= n and tuple(seq[-n:]) == stop:
            return n
    return 0


# ---------------------------------------------------------------------------------------------------------------
# search loops


def _present(prompts: List[List[int]], vocab: int, device) -> torch.Tensor:
    present = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        if p:
            present[i, torch.tensor(p, dtype=torch.long, device=device)] = True
    return present


def _sample_loop(session: DecodingSession, prompts: List[List[int]], *, max_new_tokens: int,
                 stops: List[Tuple[int, ...]], banned: List[int], repetition_penalty: float, greedy: bool,
                 temperature: float, top_k, top_p, generator, penalize_prompt: bool) -> List[Dict[str, Any]]:
    n = len(prompts)
    vocab = session.logits.shape[-1]
    out: List[Dict[str, Any]] = [{"tokens": [], "finish_reason": "length"} for _ in range(n)]
    active = list(range(n))
    present = None
    if repetition_penalty != 1.0:
        present = _present(prompts if penalize_prompt else [[] for _ in prompts], vocab, session.logits.device)
    for step in range(max_new_tokens):
        logits = process_logits(session.logits, banned=banned, present=present,
                                repetition_penalty=repetition_penalty)
        nxt = choose_tokens(logits, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator)
        keep = []
        for j, tok in enumerate(nxt.tolist()):
            res = out[active[j]]
            res["tokens"].append(int(tok))
            cut = _ends_with(res["tokens"], stops)
            if cut:
                del res["tokens"][-cut:]
                res["finish_reason"] = "stop"
            else:
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if present is not None:
            present[torch.arange(len(active), device=present.device), nxt.to(present.device)] = True
        if len(keep) < len(active):
            rows = torch.tensor(keep, dtype=torch.long, device=nxt.device)
            session.select(rows)
            nxt = nxt.index_select(0, rows)
            if present is not None:
                present = present.index_select(0, rows.to(present.device))
            active = [active[j] for j in keep]
        session.step(nxt)
    return out


def _beam_loop(session: DecodingSession, prompts: List[List[int]], *, num_beams: int, length_penalty: float,
               max_new_tokens: int, stops: List[Tuple[int, ...]], banned: List[int], repetition_penalty: float,
               penalize_prompt: bool) -> List[Dict[str, Any]]:
    """Hugging Face-style beam search. Running beams keep their summed log-probabilities; a candidate that ends
    with a stop sequence (and ranks among the first ``num_beams`` candidates of its item) becomes a finished
    hypothesis scored ``sum_logprobs / generated_length ** length_penalty``; an item is done when it holds
    ``num_beams`` hypotheses and its best running beam, normalized at the current length, cannot beat the worst
    of them. At ``max_new_tokens`` the running beams join the hypotheses; the best-scored one is returned."""
    n, k = len(prompts), num_beams
    vocab = session.logits.shape[-1]
    device = session.logits.device
    session.select(torch.arange(n, device=device).repeat_interleave(k))  # n*k rows: item-major beams
    beam_tokens: List[List[List[int]]] = [[[] for _ in range(k)] for _ in range(n)]
    beam_scores = torch.full((n, k), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # first step: expand one beam per item only
    hyps: List[List[Tuple[float, List[int], str]]] = [[] for _ in range(n)]
    present = None
    if repetition_penalty != 1.0:
        base = prompts if penalize_prompt else [[] for _ in prompts]
        present = _present([p for p in base for _ in range(k)], vocab, device)
    alive = list(range(n))  # items still searching, in session row-block order

    def add_hyp(i: int, tokens: List[int], score: float, length: int, reason: str) -> None:
        hyps[i].append((score / (max(length, 1) ** length_penalty), tokens, reason))
        hyps[i].sort(key=lambda h: h[0], reverse=True)
        del hyps[i][k:]

    for step in range(max_new_tokens):
        logits = process_logits(session.logits, banned=banned, present=present,
                                repetition_penalty=repetition_penalty)
        logp = torch.log_softmax(logits, dim=-1)  # [a*k, V]
        a = len(alive)
        cand = (logp + beam_scores[alive].view(-1, 1)).view(a, k * vocab)
        top_scores, top_idx = torch.topk(cand, min(2 * k, k * vocab), dim=-1)
        top_scores, top_idx = top_scores.tolist(), top_idx.tolist()
        cur_len = step + 1
        new_rows, new_toks, still = [], [], []
        for ai, i in enumerate(alive):
            chosen = []  # (score, source beam, token)
            for rank, (score, idx) in enumerate(zip(top_scores[ai], top_idx[ai])):
                if score == float("-inf"):
                    break
                b, tok = divmod(int(idx), vocab)
                seq = beam_tokens[i][b] + [tok]
                cut = _ends_with(seq, stops)
                if cut:
                    if rank < k:
                        add_hyp(i, seq[:-cut], score, len(seq), "stop")
                    continue
                chosen.append((score, b, tok))
                if len(chosen) == k:
                    break
            done = not chosen
            if not done and len(hyps[i]) >= k:
                best_running = max(c[0] for c in chosen) / (cur_len ** length_penalty)
                done = hyps[i][-1][0] >= best_running
            if done:
                continue
            while len(chosen) < k:  # fewer live candidates than beams: pad with impossible beams
                chosen.append((float("-inf"), chosen[0][1], chosen[0][2]))
            beam_tokens[i] = [beam_tokens[i][b] + [tok] for _, b, tok in chosen]
            beam_scores[i] = torch.tensor([c[0] for c in chosen], device=device)
            new_rows.extend(ai * k + b for _, b, _ in chosen)
            new_toks.extend(tok for _, _, tok in chosen)
            still.append(i)
        if not still or step == max_new_tokens - 1:
            alive = still
            break
        rows = torch.tensor(new_rows, dtype=torch.long, device=device)
        toks = torch.tensor(new_toks, dtype=torch.long, device=device)
        session.select(rows)
        if present is not None:
            present = present.index_select(0, rows)
            present[torch.arange(len(new_rows), device=device), toks] = True
        alive = still
        session.step(toks)
    for i in alive:  # max_new_tokens reached: the running beams become hypotheses
        for b in range(k):
            score = float(beam_scores[i, b])
            if score != float("-inf"):
                add_hyp(i, list(beam_tokens[i][b]), score, len(beam_tokens[i][b]), "length")
    best = [hyps[i][0] if hyps[i] else (float("-inf"), [], "length") for i in range(n)]
    return [{"tokens": tokens, "score": float(score), "finish_reason": reason} for score, tokens, reason in best]


# ---------------------------------------------------------------------------------------------------------------
# public API


def _format(lm, results: List[Dict[str, Any]], output: str, single: bool):
    if output == "tokens":
        items: List[Any] = [r["tokens"] for r in results]
    elif output == "text":
        items = [lm.decode(r["tokens"]) for r in results]
    else:
        items = [dict(r, text=lm.decode(r["tokens"])) for r in results]
    return items[0] if single else items


def generate(
    lm,
    prompts,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    greedy: bool = False,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    nucleus: Optional[float] = None,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    stop_tokens=None,
    banned_tokens: Optional[Sequence[int]] = None,
    use_cache: bool = True,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    output: str = "text",
    config: Optional[GenerationConfig] = None,
):
    """Continue ``prompts`` (see the module docstring for every option; or pass them as one
    :class:`GenerationConfig` in ``config``, leaving the others at their defaults).

    Returns, per prompt, the *new* text (``output="text"``), the new token ids (``"tokens"``) or a dict
    ``{"text", "tokens", "finish_reason": "stop" | "length"}`` (+ ``"score"`` with beam search) (``"both"``); a
    single prompt gives a single result, a list a list. The stop sequence is not included. ``num_beams > 1``
    runs beam search (:func:`beam_search`), otherwise greedy decoding or sampling."""
    options = dict(locals())
    del options["lm"], options["prompts"], options["config"]
    return _generate(lm, prompts, _config(config, options))


def _config(config: Optional[GenerationConfig], options: Dict[str, Any]) -> GenerationConfig:
    """``config`` when given (then ``options`` must be the defaults), else a config from ``options``."""
    if config is None:
        return GenerationConfig(**options)
    if not isinstance(config, GenerationConfig):
        raise GenerationError(f"config={config!r}: expected a GenerationConfig")
    defaults = {f.name: f.default for f in dataclasses.fields(GenerationConfig)}
    given = [k for k, v in options.items() if v is not defaults[k] and v != defaults[k]]
    if given:
        raise GenerationError(f"config= with {', '.join(sorted(given))}=...: pass the options in the "
                              f"GenerationConfig only")
    return config


def beam_search(lm, prompts, *, num_beams: int = 4, length_penalty: float = 1.0, **kwargs):
    """Beam search for any ``num_beams >= 1`` (``generate`` uses it for ``num_beams > 1``; with one beam it is
    greedy decoding through the beam-search code). Other options as :func:`generate`."""
    return _generate(lm, prompts, GenerationConfig(beam=True, num_beams=num_beams, length_penalty=length_penalty,
                                                   **kwargs))


@torch.no_grad()
def _generate(lm, prompts, config: GenerationConfig):
    resolved = config.for_model(lm)
    vocab = int(lm.model.vocab_size)
    max_new_tokens = config.max_new_tokens
    ids, single = _normalize_prompts(lm, prompts, vocab)
    if lm.family != "encdec":  # an empty prompt starts after a document boundary, as in training
        ids = [p if p else [int(lm.tokenizer.eod)] for p in ids]
    _check_limits(lm, ids, max_new_tokens)

    model = lm.model
    was_training = model.training
    model.eval()
    results: List[Optional[Dict[str, Any]]] = [None] * len(ids)
    try:
        for group in _groups(lm, ids):
            sub = [ids[i] for i in group]
            session = open_session(lm, sub, max_new_tokens=max_new_tokens, use_cache=config.use_cache)
            common = dict(max_new_tokens=max_new_tokens, stops=resolved["stops"], banned=resolved["banned"],
                          repetition_penalty=config.repetition_penalty, penalize_prompt=lm.family != "encdec")
            if config.beam:
                res = _beam_loop(session, sub, num_beams=config.num_beams, length_penalty=config.length_penalty,
                                 **common)
            else:
                res = _sample_loop(session, sub, greedy=config.greedy, temperature=config.temperature,
                                   top_k=config.top_k, top_p=config.top_p, generator=resolved["generator"], **common)
            for i, r in zip(group, res):
                results[i] = r
    finally:
        model.train(was_training)
    return _format(lm, results, config.output, single)


@torch.no_grad()
def sample(lm, pref: Union[str, Sequence[int], torch.Tensor] = "", max_seq_len: int = 100,
           temperature: float = 1.0, nucleus: Optional[float] = None, top_k: Optional[int] = None,
           as_str: bool = True, **kwargs):
    """Seed 003's ``LM.sample``: one sample that continues ``pref`` (a string, token ids or a 1-D tensor) up to
    ``max_seq_len`` tokens *in all* (prefix included); ``temperature=0`` is argmax; ``nucleus`` and ``top_k`` are
    mutually exclusive. Returns the whole sample (prefix + continuation, the stop token excluded) as a string
    (``as_str``) or a list of ids; a prefix already ``max_seq_len`` long comes back unchanged. For an
    encoder-decoder ``pref`` is the source and ``max_seq_len`` bounds the generated target. Other keyword
    arguments go to :func:`generate` (``seed``, ``stop_tokens``, ``repetition_penalty``, ``use_cache``, ...)."""
    if not _is_int(max_seq_len) or int(max_seq_len) < 1:
        raise GenerationError(f"max_seq_len={max_seq_len!r}: expected an integer >= 1")
    max_seq_len = int(max_seq_len)
    if not isinstance(as_str, bool):
        raise GenerationError(f"as_str={as_str!r}: expected True or False")
    for key in ("prompts", "max_new_tokens", "output", "top_p", "config"):
        if key in kwargs:
            raise GenerationError(f"sample() got {key}=...: use pref / max_seq_len / nucleus (or generate())")
    GenerationConfig(temperature=temperature, nucleus=nucleus, top_k=top_k, **kwargs).for_model(lm)
    prefix = _prompt_ids(lm, pref, "pref", int(lm.model.vocab_size))
    options = dict(temperature=temperature, nucleus=nucleus, top_k=top_k, output="tokens", **kwargs)
    if lm.family == "encdec":
        tokens = generate(lm, [prefix], max_new_tokens=max_seq_len, **options)[0]
    elif len(prefix) >= max_seq_len:
        tokens = list(prefix)
    else:
        tokens = list(prefix) + list(generate(lm, [prefix], max_new_tokens=max_seq_len - len(prefix), **options)[0])
    return lm.decode(tokens) if as_str else tokens


__all__ = [
    "generate",
    "sample",
    "beam_search",
    "GenerationError",
    "GenerationConfig",
    "filter_logits",
    "apply_repetition_penalty",
    "process_logits",
    "choose_tokens",
    "DecodingSession",
    "CausalLMSession",
    "EncDecSession",
    "open_session",
]

"""Synthetic sequence tasks for GPT training: ``model.data.task=copy|reverse|sort|histogram|<yours>``.

A task is a function that draws one example, an ``(input, target)`` pair of strings, from a
``random.Random`` and the task parameters (``model.data.task_params``). Every example becomes one GPT sample
of ``model.seq_length`` tokens::

    [<bos>] input <sep> target <eod> <pad> <pad> ...

(``<bos>`` unless ``task_params.bos=false``); the loss (``loss_mask``) covers only the positions that predict
the target's tokens and the final ``<eod>``, so the model is trained, and measured, on producing the target
from the input. Samples are dicts of ``tokens``/``labels`` (the next token), ``loss_mask`` and ``position_ids``,
exactly what the indexed-dataset pipeline gives (:mod:`megatron_ext.data.samplers`).

Built-in tasks (characters are drawn uniformly from ``alphabet``, lengths uniformly from
``[min_len, max_len]``):

* ``copy`` -- the target is the input;
* ``reverse`` -- the input reversed;
* ``sort`` -- the input's characters sorted by their position in ``alphabet`` (so ``alphabet`` is the order);
* ``histogram`` -- for each input position, how many times that position's character occurs: in the whole
  input (``count: sequence``, the default) or in the input up to and including that position
  (``count: prefix``). A count ``c`` is written as the single character ``COUNT_DIGITS[c]`` (``1``..``9``,
  then ``a``..``z``, ``A``..``Z``), so the target has one character per input character and
  ``max_len`` may be at most 61. ``histogram`` of ``abca`` is ``2112`` (sequence) / ``1112`` (prefix).

``model.data.task_params`` (all optional):

==================  ============  ===========================================================================
key                 default       meaning
==================  ============  ===========================================================================
``min_len``         1             shortest input (characters), >= 1
``max_len``         10            longest input; ``model.seq_length`` must hold the longest sequence
``alphabet``        ``abcdefghij``  the characters inputs are made of (distinct; in the tokenizer's vocabulary)
``num_train``       null          null: a fresh example for every training sample (as many as the run asks
                                  for); N: a fixed set of N examples, repeated in the same order (epochs)
``num_val``         null          validation examples (null: as many as one validation reads)
``num_test``        null          test examples (null: as many as asked for; pretraining asks for none)
``val_fraction``    0.05          share of all possible inputs held out for validation
``test_fraction``   0.05          share of all possible inputs held out for testing
``bos``             true          start every sequence with ``<bos>``
(task-specific)                   e.g. ``histogram``'s ``count: sequence|prefix``
==================  ============  ===========================================================================

Splits and held-out guarantee
-----------------------------
Example ``i`` of split ``s`` is drawn from its own generator, ``random.Random("<task>/<seed>/<s>/<i>")`` (seed:
``model.data.seed``, default ``trainer.seed``), so the three splits use disjoint seeds and any sample is a pure
function of its index (resumable, identical with any number of DataLoader workers). On top of that every
*input* string belongs to exactly one split, fixed by a hash of the string alone: with
``u = blake2b(input) / 2**64``, ``u < val_fraction`` is validation, ``u < val_fraction + test_fraction`` test,
anything else train. A split's generator redraws until it gets one of its own inputs, so an input (and, as
the targets of the built-in tasks are functions of their input, an example) of the validation or test split
never occurs in training -- for any seed, ``num_train`` or run length (:func:`split_of` is the whole rule;
``tests/unit/test_synthetic.py`` checks it). A parameter choice with too few possible inputs to fill a split is an
error naming ``model.data.task_params``.

Character-level tasks need ``model.tokenizer.library=char`` (:mod:`megatron_ext.tokenizers.char`: one token per
character, and a ``<sep>`` token); the alphabet and every character a target can contain must be in its
vocabulary. Validation logs ``val/exact_match``: the fraction of held-out sequences whose whole target (and
``<eod>``) is the argmax prediction at every position under teacher forcing -- which is the same as greedy
generation after ``<sep>`` producing exactly the target -- and ``val/token_accuracy`` over the target tokens
(see :meth:`megatron_ext.training.gpt_task.GPTTask.loss`).

Adding a task
-------------
Register a function that returns ``(input, target)``; its name becomes a value of ``model.data.task``::

    import random
    from megatron_ext.data.synthetic import register_task

    @register_task("double", max_target_len=lambda p: 2 * p.max_len)
    def double(rng: random.Random, p) -> tuple[str, str]:
        \"\"\"Each character twice: abc -> aabbcc.\"\"\"
        s = p.random_string(rng)          # length in [p.min_len, p.max_len], characters from p.alphabet
        return s, "".join(c + c for c in s)

``register_task`` options: ``max_target_len(p)`` -- the longest target (default ``p.max_len``; used to check
``model.seq_length``); ``output_chars(p)`` -- the characters a target may contain beyond the alphabet (checked
against the vocabulary); ``params`` -- task-specific keys of ``task_params`` with their defaults (read them as
``p.extra[key]``); ``check(p)`` -- raise :class:`~megatron_ext.errors.ConfigError` for bad values;
``char_level=False`` -- the input and target are tokenized with whatever tokenizer is configured (it must have a
``sep`` id; a sequence that does not fit ``model.seq_length`` is a :class:`~megatron_ext.errors.DataError`).
The module that registers the task must be imported before training starts (e.g. from your copy of
``pretrain_gpt.py``).
"""
from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from megatron_ext.errors import ConfigError, DataError
from megatron_ext.tokenizers.char import CharTokenizer

log = logging.getLogger(__name__)

TASK_KEY = "model.data.task"
PARAMS_KEY = "model.data.task_params"
SPLITS = ("train", "val", "test")

#: count -> character of the ``histogram`` target (index 0 is never used: every character occurs once at least)
COUNT_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

COMMON_PARAMS: Dict[str, Any] = {
    "min_len": 1,
    "max_len": 10,
    "alphabet": "abcdefghij",
    "num_train": None,
    "num_val": None,
    "num_test": None,
    "val_fraction": 0.05,
    "test_fraction": 0.05,
    "bos": True,
}


@dataclass
class TaskParams:
    """``model.data.task_params`` after validation (see the module docstring for the keys)."""

    min_len: int = 1
    max_len: int = 10
    alphabet: str = "abcdefghij"
    num_train: Optional[int] = None
    num_val: Optional[int] = None
    num_test: Optional[int] = None
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    bos: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)  # the task's own keys, defaults filled in

    def random_string(self, rng: random.Random, min_len: Optional[int] = None, max_len: Optional[int] = None) -> str:
        """A string of uniform length in ``[min_len, max_len]`` (default: the task's) of uniform alphabet characters."""
        n = rng.randint(self.min_len if min_len is None else min_len, self.max_len if max_len is None else max_len)
        return "".join(rng.choice(self.alphabet) for _ in range(n))

    def num_examples(self, split: str) -> Optional[int]:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]

    def fraction(self, split: str) -> float:
        if split == "train":
            return 1.0 - self.val_fraction - self.test_fraction
        return self.val_fraction if split == "val" else self.test_fraction


TaskFn = Callable[[random.Random, TaskParams], Tuple[str, str]]


@dataclass
class TaskSpec:
    name: str
    fn: TaskFn
    max_target_len: Callable[[TaskParams], int]
    output_chars: Callable[[TaskParams], str]
    params: Dict[str, Any]
    check: Optional[Callable[[TaskParams], None]]
    char_level: bool

    @property
    def description(self) -> str:
        doc = (self.fn.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


#: task name -> :class:`TaskSpec` (the values of ``model.data.task``)
SYNTHETIC_TASKS: Dict[str, TaskSpec] = {}


def register_task(
    name: Any = None,
    *,
    max_target_len: Optional[Callable[[TaskParams], int]] = None,
    output_chars: Optional[Callable[[TaskParams], str]] = None,
    params: Optional[Mapping[str, Any]] = None,
    check: Optional[Callable[[TaskParams], None]] = None,
    char_level: bool = True,
    overwrite: bool = False,
):
    """Decorator registering a task function ``fn(rng, params) -> (input, target)`` under ``name`` (default: the
    function's name). Usable bare (``@register_task``) or with arguments; see the module docstring."""

    def deco(fn: TaskFn) -> TaskFn:
        key = str(name if isinstance(name, str) else fn.__name__).strip().lower()
        if not key:
            raise ValueError("register_task: the task name must be a non-empty string")
        if key in SYNTHETIC_TASKS and SYNTHETIC_TASKS[key].fn is not fn and not overwrite:
            raise ValueError(f"register_task: a task named '{key}' is already registered; pass overwrite=True "
                             f"to replace it")
        clash = set(params or {}) & set(COMMON_PARAMS)
        if clash:
            raise ValueError(f"register_task({key!r}): params {sorted(clash)} clash with the common task_params keys")
        SYNTHETIC_TASKS[key] = TaskSpec(
            name=key,
            fn=fn,
            max_target_len=max_target_len or (lambda p: p.max_len),
            output_chars=output_chars or (lambda p: ""),
            params=dict(params or {}),
            check=check,
            char_level=bool(char_level),
        )
        return fn

    if callable(name) and not isinstance(name, str):  # bare @register_task
        fn, name = name, None
        return deco(fn)
    return deco


# --------------------------------------------------------------------------------------------- built-in tasks
@register_task("copy")
def copy_task(rng: random.Random, p: TaskParams) -> Tuple[str, str]:
    """The target is the input: abc -> abc."""
    s = p.random_string(rng)
    return s, s


@register_task("reverse")
def reverse_task(rng: random.Random, p: TaskParams) -> Tuple[str, str]:
    """The input reversed: abc -> cba."""
    s = p.random_string(rng)
    return s, s[::-1]


@register_task("sort")
def sort_task(rng: random.Random, p: TaskParams) -> Tuple[str, str]:
    """The input's characters in alphabet order (stable): cab -> abc."""
    s = p.random_string(rng)
    order = {c: i for i, c in enumerate(p.alphabet)}
    return s, "".join(sorted(s, key=order.__getitem__))


def _check_histogram(p: TaskParams) -> None:
    if p.extra["count"] not in ("sequence", "prefix"):
        raise ConfigError(f"{PARAMS_KEY}.count={p.extra['count']!r}: expected 'sequence' (occurrences in the whole "
                          f"input) or 'prefix' (occurrences up to and including the position)")
    if p.max_len >= len(COUNT_DIGITS):
        raise ConfigError(f"{PARAMS_KEY}.max_len={p.max_len}: the histogram task writes each count as one character "
                          f"(1-9, a-z, A-Z), so max_len must be <= {len(COUNT_DIGITS) - 1}")


@register_task("histogram", params={"count": "sequence"}, check=_check_histogram,
               output_chars=lambda p: COUNT_DIGITS[1:p.max_len + 1])
def histogram_task(rng: random.Random, p: TaskParams) -> Tuple[str, str]:
    """Per position, the number of occurrences of its character (count: sequence|prefix): abca -> 2112 | 1112."""
    s = p.random_string(rng)
    if p.extra["count"] == "prefix":
        seen: Dict[str, int] = {}
        counts = []
        for c in s:
            seen[c] = seen.get(c, 0) + 1
            counts.append(seen[c])
    else:
        counts = [s.count(c) for c in s]
    return s, "".join(COUNT_DIGITS[n] for n in counts)


# --------------------------------------------------------------------------------------------- config
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_task_params(spec: TaskSpec, raw: Optional[Mapping[str, Any]]) -> TaskParams:
    """``model.data.task_params`` (a dict / DictConfig) -> :class:`TaskParams`; ConfigError naming the key."""
    if raw is None:
        raw = {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(raw, DictConfig):
            raw = OmegaConf.to_container(raw, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{PARAMS_KEY}={raw!r}: expected a mapping of task parameters, e.g. {{min_len: 1, max_len: 8}}")
    allowed = {**COMMON_PARAMS, **spec.params}
    unknown = sorted(set(map(str, raw)) - set(allowed))
    if unknown:
        raise ConfigError(f"{PARAMS_KEY}.{unknown[0]}: unknown parameter of task '{spec.name}'; expected one of: "
                          f"{', '.join(sorted(allowed))}")
    v = {**allowed, **{str(k): val for k, val in raw.items()}}
    for key in ("min_len", "max_len"):
        if not _is_int(v[key]) or v[key] < 1:
            raise ConfigError(f"{PARAMS_KEY}.{key}={v[key]!r}: expected an integer >= 1")
    if v["max_len"] < v["min_len"]:
        raise ConfigError(f"{PARAMS_KEY}.max_len={v['max_len']} is smaller than {PARAMS_KEY}.min_len={v['min_len']}")
    alpha = v["alphabet"]
    if not isinstance(alpha, str) or not alpha:
        raise ConfigError(f"{PARAMS_KEY}.alphabet={alpha!r}: expected a non-empty string of characters (quote "
                          f"digits: {PARAMS_KEY}.alphabet='\"0123\"')")
    dup = [c for i, c in enumerate(alpha) if c in alpha[:i]]
    if dup:
        raise ConfigError(f"{PARAMS_KEY}.alphabet={alpha!r}: character {dup[0]!r} appears twice; expected distinct "
                          f"characters")
    for key in ("num_train", "num_val", "num_test"):
        if v[key] is not None and (not _is_int(v[key]) or v[key] < 1):
            raise ConfigError(f"{PARAMS_KEY}.{key}={v[key]!r}: expected null (as many as the run asks for) or an "
                              f"integer >= 1")
    for key in ("val_fraction", "test_fraction"):
        f = v[key]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
            raise ConfigError(f"{PARAMS_KEY}.{key}={f!r}: expected a number in [0, 1)")
    if v["val_fraction"] + v["test_fraction"] >= 1:
        raise ConfigError(f"{PARAMS_KEY}.val_fraction ({v['val_fraction']}) + {PARAMS_KEY}.test_fraction "
                          f"({v['test_fraction']}) must be < 1 (the rest of the inputs are for training)")
    if not isinstance(v["bos"], bool):
        raise ConfigError(f"{PARAMS_KEY}.bos={v['bos']!r}: expected true or false")
    p = TaskParams(**{k: v[k] for k in COMMON_PARAMS}, extra={k: v[k] for k in spec.params})
    p.val_fraction, p.test_fraction = float(p.val_fraction), float(p.test_fraction)
    if spec.check is not None:
        spec.check(p)
    return p


def get_task(name: Any) -> TaskSpec:
    key = str(name).strip().lower() if name is not None else ""
    if key not in SYNTHETIC_TASKS:
        raise ConfigError(f"{TASK_KEY}={name!r}: unknown synthetic task; registered tasks: "
                          f"{', '.join(sorted(SYNTHETIC_TASKS))} (add one with "
                          f"megatron_ext.data.synthetic.register_task)")
    return SYNTHETIC_TASKS[key]


@dataclass
class SyntheticSetup:
    """A validated ``model.data.task`` + ``task_params`` for a given tokenizer and sequence length."""

    spec: TaskSpec
    params: TaskParams
    seq_length: int

    @property
    def max_sequence_tokens(self) -> int:
        """Tokens of the longest sequence ([<bos>] input <sep> target <eod>), for char-level tasks."""
        return int(self.params.bos) + self.params.max_len + 1 + int(self.spec.max_target_len(self.params)) + 1


def _plain(x: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(x, (DictConfig, ListConfig)):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return x


def resolve_synthetic(data_cfg: Any, tokenizer: Any, seq_length: int,
                      library: Optional[str] = None) -> Optional[SyntheticSetup]:
    """Validate ``model.data.task`` / ``task_params`` against the tokenizer and ``model.seq_length``.

    Returns None when ``model.data.task`` is null (the indexed-dataset path). Raises ConfigError naming the key.
    """
    task = data_cfg.get("task") if hasattr(data_cfg, "get") else getattr(data_cfg, "task", None)
    raw = data_cfg.get("task_params") if hasattr(data_cfg, "get") else getattr(data_cfg, "task_params", None)
    raw = _plain(raw)
    if task is None:
        if raw:
            raise ConfigError(f"{PARAMS_KEY}={raw!r} is set but {TASK_KEY} is null; set {TASK_KEY} to one of: "
                              f"{', '.join(sorted(SYNTHETIC_TASKS))} (or remove the task_params)")
        return None
    spec = get_task(task)
    prefix = _plain(data_cfg.get("data_prefix") if hasattr(data_cfg, "get") else getattr(data_cfg, "data_prefix", None))
    if prefix:
        raise ConfigError(f"{TASK_KEY}={task!r} and model.data.data_prefix={prefix!r} exclude each other: a synthetic "
                          f"task generates its own data; set model.data.data_prefix=[] or {TASK_KEY}=null")
    params = parse_task_params(spec, raw)
    lib = library if library is not None else getattr(tokenizer, "name", type(tokenizer).__name__)
    setup = SyntheticSetup(spec, params, int(seq_length))
    if spec.char_level:
        if not isinstance(tokenizer, CharTokenizer):
            raise ConfigError(f"{TASK_KEY}={spec.name!r} is a character-level task and needs "
                              f"model.tokenizer.library=char, got model.tokenizer.library={lib!r}")
        missing = tokenizer.missing_chars(params.alphabet)
        if missing:
            raise ConfigError(f"{PARAMS_KEY}.alphabet={params.alphabet!r}: character {missing[0]!r} is not in the "
                              f"char tokenizer's vocabulary (model.tokenizer.model); change one or the other")
        missing = tokenizer.missing_chars(spec.output_chars(params))
        if missing:
            raise ConfigError(f"{TASK_KEY}={spec.name!r}: its targets can contain {missing[0]!r}, which is not in the "
                              f"char tokenizer's vocabulary (model.tokenizer.model)")
        need = setup.max_sequence_tokens - 1  # inputs are the sequence without its last token
        if need > seq_length:
            raise ConfigError(
                f"model.seq_length={seq_length} is too short for {PARAMS_KEY}.max_len={params.max_len} (task "
                f"{spec.name!r}): the longest sequence is {'<bos> + ' if params.bos else ''}{params.max_len} input "
                f"+ <sep> + {spec.max_target_len(params)} target + <eod> = {setup.max_sequence_tokens} tokens, so "
                f"model.seq_length must be >= {need} (or lower max_len)")
    elif getattr(tokenizer, "sep", None) is None:
        raise ConfigError(f"{TASK_KEY}={spec.name!r} needs a separator token, which model.tokenizer.library={lib!r} "
                          f"does not have; use model.tokenizer.library=char")
    return setup


# --------------------------------------------------------------------------------------------- splits + dataset
_HASH_PERSON = b"mext-synth-split"


def split_of(text: str, val_fraction: float, test_fraction: float) -> str:
    """The split ('train' | 'val' | 'test') an input string belongs to: a fixed function of the string."""
    h = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8, person=_HASH_PERSON).digest()
    u = int.from_bytes(h, "big") / 2.0**64
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


class SyntheticDataset(torch.utils.data.Dataset):
    """``num_samples`` GPT samples of one split of a synthetic task (see the module docstring)."""

    def __init__(self, setup: SyntheticSetup, tokenizer: Any, split: str, num_samples: int, seed: int):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.setup, self.spec, self.params = setup, setup.spec, setup.params
        self.tokenizer = tokenizer
        self.split = split
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.seq_length = setup.seq_length
        frac = self.params.fraction(split)
        if frac <= 0:
            key = "val_fraction" if split == "val" else "test_fraction"
            raise ConfigError(f"{PARAMS_KEY}.{key}=0 but the run asks for {split} examples; set {PARAMS_KEY}.{key} "
                              f"> 0")
        self.max_draws = max(1000, int(100 / frac))

    def __len__(self) -> int:
        return self.num_samples

    def example(self, index: int) -> Tuple[str, str]:
        """Example ``index`` as ``(input, target)`` strings."""
        p = self.params
        rng = random.Random(f"{self.spec.name}/{self.seed}/{self.split}/{int(index)}")
        for _ in range(self.max_draws):
            inp, tgt = self.spec.fn(rng, p)
            if split_of(inp, p.val_fraction, p.test_fraction) == self.split:
                return inp, tgt
        raise DataError(
            f"{TASK_KEY}={self.spec.name!r}: no {self.split} input found in {self.max_draws} draws; with alphabet "
            f"{p.alphabet!r} and lengths {p.min_len}..{p.max_len} there are too few distinct inputs to hold out "
            f"{p.fraction(self.split):.0%} of them for {self.split}: widen {PARAMS_KEY}.alphabet / max_len or change "
            f"{PARAMS_KEY}.val_fraction / test_fraction")

    def encode(self, inp: str, tgt: str) -> Dict[str, torch.Tensor]:
        """The GPT sample of one example: tokens/labels/loss_mask/position_ids, each ``[seq_length]``."""
        tok = self.tokenizer
        src, dst = tok.tokenize(inp), tok.tokenize(tgt)
        head = ([tok.bos] if self.params.bos else []) + src + [tok.sep]
        full = head + dst + [tok.eod]
        s = self.seq_length
        if len(full) - 1 > s:
            raise DataError(f"{TASK_KEY}={self.spec.name!r}: an example needs {len(full)} tokens ({len(src)} input, "
                            f"{len(dst)} target), more than model.seq_length={s} + 1; raise model.seq_length or lower "
                            f"{PARAMS_KEY}.max_len")
        ids = torch.full((s + 1,), int(tok.pad), dtype=torch.long)
        ids[: len(full)] = torch.tensor(full, dtype=torch.long)
        loss_mask = torch.zeros(s, dtype=torch.float32)
        # position i predicts ids[i + 1]: the target tokens and <eod> are ids[len(head):len(full)]
        loss_mask[len(head) - 1: len(full) - 1] = 1.0
        return {"tokens": ids[:-1].clone(), "labels": ids[1:].clone(), "loss_mask": loss_mask,
                "position_ids": torch.arange(s, dtype=torch.long)}

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return self.encode(*self.example(index))


def build_synthetic_datasets(setup: SyntheticSetup, tokenizer: Any, num_samples: Tuple[int, int, int], seed: int):
    """``(train, val, test)`` datasets; a split with neither a requested count nor ``num_<split>`` is None.

    ``num_<split>`` (task_params) fixes a split's size (the sampler repeats it); otherwise the split has as many
    examples as the run asks for. The first example of every built split is drawn here, so a parameter choice
    that cannot fill a split fails before training starts.
    """
    out = []
    for split, asked in zip(SPLITS, num_samples):
        n = setup.params.num_examples(split) or int(asked)
        if n <= 0:
            out.append(None)
            continue
        ds = SyntheticDataset(setup, tokenizer, split, n, seed)
        ds[0]
        log.info("synthetic task %s: %s split of %d examples%s", setup.spec.name, split, n,
                 "" if setup.params.num_examples(split) else " (drawn on the fly)")
        out.append(ds)
    return tuple(out)


__all__ = [
    "COUNT_DIGITS",
    "SYNTHETIC_TASKS",
    "SyntheticDataset",
    "SyntheticSetup",
    "TaskParams",
    "TaskSpec",
    "build_synthetic_datasets",
    "get_task",
    "parse_task_params",
    "register_task",
    "resolve_synthetic",
    "split_of",
]

"""Synthetic tasks (megatron_ext/data/synthetic.py), the char tokenizer, their config checks, val/exact_match, and
the copy_task preset learning the copy task end to end."""
import random
from collections import Counter

import pytest
import torch

from megatron_ext.config.loader import load_config
from megatron_ext.data.samplers import collate_gpt_batch
from megatron_ext.data.synthetic import (
    COUNT_DIGITS,
    SYNTHETIC_TASKS,
    TaskParams,
    build_synthetic_datasets,
    get_task,
    parse_task_params,
    register_task,
    resolve_synthetic,
    split_of,
)
from megatron_ext.errors import ConfigError, DataError
from megatron_ext.tokenizers import AVAILABLE_TOKENIZERS, CharTokenizer, build_tokenizer


CHAR = build_tokenizer("char")


def _setup(task="copy", seq_length=32, library="char", tok=None, **params):
    cfg = load_config(overrides=[f"model.data.task={task}", f"model.seq_length={seq_length}",
                                 f"model.tokenizer.library={library}"])
    cfg.model.data.task_params = params
    tok = tok if tok is not None else build_tokenizer(library)
    return resolve_synthetic(cfg.model.data, tok, seq_length, library), tok


def _examples(task, n=300, split="train", seed=0, **params):
    setup, tok = _setup(task, **params)
    sizes = {"train": (n, 0, 0), "val": (0, n, 0), "test": (0, 0, n)}[split]
    ds = build_synthetic_datasets(setup, tok, sizes, seed)[("train", "val", "test").index(split)]
    return [ds.example(i) for i in range(n)], setup.params


# ------------------------------------------------------------------------------------------- char tokenizer
def test_char_tokenizer_round_trip_and_ids():
    assert AVAILABLE_TOKENIZERS["char"] is CharTokenizer
    tok = CHAR
    text = "".join(chr(c) for c in range(0x20, 0x7F)) + "\nline two\n"
    ids = tok.tokenize(text)
    assert len(ids) == len(text)  # one token per character
    assert tok.detokenize(ids) == text
    assert tok.vocab_size == 4 + 96 and max(ids) == tok.vocab_size - 1 and min(ids) >= 4
    assert (tok.pad, tok.eod, tok.eos, tok.bos, tok.sep) == (0, 1, 1, 2, 3)
    # specials are dropped by detokenize but have names
    assert tok.detokenize([tok.bos] + tok.tokenize("ab") + [tok.sep, tok.eod, tok.pad]) == "ab"
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<eod>", "<bos>", "<sep>"]
    assert tok.vocab["a"] == tok.tokenize("a")[0]
    flat, lengths = tok.tokenize_batch_flat(["ab", "c"], append_eod=True)
    assert flat.tolist() == tok.tokenize("ab") + [1] + tok.tokenize("c") + [1] and lengths.tolist() == [3, 2]
    with pytest.raises(ValueError, match="out of range"):
        tok.detokenize([tok.vocab_size])


@pytest.mark.parametrize("text,bad,pos", [("abé", "é", 2), ("\tx", "\t", 0), ("ok\r\n", "\r", 2), ("a✓", "✓", 1)])
def test_char_tokenizer_rejects_unknown_characters(text, bad, pos):
    with pytest.raises(DataError) as e:
        CHAR.tokenize(text)
    msg = str(e.value)
    assert repr(bad) in msg and f"U+{ord(bad):04X}" in msg and f"position {pos}" in msg
    assert CHAR.missing_chars(text) == bad


def test_char_tokenizer_from_character_file(tmp_path):
    f = tmp_path / "chars.txt"
    f.write_text("xyzé\nx", encoding="utf-8")  # duplicates ignored, newline is a character
    tok = build_tokenizer("char", str(f))
    assert tok.chars == "xyzé\n" and tok.vocab_size == 9
    assert tok.detokenize(tok.tokenize("éz\nx")) == "éz\nx"
    with pytest.raises(DataError, match="'a' .*position 1"):
        tok.tokenize("xa")
    assert tok.unique_identifiers != CHAR.unique_identifiers
    assert build_tokenizer("char", str(f)).unique_identifiers == tok.unique_identifiers
    for path, needle in ((tmp_path / "missing.txt", "does not exist"), (tmp_path, "is not a file")):
        with pytest.raises(ConfigError, match="model.tokenizer.model") as e:
            build_tokenizer("char", str(path))
        assert needle in str(e.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="model.tokenizer.model.*empty"):
        build_tokenizer("char", str(empty))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(b"ab\xe9")
    with pytest.raises(ConfigError, match="model.tokenizer.model.*UTF-8"):
        build_tokenizer("char", str(latin))


# ------------------------------------------------------------------------------------------- tasks
def test_registry_holds_the_builtin_tasks():
    assert {"copy", "reverse", "sort", "histogram"} <= set(SYNTHETIC_TASKS)
    with pytest.raises(ConfigError) as e:
        get_task("palindrome")
    msg = str(e.value)
    assert "model.data.task='palindrome'" in msg
    for name in SYNTHETIC_TASKS:
        assert name in msg


def _check_common(examples, p):
    assert examples
    for inp, _ in examples:
        assert p.min_len <= len(inp) <= p.max_len and set(inp) <= set(p.alphabet)
    lengths = Counter(len(i) for i, _ in examples)
    assert set(lengths) == set(range(p.min_len, p.max_len + 1))  # every length occurs


def test_copy_and_reverse_targets():
    ex, p = _examples("copy", min_len=2, max_len=7, alphabet="xyz")
    _check_common(ex, p)
    assert all(t == i for i, t in ex)
    ex, p = _examples("reverse", min_len=1, max_len=9)
    _check_common(ex, p)
    for inp, tgt in ex:
        assert len(tgt) == len(inp) and all(tgt[k] == inp[len(inp) - 1 - k] for k in range(len(inp)))
    assert any(i != t for i, t in ex)  # not trivially palindromes


def test_sort_targets_follow_the_alphabet_order():
    alphabet = "qwerty"  # not code-point order
    ex, p = _examples("sort", min_len=1, max_len=8, alphabet=alphabet)
    _check_common(ex, p)
    rank = {c: alphabet.find(c) for c in alphabet}
    for inp, tgt in ex:
        assert Counter(tgt) == Counter(inp)  # a permutation
        assert all(rank[a] <= rank[b] for a, b in zip(tgt, tgt[1:]))  # non-decreasing in alphabet position
    assert any(tgt != "".join(sorted(inp)) for inp, tgt in ex)  # really the alphabet's order, not code points


@pytest.mark.parametrize("mode", ["sequence", "prefix"])
def test_histogram_targets(mode):
    ex, p = _examples("histogram", min_len=1, max_len=12, alphabet="abc", count=mode)
    _check_common(ex, p)
    for inp, tgt in ex:
        assert len(tgt) == len(inp)
        for k, ch in enumerate(inp):
            scope = inp if mode == "sequence" else inp[: k + 1]
            expected = sum(1 for c in scope if c == ch)
            assert COUNT_DIGITS.index(tgt[k]) == expected, (inp, tgt, k)
    # one fixed example by hand: the only input of length 4 over a one-letter alphabet
    (inp, tgt), = _examples("histogram", n=1, min_len=4, max_len=4, alphabet="a", count=mode,
                            val_fraction=0.0, test_fraction=0.0)[0]
    assert (inp, tgt) == ("aaaa", "4444" if mode == "sequence" else "1234")


def test_samples_have_the_gpt_layout():
    setup, tok = _setup("reverse", seq_length=20, min_len=3, max_len=6)
    train, val, test = build_synthetic_datasets(setup, tok, (8, 4, 0), 1)
    assert test is None and len(train) == 8 and len(val) == 4
    for i in range(8):
        inp, tgt = train.example(i)
        s = train[i]
        assert set(s) == {"tokens", "labels", "loss_mask", "position_ids"}
        full = [tok.bos] + tok.tokenize(inp) + [tok.sep] + tok.tokenize(tgt) + [tok.eod]
        full += [tok.pad] * (21 - len(full))
        assert s["tokens"].tolist() == full[:-1] and s["labels"].tolist() == full[1:]
        assert s["position_ids"].tolist() == list(range(20))
        scored = [lab for lab, m in zip(s["labels"].tolist(), s["loss_mask"].tolist()) if m]
        assert scored == tok.tokenize(tgt) + [tok.eod]  # loss on the target and <eod> only
    batch = collate_gpt_batch([train[i] for i in range(4)])
    assert batch["tokens"].shape == (4, 20) and batch["loss_mask"].dtype == torch.float32
    # no <bos> when asked
    setup, tok = _setup("copy", seq_length=20, bos=False, max_len=4)
    s = build_synthetic_datasets(setup, tok, (1, 0, 0), 1)[0][0]
    assert s["tokens"][0].item() != tok.bos and tok.sep in s["tokens"].tolist()


def test_examples_are_deterministic_and_seeded():
    a, _ = _examples("copy", n=50, seed=3)
    b, _ = _examples("copy", n=50, seed=3)
    c, _ = _examples("copy", n=50, seed=4)
    assert a == b and a != c


def test_held_out_splits_never_occur_in_training():
    # a small input space (3 + 9 + ... + 3**6 = 1092 strings) that training covers almost completely, so
    # without the split rule validation inputs would certainly turn up in training
    params = dict(min_len=1, max_len=6, alphabet="abc", val_fraction=0.1, test_fraction=0.1)
    train = {i for i, _ in _examples("copy", n=20000, split="train", **params)[0]}
    val = {i for i, _ in _examples("copy", n=2000, split="val", **params)[0]}
    test = {i for i, _ in _examples("copy", n=2000, split="test", **params)[0]}
    assert len(train) > 700 and len(val) > 50 and len(test) > 50
    assert not train & val and not train & test and not val & test
    assert all(split_of(s, 0.1, 0.1) == "val" for s in val)
    # the rule depends only on the input: another seed, another task -> the same held-out inputs
    val2 = {i for i, _ in _examples("reverse", n=2000, split="val", seed=9, **params)[0]}
    assert not val2 & train
    # the shares are about the requested fractions
    rng = random.Random(0)
    every = {"".join(rng.choice("abcdefgh") for _ in range(8)) for _ in range(4000)}
    assert len(every) > 3900
    shares = Counter(split_of(s, 0.1, 0.05) for s in every)
    assert 300 < shares["val"] < 500 and 120 < shares["test"] < 280


def test_fixed_size_splits_and_on_the_fly():
    setup, tok = _setup("copy", num_train=10, num_val=3)
    train, val, test = build_synthetic_datasets(setup, tok, (1000, 64, 0), 0)
    assert (len(train), len(val), test) == (10, 3, None)
    setup, tok = _setup("copy", num_test=5)
    train, val, test = build_synthetic_datasets(setup, tok, (1000, 64, 0), 0)
    assert (len(train), len(val), len(test)) == (1000, 64, 5)


def test_a_space_too_small_for_a_split_is_a_clear_error():
    setup, tok = _setup("copy", min_len=1, max_len=1, alphabet="ab")  # two possible inputs
    with pytest.raises(DataError, match="model.data.task_params"):
        build_synthetic_datasets(setup, tok, (4, 4, 0), 0)


def test_user_registered_task():
    @register_task("double", max_target_len=lambda p: 2 * p.max_len)
    def double(rng, p):
        """Each character twice."""
        s = p.random_string(rng)
        return s, "".join(c + c for c in s)

    try:
        assert SYNTHETIC_TASKS["double"].description == "Each character twice."
        ex, p = _examples("double", n=50, seq_length=40, max_len=6)
        assert all(t == "".join(c * 2 for c in i) for i, t in ex)
        with pytest.raises(ConfigError, match="model.seq_length=20"):  # 1 + 8 + 1 + 16 + 1 = 27 tokens
            _setup("double", seq_length=20, max_len=8)
        with pytest.raises(ValueError, match="already registered"):
            register_task("double")(lambda rng, p: ("a", "a"))
    finally:
        SYNTHETIC_TASKS.pop("double", None)


# ------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("kwargs,needles", [
    (dict(task="copy", library="byte"), ["model.tokenizer.library=char", "model.tokenizer.library='byte'"]),
    (dict(task="copy", seq_length=20, max_len=10), ["model.seq_length=20", "model.data.task_params.max_len=10",
                                                    ">= 22"]),
    (dict(task="copy", max_lenght=5), ["model.data.task_params.max_lenght", "max_len"]),
    (dict(task="copy", min_len=0), ["model.data.task_params.min_len=0"]),
    (dict(task="copy", min_len=5, max_len=3), ["model.data.task_params.max_len=3", "min_len=5"]),
    (dict(task="copy", alphabet="abca"), ["model.data.task_params.alphabet", "'a' appears twice"]),
    (dict(task="copy", alphabet=123), ["model.data.task_params.alphabet=123"]),
    (dict(task="copy", alphabet="aé"), ["model.data.task_params.alphabet", "'é'"]),
    (dict(task="copy", val_fraction=0.6, test_fraction=0.4), ["val_fraction", "test_fraction", "< 1"]),
    (dict(task="copy", num_train=0), ["model.data.task_params.num_train=0"]),
    (dict(task="copy", bos="yes"), ["model.data.task_params.bos"]),
    (dict(task="histogram", count="total"), ["model.data.task_params.count='total'", "prefix"]),
    (dict(task="histogram", max_len=70, seq_length=200), ["model.data.task_params.max_len=70", "61"]),
    (dict(task="sort", count="sequence"), ["model.data.task_params.count", "unknown parameter of task 'sort'"]),
])
def test_bad_task_config_names_the_key(kwargs, needles):
    with pytest.raises(ConfigError) as e:
        _setup(**kwargs)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_task_params_without_task_and_prefix_with_task():
    cfg = load_config(overrides=["model.data.task_params={max_len: 3}"])
    with pytest.raises(ConfigError, match="model.data.task is null"):
        resolve_synthetic(cfg.model.data, CHAR, 32)
    cfg = load_config(overrides=["model.data.task=copy", "model.data.data_prefix=[/data/x]"])
    with pytest.raises(ConfigError, match="model.data.data_prefix"):
        resolve_synthetic(cfg.model.data, CHAR, 32)
    cfg = load_config(overrides=["model.data.task=Copy"])  # names are case-insensitive
    assert resolve_synthetic(cfg.model.data, CHAR, 32).spec.name == "copy"
    assert resolve_synthetic(load_config().model.data, CHAR, 32) is None  # default: the indexed datasets
    p = parse_task_params(get_task("copy"), None)
    assert isinstance(p, TaskParams) and (p.min_len, p.max_len, p.alphabet) == (1, 10, "abcdefghij")


# ------------------------------------------------------------------------------------------- val/exact_match
def _greedy_exact(model, sample, tok):
    """Generate after <sep> with argmax, one token at a time; True when it produces exactly target + <eod>."""
    tokens, labels, mask = sample["tokens"], sample["labels"], sample["loss_mask"]
    first = int(mask.nonzero()[0])  # the <sep> position: it predicts the first target token
    want = labels[mask > 0].tolist()
    seq = tokens[: first + 1].tolist()
    out = []
    while len(out) < len(want):
        logits = model(torch.tensor([seq]))
        nxt = int(model.gather_logits(logits)[0, -1].argmax())
        out.append(nxt)
        seq.append(nxt)
        if nxt == tok.eod:
            break
    return out == want


def test_exact_match_equals_greedy_generation(one_thread):
    from megatron_ext.parallel.state import initialize_parallel
    from megatron_ext.training.gpt_task import GPTTask

    initialize_parallel(1, 1, accelerator="cpu")
    cfg = load_config(overrides=[
        "model.tokenizer.library=char", "model.data.task=copy", "model.seq_length=12", "model.num_layers=2",
        "model.hidden_size=48", "model.num_attention_heads=4", "model.hidden_dropout=0", "model.attention_dropout=0",
        "model.make_vocab_size_divisible_by=8", "model.data.task_params={min_len: 1, max_len: 5, alphabet: abcdef}"])
    task = GPTTask(cfg, torch.device("cpu"))
    tok = task.tokenizer
    train, val, _ = task.build_datasets((32 * 150, 48, 0))
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    samples = [val[i] for i in range(len(val))]
    vbatch = collate_gpt_batch(samples)
    mixed = False
    for step in range(151):
        if step % 50 == 0:
            model.eval()
            with torch.no_grad():
                loss, ntok, extras = task.loss(model, vbatch)
                per_seq = [int(task.loss(model, collate_gpt_batch([s]))[2]["exact_match"][0]) for s in samples]
                greedy = [_greedy_exact(model, s, tok) for s in samples]
                # the synthetic loss path gives the same loss as the plain one
                plain = model(vbatch["tokens"], position_ids=vbatch["position_ids"], labels=vbatch["labels"])
                plain = (plain * vbatch["loss_mask"]).sum() / vbatch["loss_mask"].sum()
            assert torch.allclose(loss, plain, atol=1e-5) and ntok == vbatch["loss_mask"].sum()
            assert per_seq == [int(g) for g in greedy], step
            assert extras["exact_match"] == (sum(greedy), len(samples))
            mixed |= 0 < sum(greedy) < len(samples)
            right, total = extras["token_accuracy"]
            assert total == vbatch["loss_mask"].sum() and 0 <= right <= total
            model.train()
        if step == 150:
            break
        loss, _, _ = task.loss(model, collate_gpt_batch([train[i] for i in range(step * 32, step * 32 + 32)]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert mixed  # some evaluation had right and wrong sequences, so the comparison meant something



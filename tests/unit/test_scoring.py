"""Perplexity scoring (megatron_ext.inference.scoring, LM.perplexities) and tools/evaluate.py: every number is
checked against F.cross_entropy on the full-vocabulary logits of single, unpadded forward passes."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from helpers import REPO, tiny_lm
from megatron_ext.errors import ConfigError, DataError
from megatron_ext.inference.scoring import perplexities
from megatron_ext.parallel.state import initialize_parallel

TEXTS = ["hello", "hi there", "a", "", "the quick brown fox"]


@pytest.fixture(autouse=True, scope="module")
def _tp1():
    initialize_parallel(1, 1, accelerator="cpu")
    yield


def gpt_lm(seq_length=32, **kw):
    return tiny_lm("gpt", seq_length=seq_length, **kw)


def mega_lm(seq_length=16):
    return tiny_lm("mega", seq_length=seq_length)


def encdec_lm():
    return tiny_lm("encdec", num_layers=1)


@torch.no_grad()
def ref_ce(lm, ids):
    """Per-token CE of one sequence from one unpadded forward and F.cross_entropy on the gathered logits."""
    if len(ids) < 2:
        return torch.zeros(0)
    lm.model.eval()
    x = torch.tensor([ids[:-1]])
    logits = lm.model.gather_logits(lm.model(x))[0]
    assert logits.shape[-1] == lm.tokenizer.vocab_size
    return F.cross_entropy(logits.float(), torch.tensor(ids[1:]), reduction="none")


def expected(ces, before_exp, dummy=-1.0):
    flat = torch.cat([c.double() for c in ces])
    mean = flat.mean().item()
    f = (lambda v: v) if before_exp else math.exp
    width = max(len(c) for c in ces)
    rows = torch.full((len(ces), width), dummy)
    for i, c in enumerate(ces):
        rows[i, : len(c)] = c if before_exp else c.exp()
    return f(mean), f(flat.max().item()), f(flat.min().item()), flat.numel(), rows


def assert_result(res, exp, rel=1e-5):
    mean, mx, mn, n, rows = res
    assert n == exp[3]
    assert mean == pytest.approx(exp[0], rel=rel)
    assert mx == pytest.approx(exp[1], rel=rel)
    assert mn == pytest.approx(exp[2], rel=rel)
    assert isinstance(rows, torch.Tensor) and rows.shape == exp[4].shape
    torch.testing.assert_close(rows, exp[4].float(), rtol=rel, atol=1e-5)


# ------------------------------------------------------------------------------------------------ decoder-only
@pytest.mark.parametrize("before_exp", [False, True])
def test_strings_match_manual_cross_entropy(before_exp):
    lm = gpt_lm()
    lm.model.train()  # dropout in the config: scoring must run in eval mode and put the mode back
    ces = [ref_ce(lm, lm.encode(t)) for t in TEXTS]
    exp = expected(ces, before_exp, dummy=-7.5)
    lm.model.train()
    res = lm.perplexities(TEXTS, per_token=True, before_exp=before_exp, dummy_res=-7.5, batch_size=2)
    assert lm.model.training
    assert_result(res, exp)
    # shape: [num_sequences, max_len - 1], dummy exactly where no prediction exists
    assert res[4].shape == (5, len("the quick brown fox") - 1)
    assert (res[4][2:4] == -7.5).all() and (res[4][0, 4:] == -7.5).all() and (res[4][0, :4] != -7.5).all()
    # the corpus perplexity is exp(mean CE), not the mean of per-token perplexities
    if not before_exp:
        flat = torch.cat(ces).double()
        assert res[0] == pytest.approx(math.exp(flat.mean().item()), rel=1e-6)
        assert abs(res[0] - flat.exp().mean().item()) > 1e-3 * res[0]
    # batch size does not change anything; per_token=False gives an empty list
    res1 = perplexities(lm, TEXTS, per_token=False, before_exp=before_exp, batch_size=1)
    assert res1[4] == [] and res1[3] == exp[3]
    assert res1[0] == pytest.approx(res[0], rel=1e-5) and res1[1] == pytest.approx(res[1], rel=1e-5)


def test_model_loss_equals_cross_entropy_on_gathered_logits():
    lm = gpt_lm().model.eval()
    x = torch.randint(0, 259, (3, 12), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 259, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ce = lm(x, labels=y)
        ref = F.cross_entropy(lm.gather_logits(lm(x)).reshape(-1, 259), y.reshape(-1), reduction="none").view(3, 12)
    torch.testing.assert_close(ce, ref, rtol=1e-5, atol=1e-5)


def test_id_lists_and_tensors_score_like_strings():
    lm = gpt_lm()
    ids = [lm.encode(t) for t in TEXTS[:2]]
    a = lm.perplexities(TEXTS[:2], per_token=True)
    b = lm.perplexities([ids[0], torch.tensor(ids[1])], per_token=True)
    c = lm.perplexities(torch.tensor([lm.encode("hello"), lm.encode("world")]), per_token=True)
    assert a[:4] == pytest.approx(b[:4]) and torch.equal(a[4], b[4])
    exp = expected([ref_ce(lm, lm.encode("hello")), ref_ce(lm, lm.encode("world"))], False)
    assert_result(c, exp)


def test_text_and_jsonl_files(tmp_path):
    lm = gpt_lm()
    txt = tmp_path / "corpus.txt"
    txt.write_bytes("hello\r\n\n   \nhi there\nthe quick brown fox\n".encode())
    jl = tmp_path / "corpus.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["hello", "hi there"])) + "\n")
    ref = lm.perplexities(["hello", "hi there", "the quick brown fox"], per_token=True)
    got = lm.perplexities(str(txt), per_token=True)
    assert got[:4] == pytest.approx(ref[:4]) and torch.equal(got[4], ref[4])
    got = lm.perplexities(jl, per_token=True)  # a PathLike works too
    ref2 = lm.perplexities(["hello", "hi there"], per_token=True)
    assert got[:4] == pytest.approx(ref2[:4]) and torch.equal(got[4], ref2[4])
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"body": "hello"}) + "\n")
    assert lm.perplexities(str(other), text_key="body")[:4] == pytest.approx(lm.perplexities(["hello"])[:4])
    with pytest.raises(DataError, match=r"other\.jsonl, line 1: missing key 'text'; the object has keys: body"):
        lm.perplexities(str(other))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: not valid JSON"):
        lm.perplexities(str(bad))
    with pytest.raises(DataError, match=r"no such file"):
        lm.perplexities(str(tmp_path / "missing.txt"))


def test_dataloader_of_token_tensors():
    lm = gpt_lm()
    seqs = [torch.tensor(lm.encode(t)) for t in ("abcdefgh", "12345678", "xyzxyzxy")]
    loader = DataLoader(seqs, batch_size=2)
    got = lm.perplexities(loader, per_token=True, before_exp=True, batch_size=3)
    assert_result(got, expected([ref_ce(lm, s.tolist()) for s in seqs], True))


def test_dataloader_of_gpt_batches_with_loss_mask_and_position_ids():
    lm = gpt_lm()
    g = torch.Generator().manual_seed(5)
    full = torch.randint(0, 256, (4, 13), generator=g)
    loss_mask = torch.ones(4, 12)
    loss_mask[1, 3:7] = 0.0
    loss_mask[3, :] = 0.0
    samples = [{"tokens": full[i, :-1], "labels": full[i, 1:], "loss_mask": loss_mask[i],
                "position_ids": torch.arange(12)} for i in range(4)]
    got = lm.perplexities(DataLoader(samples, batch_size=3), per_token=True, before_exp=True, dummy_res=-2.0)
    ces = [ref_ce(lm, full[i].tolist()) for i in range(4)]
    kept = torch.cat([c[loss_mask[i] > 0] for i, c in enumerate(ces)]).double()
    mean, mx, mn, n, rows = got
    assert n == int(loss_mask.sum()) == kept.numel()
    assert mean == pytest.approx(kept.mean().item(), rel=1e-5)
    assert mx == pytest.approx(kept.max().item(), rel=1e-5) and mn == pytest.approx(kept.min().item(), rel=1e-5)
    ref_rows = torch.stack(ces).where(loss_mask > 0, torch.tensor(-2.0))
    assert rows.shape == (4, 12)
    torch.testing.assert_close(rows, ref_rows, rtol=1e-5, atol=1e-5)
    # a batch whose labels do not match the tokens is refused with the key named
    bad = [{"tokens": full[0, :-1], "labels": full[0, 1:-1]}]
    with pytest.raises(DataError, match=r"DataLoader batch 0: 'labels' has shape \(1, 11\), expected \(1, 12\)"):
        lm.perplexities(DataLoader(bad, batch_size=1))


def _windowed_reference(lm, ids, W, stride):
    """Independent reference: prediction i (of token i + 1) comes from the earliest window [k*stride, k*stride + W)
    of the inputs ids[:-1] that contains position i."""
    L = len(ids) - 1
    out = torch.empty(L)
    contexts = []
    for i in range(L):
        k = 0 if i < W else (i - W) // stride + 1
        begin = k * stride
        assert begin <= i < begin + W
        ce = ref_ce(lm, ids[begin: min(begin + W, L) + 1])
        out[i] = ce[i - begin]
        contexts.append(i - begin + 1)
    return out, contexts


@pytest.mark.parametrize("max_length,stride", [(None, None), (10, 3), (16, 16)])
def test_long_sequences_use_a_sliding_window(max_length, stride):
    lm = gpt_lm(seq_length=16)
    ids = lm.encode("It was the best of times, it was the worst of times.")  # 52 tokens > 16
    W = 16 if max_length is None else max_length
    s = W // 2 if stride is None else stride
    ref, contexts = _windowed_reference(lm, ids, W, s)
    got = lm.perplexities([ids, lm.encode("short")], per_token=True, before_exp=True, max_length=max_length,
                          stride=stride, batch_size=3)
    assert got[3] == len(ids) - 1 + 4  # every token scored once: nothing truncated
    torch.testing.assert_close(got[4][0], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[4][1, :4], ref_ce(lm, lm.encode("short")), rtol=1e-5, atol=1e-5)
    assert min(contexts[W:]) == W - s + 1  # the documented context guarantee after the first window
    # the first window is exactly a plain forward of the first W tokens
    torch.testing.assert_close(got[4][0, :W - 1], ref_ce(lm, ids[:W]), rtol=1e-5, atol=1e-5)


def test_window_arguments_and_long_rows_with_positions_are_checked():
    lm = gpt_lm(seq_length=16)
    with pytest.raises(ConfigError, match=r"stride=17: expected at most the window length max_length=16"):
        lm.perplexities(["hello"], stride=17)
    with pytest.raises(ConfigError, match=r"max_length=20: .*model.max_position_embeddings=16"):
        lm.perplexities(["hello"], max_length=20)
    rope = gpt_lm(seq_length=16, position_embedding_type="rope")
    long_text = "x" * 40
    assert rope.perplexities([long_text], max_length=24)[3] == 39  # rope: a longer window is allowed
    row = {"tokens": torch.arange(20), "labels": torch.arange(1, 21), "position_ids": torch.arange(20)}
    with pytest.raises(DataError, match=r"row 0: 20 positions with explicit position_ids do not fit .* 16 tokens"):
        lm.perplexities(DataLoader([row], batch_size=1))


def test_bad_inputs_give_one_clear_error():
    lm = gpt_lm()
    cases = [
        (dict(data=123), DataError, r"data: expected a list of sequences .* got int"),
        (dict(data=[]), DataError, r"no sequences to score"),
        (dict(data=["a", "b"]), DataError, r"every sequence has fewer than 2 tokens"),
        (dict(data=[[1, 2, 999]]), DataError, r"data\[0\]: token id 999 is outside the model's vocabulary \[0, 259\)"),
        (dict(data=[3.5]), DataError, r"data\[0\]: expected a string, a list of token ids or a 1-D tensor, got float"),
        (dict(data=["ab"], per_token="yes"), ConfigError, r"per_token='yes': expected True or False"),
        (dict(data=["ab"], batch_size=0), ConfigError, r"batch_size=0: expected a positive integer"),
        (dict(data=["ab"], dummy_res="x"), ConfigError, r"dummy_res='x': expected a number"),
        (dict(data=torch.zeros(3, dtype=torch.long)), DataError, r"a tensor must be a \[batch, seq\] batch"),
    ]
    for kw, err, msg in cases:
        data = kw.pop("data")
        with pytest.raises(err, match=msg):
            lm.perplexities(data, **kw)


def test_mega_lm_scoring_matches_manual():
    lm = mega_lm()
    texts = ["mega scoring", "abc"]
    got = lm.perplexities(texts, per_token=True)
    assert_result(got, expected([ref_ce(lm, lm.encode(t)) for t in texts], False), rel=1e-4)


# ------------------------------------------------------------------------------------------------ encoder-decoder
@torch.no_grad()
def ref_pair_ce(lm, src, tgt):
    tok = lm.tokenizer
    bos = tok.bos if tok.bos is not None else tok.eod
    s, t = lm.encode(src), lm.encode(tgt)
    logits = lm.model.gather_logits(lm.model.eval()(torch.tensor([s]), torch.tensor([[bos] + t])))[0]
    return F.cross_entropy(logits.float(), torch.tensor(t + [tok.eod]), reduction="none")


def test_encdec_scores_target_given_source_from_pairs_jsonl_and_bart_batches(tmp_path):
    from megatron_ext.data.bart import collate_bart_batch, make_sample

    lm = encdec_lm()
    pairs = [("the source", "target"), ("abc", "xy"), ("hello there", "")]
    ces = [ref_pair_ce(lm, s, t) for s, t in pairs]
    exp = expected(ces, True)
    got = lm.perplexities(pairs, per_token=True, before_exp=True, batch_size=2)
    assert_result(got, exp)
    assert got[4].shape == (3, len("target") + 1)  # bos + target + eos: len - 1 predictions
    # the source matters
    a = lm.perplexities([("the source", "target")], before_exp=True)[0]
    assert lm.perplexities([("zzzz", "target")], before_exp=True)[0] != pytest.approx(a, rel=1e-4)

    jl = tmp_path / "pairs.jsonl"
    jl.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs))
    got_f = lm.perplexities(str(jl), per_token=True, before_exp=True)
    assert got_f[:4] == pytest.approx(got[:4]) and torch.allclose(got_f[4], got[4], atol=1e-6)

    tok = lm.tokenizer
    samples = [make_sample(torch.tensor(lm.encode(s)).numpy(), torch.tensor(lm.encode(t), dtype=torch.long).numpy(),
                           12, 10, pad=tok.pad, bos=tok.bos, eos=tok.eod) for s, t in pairs]
    loader = DataLoader(samples, batch_size=2, collate_fn=collate_bart_batch)
    got_b = lm.perplexities(loader, per_token=True, before_exp=True)
    assert got_b[3] == exp[3]
    assert got_b[0] == pytest.approx(exp[0], rel=1e-5) and got_b[1] == pytest.approx(exp[1], rel=1e-5)
    assert got_b[4].shape == (3, 10)  # rows are the batches' seq_length_dec columns
    torch.testing.assert_close(got_b[4][:, :7], got[4], rtol=1e-5, atol=1e-5)
    assert (got_b[4][:, 7:] == -1.0).all()


def test_encdec_bad_inputs():
    lm = encdec_lm()
    with pytest.raises(DataError, match=r"data\[0\]: an encoder-decoder LM scores \(source, target\) pairs; got str"):
        lm.perplexities(["just text"])
    with pytest.raises(DataError, match=r"data\[0\]: the source has 13 tokens, more than model.seq_length=12"):
        lm.perplexities([("x" * 13, "ok")])
    with pytest.raises(DataError, match=r"data\[0\]: bos \+ the target is 11 tokens, more than model.seq_length_dec=10"):
        lm.perplexities([("ok", "y" * 10)])
    with pytest.raises(DataError, match=r"data\[0\]: the source is empty"):
        lm.perplexities([("", "ok")])
    with pytest.raises(ConfigError, match=r"sliding window is for decoder-only LMs"):
        lm.perplexities([("a", "b")], max_length=8)
    with pytest.raises(DataError, match=r"expected a JSONL file with 'source' and 'target' keys"):
        lm.perplexities(os.path.join(REPO, "README.md"))



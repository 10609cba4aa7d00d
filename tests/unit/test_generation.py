"""Generation with a KV cache for every family (GPT learned/rope, encoder-decoder with a transformer or Mega
decoder, Mega GPT): cached greedy == uncached greedy token for token, batched left-padded prompts == each prompt
alone, cached logits == uncached logits at every step, beam search, top-k, repetition penalty, stop tokens, seeded
sampling, seed 003's ``sample``, argument errors, the TP=2 cache (torchrun) and the CLI.

Models are tiny and random-init, with every weight perturbed (so biases / norms are not trivial) and enough
scale that the greedy outputs are varied -- every greedy comparison also checks the output is not one token
repeated."""

import pytest
import torch

from helpers import perturb
from megatron_ext.config.schema import EncoderDecoderModelConfig, MegaArchConfig, ModelConfig, TransformerStackConfig
from megatron_ext.inference.generation import (
    GenerationConfig,
    GenerationError,
    apply_repetition_penalty,
    beam_search,
    filter_logits,
    generate,
    open_session,
    process_logits,
    sample,
)
from megatron_ext.inference.lm import LM
from megatron_ext.models.encoder_decoder import EncoderDecoderModel
from megatron_ext.models.gpt import GPTModel
from megatron_ext.models.mega_lm import MegaGPTModel
from megatron_ext.tokenizers import build_tokenizer, ensure_mask_token

NEW = 24  # new tokens per greedy comparison (>= 20)
PROMPTS = ["The quick brown fox", "to", "", "jumps over the lazy dog again and"]
MEGA_ARCH = dict(shared_representation_size=16, intermediate_size=32, nffn_hidden_size=32, ema_projection_size=4,
                 ema_impl="fft")


pytestmark = pytest.mark.usefixtures("tp1_one_thread")  # decode steps are tiny ops: one thread


def _perturb(model, seed=5, scale=0.3):
    return perturb(model, seed, scale).eval()


def gpt_lm(pos="learned_absolute", seed=0, **kw):
    tok = build_tokenizer("byte")
    cfg = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=64, hidden_dropout=0.0,
               attention_dropout=0.0, make_vocab_size_divisible_by=8, position_embedding_type=pos)
    cfg.update(kw)
    return LM(_perturb(GPTModel(ModelConfig(**cfg), tok.vocab_size, init_seed=seed)), tok)


def mega_lm(chunk_size=-1, seed=0):
    tok = build_tokenizer("byte")
    cfg = ModelConfig(arch="mega", num_layers=2, hidden_size=32, seq_length=64, hidden_dropout=0.0,
                      attention_dropout=0.0, make_vocab_size_divisible_by=8,
                      mega=MegaArchConfig(chunk_size=chunk_size, **MEGA_ARCH))
    return LM(_perturb(MegaGPTModel(cfg, tok.vocab_size, init_seed=seed)), tok)


def encdec_lm(dec_arch="transformer", pos="learned_absolute", enc_arch="transformer", seed=0):
    tok = ensure_mask_token(build_tokenizer("byte"))
    common = dict(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0,
                  hidden_steps=5)
    dec = dict(common, arch=dec_arch)
    if dec_arch == "mega":
        dec["mega"] = MegaArchConfig(**MEGA_ARCH)
    cfg = EncoderDecoderModelConfig(encoder=TransformerStackConfig(**dict(common, arch=enc_arch)),
                                    decoder=TransformerStackConfig(**dec), seq_length=48, seq_length_dec=48,
                                    make_vocab_size_divisible_by=8, position_embedding_type=pos)
    return LM(_perturb(EncoderDecoderModel(cfg, tok.vocab_size, init_seed=seed)), tok)


FAMILIES = {
    "gpt_learned": lambda: gpt_lm("learned_absolute"),
    "gpt_rope": lambda: gpt_lm("rope", normalization="rmsnorm", activation="swiglu", bias=False,
                               share_embeddings_and_output_weights=False),
    "encdec_transformer": lambda: encdec_lm("transformer"),
    "encdec_transformer_rope_perceiver": lambda: encdec_lm("transformer", pos="rope", enc_arch="perceiver", seed=1),
    "encdec_mega_decoder": lambda: encdec_lm("mega"),
    "mega_gpt": lambda: mega_lm(),
    "mega_gpt_chunked": lambda: mega_lm(chunk_size=4),
}
# grouped-query attention (8 heads, 2 key/value heads): only in the cache-vs-recompute tests
GQA = {"gpt_gqa": lambda: gpt_lm("rope", num_attention_heads=8, num_query_groups=2, normalization="rmsnorm",
                                 activation="swiglu", bias=False, share_embeddings_and_output_weights=False)}


def _default_banned(lm):
    tok = lm.tokenizer
    return [tok.pad] if lm.family != "encdec" else [tok.pad, tok.mask, tok.bos]


def _varied(outputs):
    flat = [t for seq in outputs for t in seq]
    assert len(flat) >= NEW and len(set(flat)) > 3, f"degenerate greedy output: {outputs}"


@pytest.mark.parametrize("name", list(FAMILIES) + list(GQA))
def test_greedy_cached_equals_uncached_and_batch_equals_alone(name):
    lm = {**FAMILIES, **GQA}[name]()
    kw = dict(max_new_tokens=NEW, greedy=True, stop_tokens=[], output="tokens")
    cached = generate(lm, PROMPTS, **kw)
    uncached = generate(lm, PROMPTS, use_cache=False, **kw)
    assert cached == uncached
    assert all(len(seq) == NEW for seq in cached)
    _varied(cached)
    alone = [generate(lm, p, **kw) for p in PROMPTS]
    assert alone == cached
    assert not lm.model.training


@pytest.mark.parametrize("name", ["gpt_learned", "gpt_rope", "encdec_transformer", "encdec_mega_decoder",
                                  "mega_gpt", "gpt_gqa"])
def test_cached_logits_match_uncached_at_every_step(name):
    lm = {**FAMILIES, **GQA}[name]()
    prompts = [lm.encode(p) if lm.family == "encdec" else (lm.encode(p) or [lm.tokenizer.eod]) for p in PROMPTS]
    a = open_session(lm, prompts, max_new_tokens=NEW, use_cache=True)
    b = open_session(lm, prompts, max_new_tokens=NEW, use_cache=False)
    assert a.cache is not None and b.cache is None
    if name == "gpt_gqa":  # the cache holds one key/value head per query group, not one per query head
        assert a.cache.layer(0).k.shape[1] == a.cache.layer(0).v.shape[1] == 2
    worst = scale = 0.0
    for step in range(NEW - 1):
        assert a.logits.shape == b.logits.shape == (a.logits.shape[0], lm.model.vocab_size)
        worst = max(worst, (a.logits - b.logits).abs().max().item())
        scale = max(scale, b.logits.abs().max().item())
        nxt = a.logits.argmax(dim=-1)
        if step == 10:  # drop a row and reorder the rest, as finished rows / beams do
            rows = torch.tensor([2, 0, 1])
            for s in (a, b):
                s.select(rows)
            nxt = nxt[rows]
        a.step(nxt)
        b.step(nxt)
    # fp32 rounding only: relative to the logits' size (rotary on one position vs the whole sequence rounds
    # differently: 1.5-2.4e-6 relative on an AMD EPYC, 2e-5 absolute); a wrong cache is off by O(1)
    assert worst < 5e-6 * max(1.0, scale), (worst, scale)
    assert a.logits.shape[0] == 3


@pytest.mark.parametrize("name", ["gpt_learned", "encdec_transformer", "mega_gpt"])
def test_beam_search_one_beam_is_greedy_and_cache_agrees(name):
    lm = FAMILIES[name]()
    kw = dict(max_new_tokens=NEW, stop_tokens=[], output="tokens")
    greedy = generate(lm, PROMPTS, greedy=True, **kw)
    assert beam_search(lm, PROMPTS, num_beams=1, **kw) == greedy
    beams = generate(lm, PROMPTS, num_beams=3, output="both", max_new_tokens=NEW, stop_tokens=[])
    beams_nc = generate(lm, PROMPTS, num_beams=3, output="both", max_new_tokens=NEW, stop_tokens=[],
                        use_cache=False)
    assert [r["tokens"] for r in beams] == [r["tokens"] for r in beams_nc]
    assert all(len(r["tokens"]) == NEW and r["finish_reason"] == "length" for r in beams)
    # the reported score is the hypothesis' summed log-probability (pad banned) / its length
    for prompt, r in zip(PROMPTS, beams):
        ids = lm.encode(prompt) if lm.family == "encdec" else (lm.encode(prompt) or [lm.tokenizer.eod])
        s = open_session(lm, [ids], max_new_tokens=NEW, use_cache=False)
        total = 0.0
        for tok in r["tokens"]:
            logits = process_logits(s.logits, banned=_default_banned(lm))
            total += torch.log_softmax(logits, dim=-1)[0, tok].item()
            s.step(torch.tensor([tok]))
        assert abs(total / NEW - r["score"]) < 1e-4, (total / NEW, r["score"])


def test_beam_search_stops_and_scores_with_length_penalty():
    lm = FAMILIES["gpt_learned"]()
    greedy = generate(lm, PROMPTS[0], greedy=True, max_new_tokens=NEW, stop_tokens=[], output="tokens")
    stop = greedy[5]
    res = generate(lm, PROMPTS[0], num_beams=1 + 1, max_new_tokens=NEW, stop_tokens=[stop], output="both")
    assert stop not in res["tokens"]
    # one beam with a stop token: the greedy output cut at its first stop token, finished by "stop"
    one = beam_search(lm, PROMPTS[0], num_beams=1, max_new_tokens=NEW, stop_tokens=[stop], output="both")
    assert one["tokens"] == greedy[: greedy.index(stop)] and one["finish_reason"] == "stop"
    long_pen = generate(lm, PROMPTS[0], num_beams=4, max_new_tokens=12, stop_tokens=[stop], length_penalty=2.0,
                        output="both")
    assert isinstance(long_pen["score"], float)


@pytest.mark.parametrize("name", ["gpt_rope", "encdec_transformer"])
def test_top_k_one_is_greedy(name):
    lm = FAMILIES[name]()
    kw = dict(max_new_tokens=NEW, stop_tokens=[], output="tokens")
    assert generate(lm, PROMPTS, top_k=1, temperature=1.3, seed=4, **kw) == generate(lm, PROMPTS, greedy=True, **kw)
    assert generate(lm, PROMPTS, temperature=0, **kw) == generate(lm, PROMPTS, greedy=True, **kw)


def test_seeded_sampling_reproducible_and_seeds_differ():
    lm = FAMILIES["gpt_learned"]()
    kw = dict(max_new_tokens=NEW, stop_tokens=[], output="tokens", temperature=1.0)
    a = generate(lm, PROMPTS, seed=1, **kw)
    assert a == generate(lm, PROMPTS, seed=1, **kw)
    assert a == generate(lm, PROMPTS, seed=1, use_cache=False, **kw)
    assert a != generate(lm, PROMPTS, seed=2, **kw)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert generate(lm, PROMPTS, generator=g1, top_p=0.9, **kw) == generate(lm, PROMPTS, generator=g2, top_p=0.9,
                                                                            **kw)
    enc = FAMILIES["encdec_transformer"]()
    b = generate(enc, PROMPTS, seed=3, **kw)
    assert b == generate(enc, PROMPTS, seed=3, **kw) and b != generate(enc, PROMPTS, seed=4, **kw)


def test_repetition_penalty_changes_a_repetitive_greedy_output():
    lm = FAMILIES["gpt_learned"]()
    kw = dict(max_new_tokens=NEW, greedy=True, stop_tokens=[], output="tokens")
    plain = generate(lm, PROMPTS, **kw)
    repeats = [len(seq) - len(set(seq)) for seq in plain]
    assert max(repeats) >= 5, plain  # the random model repeats itself
    penalized = generate(lm, PROMPTS, repetition_penalty=3.0, **kw)
    assert penalized != plain
    assert sum(len(seq) - len(set(seq)) for seq in penalized) < sum(repeats)
    assert penalized == generate(lm, PROMPTS, repetition_penalty=3.0, use_cache=False, **kw)
    # CTRL: positive logits of present tokens divided, negative ones multiplied
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    present = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, present, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]


@pytest.mark.parametrize("name", ["gpt_learned", "encdec_transformer", "mega_gpt"])
def test_stop_tokens_end_a_sequence_and_the_batch_keeps_going(name):
    lm = FAMILIES[name]()
    kw = dict(max_new_tokens=NEW, greedy=True, output="both")
    free = generate(lm, PROMPTS, stop_tokens=[], **kw)
    stop = free[0]["tokens"][4]  # a token that ends row 0 early
    got = generate(lm, PROMPTS, stop_tokens=[stop], **kw)
    stopped = 0
    for f, g in zip(free, got):
        if stop in f["tokens"]:
            assert g["tokens"] == f["tokens"][: f["tokens"].index(stop)] and g["finish_reason"] == "stop"
            stopped += 1
        else:
            assert g["tokens"] == f["tokens"] and g["finish_reason"] == "length"
    assert stopped >= 1 and any(g["finish_reason"] == "length" for g in got), (free, stop)
    assert generate(lm, PROMPTS, stop_tokens=[stop], use_cache=False, **kw) == got
    # a string stop sequence of two tokens
    seq = free[3]["tokens"][6:8]
    text = lm.decode(seq)
    if lm.encode(text) == seq:
        cut = generate(lm, PROMPTS[3], stop_tokens=[text], **kw)
        assert cut["finish_reason"] == "stop" and len(cut["tokens"]) <= 6


def test_eos_stops_by_default():
    lm = gpt_lm("learned_absolute", share_embeddings_and_output_weights=False)
    eod = lm.tokenizer.eod
    with torch.no_grad():  # final norm outputs its bias u everywhere; the eod row of the head is 10 u: eod wins
        norm = lm.model.decoder.final_layernorm
        norm.weight.zero_()
        lm.model.output_layer.weight[eod] = 10 * norm.bias
    forced = generate(lm, PROMPTS, max_new_tokens=5, greedy=True, stop_tokens=[], output="tokens")
    assert forced == [[eod] * 5] * len(PROMPTS)
    res = generate(lm, PROMPTS, max_new_tokens=5, greedy=True, output="both")
    assert all(r["finish_reason"] == "stop" and r["tokens"] == [] and r["text"] == "" for r in res)


def test_sample_follows_seed_003():
    lm = FAMILIES["gpt_learned"]()
    out = sample(lm, pref="The quick", max_seq_len=20, temperature=0, stop_tokens=[])
    assert isinstance(out, str) and out.startswith("The quick")
    ids = sample(lm, pref="The quick", max_seq_len=20, temperature=0, as_str=False, stop_tokens=[])
    assert len(ids) == 20 and ids[:9] == lm.encode("The quick")
    greedy = generate(lm, "The quick", max_new_tokens=11, greedy=True, stop_tokens=[], output="tokens")
    assert ids[9:] == greedy
    assert lm.sample(pref=list(ids[:3]), max_seq_len=2, as_str=False) == ids[:3]  # already long enough
    a = lm.sample(pref="", max_seq_len=15, temperature=0.8, nucleus=0.9, seed=11)
    assert a == lm.sample(pref="", max_seq_len=15, temperature=0.8, nucleus=0.9, seed=11)
    assert len(lm.sample(pref=torch.tensor([1, 2, 3]), max_seq_len=10, top_k=5, as_str=False, stop_tokens=[])) == 10
    with pytest.raises(ValueError, match="top_k.*nucleus|nucleus.*top_k"):
        lm.sample(pref="a", nucleus=0.9, top_k=5)


@pytest.mark.parametrize("kw, words", [
    (dict(top_k=5, top_p=0.9), ("top_k", "top_p")),
    (dict(top_k=5, nucleus=0.9), ("top_k", "nucleus")),
    (dict(top_p=0.5, nucleus=0.9), ("top_p", "nucleus")),
    (dict(max_new_tokens=0), ("max_new_tokens",)),
    (dict(max_new_tokens=2.5), ("max_new_tokens",)),
    (dict(temperature=-0.1), ("temperature",)),
    (dict(top_p=0.0), ("top_p",)),
    (dict(top_p=1.5), ("top_p",)),
    (dict(nucleus=0), ("nucleus",)),
    (dict(top_k=0), ("top_k",)),
    (dict(num_beams=0), ("num_beams",)),
    (dict(num_beams=2, top_k=3), ("num_beams", "top_k")),
    (dict(repetition_penalty=0.0), ("repetition_penalty",)),
    (dict(length_penalty=float("nan")), ("length_penalty",)),
    (dict(stop_tokens=[999]), ("stop_tokens", "999")),
    (dict(stop_tokens=[""]), ("stop_tokens",)),
    (dict(seed=1, generator=torch.Generator()), ("seed", "generator")),
    (dict(seed=-1), ("seed",)),
    (dict(output="json"), ("output",)),
    (dict(use_cache="yes"), ("use_cache",)),
])
def test_bad_arguments_one_clear_error(kw, words):
    lm = FAMILIES["gpt_learned"]()
    with pytest.raises(GenerationError) as e:
        generate(lm, PROMPTS, **kw)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_generation_config_checked_once_and_normalized():
    import numpy as np

    cfg = GenerationConfig(max_new_tokens=np.int64(5), temperature=1, nucleus=0.5, seed=3)
    assert (cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.nucleus, cfg.beam) == (5, 1.0, 0.5, None, False)
    assert type(cfg.max_new_tokens) is int and type(cfg.temperature) is float
    assert GenerationConfig(num_beams=3).beam is True and GenerationConfig(num_beams=3, beam=False).beam is False
    with pytest.raises(GenerationError, match=r"^temperature=-1: expected a number >= 0"):
        GenerationConfig(temperature=-1)  # at construction, without a model

    lm = FAMILIES["gpt_learned"]()
    with pytest.raises(GenerationError, match=r"stop_tokens: token id 999 is outside the vocabulary"):
        GenerationConfig(stop_tokens=[999]).for_model(lm)  # the model-dependent options: checked by for_model
    resolved = cfg.for_model(lm)
    assert isinstance(resolved["generator"], torch.Generator) and resolved["banned"] == [int(lm.tokenizer.pad)]
    # one config for many calls gives what the same keyword arguments give
    kw = dict(max_new_tokens=6, temperature=0.9, top_k=7, seed=5, stop_tokens=[], output="tokens")
    assert generate(lm, PROMPTS, config=GenerationConfig(**kw)) == generate(lm, PROMPTS, **kw)
    assert lm.generate(PROMPTS[:2], config=GenerationConfig(**kw)) == generate(lm, PROMPTS[:2], **kw)
    with pytest.raises(GenerationError, match=r"config= with max_new_tokens, top_k=\.\.\."):
        generate(lm, PROMPTS, config=GenerationConfig(**kw), top_k=3, max_new_tokens=2)
    with pytest.raises(GenerationError, match="expected a GenerationConfig"):
        generate(lm, PROMPTS, config=dict(kw))


def test_bad_prompts_and_position_limits():
    lm = gpt_lm("learned_absolute", max_position_embeddings=32, seq_length=32)
    with pytest.raises(GenerationError, match=r"model\.max_position_embeddings=32"):
        generate(lm, "x" * 20, max_new_tokens=20)
    assert len(generate(lm, "x" * 20, max_new_tokens=13, stop_tokens=[], output="tokens")) == 13  # 20 + 13 - 1
    with pytest.raises(GenerationError, match=r"prompts=\[\]"):
        generate(lm, [])
    with pytest.raises(GenerationError, match=r"prompts\[1\].*outside the vocabulary"):
        generate(lm, [[1, 2], [1, 5000]])
    with pytest.raises(GenerationError, match=r"prompts\[0\]"):
        generate(lm, [3.5])
    rope = gpt_lm("rope", max_position_embeddings=32, seq_length=32)  # rope: no position table to run out of
    assert len(generate(rope, "x" * 20, max_new_tokens=20, stop_tokens=[], output="tokens")) == 20
    enc = encdec_lm("transformer")
    with pytest.raises(GenerationError, match=r"model\.max_position_embeddings=48"):
        generate(enc, "a", max_new_tokens=49)


def test_generate_from_memory_uses_the_cache_and_matches_uncached():
    from megatron_ext.inference.encdec_generation import generate_from_memory

    for dec in ("transformer", "mega"):
        lm = encdec_lm(dec)
        enc = torch.tensor([lm.encode("hello there"), lm.encode("general kenobi")[:11]])
        mem = lm.model.encode(enc)
        kw = dict(bos=lm.tokenizer.bos, eos=lm.tokenizer.eod, max_new_tokens=NEW,
                  banned_ids=[lm.tokenizer.pad, lm.tokenizer.bos])
        a = generate_from_memory(lm.model, mem["hiddens"], mem["hiddens_mask"], **kw)
        b = generate_from_memory(lm.model, mem["hiddens"], mem["hiddens_mask"], use_cache=False, **kw)
        assert a == b
        _varied(a)
        g = torch.Generator().manual_seed(0)
        s1 = generate_from_memory(lm.model, mem["hiddens"], None, greedy=False, top_k=20, top_p=0.95, generator=g,
                                  **kw)
        g = torch.Generator().manual_seed(0)
        assert s1 == generate_from_memory(lm.model, mem["hiddens"], None, greedy=False, top_k=20, top_p=0.95,
                                          generator=g, use_cache=False, **kw)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).tolist() == [[True, False, False, False]]


def test_training_forward_untouched_by_the_cache_arguments():
    lm = FAMILIES["gpt_learned"]()
    model = lm.model.train()
    x = torch.randint(0, 200, (2, 16))
    loss = model(x[:, :-1], labels=x[:, 1:])
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        ref = model.gather_logits(model(x))
        padded = model.gather_logits(model(x, padding_mask=torch.ones_like(x, dtype=torch.bool)))
    torch.testing.assert_close(padded, ref, rtol=1e-5, atol=1e-5)



"""Mega (moving-average gated attention) modules and HF-style models: shapes, directionality,
token types, long sequences, chunking, attention kinds, incremental decoding, norms, config errors."""
import pytest
import torch

from megatron_ext.models.hf_mega import (
    MegaCausalLMOutput,
    MegaConfig,
    MegaForCausalLM,
    MegaForMaskedLM,
    MegaModel,
    MegaModelOutput,
)
from megatron_ext.modules.mega import (
    GatedCrossAttention,
    MegaCache,
    MegaLayer,
    MovingAverageGatedAttention,
    NormalizedFeedForwardNetwork,
    RotaryRelativePositionalBias,
    SimpleRelativePositionalBias,
    build_mega_norm,
)

D, Z, H, N, V = 16, 16, 32, 4, 50
ATOL = 1e-5


def make_config(**kw):
    base = dict(vocab_size=V, hidden_size=D, num_hidden_layers=2, intermediate_size=H, ema_projection_size=N,
                shared_representation_size=Z, nffn_hidden_size=32, dropout_prob=0.0, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, nffn_activation_dropout_prob=0.0, max_positions=64,
                initializer_range=0.2)
    base.update(kw)
    return MegaConfig(**base)


def decoder_config(**kw):
    kw.setdefault("bidirectional", False)
    return make_config(is_decoder=True, **kw)


def seeded(cls, cfg, seed=0):
    torch.manual_seed(seed)
    return cls(cfg).eval()


def ids_(b, l, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (b, l), generator=g)


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
def test_config_defaults_and_roundtrip():
    c = MegaConfig()
    assert (c.hidden_size, c.intermediate_size, c.shared_representation_size, c.ema_projection_size) == (128, 256, 64, 16)
    assert c.normalization_type == "scalenorm" and c.relative_positional_bias == "rotary"
    assert c.bidirectional and not c.use_chunking and c.chunk_size == -1 and c.max_positions == 2048
    assert c.add_token_type_embeddings is False and c.add_lm_hidden_dense_layer and c.use_cache
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (1, 0, 2)
    assert c.ema_impl == "auto" and c.num_attention_heads == 1
    d = make_config(use_chunking=True, chunk_size=8).to_dict()
    assert MegaConfig.from_dict(d) == make_config(use_chunking=True, chunk_size=8)
    assert "num_attention_heads" not in d


def test_config_errors():
    with pytest.raises(TypeError, match="bogus_a.*bogus_b"):
        MegaConfig(bogus_b=1, bogus_a=2)
    with pytest.raises(ValueError, match="attention_activation.*softmax, laplace, relu2"):
        MegaConfig(attention_activation="gelu")
    with pytest.raises(ValueError, match="relative_positional_bias"):
        MegaConfig(relative_positional_bias="alibi")
    with pytest.raises(ValueError, match="normalization_type"):
        MegaConfig(normalization_type="groupnorm")
    with pytest.raises(ValueError, match="chunk_size"):
        MegaConfig(use_chunking=True, chunk_size=-1)
    with pytest.raises(ValueError, match="shared_representation_size"):
        MegaConfig(shared_representation_size=15)
    MegaConfig(shared_representation_size=15, relative_positional_bias="simple")  # odd Z is fine for simple
    with pytest.raises(ValueError, match="ema_impl"):
        MegaConfig(ema_impl="cuda")
    with pytest.raises(ValueError, match="MegaForCausalLM needs config.is_decoder"):
        MegaForCausalLM(make_config())
    with pytest.raises(ValueError, match="is_decoder=False"):
        MegaForMaskedLM(decoder_config())


# ------------------------------------------------------------------------------------------------
# norms and positional biases
# ------------------------------------------------------------------------------------------------
def test_rmsnorm_and_scalenorm_normalize():
    torch.manual_seed(0)
    x = 1000.0 * torch.randn(3, 5, D)
    for kind in ("rmsnorm", "scalenorm"):
        norm = build_mega_norm(kind, D)
        y = norm(x)
        rms = y.pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-4, rtol=0)
    norm = build_mega_norm("rmsnorm", D)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, D))
    y = norm(x) / norm.weight
    torch.testing.assert_close(y.pow(2).mean(-1).sqrt(), torch.ones(3, 5), atol=1e-4, rtol=0)
    assert build_mega_norm("rmsnorm", D, affine=False).weight is None


def test_other_norms_and_errors():
    torch.manual_seed(0)
    x = 3.0 + 5.0 * torch.randn(4, 7, D)
    bn = build_mega_norm("batchnorm", D).train()
    y = bn(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.mean(dim=(0, 1)), torch.zeros(D), atol=1e-5, rtol=0)  # per feature over B and L
    ln = build_mega_norm("layernorm", D)
    torch.testing.assert_close(ln(x).mean(-1), torch.zeros(4, 7), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="layernorm, scalenorm, rmsnorm, batchnorm, syncbatchnorm"):
        build_mega_norm("groupnorm", D)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            build_mega_norm("syncbatchnorm", D)


@pytest.mark.parametrize("kind", ["simple", "rotary"])
def test_relative_bias_offsets(kind):
    torch.manual_seed(0)
    bias = SimpleRelativePositionalBias(16) if kind == "simple" else RotaryRelativePositionalBias(Z, 16)
    full = bias(12)
    assert full.shape == (12, 12)
    for t in (0, 5, 11):
        torch.testing.assert_close(bias(1, t + 1, offset=t), full[t:t + 1, :t + 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(bias(4, 12, offset=8), full[8:], atol=1e-6, rtol=0)
    # Toeplitz: depends on j - i only
    torch.testing.assert_close(full[1:, 1:], full[:-1, :-1], atol=1e-6, rtol=0)
    if kind == "simple":
        with pytest.raises(ValueError, match="max_positions=16"):
            bias(17)
        with pytest.raises(ValueError, match="max_positions=16"):
            bias(1, 17, offset=16)
    else:
        far = bias(40)  # extrapolates: the tables regrow
        torch.testing.assert_close(far[:12, :12], full, atol=1e-6, rtol=0)
        torch.testing.assert_close(far[30, 28], full[5, 3], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------
def test_shapes_all_classes():
    B, L, S = 2, 7, 5
    ids = ids_(B, L)
    enc = seeded(MegaModel, make_config())
    out = enc(ids, attention_mask=torch.ones(B, L))
    assert isinstance(out, MegaModelOutput) and out.last_hidden_state.shape == (B, L, D)
    assert out.past_key_values is None  # encoders never cache
    tup = enc(ids, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1 and torch.equal(tup[0], out.last_hidden_state)

    mlm = seeded(MegaForMaskedLM, make_config())
    labels = torch.full((B, L), -100)
    labels[:, 2] = ids[:, 2]
    mo = mlm(ids, labels=labels)
    assert mo.logits.shape == (B, L, V) and mo.loss.dim() == 0
    ref = torch.nn.functional.cross_entropy(mo.logits[:, 2], ids[:, 2])
    torch.testing.assert_close(mo.loss, ref)
    assert mlm.get_output_embeddings().weight is mlm.mega.get_input_embeddings().weight  # tied

    clm = seeded(MegaForCausalLM, decoder_config())
    co = clm(ids, labels=ids)
    assert isinstance(co, MegaCausalLMOutput) and co.logits.shape == (B, L, V)
    ref = torch.nn.functional.cross_entropy(co.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(co.loss, ref)
    assert co.past_key_values is None  # no cache by default when training (labels given)
    co = clm(ids)
    assert len(co.past_key_values) == 2  # use_cache defaults to config.use_cache for decoders
    for layer in co.past_key_values:
        assert isinstance(layer, MegaCache) and len(layer) == 5 and layer.seen_tokens == L
        k, v, s, ck, cv = layer
        assert k.shape == (B, L, Z) and v.shape == (B, L, H) and s.shape == (B, D, N)
        assert ck is None and cv is None
    assert clm.get_output_embeddings().weight is clm.mega.get_input_embeddings().weight

    xdec = seeded(MegaForCausalLM, decoder_config(add_cross_attention=True))
    mem = torch.randn(B, S, D)
    xo = xdec(ids, encoder_hidden_states=mem, encoder_attention_mask=torch.ones(B, S), use_cache=True,
              output_attentions=True)
    assert xo.logits.shape == (B, L, V)
    for layer in xo.past_key_values:
        k, v, s, ck, cv = layer
        assert k.shape == (B, L, Z) and v.shape == (B, L, H) and s.shape == (B, D, N)
        assert ck.shape == (B, S, Z) and cv.shape == (B, S, D)
    assert len(xo.cross_attentions) == 2 and xo.cross_attentions[0].shape == (B, 1, L, S)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        xdec(ids)

    # chunked decoder cache: only the current chunk's keys
    cclm = seeded(MegaForCausalLM, decoder_config(use_chunking=True, chunk_size=4))
    k, v, s, _, _ = cclm(ids).past_key_values[0]
    assert k.shape == (B, L % 4, Z) and v.shape == (B, L % 4, H) and s.shape == (B, D, N)
    k, v, s, _, _ = cclm(ids[:, :4]).past_key_values[0]
    assert k is None and v is None and s.shape == (B, D, N)  # restarted at the chunk boundary


def test_model_input_errors_and_inputs_embeds():
    cfg = make_config()
    torch.manual_seed(0)
    enc = MegaModel(cfg).eval()
    ids = ids_(2, 6)
    with pytest.raises(ValueError, match="exactly one"):
        enc()
    emb = enc.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="exactly one"):
        enc(ids, inputs_embeds=emb)
    torch.testing.assert_close(enc(inputs_embeds=emb).last_hidden_state, enc(ids).last_hidden_state)
    with pytest.raises(ValueError, match="is_decoder"):
        enc(ids, use_cache=True)
    bare = MegaModel(cfg, add_embeddings=False)
    assert bare.embedding_layer is None and bare.get_input_embeddings() is None
    bare.layers.load_state_dict(enc.layers.state_dict())
    bare.eval()
    torch.testing.assert_close(bare(inputs_embeds=emb).last_hidden_state, enc(ids).last_hidden_state)
    with pytest.raises(ValueError, match="add_embeddings=False"):
        bare(ids)


def test_output_attentions_and_hidden_states():
    B, L = 2, 10
    ids = ids_(B, L)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, -3:] = 0
    enc = seeded(MegaModel, make_config())
    out = enc(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and all(h.shape == (B, L, D) for h in out.hidden_states)
    assert out.hidden_states[-1] is out.last_hidden_state
    assert len(out.attentions) == 2 and out.attentions[0].shape == (B, 1, L, L)
    assert out.cross_attentions is None
    a = out.attentions[0]
    torch.testing.assert_close(a.sum(-1), torch.ones(B, 1, L))  # softmax rows
    assert torch.all(a[1, 0, :, -3:] == 0)  # padded keys get no weight

    dec = seeded(MegaModel, decoder_config(use_chunking=True, chunk_size=4))
    out = dec(ids, output_attentions=True)
    a = out.attentions[1]
    assert a.shape == (B, 1, L, L)  # dense block-diagonal: chunks [0,4), [4,8), [8,10)
    assert torch.all(torch.triu(a[0, 0], diagonal=1) == 0)  # causal
    assert torch.all(a[:, :, 4:, :4] == 0) and torch.all(a[:, :, 8:, :8] == 0)
    torch.testing.assert_close(a.sum(-1), torch.ones(B, 1, L))
    assert a[0, 0, 9, 8] > 0


# ------------------------------------------------------------------------------------------------
# directionality, token types, long sequences
# ------------------------------------------------------------------------------------------------
def test_bidirectionality():
    L, t = 12, 5
    ids = ids_(2, L)
    ids2 = ids.clone()
    ids2[:, t + 1] = (ids2[:, t + 1] + 7) % (V - 3) + 3
    mlm = seeded(MegaForMaskedLM, make_config(bidirectional=True))
    enc = seeded(MegaModel, make_config(bidirectional=True))
    for model, get in ((mlm, lambda o: o.logits), (enc, lambda o: o.last_hidden_state)):
        a, b = get(model(ids)), get(model(ids2))
        assert (a[:, t] - b[:, t]).abs().max() > 1e-3  # the future changes the encoder at t
        assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4
    # decoders are causal regardless (the sequential EMA makes the check exact: FFT rounding leaks ~1e-7)
    clm = seeded(MegaForCausalLM, decoder_config(bidirectional=True, ema_impl="scan"))
    assert not clm.mega.layers[0].mega_layer.ema.bidirectional
    a, b = clm(ids).logits, clm(ids2).logits
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], atol=0, rtol=0)
    assert (a[:, t + 1] - b[:, t + 1]).abs().max() > 1e-3
    assert seeded(MegaModel, make_config(bidirectional=True)).layers[0].mega_layer.ema.bidirectional


def test_token_types():
    ids = ids_(2, 8)
    tt = torch.zeros_like(ids)
    tt[:, 4:] = 1
    model = seeded(MegaModel, make_config(add_token_type_embeddings=True, type_vocab_size=2))
    a = model(ids).last_hidden_state
    torch.testing.assert_close(model(ids, token_type_ids=torch.zeros_like(ids)).last_hidden_state, a)
    b = model(ids, token_type_ids=tt).last_hidden_state
    assert (a - b).abs().max() > 1e-3
    plain = seeded(MegaModel, make_config())
    assert plain.embedding_layer.token_type_embeddings is None
    with pytest.raises(ValueError, match="add_token_type_embeddings"):
        plain(ids, token_type_ids=tt)


def test_sequence_longer_than_max_positions():
    L = 40
    ids = ids_(2, L)
    rot = seeded(MegaForCausalLM, decoder_config(max_positions=16))
    logits = rot(ids).logits
    assert logits.shape == (2, L, V) and torch.isfinite(logits).all()
    assert seeded(MegaForMaskedLM, make_config(max_positions=16))(ids).logits.shape == (2, L, V)
    simple = seeded(MegaModel, make_config(max_positions=16, relative_positional_bias="simple"))
    with pytest.raises(ValueError, match="max_positions=16"):
        simple(ids)
    chunked = seeded(MegaModel, make_config(max_positions=16, relative_positional_bias="simple",
                                            use_chunking=True, chunk_size=8))
    assert torch.isfinite(chunked(ids).last_hidden_state).all()
    with pytest.raises(ValueError, match="max_positions"):
        make_config(max_positions=16, relative_positional_bias="simple", use_chunking=True, chunk_size=32)


# ------------------------------------------------------------------------------------------------
# chunking
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("is_decoder", [False, True])
def test_chunking_equals_unchunked_when_chunk_covers_sequence(is_decoder):
    L = 12
    ids = ids_(2, L)
    mask = torch.ones(2, L, dtype=torch.long)
    mask[0, -2:] = 0
    mk = decoder_config if is_decoder else make_config
    ref = seeded(MegaModel, mk())
    for C in (L, 16):
        chunked = seeded(MegaModel, mk(use_chunking=True, chunk_size=C))
        chunked.load_state_dict(ref.state_dict())
        torch.testing.assert_close(chunked(ids, attention_mask=mask).last_hidden_state,
                                   ref(ids, attention_mask=mask).last_hidden_state, atol=1e-6, rtol=0)


def test_chunking_block_diagonal():
    C, L = 8, 20  # chunks [0, 8), [8, 16), [16, 20): the last one is partial
    ids = ids_(2, L)
    for is_decoder in (False, True):
        mk = decoder_config if is_decoder else make_config
        # a one-directional EMA, so only the attention could leak across chunks (the sequential EMA
        # makes the check exact: FFT rounding leaks ~1e-7 backwards in time)
        model = seeded(MegaModel, mk(use_chunking=True, chunk_size=C, bidirectional=False, ema_impl="scan"))
        full = seeded(MegaModel, mk(bidirectional=False, ema_impl="scan"))
        base = model(ids).last_hidden_state
        assert (base - full(ids).last_hidden_state).abs().max() > 1e-3  # chunking changes the output
        for pos in (9, 17):  # change a token in a later chunk: earlier chunks are untouched
            ids2 = ids.clone()
            ids2[:, pos] = (ids2[:, pos] + 5) % (V - 3) + 3
            out = model(ids2).last_hidden_state
            start = (pos // C) * C
            torch.testing.assert_close(out[:, :start], base[:, :start], atol=0, rtol=0)
            assert (out[:, pos] - base[:, pos]).abs().max() > 1e-3
            if not is_decoder:  # non-causal within the chunk
                assert (out[:, start] - base[:, start]).abs().max() > 1e-4
            else:
                torch.testing.assert_close(out[:, :pos], base[:, :pos], atol=0, rtol=0)
        # the first 16 positions do not depend on the partial last chunk
        torch.testing.assert_close(model(ids[:, :16]).last_hidden_state, base[:, :16], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# attention kinds
# ------------------------------------------------------------------------------------------------
def test_attention_activations_differ():
    ids = ids_(2, 10)
    outs = {}
    for act in ("softmax", "laplace", "relu2"):
        ref = seeded(MegaModel, make_config())
        model = seeded(MegaModel, make_config(attention_activation=act))
        model.load_state_dict(ref.state_dict())
        outs[act] = model(ids, output_attentions=True)
        assert torch.isfinite(outs[act].last_hidden_state).all()
    for a, b in (("softmax", "laplace"), ("softmax", "relu2"), ("laplace", "relu2")):
        assert (outs[a].last_hidden_state - outs[b].last_hidden_state).abs().max() > 1e-3
    assert (outs["relu2"].attentions[0] >= 0).all()
    lap = outs["laplace"].attentions[0]
    assert ((lap >= 0) & (lap <= 1)).all()


# ------------------------------------------------------------------------------------------------
# incremental decoding
# ------------------------------------------------------------------------------------------------
DECODE_CASES = [(c, b, a) for c in (None, 8) for b in ("rotary", "simple") for a in ("softmax", "laplace", "relu2")]


def _decode_cfg(chunk, bias, act, **kw):
    extra = dict(use_chunking=True, chunk_size=chunk) if chunk else {}
    return decoder_config(relative_positional_bias=bias, attention_activation=act, **extra, **kw)


@pytest.mark.parametrize("chunk,bias,act", DECODE_CASES)
def test_incremental_decoding_causal_lm(chunk, bias, act):
    prompt, steps, B = 3, 32, 2
    model = seeded(MegaForCausalLM, _decode_cfg(chunk, bias, act))
    ids = ids_(B, prompt + steps, seed=2)
    with torch.no_grad():
        out = model(ids[:, :prompt], use_cache=True)
        torch.testing.assert_close(out.logits, model(ids[:, :prompt], use_cache=False).logits, atol=ATOL, rtol=0)
        past = out.past_key_values
        for t in range(prompt, prompt + steps):  # teacher forcing, one token per step
            out = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            ref = model(ids[:, :t + 1], use_cache=False).logits[:, -1]  # re-run the full prefix
            torch.testing.assert_close(out.logits[:, -1], ref, atol=ATOL, rtol=0)
            if chunk:
                kv = past[0][0]
                assert (0 if kv is None else kv.size(1)) == (t + 1) % chunk
        assert past[0].seen_tokens == prompt + steps
        full = model(ids, use_cache=False).logits
        # several tokens per step (crossing chunk boundaries) give the same logits
        out = model(ids[:, :5], use_cache=True)
        pieces = [out.logits]
        pos = 5
        while pos < ids.size(1):
            n = min(6, ids.size(1) - pos)
            out = model(ids[:, pos:pos + n], past_key_values=out.past_key_values, use_cache=True)
            pieces.append(out.logits)
            pos += n
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=ATOL, rtol=0)


def test_greedy_generate_cache_matches_full():
    for chunk in (None, 8):
        model = seeded(MegaForCausalLM, _decode_cfg(chunk, "rotary", "softmax"))
        prompt = ids_(2, 4, seed=3)
        a = model.generate_greedy(prompt, 32, use_cache=True)
        b = model.generate_greedy(prompt, 32, use_cache=False)
        assert a.shape == (2, 36) and torch.equal(a, b)
        with torch.no_grad():
            out = model(a[:, :4], use_cache=True)
            for t in range(4, 36):
                out = model(a[:, t:t + 1], past_key_values=out.past_key_values)
            torch.testing.assert_close(out.logits[:, -1], model(a, use_cache=False).logits[:, -1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("chunk", [None, 8])
def test_incremental_decoding_left_padded_prompt(chunk):
    model = seeded(MegaForCausalLM, _decode_cfg(chunk, "rotary", "softmax"))
    ids = ids_(2, 20, seed=4)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :3] = 0  # left padding of the second sequence
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        out = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        for t in range(5, 20):  # full-history mask, as Hugging Face's generate passes it
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=out.past_key_values)
            torch.testing.assert_close(out.logits[:, -1], full[:, t], atol=ATOL, rtol=0)


def test_truncated_ema_decoder_has_no_cache():
    model = seeded(MegaForCausalLM, decoder_config(truncation=4))
    ids = ids_(2, 10)
    out = model(ids)
    assert out.past_key_values is None and out.logits.shape == (2, 10, V)
    with pytest.raises(ValueError, match="truncation"):
        model(ids, use_cache=True)


def test_cache_is_actually_used():
    """The decoding test above would catch a broken cache: dropping the EMA state or one key matters."""
    model = seeded(MegaForCausalLM, decoder_config())
    ids = ids_(2, 20)
    with torch.no_grad():
        out = model(ids[:, :19], use_cache=True)
        ref = model(ids).logits[:, -1]
        no_ema = [(k, v, torch.zeros_like(s), ck, cv) for k, v, s, ck, cv in out.past_key_values]
        no_key = [(k[:, 1:], v[:, 1:], s, ck, cv) for k, v, s, ck, cv in out.past_key_values]
        a = model(ids[:, 19:], past_key_values=no_ema).logits[:, -1]
        b = model(ids[:, 19:], past_key_values=no_key).logits[:, -1]
    assert (a - ref).abs().max() > 100 * ATOL and (b - ref).abs().max() > 100 * ATOL


def _encdec(chunk, bias, act="softmax", seed=0):
    torch.manual_seed(seed)
    encoder = MegaModel(make_config(relative_positional_bias=bias)).eval()
    decoder = MegaForCausalLM(_decode_cfg(chunk, bias, act, add_cross_attention=True)).eval()
    return encoder, decoder


@pytest.mark.parametrize("chunk,bias,act", [(None, "rotary", "softmax"), (8, "rotary", "softmax"),
                                            (None, "simple", "laplace"), (8, "simple", "relu2"),
                                            (8, "rotary", "laplace")])
def test_incremental_decoding_encoder_decoder(chunk, bias, act):
    B, S, steps = 2, 9, 32
    encoder, decoder = _encdec(chunk, bias, act)
    src = ids_(B, S, seed=5)
    src_mask = torch.ones(B, S, dtype=torch.long)
    src_mask[1, -4:] = 0  # encoder padding
    tgt = ids_(B, steps + 1, seed=6)
    with torch.no_grad():
        memory = encoder(src, attention_mask=src_mask).last_hidden_state
        kw = dict(encoder_hidden_states=memory, encoder_attention_mask=src_mask)
        out = decoder(tgt[:, :1], use_cache=True, **kw)
        for t in range(1, steps + 1):
            # the cross-attention cache is reused: the memory is not passed again
            out = decoder(tgt[:, t:t + 1], past_key_values=out.past_key_values, encoder_attention_mask=src_mask)
            ref = decoder(tgt[:, :t + 1], use_cache=False, **kw).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], ref, atol=ATOL, rtol=0)
        # plain tuples (no seen_tokens) work with the full-history attention mask
        out = decoder(tgt[:, :20], use_cache=True, **kw)
        plain = tuple(tuple(layer) for layer in out.past_key_values)
        step = decoder(tgt[:, 20:21], attention_mask=torch.ones(B, 21), past_key_values=plain, use_cache=True,
                       encoder_attention_mask=src_mask)
        ref = decoder(tgt[:, :21], use_cache=False, **kw).logits[:, -1]
        torch.testing.assert_close(step.logits[:, -1], ref, atol=ATOL, rtol=0)
        if chunk:
            with pytest.raises(ValueError, match="cannot tell how many tokens"):
                decoder(tgt[:, 20:21], past_key_values=plain, encoder_attention_mask=src_mask)
        # padded memory positions do not matter
        memory2 = memory.clone()
        memory2[1, -4:] = 123.0
        a = decoder(tgt, use_cache=False, **kw).logits
        b = decoder(tgt, use_cache=False, encoder_hidden_states=memory2, encoder_attention_mask=src_mask).logits
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert (a[0] - decoder(tgt, use_cache=False, encoder_hidden_states=memory2).logits[0]).abs().max() < 1e-6
        assert (a[1] - decoder(tgt, use_cache=False, encoder_hidden_states=memory2).logits[1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# modules directly
# ------------------------------------------------------------------------------------------------
def test_modules_standalone():
    torch.manual_seed(0)
    x = torch.randn(2, 9, D)
    maga = MovingAverageGatedAttention(D, Z, H, N, causal=True, chunk_size=4, attention_activation="relu2").eval()
    out, attn, present = maga(x, use_cache=True, output_attentions=True)
    assert out.shape == x.shape and attn.shape == (2, 1, 9, 9)
    assert present[0].shape == (2, 1, Z) and present[2].shape == (2, D, N)
    step, attn2, _ = maga(torch.randn(2, 1, D), past_key_value=present, output_attentions=True)
    assert step.shape == (2, 1, D) and attn2.shape == (2, 1, 1, 2)  # the cached key + the new one
    enc = MovingAverageGatedAttention(D, Z, H, N, causal=False, bidirectional=True)
    with pytest.raises(ValueError, match="causal"):
        enc(x, use_cache=True)
    xa = GatedCrossAttention(D, Z).eval()
    y, w, kv = xa(x, torch.randn(2, 5, D), use_cache=True, output_attentions=True)
    assert y.shape == x.shape and w.shape == (2, 1, 9, 5) and kv[0].shape == (2, 5, Z) and kv[1].shape == (2, 5, D)
    y2, _, _ = xa(x, None, past_key_value=kv)
    torch.testing.assert_close(y2, y)
    ffn = NormalizedFeedForwardNetwork(D, 24, normalize_before=False)
    assert ffn(x).shape == x.shape
    layer = MegaLayer(decoder_config(add_cross_attention=True), causal=True).eval()
    h, present, sa, ca = layer(x, encoder_hidden_states=torch.randn(2, 5, D), use_cache=True, output_attentions=True)
    assert h.shape == x.shape and len(present) == 5 and present.seen_tokens == 9
    assert sa.shape == (2, 1, 9, 9) and ca.shape == (2, 1, 9, 5)


def test_postnorm_and_feature_dropout_train_mode():
    cfg = make_config(normalize_before_mega=False, normalize_before_ffn=False, normalization_type="layernorm",
                      use_feature_dropout=True, dropout_prob=0.2, hidden_dropout_prob=0.2,
                      attention_probs_dropout_prob=0.2)
    torch.manual_seed(0)
    model = MegaForMaskedLM(cfg).train()
    ids = ids_(2, 8)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits, atol=0, rtol=0)

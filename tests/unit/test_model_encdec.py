"""EncoderDecoderModel + PerceiverEncoder (TP=1 in-process, TP=2 via torchrun): shapes, masks, causality,
variants, encode/decode API, config errors, FLOPs, and TP2 == TP1."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.config.schema import EncoderDecoderModelConfig, TransformerStackConfig
from megatron_ext.errors import ConfigError, DataError
from megatron_ext.models.encoder_decoder import EncoderDecoderModel
from megatron_ext.models.flops import encdec_flops_per_iteration
from megatron_ext.models.perceiver import PerceiverEncoder
from megatron_ext.modules import init_method_normal, make_parallel_config
from megatron_ext.parallel.random import model_parallel_manual_seed
from megatron_ext.parallel.state import initialize_parallel

VOCAB = 61
S_ENC, S_DEC = 12, 10
PERCEIVER_KEYS = ("arch", "hidden_steps", "num_self_attention_per_cross_attention")


@pytest.fixture(autouse=True, scope="module")
def _tp1():
    initialize_parallel(1, 1, accelerator="cpu")
    yield


def make_cfg(enc=None, dec=None, stack=None, **top):
    """Small config; ``stack`` applies to both sides (perceiver keys only to the encoder)."""
    common = dict(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0,
                  hidden_steps=5)
    stack = dict(stack or {})
    e = dict(common, **stack, **(enc or {}))
    d = dict(common, **{k: v for k, v in stack.items() if k not in PERCEIVER_KEYS}, **(dec or {}))
    base = dict(seq_length=S_ENC, seq_length_dec=S_DEC, make_vocab_size_divisible_by=8)
    base.update(top)
    return EncoderDecoderModelConfig(encoder=TransformerStackConfig(**e), decoder=TransformerStackConfig(**d), **base)


def build(seed=0, arch="transformer", **kw):
    torch.manual_seed(seed)
    model_parallel_manual_seed(seed, tp_rank=0, pp_rank=0)
    kw.setdefault("enc", {})
    kw["enc"] = dict(kw["enc"], arch=arch)
    return EncoderDecoderModel(make_cfg(**kw), VOCAB, init_seed=seed)


def batch(b=2, seed=1, s_enc=S_ENC, s_dec=S_DEC):
    g = torch.Generator().manual_seed(seed)
    enc = torch.randint(0, VOCAB, (b, s_enc), generator=g)
    mask = torch.ones(b, s_enc, dtype=torch.bool)
    mask[-1, s_enc // 2:] = False  # last sample: second half is padding
    dec = torch.randint(0, VOCAB, (b, s_dec + 1), generator=g)
    return enc, mask, dec[:, :-1], dec[:, 1:]


ARCHS = ("transformer", "perceiver")


# ----------------------------------------------------------------------------------------------- shapes / masks

def test_perceiver_output_shape_for_several_lengths():
    torch.manual_seed(0)
    pc = make_parallel_config(1)
    enc = PerceiverEncoder(2, 7, 2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, parallel_config=pc,
                           init_method=init_method_normal(0.02), output_init_method=init_method_normal(0.01))
    assert enc.latents.shape == (7, 32) and len(enc.cross_layers) == 2 and len(enc.self_layers) == 4
    for s in (1, 5, 33):
        out = enc(torch.randn(3, s, 32), torch.ones(3, s, dtype=torch.bool))
        assert out.shape == (7, 3, 32)
    m = build(arch="perceiver").eval()
    for s in (1, 4, S_ENC):
        enc_tokens, mask, _, _ = batch(b=3, s_enc=s)
        out = m.encode(enc_tokens, mask)
        assert out["hiddens"].shape == (5, 3, 32)
        assert out["hiddens_mask"].shape == (3, 5) and out["hiddens_mask"].dtype == torch.bool
        assert out["hiddens_mask"].all()


def test_transformer_encoder_hiddens_layout():
    m = build().eval()
    enc, mask, _, _ = batch(b=3)
    out = m.encode(enc, mask)
    assert out["hiddens"].shape == (S_ENC, 3, 32)
    assert torch.equal(out["hiddens_mask"], mask)
    assert m.encode(enc)["hiddens_mask"].all()  # no mask = all real


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pos", ["learned_absolute", "rope"])
def test_padding_tokens_do_not_matter(arch, pos):
    m = build(arch=arch, position_embedding_type=pos).eval()
    enc, mask, x, _ = batch()
    enc2 = enc.clone()
    enc2[~mask] = (enc2[~mask] + 7) % VOCAB  # change only the padding positions
    assert not torch.equal(enc, enc2)
    with torch.no_grad():
        a, b = m.encode(enc, mask), m.encode(enc2, mask)
        if arch == "perceiver":
            torch.testing.assert_close(a["hiddens"], b["hiddens"], rtol=0, atol=0)
        else:  # outputs at real positions are unchanged
            real = mask.t()  # [s, b]
            torch.testing.assert_close(a["hiddens"][real], b["hiddens"][real], rtol=0, atol=0)
        torch.testing.assert_close(m(enc, x, mask), m(enc2, x, mask), rtol=0, atol=0)
        # ... while the same change without the mask does change the output
        assert not torch.allclose(m(enc, x), m(enc2, x))


@pytest.mark.parametrize("arch", ARCHS)
def test_encoder_sees_every_real_token(arch):
    """The encoder is bidirectional: changing the first real token changes the output at every decoder step."""
    m = build(arch=arch).eval()
    enc, mask, x, _ = batch()
    enc2 = enc.clone()
    enc2[:, -1 if arch == "transformer" else 0] += 1
    mask = torch.ones_like(mask)
    with torch.no_grad():
        diff = (m(enc, x, mask) - m(enc2, x, mask))[..., :VOCAB].abs().amax(dim=-1)  # [b, s_dec]
    assert (diff > 0).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_is_causal(arch):
    m = build(arch=arch).eval()
    enc, mask, x, _ = batch()
    for t in (0, 4, S_DEC - 2):
        x2 = x.clone()
        x2[:, t + 1] = (x2[:, t + 1] + 1) % VOCAB
        with torch.no_grad():
            a, b = m(enc, x, mask), m(enc, x2, mask)
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=0)
        assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_forward_backward(arch):
    m = build(arch=arch, position_embedding_type="rope").to(torch.bfloat16)
    enc, mask, x, y = batch()
    loss = m(enc, x, mask, labels=y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.mean().backward()
    assert m.embedding.word_embeddings.weight.grad.dtype == torch.bfloat16


def test_fully_padded_sample_gives_finite_loss():
    for arch in ARCHS:
        m = build(arch=arch)
        enc, mask, x, y = batch()
        mask[0] = False
        if arch == "transformer":
            assert m.encode(enc, mask)["hiddens_mask"][0].all()  # treated as all-real: no fully masked rows
        loss = m(enc, x, mask, labels=y)
        assert torch.isfinite(loss).all(), arch
        loss.mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters())


# ----------------------------------------------------------------------------------------------- API

@pytest.mark.parametrize("arch", ARCHS)
def test_encode_decode_equals_forward_and_loss_matches_reference(arch):
    m = build(arch=arch).eval()
    enc, mask, x, y = batch()
    with torch.no_grad():
        logits = m(enc, x, mask)
        assert logits.shape == (2, S_DEC, m.padded_vocab_size) and m.padded_vocab_size == 64
        assert torch.isneginf(logits[..., VOCAB:]).all()  # padded vocabulary never enters the softmax
        h = m.encode(enc, mask)
        torch.testing.assert_close(m.decode(x, h["hiddens"], h["hiddens_mask"]), logits, rtol=0, atol=0)
        torch.testing.assert_close(m.decode(x, **h), logits, rtol=0, atol=0)
        loss = m(enc, x, mask, labels=y)
        assert loss.shape == (2, S_DEC) and loss.dtype == torch.float32
        torch.testing.assert_close(m.decode(x, **h, labels=y), loss, rtol=0, atol=0)
        ref = F.cross_entropy(logits.reshape(-1, 64), y.reshape(-1), reduction="none").view(2, S_DEC)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        assert m.gather_logits(logits).shape == (2, S_DEC, VOCAB)
        assert m.gather_logits(logits, trim=False).shape == (2, S_DEC, 64)


def test_decode_accepts_transformed_hiddens():
    """A hiddens module may replace the hiddens (same [S, B, H] layout, any S) -- e.g. a z of another length."""
    m = build().eval()
    enc, mask, x, _ = batch()
    z = torch.randn(3, 2, 32)
    with torch.no_grad():
        out = m.decode(x, z, torch.ones(2, 3, dtype=torch.bool))
        torch.testing.assert_close(out, m.decode(x, z, None))
    assert out.shape == (2, S_DEC, 64)
    with pytest.raises(DataError, match="hiddens"):
        m.decode(x, torch.randn(2, 3, 32))  # [b, S, h] instead of [S, b, h]
    with pytest.raises(DataError, match="hiddens_mask"):
        m.decode(x, z, torch.ones(2, 4, dtype=torch.bool))


VARIANTS = {
    "gelu_layernorm_learned_tied": dict(),
    "swiglu_rmsnorm_rope_untied": dict(position_embedding_type="rope", share_embeddings_and_output_weights=False,
                                       stack=dict(activation="swiglu", normalization="rmsnorm", bias=False)),
    "swiglu_layernorm_learned_untied_dropout": dict(share_embeddings_and_output_weights=False,
                                                    stack=dict(activation="swiglu", hidden_dropout=0.1,
                                                               attention_dropout=0.1)),
    "gelu_rmsnorm_rope_tied": dict(position_embedding_type="rope", stack=dict(normalization="rmsnorm")),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_backward_finite(arch, variant):
    m = build(arch=arch, **VARIANTS[variant])
    enc, mask, x, y = batch()
    loss = m(enc, x, mask, labels=y).mean()
    assert torch.isfinite(loss) and abs(loss.item() - math.log(VOCAB)) < 1.0
    loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        if not n.endswith("bias"):  # biases of the last residual writers etc. may start with zero grads
            assert p.grad.abs().sum() > 0, n


def test_variant_structure():
    m = build(arch="perceiver", **VARIANTS["swiglu_rmsnorm_rope_untied"])
    assert m.embedding.encoder_position_embeddings is None and m.embedding.decoder_position_embeddings is None
    assert isinstance(m.decoder.layers[0].pre_cross_attn_layernorm, torch.nn.RMSNorm)
    assert m.decoder.layers[0].mlp.linear_fc1.weight.shape == (2 * 128, 32)  # 8/3*32 -> 128 (multiple of 64), gated
    assert all(not n.endswith("bias") for n, _ in m.named_parameters())
    assert m.output_weight() is m.output_layer.weight
    t = build()
    assert t.embedding.encoder_position_embeddings.weight.shape == (S_ENC, 32)  # max(seq_length, seq_length_dec)
    assert t.output_weight() is t.embedding.word_embeddings.weight
    assert t.num_parameters() == sum(p.numel() for p in t.parameters())
    untied = build(share_embeddings_and_output_weights=False)
    assert untied.num_parameters() - t.num_parameters() == 64 * 32


def test_init_is_per_component_and_seeded():
    a, b = build(seed=3, arch="perceiver"), build(seed=3, arch="perceiver")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    c = build(seed=4, arch="perceiver")
    assert not torch.equal(a.encoder.latents, c.encoder.latents)
    # distinct components: no two layers (or the two position tables) share a draw
    t = build(seed=3)
    qkv = [l.self_attention.linear_qkv.weight for l in list(t.encoder.layers) + list(t.decoder.layers)]
    assert all(not torch.equal(qkv[i], qkv[j]) for i in range(len(qkv)) for j in range(i))
    assert not torch.equal(t.embedding.encoder_position_embeddings.weight, t.embedding.decoder_position_embeddings.weight)
    # the decoder's weights do not depend on the encoder's depth (interleaved component numbers)
    deep = build(seed=3, enc=dict(num_layers=3))
    for (n, p), (_, q) in zip(t.decoder.named_parameters(), deep.decoder.named_parameters()):
        assert torch.equal(p, q), n
    # Xavier-normal latents: std = sqrt(2 / (K + h))
    big = build(seed=0, arch="perceiver", enc=dict(hidden_steps=64), stack=dict(hidden_size=64))
    assert abs(big.encoder.latents.std().item() - math.sqrt(2 / (64 + 64))) < 0.02


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_checkpointing_same_loss_and_grads(arch):
    kw = dict(stack=dict(hidden_dropout=0.1, attention_dropout=0.1))
    a = build(seed=3, arch=arch, **kw)
    b = build(seed=3, arch=arch, stack=dict(kw["stack"], activations_checkpoint_granularity="full"))
    b.load_state_dict(a.state_dict())
    enc, mask, x, y = batch()
    out = []
    for m in (a, b):
        model_parallel_manual_seed(5, tp_rank=0, pp_rank=0)
        torch.manual_seed(5)
        loss = m(enc, x, mask, labels=y).mean()
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=0)
    for n in out[0][1]:
        torch.testing.assert_close(out[0][1][n], out[1][1][n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("arch", ARCHS)
def test_learns_through_the_encoder(arch):
    """Every decoder input is the same (all bos), so the targets (= the encoder inputs) can only be predicted by
    reading the encoder: the loss must go well below the best a decoder alone can do (the per-position entropy)."""
    torch.manual_seed(0)
    model_parallel_manual_seed(0, tp_rank=0, pp_rank=0)
    V, s, b = 16, 6, 8
    m = EncoderDecoderModel(make_cfg(enc=dict(arch=arch, hidden_steps=4), seq_length=s, seq_length_dec=s), V,
                            init_seed=0)
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3)
    src = torch.randint(0, V, (b, s), generator=torch.Generator().manual_seed(0))
    dec_in = torch.zeros(b, s, dtype=torch.long)
    for _ in range(60):
        loss = m(src, dec_in, torch.ones_like(src, dtype=torch.bool), labels=src).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    decoder_only_floor = 0.0
    for j in range(s):
        p = torch.bincount(src[:, j], minlength=V).float() / b
        decoder_only_floor -= (p[p > 0] * p[p > 0].log()).sum().item() / s
    assert loss.item() < decoder_only_floor - 0.5, (loss.item(), decoder_only_floor)


def test_accepts_omegaconf_config():
    OmegaConf = pytest.importorskip("omegaconf").OmegaConf
    cfg = OmegaConf.structured(make_cfg(enc=dict(arch="perceiver")))
    m = EncoderDecoderModel(cfg, VOCAB, init_seed=0)
    enc, mask, x, y = batch()
    assert m(enc, x, mask, labels=y).shape == (2, S_DEC)


def test_sequence_too_long_for_learned_positions():
    m = build()
    enc, mask, x, _ = batch(s_enc=S_ENC + 1)
    with pytest.raises(DataError, match="max_position_embeddings"):
        m(enc, x, mask)


# ----------------------------------------------------------------------------------------------- config errors

@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(enc=dict(hidden_size=64), dec=dict(hidden_size=32)), "model.encoder.hidden_size"),
        (dict(enc=dict(hidden_size=64), dec=dict(hidden_size=32)), "model.decoder.hidden_size"),
        (dict(enc=dict(arch="lstm")), "model.encoder.arch"),
        (dict(dec=dict(arch="perceiver")), "model.decoder.arch"),
        (dict(enc=dict(arch="perceiver", hidden_steps=0)), "model.encoder.hidden_steps"),
        (dict(enc=dict(arch="perceiver", num_self_attention_per_cross_attention=0)),
         "model.encoder.num_self_attention_per_cross_attention"),
        (dict(enc=dict(num_attention_heads=5)), "model.encoder.hidden_size"),
        (dict(dec=dict(num_layers=0)), "model.decoder.num_layers"),
        (dict(dec=dict(activation="relu")), "model.decoder.activation"),
        (dict(enc=dict(normalization="batchnorm")), "model.encoder.normalization"),
        (dict(dec=dict(ffn_hidden_size=0)), "model.decoder.ffn_hidden_size"),
        (dict(enc=dict(hidden_dropout=1.0)), "model.encoder.hidden_dropout"),
        (dict(dec=dict(attention_dropout=-0.1)), "model.decoder.attention_dropout"),
        (dict(enc=dict(init_method_std=0.0)), "model.encoder.init_method_std"),
        (dict(dec=dict(activations_checkpoint_granularity="selective")),
         "model.decoder.activations_checkpoint_granularity"),
        (dict(position_embedding_type="rope", stack=dict(hidden_size=36, num_attention_heads=4)),
         "model.encoder.hidden_size"),
        (dict(position_embedding_type="alibi"), "model.position_embedding_type"),
        (dict(seq_length_dec=32, max_position_embeddings=16), "model.seq_length_dec"),
        (dict(max_position_embeddings=0), "model.max_position_embeddings"),
        (dict(pipeline_model_parallel_size=2), "model.pipeline_model_parallel_size"),
        (dict(sequence_parallel=True), "model.sequence_parallel"),
        (dict(tensor_model_parallel_size=2), "model.tensor_model_parallel_size"),  # the groups are TP=1
    ],
)
def test_config_errors_name_the_key(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        EncoderDecoderModel(make_cfg(**kw), VOCAB)


def test_bad_vocab_size():
    with pytest.raises(ConfigError, match="vocab_size"):
        EncoderDecoderModel(make_cfg(), 0)


# ----------------------------------------------------------------------------------------------- FLOPs

def test_encdec_flops_formula():
    h, V, s, sd = 32, 64, S_ENC, S_DEC
    mlp = 2 * 2 * h * 4 * h
    cfg = make_cfg()
    enc = 2 * (s * (8 * h * h + mlp) + 4 * s * s * h)
    dec = 2 * (sd * (8 * h * h + mlp) + 4 * sd * sd * h + sd * 4 * h * h + s * 4 * h * h + 4 * sd * s * h)
    assert encdec_flops_per_iteration(cfg, V, 8) == 3 * (enc + dec + sd * 2 * h * V) * 8
    K, k = 5, 2
    pc = make_cfg(enc=dict(arch="perceiver", num_self_attention_per_cross_attention=k))
    penc = 2 * ((1 + k) * (K * (8 * h * h + mlp) + 4 * K * K * h) + K * 4 * h * h + s * 4 * h * h + 4 * K * s * h)
    pdec = 2 * (sd * (8 * h * h + mlp) + 4 * sd * sd * h + sd * 4 * h * h + K * 4 * h * h + 4 * sd * K * h)
    assert encdec_flops_per_iteration(pc, V, 4) == 3 * (penc + pdec + sd * 2 * h * V) * 4
    sw = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, activation="swiglu"))  # ffn 8/3*32 -> 128
    dsw = dec + 2 * sd * (2 * 3 * h * 128 - mlp)
    assert encdec_flops_per_iteration(sw, V, 1) == 3 * (enc + dsw + sd * 2 * h * V)


# ----------------------------------------------------------------------------------------------- TP2 == TP1


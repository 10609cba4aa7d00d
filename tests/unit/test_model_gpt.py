"""GPTModel (TP=1 in-process): shapes, training signal, variants, checkpointing, dropout, config errors, FLOPs."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.config.schema import ModelConfig
from megatron_ext.errors import ConfigError, DataError
from megatron_ext.models.flops import gpt_flops_per_iteration, gpt_flops_per_token
from megatron_ext.models.gpt import GPTModel, padded_vocab_size, resolve_ffn_hidden_size
from megatron_ext.parallel.random import get_all_rng_states, model_parallel_manual_seed, set_all_rng_states
from megatron_ext.parallel.state import initialize_parallel

VOCAB = 61


@pytest.fixture(autouse=True, scope="module")
def _tp1():
    initialize_parallel(1, 1, accelerator="cpu")
    yield


def small_cfg(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                hidden_dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=8)
    base.update(kw)
    return ModelConfig(**base)


def build(seed=0, **kw):
    torch.manual_seed(seed)
    model_parallel_manual_seed(seed, tp_rank=0, pp_rank=0)
    return GPTModel(small_cfg(**kw), VOCAB)


def batch(b=2, s=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, s + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def test_shapes_padding_and_loss_matches_reference_ce():
    m = build()
    assert m.padded_vocab_size == padded_vocab_size(VOCAB, 8, 1) == 64
    x, y = batch()
    logits = m(x)
    assert logits.shape == (2, 16, 64)
    loss = m(x, labels=y)
    assert loss.shape == (2, 16) and loss.dtype == torch.float32
    ref = F.cross_entropy(logits.reshape(-1, 64), y.reshape(-1), reduction="none").view(2, 16)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    full = m.gather_logits(logits)
    assert full.shape == (2, 16, VOCAB)
    assert m.gather_logits(logits, trim=False).shape == (2, 16, 64)


def test_causal():
    m = build().eval()
    x, _ = batch()
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % VOCAB
    a, b = m(x), m(x2)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_explicit_positions_and_mask_match_defaults():
    for pos in ("learned_absolute", "rope"):
        m = build(position_embedding_type=pos).eval()
        x, _ = batch()
        pid = torch.arange(16).unsqueeze(0).expand(2, 16)
        mask = ~torch.tril(torch.ones(16, 16, dtype=torch.bool)).view(1, 1, 16, 16)  # True = masked
        ref = m(x)
        torch.testing.assert_close(m(x, position_ids=pid), ref)
        torch.testing.assert_close(m(x, attention_mask=mask), ref, rtol=1e-5, atol=1e-5)


def test_overfits_one_batch():
    m = build(hidden_size=64, num_attention_heads=4)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x, y = batch(b=4)
    losses = []
    for _ in range(30):
        loss = m(x, labels=y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(VOCAB) - 0.5
    assert losses[-1] < 0.5 * losses[0]


def test_tied_vs_untied_parameter_count():
    tied = build(share_embeddings_and_output_weights=True)
    untied = build(share_embeddings_and_output_weights=False)
    assert untied.num_parameters() - tied.num_parameters() == 64 * 32
    assert sum(p.numel() for p in tied.parameters()) == tied.num_parameters()
    assert tied.output_weight() is tied.embedding.word_embeddings.weight
    assert untied.output_weight() is untied.output_layer.weight
    # tied: the output-layer gradient flows into the embedding
    x, y = batch()
    tied(x, labels=y).mean().backward()
    g = tied.embedding.word_embeddings.weight.grad
    unused = sorted(set(range(VOCAB)) - set(x.flatten().tolist()))
    assert g[unused].abs().sum() > 0  # only reachable through the output projection


def test_rope_rmsnorm_swiglu_variant():
    m = build(position_embedding_type="rope", normalization="rmsnorm", activation="swiglu", bias=False,
              hidden_size=48, num_attention_heads=4)
    assert m.ffn_hidden_size == resolve_ffn_hidden_size(m.config) == 128  # 8/3*48 = 128 -> multiple of 64
    assert m.embedding.position_embeddings is None
    assert isinstance(m.decoder.layers[0].input_layernorm, torch.nn.RMSNorm)
    assert m.decoder.layers[0].mlp.linear_fc1.weight.shape == (256, 48)
    assert all(n.endswith("weight") for n, _ in m.named_parameters())  # bias=False everywhere
    x, y = batch()
    loss = m(x, labels=y).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in m.parameters())
    # rope is relative: shifting all positions by a constant leaves the logits unchanged
    m.eval()
    pid = torch.arange(16).unsqueeze(0).expand(2, 16)
    torch.testing.assert_close(m(x, position_ids=pid + 7), m(x, position_ids=pid), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_same_loss_and_grads(dropout):
    kw = dict(hidden_dropout=dropout, attention_dropout=dropout)
    a = build(seed=3, **kw)
    b = build(seed=3, activations_checkpoint_granularity="full", **kw)
    b.load_state_dict(a.state_dict())
    x, y = batch()
    out = []
    for m in (a, b):
        model_parallel_manual_seed(5, tp_rank=0, pp_rank=0)  # same dropout masks for both runs
        loss = m(x, labels=y).mean()
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=0)
    for n in out[0][1]:
        torch.testing.assert_close(out[0][1][n], out[1][1][n], rtol=1e-6, atol=1e-7, msg=n)


def test_dropout_determinism_through_tracker():
    m = build(hidden_dropout=0.2, attention_dropout=0.2)
    x, y = batch()
    model_parallel_manual_seed(11, tp_rank=0, pp_rank=0)
    first = m(x, labels=y)
    model_parallel_manual_seed(11, tp_rank=0, pp_rank=0)
    again = m(x, labels=y)
    assert torch.equal(first, again)
    states = get_all_rng_states()
    third = m(x, labels=y)
    assert not torch.equal(third, first)  # streams advanced -> new masks
    set_all_rng_states(states)
    assert torch.equal(m(x, labels=y), third)
    # the attention dropout really draws from the tracker's model-parallel stream
    model_parallel_manual_seed(11, tp_rank=0, pp_rank=0)
    set_states = get_all_rng_states()
    set_states["tracker"]["states"]["model-parallel-rng"]["cpu"] = torch.Generator().manual_seed(1).get_state()
    set_all_rng_states(set_states)
    assert not torch.equal(m(x, labels=y), first)
    m.eval()
    torch.testing.assert_close(m(x, labels=y), m(x, labels=y))


def test_scaled_init():
    m = build(num_layers=8, hidden_size=128, num_attention_heads=4, init_method_std=0.05)
    layer = m.decoder.layers[0]
    assert abs(layer.self_attention.linear_qkv.weight.std().item() - 0.05) < 0.003
    scaled = 0.05 / math.sqrt(16)
    assert abs(layer.self_attention.linear_proj.weight.std().item() - scaled) < 0.001
    assert abs(layer.mlp.linear_fc2.weight.std().item() - scaled) < 0.001
    assert abs(m.embedding.word_embeddings.weight.std().item() - 0.05) < 0.005
    assert torch.count_nonzero(layer.self_attention.linear_qkv.bias) == 0


def test_bf16_params_forward_backward():
    m = build().to(torch.bfloat16)
    x, y = batch()
    loss = m(x, labels=y)
    assert loss.dtype == torch.float32
    loss.mean().backward()
    assert m.embedding.word_embeddings.weight.grad.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dropout_recompute_and_rng_resume(dtype):
    kw = dict(hidden_dropout=0.1, attention_dropout=0.1)
    a = build(seed=3, **kw).cuda().to(dtype)
    b = build(seed=3, activations_checkpoint_granularity="full", **kw).cuda().to(dtype)
    b.load_state_dict(a.state_dict())
    x, y = (t.cuda() for t in batch())
    out = []
    for m in (a, b):
        model_parallel_manual_seed(5, tp_rank=0, pp_rank=0)
        loss = m(x, labels=y)
        loss.mean().backward()
        out.append((loss.detach(), {n: p.grad.float() for n, p in m.named_parameters()}))
    assert loss.dtype == torch.float32 and loss.is_cuda
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=0)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for n in out[0][1]:
        torch.testing.assert_close(out[0][1][n], out[1][1][n], msg=n, **tol)
    states = get_all_rng_states()
    assert states["torch_cuda"] is not None
    first = a(x, labels=y)
    assert not torch.equal(first, a(x, labels=y))
    set_all_rng_states(states)
    assert torch.equal(a(x, labels=y), first)


def test_sequence_too_long_for_learned_positions():
    m = build()
    with pytest.raises(DataError, match="max_position_embeddings"):
        m(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(hidden_size=30, num_attention_heads=4), "model.hidden_size"),
        (dict(hidden_size=96, num_attention_heads=6, tensor_model_parallel_size=4), "model.num_attention_heads"),
        (dict(ffn_hidden_size=130, tensor_model_parallel_size=4), "model.ffn_hidden_size"),
        (dict(activation="relu"), "model.activation"),
        (dict(normalization="batchnorm"), "model.normalization"),
        (dict(position_embedding_type="alibi"), "model.position_embedding_type"),
        (dict(seq_length=32, max_position_embeddings=16), "model.seq_length"),
        (dict(max_position_embeddings=0), "model.max_position_embeddings"),
        (dict(ffn_hidden_size=0), "model.ffn_hidden_size"),
        (dict(init_method_std=0.0), "model.init_method_std"),
        (dict(sequence_parallel=True), "model.sequence_parallel"),
        (dict(activations_checkpoint_granularity="selective"), "model.activations_checkpoint_granularity"),
        (dict(hidden_dropout=1.5), "model.hidden_dropout"),
        (dict(num_layers=0), "model.num_layers"),
        (dict(position_embedding_type="rope", hidden_size=36, num_attention_heads=4), "model.hidden_size"),
        (dict(tensor_model_parallel_size=2), "model.tensor_model_parallel_size"),  # groups are TP=1
        (dict(num_query_groups=3), "model.num_query_groups"),  # must divide the 4 heads
        (dict(num_query_groups=0), "model.num_query_groups"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        GPTModel(small_cfg(**overrides), VOCAB)


def test_query_group_errors_name_both_keys_and_mega_refuses_them():
    with pytest.raises(ConfigError, match=r"model\.num_query_groups=1: .*model\.tensor_model_parallel_size=2"):
        small_cfg(num_query_groups=1, tensor_model_parallel_size=2)
    with pytest.raises(ConfigError, match=r"model\.num_query_groups=2: .*model\.arch=transformer"):
        ModelConfig(arch="mega", num_query_groups=2)
    assert small_cfg(num_query_groups=4).num_query_groups == 4  # = heads: plain multi-head attention


def _mha_twin(gqa: GPTModel, **kw) -> GPTModel:
    """The multi-head model computing what ``gqa`` does: every query head gets its own copy of its group's key and
    value head (fused rows regrouped from [group, (q_0..q_per-1, k, v), hd] to [head, (q, k, v), hd])."""
    cfg = dataclasses.replace(gqa.config, num_query_groups=None, **kw)
    mha = GPTModel(cfg, gqa.vocab_size, init_seed=0)
    nh, ng = cfg.num_attention_heads, gqa.config.num_query_groups
    per, hd = nh // ng, cfg.hidden_size // nh
    sd = {}
    for k, v in gqa.state_dict().items():
        if "linear_qkv" in k and isinstance(v, torch.Tensor):
            rest = v.shape[1:]
            g = v.view(ng, per + 2, hd, *rest)
            kv = [g[:, i:i + 1].expand(ng, per, hd, *rest) for i in (per, per + 1)]
            v = torch.stack([g[:, :per], *kv], dim=2).reshape(nh * 3 * hd, *rest)
        sd[k] = v
    mha.load_state_dict(sd)
    return mha.eval()


@pytest.mark.parametrize("s,impl", [(12, None), (300, None), (40, "packed"), (40, "mask")],
                         ids=["causal", "split-causal-cpu", "docs-packed", "docs-mask"])
def test_grouped_query_attention_equals_multi_head_with_shared_kv(s, impl, monkeypatch):
    """8 heads in 2 groups == the multi-head model whose 4 query heads of a group share one key/value head: logits
    and gradients (a group's key/value gradient is the sum over its heads' copies), on every attention path."""
    from megatron_ext.modules import attention
    from megatron_ext.modules.doc_attention import segment_ids_from_tokens

    split_kv_heads = []
    split = attention._SplitCausalAttention.apply
    monkeypatch.setattr(attention._SplitCausalAttention, "apply",
                        lambda q, k, v: (split_kv_heads.append(k.shape[1]), split(q, k, v))[1])

    kw = dict(num_attention_heads=8, seq_length=s, position_embedding_type="rope", bias=True)
    gqa = GPTModel(small_cfg(num_query_groups=2, **kw), VOCAB, init_seed=3).eval()
    assert gqa.decoder.layers[0].self_attention.linear_qkv.weight.shape == ((8 + 2 * 2) * 4, 32)
    mha = _mha_twin(gqa)
    x, y = batch(s=s, seed=2)
    extra = {}
    if impl is not None:
        gqa.document_attention = mha.document_attention = impl
        extra["segment_ids"] = segment_ids_from_tokens(x, int(x[0, 9]))  # documents end at that token
        assert extra["segment_ids"].max() > 0
    a, b = gqa(x, labels=y, **extra), mha(x, labels=y, **extra)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    a.mean().backward()
    b.mean().backward()
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    ga = dict(gqa.named_parameters())[name].grad.view(2, 6, 4, 32)
    gb = dict(mha.named_parameters())[name].grad.view(2, 4, 3, 4, 32)  # [group, head in group, (q,k,v), hd, h]
    torch.testing.assert_close(ga[:, :4], gb[:, :, 0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ga[:, 4], gb[:, :, 1].sum(1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ga[:, 5], gb[:, :, 2].sum(1), rtol=1e-4, atol=1e-6)
    assert ga.abs().max() > 1e-4
    assert split_kv_heads == ([2, 2, 8, 8] if s == 300 else [])  # 2 layers each: the CPU split kernel took 2 kv heads


def test_files_saved_before_num_query_groups_load_unchanged(tmp_path):
    """A consolidated file whose model config has no num_query_groups (written before the key existed) loads into
    a multi-head model configured either way (null or = heads), giving the same logits; a grouped model is refused
    naming the key."""
    from megatron_ext.checkpoint.consolidated import FORMAT, load_consolidated, save_consolidated
    from megatron_ext.errors import CheckpointError
    from megatron_ext.inference.hf_export import consolidated_from_model

    old = build(seed=4).eval()
    obj = consolidated_from_model(old)
    del obj["model_config"]["num_query_groups"]
    obj["format"] = FORMAT
    save_consolidated(obj, str(tmp_path / "old.pt"))
    x, _ = batch()
    for groups in (None, 4):
        m = GPTModel(small_cfg(num_query_groups=groups), VOCAB, init_seed=9).eval()
        load_consolidated(m, str(tmp_path / "old.pt"), m.config)
        with torch.no_grad():
            assert torch.equal(m(x), old(x))
    gqa = GPTModel(small_cfg(num_query_groups=2), VOCAB, init_seed=9)
    with pytest.raises(CheckpointError, match=r"model\.num_query_groups=4 but this model has model\.num_query_groups=2"):
        load_consolidated(gqa, str(tmp_path / "old.pt"), gqa.config)


def test_bad_vocab_size():
    with pytest.raises(ConfigError, match="vocab_size"):
        GPTModel(small_cfg(), 0)


def test_accepts_omegaconf_config():
    OmegaConf = pytest.importorskip("omegaconf").OmegaConf

    cfg = OmegaConf.structured(small_cfg())
    m = GPTModel(cfg, VOCAB)
    x, y = batch()
    assert m(x, labels=y).shape == (2, 16)


def test_cross_attention_matches_manual():
    from megatron_ext.modules import ParallelCrossAttention, init_method_normal, make_parallel_config

    torch.manual_seed(0)
    att = ParallelCrossAttention(32, 4, kv_hidden_size=24, parallel_config=make_parallel_config(1),
                                 init_method=init_method_normal(0.1), output_init_method=init_method_normal(0.1))
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 7, 24)
    pad = torch.zeros(2, 1, 1, 7, dtype=torch.bool)
    pad[1, ..., 5:] = True  # second sample: last two context positions are padding
    out = att(x, ctx, pad)
    q = F.linear(x, att.linear_q.weight, att.linear_q.bias).view(2, 5, 4, 8).transpose(1, 2)
    kv = F.linear(ctx, att.linear_kv.weight, att.linear_kv.bias).view(2, 7, 4, 2, 8)
    k, v = kv[..., 0, :].transpose(1, 2), kv[..., 1, :].transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(pad, float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 32)
    ref = F.linear(ref, att.linear_proj.weight, att.linear_proj.bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_flops_formula():
    cfg = small_cfg(num_layers=2, hidden_size=32, seq_length=16)
    h, s, L, V = 32, 16, 2, 64
    fwd = L * (2 * (3 * h * h + h * h + 2 * h * 4 * h) + 4 * s * h) + 2 * h * V
    assert gpt_flops_per_token(cfg, V) == 3 * fwd
    assert gpt_flops_per_iteration(cfg, V, 8) == 3 * fwd * s * 8
    assert gpt_flops_per_iteration(cfg, V, 8, seq_length=32) == gpt_flops_per_token(cfg, V, 32) * 32 * 8
    sw = dataclasses.replace(cfg, activation="swiglu")  # ffn = 8/3*32 -> 128
    fwd_sw = L * (2 * (3 * h * h + h * h + 3 * h * 128) + 4 * s * h) + 2 * h * V
    assert gpt_flops_per_token(sw, V) == 3 * fwd_sw
    # grouped-query attention: the QKV projection is h * (nh + 2 * ng) * hd (8 heads of 4 in 2 groups: 32 * 48)
    gqa = dataclasses.replace(cfg, num_attention_heads=8, num_query_groups=2)
    fwd_gqa = L * (2 * (32 * 48 + h * h + 2 * h * 4 * h) + 4 * s * h) + 2 * h * V
    assert gpt_flops_per_token(gqa, V) == 3 * fwd_gqa
    assert gpt_flops_per_token(dataclasses.replace(gqa, num_query_groups=8), V) == 3 * fwd
    # ~6N per token (+ attention) for a real-sized model
    big = ModelConfig(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=1024)
    n_matmul = 12 * 12 * 768 * 768 + 768 * 50304
    assert gpt_flops_per_token(big, 50304) == 6 * n_matmul + 12 * 12 * 768 * 1024


@pytest.mark.parametrize("s", [257, 300, 301, 512])
def test_split_causal_attention_matches_sdpa(s):
    """The CPU query-split causal attention (used for 256 < s <= 512) gives SDPA's is_causal results and grads."""
    from megatron_ext.modules import attention as A

    g = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(2, 3, s, 16, generator=g, requires_grad=True) for _ in range(3))
    # strided inputs, as the fused-QKV view hands them over
    qkv = torch.randn(2, s, 3, 3, 16, generator=g)
    views = [qkv[:, :, :, i].transpose(1, 2).requires_grad_() for i in range(3)]
    grad = torch.randn(2, 3, s, 16, generator=g)
    for inputs in ((q, k, v), views):
        assert A._split_causal_on_cpu(inputs[0], inputs[1], 0.0)
        ref = F.scaled_dot_product_attention(*inputs, is_causal=True)
        ref_grads = torch.autograd.grad(ref, inputs, grad)
        out = A._sdpa(*inputs, None, True, 0.0)
        grads = torch.autograd.grad(out, inputs, grad)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        # [b, s, heads, d] underneath (as the CPU flash kernel lays out its output), so merging heads is a view
        assert out.transpose(1, 2).is_contiguous()
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # outside the window, with dropout, or with an explicit mask the plain SDPA call is used
    assert not A._split_causal_on_cpu(q[..., :256, :], k[..., :256, :], 0.0)
    assert not A._split_causal_on_cpu(q, k, 0.1)
    big = torch.zeros(1, 1, 513, 4)
    assert not A._split_causal_on_cpu(big, big, 0.0)


def test_split_causal_attention_bf16_close_to_fp32():
    from megatron_ext.modules import attention as A

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 384, 32, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = A._sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, True, 0.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_megatron_core(dtype):
    """Our vocab-parallel CE (amax row maximum) == megatron-core's: loss, logits gradient, in-place contract."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as mcore_ce
    from megatron_ext.modules.cross_entropy import vocab_parallel_cross_entropy as ours_ce

    g = torch.Generator().manual_seed(0)
    full = (torch.randn(3, 7, 64, generator=g) * 5 + 40.0).to(dtype)
    full[..., 60:] = float("-inf")  # vocabulary padding, as mask_vocab_padding leaves it
    target = torch.randint(0, 60, (3, 7), generator=g)
    upstream = torch.rand(3, 7, generator=g)
    res = {}
    for tag, fn in (("ours", ours_ce), ("mcore", mcore_ce)):
        leaf = full.clone().requires_grad_(True)
        loss = fn(leaf * 1, target)
        (loss * upstream).sum().backward()
        res[tag] = (loss.detach(), leaf.grad)
    assert res["ours"][0].dtype == torch.float32
    torch.testing.assert_close(res["ours"][0], res["mcore"][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(res["ours"][1], res["mcore"][1], rtol=0, atol=1e-7)
    ref = F.cross_entropy(full.float().view(-1, 64), target.view(-1), reduction="none").view(3, 7)
    torch.testing.assert_close(res["ours"][0], ref, rtol=1e-5, atol=1e-5)
    # label smoothing goes to megatron-core's function unchanged
    assert torch.equal(ours_ce(full.float().clone(), target, 0.1), mcore_ce(full.float().clone(), target, 0.1))

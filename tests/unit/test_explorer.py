"""megatron_ext.inference.explorer: internal embeddings, attention maps (checked against a from-scratch
softmax(QK^T / sqrt(d)) and against the layer's own output), attention PNGs, metrics loading and plots."""
import json
import math
import sys

import pytest
import torch

from helpers import fit_in_process, tiny_lm
from megatron_ext.errors import ConfigError, DataError
from megatron_ext.inference import explorer
from megatron_ext.parallel.state import initialize_parallel

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _tp1():
    initialize_parallel(1, 1, accelerator="cpu")
    yield


def gpt_lm(pos="learned_absolute", **kw):
    return tiny_lm("gpt", position_embedding_type=pos, **kw)


def mega_lm(chunk_size=-1):
    return tiny_lm("mega", chunk_size=chunk_size)


def encdec_lm():
    return tiny_lm("encdec")


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------ embeddings
@pytest.mark.parametrize("pos", ["learned_absolute", "rope"])
def test_gpt_embeddings_shapes_layers_and_logits(pos):
    lm = gpt_lm(pos)
    m = lm.model
    x = torch.tensor([lm.encode("hello world!"), lm.encode("hi there you")])
    m.train()  # must not matter: inspection runs in eval mode and restores the mode
    out = explorer.get_embeddings(lm, x)
    assert m.training
    emb, logits = out["embeddings"], out["logits"]
    via_lm = lm(x, get_embeddings=True)  # seed 003's spelling
    _close(via_lm["embeddings"], emb)
    _close(via_lm["logits"], logits)
    assert emb.shape == (2, 3, 12, 32) and logits.shape == (2, 12, lm.tokenizer.vocab_size)
    m.eval()
    with torch.no_grad():
        _close(logits, m.gather_logits(m(x)))
        _close(emb[:, 0], m.embedding(x))  # the embedding output
        rotary = m.rotary_cos_sin(emb[:, 0])
        for i, layer in enumerate(m.decoder.layers):  # each entry is the previous one through layer i
            _close(emb[:, i + 1], layer(emb[:, i], None, rotary))
        # the last embedding through the final norm and the output layer reproduces the logits
        _close(m.gather_logits(m.compute_logits(m.decoder.final_layernorm(emb[:, -1]))), logits)
        assert explorer.final_norm(lm) is m.decoder.final_layernorm
    # the same through the module function, for a single string
    single = explorer.get_embeddings(lm, "hello world!")
    _close(single["embeddings"], emb[:1], tol=1e-4)


def test_mega_embeddings_are_the_mega_layers():
    lm = mega_lm()
    m = lm.model.eval()
    x = torch.tensor([lm.encode("mega layers here")])
    out = explorer.get_embeddings(lm, x)
    emb = out["embeddings"]
    assert emb.shape == (1, 3, 16, 32)
    with torch.no_grad():
        ref = m.decoder.mega(inputs_embeds=m.embedding(x), output_hidden_states=True).hidden_states
        _close(emb, torch.stack(ref, dim=1))
        norm = explorer.final_norm(lm)
        assert norm is m.decoder.final_norm
        last = norm(emb[:, -1]) if norm is not None else emb[:, -1]
        _close(m.gather_logits(m.compute_logits(last)), out["logits"])


def test_encdec_embeddings_are_the_decoder_given_the_source():
    lm = encdec_lm()
    m = lm.model.eval()
    bos = lm.tokenizer.bos
    src = torch.tensor([lm.encode("the source")])
    dec = torch.tensor([[bos] + lm.encode("target")])
    out = explorer.get_embeddings(lm, dec, source=src)
    assert out["embeddings"].shape == (1, 3, 7, 32)
    with torch.no_grad():
        _close(out["logits"], m.gather_logits(m(src, dec)))
        _close(out["embeddings"][:, 0], m.embedding.embed_decoder(dec))
        last = m.decoder.final_layernorm(out["embeddings"][:, -1])
        _close(m.gather_logits(m.compute_logits(last)), out["logits"])
        other = explorer.get_embeddings(lm, dec, source=torch.tensor([lm.encode("zzz")]))
        assert not torch.allclose(other["embeddings"][:, 1], out["embeddings"][:, 1])  # cross-attention sees it
    with pytest.raises(ConfigError, match=r"source: an encoder-decoder LM needs the encoder input"):
        explorer.get_embeddings(lm, dec)
    with pytest.raises(ConfigError, match=r"source: only an encoder-decoder LM takes a source"):
        explorer.get_embeddings(gpt_lm(), "abc", source="x")


# ------------------------------------------------------------------------------------------------ attention
def _rope(x, base=10000.0):
    """Rotate-half RoPE on [s, heads, d], written out from the formula."""
    s, _, d = x.shape
    inv = torch.tensor([base ** (-2.0 * i / d) for i in range(d // 2)], dtype=torch.float64)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :].float()
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :].float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _reference_attention(layers, run, rope):
    """Hook every layer's attention input (the input norm's output) and its attention output; compute the
    probabilities from the weights by hand and check that mixing V with them reproduces the output."""
    ins, outs, handles = {}, {}, []
    for i, layer in enumerate(layers):
        handles.append(layer.input_layernorm.register_forward_hook(lambda mod, a, o, i=i: ins.__setitem__(i, o)))
        handles.append(layer.self_attention.register_forward_hook(lambda mod, a, o, i=i: outs.__setitem__(i, o)))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    probs, mixed = [], []
    for i, layer in enumerate(layers):
        attn = layer.self_attention
        h = ins[i][0]  # [s, hidden]
        s = h.shape[0]
        nh, hd = attn.num_attention_heads, attn.hidden_size // attn.num_attention_heads
        qkv = h @ attn.linear_qkv.weight.T + attn.linear_qkv.bias
        ng = getattr(attn, "num_query_groups", nh)  # rows per group: its nh/ng query heads, its key, its value
        g = qkv.view(s, ng, nh // ng + 2, hd)
        q = g[:, :, :nh // ng].reshape(s, nh, hd)
        k, v = (g[:, :, nh // ng + i].repeat_interleave(nh // ng, dim=1) for i in (0, 1))
        if rope:
            q, k = _rope(q), _rope(k)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        p = torch.softmax(scores, dim=-1)
        probs.append(p)
        mixed.append((outs[i][0], p, v, attn))
    return torch.stack(probs)[None], mixed


@pytest.mark.parametrize("pos", ["learned_absolute", "rope", "rope_gqa"])
def test_gpt_attention_maps_are_the_real_probabilities(pos):
    lm = gpt_lm("rope", num_query_groups=2) if pos == "rope_gqa" else gpt_lm(pos)
    m = lm.model
    text = "as business managers know"
    ids = torch.tensor([lm.encode(text)])
    maps = explorer.attention_maps(lm, text)
    s = ids.shape[1]
    assert maps.shape == (1, 2, 4, s, s)
    m.eval()
    ref, mixed = _reference_attention(list(m.decoder.layers), lambda: m(ids), rope=pos != "learned_absolute")
    _close(maps, ref)
    _close(maps.sum(-1), torch.ones(1, 2, 4, s))
    assert (maps.triu(1) == 0).all()  # causal
    for li, (out, _p, v, attn) in enumerate(mixed):
        # the explorer's probabilities mix V into exactly what the layer's attention returned
        ctx = torch.einsum("hqk,khd->qhd", maps[0, li], v).reshape(s, -1)
        _close(ctx @ attn.linear_proj.weight.T + attn.linear_proj.bias, out)
    # selection keeps the order asked
    sub = explorer.attention_maps(lm, ids, layers=[1, 0], heads=[3, 1])
    _close(sub, maps[:, [1, 0]][:, :, [3, 1]])
    assert explorer.attention_maps(lm, ids, layers=1, heads=2).shape == (1, 1, 1, s, s)


def test_encdec_decoder_self_attention_maps():
    lm = encdec_lm()
    m = lm.model.eval()
    src = lm.encode("the source")
    dec = [lm.tokenizer.bos] + lm.encode("target")
    maps = explorer.attention_maps(lm, dec, source=src)
    assert maps.shape == (1, 2, 4, 7, 7)
    ref, _ = _reference_attention(list(m.decoder.layers),
                                  lambda: m(torch.tensor([src]), torch.tensor([dec])), rope=False)
    _close(maps, ref)


@pytest.mark.parametrize("chunk_size", [-1, 4])
def test_mega_attention_maps_are_the_layers_own_weights(chunk_size):
    lm = mega_lm(chunk_size)
    m = lm.model.eval()
    x = torch.tensor([lm.encode("mega attn map")])
    s = x.shape[1]
    maps = explorer.attention_maps(lm, x)
    assert maps.shape == (1, 2, 1, s, s)
    with torch.no_grad():
        own = m.decoder.mega(inputs_embeds=m.embedding(x), output_attentions=True).attentions
    _close(maps, torch.stack(own, dim=1))
    assert (maps.triu(1) == 0).all()
    _close(maps.sum(-1), torch.ones(1, 2, 1, s))
    if chunk_size > 0:  # block-diagonal: no attention across chunks
        assert (maps[..., 4:, :4] == 0).all() and (maps[..., 4:8, 4:8].sum(-1) > 0.99).all()
    with pytest.raises(ConfigError, match=r"heads=\[1\]: 1 is out of range; the model has 1 attention heads"):
        explorer.attention_maps(lm, x, heads=[1])


def test_attention_argument_errors():
    lm = gpt_lm()
    for kw, msg in [
        (dict(layers=[2]), r"layers=\[2\]: 2 is out of range; the model has 2 layers \(valid: 0..1\)"),
        (dict(heads=[-1]), r"heads=\[-1\]: -1 is out of range; the model has 4 attention heads"),
        (dict(heads="0"), r"heads='0': expected None \(all\), an integer or a non-empty list of integers"),
        (dict(layers=[]), r"layers=\[\]: expected None \(all\)"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            explorer.attention_maps(lm, "abc", **kw)
    with pytest.raises(DataError, match=r"x: attention maps are for a single sequence, got a batch of 2"):
        explorer.attention_maps(lm, torch.zeros(2, 3, dtype=torch.long))


def test_show_attns_returns_logits_and_writes_pngs(tmp_path, monkeypatch):
    lm = gpt_lm()
    text = "as business managers know"
    folder = tmp_path / "attn" / "demo"
    logits, attns = explorer.show_attns(lm, text, layers=[0, 1], heads=[0, 3], folder=str(folder))
    _close(logits, lm(text))
    _close(attns, explorer.attention_maps(lm, text, layers=[0, 1], heads=[0, 3]))
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["layer0_head0.png", "layer0_head3.png", "layer1_head0.png", "layer1_head3.png"]
    for f in folder.iterdir():
        data = f.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG)
    # without matplotlib: the maps still come back, PNGs are a clear error
    for name in [k for k in sys.modules if k == "matplotlib" or k.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    logits2, _ = explorer.show_attns(lm, text)
    _close(logits2, logits)
    with pytest.raises(ConfigError, match=r"writing PNGs needs matplotlib"):
        explorer.show_attns(lm, text, folder=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ metrics
def _write_metrics(run_dir, cut_last=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    recs = [{"step": s, "train/loss": 5.0 - 0.5 * s, "train/lr": 1e-3 * s, "note": "text"} for s in range(1, 6)]
    recs[1]["val/loss"] = 4.2
    recs[3]["val/loss"] = 3.9
    recs[2]["train/grad_norm"] = float("nan")
    body = "".join(json.dumps(r) + "\n" for r in recs)
    if cut_last:
        body += '{"step": 6, "train/lo'  # a crash in the middle of writing the last line
    (run_dir / "metrics.jsonl").write_text(body)
    return recs


def test_load_and_plot_metrics(tmp_path):
    run = tmp_path / "exp" / "megatron_gpt" / "v0"
    _write_metrics(run)
    metrics = explorer.load_metrics(str(run))
    assert sorted(metrics) == ["train/grad_norm", "train/loss", "train/lr", "val/loss"]
    assert metrics["train/loss"] == [(s, 5.0 - 0.5 * s) for s in range(1, 6)]
    assert metrics["val/loss"] == [(2, 4.2), (4, 3.9)]
    assert math.isnan(metrics["train/grad_norm"][0][1])
    assert explorer.load_metrics(run / "metrics.jsonl") == metrics  # the file itself works too

    path = explorer.plot_metrics(run, "val/loss")
    assert path == str(run / "plots" / "val_loss.png")
    data = open(path, "rb").read()
    assert data.startswith(PNG) and len(data) > 1000
    custom = explorer.plot_metrics(run, "train/loss", filename=str(tmp_path / "figs" / "loss"))
    assert custom == str(tmp_path / "figs" / "loss.png") and open(custom, "rb").read().startswith(PNG)

    with pytest.raises(ConfigError, match=r"key='val/ppl': not a metric of this run; available: train/grad_norm, "
                                          r"train/loss, train/lr, val/loss"):
        explorer.plot_metrics(run, "val/ppl")
    with pytest.raises(DataError, match=r"key='train/grad_norm': the run logged no finite value"):
        explorer.plot_metrics(run, "train/grad_norm")
    with pytest.raises(ConfigError, match=r"filename='x.svg': plot_metrics writes PNG files"):
        explorer.plot_metrics(run, "train/loss", filename="x.svg")
    with pytest.raises(DataError, match=r"run_dir='.*nowhere': no such run directory"):
        explorer.load_metrics(tmp_path / "nowhere")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(DataError, match=r"has no metrics.jsonl"):
        explorer.load_metrics(tmp_path / "empty_run")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{oops\n{"step": 3, "train/loss": 1.0}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl, line 2: not valid JSON"):
        explorer.load_metrics(broken)


def test_plot_metrics_of_a_real_training_run(tmp_path, in_process):
    fit_in_process(["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=4",
                    "model.seq_length=16", "model.micro_batch_size=2", "model.global_batch_size=2",
                    "trainer.max_steps=5", "trainer.log_every_n_steps=1", "trainer.val_check_interval=5",
                    "trainer.limit_val_batches=1", "exp_manager.create_checkpoint_callback=false",
                    f"exp_manager.exp_dir={tmp_path}", "exp_manager.version=v0"])
    run = tmp_path / "megatron_gpt" / "v0"
    metrics = explorer.load_metrics(run)
    assert [s for s, _ in metrics["train/loss"]] == [1, 2, 3, 4, 5]
    assert [s for s, _ in metrics["val/loss"]] == [5]
    path = explorer.plot_metrics(run, "train/loss")
    assert path.endswith("plots/train_loss.png") and open(path, "rb").read().startswith(PNG)

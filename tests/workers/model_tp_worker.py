"""TP=2 vs TP=1 equivalence for GPTModel and the Mega LM imported from Hugging Face (run with torchrun
--nproc_per_node 2, gloo, CPU).

Each rank builds the TP=1 reference (same seed on both ranks), perturbs every parameter so no
bias/norm is trivially zero/one, records loss, logits and gradients; then re-initialises the
groups with TP=2, builds the TP=2 model, checks that the same seed gave the same full weights,
loads the shards of the reference weights and compares loss, gathered logits and gradients.
Rank 0 writes the max differences as JSON to argv[1]. argv[2] (optional): a directory of imported Hugging Face
models (``cases.json``, ``<name>.mext``, ``<name>_logits.pt``) whose logits are checked at TP2.
"""
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_ext.config.schema import ModelConfig  # noqa: E402
from megatron_ext.models.gpt import GPTModel  # noqa: E402
from megatron_ext.parallel.random import get_rng_tracker, model_parallel_manual_seed  # noqa: E402
from megatron_ext.parallel.state import destroy_parallel, initialize_parallel  # noqa: E402

VOCAB = 60  # padded to 64 at TP1 (16*1) and TP2 (16*2): same padded vocab

VARIANTS = {
    "gpt2_like": dict(),
    "llama_like": dict(position_embedding_type="rope", normalization="rmsnorm", activation="swiglu",
                       share_embeddings_and_output_weights=False, bias=False),
    "gpt2_like_recompute": dict(activations_checkpoint_granularity="full"),
    # grouped-query attention: 8 heads in 2 groups, one group (4 query heads + 1 kv head) per TP rank
    "llama_gqa": dict(position_embedding_type="rope", normalization="rmsnorm", activation="swiglu",
                      share_embeddings_and_output_weights=False, num_attention_heads=8, num_query_groups=2),
}


def make_cfg(tp, **kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=12, hidden_dropout=0.0,
                attention_dropout=0.0, make_vocab_size_divisible_by=16, tensor_model_parallel_size=tp)
    base.update(kw)
    return ModelConfig(**base)


def shard(full: torch.Tensor, param: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The TP shard of ``full`` that ``param`` holds, per megatron's partition attributes."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = torch.split(full, full.shape[dim] // (stride * world), dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


MEGA_FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "hf_mega")


def mega_imported(name):
    """A Hugging Face Mega fixture (tests/data/hf_mega) imported into our Mega LM at the current TP size."""
    from safetensors.torch import load_file

    from megatron_ext.checkpoint.archive import load_full_state_dict
    from megatron_ext.checkpoint.loader import build_model
    from megatron_ext.inference.hf_import_mega import mega_from_hf, read_hf_dir
    from megatron_ext.models.families import get_family

    d = os.path.join(MEGA_FIX, name)
    sd, cfg = read_hf_dir(d)
    ours, mcfg = mega_from_hf(sd, cfg)
    model, _, _ = build_model({"model": mcfg}, get_family("mega"), vocab_size=cfg["vocab_size"],
                              device=torch.device("cpu"))
    load_full_state_dict(model, ours, d)
    return model, load_file(os.path.join(d, "reference.safetensors"))


def mega_loss_and_grads(model, ids):
    """Per-token loss and the full gradient of every parameter (vocabulary shards gathered, padding rows dropped)."""
    from megatron.core import parallel_state as ps

    model.train()
    loss = model(ids[:, :-1], labels=ids[:, 1:])
    loss.sum().backward()
    world = ps.get_tensor_model_parallel_world_size()
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.detach()
        if world > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(parts, g.contiguous(), group=ps.get_tensor_model_parallel_group())
            g = torch.cat(parts, dim=int(p.partition_dim))
        grads[n] = g[:259] if n in ("embedding.word_embeddings.weight", "output_layer.weight",
                                    "output_layer.bias") else g
    return loss.detach(), grads


def mega_hf_tp1():
    """TP=1: loss and gradients of the imported HF Mega models (reference for TP=2)."""
    refs = {}
    for name in ("causal_rotary", "causal_simple_chunked"):
        model, ref = mega_imported(name)
        refs[name] = mega_loss_and_grads(model, ref["input_ids"])
    return refs


def mega_hf_tp2(refs):
    """TP=2 (vocabulary-parallel embedding / head, replicated Mega layers): logits vs transformers' (the fixture),
    loss and gradients vs TP=1, greedy tokens (with the cache) vs transformers' generate."""
    from megatron_ext.inference.generation import CausalLMSession

    out = {}
    for name in ("causal_rotary", "causal_simple_chunked"):
        model, ref = mega_imported(name)
        model.eval()
        with torch.no_grad():
            logits_diff = (model.gather_logits(model(ref["input_ids"])) - ref["logits"]).abs().max().item()
        gen = []
        if "prompt" in ref:
            s = CausalLMSession(model, [ref["prompt"][0].tolist()], max_new_tokens=8, use_cache=True, pad_id=257)
            for i in range(8):
                t = s.logits.argmax(-1)
                gen.append(int(t[0]))
                if i < 7:
                    s.step(t)
        loss, grads = mega_loss_and_grads(model, ref["input_ids"])
        rloss, rgrads = refs[name]
        t = torch.tensor([logits_diff, (loss - rloss).abs().max().item(),
                          max((grads[n] - rgrads[n]).abs().max().item() for n in rgrads)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out[name] = dict(padded_vocab=model.padded_vocab_size, logits_diff=t[0].item(), loss_diff=t[1].item(),
                         max_grad_diff=t[2].item(), same_params=sorted(grads) == sorted(rgrads), greedy=gen,
                         hf_greedy=ref["generated"][0, ref["prompt"].shape[1]:].tolist() if "prompt" in ref else [])
    return out


def main(out_path, hf_dir=None):
    initialize_parallel(1, 1, accelerator="cpu")
    g = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, VOCAB, (2, 13), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    results = {}

    refs = {}
    for name, kw in VARIANTS.items():
        torch.manual_seed(7)
        model_parallel_manual_seed(7)
        ref = GPTModel(make_cfg(1, **kw), VOCAB)
        init_sd = {k: v.detach().clone() for k, v in ref.named_parameters()}
        with torch.no_grad():
            pg = torch.Generator().manual_seed(99)
            for p in ref.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=pg))
        loss = ref(x, labels=y)
        loss.mean().backward()
        ref.eval()
        with torch.no_grad():
            full = ref(x)
        assert torch.isneginf(full[..., VOCAB:]).all(), "padded vocabulary logits must be -inf"
        logits = full[..., :VOCAB]
        refs[name] = dict(
            init=init_sd,
            params={n: p.detach().clone() for n, p in ref.named_parameters()},
            grads={n: p.grad.clone() for n, p in ref.named_parameters()},
            loss=loss.detach(),
            logits=logits,
        )
        del ref

    mega_refs = mega_hf_tp1()

    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    initialize_parallel(2, 1, accelerator="cpu")
    rank, world = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    assert world == 2

    for name, kw in VARIANTS.items():
        r = refs[name]
        torch.manual_seed(7)
        model_parallel_manual_seed(7)
        m = GPTModel(make_cfg(2, **kw), VOCAB)
        assert m.padded_vocab_size == 64
        params = dict(m.named_parameters())
        # same seed -> same full weights at any TP size (CPU master-weight init)
        init_diff = max(
            (p.detach() - shard(r["init"][n], p, rank, world)).abs().max().item() for n, p in params.items()
        )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(shard(r["params"][n], p, rank, world))
        loss = m(x, labels=y)
        loss.mean().backward()
        m.eval()
        with torch.no_grad():
            logits = m.gather_logits(m(x))
        grad_diff = {
            n: (p.grad - shard(r["grads"][n], p, rank, world)).abs().max().item() for n, p in params.items()
        }
        res = dict(
            init_diff=init_diff,
            loss_diff=(loss.detach() - r["loss"]).abs().max().item(),
            logits_diff=(logits - r["logits"]).abs().max().item(),
            emb_grad_diff=grad_diff["embedding.word_embeddings.weight"],
            max_grad_diff=max(grad_diff.values()),
            worst_grad=max(grad_diff, key=grad_diff.get),
            trimmed_shape=list(m.gather_logits(m(x)).shape),
        )
        # reduce over ranks (max) so rank 0 reports the worst
        t = torch.tensor([res["init_diff"], res["loss_diff"], res["logits_diff"], res["emb_grad_diff"],
                          res["max_grad_diff"]], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        res.update(zip(["init_diff", "loss_diff", "logits_diff", "emb_grad_diff", "max_grad_diff"], t.tolist()))
        results[name] = res

    # Packed documents at TP2 (model.data.reset_attention_mask): in fp64 the loss of a packed batch equals the
    # token-weighted loss of its documents run separately, learned and rotary positions, both attention paths.
    from megatron_ext.modules.doc_attention import document_position_ids, segment_ids_from_tokens

    dg = torch.Generator().manual_seed(11)
    rows = []
    for lens in ((4, 7, 1), (12,)):
        row = []
        for n in lens:
            row += torch.randint(1, VOCAB, (n - 1,), generator=dg).tolist() + [0]
        rows.append(row)
    ptok = torch.tensor(rows)
    plab = torch.randint(0, VOCAB, ptok.shape, generator=dg)
    seg = segment_ids_from_tokens(ptok, 0)
    pid = document_position_ids(seg)

    def ce64(model, tok, lab, **kw):
        logits = model.gather_logits(model(tok, **kw)).double()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), lab.reshape(-1), reduction="none")

    docmask = {}
    for name, kw in (("learned", {}), ("rope", dict(position_embedding_type="rope")),
                     ("rope_gqa", dict(position_embedding_type="rope", num_attention_heads=8, num_query_groups=2))):
        m = GPTModel(make_cfg(2, **kw), VOCAB, init_seed=5).double().eval()
        with torch.no_grad():
            pg = torch.Generator().manual_seed(21)  # replicated weights stay equal on both ranks
            for p in m.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=pg, dtype=p.dtype))
            alone_sum, n, worst = 0.0, 0, 0.0
            for impl in ("packed", "mask"):
                m.document_attention = impl
                packed = ce64(m, ptok, plab, position_ids=pid, segment_ids=seg).view(ptok.shape)
                alone_sum, n = 0.0, 0
                for r in range(ptok.shape[0]):
                    for d in seg[r].unique():
                        idx = (seg[r] == d).nonzero().squeeze(1)
                        alone = ce64(m, ptok[r:r + 1, idx], plab[r:r + 1, idx])
                        worst = max(worst, (packed[r, idx] - alone).abs().max().item())
                        alone_sum, n = alone_sum + alone.sum().item(), n + idx.numel()
                worst = max(worst, abs(packed.mean().item() - alone_sum / n))
            unmasked = ce64(m, ptok, plab, position_ids=pid).view(ptok.shape)
            t = torch.tensor([worst, -(unmasked - packed).abs().max().item()], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            docmask[name] = dict(max_diff=t[0].item(), unmasked_diff=-t[1].item())
    results["docmask"] = docmask

    # Dropout streams: the TP stream differs across TP ranks, the default stream does not.
    model_parallel_manual_seed(5)
    default = torch.rand(8)
    with get_rng_tracker().fork():
        tp_draw = torch.rand(8)
    both_default = [torch.empty(8) for _ in range(2)]
    both_tp = [torch.empty(8) for _ in range(2)]
    dist.all_gather(both_default, default, group=ps.get_tensor_model_parallel_group())
    dist.all_gather(both_tp, tp_draw, group=ps.get_tensor_model_parallel_group())
    results["rng"] = dict(
        default_same=bool(torch.equal(both_default[0], both_default[1])),
        tp_differs=not torch.equal(both_tp[0], both_tp[1]),
    )

    # Our vocab-parallel CE (amax row maximum) == megatron-core's, forward and backward, at TP2: vocabulary
    # shards of one set of full logits (targets on both shards, a -inf padding column, a large shift).
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as mcore_ce
    from megatron_ext.modules.cross_entropy import vocab_parallel_cross_entropy as ours_ce

    cg = torch.Generator().manual_seed(3)
    full = torch.randn(5, 3, 64, generator=cg) * 4 + 30.0
    full[..., 63] = float("-inf")
    target = torch.randint(0, 63, (5, 3), generator=cg)
    upstream = torch.rand(5, 3, generator=cg)
    out = {}
    for tag, fn in (("ours", ours_ce), ("mcore", mcore_ce)):
        leaf = full.chunk(2, dim=-1)[rank].clone().requires_grad_(True)
        loss = fn(leaf.clone(), target)  # the kernels overwrite their input in place
        (loss * upstream).sum().backward()
        out[tag] = (loss.detach(), leaf.grad)
    results["cross_entropy"] = dict(
        loss_diff=(out["ours"][0] - out["mcore"][0]).abs().max().item(),
        grad_diff=(out["ours"][1] - out["mcore"][1]).abs().max().item(),
        loss_mean=out["ours"][0].mean().item(),
    )

    results["mega_hf"] = mega_hf_tp2(mega_refs)

    # Hugging Face imports (tests/integration/test_model_tp.py wrote them with tools/convert_from_hf.py, and the
    # transformers logits of the same tokens): each .mext loaded at TP2 as model.ckpt_path loads it gives HF's logits
    if hf_dir is not None:
        from megatron_ext.checkpoint.loader import load_weights_file

        spec = json.load(open(os.path.join(hf_dir, "cases.json")))
        hf_res = {}
        for name, case in spec.items():
            m = GPTModel(ModelConfig(**{**case["model"], "tensor_model_parallel_size": 2}),
                         case["vocab_size"]).eval()
            load_weights_file(m, os.path.join(hf_dir, f"{name}.mext"), m.config)
            ref = torch.load(os.path.join(hf_dir, f"{name}_logits.pt"))
            with torch.no_grad():
                got = m.gather_logits(m(ref["tokens"]))
            t = torch.tensor([(got - ref["logits"]).abs().max().item()], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            hf_res[name] = dict(logits_diff=t.item(), shape=list(got.shape), padded=m.padded_vocab_size)
        results["hf_import"] = hf_res

    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)

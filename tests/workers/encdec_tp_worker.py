"""TP=2 vs TP=1 equivalence for EncoderDecoderModel (run with torchrun --nproc_per_node 2, gloo, CPU).

As ``model_tp_worker.py``: each rank builds the TP=1 reference (same seed on both ranks), perturbs
every parameter so no bias/norm is trivially zero/one, records loss, logits and gradients; then
re-initialises the groups with TP=2, builds the TP=2 model, checks that the same seed gave the same
full weights, loads the shards of the reference weights and compares loss, gathered logits and
gradients. The encoder input has padding (enc_mask) in one sample. Rank 0 writes the max
differences as JSON to argv[1].
"""
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_ext.config.schema import EncoderDecoderModelConfig, TransformerStackConfig  # noqa: E402
from megatron_ext.models.encoder_decoder import EncoderDecoderModel  # noqa: E402
from megatron_ext.parallel.random import model_parallel_manual_seed  # noqa: E402
from megatron_ext.parallel.state import destroy_parallel, initialize_parallel  # noqa: E402

VOCAB = 60  # padded to 64 at TP1 (16*1) and TP2 (16*2): same padded vocab
S_ENC, S_DEC = 10, 8

LLAMA = dict(normalization="rmsnorm", activation="swiglu", bias=False)
VARIANTS = {
    "transformer": dict(top={}, stack={}),
    "transformer_rope_untied": dict(top=dict(position_embedding_type="rope",
                                             share_embeddings_and_output_weights=False), stack=LLAMA),
    "perceiver": dict(top={}, stack=dict(arch="perceiver", hidden_steps=3,
                                         num_self_attention_per_cross_attention=2)),
    "perceiver_rope_untied_recompute": dict(
        top=dict(position_embedding_type="rope", share_embeddings_and_output_weights=False),
        stack=dict(LLAMA, arch="perceiver", hidden_steps=4, activations_checkpoint_granularity="full"),
    ),
}


def make_cfg(tp, top, stack):
    common = dict(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0)
    enc = dict(common, **stack)
    dec = dict(common, **{k: v for k, v in stack.items()
                          if k not in ("arch", "hidden_steps", "num_self_attention_per_cross_attention")})
    return EncoderDecoderModelConfig(seq_length=S_ENC, seq_length_dec=S_DEC, make_vocab_size_divisible_by=16,
                                     tensor_model_parallel_size=tp, encoder=TransformerStackConfig(**enc),
                                     decoder=TransformerStackConfig(**dec), **top)


def shard(full: torch.Tensor, param: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The TP shard of ``full`` that ``param`` holds, per megatron's partition attributes."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = torch.split(full, full.shape[dim] // (stride * world), dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


def main(out_path):
    initialize_parallel(1, 1, accelerator="cpu")
    g = torch.Generator().manual_seed(123)
    enc = torch.randint(0, VOCAB, (2, S_ENC), generator=g)
    enc_mask = torch.ones(2, S_ENC, dtype=torch.bool)
    enc_mask[1, 6:] = False
    dec = torch.randint(0, VOCAB, (2, S_DEC + 1), generator=g)
    x, y = dec[:, :-1], dec[:, 1:]
    results = {}

    refs = {}
    for name, kw in VARIANTS.items():
        torch.manual_seed(7)
        model_parallel_manual_seed(7)
        ref = EncoderDecoderModel(make_cfg(1, **kw), VOCAB, init_seed=1234)
        init_sd = {k: v.detach().clone() for k, v in ref.named_parameters()}
        with torch.no_grad():
            pg = torch.Generator().manual_seed(99)
            for p in ref.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=pg))
        loss = ref(enc, x, enc_mask, labels=y)
        loss.mean().backward()
        ref.eval()
        with torch.no_grad():
            full = ref(enc, x, enc_mask)
        assert torch.isneginf(full[..., VOCAB:]).all(), "padded vocabulary logits must be -inf"
        refs[name] = dict(
            init=init_sd,
            params={n: p.detach().clone() for n, p in ref.named_parameters()},
            grads={n: p.grad.clone() for n, p in ref.named_parameters()},
            loss=loss.detach(),
            logits=full[..., :VOCAB],
        )
        del ref

    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    initialize_parallel(2, 1, accelerator="cpu")
    rank, world = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    assert world == 2

    keys = ["init_diff", "loss_diff", "logits_diff", "emb_grad_diff", "max_grad_diff"]
    for name, kw in VARIANTS.items():
        r = refs[name]
        torch.manual_seed(7)
        model_parallel_manual_seed(7)
        m = EncoderDecoderModel(make_cfg(2, **kw), VOCAB, init_seed=1234)
        assert m.padded_vocab_size == 64
        params = dict(m.named_parameters())
        assert set(params) == set(r["init"]), name
        # same seed -> same full weights at any TP size (CPU master-weight init, per-component seeds)
        init_diff = max(
            (p.detach() - shard(r["init"][n], p, rank, world)).abs().max().item() for n, p in params.items()
        )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(shard(r["params"][n], p, rank, world))
        loss = m(enc, x, enc_mask, labels=y)
        loss.mean().backward()
        m.eval()
        with torch.no_grad():
            logits = m.gather_logits(m(enc, x, enc_mask))
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
            num_params=len(params),
            trimmed_shape=list(logits.shape),
        )
        t = torch.tensor([res[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # rank 0 reports the worst
        res.update(zip(keys, t.tolist()))
        results[name] = res

    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1])

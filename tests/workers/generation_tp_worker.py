"""Cached greedy generation at TP=2 (2 gloo processes on CPU) equals TP=1 (run with torchrun
--nproc_per_node 2).

Each rank builds the TP=1 GPT (same seed on both ranks), perturbs its weights, and records the greedy tokens of a
batch of prompts of different lengths (KV cache) and the next-token logits of every step; then it re-initialises
the groups at TP=2, builds the TP=2 model, loads the shards of the reference weights (heads, and so the KV cache,
split over the two ranks; the padded vocabulary is larger at TP=2, its extra rows are zeros and masked anyway) and
generates again, cached and uncached. Rank 0 writes, per variant: the token lists, whether both ranks produced the
same tokens, and the largest logit difference to TP=1 over all steps (max over ranks), as JSON to argv[1].
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
from megatron_ext.inference.generation import generate, open_session  # noqa: E402
from megatron_ext.inference.lm import LM  # noqa: E402
from megatron_ext.models.gpt import GPTModel  # noqa: E402
from megatron_ext.parallel.state import destroy_parallel, initialize_parallel  # noqa: E402
from megatron_ext.tokenizers import build_tokenizer  # noqa: E402

NEW = 22
PROMPTS = [[72, 101, 108, 108, 111, 32, 116, 104, 101, 114, 101], [84, 111], [97, 98, 99, 100, 101, 102]]
VARIANTS = {
    "learned": dict(),
    "rope_untied": dict(position_embedding_type="rope", normalization="rmsnorm", activation="swiglu", bias=False,
                        share_embeddings_and_output_weights=False),
    # grouped-query attention: 8 heads in 2 groups, each rank caches its one key/value head
    "rope_gqa": dict(position_embedding_type="rope", normalization="rmsnorm", activation="swiglu", bias=False,
                     share_embeddings_and_output_weights=False, num_attention_heads=8, num_query_groups=2),
}


def make_cfg(tp, **kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=48, hidden_dropout=0.0,
                attention_dropout=0.0, make_vocab_size_divisible_by=8, tensor_model_parallel_size=tp)
    base.update(kw)
    return ModelConfig(**base)


def shard(full: torch.Tensor, param: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The TP shard of ``full`` that ``param`` holds (vocabulary-padded rows added as zeros)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    need = param.shape[dim] * world
    if full.shape[dim] < need:  # the padded vocabulary grows with TP
        pad = list(full.shape)
        pad[dim] = need - full.shape[dim]
        full = torch.cat([full, torch.zeros(pad, dtype=full.dtype)], dim=dim)
    chunks = torch.split(full, full.shape[dim] // (stride * world), dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


def step_logits(lm, use_cache):
    """Next-token logits ``[rows, vocab]`` of every greedy step."""
    s = open_session(lm, PROMPTS, max_new_tokens=NEW, use_cache=use_cache)
    out = [s.logits.clone()]
    for _ in range(NEW - 1):
        s.step(s.logits.argmax(dim=-1))
        out.append(s.logits.clone())
    return torch.stack(out)


def main(out_path):
    tok = build_tokenizer("byte")
    initialize_parallel(1, 1, accelerator="cpu")
    refs = {}
    for name, kw in VARIANTS.items():
        model = GPTModel(make_cfg(1, **kw), tok.vocab_size, init_seed=3)
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        lm = LM(model.eval(), tok)
        refs[name] = dict(
            params={n: p.detach().clone() for n, p in model.named_parameters()},
            tokens=generate(lm, PROMPTS, max_new_tokens=NEW, greedy=True, stop_tokens=[], output="tokens"),
            logits=step_logits(lm, True),
        )

    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    initialize_parallel(2, 1, accelerator="cpu")
    rank, world = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    assert world == 2
    results = {}
    for name, kw in VARIANTS.items():
        r = refs[name]
        model = GPTModel(make_cfg(2, **kw), tok.vocab_size, init_seed=3)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(shard(r["params"][n], p, rank, world))
        lm = LM(model.eval(), tok)
        cached = generate(lm, PROMPTS, max_new_tokens=NEW, greedy=True, stop_tokens=[], output="tokens")
        uncached = generate(lm, PROMPTS, max_new_tokens=NEW, greedy=True, stop_tokens=[], output="tokens",
                            use_cache=False)
        diff = (step_logits(lm, True) - r["logits"]).abs().max().reshape(1).double()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        flat = torch.tensor([t for seq in cached for t in seq], dtype=torch.long)
        both = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(both, flat, group=ps.get_tensor_model_parallel_group())
        results[name] = dict(tp1=r["tokens"], tp2_cached=cached, tp2_uncached=uncached,
                             ranks_agree=bool(torch.equal(both[0], both[1])), max_logit_diff=float(diff.item()))
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1])

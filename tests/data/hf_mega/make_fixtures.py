"""Make the tiny Hugging Face Mega fixtures of tests/data/hf_mega/ (see README.md there).

Runs only in a scratch environment with a transformers release that still has Mega (4.39.3 was used):

    python3 -m venv /tmp/hf439 && /tmp/hf439/bin/pip install torch==2.13.0 transformers==4.39.3 safetensors
    /tmp/hf439/bin/python tests/data/hf_mega/make_fixtures.py [OUT_DIR]   # default: this file's directory

For each variant it builds a random model (seeded), adds small noise to every parameter (so biases, norm gains and
the LM-head bias are not at their init values of 0 / 1 and a wrong mapping shows), saves it with
``save_pretrained(safe_serialization=True)`` into ``<variant>/`` and writes ``<variant>/reference.safetensors``:

* ``input_ids`` [2, L] and ``logits`` [2, L, vocab] of the full forward (eval mode, fp32);
* causal variants without chunking: ``prompt`` [1, P], ``generated`` [1, P + 8] from
  ``generate(do_sample=False, max_new_tokens=8)``;
* ``last_hidden_state`` [2, L, hidden]: the Mega stack's output (before the LM head's dense layer).
"""
from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import MegaConfig, MegaForCausalLM, MegaForMaskedLM
import transformers

# vocab_size 259 and the special ids are those of megatron_ext's byte tokenizer (256 eod, 257 pad, 258 bos), so an
# imported model is usable with model.tokenizer.library=byte
SMALL = dict(vocab_size=259, hidden_size=16, num_hidden_layers=2, intermediate_size=32, ema_projection_size=4,
             shared_representation_size=8, nffn_hidden_size=32, max_positions=32, dropout_prob=0.0,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, nffn_activation_dropout_prob=0.0,
             pad_token_id=257, bos_token_id=258, eos_token_id=256,
             initializer_range=0.3)  # large enough weights that the logits depend on the input

VARIANTS = {
    # HF defaults for the rest: scalenorm, pre-norm, rotary bias, softmax, NFFN, tied LM head + hidden dense layer
    "causal_rotary": dict(kind="causal", length=12, prompt=5,
                          cfg=dict(is_decoder=True, bidirectional=False)),
    # simple (Toeplitz) bias, chunking (2 chunks of 8), layernorm, post-norm, untied head, no dense layer, gelu
    # (no generation reference: transformers 4.39's Mega cannot decode with chunking -- with the cache a one-token
    # step fails in its attention reshape, without it a prefix that is not a multiple of chunk_size is refused)
    "causal_simple_chunked": dict(kind="causal", length=16, prompt=None,
                                  cfg=dict(is_decoder=True, bidirectional=False, relative_positional_bias="simple",
                                           use_chunking=True, chunk_size=8, normalization_type="layernorm",
                                           normalize_before_mega=False, normalize_before_ffn=False,
                                           add_lm_hidden_dense_layer=False, tie_word_embeddings=False,
                                           activation="gelu")),
    # encoder: bidirectional EMA, non-causal attention (HF defaults)
    "masked_lm": dict(kind="mlm", length=12, cfg=dict(bidirectional=True)),
}


def make(name: str, spec: dict, out_dir: str) -> None:
    torch.manual_seed(1234)
    cfg = MegaConfig(**SMALL, **spec["cfg"])
    model = (MegaForCausalLM if spec["kind"] == "causal" else MegaForMaskedLM)(cfg).eval()
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = os.path.join(out_dir, name)
    model.save_pretrained(path, safe_serialization=True)
    ids = torch.randint(0, 256, (2, spec["length"]), generator=g)
    ref = {"input_ids": ids}
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        ref["logits"] = out.logits.contiguous()
        if spec["kind"] == "causal" and spec["prompt"]:
            prompt = ids[:1, : spec["prompt"]].clone()
            model.generation_config.eos_token_id = None  # 8 tokens whatever they are (256 = eod is a token too)
            gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8,
                                 pad_token_id=cfg.pad_token_id)
            ref["prompt"], ref["generated"] = prompt, gen.contiguous()
        ref["last_hidden_state"] = out.hidden_states[-1].contiguous()
    save_file(ref, os.path.join(path, "reference.safetensors"),
              metadata={"transformers": transformers.__version__, "torch": torch.__version__})
    print(name, {k: tuple(v.shape) for k, v in ref.items()})


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    for name, spec in VARIANTS.items():
        make(name, spec, out_dir)


if __name__ == "__main__":
    main()

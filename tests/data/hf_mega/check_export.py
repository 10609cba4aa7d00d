"""Check that our Mega export loads in transformers 4.x (which still has Mega) and gives our logits.

Two steps, two environments (transformers 5, the project's, has no Mega):

    python tests/data/hf_mega/check_export.py export OUT_DIR                 # the project's venv
    /tmp/hf439/bin/python tests/data/hf_mega/check_export.py check OUT_DIR   # the scratch venv (see README.md)

``export`` writes OUT_DIR/roundtrip (the causal_rotary fixture imported into our Mega LM and exported back) and
OUT_DIR/native (a Mega LM of ours -- chunked, rotary, post-norm layernorm, untied, no dense layer, no head bias --
exported, with our logits on fixed inputs in ours_ref.safetensors). ``check`` loads both with transformers'
``MegaForCausalLM.from_pretrained`` and prints the largest logit differences and any missing / unexpected keys.
"""
import os
import sys

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))


def export(out: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))
    from omegaconf import OmegaConf

    from megatron_ext.checkpoint.archive import gather_full_state_dict
    from megatron_ext.checkpoint.loader import build_model
    from megatron_ext.inference.hf_import_mega import mega_from_hf, mega_to_hf, read_hf_dir, write_hf_mega_dir
    from megatron_ext.models.families import get_family
    from megatron_ext.parallel.state import initialize_parallel

    initialize_parallel(1, 1, accelerator="cpu")
    sd, cfg = read_hf_dir(os.path.join(HERE, "causal_rotary"))
    ours, mcfg = mega_from_hf(sd, cfg)
    ids = {k: cfg[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    write_hf_mega_dir(os.path.join(out, "roundtrip"), *mega_to_hf(ours, mcfg, cfg["vocab_size"], **ids))
    mc = {"arch": "mega", "num_layers": 2, "hidden_size": 32, "seq_length": 32, "hidden_dropout": 0.0,
          "attention_dropout": 0.0, "init_method_std": 0.3, "share_embeddings_and_output_weights": False,
          "mega": {"ema_projection_size": 4, "shared_representation_size": 16, "chunk_size": 8,
                   "normalize_before_mega": False, "normalize_before_ffn": False, "normalization_type": "layernorm"}}
    torch.manual_seed(0)
    model, _, typed = build_model({"model": mc}, get_family("mega"), vocab_size=259, device=torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x = torch.randint(0, 256, (2, 16))
        logits = model.gather_logits(model(x))
    native = os.path.join(out, "native")
    write_hf_mega_dir(native, *mega_to_hf(gather_full_state_dict(model), OmegaConf.to_container(typed.model), 259))
    save_file({"input_ids": x, "logits": logits.contiguous()}, os.path.join(native, "ours_ref.safetensors"))


def check(out: str) -> None:
    import transformers
    from transformers import MegaForCausalLM

    refs = {"roundtrip": os.path.join(HERE, "causal_rotary", "reference.safetensors"),
            "native": os.path.join(out, "native", "ours_ref.safetensors")}
    for name, ref_path in refs.items():
        model, info = MegaForCausalLM.from_pretrained(os.path.join(out, name), local_files_only=True,
                                                      output_loading_info=True)
        ref = load_file(ref_path)
        with torch.no_grad():
            diff = (model.eval()(ref["input_ids"]).logits - ref["logits"]).abs().max().item()
        print(f"transformers {transformers.__version__}: {name}: max |logits - ours| = {diff:.3g}; loading info: "
              f"{ {k: v for k, v in info.items() if v} or 'no missing / unexpected keys'}")


if __name__ == "__main__":
    {"export": export, "check": check}[sys.argv[1]](sys.argv[2])

"""Import a local Hugging Face model directory into a ``.mext`` archive that training and inference load.

    python tools/convert_from_hf.py --input hf/mega --output mega.mext --tokenizer-library byte
    python pretrain_gpt.py --config-path=configs/mega --config-name=gpt_mega model.ckpt_path=mega.mext \\
        model.mega.final_norm=false model.mega.lm_hidden_dense_layer=true model.mega.lm_head_bias=true ...

``--input``: a directory with ``config.json`` and the weights (``model.safetensors``, a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin`` / its index, read without running pickled code); nothing
is downloaded. Supported here: transformers' ``MegaForCausalLM`` (``model_type: mega``; mapping and refusals in
``megatron_ext/inference/hf_import_mega.py``). The archive holds our fp32 weights, the model config mapped from
``config.json`` (``model.arch=mega``, printed) and the tokenizer given by ``--tokenizer-library`` /
``--tokenizer-model`` (one of ours: its vocabulary size must equal the model's ``vocab_size``). Archives are
layout-free: load them at any tensor-parallel size (``LM.restore_from``, ``model.ckpt_path``).

Errors print one line ``convert_from_hf: error: ...`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from megatron_ext.errors import ConfigError, run_entry_point
from megatron_ext.output_files import check_outputs

PROG = "convert_from_hf"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="local Hugging Face model directory (config.json + weights)")
    p.add_argument("--output", required=True, help="the .mext archive to write")
    p.add_argument("--tokenizer-library", required=True,
                   help="our tokenizer library the model's ids belong to (byte, sentencepiece, ...)")
    p.add_argument("--tokenizer-model", default=None, help="its model file, if the library needs one")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return p


def run(args: argparse.Namespace) -> dict:
    if not args.output.endswith(".mext"):
        raise ConfigError(f"--output {args.output}: an archive name must end in .mext")
    check_outputs([("--output", args.output)], [args.input, args.tokenizer_model], overwrite=args.overwrite)
    from megatron_ext.checkpoint.archive import write_archive  # start-up cost: model stack
    from megatron_ext.inference.hf_import_mega import mega_from_hf, read_hf_dir  # start-up cost: torch
    from megatron_ext.tokenizers import build_tokenizer  # start-up cost: sentencepiece

    sd, hf_config = read_hf_dir(args.input)
    if hf_config.get("model_type") != "mega":
        raise ConfigError(f"--input {args.input}: config.json model_type={hf_config.get('model_type')!r}: this "
                          f"importer reads 'mega' (transformers' MegaForCausalLM)")
    tok = build_tokenizer(args.tokenizer_library, args.tokenizer_model, library_key="--tokenizer-library",
                          model_key="--tokenizer-model")
    vocab = int(hf_config["vocab_size"])
    if int(tok.vocab_size) != vocab:
        raise ConfigError(f"--tokenizer-library {args.tokenizer_library}: the tokenizer has {tok.vocab_size} ids but "
                          f"{args.input}/config.json vocab_size={vocab}; give the tokenizer the model was trained "
                          f"with")
    ours, mcfg = mega_from_hf(sd, hf_config)
    write_archive(args.output, state_dict=ours, config={"model": mcfg}, family="mega", vocab_size=vocab,
                  tokenizer_library=args.tokenizer_library, tokenizer_file=args.tokenizer_model,
                  source={"hf_dir": os.path.abspath(args.input), "model_type": "mega",
                          "architectures": hf_config.get("architectures")})
    return {"output": args.output, "model": mcfg, "tensors": len(ours)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    rc, info = run_entry_point(PROG, run, build_parser().parse_args(argv))
    if rc:
        return rc
    print(f"{PROG}: wrote {info['output']} ({info['tensors']} tensors), model config: "
          f"{json.dumps(info['model'], sort_keys=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

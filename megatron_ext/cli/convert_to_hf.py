"""Export a trained GPT to a Hugging Face ``transformers`` model directory (weights, config, tokenizer).

    python tools/convert_to_hf.py --input experiments/megatron_gpt/v1 --output hf/gpt
    python tools/convert_to_hf.py --input gpt.mext --output hf/gpt --dtype bfloat16
    python tools/convert_to_hf.py --input gpt_step500.pt --output hf/gpt --tokenizer-library sentencepiece \\
        --tokenizer-model tok/spm.model

Then ``AutoModelForCausalLM.from_pretrained("hf/gpt")`` gives the same logits as our model and
``AutoTokenizer.from_pretrained("hf/gpt")`` the same token ids as the training tokenizer.

``--input`` is a ``.mext`` archive, a training checkpoint (a run directory, its ``checkpoints`` directory or one
``step_N`` directory: the latest complete checkpoint; any TP / PP / ZeRO layout) or a consolidated ``.pt`` file
(``tools/convert_checkpoint.py --output``).

``--arch auto`` (default) exports learned positions + GELU + LayerNorm models as ``GPT2LMHeadModel`` and rope +
SwiGLU + RMSNorm models as ``LlamaForCausalLM``, and Mega language models (``model.arch=mega``) as transformers
4.x's ``MegaForCausalLM`` (``model_type: mega``; transformers 5 has no Mega, see
``megatron_ext/inference/hf_import_mega.py``); any other combination and encoder-decoder models are refused with
a message naming the ``model.*`` keys in the way. The tokenizer is the one the checkpoint was
trained with (``model.tokenizer``; the archive's own copy for ``.mext``); ``--tokenizer-library`` /
``--tokenizer-model`` replace it, e.g. when the sentencepiece file has moved.

Before anything is written, the exported tokenizer (``tokenizers`` and ``AutoTokenizer``, as loaded from the
files) is checked against ours on built-in probe texts and on a sample of up to 2000 lines of each
``--verify-text FILE`` (default: the text a sentencepiece tokenizer was trained on, when its recorded input file
is still there; give the training text explicitly otherwise). Any line encoded to other ids (or decoded to
another text) refuses the export, naming the first such line and both id lists;
``--allow-tokenizer-mismatch`` exports anyway and prints how many lines differ. See
``megatron_ext/inference/hf_export.py`` for the weight mapping and the tokenizer representation.

Needs ``transformers`` (``pip install transformers``). Errors print one line ``convert_to_hf: error: ...`` and
exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from typing import Optional, Sequence

from megatron_ext.errors import ConfigError, run_entry_point
from megatron_ext.output_files import check_outputs

PROG = "convert_to_hf"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_to_hf.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help=".mext archive, run/checkpoint directory or consolidated .pt")
    p.add_argument("--output", required=True, help="the Hugging Face model directory to write")
    p.add_argument("--arch", choices=("auto", "gpt2", "llama", "mega"), default="auto",
                   help="target architecture (default: auto, from the model config)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the saved weights (default float32)")
    p.add_argument("--tokenizer-library", default=None, help="override the tokenizer library (byte | char | sentencepiece | huggingface)")
    p.add_argument("--tokenizer-model", default=None, help="override the tokenizer model file (sentencepiece .model; huggingface: the "
                   "directory with tokenizer.json)")
    p.add_argument("--verify-text", action="append", default=None, metavar="FILE",
                   help="a text file (e.g. the training text) whose lines (a sample) the exported tokenizer must "
                        "encode to our ids; repeatable (default: the tokenizer's recorded training input, if found)")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="export even if the Hugging Face tokenizer encodes some checked lines differently (it "
                        "prints how many); without it such an export is refused")
    p.add_argument("--overwrite", action="store_true", help="write into --output even if it is not empty")
    return p


def run(args: argparse.Namespace) -> dict:
    from megatron_ext.inference.hf_export import export_to_hf, read_export_input  # start-up cost: model stack

    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ConfigError(f"--output {args.output}: exists and is not a directory (expected the model directory "
                          f"to write)")

    check_outputs([("--output", os.path.join(args.output, ""))], [args.input, args.tokenizer_model],
                  overwrite=args.overwrite)
    tokenizer = None
    if args.tokenizer_library or args.tokenizer_model:
        library = args.tokenizer_library or ("sentencepiece" if args.tokenizer_model else None)
        tokenizer = {"library": library, "model": args.tokenizer_model}
    with tempfile.TemporaryDirectory(prefix="convert_to_hf-") as tmp:
        obj = read_export_input(args.input, extract_dir=tmp, key="--input")
        if tokenizer is not None:
            from megatron_ext.inference.hf_export import resolve_tokenizer  # start-up cost: model stack

            tokenizer = resolve_tokenizer(obj, tokenizer, library_key="--tokenizer-library",
                                          model_key="--tokenizer-model")
        _quiet_transformers()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = export_to_hf(obj, args.output, arch=args.arch, tokenizer=tokenizer, dtype=args.dtype,
                                verify_text=args.verify_text, allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
    from megatron_ext.inference.hf_export import HFExportWarning  # start-up cost: model stack

    for w in caught:  # ours, one line each (megatron-core's import-time notes are left out)
        if issubclass(w.category, HFExportWarning) or "megatron_ext" in str(w.filename):
            print(f"{PROG}: warning: {w.message}", file=sys.stderr)
    info["step"] = obj.get("step")
    return info


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # export_to_hf reports the missing package
        return
    hf_logging.set_verbosity_error()
    if hasattr(hf_logging, "disable_progress_bar"):
        hf_logging.disable_progress_bar()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    rc, info = run_entry_point(PROG, run, args)
    if rc:
        return rc
    tok = info["tokenizer"] or "no"
    checked = f"{info['tokenizer_checked']} lines ({', '.join(info['tokenizer_sources'])})"
    exact = "" if not info["tokenizer"] else (f", tokenizer exact on {checked}" if not info["tokenizer_mismatches"]
                                              else f", tokenizer NOT exact on {len(info['tokenizer_mismatches'])} of "
                                                   f"{checked}")
    step = f" (step {info['step']})" if info.get("step") is not None else ""
    print(f"{PROG}: wrote {info['model_class']}{step}, {info['dtype']}, vocab {info['vocab_size']}, {tok} tokenizer"
          f"{exact} -> {info['out_dir']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

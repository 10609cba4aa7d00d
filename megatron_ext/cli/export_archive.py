"""Make a ``.mext`` archive (weights + config + tokenizer, one file) from a training run's checkpoint.

    python tools/export_archive.py --input experiments/megatron_gpt/<version> --output gpt.mext

``--input`` is a run directory (its newest complete checkpoint), its ``checkpoints`` directory or one
``checkpoints/step_N``; the checkpoint may come from any TP x PP x DP layout and ZeRO stage. The run's
``config.yaml`` and its tokenizer file are packed with the fp32 weights; nothing else is started (one process).
Restore with ``LM.restore_from("gpt.mext")`` (see ``megatron_ext/checkpoint/archive.py`` for the format).
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron_ext.errors import MegatronExtError, run_entry_point
from megatron_ext.output_files import check_outputs


PROG = "export_archive"


def run(args) -> None:
    if not os.path.isdir(args.input):
        raise MegatronExtError(f"--input {args.input}: not a directory (expected a run or checkpoint directory)")
    if not args.output.endswith(".mext"):
        raise MegatronExtError(f"--output {args.output}: an archive name must end in .mext")

    check_outputs([("--output", args.output)], [args.input], overwrite=args.overwrite)
    import json
    import tarfile

    from megatron_ext.checkpoint.loader import archive_from_checkpoint  # start-up cost: model stack

    path = archive_from_checkpoint(args.input, args.output)
    with tarfile.open(path) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))
    src = manifest["source"]
    print(f"{src['checkpoint']} (step {src['step']}, tp {src['layout'].get('tp')}, pp {src['layout'].get('pp')}, "
          f"ZeRO {src['layout'].get('zero_stage')}) -> {path}: {manifest['family']}, vocab "
          f"{manifest['vocab_size']}, {os.path.getsize(path) / 1e6:.1f} MB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="run directory, checkpoints directory or checkpoints/step_N")
    ap.add_argument("--output", required=True, help="archive to write (.mext)")
    ap.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return run_entry_point(PROG, run, ap.parse_args(argv))[0]


if __name__ == "__main__":
    sys.exit(main())

"""Score text with a trained model: perplexity (or cross entropy) as one JSON object.

    python tools/evaluate.py --model gpt.mext --input test.txt
    python tools/evaluate.py --model experiments/megatron_gpt/<version> --text "hello" --text "hi there" --per-token
    python tools/evaluate.py --model bart.mext --input pairs.jsonl --before-exp --output scores.json

``--model``: a ``.mext`` archive or a run / checkpoint directory (``LM.restore_from``). Input: ``--input FILE``
(plain text, one sequence per line, blank lines skipped; or JSONL with a ``--text-key`` field, ``text`` by default;
an encoder-decoder model needs JSONL with ``source`` and ``target``) or ``--text`` (repeatable; decoder-only
models). Sequences longer than the model's context are scored with a sliding window (``--max-length``,
``--stride``); see ``megatron_ext.inference.scoring`` for the exact definitions.

Output (stdout, and ``--output`` when given)::

    {"model": .., "family": "gpt"|"encdec"|"mega", "input": FILE or null, "num_texts": N or null,
     "metric": "perplexity"|"cross_entropy", "mean": .., "max": .., "min": .., "total_tokens": ..,
     "per_token": [[..], ..] (with --per-token; dummy value -1.0 where no prediction was made)}

``mean`` is the corpus perplexity ``exp(mean per-token CE)`` (``--before-exp``: the mean CE in nats); ``max`` /
``min`` are per-token values; a non-finite value is written as null. Bad input prints one ``evaluate: error: ...``
line and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, Optional, Sequence

from megatron_ext.errors import ConfigError, DataError, run_entry_point  # noqa: E402
from megatron_ext.output_files import check_outputs, write_error  # noqa: E402

PROG = "evaluate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description="Perplexity / cross entropy of a trained model "
                                "on text (one JSON object on stdout).")
    p.add_argument("--model", required=True, help=".mext archive, or a run / checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", default=None, help="text file (one sequence per line) or JSONL")
    src.add_argument("--text", action="append", default=None, help="a text to score (repeatable)")
    p.add_argument("--text-key", default="text", help="JSONL key holding the text (decoder-only models)")
    p.add_argument("--per-token", action="store_true", help="also output every per-token value")
    p.add_argument("--before-exp", action="store_true", help="cross entropy (nats) instead of perplexity")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--max-length", type=int, default=None,
                   help="sliding-window length (default: the model's seq_length)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: max-length // 2)")
    p.add_argument("--device", default="cpu", help="device to run on: cpu (default) or cuda[:N]")
    p.add_argument("--output", default=None, help="also write the JSON object to this file")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return p


def _finite(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) else None


def run(args: argparse.Namespace) -> Dict[str, Any]:
    if not os.path.exists(args.model):
        raise ConfigError(f"--model: '{args.model}' does not exist (expected a .mext archive or a run / checkpoint "
                          f"directory)")
    if args.input is not None and not os.path.isfile(args.input):
        raise DataError(f"--input: '{args.input}' is not a file")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 1:
        raise ConfigError(f"--max-length: expected an integer >= 1, got {args.max_length}")
    if args.stride is not None and args.stride < 1:
        raise ConfigError(f"--stride: expected an integer >= 1, got {args.stride}")
    if args.output is not None:
        out_dir = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(out_dir):
            raise ConfigError(f"--output: directory '{out_dir}' does not exist")

        check_outputs([("--output", args.output)], [args.model, args.input], overwrite=args.overwrite)
    dev = str(args.device)
    if not (dev == "cpu" or dev.startswith("cuda")):
        raise ConfigError(f"--device: expected cpu or cuda[:N], got '{dev}'")
    import torch

    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {dev}: CUDA is not available on this machine")

    from megatron_ext.inference.lm import LM  # start-up cost: model stack

    lm = LM.restore_from(args.model, map_location=dev)
    if args.text is not None and lm.family == "encdec":
        raise ConfigError("--text: an encoder-decoder model scores (source, target) pairs; pass --input with a JSONL "
                          "file of {\"source\": ..., \"target\": ...} objects")
    data = args.input if args.input is not None else list(args.text)
    kwargs = dict(per_token=args.per_token, before_exp=args.before_exp, batch_size=args.batch_size,
                  text_key=args.text_key)
    if lm.family != "encdec":
        kwargs.update(max_length=args.max_length, stride=args.stride)
    elif args.max_length is not None or args.stride is not None:
        raise ConfigError("--max-length / --stride: the sliding window is for decoder-only models")
    mean, mx, mn, total, per_tok = lm.perplexities(data, **kwargs)
    result: Dict[str, Any] = {
        "model": os.path.abspath(args.model),
        "family": lm.family,
        "input": os.path.abspath(args.input) if args.input is not None else None,
        "num_texts": len(args.text) if args.text is not None else None,
        "metric": "cross_entropy" if args.before_exp else "perplexity",
        "mean": _finite(mean),
        "max": _finite(mx),
        "min": _finite(mn),
        "total_tokens": int(total),
    }
    if args.per_token:
        result["per_token"] = [[_finite(v) for v in row] for row in per_tok.tolist()]
        result["dummy_res"] = -1.0
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    rc, result = run_entry_point(PROG, run, args)
    if rc:
        return rc
    text = json.dumps(result, allow_nan=False)
    if args.output is not None:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as exc:
            print(f"{PROG}: error: {write_error(exc, args.output, '--output', 'the result is not saved')}",
                  file=sys.stderr)
            return 2
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    # run as a script for the CPU: tell megatron_ext's package init to skip its CUDA probe (importing this module,
    # e.g. from tests, leaves the environment alone)
    _pre = argparse.ArgumentParser(add_help=False)
    _pre.add_argument("--device", default="cpu")
    if _pre.parse_known_args()[0].device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.exit(main())

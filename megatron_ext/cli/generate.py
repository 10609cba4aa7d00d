"""Generate text from a trained model (any family: GPT, Mega GPT, encoder-decoder).

    python tools/generate.py --model gpt.mext --prompt "To be" --prompt "or not" --max-new-tokens 50 \\
        --temperature 0.7 --top-p 0.9 --seed 1
    python tools/generate.py --model experiments/megatron_gpt/v0 --input prompts.txt --greedy
    python tools/generate.py --model bart.mext --prompt "a noisy source" --num-beams 4

``--model`` is a ``.mext`` archive or a run / checkpoint directory (``LM.restore_from``). Prompts come from
``--prompt`` (repeatable) and/or ``--input FILE`` (UTF-8, one prompt per line; whitespace-only lines are
skipped); for an encoder-decoder a prompt is the source text. Prompts are generated ``--batch-size`` at a time
(left-padded; every row behaves as if alone).

Output: one JSON object per prompt on stdout, in input order::

    {"prompt": "To be", "text": "...", "tokens": [...], "finish_reason": "stop" | "length"}

(``"score"`` too with ``--num-beams > 1``). The options map one to one to
``megatron_ext.inference.generation.generate``; see its docstring for their meaning.

Errors (missing model, bad option value, unreadable input, ...) print one line ``generate: error: ...`` on stderr
and exit with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import List, Optional, Sequence

from megatron_ext.errors import CheckpointError, DataError, run_entry_point

PROG = "generate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Generate text from a trained megatron_ext model "
                                                      "(one JSON line per prompt).")
    p.add_argument("--model", required=True, help=".mext archive or run / checkpoint directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--input", help="file with one prompt per line (UTF-8; whitespace-only lines skipped)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default 1)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most probable tokens")
    p.add_argument("--top-p", "--nucleus", dest="top_p", type=float, default=None,
                   help="nucleus sampling mass in (0, 1] (exclusive with --top-k)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL repetition penalty (1 = off)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default 1 = off)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search length penalty exponent")
    p.add_argument("--stop", action="append", default=None,
                   help="stop string (repeatable; default: the tokenizer's end-of-document token)")
    p.add_argument("--stop-id", action="append", type=int, default=None, help="stop token id (repeatable)")
    p.add_argument("--no-stop", action="store_true", help="never stop early: always generate --max-new-tokens")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole sequence every step (no KV cache)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    p.add_argument("--device", default="cpu", help="torch device to load the model on (default cpu)")
    return p


def read_prompts(args) -> List[str]:
    prompts = list(args.prompt)
    if args.input is not None:
        try:
            with open(args.input, "r", encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            raise DataError(f"--input {args.input}: no such file") from None
        except IsADirectoryError:
            raise DataError(f"--input {args.input}: is a directory, expected a text file") from None
        except UnicodeDecodeError as e:
            raise DataError(f"--input {args.input}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise DataError(f"--input {args.input}: cannot read ({e.strerror})") from None
        prompts.extend(line for line in lines if line.strip())
    if not prompts:
        raise DataError("no prompts: pass --prompt TEXT (repeatable) or --input FILE with one prompt per line")
    return prompts


def run(args) -> int:
    import torch  # start-up cost: torch

    from megatron_ext.inference.generation import GenerationConfig, GenerationError  # start-up cost: model stack

    if args.batch_size < 1:
        raise GenerationError(f"--batch-size={args.batch_size}: expected an integer >= 1")
    if args.no_stop and (args.stop or args.stop_id):
        raise GenerationError("--no-stop with --stop/--stop-id: pass one or the other")
    if args.seed is not None and args.seed < 0:
        raise GenerationError(f"--seed={args.seed}: expected an integer >= 0")
    stop = None
    if args.no_stop:
        stop = []
    elif args.stop or args.stop_id:
        stop = list(args.stop or []) + list(args.stop_id or [])
    # the options are checked before the model loads; the stop tokens against its tokenizer once it has
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, greedy=args.greedy,
                              top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                              num_beams=args.num_beams, length_penalty=args.length_penalty, stop_tokens=stop,
                              use_cache=not args.no_cache, output="both")
    prompts = read_prompts(args)
    if not os.path.exists(args.model):
        raise CheckpointError(f"--model {args.model}: no such file or directory (expected a .mext archive or a "
                              f"run / checkpoint directory)")
    from megatron_ext.inference.lm import LM  # start-up cost: model stack

    try:
        lm = LM.restore_from(args.model, map_location=args.device)
    except (RuntimeError, ValueError) as e:  # e.g. an unknown device string
        if isinstance(e, (CheckpointError, DataError)):
            raise
        raise CheckpointError(f"--model {args.model}: cannot load on --device {args.device}: {e}") from None
    if args.seed is not None:  # one random stream over all batches
        config = dataclasses.replace(config, generator=torch.Generator(device=lm.device).manual_seed(args.seed))
    config.for_model(lm)  # before the first batch prints anything
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        results = lm.generate(batch, config=config)
        for prompt, res in zip(batch, results):
            row = {"prompt": prompt, "text": res["text"], "tokens": res["tokens"],
                   "finish_reason": res["finish_reason"]}
            if "score" in res:
                row["score"] = res["score"]
            print(json.dumps(row, ensure_ascii=False), flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    rc, result = run_entry_point(PROG, run, args)
    return rc or result


if __name__ == "__main__":
    sys.exit(main())

"""Latent-space tools for a trained MIM / VAE (or plain) encoder-decoder checkpoint.

    python tools/latents.py encode      --ckpt RUN --text "To be, or not to be" [--sample] [--out z.pt]
    python tools/latents.py decode      --ckpt RUN --latents z.pt [--sample --temperature 0.8 --top-p 0.9]
    python tools/latents.py sample      --ckpt RUN --num 5 [--sample]
    python tools/latents.py interpolate --ckpt RUN --text "first line" --text "second line" --steps 5
    python tools/latents.py reconstruct --ckpt RUN --input heldout.txt [--max-lines 200]

``--ckpt`` is a run directory, its ``checkpoints`` directory or one ``step_N`` (tensor/pipeline parallel 1).
Output: one text per line (decode, sample, interpolate; a newline or backslash inside a text is written as ``\n`` /
``\\`` so each text stays on its line), a ``.pt`` file of latents (encode, with ``--out``) or a JSON line
(reconstruct). See megatron_ext/inference/latents.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.checkpoint.safe_load import load_untrusted  # noqa: E402
from megatron_ext.errors import MegatronExtError  # noqa: E402
from megatron_ext.output_files import check_outputs  # noqa: E402


def _line(text: str) -> str:
    """One text on one line: backslashes and newlines escaped."""
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["encode", "decode", "sample", "interpolate", "reconstruct"])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--text", action="append", default=[], help="input text (repeat for several)")
    ap.add_argument("--latents", help="a .pt file written by `encode --out`")
    ap.add_argument("--out", help="encode: write latents here (.pt)")
    ap.add_argument("--overwrite", action="store_true", help="encode: replace --out if it exists")
    ap.add_argument("--input", help="reconstruct: held-out text file, one document per line")
    ap.add_argument("--max-lines", type=int, default=200)
    ap.add_argument("--num", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--sample", action="store_true", help="decode by sampling (and encode a posterior sample)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    from megatron_ext.inference.latents import LatentTools  # start-up cost: model stack

    try:
        if args.out:
            check_outputs([("--out", args.out)], [args.ckpt, args.latents, args.input], overwrite=args.overwrite)
        if args.command == "decode":  # the input file is checked before the model is built
            if not args.latents:
                raise MegatronExtError("decode needs --latents (from `encode --out`)")
            obj = load_untrusted(args.latents, "latents file")
            if not isinstance(obj, dict) or not isinstance(obj.get("z"), torch.Tensor):
                raise MegatronExtError(f"--latents {args.latents}: expected a latents file written by `encode --out` "
                                       f"(a dict with a tensor 'z')")
        lt = LatentTools.from_checkpoint(args.ckpt)
        g = torch.Generator().manual_seed(args.seed)
        dec = dict(greedy=not args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   max_new_tokens=args.max_new_tokens, generator=g)
        if args.command == "encode":
            if not args.text:
                raise MegatronExtError("encode needs --text")
            z = lt.encode(args.text, generator=g)
            key = "z_sample" if args.sample else "z"
            if args.out:
                torch.save({"z": z[key], "mask": z["mask"], "texts": args.text}, args.out)
                print(f"wrote latents {tuple(z[key].shape)} to {args.out}")
            else:
                for i, t in enumerate(args.text):
                    v = z[key][:, i]
                    print(json.dumps({"text": t, "shape": list(v.shape), "norm": float(v.norm()),
                                      "mean": float(v.mean())}))
        elif args.command == "decode":
            for t in lt.decode(obj["z"], obj.get("mask"), **dec):
                print(_line(t))
        elif args.command == "sample":
            _, texts = lt.sample_prior(args.num, **dec)
            for t in texts:
                print(_line(t))
        elif args.command == "interpolate":
            if len(args.text) != 2:
                raise MegatronExtError("interpolate needs exactly two --text")
            for t in lt.interpolate(args.text[0], args.text[1], steps=args.steps, **dec):
                print(_line(t))
        else:
            if not args.input:
                raise MegatronExtError("reconstruct needs --input")
            if not os.path.isfile(args.input):
                raise MegatronExtError(f"--input {args.input}: no such file")
            print(json.dumps(lt.reconstruction_accuracy(args.input, max_lines=args.max_lines)))
    except MegatronExtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

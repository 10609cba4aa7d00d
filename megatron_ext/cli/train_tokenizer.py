"""Train a sentencepiece tokenizer for ``model.tokenizer.library=sentencepiece``.

    python tools/train_tokenizer.py --input corpus.txt --model-prefix tok/spm --vocab-size 8000
    python tools/train_tokenizer.py --input a.jsonl b.jsonl --input-format jsonl --json-keys text \\
        --model-prefix tok/spm --vocab-size 32000 --model-type bpe

Writes ``{prefix}.model`` and ``{prefix}.vocab`` with unk=0, bos=1, eos=2, pad=3 (so the
tokenizer has an end-of-document id and a pad id distinct from it).

``--user-defined-symbols "<mask>"`` (or ``--control-symbols "<mask>"``) reserves pieces right
after those four ids (4, 5, ...), inside ``--vocab-size``; BART pretraining then uses that piece as
its mask token instead of appending a new id after the vocabulary. User-defined symbols are also
matched in input text; control symbols never are (and decode to nothing). Default: none.

Plain-text files are streamed by sentencepiece itself (one sentence per line); JSONL files are
read line by line here and each non-blank line of each document's text is fed to the trainer
lazily. Either way sentencepiece keeps at most ``--input-sentence-size`` sentences in memory
(reservoir-sampled over the whole input), so large corpora do not have to fit in RAM.

Errors (missing input, bad JSON, vocabulary too large for the corpus, ...) print one message
and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator, List, Optional, Sequence

from megatron_ext.errors import ConfigError, DataError, run_entry_point
from megatron_ext.output_files import check_outputs
from megatron_ext.text_files import detect_format
from megatron_ext.tokenizers import SentencePieceTokenizer
from megatron_ext.tokenizers.sentencepiece_tokenizer import train_sentencepiece

PROG = "train_tokenizer"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_tokenizer.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="input file(s): text or JSONL")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--overwrite", action="store_true", help="replace PREFIX.model / PREFIX.vocab if they exist")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size (incl. specials)")
    p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    p.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="fraction of characters covered (1.0 for small alphabets, ~0.9995 for CJK)",
    )
    p.add_argument("--input-format", choices=("auto", "text", "jsonl"), default="auto")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSONL keys holding text")
    p.add_argument(
        "--input-sentence-size",
        type=int,
        default=2_000_000,
        help="max sentences kept in memory for training (sampled over the whole input)",
    )
    p.add_argument("--no-shuffle", action="store_true", help="take the first sentences, no sampling")
    p.add_argument("--byte-fallback", action="store_true", help="unknown characters -> byte pieces")
    p.add_argument("--num-threads", type=int, default=0, help="trainer threads (0 = all cores)")
    p.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")
    p.add_argument(
        "--user-defined-symbols",
        nargs="+",
        default=None,
        metavar="SYMBOL",
        help='extra pieces that are always one token, e.g. "<mask>" (ids 4, 5, ... after unk/bos/eos/pad)',
    )
    p.add_argument(
        "--control-symbols",
        nargs="+",
        default=None,
        metavar="SYMBOL",
        help='extra special pieces never produced from text, e.g. "<mask>" (ids after the user-defined ones)',
    )
    return p


def _symbol_options(args) -> dict:
    """sentencepiece trainer options for --user-defined-symbols / --control-symbols."""
    reserved = {"<unk>", "<s>", "</s>", "<pad>"}
    opts = {}
    seen = set()
    for flag, key, values in (
        ("--user-defined-symbols", "user_defined_symbols", args.user_defined_symbols),
        ("--control-symbols", "control_symbols", args.control_symbols),
    ):
        if not values:
            continue
        for v in values:
            if not v or any(c.isspace() for c in v) or "," in v:
                raise ConfigError(f"{flag}: symbol {v!r} must be non-empty, without whitespace or commas")
            if v in reserved:
                raise ConfigError(f"{flag}: {v!r} is already a special piece (unk/bos/eos/pad)")
            if v in seen:
                raise ConfigError(f"{flag}: symbol {v!r} is given more than once")
            seen.add(v)
        opts[key] = list(values)
    return opts


def iter_jsonl_sentences(paths: Sequence[str], keys: Sequence[str]) -> Iterator[str]:
    """Yield the non-blank lines of the texts under ``keys`` of every JSONL record."""
    for path in paths:
        with open(path, "r", encoding="utf-8", errors="strict") as f:
            lineno = 0
            while True:
                try:
                    line = f.readline()
                except UnicodeDecodeError:
                    raise DataError(f"{path}, line {lineno + 1}: not valid UTF-8") from None
                if not line:
                    break
                lineno += 1
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise DataError(
                        f"{path}, line {lineno}: not valid JSON ({getattr(exc, 'msg', exc)})"
                    ) from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}, line {lineno}: expected a JSON object")
                for key in keys:
                    if key not in obj:
                        raise DataError(f"{path}, line {lineno}: missing key '{key}' (--json-keys)")
                    value = obj[key]
                    if not isinstance(value, str):
                        raise DataError(
                            f"{path}, line {lineno}: key '{key}' holds a JSON "
                            f"{type(value).__name__}, expected a string"
                        )
                    for sentence in value.split("\n"):
                        if sentence.strip():
                            yield sentence


def _train(args) -> str:
    """Check the inputs and train; returns the written .model path."""
    paths: List[str] = []
    for p in args.input:
        path = os.path.abspath(os.path.expanduser(p))
        if not os.path.isfile(path):
            what = "does not exist" if not os.path.exists(path) else "is not a file"
            raise DataError(f"--input: input file '{path}' {what}")
        paths.append(path)

    check_outputs([("--model-prefix", args.model_prefix + ext) for ext in (".model", ".vocab")], paths,
                  overwrite=args.overwrite)
    if args.vocab_size < 8:
        raise ConfigError(f"--vocab-size: expected an integer >= 8, got {args.vocab_size}")
    kinds = {detect_format(p, args.input_format) == "jsonl" for p in paths}
    if len(kinds) > 1:
        raise ConfigError(
            "--input: mixes JSONL and plain-text files; pass --input-format or train on one kind"
        )
    common = dict(
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        input_sentence_size=args.input_sentence_size,
        shuffle_input_sentence=not args.no_shuffle,
        byte_fallback=args.byte_fallback,
        num_threads=args.num_threads or None,
        verbose=args.verbose,
        extra_options=_symbol_options(args) or None,
    )
    if kinds.pop():
        model = train_sentencepiece(
            args.model_prefix,
            args.vocab_size,
            sentences=iter_jsonl_sentences(paths, args.json_keys),
            **common,
        )
    else:
        model = train_sentencepiece(args.model_prefix, args.vocab_size, input_files=paths, **common)
    return model


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    rc, model = run_entry_point(PROG, _train, args)
    if rc:
        return rc

    tok = SentencePieceTokenizer(model)
    d = tok.describe()
    print(
        f"{PROG}: wrote {model} and {os.path.splitext(model)[0]}.vocab "
        f"(vocab_size={d['vocab_size']}, model_type={args.model_type}, eod={d['eod']}, "
        f"pad={d['pad']}, bos={d['bos']}, unk={d['unk']})",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

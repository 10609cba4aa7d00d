"""Merge Megatron ``.bin``/``.idx`` token datasets into one.

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document --output-prefix data/ab
    python tools/merge_datasets.py --input data/shards/ --output-prefix data/all_text_document

``--input``: dataset prefixes (the path without ``.bin``/``.idx``; a path ending in ``.bin`` or ``.idx`` is taken as
its prefix) or directories (every ``*.idx`` directly in them with its ``.bin``, sorted by name), in the order
given; the output is their documents in that order: ``{output_prefix}.bin`` and ``{output_prefix}.idx``
(Megatron-LM's naming for this tool). The ``.bin`` files are copied as they are; the index is the concatenation
of the inputs' tables, document table shifted (what megatron-core's ``IndexedDatasetBuilder.add_index`` does),
written by ``megatron_ext/indexed_files.py`` -- the code that ``tools/preprocess_data.py`` merges its shards
with, so merging its ``--per-shard`` outputs gives its merged output byte for byte. megatron-core's
``IndexedDataset`` reads the result.

Every input is checked first (``megatron_ext.indexed_files.check_dataset``: both files present, a valid MMIDIDX
header, consistent tables, a ``.bin`` of the size the ``.idx`` describes) and all must hold the same token dtype; each
problem is one error naming the file. An output that is an input is refused, an existing output is replaced only
with ``--overwrite``; the output is written under ``.tmp`` names and renamed at the end.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from megatron_ext.errors import DataError, run_entry_point
from megatron_ext.indexed_files import check_dataset, check_same_dtype, merge_into
from megatron_ext.output_files import check_outputs, write_error

PROG = "merge_datasets"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="merge_datasets.py", description="Merge Megatron .bin/.idx datasets into one "
                                "({output_prefix}.bin/.idx), in the order given.")
    p.add_argument("--input", required=True, nargs="+",
                   help="dataset prefixes (or their .bin/.idx paths) or directories of .bin/.idx pairs (sorted by name)")
    p.add_argument("--output-prefix", required=True, help="output path prefix: writes {prefix}.bin and {prefix}.idx")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    return p


def expand_prefixes(specs: Sequence[str]) -> List[str]:
    prefixes: List[str] = []
    for spec in specs:
        p = os.path.abspath(os.path.expanduser(spec))
        if os.path.isdir(p):
            names = sorted(n for n in os.listdir(p) if n.endswith(".idx") and not n.startswith("."))
            if not names:
                raise DataError(f"--input: the directory {p} holds no .idx file (expected .bin/.idx pairs)")
            prefixes.extend(os.path.join(p, n[:-4]) for n in names)
        elif p.endswith((".bin", ".idx")) and os.path.isfile(p):
            prefixes.append(p[:-4])
        else:
            prefixes.append(p)
    seen = set()
    for p in prefixes:
        real = os.path.realpath(p + ".idx")
        if real in seen:
            raise DataError(f"--input: the dataset {p} is given twice; each input may appear once")
        seen.add(real)
    return prefixes


def run(args: argparse.Namespace) -> Dict[str, Any]:
    t0 = time.perf_counter()
    prefixes = expand_prefixes(args.input)
    out = os.path.abspath(os.path.expanduser(args.output_prefix))
    bin_path, idx_path = out + ".bin", out + ".idx"
    inputs = [p + ext for p in prefixes for ext in (".bin", ".idx")]
    check_outputs([("--output-prefix", bin_path), ("--output-prefix", idx_path)], inputs,
                  overwrite=args.overwrite)
    check_outputs([("--output-prefix", bin_path + ".tmp"), ("--output-prefix", idx_path + ".tmp")], inputs,
                  overwrite_flag=None)
    indexes = [check_dataset(p, "--input") for p in prefixes]
    check_same_dtype(indexes, "--input")
    out_dir = os.path.dirname(out)
    ok = False
    try:
        os.makedirs(out_dir, exist_ok=True)
        seqs, docs, tokens = merge_into(prefixes, bin_path + ".tmp", idx_path + ".tmp", indexes)
        os.replace(bin_path + ".tmp", bin_path)
        os.replace(idx_path + ".tmp", idx_path)
        ok = True
    except OSError as exc:
        raise write_error(exc, bin_path, "--output-prefix") from None
    finally:
        if not ok:
            for p in (bin_path + ".tmp", idx_path + ".tmp"):
                if os.path.exists(p):
                    os.remove(p)
    return {"inputs": prefixes, "output": out, "datasets": len(prefixes), "sequences": seqs, "documents": docs,
            "tokens": tokens, "dtype": indexes[0].dtype.name, "bytes": os.path.getsize(bin_path),
            "seconds": time.perf_counter() - t0}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    rc, stats = run_entry_point(PROG, run, args)
    if rc:
        return rc
    print(f"{PROG}: {stats['datasets']} dataset(s), {stats['documents']} docs, {stats['tokens']} tokens "
          f"({stats['dtype']}, {stats['bytes']} bytes) in {stats['seconds']:.2f} s -> {stats['output']}.bin, "
          f"{stats['output']}.idx", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

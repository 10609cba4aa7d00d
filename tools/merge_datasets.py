#!/usr/bin/env python
"""Merge Megatron ``.bin``/``.idx`` token datasets into one.

The command line of ``megatron_ext/cli/merge_datasets.py`` (its docstring and ``python tools/merge_datasets.py --help``
describe it)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout, uninstalled

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # never uses DeepSpeed: skip the package init's CUDA probe

from megatron_ext.cli.merge_datasets import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

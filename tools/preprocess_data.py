#!/usr/bin/env python
"""Tokenize a corpus into Megatron MMIDIDX ``.bin/.idx`` datasets.

The command line of ``megatron_ext/cli/preprocess_data.py`` (its docstring and ``python tools/preprocess_data.py --help``
describe it)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout, uninstalled

# This tool never uses DeepSpeed. Telling megatron_ext's package init so skips its CUDA probe
# (an eager `import torch`, ~1.2 s); torch then comes in with megatron-core, which the main
# process imports while the worker processes are already tokenizing (see run()).
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from megatron_ext.cli.preprocess_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

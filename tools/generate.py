#!/usr/bin/env python
"""Generate text from a trained model (any family: GPT, Mega GPT, encoder-decoder).

The command line of ``megatron_ext/cli/generate.py`` (its docstring and ``python tools/generate.py --help``
describe it)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout, uninstalled

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import warnings

# megatron-core's import-time notices (no Transformer Engine / Apex) are not ours to report: stderr carries
# only this tool's one-line errors
warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")

from megatron_ext.cli.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

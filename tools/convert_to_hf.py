#!/usr/bin/env python
"""Export a trained GPT to a Hugging Face ``transformers`` model directory (weights, config, tokenizer).

The command line of ``megatron_ext/cli/convert_to_hf.py`` (its docstring and ``python tools/convert_to_hf.py --help``
describe it)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout, uninstalled

from megatron_ext.cli.convert_to_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

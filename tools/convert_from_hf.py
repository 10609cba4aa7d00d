#!/usr/bin/env python
"""Import a local Hugging Face model directory (GPT-2, Llama, Mega) as our model (.mext archive, .pt or a checkpoint).

The command line of ``megatron_ext/cli/convert_from_hf.py`` (its docstring and ``python tools/convert_from_hf.py --help``
describe it)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout, uninstalled

from megatron_ext.cli.convert_from_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Convert GPT checkpoints between parallel layouts.

The command line of ``megatron_ext/cli/convert_checkpoint.py`` (its docstring and ``python tools/convert_checkpoint.py --help``
describe it)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout, uninstalled

from megatron_ext.cli.convert_checkpoint import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

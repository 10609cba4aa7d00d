#!/usr/bin/env python
"""Score text with a trained model: perplexity (or cross entropy) as one JSON object.

The command line of ``megatron_ext/cli/evaluate.py`` (its docstring and ``python tools/evaluate.py --help``
describe it)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout, uninstalled

from megatron_ext.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

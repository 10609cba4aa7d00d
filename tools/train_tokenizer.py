#!/usr/bin/env python
"""Train a sentencepiece tokenizer for ``model.tokenizer.library=sentencepiece``.

The command line of ``megatron_ext/cli/train_tokenizer.py`` (its docstring and ``python tools/train_tokenizer.py --help``
describe it)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout, uninstalled

from megatron_ext.cli.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Make a ``.mext`` archive (weights + config + tokenizer, one file) from a training run's checkpoint.

The command line of ``megatron_ext/cli/export_archive.py`` (its docstring and ``python tools/export_archive.py --help``
describe it)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout, uninstalled

from megatron_ext.cli.export_archive import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

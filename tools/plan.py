#!/usr/bin/env python
"""Plan a run (memory, time, communication per rank) or search layouts, before launching it.

The command line of ``megatron_ext/cli/plan.py`` (its docstring and ``python tools/plan.py --help``
describe it)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout, uninstalled

from megatron_ext.cli.plan import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""The code of the command-line tools in ``tools/``: one module per tool, each with ``main(argv) -> exit status``.

``tools/<name>.py`` is a thin script that calls ``megatron_ext.cli.<name>.main``; tests and other Python code import
the module from here. These modules sit at the top of the import order (nothing in the package imports them)."""

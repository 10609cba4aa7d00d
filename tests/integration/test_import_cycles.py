"""Imports point one way: no import cycle among the package's modules (tools/import_cycles.py, which counts imports
inside functions too), and an import of the package left inside a function in the package, a tool or an entry point
says why (``# optional: ...`` for an optional dependency, ``# start-up cost: ...``). Source only: nothing imported."""
import ast
import glob
import os
import subprocess
import sys

from helpers import REPO

REASONS = ("# optional:", "# start-up cost:")


def test_the_package_has_no_import_cycle():
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "import_cycles.py")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 import cycle(s)" in r.stdout


def test_the_cycle_counter_sees_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n    return a\n")
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "import_cycles.py"), str(pkg)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "1 import cycle(s)" in r.stdout and "pkg.a pkg.b" in r.stdout


def function_level_package_imports(path: str):
    """(line, source lines of the statement) of every ``megatron_ext`` import inside a function of ``path``."""
    with open(path) as f:
        src = f.read()
    lines = src.splitlines()
    tree = ast.parse(src, filename=path)
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(sub) for sub in ast.walk(node) if sub is not node)
    for node in ast.walk(tree):
        if id(node) not in inside:
            continue
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else ["megatron_ext"]  # relative: inside the package
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        if any(n == "megatron_ext" or n.startswith("megatron_ext.") for n in names):
            yield node.lineno, lines[node.lineno - 1:node.end_lineno]


def test_every_function_level_package_import_says_why():
    files = sorted(glob.glob(os.path.join(REPO, "megatron_ext", "**", "*.py"), recursive=True)
                   + glob.glob(os.path.join(REPO, "tools", "*.py")) + glob.glob(os.path.join(REPO, "pretrain_*.py")))
    assert len(files) > 80
    bare = []
    for path in files:
        for line, text in function_level_package_imports(path):
            if not any(reason in t for t in text for reason in REASONS):
                bare.append(f"{os.path.relpath(path, REPO)}:{line}: {text[0].strip()}")
    assert not bare, "imports inside functions without '# optional: ...' / '# start-up cost: ...':\n" + "\n".join(bare)


def test_the_comment_check_finds_a_bare_function_level_import(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("import os\n\n\ndef f():\n    from megatron_ext import errors\n"
                 "    from megatron_ext.tokenizers import build_tokenizer  # start-up cost: test\n    return errors\n")
    found = list(function_level_package_imports(str(p)))
    assert [line for line, _ in found] == [5, 6]
    assert [any(r in t for t in text for r in REASONS) for _, text in found] == [False, True]

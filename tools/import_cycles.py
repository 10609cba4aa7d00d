#!/usr/bin/env python3
"""Count import cycles among the modules of a package, from the source alone (``ast``, nothing imported).

Every ``import`` counts, at module level or inside a function: an import moved into a function hides a
cycle from Python's loader but not from a reader, so it is still a cycle here. A cycle is a strongly
connected component of more than one module in the graph "module A imports module B" (``from pkg import
name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``; a package's ``__init__`` is
not counted as imported by its own submodules).

    python tools/import_cycles.py                # megatron_ext: one line per cycle, exit 1 if any
    python tools/import_cycles.py --function-level   # also list imports inside functions

Exit status: 0 no cycle, 1 cycles found, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def modules_of(root: Path) -> dict[str, Path]:
    """Map dotted module names to files for the package directory ``root``."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        mods[name] = path
    return mods


def _resolve(target: str, mods: dict[str, Path]) -> str | None:
    while target and target not in mods:
        target = target.rsplit(".", 1)[0] if "." in target else ""
    return target or None


def import_graph(mods: dict[str, Path]):
    """Return (edges, function_level): edges[m] = set of modules m imports; function_level = list of
    (module, line, imported module) for imports inside a function body."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    function_level: list[tuple[str, int, str]] = []
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        in_function: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                for sub in ast.walk(node):
                    if sub is not node:
                        in_function.add(id(sub))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base + "." + a.name for a in node.names] if base else []
                if base in mods and not any(n in mods for n in names):
                    names = [base]
            for name in names:
                target = _resolve(name, mods)
                if target is None or target == mod or mod.startswith(target + "."):
                    continue
                edges[mod].add(target)
                if id(node) in in_function:
                    function_level.append((mod, node.lineno, target))
    return edges, function_level


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return sorted(found, key=lambda c: (-len(c), c))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", nargs="?", default=str(Path(__file__).resolve().parent.parent / "megatron_ext"),
                        help="package directory (default: this checkout's megatron_ext)")
    parser.add_argument("--function-level", action="store_true", help="also list imports inside functions")
    args = parser.parse_args(argv)
    root = Path(args.package)
    if not (root / "__init__.py").is_file():
        print(f"import_cycles: {root} is not a package directory (no __init__.py)", file=sys.stderr)
        return 2
    mods = modules_of(root)
    edges, function_level = import_graph(mods)
    found = cycles(edges)
    print(f"{len(mods)} modules, {sum(len(e) for e in edges.values())} imports between them, "
          f"{len(function_level)} inside functions, {len(found)} import cycle(s)")
    for comp in found:
        print(f"cycle of {len(comp)}: " + " ".join(comp))
    if args.function_level:
        for mod, line, target in function_level:
            print(f"function-level: {mods[mod]}:{line} -> {target}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

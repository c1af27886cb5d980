"""``upreid`` has no import cycles, read statically from the source (no module is imported).

Every module under ``upreid/`` is parsed; every ``import`` and ``from ... import`` counts, at module
level or deferred inside a function, absolute or relative, plus ``importlib.import_module("name")``
with a literal name. The rules for an edge ``a -> b``:

- ``import p.q.m`` and ``from p.q.m import x``: ``a`` needs module ``p.q.m``;
- ``from p.q import m`` where ``m`` is a submodule: ``a`` needs ``p.q.m`` (not the names in
  ``p/q/__init__.py``); where ``m`` is a name bound in ``p/q/__init__.py``: ``a`` needs ``p.q``;
- where ``m`` is neither (a compiled extension such as ``upreid._C``): no edge inside the package.

The package a submodule lives in is always initialised first by Python; that implicit parent edge is
not counted, as every package that re-exports its submodules would otherwise be a cycle.
"""
from __future__ import annotations

import ast
import os
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(path: str) -> ast.Module:
    """ast.parse with SIGCHLD blocked: a Python signal handler (torch's DataLoader installs one for
    SIGCHLD) that runs while CPython 3.11 builds an AST makes it fail with "AST constructor recursion
    depth mismatch", whatever the file."""
    import signal
    with open(path, encoding="utf-8") as f:
        source = f.read()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        return ast.parse(source, filename=path)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _modules(src_root: str, package: str) -> dict:
    """{dotted name: (path, is_package)} of the .py files under ``src_root/package``."""
    mods = {}
    for folder, dirs, files in os.walk(os.path.join(src_root, package)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, f), src_root)[:-3].split(os.sep)
                is_pkg = parts[-1] == "__init__"
                mods[".".join(parts[:-1] if is_pkg else parts)] = (os.path.join(folder, f), is_pkg)
    return mods


def _bound_names(tree: ast.Module) -> set:
    """Names a module binds at its top level (what ``from pkg import name`` can take from it)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def import_graph(src_root: str, package: str) -> dict:
    """{module: {imported module: line}} for the modules of ``package`` (see the module docstring)."""
    mods = _modules(src_root, package)
    trees = {m: _parse(p) for m, (p, _) in mods.items()}
    bound = {m: _bound_names(t) for m, t in trees.items() if mods[m][1]}
    graph = {}
    for m, tree in trees.items():
        here = m if mods[m][1] else m.rpartition(".")[0]     # the package relative imports start from
        deps: dict = {}

        def need(target, node):
            if target in mods and target != m:
                deps.setdefault(target, node.lineno)

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    need(a.name, node)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    if node.level - 1 >= len(base):
                        raise ImportError(f"{mods[m][0]}:{node.lineno}: relative import beyond the top package")
                    base = base[:len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    if sub in mods:
                        need(sub, node)
                    elif src in mods and (not mods[src][1] or a.name in bound[src] or a.name == "*"):
                        need(src, node)
            elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)
                  and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
                need(node.args[0].value, node)
        graph[m] = deps
    return graph


def find_cycle(graph: dict) -> list | None:
    """One import cycle as ``[a, b, ..., a]``, or None (iterative DFS, deterministic order)."""
    state = {}                                   # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def describe(graph: dict, cycle: list) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_upreid_has_no_import_cycle():
    graph = import_graph(ROOT, "upreid")
    assert len(graph) > 50 and "upreid.ops.bank_kl" in graph          # the walk found the package
    # deferred, relative and submodule imports are all seen
    assert "upreid.data.base" in graph["upreid.data.dali_pipeline"]               # from .base import ...
    assert "upreid.data.loader" in graph["upreid.engine.finetune"]                 # inside a function
    assert "upreid.ops._lib" in graph["upreid.ops.bank_kl"]
    assert "upreid.ops" not in graph["upreid.ops.bank_kl"]            # op modules do not read the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in upreid: " + describe(graph, cycle)


def _write(root, files: dict):
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))


@pytest.mark.parametrize("case", ["deferred_relative", "package_names", "import_module"])
def test_cycles_are_found_and_named(tmp_path, case):
    files = {"pkg/__init__.py": "", "pkg/sub/__init__.py": "", "pkg/sub/c.py": "X = 1\n"}
    if case == "deferred_relative":          # a -> sub.b at top level, sub.b -> a inside a function
        files.update({"pkg/a.py": "from pkg.sub import b\n",
                      "pkg/sub/b.py": "def f():\n    from ..a import g\n    return g\n"})
        expect = "pkg.a (line 1) -> pkg.sub.b (line 2) -> pkg.a"
    elif case == "package_names":            # the package's __init__ re-exports c, and c takes a name from it
        files.update({"pkg/sub/__init__.py": "from pkg.sub.c import X\nY = 2\n",
                      "pkg/sub/c.py": "from pkg.sub import Y\nX = 1\n"})
        expect = "pkg.sub (line 1) -> pkg.sub.c (line 1) -> pkg.sub"
    else:
        files.update({"pkg/a.py": "import importlib\nimportlib.import_module('pkg.sub.c')\n",
                      "pkg/sub/c.py": "import pkg.a\n"})
        expect = "pkg.a (line 2) -> pkg.sub.c (line 1) -> pkg.a"
    _write(tmp_path, files)
    graph = import_graph(str(tmp_path), "pkg")
    cycle = find_cycle(graph)
    assert cycle is not None and describe(graph, cycle) == expect


def test_submodule_imports_from_a_package_are_not_cycles(tmp_path):
    """``from pkg.sub import c`` (a submodule) in a module that pkg.sub's __init__ imports is not a
    cycle, and neither is a compiled extension named like a submodule."""
    _write(tmp_path, {"pkg/__init__.py": "from pkg import _ext\n",
                      "pkg/sub/__init__.py": "from pkg.sub.a import A\n",
                      "pkg/sub/a.py": "from pkg.sub import c\nA = c.X\n", "pkg/sub/c.py": "X = 1\n"})
    graph = import_graph(str(tmp_path), "pkg")
    assert graph["pkg.sub.a"] == {"pkg.sub.c": 1} and graph["pkg"] == {}
    assert find_cycle(graph) is None

"""Imports run one way: the module graph of ``lambdascale`` has no cycles (issue 14, item 6).

Every ``import`` and ``from ... import`` of a ``lambdascale`` module counts, at module level and
inside functions (a deferred import is still a dependency, and a cycle is a cycle even when it is
deferred), as do ``importlib.import_module("lambdascale...")`` calls with a literal name. Imports
under ``if TYPE_CHECKING:`` do not count: they never run. Relative imports are resolved,
``from pkg import name`` is an edge to ``pkg.name`` where that is a submodule (else to ``pkg``),
and a package ``lambdascale.x`` is its ``lambdascale/x/__init__.py``. The implicit import of a
submodule's parent packages is not an edge (else every package re-exporting its modules would be
a cycle).

A failure lists every cycle: each strongly connected component of more than one module (or a
module importing itself), one cycle through it, and every import line inside it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lambdascale"


@dataclass(frozen=True)
class Edge:
    """``src`` imports ``dst``, at ``path:line``."""

    src: str
    dst: str
    path: str
    line: int


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under ``root/package``."""
    out: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, type_checking: bool = False) -> list[tuple[ast.AST, int]]:
    """Import nodes (and literal ``importlib.import_module`` calls), those under
    ``if TYPE_CHECKING:`` only with ``type_checking``."""
    found: list[tuple[ast.AST, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not type_checking:
            for child in node.orelse:  # the else branch runs
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, node.lineno))
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` or its longest prefix that is a module of the package (``a.b.Class`` -> ``a.b``)."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None


def collect_edges(root: Path, package: str, type_checking: bool = False) -> tuple[dict[str, Path], list[Edge]]:
    """Every module of ``package`` under ``root`` and every import between two of them (with
    ``type_checking``, those under ``if TYPE_CHECKING:`` too)."""
    modules = module_files(root, package)
    edges: list[Edge] = []
    seen: set[Edge] = set()
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_pkg = path.name == "__init__.py"
        rel = str(path.relative_to(root))
        targets: list[tuple[str, int]] = []
        for node, line in _imports(tree, type_checking):
            if isinstance(node, ast.Import):
                targets += [(a.name, line) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    here = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    up = node.level - 1
                    if up > len(here):
                        raise ValueError(f"{rel}:{line}: relative import beyond the top package")
                    base_parts = here[: len(here) - up] if up else here
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append((sub if a.name != "*" and sub in modules else base, line))
            else:
                assert isinstance(node, ast.Call)
                arg = node.args[0]
                assert isinstance(arg, ast.Constant)
                targets.append((str(arg.value), line))
        for name, line in targets:
            if name != package and not name.startswith(package + "."):
                continue
            dst = _known(name, modules)
            if dst is not None and Edge(mod, dst, rel, line) not in seen:
                seen.add(Edge(mod, dst, rel, line))
                edges.append(Edge(mod, dst, rel, line))
    return modules, edges


def strongly_connected(nodes: list[str], succ: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(succ.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(succ.get(w, ())))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                comps.append(sorted(comp))
    return comps


def _one_cycle(comp: list[str], succ: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside it)."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(succ.get(v, ())):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, start]
                if w in members and w not in seen:
                    seen.add(w)
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def find_cycles(modules: dict[str, Path], edges: list[Edge]) -> list[str]:
    """One human-readable report per cycle (empty when the graph runs one way)."""
    succ: dict[str, set[str]] = {}
    for e in edges:
        succ.setdefault(e.src, set()).add(e.dst)
    reports = []
    for comp in strongly_connected(sorted(modules), succ):
        if len(comp) == 1 and comp[0] not in succ.get(comp[0], set()):
            continue
        members = set(comp)
        lines = [f"  {e.path}:{e.line}: {e.src} -> {e.dst}" for e in edges if e.src in members and e.dst in members]
        cycle = " -> ".join(_one_cycle(comp, succ))
        reports.append(f"cycle among {len(comp)} module(s): {', '.join(comp)}\n  e.g. {cycle}\n" + "\n".join(lines))
    return reports


def test_lambdascale_imports_have_no_cycles() -> None:
    modules, edges = collect_edges(ROOT, PACKAGE)
    assert len(modules) > 50 and len(edges) > 100, "the walk found too little: is the package where it was?"
    cycles = find_cycles(modules, edges)
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(cycles)


def test_runtime_and_transfer_have_no_cycles_even_through_type_hints() -> None:
    """The agent and its stage host once named each other (the agent at run time, the stage host
    for its type hints): the lower module now declares the narrow interface it needs instead."""
    modules, edges = collect_edges(ROOT, PACKAGE, type_checking=True)
    mine = ("lambdascale.runtime.", "lambdascale.transfer.")
    inner = [e for e in edges if e.src.startswith(mine) and e.dst.startswith(mine)]
    cycles = find_cycles({m: p for m, p in modules.items() if m.startswith(mine)}, inner)
    assert not cycles, f"{len(cycles)} import cycle(s) counting type-only imports:\n" + "\n".join(cycles)


# ---- the checker itself, on a made-up package ----------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def _edges(root: Path) -> set[tuple[str, str]]:
    return {(e.src, e.dst) for e in collect_edges(root, "pkg")[1]}


def test_checker_counts_lazy_relative_and_submodule_imports(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from pkg.b import thing\n",  # deferred: still an edge
        "pkg/b.py": "from . import c\nfrom .sub import d\nimport os\n",
        "pkg/c.py": "import importlib\nimportlib.import_module('pkg.sub')\n",
        "pkg/sub/__init__.py": "from .. import a\n",
        "pkg/sub/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\nelse:\n    import pkg.c\n",
    })
    assert _edges(tmp_path) == {
        ("pkg.a", "pkg.b"), ("pkg.b", "pkg.c"), ("pkg.b", "pkg.sub.d"), ("pkg.c", "pkg.sub"),
        ("pkg.sub", "pkg.a"), ("pkg.sub.d", "pkg.c"),
    }


def test_checker_reports_cycles_and_self_imports_only(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import pkg.b\n",
        "pkg/b.py": "def f():\n    import pkg.a\n",
        "pkg/c.py": "import pkg.c\n",
        "pkg/d.py": "import pkg.a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.e\n",
        "pkg/e.py": "import pkg.d\n",
    })
    modules, edges = collect_edges(tmp_path, "pkg")
    cycles = find_cycles(modules, edges)
    assert len(cycles) == 2
    assert cycles[0].startswith("cycle among 2 module(s): pkg.a, pkg.b") and "pkg/b.py:2" in cycles[0]
    assert cycles[1].startswith("cycle among 1 module(s): pkg.c")


@pytest.mark.parametrize("n", [2, 3, 5])
def test_one_cycle_walks_the_ring(n: int) -> None:
    ring = [f"m{i}" for i in range(n)]
    succ = {ring[i]: {ring[(i + 1) % n]} for i in range(n)}
    assert strongly_connected(ring, succ) == [ring]
    assert _one_cycle(ring, succ) == ring + [ring[0]]

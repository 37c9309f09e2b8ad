"""Modules import one way: the import graph of `doge/` has no cycle, and library code never
imports a command module (a `python -m doge.X` / entry script), which depends on the library, not
the other way round.

The graph is read from the source with `ast`, so it counts every import: at module level, inside
functions, and under `if TYPE_CHECKING:`; an import hidden in a function still ties the two
modules together. `from doge.x import y` is an edge to `doge.x.y` when that is a module, else to
`doge.x`.
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {f"doge.{name}" for name in ("launch", "export", "plot", "upcycle", "generate", "evaluate", "demo",
                                        "train", "sft", "dpo")}


def modules(package: Path = REPO / "doge") -> dict[str, Path]:
    """Dotted name -> source file of every module in `package` (a package is its __init__.py)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(node: ast.AST, importer: str, is_package: bool, known: set[str]) -> list[str]:
    """The doge modules one import statement names (relative imports resolved against `importer`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = importer.split(".")[:len(importer.split(".")) - node.level + is_package]
        base = ".".join(package + ([base] if base else []))
    targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    return [t for t in targets if t in known]


def import_graph(found: dict[str, Path]) -> dict[str, set[str]]:
    known = set(found)
    graph = {}
    for name, path in found.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = {t for node in ast.walk(tree) for t in imported(node, name, is_package, known)} - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_graph_sees_every_kind_of_import(tmp_path):
    """The reader itself: function-level, TYPE_CHECKING and submodule imports all make edges."""
    pkg = tmp_path / "doge"
    (pkg / "sub").mkdir(parents=True)
    for name, text in {"__init__.py": "", "sub/__init__.py": "", "sub/leaf.py": "",
                       "a.py": "def f():\n    from doge.b import thing\n",
                       "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from doge import a\n",
                       "c.py": "from doge.sub import leaf\nfrom . import a\n"}.items():
        (pkg / name).write_text(text)
    graph = import_graph(modules(pkg))
    assert graph["doge.a"] == {"doge.b"} and graph["doge.b"] == {"doge.a"}
    assert graph["doge.c"] == {"doge.sub.leaf", "doge.a"}
    assert cycles(graph) == [["doge.a", "doge.b"]]


def test_no_import_cycle():
    found = cycles(import_graph(modules()))
    assert not found, f"import cycles in doge/ (move what both sides need into a lower module): {found}"


def test_library_never_imports_a_command():
    graph = import_graph(modules())
    wrong = sorted((name, target) for name, targets in graph.items() if name not in COMMANDS
                   for target in targets if target in COMMANDS)
    assert not wrong, f"library modules importing command modules (move what they need into the library): {wrong}"

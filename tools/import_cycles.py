"""Import circles among vlmux's own modules.

Reads every module under src/vlmux with `ast` (nothing is imported) and takes each `import vlmux...` and
`from vlmux... import ...` as an edge, wherever it stands: at module level or inside a function, since a lazy import
still ties the two modules together. Imports under `if TYPE_CHECKING:` are left out (they never run). An edge goes to
the most specific module named: `from vlmux.pool import vram` is an edge to vlmux.pool.vram, `from vlmux.pool import
ModelPool` to vlmux.pool.

Prints each circle (one per group of modules that reach each other) and exits 1 if there is any, else exits 0.

    python tools/import_cycles.py [SRC_ROOT]   # default: src/ beside this tools/ folder
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "vlmux"


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file for every module of the package under `root` (a package is its __init__.py)."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module `name` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                targets.add(_nearest(alias.name, known))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, name, is_package)
            if base is None:
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in known else _nearest(base, known))
    return {target for target in targets if target and target != name}


def _runtime_nodes(tree: ast.AST):
    """Every node, less the bodies of `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _absolute(node: ast.ImportFrom, name: str, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module
    package = name.split(".") if is_package else name.split(".")[:-1]
    if node.level > 1:
        package = package[: -(node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _nearest(dotted: str | None, known: set[str]) -> str:
    """The longest known module that `dotted` names or lies in ('' if it is not the package's)."""
    parts = (dotted or "").split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return ""


def graph(root: Path) -> dict[str, set[str]]:
    found = modules(root)
    known = set(found)
    return {name: imports(name, path, known) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of two or more modules (Tarjan), each as a path a -> ... -> a."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # recursion depth is bounded by the package's module count
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [_circle(group, edges) for group in sorted(groups)]


def _circle(group: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    members = set(group)
    start = group[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(edges[node] & members):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    return group  # not reached: every member of a group reaches every other


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "src"
    found = cycles(graph(root))
    for circle in found:
        print(" -> ".join(circle))
    if found:
        print(f"{len(found)} import circle(s) among {PACKAGE} modules", file=sys.stderr)
        return 1
    print(f"no import circles among {PACKAGE} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

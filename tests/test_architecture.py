"""The shape of the package (issue #19): no import cycles, no private names imported across modules, small
functions and classes, and the import picture of docs/architecture.md drawn from the code as it is.

Every ``import`` of a ``lightning_decay`` module counts, at module level, inside functions (lazy imports) and
under ``TYPE_CHECKING`` alike: a lazy import hides a cycle, it does not remove it. ``lightning_decay/__init__``
(which imports the public names of every module) is left out of the graph. Run ``python -m
tests.test_architecture`` to print the picture that docs/architecture.md must hold.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lightning_decay"
DOC = ROOT / "docs" / "architecture.md"
MAX_FUNCTION_LINES = 60  # lines of code: docstrings, comments and blank lines not counted
MAX_CLASS_LINES = 300


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import of a ``lightning_decay`` module in ``tree`` (``names`` of a ``from``)."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lightning_decay":
            if node.module == "lightning_decay":  # `from lightning_decay import kernels`: submodules
                found += [(alias.name, []) for alias in node.names]
            else:
                found.append((node.module.split(".")[1], [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name.split(".")[1], []) for a in node.names if a.name.startswith("lightning_decay.")]
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m, _ in imports(tree) if m in mods and m != name} for name, tree in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (each as the path that closes it)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def layers(edges: dict[str, set[str]]) -> list[list[str]]:
    """The modules by depth: first those that import no other, then those that import only earlier ones..."""
    placed: dict[str, int] = {}
    while len(placed) < len(edges):
        progress = False
        for node in sorted(edges):
            if node not in placed and all(d in placed for d in edges[node]):
                placed[node] = 1 + max((placed[d] for d in edges[node]), default=-1)
                progress = True
        assert progress, "a cycle: no layering"
    out: list[list[str]] = [[] for _ in range(max(placed.values()) + 1)]
    for node, depth in sorted(placed.items()):
        out[depth].append(node)
    return out


def reachable(edges: dict[str, set[str]], start: str, without: tuple[str, str]) -> set[str]:
    """The modules ``start`` imports directly or indirectly, the edge ``without`` left out."""
    seen: set[str] = set()
    stack = [b for b in edges[start] if (start, b) != without]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack += edges[node]
    return seen


def picture() -> str:
    """The import graph as a mermaid flowchart, one subgraph per depth; an edge is drawn only where no longer
    path implies it (the transitive reduction: every import the picture leaves out follows from its edges)."""
    edges = graph()
    lines = ["flowchart BT"]
    for depth, nodes in enumerate(layers(edges)):
        lines.append(f"  subgraph depth{depth} [depth {depth}]")
        lines += [f"    {n}" for n in nodes]
        lines.append("  end")
    for a in sorted(edges):
        lines += [f"  {a} --> {b}" for b in sorted(edges[a]) if b not in reachable(edges, a, (a, b))]
    return "\n".join(lines)


def code_lines(node: ast.AST, source: list[str]) -> int:
    """Lines of code of a function or class: without its docstrings, comments and blank lines."""
    doc_lines: set[int] = set()
    for sub in ast.walk(node):
        body = getattr(sub, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            doc_lines.update(range(first.lineno, first.end_lineno + 1))  # type: ignore[operator]
    count = 0
    for lineno in range(node.lineno, node.end_lineno + 1):  # type: ignore[attr-defined]
        text = source[lineno - 1].strip()
        if text and not text.startswith("#") and lineno not in doc_lines:
            count += 1
    return count


def test_no_import_cycles_among_the_modules() -> None:
    assert cycles(graph()) == []


def test_no_module_imports_another_modules_private_names() -> None:
    private = [
        f"{name} imports {module}.{n}"
        for name, tree in modules().items()
        for module, names in imports(tree)
        for n in names
        if n.startswith("_")
    ]
    assert private == []


def test_functions_and_classes_stay_small() -> None:
    too_long = []
    for path in sorted(PACKAGE.glob("*.py")):
        source = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(source))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                limit = MAX_FUNCTION_LINES
            elif isinstance(node, ast.ClassDef):
                limit = MAX_CLASS_LINES
            else:
                continue
            n = code_lines(node, source)
            if n > limit:
                too_long.append(f"{path.stem}.{node.name}: {n} lines of code (at most {limit})")
    assert too_long == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: a made-up graph with a cycle is reported as one."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_architecture_page_shows_the_imports_as_they_are() -> None:
    text = DOC.read_text()
    block = re.search(r"```mermaid\n(.*?)```", text, re.S)
    assert block is not None, "docs/architecture.md has no mermaid block"
    assert block.group(1).strip() == picture(), "regenerate it: python -m tests.test_architecture"
    for module in modules():
        assert f"`{module}`" in text, f"docs/architecture.md does not say what `{module}` owns"


if __name__ == "__main__":
    print(picture())

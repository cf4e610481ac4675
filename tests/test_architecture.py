"""The layering the architecture promises, checked on the source: the library never imports the
experiments, spdjax's module-level imports form no cycle, and spdjax hides no dependency in a
function-level import."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "spdjax").rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(path: Path, top_level: bool) -> set[str]:
    """Modules imported at module level (top_level) or inside functions (not top_level)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level else [n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_spdjax_never_imports_experiments():
    for name, path in _modules().items():
        bad = {m for m in _imports(path, True) | _imports(path, False) if m == "experiments" or m.startswith("experiments.")}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_no_deferred_spdjax_imports():
    for name, path in _modules().items():
        inner = {m for m in _imports(path, False) if m.startswith("spdjax")}
        assert not inner, f"{name} imports {sorted(inner)} inside a function"


def test_no_import_cycle():
    modules = _modules()
    graph = {n: {m for m in _imports(p, True) if m in modules and m != n} for n, p in modules.items()}
    # a package's __init__ re-exports its submodules: an edge from a submodule to its own package is not
    # a cycle through the package's code, so drop edges into ancestors of the importing module
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in graph[n]:
            if state.get(m) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(m):] + [m])}")
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])

"""The package's import structure: layers import only downward, and nothing imports in a circle.

Read from the source (ast), so it needs nothing installed. The layers, bottom first, are the module map of
docs/architecture.md; a function-level import of a bridge module is allowed only where listed in `LAZY`, with
the reason (never to dodge a circle: the circle check below sees function-level imports too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Bottom first. A module may import its own layer or any layer below it, never one above.
LAYERS: list[tuple[str, ...]] = [
    # shared leaves, written by one side and read by the other
    (
        "bridge.config",
        "bridge.errors",
        "bridge.retry",
        "bridge.record",
        "bridge.rendezvous",
        "bridge.secrets",
        "bridge.ui",
        "bridge.twins",
        "bridge.processes",
        "bridge.mlflow_internals",
        "bridge",
    ),  # the package itself: __version__, and connect() loading the client on first use
    ("bridge.client.options", "bridge.client.forksafe"),
    ("bridge.client.link",),  # Link over a Transport, discovery
    ("bridge.client.journal",),  # SQLite, intake, spool; kinds and records
    ("bridge.client.delivery",),  # the sender, the handler table, operations, marks, heartbeats
    ("bridge.client.connect", "bridge.client"),  # a process's connections: journal + link + sender
    ("bridge.client.plugins",),  # what MLflow sees: tracking, artifacts, logged models, registry, auth
    ("bridge.serve",),  # the workstation side: never imports the client
    ("bridge.yolo",),
    ("bridge.cli",),
]

#: Pairs of layers that must not see each other at all, whatever their order.
APART = [("bridge.serve", "bridge.client"), ("bridge.client", "bridge.serve")]

#: Modules that may import bridge modules inside functions, each with why (a load-time cost, never a circle:
#: the circle check counts function-level imports too).
LAZY = {
    "bridge": "`import bridge` stays cheap: connect() loads the client on first use",
    "bridge.cli": "each command loads only what it runs, so `bridge --help` answers at once",
    "bridge.yolo": "ultralytics, torch and matplotlib load only when the YOLO feature using them runs",
    "bridge.serve.supervisor": "only the tunnel kind in use is loaded (pyngrok or cloudflared), and the reaper when on",
}


def _lazy_allowed(name: str) -> bool:
    return name in LAZY or (name.rpartition(".")[0] in LAZY and name.rpartition(".")[0] != "bridge")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> list[tuple[str, bool]]:
    """(imported bridge module, whether the import is inside a function) for every import in `path`."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, nested) for alias in child.names if alias.name.split(".")[0] == "bridge")
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else [])
                    )
                if base.split(".")[0] != "bridge":
                    continue
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    found.append((full if _exists(full) else base, nested))
            visit(child, inner)

    visit(tree, False)
    return found


def _exists(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, list[tuple[str, bool]]]:
    return {_module_name(p): _imports(p, _module_name(p)) for p in sorted((ROOT / "bridge").rglob("*.py"))}


def _layer(name: str) -> int:
    best, rank = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    if rank < 0:
        raise AssertionError(f"{name} is in no layer of tests/test_layers.py: add it where it belongs")
    return rank


def test_every_module_is_in_a_layer():
    for name in _graph():
        _layer(name)


def test_imports_point_downward():
    upward = []
    for name, imports in _graph().items():
        for target, _ in imports:
            if target == name or target.startswith(name + "."):
                continue  # a package importing its own modules
            if _layer(target) > _layer(name) and not (name == "bridge" and target == "bridge.client.connect"):
                upward.append(f"{name} -> {target}")
            for a, b in APART:
                if (name == a or name.startswith(a + ".")) and (target == b or target.startswith(b + ".")):
                    upward.append(f"{name} -> {target} (the two sides never import each other)")
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_function_level_import_of_bridge_but_the_listed_ones():
    lazy = sorted(
        f"{name} -> {target}"
        for name, imports in _graph().items()
        for target, nested in imports
        if nested and not _lazy_allowed(name) and not target.startswith(name + ".")
    )
    assert not lazy, (
        "function-level imports of bridge modules (import at the top, or list in LAZY with why):\n" + "\n".join(lazy)
    )


def test_no_import_circle():
    graph = {name: {t for t, _ in imports if t != name} for name, imports in _graph().items()}
    # A package's __init__ importing its submodules is how Python loads it, not a circle of the design.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not t.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in graph:
                continue
            if state.get(target) == 1:
                circles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                walk(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("module", ["bridge.client.delivery.sender", "bridge.client.journal"])
def test_the_sender_side_never_imports_mlflow_at_the_top(module):
    """`bridge sync` and the sender load without `import mlflow` (about a second of start-up)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = ROOT.joinpath(*name.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlflow") or (
                isinstance(node, ast.Import) and any(a.name.split(".")[0] == "mlflow" for a in node.names)
            ):
                raise AssertionError(f"{name} imports mlflow at the top (reached from {module})")
        todo.extend(t for t, nested in _imports(path, name) if not nested)

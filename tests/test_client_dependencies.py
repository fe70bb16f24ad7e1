"""The Colab side runs on `mlflow-skinny`: nothing it imports needs a package only full `mlflow` (the server) brings.

Read from the sources (ast), so it runs in a second and needs no second environment: every import in the client's
modules (at any depth) and every module-level import of the MLflow modules they reach, followed through MLflow,
must be the standard library, bridge, or a package of the client's own requirements (pyproject's `dependencies`,
with the `yolo` extra for bridge/yolo) and what those require in turn. Full `mlflow` ships the same Python modules
as `mlflow-skinny`, so a module that needs SQLAlchemy, Flask, pyarrow… is found by what it imports, not by its name.
benchmarks/bench_client_install.py checks the same end to end, in a fresh environment (docs/benchmarks.md).
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
#: What a notebook imports: the shared leaves, the client, the YOLO helpers and the client's CLI commands.
CLIENT_MODULES = [
    *(f"bridge/{name}.py" for name in ("__init__", "config", "errors", "retry", "record", "secrets", "ui", "twins")),
    "bridge/mlflow_internals.py",
    "bridge/processes.py",
    "bridge/client",
    "bridge/cli/__init__.py",
    "bridge/cli/client.py",
    "bridge/cli/output.py",
]
YOLO_MODULES = ["bridge/yolo", "bridge/cli/yolo.py"]
#: MLflow imports guarded where they are made (MLflow loads them only for a feature bridge does not use).
MLFLOW_OPTIONAL: dict[str, str] = {}


def _requirements(extra: str | None) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = list(project["dependencies"])
    if extra:
        names += project["optional-dependencies"][extra]
    return names


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def _import_names(dist_name: str) -> frozenset[str]:
    """The top-level modules a distribution installs (from top_level.txt, else its file list)."""
    dist = metadata.distribution(dist_name)
    listed = dist.read_text("top_level.txt")
    if listed:
        return frozenset(line.strip() for line in listed.splitlines() if line.strip())
    names = set()
    for file in dist.files or ():
        top = file.parts[0]
        if top.endswith((".dist-info", ".data", ".pth")) or top in ("..", "__pycache__"):
            continue
        names.add(top.split(".")[0] if len(file.parts) == 1 else top)
    return frozenset(names)


def _closure(requirements: list[str]) -> set[str]:
    """The distributions `requirements` install, transitively (markers for this Python, no extras of theirs)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if _norm(req.name) == "bridge":  # bridge[serve] and friends: not part of the client
            continue
        name = _norm(req.name)
        if name in seen:
            continue
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue  # not installed here (another platform's marker): nothing to follow
        seen.add(name)
        todo.extend(Requirement(r) for r in requires)
    return seen


def _allowed(requirements: list[str]) -> set[str]:
    names = set(sys.stdlib_module_names) | {"bridge", "__future__"}
    for dist in _closure(requirements):
        names |= _import_names(dist)
    return names


def _files(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for rel in paths:
        path = ROOT / rel
        out.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return out


def _guarded(handlers: list[ast.ExceptHandler]) -> bool:
    names = {ast.unparse(h.type) for h in handlers if h.type is not None}
    return not names or bool(names & {"ImportError", "ModuleNotFoundError", "Exception"})


def _optional(node: ast.AST) -> bool:
    """An import that may fail: under `if TYPE_CHECKING:`, `try: … except ImportError:` or suppress(ImportError)."""
    if isinstance(node, ast.If):
        return "TYPE_CHECKING" in ast.unparse(node.test)
    if isinstance(node, ast.Try):
        return _guarded(node.handlers)
    if isinstance(node, ast.With):
        return any("suppress" in (text := ast.unparse(item.context_expr)) and "Error" in text for item in node.items)
    return False


def _imports(tree: ast.AST, package: str, *, module_level: bool) -> set[str]:
    """Absolute names imported in `tree`, but for optional ones (`_optional`); with `module_level`, only what runs
    at import (no function bodies)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if _optional(child):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names if _mlflow_file(f"{base}.{alias.name}"))
            visit(child)

    visit(tree)
    return found


@cache
def _mlflow_file(name: str) -> Path | None:
    if name.split(".")[0] != "mlflow":
        return None
    spec = importlib.util.find_spec("mlflow")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))).parent.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _problems(paths: list[str], requirements: list[str]) -> list[str]:
    allowed = _allowed(requirements)
    problems: list[str] = []
    todo: list[tuple[str, str]] = []  # (mlflow module, who imports it)
    for file in _files(paths):
        rel = file.relative_to(ROOT)
        package = ".".join(rel.with_suffix("").parts[:-1])
        for name in _imports(ast.parse(file.read_text()), package, module_level=False):
            top = name.split(".")[0]
            if top == "mlflow":
                todo.append((name, str(rel)))
            elif top not in allowed:
                problems.append(f"{rel} imports {name}")
    seen: set[str] = set()
    while todo:
        name, via = todo.pop()
        if name in seen or name in MLFLOW_OPTIONAL:
            continue
        seen.add(name)
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            module = ".".join(parts[:depth])
            file = _mlflow_file(module)
            if file is None or (module != name and module in seen):
                continue
            seen.add(module)
            package = module if file.name == "__init__.py" else module.rpartition(".")[0]
            for imported in _imports(ast.parse(file.read_text()), package, module_level=True):
                top = imported.split(".")[0]
                if top == "mlflow":
                    todo.append((imported, f"{module} (from {via})"))
                elif top not in allowed:
                    problems.append(f"{module} (from {via}) imports {imported} at import")
    return sorted(set(problems))


def test_the_client_needs_nothing_but_its_own_requirements():
    problems = _problems(CLIENT_MODULES, _requirements(None))
    assert not problems, "the client imports what its requirements do not bring:\n" + "\n".join(problems)


def test_the_yolo_helpers_need_nothing_but_the_yolo_extra():
    problems = _problems(YOLO_MODULES, _requirements("yolo"))
    assert not problems, "bridge/yolo imports what bridge[yolo] does not bring:\n" + "\n".join(problems)


def test_the_check_sees_a_server_only_import():
    # The MLflow server's SQL store needs SQLAlchemy, which only full `mlflow` requires.
    assert "sqlalchemy" not in _allowed(_requirements(None))
    assert "mlflow.store.tracking.sqlalchemy_store (from test) imports sqlalchemy at import" in _problems_of(
        "mlflow.store.tracking.sqlalchemy_store"
    )


def _problems_of(mlflow_module: str) -> list[str]:
    allowed = _allowed(_requirements(None))
    file = _mlflow_file(mlflow_module)
    assert file is not None
    package = mlflow_module.rpartition(".")[0]
    return [
        f"{mlflow_module} (from test) imports {name} at import"
        for name in _imports(ast.parse(file.read_text()), package, module_level=True)
        if name.split(".")[0] not in allowed and name.split(".")[0] != "mlflow"
    ]

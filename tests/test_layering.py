"""The package's import contract: the core never imports the integration rooms, and no two modules
import each other (directly or through a chain), counting imports inside functions too.

The rooms are listed in the docstring of ``hf_splitquant/__init__.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_splitquant"

#: modules (dotted, relative to the package) that form the core
CORE = ("quant", "spec", "methods", "nn", "kernels", "config", "modeling", "qat", "report", "checkpoint", "saving",
        "memory", "patterns", "version", "distillation", "speed", "recipes")
#: rooms the core must never import
OUTER = ("integrations", "calibration", "evaluation", "cli", "commands", "metrics")


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["hf_splitquant", *parts])


def imported_modules(path: Path, root: Path = PACKAGE) -> set[tuple[str, tuple[str, ...]]]:
    """Every ``hf_splitquant`` import of ``path`` as ``(module, names imported from it)``, anywhere in the
    file (functions included)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[tuple[str, tuple[str, ...]]] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update((alias.name, ()) for alias in node.names if alias.name.startswith("hf_splitquant"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("hf_splitquant"):
                continue
            found.add((target, tuple(alias.name for alias in node.names)))
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for module, names in imported_modules(path, root):
            submodules = {f"{module}.{n}" for n in names} & set(modules)  # `from . import kernels`
            targets |= submodules or {module}
        # importing `hf_splitquant.a.b` runs `hf_splitquant/a/__init__.py` first, unless the importer lives in
        # `a` itself (then `a` is already being imported). The root is left out: it re-exports the public API.
        own = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)}
        parents = {".".join(t.split(".")[:k]) for t in targets for k in range(2, t.count(".") + 1)} - own
        graph[name] = {m for m in targets | parents if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), excluding the package root,
    which re-exports everything and is imported by nothing inside the package."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def in_room(module: str, rooms: tuple[str, ...]) -> bool:
    rest = module.removeprefix("hf_splitquant.")
    return any(rest == r or rest.startswith(r + ".") for r in rooms)


def core_violations(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} imports {t}" for m, targets in sorted(graph.items()) if in_room(m, CORE)
            for t in sorted(targets) if in_room(t, OUTER) or t == "hf_splitquant"]


def test_core_imports_no_integration_room() -> None:
    assert core_violations(import_graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_checks_catch_a_violation(tmp_path: Path) -> None:
    """A deliberate violation (a core module importing the quantizer glue, which imports it back) fails both."""
    pkg = tmp_path / "hf_splitquant"
    (pkg / "integrations").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "integrations" / "__init__.py").write_text("")
    (pkg / "modeling.py").write_text("def f():\n    from .integrations.transformers import attach_quantizer\n")
    (pkg / "integrations" / "transformers.py").write_text("from ..modeling import f\n")
    graph = import_graph(pkg)
    assert core_violations(graph) == ["hf_splitquant.modeling imports hf_splitquant.integrations",
                                      "hf_splitquant.modeling imports hf_splitquant.integrations.transformers"]
    assert cycles(graph) == [["hf_splitquant.integrations.transformers", "hf_splitquant.modeling"]]


@pytest.mark.parametrize("name", ["SplitQuantHfQuantizer", "set_kernel_mode"])
def test_plumbing_is_not_exported(name: str) -> None:
    import hf_splitquant

    assert name not in hf_splitquant.__all__ and not hasattr(hf_splitquant, name)

"""The imports of dreamd/ flow one way: no module imports, directly or around a circle, one that
imports it back. Every import counts, lazy ones inside functions and TYPE_CHECKING ones too:
a circle hidden in a function is still a circle a reader has to untangle (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dreamd"


def module_files(root: Path) -> dict[str, Path]:
    out = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the dreamd modules it imports (a name imported from a module counts as that
    module; from a package, as the submodule when one has that name)."""
    mods = module_files(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, f in mods.items():
        is_package = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_package else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != root.name:
                    continue
                found = resolve(target)
                # a package and its own submodules are one house, not a circle
                if found and found != mod and not mod.startswith(found + ".") and not found.startswith(mod + "."):
                    graph[mod].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_graph_sees_lazy_imports() -> None:
    graph = import_graph(PACKAGE)
    assert len(graph) > 50
    # daemon.py imports service.control inside a method only
    assert "dreamd.service.control" in graph["dreamd.daemon"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_dreamd_has_no_import_cycles() -> None:
    found = cycles(import_graph(PACKAGE))
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_controller_is_pure() -> None:
    """The controller decides on settings and numbers: it imports neither the cycle, the run,
    nor the store (docs/architecture.md)."""
    graph = import_graph(PACKAGE)
    assert not {m for m in graph["dreamd.controller"]
                if m in ("dreamd.cycle", "dreamd.run", "dreamd.daemon") or m.startswith("dreamd.store")}


def test_evals_depend_on_the_engine_interface_not_on_a_concrete_engine() -> None:
    """Evals render and score prompts through chat.py and talk to engines/base.py's
    interface; they never import engines/hf.py or engines/vllm.py."""
    graph = import_graph(PACKAGE)
    concrete = {"dreamd.engines.hf", "dreamd.engines.vllm", "dreamd.engines.vllm_compat"}
    found = {m: sorted(graph[m] & concrete) for m in graph if m.startswith("dreamd.evals.") and graph[m] & concrete}
    assert found == {}


def test_folders_import_each_other_one_way() -> None:
    """Folder by folder (dreamd/engines/, dreamd/train/, ... and each top-level module) the
    imports flow one way too, except the one loop through the model dreamer that
    docs/architecture.md names; a new one fails here."""
    graph = import_graph(PACKAGE)

    def folder(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2]) if len(parts) > 2 else module

    edges = {(folder(a), folder(b)) for a, targets in graph.items() for b in targets if folder(a) != folder(b)}
    loops = {tuple(sorted(e)) for e in edges if (e[1], e[0]) in edges}
    assert loops == {("dreamd.dream", "dreamd.engines")}

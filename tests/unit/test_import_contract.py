"""The import contract: the pure cores never reach distributed or bokeh, and nothing imports in a cycle.

Read from the source with `ast`, so lazy imports inside functions count too: a cycle hidden in a
function body is still a cycle a reader has to hold in their head, and a pure core that imports
distributed lazily still cannot be tested without it. docs/architecture.md draws the layers.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "neuro_dask"
FORBIDDEN = ("distributed", "bokeh")

# The decisions: whole packages, and single modules of packages whose other modules are shells.
PURE_PACKAGES = ("model", "store", "trust", "ledger", "runtime", "scheduler", "protocol", "privacy")
PURE_MODULES = (
    "errors",
    "settings",
    "console",
    "volunteer.idle_policy",
    "relay.protocol",
    "relay.book",
    "volunteer.comeback",
    "volunteer.admission",
    "security.allowlist",
    "security.certs",
    "security.errors",
    "security.events",
    "security.identity",
    "security.limits",
    "security.mode",
    "security.plain_wire",
    "security.redact",
    "security.roles",
    "security.signing",
    "security.unpickle",
    "dashboard.views",
    "dashboard.feed",
    "gateway.protocol",
    "gateway.prompt_bound",
    "federated.dp",
    "federated.shamir",
    "federated.secure_aggregation",
    "client.dispatch.routes",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported_names(path: Path) -> set[str]:
    """Every absolute import in the file, at any depth, as the modules it loads: `from a import b`
    is a.b when b is a module of ours, else a."""
    known = modules()
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update(
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
            )
    return names


@cache
def imports(module: str) -> frozenset[str]:
    """The neuro_dask modules `module` imports."""
    known = modules()
    return frozenset(n for n in _imported_names(known[module]) if n in known and n != module)


@cache
def external(module: str) -> frozenset[str]:
    """Top-level third-party packages `module` imports directly."""
    return frozenset(name.split(".")[0] for name in _imported_names(modules()[module]))


def reach(module: str) -> set[str]:
    """`module` and every neuro_dask module it imports, directly or not."""
    seen, todo = {module}, [module]
    while todo:
        for nxt in imports(todo.pop()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def pure_modules() -> list[str]:
    named = {f"neuro_dask.{m}" for m in PURE_MODULES}
    packaged = {
        m for m in modules() for p in PURE_PACKAGES if m == f"neuro_dask.{p}" or m.startswith(f"neuro_dask.{p}.")
    }
    return sorted(named | packaged)


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's components with more than one node: each is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def package_of(module: str) -> str:
    """neuro_dask.client.dispatch.executor -> neuro_dask.client; top-level modules stand alone."""
    return ".".join(module.split(".")[:2])


def test_every_listed_pure_module_exists():
    missing = [m for m in PURE_MODULES if f"neuro_dask.{m}" not in modules()]
    assert not missing, f"the contract names modules that no longer exist: {missing}"


@pytest.mark.parametrize("module", pure_modules())
def test_pure_cores_reach_neither_distributed_nor_bokeh(module):
    offenders = {m: sorted(external(m) & set(FORBIDDEN)) for m in reach(module) if external(m) & set(FORBIDDEN)}
    assert not offenders, f"{module} reaches {FORBIDDEN} through {offenders}"


def test_no_module_imports_itself_through_others():
    graph = {m: set(imports(m)) - {"neuro_dask"} for m in modules()}
    assert strongly_connected(graph) == []


def test_no_two_cores_import_each_other():
    """The pure cores form layers: if scheduler/ needs trust/ then nothing of trust/ needs scheduler/.
    (Shells may import across sides; modules never import in a cycle, as the test above checks.)"""
    pure = set(pure_modules()) - {"neuro_dask"}
    graph: dict[str, set[str]] = {}
    for module in pure:
        graph.setdefault(package_of(module), set()).update(
            package_of(m) for m in imports(module) if m in pure and package_of(m) != package_of(module)
        )
    assert strongly_connected(graph) == []


def test_the_contract_sees_lazy_imports():
    """A function-level import counts: settings.py imports the trust policies inside a function."""
    assert any(m.startswith("neuro_dask.trust.") for m in imports("neuro_dask.settings"))


def test_the_cycle_finder_finds_cycles_and_only_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [{"a", "b", "c"}]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []

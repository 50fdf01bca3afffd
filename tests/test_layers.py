"""The layer rules of docs/architecture.md, read from the source: every import (at module level or in
a function) is an arrow; arrows must not form a cycle nor point the wrong way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"torch", "ray", "triton", "omegaconf", "hydra"}  # what the core may not reach, even through other modules

CORE = (
    "epd.request", "epd.lifetime", "epd.metrics", "epd.stats", "epd.config", "epd.registry", "epd.workload", "epd.images", "epd.video",
    "epd.run_result", "epd.config_checks", "epd.progress", "epd.stages", "epd.allocation",
)  # fmt: skip
ENGINE = ("epd.engine", "epd.models", "epd.kernels", "epd.cache", "epd.transfer", "epd.csrc", "epd.distributed", "epd.serve")
SIMULATOR = ("simulator",)
EXPERIMENT = (
    "epd.run", "epd.composition", "epd.experiment", "epd.compare", "epd.tracking", "epd.backends", "epd.analysis", "epd.profiling",
    "epd.serve.loadgen", "epd.serve.__main__", "epd.sweep_table", "epd.report",
)  # fmt: skip
# Model descriptions the simulator sizes its work with (configs and shapes, never a worker).
MODEL_DESCRIPTIONS = ("epd.models.family", "epd.models.runtime", "epd.models.tokenizer")


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer(module: str) -> str:
    if _within(module, EXPERIMENT):  # before ENGINE: the load generator lives in epd.serve
        return "experiment"
    for name, prefixes in (("core", CORE), ("engine", ENGINE), ("simulator", SIMULATOR)):
        if _within(module, prefixes):
            return name
    return "package"  # epd/__init__ and the like


def module_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(project module -> project modules it imports, project module -> third-party roots it imports)."""
    files = {}
    for path in [*ROOT.glob("epd/**/*.py"), *ROOT.glob("simulator/**/*.py")]:
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    edges: dict[str, set[str]] = {m: set() for m in files}
    external: dict[str, set[str]] = {m: set() for m in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                if t in files and t != name:
                    edges[name].add(t)
                elif t.split(".")[0] not in ("epd", "simulator"):
                    external[name].add(t.split(".")[0])
    return edges, external


@pytest.fixture(scope="module")
def graph():
    return module_graph()


def test_no_import_cycles(graph):
    edges, _ = graph
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n) :] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_core_reaches_neither_torch_nor_ray(graph):
    edges, external = graph
    bad = {}
    for m in edges:
        if layer(m) != "core":
            continue
        seen, todo, reached = set(), [m], set()
        while todo:
            x = todo.pop()
            if x in seen:
                continue
            seen.add(x)
            reached |= external[x] & HEAVY
            todo += edges[x]
        if reached:
            bad[m] = sorted(reached)
    assert not bad, f"core modules reaching torch/Ray: {bad}"


ALLOWED = {
    "core": {"core", "package"},
    "engine": {"core", "engine", "package"},
    "simulator": {"core", "simulator", "package"},
    "experiment": {"core", "engine", "simulator", "experiment", "package"},
    "package": {"package"},
}


def test_arrows_point_down(graph):
    edges, _ = graph
    wrong = []
    for m, targets in edges.items():
        for t in targets:
            if layer(t) in ALLOWED[layer(m)]:
                continue
            if layer(m) == "simulator" and _within(t, MODEL_DESCRIPTIONS):
                continue
            wrong.append(f"{m} ({layer(m)}) -> {t} ({layer(t)})")
    assert not wrong, "imports against the layer rules:\n" + "\n".join(sorted(wrong))


def test_the_rules_cover_every_module(graph):
    edges, _ = graph
    assert not [m for m in edges if layer(m) == "package" and m not in ("epd", "simulator")]


def test_a_forbidden_arrow_is_caught():
    """The checks themselves: a core module importing the engine, and a cycle, are both reported."""
    edges = {"epd.stages.pipeline": {"epd.engine.worker"}, "epd.engine.worker": {"epd.stages.pipeline"}}
    with pytest.raises(AssertionError, match="cycles"):
        test_no_import_cycles((edges, {m: set() for m in edges}))
    with pytest.raises(AssertionError, match="epd.stages.pipeline \\(core\\) -> epd.engine.worker"):
        test_arrows_point_down((edges, {m: set() for m in edges}))

"""The package code's import graph: every arrow points down the layers, and there is no circle.

Every import counts, including those inside functions and under `TYPE_CHECKING`: an import moved into a
function to break a circle still is a circle. docs/architecture.md draws the same layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scheduler", "producer", "worker")

# Bottom first. A module may import its own room and the rooms listed before it, never one after it.
ROOMS = (
    "scheduler",  # admission policy: pure functions, imports nothing of the project
    "worker.engine",  # engines, kernels, KV cache; knows nothing of Redis or the worker
    "producer",  # the wire protocol and its clients
    "worker.settings",  # the worker's settings; builds the EngineConfig
    "worker.observability",  # logs, counters, stats, GPU telemetry
    "worker.replies",  # reply writers and refusals
    "worker.engine_process",  # where the engine runs: inline or in its own process
    "worker.local_redis",  # Redis servers for local runs and tests
    "worker.loop",  # the consumer loop
    "worker.tools",  # command-line tools
    "worker.top",  # `python -m worker.top`
    "worker.acl",  # `python -m worker.acl`
    "worker.__main__",  # `python -m worker`
    "worker",
)


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file (`from a import b`: `a.b` if a module)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.append(submodule if submodule in modules else source)
    found = set()
    for target in targets:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = package_modules(root)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def room_of(module: str) -> int:
    """Index in ROOMS of the most specific room holding `module`."""
    best = None
    for i, room in enumerate(ROOMS):
        if (module == room or module.startswith(room + ".")) and (
            best is None or len(room) > len(ROOMS[best])
        ):
            best = i
    if best is None:
        raise AssertionError(f"{module} is in no room: add its folder to ROOMS and to docs/architecture.md")
    return best


def upward_arrows(graph: Mapping[str, Iterable[str]]) -> list[str]:
    return sorted(
        f"{source} ({ROOMS[room_of(source)]}) imports {target} ({ROOMS[room_of(target)]})"
        for source, targets in graph.items()
        for target in targets
        if room_of(target) > room_of(source)
    )


def circles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus modules importing themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_import_points_down_the_layers() -> None:
    graph = import_graph()
    # The walk sees the arrows that must exist, so an empty graph cannot pass.
    assert "worker.engine.factory" in graph["worker.engine_process.launch"]
    assert "scheduler" in graph["worker.engine.admission_queue"]
    assert upward_arrows(graph) == []


def test_the_import_graph_has_no_circle() -> None:
    assert circles(import_graph()) == []


def test_the_checks_catch_an_upward_arrow_and_a_circle() -> None:
    graph = {
        "worker.engine.paged_engine": {"worker.settings", "scheduler.policy"},
        "worker.settings": {"worker.engine.config"},
        "worker.engine.config": {"worker.engine.paged_engine"},
        "scheduler.policy": set(),
    }
    assert upward_arrows(graph) == [
        "worker.engine.paged_engine (worker.engine) imports worker.settings (worker.settings)"
    ]
    assert circles(graph) == [["worker.engine.config", "worker.engine.paged_engine", "worker.settings"]]


def test_function_level_and_relative_imports_count(tmp_path: Path) -> None:
    (tmp_path / "worker" / "engine").mkdir(parents=True)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "producer").mkdir()
    for package in ("worker", "worker/engine", "scheduler", "producer"):
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "worker" / "settings.py").write_text("")
    (tmp_path / "worker" / "engine" / "a.py").write_text("def f():\n    from worker import settings\n")
    (tmp_path / "worker" / "engine" / "b.py").write_text("from . import a\nfrom .a import f\n")
    graph = import_graph(tmp_path)
    assert graph["worker.engine.a"] == {"worker.settings"}
    assert graph["worker.engine.b"] == {"worker.engine.a"}
    assert upward_arrows(graph) == [
        "worker.engine.a (worker.engine) imports worker.settings (worker.settings)"
    ]

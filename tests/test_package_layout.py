"""The package's shape: module-level imports form a one-way graph with no cycles,
and no source file grows past 400 lines."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rlhf_jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports at module level (not inside functions: those are
    the CLI's lazy imports, which run after every module is loaded)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhf_jax"):
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]  # `from pkg import module`
            names = [m for m in submodules if m in modules] or [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found |= {name for name in names if name in modules}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def test_a_cycle_is_found_in_a_graph_that_has_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_graph_has_no_cycles():
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph = {module_name(f): imports_of(f, modules) - {module_name(f)} for f in files}
    assert sum(map(len, graph.values())) > 100  # the imports were read
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_source_file_is_over_400_lines():
    long = {str(f.relative_to(PACKAGE)): n for f in PACKAGE.rglob("*.py") if (n := len(f.read_text().splitlines())) > 400}
    assert not long, f"split these files: {long}"


def test_the_plan_imports_first_in_a_fresh_interpreter():
    """``rlhf_jax.plan``'s programs import the phases, whose runs call the plan's preflight: a
    module-level import back into the plan made ``import rlhf_jax.plan`` fail when it came
    first (a cycle through package initialisation, which the graph above does not see)."""
    import subprocess
    import sys

    for module in ("rlhf_jax.plan", "rlhf_jax.plan.preflight"):
        run = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120,
                             env={"JAX_PLATFORMS": "cpu", "PATH": ""}, cwd=PACKAGE.parent)
        assert run.returncode == 0, f"import {module}: {run.stderr[-800:]}"

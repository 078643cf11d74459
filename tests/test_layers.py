"""The architecture, checked: imports go one way through the layers, no import cycles, the
pure maths imports without the heavy libraries, functions stay short, and the trainer never
probes a reward head for optional hooks.

Every `import` counts, including those inside functions (a lazy import is still a
dependency). Run on its own: `python -m pytest tests/test_layers.py`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

LAYERS: list[tuple[str, ...]] = [
    ("rl.core",),  # errors, registry, schema, types: no project imports but each other
    # pure maths; the built-in task; the rollout backends' typed options
    ("rl.algos", "rl.tasks", "rl.rollout.backend_specs"),
    ("rl.config",),  # the typed run config
    # DeepSpeed and models, data, generation; a PRM's convention, module and step-label data
    ("rl.engine", "rl.data", "rl.rollout", "rl.prm.convention", "rl.prm.model", "rl.prm.data"),
    # a PRM's training passes, step labelers and on-policy refresh (the `prm` head's)
    ("rl.prm.fitting", "rl.prm.labelers", "rl.prm.refresh"),
    ("rewards",),  # reward functions, verifiers, reward heads
    ("rl.setup",),  # run setup shared by the pipelines
    ("rl.trainer", "rl.pav", "rl.eval"),  # the pipelines
    ("rl.prm",),  # PRM labelling and training, built on the PAV and evaluation pipelines
    ("rl.cli",),  # what launchers share
    ("launch",),
]
"""Bottom to top: a module may import its own layer's modules and any lower layer's."""

PIPELINES = ("rl.trainer", "rl.pav", "rl.eval")
"""Siblings that must not import each other (shared code goes to `rl.setup` or below)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [p for d in ("rl", "rewards", "launch") for p in (REPO / d).rglob("*.py")]
    return {module_name(p): p for p in files}


def imports_of(path: Path) -> Iterator[str]:
    """Every project module `path` imports (absolute imports of rl.*, rewards.*)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("rl", "rewards"):
                yield name


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `name` refers to (`from pkg import mod` names a module or an
    attribute of `pkg`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def layer_of(module: str) -> tuple[int, str]:
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                return index, prefix
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for name in imports_of(path):
            target = resolve(name, modules)
            if target is not None and target != module and target not in ("rl", "rewards"):
                edges[module].add(target)
    return edges


def test_imports_only_go_down_the_layers() -> None:
    bad = []
    for module, targets in graph().items():
        if module in ("rl", "rewards"):
            continue
        here, here_pkg = layer_of(module)
        for target in targets:
            there, there_pkg = layer_of(target)
            sibling_pipelines = here_pkg != there_pkg and {here_pkg, there_pkg} <= set(PIPELINES)
            if there > here or sibling_pipelines:
                bad.append(f"{module} -> {target}")
    assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_layer_check_catches_an_upward_import() -> None:
    # the check itself: an rl.algos module importing the trainer would be reported
    assert layer_of("rl.algos.credit")[0] < layer_of("rl.trainer.loop")[0]
    assert layer_of("rewards.pav")[0] > layer_of("rl.engine.value_model")[0]


def test_algos_import_without_heavy_deps() -> None:
    modules = sorted(m for m in project_modules() if m.startswith("rl.algos."))
    assert len(modules) >= 6, modules
    code = (
        f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
        "bad = [m for m in ('transformers', 'deepspeed', 'vllm', 'trl') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def function_lengths(path: Path) -> Iterator[tuple[str, int]]:
    """(name, lines without the docstring) of every function in `path`."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0]
            doc = (
                first.end_lineno - first.lineno + 1  # type: ignore[operator]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                else 0
            )
            yield node.name, node.end_lineno - node.lineno + 1 - doc  # type: ignore[operator]


@pytest.mark.parametrize("package", ["rl", "rewards"])
def test_functions_are_short(package: str) -> None:
    long = [
        f"{path.relative_to(REPO)}:{name} ({n} lines)"
        for path in sorted((REPO / package).rglob("*.py"))
        for name, n in function_lengths(path)
        if n > 60
    ]
    assert not long, "functions over 60 lines (docstring excluded):\n" + "\n".join(long)


def test_no_probing_of_reward_heads() -> None:
    hits = [
        f"{path.relative_to(REPO)}:{i}"
        for d in ("rl", "rewards", "launch")
        for path in sorted((REPO / d).rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "getattr(head" in line or "hasattr(head" in line
    ]
    assert not hits, hits

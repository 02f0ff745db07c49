"""The code's shape, checked from its own imports (grimp's graph of every module's import
statements, those inside functions included; `if TYPE_CHECKING:` imports never run and
are left out): no import cycle, and dvc.yaml lists exactly the code each stage runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "flows", "benchmarks")
# Read by the register stage as files (logged as a version's MLflow model code), not imported.
READ_AS_FILES = {"register": {"tasks/serving/classifier_model.py"}}


@pytest.fixture(scope="module")
def graph():
    import grimp

    return grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)


def cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def path_of(module: str) -> Path:
    path = REPO / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def runs_code(module: str) -> bool:
    """False for a package's __init__ holding a docstring only: importing it runs nothing."""
    body = ast.parse(path_of(module).read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def imported_when_run(graph, roots: list[str]) -> set[str]:
    """Every project module importing ``roots`` brings in: their imports, transitively, and
    each module's enclosing packages (Python runs a package's __init__ first)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += graph.find_modules_directly_imported_by(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
    return {module for module in seen if runs_code(module)}


def code_deps(stage: dict) -> set[str]:
    """dvc.yaml's deps of a stage that are this repository's code (folders expanded)."""
    files = set()
    for dep in stage["deps"]:
        path = REPO / dep
        if dep.startswith(PACKAGES) and path.is_dir():
            files |= {str(p.relative_to(REPO)) for p in path.rglob("*.py")}
        elif dep.startswith(PACKAGES):
            files.add(dep)
    return files


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    """The check above can fail: a two-module cycle is reported."""

    class Graph:
        modules = {"a", "b", "c"}
        edges = {"a": {"b"}, "b": {"a"}, "c": {"a"}}

        def find_modules_directly_imported_by(self, module):
            return self.edges[module]

    assert cycles(Graph()) == [["a", "b"]]


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", list(STAGES))
def test_dvc_yaml_lists_exactly_the_code_each_stage_runs(graph, name):
    """`python -m flows.stage NAME` imports flows/stage.py and tasks/stages/NAME.py; what
    they import, and only that, is the stage's code in dvc.yaml. So an edit reruns the
    stages that run the edited code, and no other."""
    runs = imported_when_run(graph, ["flows.stage", f"tasks.stages.{name}"])
    expected = {str(path_of(module).relative_to(REPO)) for module in runs}
    expected |= READ_AS_FILES.get(name, set())
    listed = code_deps(STAGES[name])
    assert not expected - listed, f"dvc.yaml's {name} stage misses {sorted(expected - listed)}"
    assert not listed - expected, (
        f"dvc.yaml's {name} stage lists unused {sorted(listed - expected)}"
    )


@pytest.mark.parametrize(
    ("edited", "reruns"),
    [
        ("tasks/images/register.py", {"register"}),  # the image served-model wrapper
        ("tasks/images/augment.py", {"preprocess", "train", "evaluate"}),  # DALI pipelines
        ("tasks/images/idx.py", {"data"}),  # the IDX reader
        ("tasks/models/cnn.py", {"train"}),
        ("tasks/serving/formats.py", {"export"}),
    ],
)
def test_an_edit_reruns_only_the_stages_that_run_it(edited, reruns):
    """Directly; DVC reruns the stages after them only when their outputs change."""
    assert {name for name, stage in STAGES.items() if edited in code_deps(stage)} == reruns

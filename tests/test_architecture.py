"""The shape of src/lastlayer: no import cycle (imports for types included), small modules, a short
top level, packages that say their job, and a pipeline that stays an orchestrator."""

from __future__ import annotations

import ast
import graphlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lastlayer"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(node: ast.AST) -> list[str]:
    """The lastlayer modules one import statement names (``from a import b``: ``a.b`` when that is a
    module, else ``a``)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [f"{node.module}.{alias.name}" for alias in node.names]
        names = [name if name in MODULES else node.module for name in names]
    else:
        return []
    out = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """Every module of lastlayer to those it imports anywhere (top level, functions, ``TYPE_CHECKING``)."""
    return {
        name: {dep for node in ast.walk(ast.parse(path.read_text())) for dep in imported(node)} - {name}
        for name, path in MODULES.items()
    }


def test_the_graph_reader_sees_every_kind_of_import():
    code = (
        "import lastlayer.storage\nfrom lastlayer import errors\n"
        "if TYPE_CHECKING:\n    from lastlayer.training.data import Fit\n"
    )
    found = {dep for node in ast.walk(ast.parse(code)) for dep in imported(node)}
    assert found == {"lastlayer.storage", "lastlayer.errors", "lastlayer.training.data"}


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 50 and graph["lastlayer.pipeline"]  # (the graph is read, not empty)
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
    assert order.index("lastlayer.errors") < order.index("lastlayer.pipeline")


def test_no_module_is_over_500_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in sizes.items() if n > 500} == {}


def test_the_top_level_has_at_most_12_modules_and_each_package_says_its_job_in_one_sentence():
    assert len(list(PACKAGE.glob("*.py"))) <= 12
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        first = " ".join(doc.split("\n\n")[0].split())
        assert re.fullmatch(r"[^.]+(\.[^. ][^.]*)*\.", first), f"{init.parent.name}: {first!r}"


def test_the_pipeline_lists_its_stages_in_under_400_lines():
    text = (PACKAGE / "pipeline.py").read_text()
    assert len(text.splitlines()) < 400
    stages = ast.get_docstring(ast.parse(text)) or ""
    for stage in ("check_outputs", "scan_images", "extract", "wait_for_shards", "fit", "evaluate", "write"):
        assert stage in stages

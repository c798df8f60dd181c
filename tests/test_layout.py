"""The shape of the package, kept as it was agreed: no import circle (type-only and function-level imports count too),
no function over 60 lines outside the CLI's parser table, and a Trainer that reads as the step sequence."""

from __future__ import annotations

import ast
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import superpose

ROOT = Path(superpose.__file__).parent
LONG_FUNCTIONS_ALLOWED = {("cli.py", "build_parser")}  # one table of subcommands and their flags


def _module_name(path: Path) -> str:
    parts = ("superpose", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Every intra-package import, wherever it is written (module level, ``if TYPE_CHECKING``, inside functions)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module or ""
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def test_no_import_circle_in_the_package():
    graph = _import_graph()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the walk really found the package's imports
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as e:
        raise AssertionError(f"import circle: {' -> '.join(e.args[1])}") from None


def test_the_import_walk_sees_a_circle_when_there_is_one(tmp_path, monkeypatch):
    """The check above can fail: two modules importing each other (one only for typing) are found."""
    package = tmp_path / "superpose"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import B\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", package)
    graph = _import_graph()
    assert graph["superpose.a"] == {"superpose.b"} and graph["superpose.b"] == {"superpose.a"}


def _definitions(kinds: tuple[type, ...]) -> list[tuple[str, str, int]]:
    """(file, name, lines) of every definition of these kinds in the package."""
    found = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kinds):
                found.append((str(path.relative_to(ROOT)), node.name, node.end_lineno - node.lineno + 1))
    return found


def test_no_function_over_60_lines_outside_the_cli_parser():
    functions = _definitions((ast.FunctionDef, ast.AsyncFunctionDef))
    assert len(functions) > 300
    assert [d for d in functions if d[2] > 60 and d[:2] not in LONG_FUNCTIONS_ALLOWED] == []


def test_trainer_is_a_short_step_sequence():
    [lines] = [n for f, name, n in _definitions((ast.ClassDef,)) if (f, name) == ("train/loop.py", "Trainer")]
    assert lines <= 80

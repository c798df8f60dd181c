"""The config reference (``superpose config``, docs/config.md), read from the schema's own source.

Each field's docstring in :mod:`superpose.train.config` is its meaning, so the reference cannot drift from the code;
a test keeps docs/config.md equal to what this prints.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from typing import Any

import tomli_w

from . import config as schema


def _field_docs(cls: ast.ClassDef) -> dict[str, str]:
    """Each annotated field of a class body and the string literal that follows it (its docstring), one line."""
    docs = {}
    for stmt, nxt in zip(cls.body, [*cls.body[1:], None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            literal = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
            docs[stmt.target.id] = " ".join(nxt.value.value.split()) if literal else ""
    return docs


def _default(value: Any) -> str:
    """A default as TOML writes it (an empty table as ``{}``)."""
    return "{}" if value == {} else tomli_w.dumps({"v": value}).strip()[4:]


def config_reference() -> str:
    """Every config key with its default and meaning, as Markdown, read from the dataclasses' field docstrings."""
    tree = ast.parse(inspect.getsource(schema))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    run = schema.RunConfig
    sections = [(None, run)] + [(f.name, f.default_factory) for f in dataclasses.fields(run)
                                if dataclasses.is_dataclass(f.default_factory)]
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for section, cls in sections:
        defaults = cls()
        for name, doc in _field_docs(classes[cls.__name__]).items():
            value = getattr(defaults, name)
            if dataclasses.is_dataclass(value):
                continue
            key = f"{section}.{schema.toml_key(name)}" if section else name
            lines.append(f"| `{key}` | `{_default(value)}` | {doc} |")
    return "\n".join(lines) + "\n"

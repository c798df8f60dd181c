"""Reading a run configuration: a TOML file or a raw table, command-line overrides, exclusive choices, typed.

The schema (:mod:`superpose.train.config`) says what a config is; this module turns text into it. Unknown keys and
wrong types are one-line :class:`SuperposeError` naming the key; the values are then checked by the schema's own
``validate``.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from ..errors import SuperposeError
from .config import RunConfig, toml_key

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against a field type; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp) or tp
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SuperposeError(f"{key}: expected a table, got {value!r}")
        return _from_dict(tp, value, key + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, origin) or (origin is int and isinstance(value, bool)):
        raise SuperposeError(f"{key}: expected {_type_name(origin)}, got {type(value).__name__} {value!r}")
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {toml_key(f.name): f.name for f in dataclasses.fields(cls)}  # checkpoint.async is the field async_
    unknown = sorted(set(data) - names.keys())
    if unknown:
        raise SuperposeError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    return cls(**{names[k]: _coerce(v, hints[names[k]], prefix + k) for k, v in data.items()})


def _parse_value(text: str) -> Any:
    """A command-line override value, read as a TOML value (so 3, 0.3, true, [[0.3, 4]] work), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config dict (validated afterwards like the file)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SuperposeError(f"override {item!r} is not of the form key=value")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SuperposeError(f"override {item!r}: {part} is not a table")
        node[leaf] = _parse_value(text.strip())
    return data


_CHOICES: dict[str, tuple[tuple[str, ...], ...]] = {
    "tst": (("schedule",), ("bag", "ratio")),
    "data": (("sources",), ("path",)),
    "model": (("preset",), ("config",), ("init_from",)),
}
"""Keys of a section that give the same thing in different ways: one group per source (file or overrides)."""


def _given(section: dict[str, Any], group: tuple[str, ...]) -> bool:
    return any(section.get(key, "") not in ("", [], {}) for key in group)


def _choice(section: Any, name: str, where: str) -> tuple[str, ...] | None:
    """The one group of ``name``'s exclusive keys that ``section`` gives (None if none); two are refused."""
    if not isinstance(section, dict):
        return None
    given = [group for group in _CHOICES[name] if _given(section, group)]
    if len(given) > 1:
        keys = " and ".join(f"{name}.{'/'.join(group)}" for group in given)
        raise SuperposeError(f"{keys} exclude each other; give one of them ({where})")
    return given[0] if given else None


def config_from_dict(data: dict[str, Any], overrides: list[str] = (), world_size: int = 1) -> RunConfig:
    """A validated config from a raw table and command-line overrides. Where the overrides choose one of a
    section's exclusive ways (``tst.schedule`` or ``tst.bag``/``ratio``; ``data.sources`` or ``data.path``;
    ``model.preset``, ``config`` or ``init_from``), their choice replaces the file's."""
    given = apply_overrides({}, list(overrides))
    for name, groups in _CHOICES.items():
        _choice(data.get(name), name, "in the config")
        chosen = _choice(given.get(name), name, "in the overrides")
        if chosen and isinstance(data.get(name), dict):
            dropped = {key for group in groups if group != chosen for key in group}
            data = {**data, name: {k: v for k, v in data[name].items() if k not in dropped}}
    cfg = _from_dict(RunConfig, apply_overrides(data, list(overrides)))
    cfg.validate(world_size)
    return cfg


def read_toml(path: str | Path) -> dict[str, Any]:
    """A config file's raw table; a missing or malformed file is a one-line SuperposeError."""
    path = Path(path)
    if not path.is_file():
        raise SuperposeError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SuperposeError(f"{path}: not valid TOML: {e}") from None


def load_config(path: str | Path, overrides: list[str] = (), world_size: int = 1) -> RunConfig:
    """Read a TOML config, apply overrides, validate. All problems are one-line SuperposeErrors."""
    return config_from_dict(read_toml(path), overrides, world_size)

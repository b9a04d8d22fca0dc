"""Typed configuration: dataclasses read strictly from dicts, TOML files, `--set a.b=c` overrides and
command lines.

`from_dict` rejects unknown keys and wrong types with a message naming the key and listing the valid
ones, so a typo in a TOML file or a script never passes silently. `add_arguments` declares one
command-line option per field of an options dataclass, so every option is written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration key or value that is not what the toolkit expects."""


# --- reading configs from data ------------------------------------------------------------------


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Return `value` converted to `annotation` where that is lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not of type {_type_name(annotation)}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected nothing, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {_type_name(annotation)}, got {value!r}")
    return value


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def from_dict(cls: type[C], data: Any, where: str | None = None) -> C:
    """Build dataclass `cls` from `data`, rejecting unknown keys and values of the wrong type."""
    where = where or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        default = _default_value(fields[name])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # a section given in part keeps the rest of the field's own default (e.g. a run's out_dir)
            value = {f.name: getattr(default, f.name) for f in dataclasses.fields(default) if f.init} | value
        kwargs[name] = _check_type(value, hints[name], f"{where}.{name}")
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"{where}: missing required key{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
        )
    try:
        return cls(**kwargs)
    except ConfigError as e:  # the dataclass's own checks (ranges, combinations): say where
        if str(e).startswith(where):
            raise
        raise ConfigError(f"{where}: {e}") from e


def _default_value(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-data form of a config dataclass (TOML/JSON-ready; None values dropped)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean(dataclasses.asdict(config))


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value), the value read as TOML (bare words: strings)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    path = [p.strip() for p in dotted.split(".")]
    if not all(path):
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as a path or a model name
    return path, value


def load_toml(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """Read a TOML file (None: start from nothing) and apply `--set` overrides; types are `from_dict`'s."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from e
    for assignment in overrides:
        keys, value = parse_override(assignment)
        table = data
        for key in keys[:-1]:
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {assignment}: {key!r} is not a section")
        table[keys[-1]] = value
    return data


def to_toml(sections: dict[str, dict[str, Any]]) -> str:
    """TOML text of `{section: {key: value}}` (scalars and lists of scalars), which `load_toml` reads back."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(v)  # a TOML basic string

    return "\n".join(
        f"[{name}]\n" + "".join(f"{key} = {value(v)}\n" for key, v in table.items())
        for name, table in sections.items()
    )


# --- command-line options from dataclasses --------------------------------------------------------


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    positional: bool = False,
    metavar: str | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that `add_arguments` turns into a command-line option documented by `help`."""
    metadata = {"help": help, "positional": positional, "metavar": metavar}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per field of dataclass `cls`: `--field-name VALUE` (a positional argument where the
    field says so), typed and documented by the field. Lists take several values (`--x a b`, or the
    option repeated), Literals give choices, booleans give `--flag/--no-flag`. Options left out keep the
    dataclass default: `from_args` builds `cls` strictly, so the dataclass alone decides defaults and
    validity."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        annotation = _without_none(hints[f.name])
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        if typing.get_origin(annotation) is list:  # `--x a b` and `--x a --x b` both give [a, b]
            (annotation,) = typing.get_args(annotation)
            kwargs.update(action="extend", nargs="+")
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is Literal:
            kwargs["choices"] = typing.get_args(annotation)
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {_type_name(annotation)}")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.metadata.get("positional"):
            parser.add_argument(f.name, **kwargs)
            continue
        if not required and kwargs["help"] and f.default not in (None, dataclasses.MISSING, False):
            kwargs["help"] += f" (default: {f.default})"
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, required=required, **kwargs)


def from_args(cls: type[C], args: argparse.Namespace, where: str) -> C:
    """The options dataclass `cls` from arguments declared by `add_arguments` (strictly: `from_dict`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return from_dict(cls, {k: v for k, v in vars(args).items() if k in names}, where)


def _without_none(annotation: Any) -> Any:
    """`X | None` -> X; any other annotation unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation

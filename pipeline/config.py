"""Strict YAML configs: nested dataclasses, unknown keys and wrong types are errors naming the key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tailseed.pipeline.errors import UserError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


@dataclasses.dataclass(frozen=True)
class CommandLineValue:
    """A `--set` value that YAML read as something other than a string, with the text typed: a
    string field takes the text as typed (`--set name=2024`, `--set model.revision=0123456`, which
    YAML would read as the octal number 42798, `--set dataset.materialize=` the empty string),
    any other field the parsed value."""

    value: Any
    text: str


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` (after YAML parsing) and convert where lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    union = origin in (typing.Union, types.UnionType)
    if isinstance(value, CommandLineValue):
        if tp is str:
            return value.text
        if not union or (value.value is None and type(None) in args):
            value = value.value  # a union tries each of its types with the text kept
    if tp is Any:
        return value
    if union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(
                f"{where}: expected a mapping of {_type_name(tp)} fields, got {value!r}"
            )
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise UserError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_convert(k, kt, where): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if typing.get_origin(tp) is typing.Literal:
        if value not in args:
            raise UserError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float | bool):
            raise UserError(
                f"{where}: expected a string, got {value!r} (YAML reads an unquoted {value!r} as "
                f'a {type(value).__name__}); quote it, e.g. {where.rsplit(".", 1)[-1]}: "..."'
            )
        raise UserError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"{where}: unsupported annotation {tp}")


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise UserError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(
            f"unknown config key {prefix}{unknown[0]}; known keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _convert(value, hints[name], key)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a missing required field, or a value out of range
        raise UserError(f"{where or 'config'}: {exc}") from exc
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(where)
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` strings (value parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set select.quota=20")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {part} is not a section")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise UserError(
                f"--set {item!r}: the value is not valid YAML ({first}); quote it, e.g. "
                f"--set '{key}=\"{raw}\"'"
            ) from exc
        scalar = not isinstance(value, str | list | dict)  # `key=` (empty) is None to YAML
        node[parts[-1]] = CommandLineValue(value, raw.strip()) if scalar else value
    return data


def load_yaml(path: Path) -> dict:
    """Read a YAML mapping, with errors that name the file."""
    if not path.is_file():
        raise UserError(f"config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise UserError(
            f"config {path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    except yaml.YAMLError as exc:
        raise UserError(f"config {path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise UserError(f"config {path}: expected a mapping at the top level")
    return data


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


# Field metadata that the config hash reads. A field marked NOT_HASHED changes where or how fast the
# work runs, never what it produces (resources, actor counts, the output folder). A field marked
# `hashed_unless(baseline)` was added after outputs existed: at `baseline` it reproduces the old
# behaviour and is left out of the hash, so folders made before it was added keep their hash. The
# baseline is the old behaviour, not the field's default: a default that moves away from it later
# enters the hash, and a folder written before is not resumed as if it had the new default.
NOT_HASHED = {"hashed": False}


def hashed_unless(baseline: Any) -> dict:
    """Field metadata: the field enters the config hash unless its value equals `baseline`."""
    return {"hashed": "unless_baseline", "baseline": baseline}


def hashed_dict(obj: Any) -> Any:
    """`to_dict(obj)` without the fields whose metadata keeps them out of the config hash."""
    if not dataclasses.is_dataclass(obj):
        return to_dict(obj)
    out = {}
    for f in dataclasses.fields(obj):
        rule = f.metadata.get("hashed", True)
        value = getattr(obj, f.name)
        if rule is False:
            continue
        if rule == "unless_baseline" and hashed_dict(value) == hashed_dict(f.metadata["baseline"]):
            continue
        out[f.name] = hashed_dict(value)
    return out


def config_hash(obj: Any) -> str:
    """Hash of every setting of a config tree that affects what it produces."""
    return stable_hash(hashed_dict(obj))


def stable_hash(data: Any, length: int = 16) -> str:
    """sha256 of canonical JSON: equal data gives equal hashes across runs and machines."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]

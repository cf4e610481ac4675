"""Config sections -> validated frozen dataclasses, with errors that name the field (`config.<section>.<field>`)."""

from __future__ import annotations

import dataclasses
import typing

import ml_collections


def to_dict(section, name: str) -> dict:
    if section is None:
        return {}
    if isinstance(section, ml_collections.ConfigDict):
        return section.to_dict()
    if isinstance(section, dict):
        return dict(section)
    raise TypeError(f"config.{name} must be a ConfigDict/dict, got {type(section).__name__}")


def _type_ok(value, hint) -> bool:
    """Scalar type check against a field's annotation (int for float fields is fine; bool is not int)."""
    args = typing.get_args(hint)
    if args and type(None) in args:
        if value is None:
            return True
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def dataclass_from(cls, values: dict, section: str, required: tuple[str, ...] = ()):
    """`cls(**values)` with errors naming `config.<section>`: unknown, missing or mistyped fields."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"config.{section}: unknown field(s) {unknown}; allowed: {sorted(fields)}")
    missing = sorted(set(required) - set(values))
    if missing:
        raise ValueError(f"config.{section}: missing field(s) {missing}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if not _type_ok(value, hints[name]):
            raise ValueError(
                f"config.{section}.{name} must be of type {hints[name]}, got {value!r} "
                f"({type(value).__name__})"
            )
    return cls(**values)

"""A model's config values against the types of its constructor's arguments.

A `config.json` can be valid JSON and still wrong (`"num_layers": "two"`, `"sample_size": 32.5`); diffusers
passes the values on unchecked and the failure is a TypeError or AttributeError deep inside the model's
constructor. The constructor's annotations are the schema: each value is checked against them first, and a
mismatch is one line naming the file, the key, the value and the expected type.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping


class ConfigTypeError(ValueError):
    """A config value of the wrong type (its message names the file, the key, the value and the type)."""


def _fits(value: object, expected: object) -> bool:
    if expected is typing.Any:
        return True
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:  # JSON writes 1.0 as 1
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    return True  # tuples, lists and other types: checked by the constructor itself


def _type_name(expected: object) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(expected))
    return "null" if expected is type(None) else getattr(expected, "__name__", str(expected))


def check_config_types(cls: type, config: Mapping[str, object], where: str) -> None:
    """ConfigTypeError (a ValueError) naming `where`, the key, its value and the expected type, for the first value of `config` that
    does not fit the annotation of `cls.__init__`'s argument of that name (keys it does not take are left to the
    loader: diffusers ignores `_class_name`, `_diffusers_version`, ...)."""
    hints = typing.get_type_hints(cls.__init__)
    for key, value in config.items():
        if key in hints and not _fits(value, hints[key]):
            raise ConfigTypeError(
                f"{where}: config key {key} is {value!r} ({type(value).__name__}), expected {_type_name(hints[key])}"
            )

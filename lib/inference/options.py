"""Typed options of the inference runners, built from their blocks of configs/config.yaml.

Shape-free. Every runner of test.py takes one frozen dataclass of options instead of a row of
positional arguments (sampling.SampleOptions, control.ControlOptions, reenact.ReenactOptions,
fitting.FitOptions), each defined beside its runner and built by `from_config(block, where)`
from its config block (`test.sample`, `test.control`, `test.reenact`, `test.fit`):

- every key of the block must be a field of the class (a misspelt or stale key is an error
  naming the key and the block, never silently ignored); a field the block lacks keeps its
  default, which equals the config's;
- every value must have the field's type (an int is accepted for a float; a list for a
  tuple); a nested options class (e.g. FitOptions.flame) is built from its sub-block.
Failures raise `InferenceError` (test.py prints it as one line).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lib.inference.loading import InferenceError

__all__ = ["ConfigOptions"]


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint, where: str) -> Any:
    """value checked against the type hint (int, float, bool, str, X | None, tuple[X, ...],
    a ConfigOptions class); returns it converted (int -> float, list -> tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            try:
                return _coerce(value, inner[0], where)
            except InferenceError:
                raise InferenceError(f"{where} must be {_type_name(inner[0])} or None, got "
                                     f"{value!r}") from None
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    elif isinstance(hint, type) and issubclass(hint, ConfigOptions):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return hint.from_config(value, where)
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise InferenceError(f"{where} must be {_type_name(hint)}, got {value!r}")


class ConfigOptions:
    """Base of the runners' frozen option dataclasses (module docstring). BLOCK: the
    configuration block the options come from."""

    BLOCK = "test"

    @classmethod
    def from_config(cls, block, where: str | None = None):
        """The options in `block` (a mapping or an OmegaConf DictConfig, interpolations
        resolved); where: the block's name in the configuration for messages (default: the
        class's BLOCK, e.g. 'test.fit'). Raises InferenceError on an unknown key or a value of
        the wrong type."""
        where = where or cls.BLOCK
        if isinstance(block, DictConfig):
            block = OmegaConf.to_container(block, resolve=True)
        if not isinstance(block, Mapping):
            raise InferenceError(f"{where} must be a mapping of options, got "
                                 f"{type(block).__name__}")
        hints = typing.get_type_hints(cls)
        fields = cls.field_names()
        unknown = [k for k in block if k not in fields]
        if unknown:
            raise InferenceError(
                f"{where}.{unknown[0]} is not an option of {where} ({cls.__name__} takes "
                f"{', '.join(fields)})")
        return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in block.items()})

    @classmethod
    def field_names(cls) -> list[str]:
        """The option names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

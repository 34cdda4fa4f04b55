"""One wording for the errors of the library's modules: every message starts with the file of
the module that raises it, e.g. "lib/model/query.py: chunk must be >= 1, got 0".

A module names itself once, `_err = ModuleErrors(__name__)`, then raises `_err("...")` (a
ValueError) or `_err("...", FileNotFoundError)` (any exception class taking one message), and
writes `_err.where` into warnings and log lines.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["ModuleErrors", "module_path", "finite_vector"]


def module_path(name: str) -> str:
    """A module's __name__ -> its file in the repository: 'lib.model.query' ->
    'lib/model/query.py'."""
    if not name or name.startswith("__"):
        raise ValueError(f"lib/utils/errors.py: need a module's dotted name, got {name!r}")
    return name.replace(".", "/") + ".py"


class ModuleErrors:
    """The error maker of one module. name: the module's __name__.

    Call with msg (str) and kind (exception class, ValueError by default) -> kind("<file>: msg")
    to raise; `where` is "<file>"."""

    def __init__(self, name: str):
        self.where = module_path(name)

    def __call__(self, msg: str, kind: type[Exception] = ValueError) -> Exception:
        return kind(f"{self.where}: {msg}")


def finite_vector(value, name: str, size: int, error: Callable[[str], Exception],
                  flatten: bool = False) -> np.ndarray:
    """A file's numeric field checked: value (array-like) -> float64 [size]; flatten: any shape
    of `size` values is accepted (else it must be 1-D). Raises error(message) (the caller's
    exception, which names the file) with a message naming `name`: not numeric, wrong shape or
    size, NaN or infinite values."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise error(f"{name} is not numeric ({exc})") from exc
    if flatten:
        arr = arr.reshape(-1)
    elif arr.ndim != 1:
        raise error(f"{name} has shape {arr.shape}, expected ({size},)")
    if arr.size != size:
        raise error(f"{name} has {arr.size} values, expected {size}")
    if not np.all(np.isfinite(arr)):
        raise error(f"{name} contains NaN or infinite values")
    return arr

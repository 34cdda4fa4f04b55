"""One wording for the errors of the library's modules: every message starts with the file of
the module that raises it, e.g. "lib/model/query.py: chunk must be >= 1, got 0".

A module names itself once, `_err = ModuleErrors(__name__)`, then raises `_err("...")` (a
ValueError) or `_err("...", FileNotFoundError)` (any exception class taking one message), and
writes `_err.where` into warnings and log lines.
"""
from __future__ import annotations

__all__ = ["ModuleErrors", "module_path"]


def module_path(name: str) -> str:
    """A module's __name__ -> its file in the repository: 'lib.model.query' -> 'lib/model/query.py'."""
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

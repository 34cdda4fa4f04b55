"""Atomic file writing: write under a temporary name in the target's folder, then rename.

Shape-free (no arrays or tensors here).

`atomic_path(path)` is a context manager that yields a temporary path next to `path`:

    .<stem>.tmp-<random><suffix>

- it lies in the same folder (so `os.replace` is an atomic rename on one filesystem) and the
  parent folders are created;
- it keeps `path`'s suffix, so writers that infer the format from the name keep working;
- it is made by `tempfile.mkstemp`, so it is unique across threads and processes, and it
  already exists (empty) when the block starts;
- it starts with a dot and contains `TMP_MARK`, so leftovers of a killed run are easy to
  recognise (`is_temp_name`) and to delete; preprocessing's resume step removes them.

When the block ends normally the file gets permissions 0644 (mkstemp creates 0600) and is
renamed onto `path`; when anything is raised (any BaseException, KeyboardInterrupt too) the
temporary file is removed and the exception propagates, leaving an existing `path` untouched.

`atomic_write_bytes(path, data)` and `atomic_pickle(path, obj, protocol=2)` are built on it.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from pathlib import Path

__all__ = ["TMP_MARK", "atomic_path", "atomic_write_bytes", "atomic_pickle", "is_temp_name"]

TMP_MARK = ".tmp-"
FILE_MODE = 0o644


def is_temp_name(name) -> bool:
    """True when `name` (a file name, str or PathLike; only its last part is read) has the
    form of a temporary file made by `atomic_path`: a leading dot and `TMP_MARK`."""
    base = Path(name).name
    return base.startswith(".") and TMP_MARK in base


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary Path in the folder of `path` (str or PathLike) with the same
    suffix; on success it is chmod 0644 and renamed to `path`, on any exception removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}{TMP_MARK}", suffix=path.suffix,
                                dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` (bytes-like) to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def atomic_pickle(path, obj, protocol: int = 2) -> None:
    """Pickle `obj` to `path` atomically with the given pickle protocol."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump(obj, fh, protocol=protocol)

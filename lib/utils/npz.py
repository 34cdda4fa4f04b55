"""Reading what an .npz holds from its members' headers, without reading the arrays.

Shape-free. `npz_headers(path) -> {name: (shape, dtype)}` opens the zip and parses each
member's .npy header (numpy's own header readers), so checking thousands of preprocessed
files or cache files for completeness costs a few milliseconds each; None when the file is
absent or is not a readable .npz.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

__all__ = ["npz_headers"]


def npz_headers(path) -> dict[str, tuple[tuple, np.dtype]] | None:
    """{array name: (shape, dtype)} of the .npz at `path`; None when unreadable."""
    try:
        out = {}
        with zipfile.ZipFile(Path(path)) as zf:
            for info in zf.infolist():
                with zf.open(info) as fh:
                    major, _ = np.lib.format.read_magic(fh)
                    read = (np.lib.format.read_array_header_1_0 if major == 1
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(fh)
                out[info.filename.removesuffix(".npy")] = (tuple(shape), dtype)
        return out
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None

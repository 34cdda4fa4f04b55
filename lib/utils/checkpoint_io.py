"""Reading and writing Lightning checkpoints safely.

Shape-free. Checkpoints are what people download and pass around, so no file is ever allowed
to run code on the machine that reads it (README, "Files you can trust"):

- `read_checkpoint(path)` is the one reader used by every script, bench and tool: a
  `torch.load` with `weights_only=True` (tensors, numbers, strings, lists and dicts only; a
  pickled object with a `__reduce__` payload is refused before it runs), then a check that
  the content is plain data whose only `_target_` keys (Hydra's instantiation marker) name
  one of the targets the caller allows (none by default; lib/model/checkpoint.py passes the
  project's own network builders and deformers, the allow-lists of lib/model/builders.py,
  which also builds them: never a target named in a file). Every failure raises
  `CheckpointError` naming the file.
- `last_checkpoint(output_dir)` is the one rule for a run's checkpoint path,
  `<output_dir>/checkpoints/last.ckpt`: train.py writes and resumes it, precompute.py,
  test.py and tools/demo.py read it when no `ckpt=` is given.
- `AtomicCheckpointIO` is Lightning's TorchCheckpointIO with atomic saves (temporary file in
  the same folder, then rename: a run killed while saving leaves the previous `last.ckpt`
  intact) and loads through `read_checkpoint` with its allow-list (the `resume=true` path).
  Given to the Trainer as a plugin by train.py.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from lib.utils.atomic import atomic_path

__all__ = ["AtomicCheckpointIO", "CheckpointError", "read_checkpoint", "check_plain_data",
           "last_checkpoint"]

_PLAIN = (str, int, float, bool, type(None))


def last_checkpoint(output_dir) -> Path:
    """The checkpoint a training run in `output_dir` writes (and resumes, and the other
    scripts load by default): `<output_dir>/checkpoints/last.ckpt`."""
    return Path(output_dir) / "checkpoints" / "last.ckpt"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or holds something other than plain data; the
    message names the file and what is wrong."""


def check_plain_data(value: Any, where: str, path, allowed_targets=frozenset()) -> None:
    """Raise CheckpointError unless `value` is plain data (numbers, strings, None, tensors,
    lists/tuples/dicts of those) whose only `_target_` keys name one of `allowed_targets`.
    where: the key path for the message (e.g. 'hyper_parameters.occ_network')."""
    if isinstance(value, _PLAIN) or isinstance(value, torch.Tensor):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{path}: refused: {where} has a key of type "
                                      f"{type(k).__name__}")
            if k == "_target_" and not (isinstance(v, str) and v in allowed_targets):
                raise CheckpointError(
                    f"{path}: refused: {where} names a code target (_target_: {v!r}); "
                    "checkpoints hold data only and networks are built by this project's own "
                    "builders, so this file was not made by train.py (or was altered)")
            check_plain_data(v, f"{where}.{k}", path, allowed_targets)
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain_data(v, f"{where}[{i}]", path, allowed_targets)
        return
    raise CheckpointError(f"{path}: refused: {where} holds a {type(value).__name__}, not plain "
                          "data")


def read_checkpoint(path, map_location: Any = "cpu", allowed_targets=frozenset()) -> dict:
    """Load a checkpoint file without running any code from it.

    path: a `.ckpt` / `.pt` file; map_location: as torch.load's; allowed_targets: the only
    `_target_` names the content may hold (a set of strings; empty: none at all). Returns the
    checkpoint dict (for Lightning checkpoints: `state_dict`, `hyper_parameters`, `epoch`, ...).
    Raises CheckpointError: file missing, truncated or not a torch file, a pickled object
    other than tensors and plain containers, a non-dict top level, or a `_target_` outside
    allowed_targets anywhere but in `state_dict` and the optimizer/loop states.
    """
    allowed = frozenset(allowed_targets)
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        # torch names the refused class on a line of its own ("... GLOBAL posix.system ...")
        detail = next((ln for ln in first if "global" in ln.lower()),
                      first[0] if first else "")
        raise CheckpointError(
            f"{path}: refused: it holds pickled objects other than tensors and plain data, "
            f"which could run code when loaded ({detail.strip()[:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as err:
        msg = " ".join(str(err).split()).split(". ")[0][:200]  # torch's first sentence
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, or not a file "
                              f"written by torch.save: {type(err).__name__}: {msg})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict of a Lightning checkpoint, found a "
                              f"{type(checkpoint).__name__}")
    for key, value in checkpoint.items():
        if key in ("state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks"):
            if key == "state_dict" and not isinstance(value, dict):
                raise CheckpointError(f"{path}: 'state_dict' is a {type(value).__name__}, "
                                      "not a dict of tensors")
            continue  # tensors and Lightning's own bookkeeping, never interpreted as code
        check_plain_data(value, str(key), path, allowed)
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with atomic saves and `read_checkpoint` loads (weights_only=True).
    allowed_targets: passed to read_checkpoint (the `_target_` names a checkpoint may hold)."""

    def __init__(self, allowed_targets=frozenset()):
        super().__init__()
        self.allowed_targets = frozenset(allowed_targets)

    def save_checkpoint(self, checkpoint: dict[str, Any], path,
                        storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options=storage_options)

    def load_checkpoint(self, path, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, map_location=map_location or "cpu",
                               allowed_targets=self.allowed_targets)

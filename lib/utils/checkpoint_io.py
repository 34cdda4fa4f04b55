"""Lightning checkpoints written atomically (temporary file in the same folder, then rename).

Shape-free. `AtomicCheckpointIO` is Lightning's TorchCheckpointIO whose `save_checkpoint`
writes through lib/utils/atomic.atomic_path: a run killed while saving leaves the previous
`last.ckpt` intact (and a `.last.tmp-*.ckpt` leftover at worst), never a truncated one that
`resume=true` would fail to read. Given to the Trainer as a plugin by train.py.
"""
from __future__ import annotations

from typing import Any, Optional

from pytorch_lightning.plugins.io import TorchCheckpointIO

from lib.utils.atomic import atomic_path

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with atomic saves (same files, same loading)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options=storage_options)

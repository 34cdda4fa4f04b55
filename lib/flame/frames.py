"""FlameFrames: what the FLAME server returns for B items (frames), posed and canonical.

Shape legend (docs/design.md, Shape glossary): B items, V FLAME vertices, J joints (5),
Q pose feature (36), S identity components (100), X expression components (50).

One typed object replaces the dict of tensors the server used to return. Every field is
optional (None when not computed or not needed): FLAMEServer.forward fills all of them,
FLAMEServer.canonical the canonical ones and `shape`, and tests or benchmarks build one with
just the fields the code under test reads. A reader that needs a field asks `require`, which
names what is missing.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

__all__ = ["FlameFrames"]

Tensor = torch.Tensor | None


@dataclass
class FlameFrames:
    """FLAME of B items in the scaled space (lib/flame/flame.py); every tensor has leading dim B.

    Posed (the item's parameters; moved by its scale and translation):
        verts [B, V, 3], joints [B, J, 3], tfs [B, J, 4, 4] rest -> posed joint transforms,
        pose_feature [B, Q] pose-corrective feature.
    Parameters: pose [B, 15] (global, neck, jaw, eyes axis-angles), shape [B, S] (betas),
        exp [B, X], scale [B, 1], transl [B, 3].
    Canonical (the item's shape, expression 0, pose 0 but the canonical jaw opening):
        verts_c [B, V, 3], joints_c [B, J, 3], tfs_c [B, J, 4, 4], pose_feature_c [B, Q],
        exp_c [B, X] (zeros), pose_c [B, 15].
    Shape-neutral canonical (additionally shape 0): verts_c_neutral [B, V, 3].
    """

    verts: Tensor = None
    joints: Tensor = None
    tfs: Tensor = None
    pose_feature: Tensor = None
    pose: Tensor = None
    shape: Tensor = None
    exp: Tensor = None
    scale: Tensor = None
    transl: Tensor = None
    verts_c: Tensor = None
    joints_c: Tensor = None
    tfs_c: Tensor = None
    pose_feature_c: Tensor = None
    exp_c: Tensor = None
    pose_c: Tensor = None
    verts_c_neutral: Tensor = None

    # ------------------------------------------------------------------ inspection
    def present(self) -> list:
        """Names of the fields that hold a tensor, in declaration order."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    @property
    def batch_size(self) -> int:
        """B: the leading dim of the first present field (ValueError when none is)."""
        names = self.present()
        if not names:
            raise ValueError("FlameFrames holds no tensor, so it has no batch size")
        return int(getattr(self, names[0]).shape[0])

    def require(self, *names: str, where: str = "FlameFrames") -> FlameFrames:
        """self, after checking that the fields `names` are present; ValueError naming `where`,
        the missing fields and the present ones otherwise."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"{where}: the FLAME outputs lack {missing} (have {self.present()})")
        return self

    @staticmethod
    def check(obj, where: str) -> FlameFrames:
        """obj when it is a FlameFrames; TypeError naming `where` otherwise (e.g. an old dict)."""
        if not isinstance(obj, FlameFrames):
            raise TypeError(f"{where}: expected the FLAME server's FlameFrames "
                            f"(lib/flame/frames.py), got {type(obj).__name__}")
        return obj

    # ------------------------------------------------------------------ per-field maps
    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> FlameFrames:
        """A new FlameFrames with fn applied to every present field (absent ones stay None)."""
        return replace(self, **{n: fn(getattr(self, n)) for n in self.present()})

    def index(self, idx) -> FlameFrames:
        """Every present field indexed along the batch dim: idx an int tensor [A] (items may
        repeat: -> leading dim A), a bool mask [B] or a slice. An int is kept as a length-1
        slice so that the result still has a batch dim."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return self._map(lambda v: v[idx])

    def detach(self) -> FlameFrames:
        """Every present field detached from the graph."""
        return self._map(torch.Tensor.detach)

    def to(self, *args, **kwargs) -> FlameFrames:
        """Every present field moved / cast by torch.Tensor.to(*args, **kwargs)."""
        return self._map(lambda v: v.to(*args, **kwargs))

    def expand(self, B: int, where: str = "FlameFrames") -> FlameFrames:
        """Every present field with leading dim B: a leading dim of 1 is broadcast (a view), any
        other size than B is a ValueError naming `where` and the field."""
        def one(name):
            v = getattr(self, name)
            if v.dim() == 0:
                raise ValueError(f"{where}: FLAME output '{name}' is a scalar, expected [B, ...]")
            if v.shape[0] == 1 and B != 1:
                v = v.expand(B, *v.shape[1:])
            if v.shape[0] != B:
                raise ValueError(f"{where}: FLAME output '{name}' has batch {v.shape[0]}, "
                                 f"expected {B} (or 1)")
            return v
        return replace(self, **{n: one(n) for n in self.present()})

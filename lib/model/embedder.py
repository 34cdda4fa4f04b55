"""NeRF-style positional encoding of low-dimensional coordinates.

Shape legend: B batch, N points, E encoded dimension; the input dimension `in_dim` (3 for
points) and the octave count `multires` go by their names.

`PositionalEncoding(in_dim, multires)` maps a coordinate `x` to

    [x, sin(f_0 x), cos(f_0 x), sin(f_1 x), cos(f_1 x), ..., sin(f_{m-1} x), cos(f_{m-1} x)]

with octave frequencies f_k = 2^k (k = 0..m-1, m = multires) and no factor of pi, so
`out_dim = in_dim * (1 + 2 * multires)`; `multires = 0` is the identity. The raw input
always occupies the first `in_dim` channels: networks that initialize weights
geometrically rely on this (their hidden layers zero every channel after the first `in_dim`).
Same channels and order as the original's `get_embedder(multires)` (include_input,
log-sampled frequencies 2^0..2^(multires-1), sin then cos per frequency).
"""
from __future__ import annotations

import torch
from torch import nn

from lib.utils.errors import ModuleErrors

_err = ModuleErrors(__name__)


class PositionalEncoding(nn.Module):
    """Sinusoidal encoding with `multires` octaves; the raw input is kept first.

    Args:
        in_dim: number of input channels (3 for points).
        multires: number of octaves (>= 0); 0 means identity.
    """

    def __init__(self, in_dim: int = 3, multires: int = 0):
        super().__init__()
        if in_dim < 1:
            raise _err(f"in_dim must be >= 1, got {in_dim}")
        if multires < 0:
            raise _err(f"multires must be >= 0, got {multires}")
        self.in_dim = int(in_dim)
        self.multires = int(multires)
        freqs = 2.0 ** torch.arange(self.multires, dtype=torch.float32)
        self.register_buffer("freqs", freqs, persistent=False)

    @property
    def out_dim(self) -> int:
        """E = in_dim * (1 + 2 multires)."""
        return self.in_dim * (1 + 2 * self.multires)

    @property
    def n_periodic(self) -> int:
        """Number of sinusoidal channels (E - in_dim); they follow the raw input."""
        return self.out_dim - self.in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode coordinates.

        Args:
            x: [..., in_dim] coordinates (any leading shape, e.g. [B, N, in_dim]).
        Returns:
            [..., E] encoding; channels ordered x, then (sin, cos) per octave, each in_dim wide.
        """
        if x.shape[-1] != self.in_dim:
            raise _err(
                f"expected last dimension {self.in_dim}, got {tuple(x.shape)}"
            )
        if self.multires == 0:
            return x
        freqs = self.freqs.to(dtype=x.dtype)
        xf = x.unsqueeze(-2) * freqs[:, None]  # [..., multires, in_dim]
        periodic = torch.stack([torch.sin(xf), torch.cos(xf)], dim=-2)  # [..., multires, 2, in_dim]
        periodic = periodic.reshape(*x.shape[:-1], self.n_periodic)
        return torch.cat([x, periodic], dim=-1)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, multires={self.multires}, out_dim={self.out_dim}"

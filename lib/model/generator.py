"""3D feature-volume generator (AdaIN-modulated 3D convolutions) and trilinear volume sampling.

Shape legend: B batch, N points, Z latent width (z_shape, 256), Ch channels,
Gz/Gy/Gx volume cells along z/y/x.

Generator (the original GANHead generator):
    h = lrelu(AdaIN(const, z))                         const: [1, 256, 2, 8, 8]
    every stage but the last: h = lrelu(AdaIN(conv3(up2(h)), z))
    last stage:               h = lrelu(conv3(up2(h)))   (no modulation)
with up2 a trilinear x2 upsampling with align_corners=True, conv3 a 3x3x3 convolution
(padding 1), lrelu a leaky ReLU of slope 0.01 and AdaIN(x, z) = x_hat * std(z) + mean(z),
where [mean(z) | std(z)] = Linear(z) (2 Ch outputs, the first Ch the mean) and x_hat is x
normalized per item and channel over (Gz, Gy, Gx) with the unbiased variance:
x_hat = (x - mean) / sqrt(var_unbiased + 1e-5). The predicted std is not constrained.
The constant starts at 0.002 N(0, 1); every layer keeps torch's default initialization.

Axis order (fixed): a volume is `[B, Ch, Gz, Gy, Gx]` with Gz cells along z, Gy along y
and Gx along x of the canonical space (the default output `[B, 64, 16, 64, 64]` is therefore
64 cells in x and y and 16 in z). `F.grid_sample` reads the last grid dimension as (x, y, z),
i.e. (Gx, Gy, Gz), so points are passed in their natural (x, y, z) order. A point is
normalized by the canonical bounding box to [-1, 1]^3 and sampled with
`align_corners=True` (-1 and +1 are the centres of the first and last cells, so the
cells span the box including its faces) and zero padding (the trilinear weights of
lattice points outside the box multiply 0, so features fade to 0 within one cell outside
the box and are exactly 0 beyond).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lib.utils.errors import ModuleErrors

BoxBound = float | Sequence[float] | torch.Tensor


_err = ModuleErrors(__name__)


def sample_volume(
    volume: torch.Tensor, x: torch.Tensor, bbox_min: BoxBound, bbox_max: BoxBound
) -> torch.Tensor:
    """Trilinear lookup of a feature volume at points.

    Args:
        volume: [B, Ch, Gz, Gy, Gx]; B may be 1 to share one volume.
        x: [B, N, 3] points (x, y, z) in the space of the bounding box.
        bbox_min, bbox_max: box corners, scalars, sequences of 3, [3] or [B, 3] tensors.
    Returns:
        [B, N, Ch] features; lattice points outside the box read as 0 (zero padding).
    """
    if volume.dim() != 5:
        raise _err(f"volume must be [B, Ch, Gz, Gy, Gx], got {tuple(volume.shape)}")
    if x.dim() != 3 or x.shape[-1] != 3:
        raise _err(f"x must be [B, N, 3], got {tuple(x.shape)}")
    if volume.shape[0] != x.shape[0]:
        if volume.shape[0] != 1:
            raise _err(f"batch mismatch: volume {volume.shape[0]} vs points {x.shape[0]}")
        volume = volume.expand(x.shape[0], -1, -1, -1, -1)
    lo = torch.as_tensor(bbox_min, dtype=x.dtype, device=x.device)
    hi = torch.as_tensor(bbox_max, dtype=x.dtype, device=x.device)
    lo = lo.expand(3) if lo.dim() == 0 else lo
    hi = hi.expand(3) if hi.dim() == 0 else hi
    if lo.dim() == 2:
        lo = lo[:, None, :]
    if hi.dim() == 2:
        hi = hi[:, None, :]
    if bool((hi <= lo).any()):
        raise _err("bbox_max must exceed bbox_min on every axis")
    grid = 2.0 * (x - lo) / (hi - lo) - 1.0  # [B, N, 3] in (x, y, z) = (Gx, Gy, Gz)
    out = F.grid_sample(volume.to(x.dtype), grid[:, :, None, None, :], mode="bilinear",
                        padding_mode="zeros", align_corners=True)  # [B, Ch, N, 1, 1]
    return out[:, :, :, 0, 0].transpose(1, 2)


class AdaIN3d(nn.Module):
    """Adaptive instance norm: x normalized per item and channel over (Gz, Gy, Gx) (unbiased
    variance, eps 1e-5 under the square root), then x_hat * std + mean with [mean | std]
    predicted from the style vector by one linear layer.

    Args:
        channels: Ch; style_dim: width of the style vector.
    """

    def __init__(self, channels: int, style_dim: int, eps: float = 1e-5):
        super().__init__()
        self.channels, self.eps = int(channels), float(eps)
        self.style = nn.Linear(style_dim, 2 * channels)  # weight [2 Ch, style_dim], bias [2 Ch]

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """x: [B, Ch, Gz, Gy, Gx], style: [B, style_dim] -> [B, Ch, Gz, Gy, Gx]."""
        mean, std = self.style(style).chunk(2, dim=-1)  # [B, Ch] each
        flat = x.flatten(2)  # [B, Ch, Gz*Gy*Gx]
        mu = flat.mean(dim=2)[:, :, None, None, None]
        sigma = (flat.var(dim=2, unbiased=True) + self.eps).sqrt()[:, :, None, None, None]
        return (x - mu) / sigma * std[:, :, None, None, None] + mean[:, :, None, None, None]


class Generator(nn.Module):
    """Learned constant volume, AdaIN-modulated by z, upsampled once per stage to a feature volume
    (module docstring).

    Args:
        z_dim: Z (z_shape width, 256).
        base_channels: channels of the constant volume (256).
        base_shape: (Gz, Gy, Gx) of the constant volume ((2, 8, 8)); each stage doubles it.
        channels: output channels of the upsampling stages ((128, 64, 64)); the last stage
            has no AdaIN, every earlier one has.
        bbox_min, bbox_max: canonical box used by `sample` (default [-1, 1]^3).
    """

    negative_slope = 0.01

    def __init__(
        self,
        z_dim: int = 256,
        base_channels: int = 256,
        base_shape: Sequence[int] = (2, 8, 8),
        channels: Sequence[int] = (128, 64, 64),
        bbox_min: BoxBound = (-1.0, -1.0, -1.0),
        bbox_max: BoxBound = (1.0, 1.0, 1.0),
    ):
        super().__init__()
        if len(base_shape) != 3 or len(channels) < 1:
            raise _err(f"base_shape must be (Gz, Gy, Gx) and channels non-empty, got {base_shape}, "
                       f"{channels}")
        self.z_dim, self.channels = int(z_dim), tuple(channels)
        self.base_shape = tuple(int(s) for s in base_shape)
        self.const = nn.Parameter(0.002 * torch.randn(1, base_channels, *self.base_shape))
        self.adain0 = AdaIN3d(base_channels, z_dim)
        self.convs = nn.ModuleList()
        self.adains = nn.ModuleList()  # one per stage but the last
        c_in = base_channels
        for i, c_out in enumerate(self.channels):
            self.convs.append(nn.Conv3d(c_in, c_out, kernel_size=3, padding=1))
            if i < len(self.channels) - 1:
                self.adains.append(AdaIN3d(c_out, z_dim))
            c_in = c_out
        # the box is rebuilt from the arguments, not stored in checkpoints
        for name, value in (("bbox_min", bbox_min), ("bbox_max", bbox_max)):
            box = torch.as_tensor(value, dtype=torch.float32).expand(3).clone()
            self.register_buffer(name, box, persistent=False)

    @property
    def out_channels(self) -> int:
        """Ch of the output volume (64 by default)."""
        return int(self.channels[-1])

    @property
    def out_shape(self) -> tuple[int, int, int]:
        """(Gz, Gy, Gx) of the output volume ((16, 64, 64) by default)."""
        f = 2 ** len(self.channels)
        return tuple(s * f for s in self.base_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, Z] -> volume [B, out_channels, Gz, Gy, Gx]."""
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise _err(f"z must be [B, {self.z_dim}], got {tuple(z.shape)}")
        h = self.const.expand(z.shape[0], -1, -1, -1, -1).to(z.dtype)
        h = F.leaky_relu(self.adain0(h, z), self.negative_slope)
        for i, conv in enumerate(self.convs):
            h = conv(F.interpolate(h, scale_factor=2, mode="trilinear", align_corners=True))
            if i < len(self.adains):
                h = self.adains[i](h, z)
            h = F.leaky_relu(h, self.negative_slope)
        return h

    def sample(self, volume: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
        """volume: [B, Ch, Gz, Gy, Gx], xc: [B, N, 3] canonical points -> [B, N, Ch] (box of the
        constructor)."""
        return sample_volume(volume, xc, self.bbox_min, self.bbox_max)

"""The project's single camera: orthographic, looking from +z toward -z onto [-1,1]^2.

Shape legend: H/W image rows/columns (H = W = res), N points, ... any leading dims.

Convention (fixed for the whole project; docs/design.md, Camera and views):
- the camera looks along -z; the visible surface at a pixel is the hit with the LARGEST z;
- the image covers the square [-1, 1]^2 of the xy plane, x to the right, y up;
- pixel (row i, col j) has its centre at x = -1 + (j + 0.5) * 2 / res,
  y = 1 - (i + 0.5) * 2 / res (row 0 is the top of the image).

Continuous pixel coordinates (what `project` returns) put pixel centres on integers:
pixel (row i, col j) has its centre at (col, row) = (j, i), and covers
[j - 0.5, j + 0.5) x [i - 0.5, i + 0.5).  `round(project(p))` is the pixel index of p.
No near or far clipping is applied (orthographic: every z is drawn).
"""
from __future__ import annotations

import torch

from lib.utils.errors import ModuleErrors

__all__ = ["pixel_centers", "project", "pixel_to_ndc", "check_res"]

_err = ModuleErrors(__name__)


def check_res(res) -> int:
    """Validate an image resolution (a positive int) and return it as int."""
    if isinstance(res, bool) or not isinstance(res, int) or res <= 0:
        raise _err(f"res must be a positive int, got {res!r}")
    return res


def pixel_centers(res: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """xy coordinates of the pixel centres.

    res: image size (square).
    Returns [H, W, 2]: out[i, j] = (x_j, y_i) = (-1 + (j + .5) * 2/res, 1 - (i + .5) * 2/res).
    """
    res = check_res(res)
    t = (torch.arange(res, device=device, dtype=torch.float64) + 0.5) * (2.0 / res)
    xs = (-1.0 + t).to(dtype)
    ys = (1.0 - t).to(dtype)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)


def project(points: torch.Tensor, res: int) -> torch.Tensor:
    """Continuous pixel coordinates (col, row) of 3D points (z is ignored).

    points: [..., 3] (or [..., 2]) world coordinates.
    Returns [..., 2]: (col, row) with pixel centres on integers,
    col = (x + 1) * res / 2 - 0.5, row = (1 - y) * res / 2 - 0.5.
    """
    res = check_res(res)
    if points.shape[-1] not in (2, 3):
        raise _err(
            f"project expects [..., 3] points, got {tuple(points.shape)}")
    half = 0.5 * res
    col = (points[..., 0] + 1.0) * half - 0.5
    row = (1.0 - points[..., 1]) * half - 0.5
    return torch.stack([col, row], dim=-1)


def pixel_to_ndc(pix: torch.Tensor, res: int) -> torch.Tensor:
    """Inverse of `project` on the xy plane.

    pix: [..., 2] (col, row) continuous pixel coordinates.
    Returns [..., 2] xy in the [-1, 1]^2 image square.
    """
    res = check_res(res)
    scale = 2.0 / res
    x = (pix[..., 0] + 0.5) * scale - 1.0
    y = 1.0 - (pix[..., 1] + 0.5) * scale
    return torch.stack([x, y], dim=-1)

"""Inside/outside labels of query points by the generalized winding number.

Shape legend: V vertices, F faces, N query points.

The generalized winding number w(p) of a triangle soup is the sum over faces of the signed
solid angle the face subtends at p, divided by 4*pi. For a closed, outward-oriented surface
it is 1 inside and 0 outside; for an open surface (a scan with an open neck or holes) it
varies smoothly across the openings, and thresholding at 1/2 fills them the way one
would by hand (Jacobson et al. 2013). Ray-parity tests, by contrast, break on any hole.
libigl's `fast_winding_number` (Barnes-Hut tree, Barill et al. 2018) evaluates it in
O(N log F); `winding_number_exact` is a float64 numpy reference for tests and tiny meshes.
"""
from __future__ import annotations

import numpy as np

INSIDE_THRESHOLD = 0.5


def winding_number(verts, faces, points) -> np.ndarray:
    """Fast (approximate, tree-based) generalized winding number.
    verts: [V, 3]; faces: [F, 3] int; points: [N, 3] -> [N] float64."""
    import igl

    v = np.ascontiguousarray(verts, dtype=np.float64)
    f = np.ascontiguousarray(faces, dtype=np.int64)
    q = np.ascontiguousarray(points, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"winding_number: verts must be [V,3] and faces [F,3], "
                         f"got {v.shape} and {f.shape}")
    if q.ndim != 2 or q.shape[1] != 3:
        raise ValueError(f"winding_number: points must be [N,3], got {q.shape}")
    if len(f) == 0:
        return np.zeros(len(q))
    if len(q) == 0:
        return np.zeros(0)
    return np.asarray(igl.fast_winding_number(v, f, q), dtype=np.float64)


def winding_number_exact(verts, faces, points, chunk: int = 4096) -> np.ndarray:
    """Exact generalized winding number (Van Oosterom-Strackee solid angles), float64.
    verts: [V, 3]; faces: [F, 3]; points: [N, 3] -> [N]. O(N F): tests and small meshes."""
    v = np.asarray(verts, dtype=np.float64)
    tri = v[np.asarray(faces, dtype=np.int64)]  # [F, 3, 3]
    q = np.asarray(points, dtype=np.float64)
    out = np.empty(len(q))
    step = max(1, chunk * 64 // max(len(tri), 1))
    for s in range(0, len(q), step):
        d = tri[None] - q[s:s + step, None, None, :]  # [n, F, 3, 3]
        a, b, c = d[..., 0, :], d[..., 1, :], d[..., 2, :]
        la, lb, lc = (np.linalg.norm(x, axis=-1) for x in (a, b, c))
        det = np.einsum("...i,...i->...", a, np.cross(b, c))
        den = (la * lb * lc + np.einsum("...i,...i->...", a, b) * lc
               + np.einsum("...i,...i->...", b, c) * la + np.einsum("...i,...i->...", c, a) * lb)
        out[s:s + step] = (2.0 * np.arctan2(det, den)).sum(-1) / (4.0 * np.pi)
    return out


def inside_mask(verts, faces, points, threshold: float = INSIDE_THRESHOLD) -> np.ndarray:
    """verts: [V, 3]; faces: [F, 3] (consistently oriented); points: [N, 3] -> [N] bool,
    True where |generalized winding number| exceeds `threshold` (1/2). The absolute value
    makes an inward-oriented scan (w = -1 inside) label the same as an outward one."""
    return np.abs(winding_number(verts, faces, points)) > threshold

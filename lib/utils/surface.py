"""Triangle-mesh surface geometry: face areas and normals, and area-weighted samples. The one
surface sampler of the project (preprocessing's surface samples, the fit's scan samples, the
reconstruction metrics and the diversity measure all draw through `area_samples`).

Shape legend: V vertices, F faces, N samples (written n where the argument n gives their
number), n_ids candidate faces.

All randomness comes from the `rng` argument (numpy Generator): same rng state, same output.
A sample is a face drawn with probability proportional to its area (inverse CDF of the
cumulative areas) and a point uniform in that triangle (u, v uniform, folded into the
triangle when u + v > 1).
"""
from __future__ import annotations

import numpy as np

__all__ = ["SamplingError", "face_areas_normals", "sample_faces", "barycentric_points",
           "area_samples"]


class SamplingError(ValueError):
    """The mesh cannot be sampled (no area, bad shapes)."""


def face_areas_normals(verts, faces):
    """verts: [V, 3]; faces: [F, 3] -> (areas [F] float64, unit normals [F, 3] float64;
    zero-area faces get normal (0, 0, 0))."""
    tri = np.asarray(verts, dtype=np.float64)[np.asarray(faces)]
    cr = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    norm = np.linalg.norm(cr, axis=1)
    normals = np.divide(cr, norm[:, None], out=np.zeros_like(cr), where=norm[:, None] > 0)
    return 0.5 * norm, normals


def sample_faces(areas, n: int, rng: np.random.Generator, face_ids=None):
    """Area-weighted sampling. areas: [F] face areas; n: number of samples; face_ids: [n_ids]
    candidate faces (default all) -> (face [n] int64, bary [n, 3] float64)."""
    a = np.asarray(areas, dtype=np.float64)
    ids = np.arange(len(a)) if face_ids is None else np.asarray(face_ids, dtype=np.int64)
    cdf = np.cumsum(a[ids])
    if len(cdf) == 0 or not cdf[-1] > 0:
        raise SamplingError("mesh has no surface area to sample")
    pick = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
    face = ids[np.minimum(pick, len(ids) - 1)]
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1.0
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    bary = np.stack([1.0 - u - v, u, v], axis=1)
    return face, bary


def barycentric_points(verts, faces, face, bary):
    """verts: [V, 3]; faces: [F, 3]; face: [N]; bary: [N, 3] -> points [N, 3] float64."""
    tri = np.asarray(verts, dtype=np.float64)[np.asarray(faces)[face]]  # [N, 3, 3]
    return np.einsum("nk,nkc->nc", bary, tri)


def area_samples(verts, faces, n: int, rng: np.random.Generator):
    """n area-weighted samples of a triangle mesh. verts: [V, 3]; faces: [F >= 1, 3] (arrays)
    -> (points [n, 3] float64, unit face normals [n, 3] float64, face [n] int64, bary [n, 3]
    float64: the sampled faces and barycentric coordinates, to interpolate attributes)."""
    v, f = np.asarray(verts), np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3 or f.shape[0] == 0:
        raise SamplingError(f"need verts [V, 3] and faces [F >= 1, 3], got {v.shape} and {f.shape}")
    areas, normals = face_areas_normals(v, f)
    face, bary = sample_faces(areas, n, rng)
    return barycentric_points(v, f, face, bary), normals[face], face, bary

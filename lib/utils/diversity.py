"""How different the heads of a set are: mean pairwise Chamfer-L1 distance.

Shape legend: n_meshes meshes (or point sets), V vertices, F faces, N points per mesh, M
those of a second mesh.

Every mesh is sampled uniformly by area (`lib.utils.surface.area_samples`); samples
below a height `min_y` are dropped, so that meshes cut at different heights (scans open at
the neck, extracted avatars closed below it) are compared over the same part of the head.
With d(x, t) the distance from x to the nearest sample of a set t, the Chamfer-L1 distance
of two sets s and t is (mean_{x in s} d(x, t) + mean_{y in t} d(y, s)) / 2, as in the fit
metrics; a set's diversity is its mean over all n_meshes (n_meshes - 1) / 2 pairs; a sample's
novelty is its distance to the nearest training mesh.
"""
from __future__ import annotations

import numpy as np

from lib.utils.knn import NearestTree
from lib.utils.surface import area_samples

__all__ = ["mesh_points", "chamfer_l1", "cross_chamfer", "pairwise_chamfer", "nearest",
           "diversity"]


def mesh_points(verts, faces, n: int, seed: int = 0, min_y: float | None = None) -> np.ndarray:
    """Area-uniform samples of a mesh (verts [V, 3], faces [F, 3]) at or above min_y:
    -> [<= n, 3] float64."""
    pts = area_samples(np.asarray(verts, dtype=np.float32), np.asarray(faces), n,
                       np.random.default_rng(seed))[0]
    if min_y is not None:
        pts = pts[pts[:, 1] >= min_y]
    if len(pts) == 0:
        raise ValueError(f"mesh_points: no surface at or above y = {min_y}")
    return pts


def chamfer_l1(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Chamfer-L1 of point sets a [N, 3], b [M, 3] (module docstring)."""
    return 0.5 * float(NearestTree(b).query(a)[0].mean() + NearestTree(a).query(b)[0].mean())


def cross_chamfer(sets_a: list[np.ndarray], sets_b: list[np.ndarray] | None = None
                  ) -> np.ndarray:
    """[len(sets_a), len(sets_b)] chamfer_l1 between every point set of sets_a and of sets_b;
    without sets_b, the symmetric [len(sets_a), len(sets_a)] matrix within sets_a (zero
    diagonal, each pair computed once)."""
    same = sets_b is None
    sets_b = sets_a if same else sets_b
    trees_a, trees_b = [NearestTree(p) for p in sets_a], [NearestTree(p) for p in sets_b]
    out = np.zeros((len(sets_a), len(sets_b)))
    for i, a in enumerate(sets_a):
        for j in range(i + 1 if same else 0, len(sets_b)):
            out[i, j] = 0.5 * float(trees_b[j].query(a)[0].mean()
                                    + trees_a[i].query(sets_b[j])[0].mean())
            if same:
                out[j, i] = out[i, j]
    return out


def pairwise_chamfer(point_sets: list[np.ndarray]) -> np.ndarray:
    """[n_meshes, n_meshes] symmetric matrix of chamfer_l1 between every two point sets (zero
    diagonal)."""
    return cross_chamfer(point_sets)


def nearest(queries: list[np.ndarray], references: list[np.ndarray]) -> dict:
    """For every query point set, the chamfer_l1 to its nearest reference set (how far
    sampled avatars are from the closest training person): mean, min and max over queries."""
    d = cross_chamfer(queries, references).min(1)
    return {"mean": float(d.mean()), "min": float(d.min()), "max": float(d.max())}


def diversity(point_sets: list[np.ndarray]) -> dict:
    """Mean, std, min and max of the pairwise Chamfer-L1 over the n_meshes (n_meshes - 1) / 2
    pairs of point sets (n_meshes >= 2), and n_meshes."""
    if len(point_sets) < 2:
        raise ValueError(f"diversity: need at least 2 meshes, got {len(point_sets)}")
    d = pairwise_chamfer(point_sets)
    pairs = d[np.triu_indices(len(point_sets), 1)]
    return {"meshes": len(point_sets), "mean": float(pairs.mean()), "std": float(pairs.std()),
            "min": float(pairs.min()), "max": float(pairs.max())}

"""Vertex sampling of the occupancy points and per-vertex colours (lib/dataset/scan_sampling.py),
against independent truths: exact vertex sets, the chi distribution of a Gaussian jitter's
length, and an analytic colour function evaluated in float64.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from lib.dataset.scan_sampling import (
    SamplingError,
    occupancy_samples,
    surface_samples,
    vertex_colors,
    vertex_region_samples,
)


def grid_mesh(n: int = 6, spacing: float = 0.2, z_of=lambda x, y: 0.3 * x):
    """An n x n vertex grid over [0, (n-1) spacing]^2 with z = z_of(x, y), two triangles per
    cell, plus one stray vertex no face uses, placed highest of all (at z = 5).
    Returns verts [n*n+1, 3], faces [2 (n-1)^2, 3]."""
    g = np.arange(n) * spacing
    X, Y = np.meshgrid(g, g, indexing="ij")
    v = np.stack([X.ravel(), Y.ravel(), z_of(X, Y).ravel()], 1)
    idx = np.arange(n * n).reshape(n, n)
    a, b = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel()
    c, d = idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    f = np.concatenate([np.stack([a, c, d], 1), np.stack([a, d, b], 1)])
    return np.concatenate([v, [[0.5, 0.5, 5.0]]]), f


def test_vertex_samples_per_region_uniform_with_replacement():
    v, f = grid_mesh()
    stray = len(v) - 1
    thr = 0.5 * v[:stray, 2].max()       # the stray vertex does not count for max_z either
    rng = np.random.default_rng(0)
    n_face, n_rest = 7000, 3000
    pts, _ = occupancy_samples(v, f, rng, n_face, n_rest, n_uniform=10, sigma=0.0)
    # unjittered, every near-surface point is a used vertex: find which
    d = np.linalg.norm(pts[:n_face + n_rest, None].astype(np.float64) - v[None], axis=-1)
    which = d.argmin(1)
    assert d.min(1).max() < 1e-6 and not (which == stray).any()
    face_ids = np.nonzero(v[:stray, 2] > thr)[0]
    rest_ids = np.nonzero(v[:stray, 2] <= thr)[0]
    assert set(which[:n_face]) == set(face_ids) and set(which[n_face:]) == set(rest_ids)
    # uniform over each region's vertices: chi-square goodness of fit
    for ids, drawn in ((face_ids, which[:n_face]), (rest_ids, which[n_face:])):
        counts = np.bincount(drawn, minlength=len(v))[ids]
        assert stats.chisquare(counts).pvalue > 1e-3
    # with replacement: more draws than vertices
    assert n_face > len(face_ids)


def test_vertex_jitter_follows_chi_with_three_dof():
    """Each point is a vertex plus N(0, sigma^2 I): with vertices 0.2 apart and sigma 0.01, the
    nearest vertex is the drawn one, so the distance to it is sigma * chi(3)."""
    v, f = grid_mesh()
    sigma = 0.01
    pts, _ = occupancy_samples(v, f, np.random.default_rng(1), 3000, 1000, n_uniform=10,
                               sigma=sigma)
    near = pts[:4000].astype(np.float64)
    dist = np.linalg.norm(near[:, None] - v[None, :-1], axis=-1).min(1)
    assert stats.kstest(dist, "chi", args=(3, 0, sigma)).pvalue > 1e-3
    assert abs(dist.mean() - sigma * 2 * np.sqrt(2 / np.pi)) < 0.05 * sigma  # mean chi(3): 1.596
    # the uniform part: in [-1, 1]^3
    assert (np.abs(pts[4000:]) <= 1).all()


def test_vertex_region_fallback_and_errors():
    v, f = grid_mesh(z_of=lambda x, y: -1.0 - x)   # all z < 0: max_z / 2 > max_z, no face region
    got = vertex_region_samples(v, f, 500, np.random.default_rng(0), thr=-0.5, above=True)
    d = np.linalg.norm(got[:, None] - v[None, :-1], axis=-1).min(1)
    assert d.max() == 0.0                           # falls back to all used vertices
    with pytest.raises(SamplingError, match="no faces"):
        vertex_region_samples(v, np.zeros((0, 3), np.int64), 5, np.random.default_rng(0), 0.0,
                              True)
    with pytest.raises(ValueError, match="sampling must be one of"):
        occupancy_samples(v, f, np.random.default_rng(0), 5, 5, 5, sampling="faces")


# ----------------------------------------------------------------------------- colours
TEX_SIZE = 256


def colour_fn(u, v):
    """An analytic colour [.., 3] of uv, smooth and far from linear (float64)."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    return np.stack([0.2 + 0.6 * u * u, 0.1 + 0.7 * v, 0.5 + 0.3 * np.sin(3 * u) * v], -1)


def analytic_texture():
    """colour_fn at the texel centres (OBJ convention: row 0 is the top,
    v = 1 - (i + .5) / TEX_SIZE), float64: bilinear lookups between centres err by at most
    (1/TEX_SIZE)^2 / 8 * max |f''|."""
    t = (np.arange(TEX_SIZE) + 0.5) / TEX_SIZE
    U, Vv = np.meshgrid(t, 1.0 - t)                 # [row, col]
    return colour_fn(U, Vv)


def test_vertex_colours_analytic_and_seams():
    """Vertex colours = colour_fn at the vertex's uv; a vertex with two uvs (a seam) gets the
    mean of colour_fn at both; an unused vertex gets 0."""
    rng = np.random.default_rng(2)
    uvs = rng.uniform(0.05, 0.95, (7, 2))
    faces = np.array([[0, 1, 2], [0, 2, 3], [3, 2, 4]])
    face_uvs = np.array([[0, 1, 2], [5, 2, 3], [3, 2, 4]])   # vertex 0: uvs 0 and 5 (seam)
    col = vertex_colors(6, faces, uvs, face_uvs, analytic_texture())   # vertex 5 unused
    ref = colour_fn(uvs[:5, 0], uvs[:5, 1])
    ref[0] = 0.5 * (colour_fn(*uvs[0]) + colour_fn(*uvs[5]))
    assert col.dtype == np.float64 and col.shape == (6, 3)
    np.testing.assert_allclose(col[:5], ref, atol=2e-5)
    np.testing.assert_array_equal(col[5], 0.0)
    # a vertex repeated with the same uv in many faces counts that uv once
    col2 = vertex_colors(6, np.array([[0, 1, 2]] * 5 + [[0, 2, 3]]), uvs,
                         np.array([[0, 1, 2]] * 5 + [[5, 2, 3]]), analytic_texture())
    np.testing.assert_allclose(col2[0], ref[0], atol=2e-5)


def test_surface_sample_colours_by_source():
    """A planar quad, uv = (x, y): 'vertices' colours are the barycentric mix of colour_fn at
    the corners, 'texture' colours colour_fn at the point itself (they differ: colour_fn is
    not linear); both on the c * 2 - 1 scale."""
    v = np.array([[0.1, 0.1, 0.0], [0.9, 0.1, 0.0], [0.9, 0.9, 0.0], [0.1, 0.9, 0.0]])
    f = np.array([[0, 1, 2], [0, 2, 3]])
    uv = v[:, :2]
    tex = analytic_texture()
    out = {src: surface_samples(v, f, uv, f, tex, np.random.default_rng(3), 4000,
                                colour_source=src) for src in ("vertices", "texture")}
    p = out["vertices"]["surface_points"].astype(np.float64)
    np.testing.assert_array_equal(p, out["texture"]["surface_points"])
    # float64 reference: barycentrics of each point in its triangle (the one containing it)
    corner = colour_fn(uv[:, 0], uv[:, 1])                  # [4, 3]
    ref_v = np.empty((len(p), 3))
    lower = p[:, 1] <= p[:, 0]                              # triangle 0 (below the diagonal)
    for tri, sel in ((f[0], lower), (f[1], ~lower)):
        a, b, c = v[tri, :2]
        m = np.stack([b - a, c - a], 1)                     # [2, 2]
        st = np.linalg.solve(m, (p[sel, :2] - a).T).T       # [n, 2]
        bary = np.stack([1 - st.sum(1), st[:, 0], st[:, 1]], 1)
        ref_v[sel] = bary @ corner[tri]
    on_diag = np.abs(p[:, 1] - p[:, 0]) < 1e-6              # either triangle: same value
    np.testing.assert_allclose(out["vertices"]["surface_colors"][~on_diag], 2 * ref_v[~on_diag] - 1,
                               atol=1e-4)
    ref_t = colour_fn(p[:, 0], p[:, 1])
    np.testing.assert_allclose(out["texture"]["surface_colors"], 2 * ref_t - 1, atol=1e-4)
    assert np.abs(ref_v - ref_t).max() > 0.02               # the two sources differ
    with pytest.raises(ValueError, match="colour_source must be one of"):
        surface_samples(v, f, uv, f, tex, np.random.default_rng(3), 10, colour_source="uv")

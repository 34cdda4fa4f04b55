"""Point samples of a (textured) scan: occupancy training points and coloured surface samples.

Shape legend: V vertices, F faces, N samples, T texture coordinates, H/W texture image.

- `sample_faces`: area-weighted uniform samples on a triangle mesh (face index + barycentrics).
- `sample_region`: the same restricted exactly to the part of the surface where z > thr
  (or z <= thr): faces touching the region are sampled, points outside it rejected.
- `occupancy_samples`: DESIGN §3 `pts_d`/`occ_gt`: n_face near-surface points from the face
  region z > max_z/2, n_rest from elsewhere, each jittered by N(0, sigma) per coordinate,
  then n_uniform uniform in [-1, 1]^3; labels by generalized winding number.
- `surface_samples`: area-weighted points with their face's unit normal and the texture
  colour bilinearly sampled at the interpolated uv, on the colour-target scale.
- `colour_targets` (COLOUR_SCALE 'raw'): a colour c in [0, 1] (as stored in the texture or
  the vertex colours) becomes the target c * 2 - 1, with no per-scan stretching: the same
  scale as the rendered RGB images (8-bit value v -> v / 127.5 - 1, lib/dataset/fine.py), so
  the one texture network is trained toward the 2D and the 3D colour targets on one scale.
- `surface_pieces`: the number of edge-connected pieces of a mesh (vertices at the same
  position welded first, so a file that splits vertices along uv seams is still one piece);
  preprocessing refuses scans that fall apart into very many pieces.
- `texture_colors`: bilinear texture lookup with the renderer's `sample_texture` (OBJ uv
  convention: u right, v up, texel centres at ((j + .5) / W, 1 - (i + .5) / H), clamped).
All randomness comes from the `rng` argument (numpy Generator): same rng state, same output.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from lib.render.shading import sample_texture

from .winding import inside_mask


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


def surface_pieces(verts, faces) -> int:
    """verts: [V, 3]; faces: [F, 3] -> number of pieces: faces are connected when they share
    an edge, after vertices with identical coordinates are welded."""
    f = np.asarray(faces, dtype=np.int64)
    if len(f) == 0:
        return 0
    _, weld = np.unique(np.asarray(verts), axis=0, return_inverse=True)
    f = weld.reshape(-1)[f]
    e = np.sort(f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)  # [3F, 2], face k: rows 3k..
    key = e[:, 0] * (int(f.max()) + 1) + e[:, 1]
    order = np.argsort(key, kind="stable")
    ks, owner = key[order], order // 3
    same = ks[1:] == ks[:-1]  # consecutive corners of one edge: their faces touch
    n = len(f)
    graph = coo_matrix((np.ones(int(same.sum())), (owner[:-1][same], owner[1:][same])),
                       shape=(n, n))
    return int(connected_components(graph, directed=False)[0])


def sample_faces(areas, n: int, rng: np.random.Generator, face_ids=None):
    """Area-weighted sampling. areas: [F] face areas; n: number of samples; face_ids: [K]
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


def sample_region(verts, faces, areas, n: int, rng, thr: float, above: bool, max_rounds=64):
    """Area-weighted samples of the surface part with z > thr (above) or z <= thr.
    verts: [V, 3]; faces: [F, 3]; areas: [F] -> points [n, 3] float64.
    Falls back to the whole surface when the region has no area."""
    zf = np.asarray(verts, dtype=np.float64)[np.asarray(faces), 2]  # [F, 3]
    touch = np.nonzero((zf > thr).any(1) if above else (zf <= thr).any(1))[0]
    if len(touch) == 0 or not areas[touch].sum() > 0:
        face, bary = sample_faces(areas, n, rng)
        return barycentric_points(verts, faces, face, bary)
    out, have = [], 0
    accept = 1.0
    for _ in range(max_rounds):
        m = int(np.ceil((n - have) / max(accept, 0.05) * 1.1)) + 16
        face, bary = sample_faces(areas, m, rng, touch)
        p = barycentric_points(verts, faces, face, bary)
        keep = p[:, 2] > thr if above else p[:, 2] <= thr
        accept = max(keep.mean(), 1e-3)
        out.append(p[keep])
        have += int(keep.sum())
        if have >= n:
            return np.concatenate(out)[:n]
    # the region has (numerically) no area inside the touching faces: whole surface
    face, bary = sample_faces(areas, n - have, rng)
    out.append(barycentric_points(verts, faces, face, bary))
    return np.concatenate(out)[:n]


def occupancy_samples(verts, faces, rng, n_face: int = 70000, n_rest: int = 30000,
                      n_uniform: int = 100000, sigma: float = 0.01, bound: float = 1.0):
    """Occupancy training points of a scan in FLAME space (DESIGN §3).
    verts: [V, 3]; faces: [F, 3] -> (pts_d [n_face + n_rest + n_uniform, 3] float32,
    occ_gt [same, 1] float32, 1 = inside by generalized winding number)."""
    v = np.asarray(verts, dtype=np.float64)
    areas, _ = face_areas_normals(v, faces)
    thr = 0.5 * float(v[:, 2].max())
    near = [sample_region(v, faces, areas, n_face, rng, thr, above=True),
            sample_region(v, faces, areas, n_rest, rng, thr, above=False)]
    near = np.concatenate(near)
    near = near + rng.normal(0.0, sigma, size=near.shape)
    uni = rng.uniform(-bound, bound, size=(n_uniform, 3))
    pts = np.concatenate([near, uni]).astype(np.float32)
    occ = inside_mask(v, faces, pts).astype(np.float32)[:, None]
    return pts, occ


def texture_float(texture) -> torch.Tensor:
    """texture: [H, W, C] uint8 (0..255) or float (0..1), numpy or torch -> float32 tensor in
    [0, 1] (no copy when it already is one)."""
    tex = texture if torch.is_tensor(texture) else torch.from_numpy(np.require(texture, requirements="CW"))
    return tex.float() / 255.0 if tex.dtype == torch.uint8 else tex.float()


def texture_colors(texture, uv):
    """texture: [H, W, 3] uint8 or float in [0, 1]; uv: [N, 2] OBJ convention -> [N, 3]
    float64 in [0, 1], bilinear, with the renderer's `sample_texture` (one convention)."""
    uv = torch.from_numpy(np.asarray(uv, dtype=np.float32))
    return sample_texture(texture_float(texture), uv).double().numpy()


# The colour scale of the surface-sample targets, recorded in each scan's provenance
# settings (lib/dataset/preprocessing.py): outputs made on another scale are redone.
COLOUR_SCALE = "raw"


def colour_targets(colors):
    """colors: [N, C] in [0, 1] -> [N, C] float32 targets c * 2 - 1 in [-1, 1] (values
    outside [0, 1] are clipped first)."""
    c = np.clip(np.asarray(colors, dtype=np.float64), 0.0, 1.0)
    return (c * 2.0 - 1.0).astype(np.float32)


def surface_samples(verts, faces, uvs, face_uvs, texture, rng, n: int = 100000):
    """Coloured surface samples of a textured scan.
    verts: [V, 3]; faces: [F, 3]; uvs: [T, 2]; face_uvs: [F, 3]; texture: [H, W, 3] ->
    dict(surface_points [n,3], surface_normals [n,3] unit face normals,
    surface_colors [n,3] = texture colour * 2 - 1 in [-1,1] (`colour_targets`)), all float32."""
    areas, normals = face_areas_normals(verts, faces)
    face, bary = sample_faces(areas, n, rng)
    pts = barycentric_points(verts, faces, face, bary)
    uv = np.einsum("nk,nkc->nc", bary, np.asarray(uvs, dtype=np.float64)[np.asarray(face_uvs)[face]])
    col = texture_colors(texture, uv)
    return {"surface_points": pts.astype(np.float32),
            "surface_normals": normals[face].astype(np.float32),
            "surface_colors": colour_targets(col[:, :3])}

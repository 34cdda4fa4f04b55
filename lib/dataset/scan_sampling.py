"""Point samples of a (textured) scan: occupancy training points and coloured surface samples.

Shape legend: V vertices, F faces, N samples, U texture coordinates, Ht/Wt texture image
rows/columns, Ch channels.

- `occupancy_samples`: `pts_d`/`occ_gt` of occupancy.npz (docs/design.md, Processed scan
  folder): n_face near-surface points from the face region z > max_z/2, n_rest from
  elsewhere, each jittered by N(0, sigma) per coordinate,
  then n_uniform uniform in [-1, 1]^3; labels by generalized winding number. Where the
  near-surface points come from (`OCC_SAMPLING`):
  'vertices' (default, the original GANHead's): scan vertices drawn uniformly with
      replacement (`vertex_region_samples`); the region is told per vertex (z > max_z / 2);
      only vertices some face uses count (max_z too), while the original draws among all
      vertices: a vertex no face uses is not on the surface (the FaceVerse scans have none).
  'area': area-weighted points on the surface (`sample_region`), restricted exactly to the
      part of the surface in the region: the sample density follows the area, not the
      tessellation (the original's is denser where the scan's triangles are smaller).
- `vertex_colors`: one colour per vertex, the texture looked up (`texture_colors`) at the
  vertex's uv; a vertex with several uvs (on a uv seam) gets the mean over its distinct uvs.
  The original looks up one colour per texture coordinate and uses it as the colour of the
  vertex with the same index (right when the OBJ has one uv per vertex in vertex order, as
  the FaceVerse scans do; then the two agree).
- `surface_samples`: area-weighted points with their face's unit normal and a colour on the
  colour-target scale, by `COLOUR_SOURCES`:
  'vertices' (default, the original's): the barycentric interpolation of the face's
      vertex colours (`vertex_colors`), as its renders colour the scan;
  'texture': the texture bilinearly sampled at the interpolated uv (full texture detail
      inside each triangle; the renders are then textured too).
- `colour_targets` (COLOUR_SCALE 'raw'): a colour c in [0, 1] (as stored in the texture or
  the vertex colours) becomes the target c * 2 - 1, with no per-scan stretching: the same
  scale as the rendered RGB images (8-bit value v -> v / 127.5 - 1, lib/dataset/fine.py), so
  the one texture network is trained toward the 2D and the 3D colour targets on one scale.
  (The original stretches each scan's surface colours to [-1, 1] by their min and max: a
  defect, fixed here.)
- `surface_pieces`: the number of edge-connected pieces of a mesh (vertices at the same
  position welded first, so a file that splits vertices along uv seams is still one piece);
  preprocessing refuses scans that fall apart into very many pieces.
- `texture_colors`: bilinear texture lookup with the renderer's `sample_texture` (OBJ uv
  convention: u right, v up, texel centres at ((j + .5) / W, 1 - (i + .5) / H), clamped).
  (The original rounds uv * size to an integer, rescales it by (size - 1) / size and samples
  bilinearly at that texel position, which moves the lookup by up to one texel.)
All randomness comes from the `rng` argument (numpy Generator): same rng state, same output.
Face areas, normals and area-weighted samples come from lib/utils/surface.py (re-exported here).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from lib.dataset.winding import inside_mask
from lib.render.shading import sample_texture
from lib.utils.surface import (
    SamplingError,
    area_samples,
    barycentric_points,
    face_areas_normals,
    sample_faces,
)


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


# The sources of the near-surface occupancy points and of the surface samples' colours
# (module docstring); the first of each is the default. Recorded in each scan's provenance.
OCC_SAMPLING = ("vertices", "area")
COLOUR_SOURCES = ("vertices", "texture")


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def vertex_region_samples(verts, faces, n: int, rng, thr: float, above: bool):
    """Scan vertices drawn uniformly with replacement among the vertices some face uses with
    z > thr (above) or z <= thr. verts: [V, 3]; faces: [F, 3] -> points [n, 3] float64.
    Falls back to all used vertices when the region holds none."""
    v = np.asarray(verts, dtype=np.float64)
    used = np.unique(np.asarray(faces))
    if len(used) == 0:
        raise SamplingError("mesh has no faces: no surface vertices to sample")
    z = v[used, 2]
    cand = used[z > thr] if above else used[z <= thr]
    if len(cand) == 0:
        cand = used
    return v[cand[rng.integers(0, len(cand), n)]]


def occupancy_samples(verts, faces, rng, n_face: int = 70000, n_rest: int = 30000,
                      n_uniform: int = 100000, sigma: float = 0.01, bound: float = 1.0,
                      sampling: str = "vertices"):
    """Occupancy training points of a scan in FLAME space (module docstring).
    verts: [V, 3]; faces: [F, 3]; sampling: one of OCC_SAMPLING ->
    (pts_d [n_face + n_rest + n_uniform, 3] float32: face region, rest, uniform;
    occ_gt [same, 1] float32, 1 = inside by generalized winding number)."""
    _check_choice("sampling", sampling, OCC_SAMPLING)
    v = np.asarray(verts, dtype=np.float64)
    used = np.unique(np.asarray(faces))
    if len(used) == 0:
        raise SamplingError("mesh has no faces to sample")
    thr = 0.5 * float(v[used, 2].max())
    if sampling == "vertices":
        near = [vertex_region_samples(v, faces, n_face, rng, thr, above=True),
                vertex_region_samples(v, faces, n_rest, rng, thr, above=False)]
    else:
        areas, _ = face_areas_normals(v, faces)
        near = [sample_region(v, faces, areas, n_face, rng, thr, above=True),
                sample_region(v, faces, areas, n_rest, rng, thr, above=False)]
    near = np.concatenate(near)
    near = near + rng.normal(0.0, sigma, size=near.shape)
    uni = rng.uniform(-bound, bound, size=(n_uniform, 3))
    pts = np.concatenate([near, uni]).astype(np.float32)
    occ = inside_mask(v, faces, pts).astype(np.float32)[:, None]
    return pts, occ


def texture_float(texture) -> torch.Tensor:
    """texture: [Ht, Wt, Ch] uint8 (0..255) or float (0..1), numpy or torch -> float32 tensor in
    [0, 1] (no copy when it already is one)."""
    tex = (texture if torch.is_tensor(texture)
           else torch.from_numpy(np.require(texture, requirements="CW")))
    return tex.float() / 255.0 if tex.dtype == torch.uint8 else tex.float()


def texture_colors(texture, uv):
    """texture: [Ht, Wt, 3] uint8 or float in [0, 1]; uv: [N, 2] OBJ convention -> [N, 3]
    float64 in [0, 1], bilinear, with the renderer's `sample_texture` (one convention)."""
    uv = torch.from_numpy(np.asarray(uv, dtype=np.float32))
    return sample_texture(texture_float(texture), uv).double().numpy()


# The colour scale of the surface-sample targets, recorded in each scan's provenance
# settings (lib/dataset/preprocessing.py): outputs made on another scale are redone.
COLOUR_SCALE = "raw"


def colour_targets(colors):
    """colors: [N, Ch] in [0, 1] -> [N, Ch] float32 targets c * 2 - 1 in [-1, 1] (values
    outside [0, 1] are clipped first)."""
    c = np.clip(np.asarray(colors, dtype=np.float64), 0.0, 1.0)
    return (c * 2.0 - 1.0).astype(np.float32)


def vertex_colors(n_verts: int, faces, uvs, face_uvs, texture) -> np.ndarray:
    """One colour per vertex (module docstring): the texture at the vertex's uv, the mean
    over its distinct uvs where it has several (uv seams); 0 for vertices no face uses.
    n_verts: V; faces, face_uvs: [F, 3]; uvs: [U, 2]; texture: [Ht, Wt, 3] ->
    [V, 3] float64 in [0, 1]."""
    f = np.asarray(faces, dtype=np.int64).reshape(-1)
    fu = np.asarray(face_uvs, dtype=np.int64).reshape(-1)
    if f.shape != fu.shape:
        raise SamplingError(f"face_uvs {np.shape(face_uvs)} must match faces {np.shape(faces)}")
    n_uv = len(uvs)
    pairs = np.unique(f * n_uv + fu)                               # distinct (vertex, uv)
    vid, tid = pairs // n_uv, pairs % n_uv
    col = texture_colors(texture, np.asarray(uvs)[tid])[:, :3]     # [n_pairs, 3]
    count = np.bincount(vid, minlength=int(n_verts))
    out = np.stack([np.bincount(vid, col[:, c], minlength=int(n_verts)) for c in range(3)], 1)
    return out / np.maximum(count, 1)[:, None]


def surface_samples(verts, faces, uvs, face_uvs, texture, rng, n: int = 100000,
                    colour_source: str = "vertices", vertex_colours=None):
    """Coloured surface samples of a textured scan (module docstring).
    verts: [V, 3]; faces: [F, 3]; uvs: [U, 2]; face_uvs: [F, 3]; texture: [Ht, Wt, 3];
    colour_source: one of COLOUR_SOURCES; vertex_colours: optional [V, 3] in [0, 1]
    (`vertex_colors` of this mesh; computed when None) ->
    dict(surface_points [n,3], surface_normals [n,3] unit face normals,
    surface_colors [n,3] = colour * 2 - 1 in [-1,1] (`colour_targets`)), all float32."""
    _check_choice("colour_source", colour_source, COLOUR_SOURCES)
    pts, normals, face, bary = area_samples(verts, faces, n, rng)
    if colour_source == "vertices":
        vc = vertex_colors(len(verts), faces, uvs, face_uvs, texture) if vertex_colours is None \
            else np.asarray(vertex_colours, dtype=np.float64)
        col = np.einsum("nk,nkc->nc", bary, vc[np.asarray(faces)[face]])
    else:
        uv = np.einsum("nk,nkc->nc", bary,
                       np.asarray(uvs, dtype=np.float64)[np.asarray(face_uvs)[face]])
        col = texture_colors(texture, uv)
    return {"surface_points": pts.astype(np.float32),
            "surface_normals": normals.astype(np.float32),
            "surface_colors": colour_targets(col[:, :3])}

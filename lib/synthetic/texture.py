"""Procedural texturing of synthetic scans: noise, UV atlas, painting, baking.

Shape legend: N points (surface points, the points of baked texels), V vertices, F faces, U uv
coordinates, Ht = Wt = tex_size texture rows/columns.

The UV atlas is a spherical projection about the head centre in the head's own (root)
frame: u = azimuth (seam at the back of the head, -z), v = polar angle from +y (v = 1 at
the crown). Faces crossing the seam get their own uv copies shifted by one period, so the
atlas covers u in [0, 1 + pad] before it is rescaled into [0, 1]; those few columns of the
texture are simply baked twice. Colours are baked per texel from the 3D point the texel
maps to (rasterising the uv triangles with the project's rasterizer, lib/render/rasterizer.py),
so they follow the geometry exactly.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from lib.render.rasterizer import rasterize

__all__ = ["ValueNoise", "spherical_uvs", "paint_colors", "bake_texture",
           "SKIN_TONES", "HAIR_COLORS", "IRIS_COLORS"]

# sRGB colours in [0, 1]
SKIN_TONES = np.array([
    [0.96, 0.80, 0.69], [0.92, 0.74, 0.60], [0.87, 0.68, 0.53], [0.78, 0.58, 0.43],
    [0.66, 0.46, 0.33], [0.53, 0.36, 0.25], [0.40, 0.27, 0.19], [0.30, 0.20, 0.14],
])
HAIR_COLORS = np.array([
    [0.07, 0.05, 0.04], [0.23, 0.14, 0.08], [0.42, 0.28, 0.15], [0.70, 0.55, 0.32],
    [0.55, 0.22, 0.10], [0.55, 0.53, 0.50], [0.14, 0.10, 0.08], [0.82, 0.72, 0.50],
])
IRIS_COLORS = np.array([
    [0.30, 0.18, 0.08], [0.20, 0.35, 0.55], [0.28, 0.40, 0.22], [0.45, 0.32, 0.15],
    [0.15, 0.10, 0.06], [0.40, 0.50, 0.55],
])


class ValueNoise:
    """Smooth periodic 3D noise, roughly in [-1, 1], deterministic per rng.

    A Gaussian-smoothed random lattice (period `size` lattice cells) sampled with trilinear
    interpolation; one unit of input spans `cells` lattice cells, so features are about one
    input unit wide. __call__(p (N, 3), octaves) -> (N,).
    """

    def __init__(self, rng: np.random.Generator, size: int = 64, cells: float = 2.5):
        lat = ndimage.gaussian_filter(rng.normal(size=(size, size, size)), 1.0, mode="wrap")
        self.lattice = (lat / (2.5 * lat.std())).astype(np.float32)
        self.cells = float(cells)
        self.offset = rng.uniform(0.0, size, 3)

    def single(self, p: np.ndarray) -> np.ndarray:
        """p: (N, 3) -> (N,) one octave."""
        q = np.asarray(p, dtype=np.float64) * self.cells + self.offset
        return ndimage.map_coordinates(self.lattice, q.T, order=1, mode="grid-wrap",
                                       prefilter=False).astype(np.float64)

    def __call__(self, p: np.ndarray, octaves: int = 1) -> np.ndarray:
        """p: (N, 3) -> (N,) fractal noise (octaves at doubling frequency, halving amplitude)."""
        p = np.asarray(p, dtype=np.float64)
        out, amp, norm = np.zeros(len(p)), 1.0, 0.0
        for k in range(octaves):
            out += amp * self.single(p * (2.0 ** k) + 17.0 * k)
            norm += amp
            amp *= 0.5
        return out / norm


def spherical_uvs(v_local: np.ndarray, faces: np.ndarray, centre: np.ndarray):
    """Spherical uv atlas about `centre` in the head frame, seam at the back of the head.

    v_local: (V, 3) vertices in the head's root frame (y up, z forward); faces: (F, 3);
    centre: (3,). Returns uvs (U, 2) in [0, 1] and face_uvs (F, 3) indexing uvs.
    """
    d = np.asarray(v_local, dtype=np.float64) - centre
    r = np.linalg.norm(d, axis=1) + 1e-12
    u = np.arctan2(d[:, 0], d[:, 2]) / (2.0 * np.pi) + 0.5  # 0.5 = front, 0 / 1 = back
    v = 1.0 - np.arccos(np.clip(d[:, 1] / r, -1.0, 1.0)) / np.pi
    fu0 = u[faces]  # (F, 3)
    # unwrap each face relative to its first corner, then move faces left of 0 by +1
    fu = fu0[:, :1] + (fu0 - fu0[:, :1] + 0.5) % 1.0 - 0.5
    fu = np.where(fu.min(axis=1, keepdims=True) < 0.0, fu + 1.0, fu)
    shift = np.rint(fu - fu0).astype(np.int64)  # whole periods added per corner
    fu = fu0 + shift
    span = fu.max(axis=1) - fu.min(axis=1)
    regular = span < 0.25  # faces around the crown pole have huge spans; they are clipped
    pad = max(0.0, float(fu[regular].max()) - 1.0) if regular.any() else 0.0
    F = len(faces)
    base = faces.reshape(-1)
    # one uv per (vertex, period shift): unshifted corners share their vertex's uv
    key = base * 4 + (shift.reshape(-1) + 1)
    keys, face_uvs = np.unique(key, return_inverse=True)
    uvs = np.zeros((len(keys), 2))
    uvs[face_uvs, 0] = np.clip(fu.reshape(-1), 0.0, 1.0 + pad) / (1.0 + pad)
    uvs[face_uvs, 1] = v[base]
    return uvs, face_uvs.reshape(F, 3).astype(np.int64)


def _smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _mix(a, b, t):
    t = np.asarray(t)[..., None] if np.ndim(t) else t
    return a * (1.0 - t) + b * t


def _blend(col: np.ndarray, weight: np.ndarray, fn) -> None:
    """In place: col[m] = mix(col[m], fn(m), weight[m]) where weight > 0. fn(mask) -> (K, 3)."""
    m = weight > 1e-4
    if m.any():
        col[m] = _mix(col[m], fn(m), weight[m])


def paint_colors(p: np.ndarray, attrs: dict, look: dict, eyes: dict, noise: ValueNoise,
                 head_radius: float, centre: np.ndarray) -> np.ndarray:
    """Colours of surface points.

    p: (N, 3) points in the head frame; attrs: soft labels (N,) in [0, 1] — 'brows', 'lips',
    'eyes', 'nose', 'face', 'hair' (hair coverage), 'cheek' (cheek weight) and optionally
    'mouth' (inside of the mouth) and 'beard' (where a beard grows); look: dict with
    'skin' (3,), 'hair' (3,), 'iris' (3,) colours, 'bald' bool and optionally 'brow' (3,)
    (brow and beard colour, default 'hair') and 'beard' (0 none .. 1 full); eyes: dict with
    'centres'
    (2, 3), 'gaze' (2, 3) unit directions; head_radius: scalar setting the noise scales;
    centre: (3,) head centre (hair strands radiate from the crown above it).
    Returns (N, 3) float64 colours in [0, 1].
    """
    q = p / head_radius
    skin = np.asarray(look["skin"], dtype=np.float64)
    tone = (1.0 + 0.12 * noise(q * 3.0, 2)) * (1.0 + 0.06 * noise(q * 40.0 + 50.0))
    col = skin[None, :] * tone[:, None]
    flush = np.clip(0.6 * attrs["cheek"] + 0.5 * attrs["nose"], 0.0, 1.0)
    _blend(col, 0.6 * flush, lambda m: col[m] * np.array([1.08, 0.86, 0.84]))

    lip_col = skin * np.array([0.80, 0.48, 0.50]) + np.array([0.14, 0.02, 0.03])
    _blend(col, _smoothstep(0.25, 0.75, attrs["lips"]),
           lambda m: lip_col * (1.0 + 0.1 * noise(q[m] * 25.0 + 9.0))[:, None])
    _blend(col, _smoothstep(0.25, 0.75, attrs.get("mouth", np.zeros(len(p)))),
           lambda m: lip_col * np.array([0.55, 0.35, 0.38]))  # inside of the mouth

    hair_col = np.asarray(look["hair"], dtype=np.float64)
    body_col = np.asarray(look.get("brow", hair_col), dtype=np.float64)  # brows and beard
    brow_col = np.minimum(body_col, skin * 0.45) * 0.8 + 0.2 * body_col

    def brow_fn(m):
        streak = noise(q[m] * np.array([60.0, 12.0, 12.0]) + 3.0)
        return brow_col * (1.0 + 0.6 * streak)[:, None]

    brows = attrs["brows"]
    brows = _smoothstep(0.2, 0.7, brows + np.where(brows > 0, 0.3 * noise(q * 30.0 + 11.0), 0.0))
    _blend(col, brows, brow_fn)

    def hair_fn(m):  # strands run along meridians from the crown: fast in azimuth
        d = (p[m] - centre) / head_radius
        phi = np.arctan2(d[:, 0], d[:, 2])
        theta = np.arccos(np.clip(d[:, 1] / (np.linalg.norm(d, axis=1) + 1e-9), -1.0, 1.0))
        strands = noise(np.stack([25.0 * np.cos(phi), 25.0 * np.sin(phi), 2.0 * theta], 1), 2)
        shade = 1.0 + 0.9 * strands + 0.3 * noise(q[m] * 6.0 + 21.0)
        return np.clip(hair_col * shade[:, None], 0.0, 1.0)

    beard = float(look.get("beard", 0.0)) * attrs.get("beard", np.zeros(len(p)))
    if beard.any():  # stubble to full beard, patchy at low strength
        patches = np.clip(0.6 + 0.6 * noise(q * 8.0 + 31.0), 0.0, 1.0)
        _blend(col, np.clip(beard * patches, 0.0, 1.0),
               lambda m: np.clip(body_col * (1.0 + 0.7 * noise(q[m] * 45.0 + 7.0))[:, None],
                                 0.0, 1.0))

    hair = attrs["hair"] * (0.15 if look.get("bald", False) else 1.0)
    _blend(col, _smoothstep(0.05, 0.6, hair), hair_fn)

    centres = np.asarray(eyes["centres"], dtype=np.float64)
    gaze = np.asarray(eyes["gaze"], dtype=np.float64)
    iris_col = np.asarray(look["iris"], dtype=np.float64)

    def eye_fn(m):  # sclera, iris and pupil from the angle to each eye's gaze axis
        pm = p[m]
        k = np.argmin(np.linalg.norm(pm[:, None, :] - centres[None], axis=2), axis=1)
        rel = pm - centres[k]
        cosang = (rel * gaze[k]).sum(1) / (np.linalg.norm(rel, axis=1) + 1e-12)
        ang = np.arccos(np.clip(cosang, -1.0, 1.0))
        sclera = np.array([0.93, 0.91, 0.87]) * (1.0 + 0.05 * noise(q[m] * 30.0))[:, None]
        sclera = _mix(sclera, np.array([0.85, 0.62, 0.60]), 0.4 * _smoothstep(0.8, 1.3, ang))
        radial = np.cross(rel, gaze[k]) / head_radius
        iris = iris_col * (1.0 + 0.5 * noise(radial * 120.0 + ang[:, None] * 3.0))[:, None]
        iris = _mix(iris, iris_col * 0.45, _smoothstep(0.38, 0.48, ang))  # limbal ring
        out = _mix(sclera, iris, 1.0 - _smoothstep(0.47, 0.52, ang))
        return _mix(out, np.array([0.03, 0.03, 0.03]), 1.0 - _smoothstep(0.15, 0.19, ang))

    _blend(col, _smoothstep(0.3, 0.7, attrs["eyes"]), eye_fn)
    return np.clip(col, 0.0, 1.0)


def bake_texture(tex_size: int, uvs: np.ndarray, face_uvs: np.ndarray, color_fn) -> np.ndarray:
    """Bake colours into a (tex_size, tex_size, 3) uint8 atlas.

    uvs: (U, 2) in [0, 1] (v up); face_uvs: (F, 3); color_fn(face (N,), bary (N, 3)) ->
    (N, 3) colours in [0, 1] for the texels covered by face `face` at barycentric `bary`.
    Uncovered texels take the nearest covered texel's colour (no dark seams when filtered).
    """
    # the atlas is the view of the project's camera onto the uv square drawn as the plane
    # (2u - 1, 2v - 1, 0): texel (row i, col j) has its centre at
    # uv ((j + .5) / tex_size, 1 - (i + .5) / tex_size)
    uv = torch.as_tensor(np.asarray(uvs, dtype=np.float64))
    plane = torch.cat([uv * 2.0 - 1.0, torch.zeros(len(uv), 1, dtype=uv.dtype)], dim=1)
    frags = rasterize(plane, torch.as_tensor(np.asarray(face_uvs, dtype=np.int64)), tex_size)
    face_img, bary_img = frags.face_idx[0].numpy(), frags.bary[0].numpy()
    covered = face_img >= 0
    img = np.zeros((tex_size, tex_size, 3))
    img[covered] = color_fn(face_img[covered], bary_img[covered])
    if not covered.all():
        _, (ri, ci) = ndimage.distance_transform_edt(~covered, return_indices=True)
        img = img[ri, ci]
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)

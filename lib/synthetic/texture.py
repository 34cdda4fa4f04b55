"""Procedural texturing of synthetic scans: noise, UV atlas, triangle rasteriser, painting.

Shape legend: N points, F faces, T uv coordinates, M texels, H/W image.

The UV atlas is a spherical projection about the head centre in the head's own (root)
frame: u = azimuth (seam at the back of the head, -z), v = polar angle from +y (v = 1 at
the crown). Faces crossing the seam get their own uv copies shifted by one period, so the
atlas covers u in [0, 1 + pad] before it is rescaled into [0, 1]; those few columns of the
texture are simply baked twice. Colours are baked per texel from the 3D point the texel
maps to (rasterising the uv triangles), so they follow the geometry exactly.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["ValueNoise", "rasterize_triangles", "spherical_uvs", "paint_colors",
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


def rasterize_triangles(tri: np.ndarray, height: int, width: int, depth: np.ndarray | None = None,
                        max_candidates: int = 4_000_000):
    """Rasterise 2D triangles; pixel (row i, col j) has its centre at (j + 0.5, i + 0.5).

    tri: (F, 3, 2) vertex positions in pixel units (x = column, y = row); depth: (F, 3) or
    None (with depth the largest interpolated value wins).
    Returns face (H, W) int64 (-1 where empty) and bary (H, W, 3) float64.
    """
    tri = np.asarray(tri, dtype=np.float64)
    F = len(tri)
    face_img = np.full(height * width, -1, dtype=np.int64)
    bary_img = np.zeros((height * width, 3))
    if F == 0:
        return face_img.reshape(height, width), bary_img.reshape(height, width, 3)
    lo = np.ceil(tri.min(axis=1) - 0.5).astype(np.int64)
    hi = np.floor(tri.max(axis=1) - 0.5).astype(np.int64)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, [width - 1, height - 1])
    ext = (hi - lo + 1).max(axis=1)
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    ok = (ext >= 1) & (np.abs(area) > 1e-12)
    all_pix, all_z, all_f, all_w = [], [], [], []
    bucket = np.where(ok, np.ceil(np.log2(np.maximum(ext, 1))).astype(np.int64), -1)
    for level in np.unique(bucket[bucket >= 0]):
        k = int(2 ** level)
        idx_all = np.nonzero(bucket == level)[0]
        step = max(1, max_candidates // (k * k))
        oy, ox = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        ox, oy = ox.ravel(), oy.ravel()
        for s in range(0, len(idx_all), step):
            idx = idx_all[s:s + step]
            px = lo[idx, 0:1] + ox
            py = lo[idx, 1:2] + oy
            valid = (px <= hi[idx, 0:1]) & (py <= hi[idx, 1:2])
            cx, cy = px + 0.5, py + 0.5
            ta, tb, tc = a[idx], b[idx], c[idx]
            inv = 1.0 / area[idx][:, None]
            w0 = ((tb[:, 0:1] - cx) * (tc[:, 1:2] - cy)
                  - (tb[:, 1:2] - cy) * (tc[:, 0:1] - cx)) * inv
            w1 = ((tc[:, 0:1] - cx) * (ta[:, 1:2] - cy)
                  - (tc[:, 1:2] - cy) * (ta[:, 0:1] - cx)) * inv
            w2 = 1.0 - w0 - w1
            eps = -1e-9
            inside = valid & (w0 >= eps) & (w1 >= eps) & (w2 >= eps)
            fi, ci = np.nonzero(inside)
            if len(fi) == 0:
                continue
            w = np.stack([w0[fi, ci], w1[fi, ci], w2[fi, ci]], axis=1)
            face = idx[fi]
            all_pix.append(py[fi, ci] * width + px[fi, ci])
            all_f.append(face)
            all_w.append(w)
            all_z.append((w * depth[face]).sum(1) if depth is not None else np.zeros(len(fi)))
    if not all_pix:
        return face_img.reshape(height, width), bary_img.reshape(height, width, 3)
    pix, z = np.concatenate(all_pix), np.concatenate(all_z)
    fcs, ws = np.concatenate(all_f), np.concatenate(all_w)
    if depth is None:  # no visibility: any covering face will do (the last one written)
        face_img[pix] = fcs
        bary_img[pix] = ws
        return face_img.reshape(height, width), bary_img.reshape(height, width, 3)
    order = np.lexsort((fcs, z, pix))  # per pixel: ascending depth, the last one wins
    pix_s = pix[order]
    last = np.r_[np.nonzero(pix_s[1:] != pix_s[:-1])[0], len(pix_s) - 1]
    sel = order[last]
    face_img[pix[sel]] = fcs[sel]
    bary_img[pix[sel]] = ws[sel]
    return face_img.reshape(height, width), bary_img.reshape(height, width, 3)


def spherical_uvs(v_local: np.ndarray, faces: np.ndarray, centre: np.ndarray):
    """Spherical uv atlas about `centre` in the head frame, seam at the back of the head.

    v_local: (N, 3) vertices in the head's root frame (y up, z forward); faces: (F, 3);
    centre: (3,). Returns uvs (T, 2) in [0, 1] and face_uvs (F, 3) indexing uvs.
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

    p: (M, 3) points in the head frame; attrs: soft labels (M,) in [0, 1] — 'brows', 'lips',
    'eyes', 'nose', 'face', 'hair' (hair coverage), 'cheek' (cheek weight) and optionally
    'mouth' (inside of the mouth) and 'beard' (where a beard grows); look: dict with
    'skin' (3,), 'hair' (3,), 'iris' (3,) colours, 'bald' bool and optionally 'brow' (3,)
    (brow and beard colour, default 'hair') and 'beard' (0 none .. 1 full); eyes: dict with
    'centres'
    (2, 3), 'gaze' (2, 3) unit directions; head_radius: scalar setting the noise scales;
    centre: (3,) head centre (hair strands radiate from the crown above it).
    Returns (M, 3) float64 colours in [0, 1].
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

    uvs: (T, 2) in [0, 1] (v up); face_uvs: (F, 3); color_fn(face (M,), bary (M, 3)) ->
    (M, 3) colours in [0, 1] for the texels covered by face `face` at barycentric `bary`.
    Uncovered texels take the nearest covered texel's colour (no dark seams when filtered).
    """
    px = np.stack([uvs[:, 0] * tex_size, (1.0 - uvs[:, 1]) * tex_size], axis=1)
    face_img, bary_img = rasterize_triangles(px[face_uvs], tex_size, tex_size)
    covered = face_img >= 0
    img = np.zeros((tex_size, tex_size, 3))
    img[covered] = color_fn(face_img[covered], bary_img[covered])
    if not covered.all():
        _, (ri, ci) = ndimage.distance_transform_edt(~covered, return_indices=True)
        img = img[ri, ci]
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)

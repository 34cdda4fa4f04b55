"""The implicit volume of a synthetic scan: distance to the posed skin, hair, bun.

Shape legend: V model vertices, F faces, N points.

Skin: exact distance to a mesh component (libigl's AABB tree) signed by the fast winding
number, with the closest point's face and barycentrics so that per-vertex fields can be
read there.

Hair — geometry a FLAME-like head model cannot express — is an offset of the skin: at a
point whose closest skin point is c, the hair surface lies `thickness(c)` outside the skin,

    thickness = base * w(c) * (1 + top * up + back * backward) * (1 + strands + lumps)

where w is a hair weight that is 0 outside the model's 'scalp' region and ramps to 1
inside it (so the hairline never reaches the face), `up`/`backward` are the direction
from the head centre, and the strand noise varies fast in azimuth and slowly along the
meridians (strands flowing from the crown). Styles shape w (`HairVolume.coverage`: a
receding hairline, a mohawk's shaved sides; `HairVolume.extension`: long hair covering the
ears and the back of the neck) and add primitives with a smooth union: a bun (a sphere at
the back of the crown) and a ponytail (a smaller bun and a tapered capsule hanging from it).
All hair lengths are fractions of the head radius R.
"""
from __future__ import annotations

import igl
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from lib.synthetic.texture import ValueNoise
from lib.utils.knn import NearestTree

__all__ = ["HAIR_STYLES", "HairVolume", "MeshDistance", "barycentric", "mesh_components",
           "scalp_weights", "smooth_union"]


def barycentric(p, a, b, c):
    """Barycentric coordinates of points p in triangles (a, b, c), all (N, 3) -> (N, 3)."""
    v0, v1, v2 = b - a, c - a, p - a
    d00, d01, d11 = (v0 * v0).sum(1), (v0 * v1).sum(1), (v1 * v1).sum(1)
    d20, d21 = (v2 * v0).sum(1), (v2 * v1).sum(1)
    den = d00 * d11 - d01 * d01
    den = np.where(np.abs(den) < 1e-30, 1e-30, den)
    v = (d11 * d20 - d01 * d21) / den
    w = (d00 * d21 - d01 * d20) / den
    bary = np.clip(np.stack([1.0 - v - w, v, w], 1), 0.0, 1.0)
    return bary / bary.sum(1, keepdims=True)


class MeshDistance:
    """Exact signed distance to one mesh component (libigl's AABB tree).

    vertices: (V, 3) all model vertices; faces: (F, 3) this component's faces (global ids).
    The magnitude is the exact distance; the sign comes from the fast winding number
    (inside where it exceeds 1/2), which stays right where a strongly posed mesh folds
    over itself (pseudonormal signs do not).
    """

    def __init__(self, vertices: np.ndarray, faces: np.ndarray):
        self.v = np.ascontiguousarray(vertices, dtype=np.float64)
        fn = np.cross(self.v[faces[:, 1]] - self.v[faces[:, 0]],
                      self.v[faces[:, 2]] - self.v[faces[:, 0]])
        vol = (self.v[faces[:, 0]] * fn).sum() / 6.0
        self.f = np.ascontiguousarray(faces if vol >= 0 else faces[:, ::-1], dtype=np.int64)
        vn = np.zeros_like(self.v)
        for k in range(3):
            np.add.at(vn, faces[:, k], fn)
        self.vn = vn / (np.linalg.norm(vn, axis=1, keepdims=True) + 1e-20)
        if vol < 0:
            self.vn = -self.vn
        used = np.unique(faces)
        self.centre = self.v[used].mean(0)
        self.radius = float(np.linalg.norm(self.v[used] - self.centre, axis=1).max())

    def query(self, x: np.ndarray):
        """x: (N, 3) -> sdf (N,) negative inside, face index into self.f (N,), bary (N, 3),
        closest points (N, 3)."""
        x = np.ascontiguousarray(x, dtype=np.float64)
        dist, face, closest, _ = igl.signed_distance(x, self.v, self.f,
                                                     sign_type=igl.SIGNED_DISTANCE_TYPE_UNSIGNED)
        inside = igl.fast_winding_number(self.v, self.f, x) > 0.5
        tri = self.v[self.f[face]]
        bary = barycentric(closest, tri[:, 0], tri[:, 1], tri[:, 2])
        return np.where(inside, -np.abs(dist), np.abs(dist)), face, bary, closest


def mesh_components(n_vertices: int, faces: np.ndarray) -> list[np.ndarray]:
    """Face index arrays of the mesh's connected components, largest first."""
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
    g = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n_vertices, n_vertices))
    _, lab = connected_components(g, directed=False)
    flab = lab[faces[:, 0]]
    comps = [np.nonzero(flab == k)[0] for k in np.unique(flab)]
    return sorted(comps, key=len, reverse=True)


# base thickness, top / back boost, strand and lump noise amplitudes, hairline ramp width,
# bun radius (0 = none); optional: curl (lump frequency, default 2.5), tail (ponytail length,
# 0 = none), recede (0..1: hair lost at the front and temples), strip (mohawk half width,
# 0 = everywhere), long (0..1: hair down over the ears and the back of the neck); all
# lengths in head radii
HAIR_STYLES = {
    "bald": dict(base=0.0, top=0.0, back=0.0, strands=0.0, lumps=0.0, ramp=0.12, bun=0.0),
    "buzz": dict(base=0.02, top=0.1, back=0.0, strands=0.05, lumps=0.05, ramp=0.08, bun=0.0),
    "short": dict(base=0.045, top=0.3, back=0.0, strands=0.15, lumps=0.1, ramp=0.10, bun=0.0),
    "receding": dict(base=0.05, top=0.2, back=0.3, strands=0.15, lumps=0.1, ramp=0.10, bun=0.0,
                     recede=1.0),
    "medium": dict(base=0.10, top=0.3, back=0.6, strands=0.18, lumps=0.15, ramp=0.14, bun=0.0),
    "long": dict(base=0.09, top=0.3, back=0.5, strands=0.2, lumps=0.12, ramp=0.14, bun=0.0,
                 long=1.0),
    "thick": dict(base=0.17, top=0.6, back=0.3, strands=0.15, lumps=0.2, ramp=0.18, bun=0.0),
    "curly": dict(base=0.20, top=0.5, back=0.4, strands=0.05, lumps=0.35, ramp=0.16, bun=0.0,
                  curl=7.0),
    "bun": dict(base=0.07, top=0.2, back=0.2, strands=0.12, lumps=0.1, ramp=0.14, bun=0.30),
    "ponytail": dict(base=0.06, top=0.2, back=0.1, strands=0.12, lumps=0.1, ramp=0.14, bun=0.17,
                     tail=0.85),
    "mohawk": dict(base=0.16, top=1.2, back=0.2, strands=0.2, lumps=0.1, ramp=0.10, bun=0.0,
                   strip=0.22),
}


def _ss(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum of two distance fields a, b: (N,) -> (N,); k blend width."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def scalp_weights(vertices: np.ndarray, scalp: np.ndarray, ramp: float,
                  margin: float = 0.0) -> np.ndarray:
    """Per-vertex hair weight: 0 off the scalp and within `margin` of its edge, then rising
    smoothly to 1 over `ramp`.

    vertices: (V, 3); scalp: (V,) bool; ramp, margin: distances (scene units).
    Returns (V,) float64.
    """
    scalp = np.asarray(scalp, dtype=bool)
    w = np.zeros(len(vertices))
    if not scalp.any():
        return w
    if scalp.all():
        return np.ones(len(vertices))
    dist, _ = NearestTree(vertices[~scalp]).query(vertices[scalp])
    t = np.clip((dist - margin) / max(ramp, 1e-9), 0.0, 1.0)
    w[scalp] = t * t * (3.0 - 2.0 * t)
    return w


class HairVolume:
    """One person's hair: thickness field over the skin plus an optional bun and ponytail.

    style: a key of HAIR_STYLES; centre: (3,) head centre and radius: head radius R in the
    head frame (y up, z forward); rng: numpy Generator (noise and small per-person jitter);
    bun_anchor: (3,) scalp point under the bun (needed for 'bun' and 'ponytail'); scale:
    the person's hair length factor (multiplies the thickness; the ponytail by its root).
    """

    def __init__(self, style: str, centre: np.ndarray, radius: float, rng: np.random.Generator,
                 bun_anchor: np.ndarray | None = None, scale: float = 1.0):
        if style not in HAIR_STYLES:
            raise ValueError(f"unknown hair style {style!r}; choose from {sorted(HAIR_STYLES)}")
        if not scale > 0:
            raise ValueError(f"HairVolume: scale must be > 0, got {scale}")
        self.style = style
        self.p = {"curl": 2.5, "tail": 0.0, "recede": 0.0, "strip": 0.0, "long": 0.0,
                  **HAIR_STYLES[style]}
        jitter = rng.uniform(0.85, 1.15)
        self.p["base"] *= jitter * float(scale)
        self.centre = np.asarray(centre, dtype=np.float64)
        self.R = float(radius)
        self.noise = ValueNoise(rng)
        self.bun_centre = None
        self.tail = None  # (start (3,), end (3,), start radius, end radius)
        self.bun_radius = self.p["bun"] * self.R * rng.uniform(0.9, 1.1)
        if self.bun_radius > 0:
            if bun_anchor is None:
                raise ValueError(f"HairVolume: the {style!r} style needs bun_anchor")
            out = np.asarray(bun_anchor, dtype=np.float64) - self.centre
            out /= np.linalg.norm(out)
            lift = self.base_thickness_at(np.asarray(bun_anchor, dtype=np.float64)[None])[0]
            self.bun_centre = np.asarray(bun_anchor) + out * (lift + 0.55 * self.bun_radius)
            if self.p["tail"] > 0:  # hangs down and a little back from the bun
                down = np.array([0.0, -1.0, -0.45]) / np.hypot(1.0, 0.45)
                length = self.p["tail"] * self.R * np.sqrt(scale) * rng.uniform(0.85, 1.15)
                self.tail = (self.bun_centre, self.bun_centre + down * length,
                             0.75 * self.bun_radius, 0.35 * self.bun_radius)

    @property
    def has_hair(self) -> bool:
        return self.p["base"] > 0 or self.bun_radius > 0

    @property
    def max_thickness(self) -> float:
        """Upper bound of thickness plus the bun's reach outside the skin (scene units); the
        ponytail's reach is in `bounds`."""
        p = self.p
        t = p["base"] * self.R * (1 + p["top"] + p["back"]) * (1 + p["strands"] + p["lumps"])
        return float(t + (2.2 * self.bun_radius if self.bun_radius > 0 else 0.0))

    @property
    def max_shift(self) -> float:
        """Largest distance between the primitives' sampled surfaces and the final zero set
        (noise plus the smooth unions' inward blend), scene units."""
        r = max(self.bun_radius, self.tail[2] if self.tail is not None else 0.0)
        return 0.1 * r

    def bounds(self):
        """Axis-aligned box (lo (3,), hi (3,)) holding the bun and ponytail, or None."""
        if self.bun_centre is None:
            return None
        pts = [self.bun_centre - 1.2 * self.bun_radius, self.bun_centre + 1.2 * self.bun_radius]
        if self.tail is not None:
            a, b, r0, _ = self.tail
            pts += [np.minimum(a, b) - 1.2 * r0, np.maximum(a, b) + 1.2 * r0]
        pts = np.stack(pts)
        return pts.min(0), pts.max(0)

    def coverage(self, v: np.ndarray) -> np.ndarray:
        """Where the style keeps hair on the scalp: v (N, 3) head-frame points -> (N,) in
        [0, 1], multiplying the scalp weights (a receding hairline loses the front and
        the temples first; a mohawk keeps a strip along the midline)."""
        d = (np.asarray(v, dtype=np.float64) - self.centre) / self.R
        cov = np.ones(len(d))
        if self.p["recede"] > 0:
            z0 = 0.25 - 0.5 * np.abs(d[:, 0])
            cov *= 1.0 - self.p["recede"] * _ss((d[:, 2] - z0) / 0.2 + 0.5)
        if self.p["strip"] > 0:
            cov *= np.exp(-(d[:, 0] / self.p["strip"]) ** 4)
        return cov

    def extension(self, v: np.ndarray, face_distance: np.ndarray) -> np.ndarray:
        """Hair weight beyond the scalp (long hair over the ears and the back of the neck):
        v (N, 3) head-frame points, face_distance (N,) distance to the model's face region
        -> (N,) in [0, 1] (zeros for styles without it)."""
        if self.p["long"] <= 0:
            return np.zeros(len(v))
        d = (np.asarray(v, dtype=np.float64) - self.centre) / self.R
        behind = _ss((0.25 - d[:, 2]) / 0.35)
        off_face = _ss((np.asarray(face_distance) / self.R - 0.08) / 0.15)
        return self.p["long"] * behind * off_face

    def base_thickness_at(self, c: np.ndarray) -> np.ndarray:
        """Smooth thickness profile (no weight, no noise). c: (N, 3) skin points -> (N,)."""
        d = c - self.centre
        d = d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-12)
        up, back = np.clip(d[:, 1], 0.0, 1.0), np.clip(-d[:, 2], 0.0, 1.0)
        return self.p["base"] * self.R * (1.0 + self.p["top"] * up + self.p["back"] * back)

    def thickness(self, c: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Hair thickness at skin points. c: (N, 3) closest skin points, w: (N,) hair weight."""
        if self.p["base"] <= 0:
            return np.zeros(len(c))
        d = (c - self.centre) / self.R
        r = np.linalg.norm(d, axis=1) + 1e-12
        phi = np.arctan2(d[:, 0], d[:, 2])
        theta = np.arccos(np.clip(d[:, 1] / r, -1.0, 1.0))
        strands = self.noise(np.stack([9.0 * np.cos(phi), 9.0 * np.sin(phi), 1.2 * theta], 1), 2)
        lumps = self.noise(d * self.p["curl"] + 40.0, 2)
        mod = 1.0 + self.p["strands"] * strands + self.p["lumps"] * lumps
        return self.base_thickness_at(c) * np.asarray(w) * mod

    def _tail_field(self, x: np.ndarray) -> np.ndarray:
        """Distance-like field of the tapered ponytail capsule. x: (N, 3) -> (N,)."""
        a, b, r0, r1 = self.tail
        ab = b - a
        t = np.clip((x - a) @ ab / (ab @ ab), 0.0, 1.0)
        d = np.linalg.norm(x - (a + t[:, None] * ab), axis=1) - (r0 + (r1 - r0) * t)
        return d + 0.05 * r0 * self.noise(x / (0.1 * self.R) + 120.0)

    def field(self, x: np.ndarray, skin_sdf: np.ndarray, c: np.ndarray, w: np.ndarray):
        """Signed distance-like field of skin + hair. x: (N, 3) points, skin_sdf: (N,)
        signed distance to the skin, c: (N, 3) closest skin points, w: (N,) hair weight
        at c -> (N,) (negative inside)."""
        f = skin_sdf - self.thickness(c, w)
        if self.bun_radius > 0:
            bun = np.linalg.norm(x - self.bun_centre, axis=1) - self.bun_radius
            bun += 0.04 * self.bun_radius * self.noise(x / (0.15 * self.R) + 80.0)
            if self.tail is not None:
                bun = smooth_union(bun, self._tail_field(x), 0.3 * self.tail[2])
            f = smooth_union(f, bun, 0.25 * self.bun_radius)
        return f

    def surface_samples(self, c: np.ndarray, n: np.ndarray, w: np.ndarray,
                        spacing: float) -> np.ndarray:
        """Points on the hair surface, for locating it. c, n: (N, 3) skin points and unit
        normals, w: (N,) hair weight, spacing: wanted primitive sample spacing -> (K, 3)."""
        pts = []
        if self.p["base"] > 0:
            m = w > 0
            pts.append(c[m] + n[m] * self.thickness(c[m], w[m])[:, None])
        if self.bun_radius > 0:
            pts.append(_sphere_points(self.bun_centre, self.bun_radius, spacing))
        if self.tail is not None:
            a, b, r0, r1 = self.tail
            axis = (b - a) / np.linalg.norm(b - a)
            u = np.cross(axis, [1.0, 0.0, 0.0])
            u /= np.linalg.norm(u)
            v = np.cross(axis, u)
            t = np.linspace(0.0, 1.0, int(np.ceil(np.linalg.norm(b - a) / spacing)) + 2)
            ang = np.linspace(0.0, 2 * np.pi, int(np.ceil(2 * np.pi * r0 / spacing)) + 4,
                              endpoint=False)
            T, A = np.meshgrid(t, ang, indexing="ij")
            rad = (r0 + (r1 - r0) * T)[..., None]
            ring = np.cos(A)[..., None] * u + np.sin(A)[..., None] * v
            pts.append((a + T[..., None] * (b - a) + rad * ring).reshape(-1, 3))
            pts.append(_sphere_points(b, r1, spacing))
        return np.concatenate(pts) if pts else np.zeros((0, 3))


def _sphere_points(centre: np.ndarray, radius: float, spacing: float) -> np.ndarray:
    """Fibonacci points on a sphere about `spacing` apart. centre (3,) -> (K, 3)."""
    k = int(np.ceil(8.0 * np.pi * radius ** 2 / spacing ** 2)) + 100
    i = np.arange(k) + 0.5
    phi = np.arccos(1.0 - 2.0 * i / k)
    th = np.pi * (1.0 + 5.0 ** 0.5) * i
    s = np.stack([np.cos(th) * np.sin(phi), np.cos(phi), np.sin(th) * np.sin(phi)], 1)
    return centre + radius * s

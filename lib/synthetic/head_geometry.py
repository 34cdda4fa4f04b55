"""Procedural head-and-neck surface with two eyeballs, in FLAME's frame (meters).

Shape legend: V vertices (head surface first, then left eye, then right eye), F faces,
Vh head-surface vertices, N rays or query points; the vertex grid has n_rows rows and
n_cols = N_COLS columns.

Frame (FLAME): x to the subject's left, y up, z forward. The head surface is a *radial
graph* around `CENTRE`: every vertex is `CENTRE + r * dir(theta, phi)`, phi the polar
angle from +y, theta the azimuth from +z towards +x, on a grid of rows and columns whose
angles stay monotone, so the surface cannot intersect itself (checked when building).
The radius along each ray is the outermost crossing of a smooth implicit head (ellipsoids,
an elliptic neck cylinder, smooth unions), plus radial relief for nose, brows, cheeks, chin
and lips, and two features made in the ray domain:

- the mouth, a narrow slot: in the mouth columns the rows around the mouth line are
  squeezed together and pushed inwards, so the upper lip, a thin cavity and the lower lip
  are separate sheets the jaw can pull apart (`side` tells which sheet a vertex is on);
- the eyes: around each eyeball the skin blends into a lid shell just outside the eyeball,
  and inside an almond-shaped opening it drops just behind the eyeball's front, so the lid
  margin is where skin and eyeball meet (the eyeballs are closed spheres whose backs sit
  inside the head, as in FLAME).

The template does not depend on a seed. The grid constants below define V; nothing else
assumes a vertex count.
"""
import numpy as np

CENTRE = np.array([0.0, 0.012, -0.008])
EYE_CENTRE = np.array([0.032, 0.024, 0.0615])   # left eye (+x); the right eye mirrors x
EYE_RADIUS = 0.0125
MOUTH_Y, MOUTH_Z = -0.050, 0.097               # front point of the mouth line
NECK_BOTTOM = -0.142
NOSE_TIP_Y = -0.012

# grid resolution (radians between neighbouring rows / columns)
ROW_STEP_TOP, ROW_STEP_FACE, ROW_STEP_EYE, ROW_STEP_MOUTH, ROW_STEP_NECK = \
    0.09, 0.036, 0.019, 0.012, 0.06
COL_STEP_FRONT, COL_STEP_SIDE, COL_STEP_BACK = 0.03, 0.06, 0.2
N_COLS = 76              # columns around the head (even: mirror-symmetric)
FACE_BAND = (1.2, 2.6)   # polar range with fixed columns and even rows at the back
MOUTH_BAND = 8           # rows on each side of the mouth line with ROW_STEP_MOUTH spacing
SLOT_ROWS = 4            # rows on each side of the mouth line that form the slot walls
SLOT_HALF_ANGLE = 0.010  # angular half width of the slot at the lips
SLOT_DEPTH = 0.018
EYELID = 0.0016           # lid thickness over the eyeball
MOUTH_HALF_WIDTH = 0.17  # azimuth (rad) where the slot is full depth; fades out by +0.16
EYE_RINGS, EYE_SEGMENTS = 12, 20


def directions(theta, phi):
    """Unit ray directions. theta, phi: [...] -> [..., 3]."""
    s = np.sin(phi)
    return np.stack([s * np.sin(theta), np.cos(phi), s * np.cos(theta)], axis=-1)


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _smin(a, b, k):
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _smax(a, b, k):
    return -_smin(-a, -b, k)


def _ellipsoid(p, c, r, tilt=0.0):
    """Approximate signed distance to an ellipsoid (tilted about x). p: [..., 3] -> [...]."""
    q = p - np.asarray(c)
    if tilt:
        ct, st = np.cos(tilt), np.sin(tilt)
        q = np.stack([q[..., 0], ct * q[..., 1] - st * q[..., 2],
                      st * q[..., 1] + ct * q[..., 2]], axis=-1)
    r = np.asarray(r)
    k0 = np.linalg.norm(q / r, axis=-1)
    k1 = np.linalg.norm(q / (r * r), axis=-1)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-12)


def head_sdf(p):
    """Signed distance (approximate, negative inside) of the base head: skull, face and jaw
    masses, ears and neck; the small features are added as radial relief. p: [..., 3] -> [...]."""
    x = p[..., 0]
    pm = p.copy()
    pm[..., 0] = np.abs(x)                                   # mirror-symmetric features
    d = _ellipsoid(p, (0.0, 0.030, -0.016), (0.075, 0.090, 0.100))            # cranium
    d = _smin(d, _ellipsoid(p, (0.0, -0.018, 0.026), (0.060, 0.056, 0.060)), 0.025)  # midface
    taper = 1.0 - 0.42 * _smoothstep((p[..., 2] + 0.01) / 0.095)
    pj = p.copy()
    pj[..., 0] = x / taper
    d = _smin(d, _ellipsoid(pj, (0.0, -0.060, 0.018), (0.053, 0.040, 0.070)), 0.025)  # mandible
    d = _smin(d, _ellipsoid(p, (0.0, -0.082, 0.064), (0.021, 0.016, 0.020)), 0.02)  # chin
    d = _smin(d, _ellipsoid(pm, (0.046, 0.000, 0.052), (0.022, 0.016, 0.022)), 0.02)  # cheekbones
    d = _smin(d, _ellipsoid(pm, (0.072, 0.004, -0.014), (0.012, 0.029, 0.017), 0.25),
              0.012)                                                            # ears
    flare = 1.0 + 0.12 * _smoothstep((-0.09 - p[..., 1]) / 0.05)
    rx, rz = 0.051 * flare, 0.053 * flare
    q = np.stack([x / rx, (p[..., 2] + 0.027) / rz], axis=-1)
    k0 = np.linalg.norm(q, axis=-1)
    k1 = np.linalg.norm(q / np.stack([rx, rz], axis=-1), axis=-1)
    neck = np.maximum(k0 * (k0 - 1.0) / np.maximum(k1, 1e-12), p[..., 1] + 0.01)
    d = _smin(d, neck, 0.025)
    return _smax(d, NECK_BOTTOM - p[..., 1], 0.006)


def sdf_normals(p, h=1e-4):
    """Unit gradient of the base implicit: a direction field that is smooth in space and
    close to the skin normal (the same on both walls of the mouth slot). p: [N, 3] -> [N, 3]"""
    g = np.stack([head_sdf(p + h * e) - head_sdf(p - h * e) for e in np.eye(3)], axis=1)
    return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)


def _soft_max(values, k=0.0015):
    m = np.max(values, axis=0)
    return m + k * np.log(np.sum(np.exp((values - m) / k), axis=0)) - k * np.log(len(values))


def relief(p):
    """Radial height (m) of nose, brows, cheeks and chin over the base surface point.
    p: [N, 3] -> [N]"""
    x, y, ax = p[:, 0], p[:, 1], np.abs(p[:, 0])
    front = _smoothstep((p[:, 2] - 0.02) / 0.03)
    # nose: ridge from the root down to the tip, rounded tip, alae
    root, tip = 0.032, NOSE_TIP_Y
    s = np.clip((root - y) / (root - tip), 0.0, 1.0)
    ridge_h = (0.003 + 0.0145 * s ** 1.2) * _smoothstep((root + 0.01 - y) / 0.012)
    ridge_h = ridge_h * (y > tip)
    ridge = ridge_h * np.clip(1 - (x / (0.0075 + 0.0055 * s)) ** 2, 0, 1) ** 1.2
    r_tip = np.hypot(x / 0.0105, (y - tip) / 0.0105)
    tip_h = 0.0185 * np.sqrt(np.clip(1 - r_tip ** 2, 0, 1)) ** 0.8
    ala = 0.0085 * np.sqrt(np.clip(1 - ((ax - 0.0125) / 0.0072) ** 2
                                   - ((y - tip + 0.009) / 0.0068) ** 2, 0, 1))
    nose = _soft_max(np.stack([ridge, tip_h, ala]))
    brow = 0.0060 * np.exp(-((ax - 0.030) / 0.022) ** 4 - ((y - 0.043) / 0.009) ** 2) \
        + 0.0015 * np.exp(-(x / 0.012) ** 2 - ((y - 0.036) / 0.01) ** 2)
    cheek = 0.0025 * np.exp(-((ax - 0.042) / 0.016) ** 2 - ((y + 0.008) / 0.016) ** 2)
    chin = 0.002 * np.exp(-(x / 0.017) ** 2 - ((y + 0.091) / 0.011) ** 2) \
        - 0.0018 * np.exp(-(x / 0.017) ** 2 - ((y + 0.076) / 0.005) ** 2)
    return front * (nose + brow + cheek + chin)


def radial_distance(dirs, sdf=head_sdf, r_min=0.03, r_max=0.2, steps=86, iters=18):
    """Outermost surface crossing of the implicit along rays from CENTRE.

    dirs: [N, 3] unit rays -> [N] distances (so CENTRE + r * dirs is on the surface).
    Taking the outermost crossing makes the result a radial graph even where the implicit
    overhangs."""
    r = np.linspace(r_min, r_max, steps)
    vals = sdf(CENTRE + dirs[:, None, :] * r[None, :, None])          # [N, steps]
    inside = vals < 0
    last = steps - 1 - np.argmax(inside[:, ::-1], axis=1)
    lo, hi = r[last], r[np.minimum(last + 1, steps - 1)]
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        neg = sdf(CENTRE + dirs * mid[:, None]) < 0
        lo, hi = np.where(neg, mid, lo), np.where(neg, hi, mid)
    return 0.5 * (lo + hi)


def _spaced(a, b, step_fn, count=None, centred=False):
    """Points in (a, b) whose local spacing follows step_fn: [count] of them (by default as
    many as the spacing asks for), at cell ends or, if centred, at cell centres."""
    t = np.linspace(a, b, 4001)
    dens = 1.0 / step_fn(t)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(t))])
    if count is None:
        count = max(int(round(cdf[-1])) - 1, 0)
    u = (np.arange(count) + 0.5) / count if centred else np.arange(1, count + 1) / (count + 1)
    return np.interp(u * cdf[-1], cdf, t)


def _ramp(t, a, b, lo, hi):
    """lo below a, hi above b, smooth in between."""
    return lo + (hi - lo) * _smoothstep((t - a) / (b - a))


def _mouth_phi():
    m = np.array([0.0, MOUTH_Y, MOUTH_Z]) - CENTRE
    return float(np.arccos(m[1] / np.linalg.norm(m)))


def _face_rows(phi_m):
    """Row angles for the face columns: fine around eyes, nose and chin, uniform spacing
    ROW_STEP_MOUTH in a band with one row exactly on the mouth line. -> [n_rows]"""
    h = ROW_STEP_MOUTH
    band = phi_m + h * np.arange(-MOUTH_BAND, MOUTH_BAND + 1)

    def upper(t):
        return _ramp(t, 0.55, 1.0, ROW_STEP_TOP, ROW_STEP_FACE) \
            + _ramp(t, 1.35, 1.45, 0, ROW_STEP_EYE - ROW_STEP_FACE) \
            + _ramp(t, 1.72, 1.85, 0, ROW_STEP_FACE - ROW_STEP_EYE) \
            + _ramp(t, band[0] - 0.12, band[0], 0, h - ROW_STEP_FACE)

    def lower(t):
        return _ramp(t, band[-1], band[-1] + 0.1, h, ROW_STEP_FACE) \
            + _ramp(t, 2.55, 2.75, 0, ROW_STEP_NECK - ROW_STEP_FACE) \
            + _ramp(t, 2.85, 3.0, 0, 0.05)

    top = _spaced(0.0, band[0], upper)
    bottom = _spaced(band[-1], np.pi, lower)
    return np.concatenate([top, band, bottom]), len(top) + MOUTH_BAND


def _face_cols(n_half):
    """Column azimuths for the face rows on the +x side, n_half values in (0, pi). -> [n_half]"""
    def step(t):
        return _ramp(t, 0.55, 0.85, COL_STEP_FRONT, COL_STEP_SIDE) \
            + _ramp(t, 1.3, 1.8, 0, COL_STEP_BACK - COL_STEP_SIDE)
    return _spaced(0.0, np.pi, step, n_half, centred=True)


def grid_angles():
    """Grid of ray angles. -> theta [n_rows, n_cols], phi_topo [n_rows, n_cols] (before the
    slot squeeze), phi_m [n_rows, n_cols] (mouth-line angle of each vertex's column).

    Rows follow the face distribution (fine at eyes, nose, mouth, chin). Face rows use
    front-dense columns, the rows near the poles blend to uniform columns (per row, the
    azimuth stays monotone, so every grid triangle keeps its orientation). Inside the face
    band the columns are fixed and, behind the face, the rows are spread evenly (per
    column, the polar angle stays monotone). Columns are mirror-symmetric in x."""
    phi_m = _mouth_phi()
    rows, mouth_row = _face_rows(phi_m)
    n_half = N_COLS // 2
    cols_face = _face_cols(n_half)
    cols_unif = np.pi * (np.arange(n_half) + 0.5) / n_half
    a = _smoothstep((rows - 0.15) / 0.95) * _smoothstep((3.05 - rows) / 0.35)
    band = (rows >= FACE_BAND[0]) & (rows <= FACE_BAND[1])
    a[band] = 1.0
    half = (1 - a[:, None]) * cols_unif[None] + a[:, None] * cols_face[None]
    theta = np.concatenate([-half[:, ::-1], half], axis=1)
    i0, i1 = np.flatnonzero(band)[[0, -1]]
    even = np.interp(np.arange(len(rows)), [i0, i1], rows[[i0, i1]])
    b = _smoothstep((1.75 - np.abs(theta[i0])) / 0.7)
    phi = np.where(band[:, None], (1 - b[None]) * even[:, None] + b[None] * rows[:, None],
                   rows[:, None] * np.ones_like(b)[None])
    # bend the mouth rows per column so that the mouth line is level in 3D (a constant ray
    # angle would lift the corners); fades out over a few rows beyond the mouth band
    shift = _mouth_shift(theta[mouth_row], phi_m)
    dist = np.abs(rows - phi_m) - MOUTH_BAND * ROW_STEP_MOUTH
    taper = 1.0 - _smoothstep(dist / 0.25)
    phi = phi + taper[:, None] * shift[None]
    return theta, phi, phi_m + shift[None] * np.ones_like(phi)


def _mouth_shift(theta, phi_m):
    """Per-column change of the mouth-line angle that puts the mouth line on the level
    y = MOUTH_Y (slightly lower at the corners), near the mouth only. theta: [n_cols] -> [n_cols]"""
    near = 1.0 - _smoothstep((np.abs(theta) - 0.3) / 0.35)
    target = MOUTH_Y - 0.0015 * (theta / MOUTH_HALF_WIDTH) ** 2 * near
    phi = np.full_like(theta, phi_m)
    for _ in range(3):
        r = radial_distance(directions(theta, phi))
        phi = np.arccos(np.clip((target - CENTRE[1]) / r, -1.0, 1.0))
    return (phi - phi_m) * near


def mouth_mask(theta, fade=0.16):
    """1 in the mouth columns, fading to 0 at the mouth corners. theta: [...] -> [...]."""
    return 1.0 - _smoothstep((np.abs(theta) - MOUTH_HALF_WIDTH) / fade)


def squeeze_rows(phi_topo, theta, phi_m):
    """Slot geometry. phi_topo, theta, phi_m: [n_rows, n_cols] -> (phi, depth, side), each
    [n_rows, n_cols]; side is -1 above the mouth line (upper lip, follows the head), +1 below,
    0.5 on it and 0 away from the mouth band."""
    h = ROW_STEP_MOUTH
    delta, big = SLOT_ROWS * h, MOUTH_BAND * h
    eps, eps_b, s0 = SLOT_HALF_ANGLE, 0.75 * SLOT_HALF_ANGLE, 1.0 / SLOT_ROWS
    d = phi_topo - phi_m
    a = np.abs(d)
    s = a / delta
    wall = np.where(s < s0, eps_b * s / s0, eps_b + (eps - eps_b) * (s - s0) / (1.0 - s0))
    lips = eps + (a - delta) * (big - eps) / (big - delta)
    g = np.sign(d) * np.where(a <= delta, wall, np.where(a < big, lips, a))
    m = mouth_mask(theta, 0.3)          # rows stay bunched a little beyond the corners
    phi = phi_m + (1.0 - m) * d + m * g
    depth = SLOT_DEPTH * mouth_mask(theta) * _smoothstep((1.0 - s) / (1.0 - s0)) * (a < delta)
    side = np.sign(np.round(d / h)) * (a < big + 0.5 * h)
    side = np.where(a < 0.5 * h, 0.5, side)
    return phi, depth, side


def lip_bulge(theta, phi, phi_m):
    """Radial thickness of the lips (m). theta, phi: [...] -> [...]."""
    t = np.abs(theta)
    up = 0.0055 * np.exp(-((phi - (phi_m - 0.05)) / 0.038) ** 2) \
        * (1.0 - _smoothstep((t - 0.10) / 0.15))
    lo = 0.0050 * np.exp(-((phi - (phi_m + 0.055)) / 0.04) ** 2) \
        * (1.0 - _smoothstep((t - 0.08) / 0.15))
    return up + lo


def eye_opening(points):
    """Almond-shaped lid opening in front view. points: [N, 3] -> [N] in [0, 1]."""
    ex, ey = EYE_CENTRE[0], EYE_CENTRE[1]
    u = (np.abs(points[:, 0]) - ex - 0.0012) / 0.0112           # + lateral
    y = points[:, 1] - ey
    g = 1.0 - u * u
    upper = 0.0058 * np.sign(g) * np.abs(g) ** 0.7 + 0.0012 * u
    lower = -0.0046 * np.sign(g) * np.abs(g) ** 0.9 + 0.0008 * u
    return _smoothstep(np.minimum(upper - y, y - lower) / 0.0026 + 0.4)


def _sphere_far(dirs, radius):
    """Rays against both eye-centred spheres of a radius. dirs: [N, 3] ->
    (t [N] far intersection distance, inf where missed; a [N] angle between each ray and
    the nearest eye direction divided by that sphere's angular radius)."""
    t_far = np.full(len(dirs), np.inf)
    a = np.full(len(dirs), np.inf)
    for sx in (1.0, -1.0):
        e = EYE_CENTRE * np.array([sx, 1.0, 1.0])
        oc = CENTRE - e
        b = dirs @ oc
        disc = b * b - (oc @ oc - radius ** 2)
        hit = (disc > 0) & (b < 0)
        t_far = np.minimum(t_far, np.where(hit, -b + np.sqrt(np.maximum(disc, 0.0)), np.inf))
        dist = np.linalg.norm(oc)
        ang = np.arccos(np.clip(-b / dist, -1.0, 1.0)) / np.arcsin(radius / dist)
        a = np.minimum(a, ang)
    return t_far, a


def _uv_sphere(centre, radius, rings, segments):
    """Sphere with its poles on the z axis (front pole = pupil). -> verts [n, 3], faces [m, 3]."""
    pol = np.pi * (np.arange(rings) + 1) / (rings + 1)
    az = 2 * np.pi * np.arange(segments) / segments
    P, A = np.meshgrid(pol, az, indexing="ij")
    v = np.stack([np.sin(P) * np.cos(A), np.sin(P) * np.sin(A), np.cos(P)], -1).reshape(-1, 3)
    v = np.concatenate([[[0, 0, 1.0]], v, [[0, 0, -1.0]]]) * radius + centre
    f = []
    for j in range(segments):
        k = (j + 1) % segments
        f.append([0, 1 + j, 1 + k])
        for i in range(rings - 1):
            a, b = 1 + i * segments + j, 1 + i * segments + k
            f += [[a, a + segments, b + segments], [a, b + segments, b]]
        last = 1 + (rings - 1) * segments
        f.append([last + j, rings * segments + 1, last + k])
    return v, np.asarray(f, dtype=np.int64)


def grid_faces(n_rows, n_cols):
    """Faces of a closed latitude-longitude grid with a pole vertex at each end.
    Vertex 0 is the top pole, then rows of n_cols, then the bottom pole. -> [F, 3]."""
    idx = 1 + np.arange(n_rows * n_cols).reshape(n_rows, n_cols)
    nxt = np.roll(idx, -1, axis=1)
    a, b, c, d = idx[:-1], idx[1:], nxt[1:], nxt[:-1]
    quads = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3),
                            np.stack([a, c, d], -1).reshape(-1, 3)])
    bottom = n_rows * n_cols + 1
    top = np.stack([np.zeros(n_cols, np.int64), idx[0], nxt[0]], -1)
    bot = np.stack([np.full(n_cols, bottom), nxt[-1], idx[-1]], -1)
    return np.concatenate([top, quads, bot]).astype(np.int64)


def surface_radius(dirs, theta, phi, phi_m, opening=False):
    """Skin radius along rays: base implicit + relief + lips, with eyelids that hug the
    eyeballs and (if opening) the lid openings. dirs: [N, 3], theta, phi: [N] -> [N]"""
    r = radial_distance(dirs)
    r = r + relief(CENTRE + dirs * r[:, None]) + lip_bulge(theta, phi, phi_m)
    # lids: blend towards a sphere EYELID outside the eyeball, smoothly in ray angle
    t_lid, a_lid = _sphere_far(dirs, EYE_RADIUS + EYELID)
    w = 1.0 - _smoothstep((a_lid - 0.5) / 0.5)
    r = np.where(np.isfinite(t_lid), (1 - w) * r + w * np.where(np.isfinite(t_lid), t_lid, r), r)
    t_eye, a_eye = _sphere_far(dirs, EYE_RADIUS)
    hit = np.isfinite(t_eye)
    t_eye = np.where(hit, t_eye, r)
    r = np.where(hit, np.maximum(r, t_eye + 0.0004), r)     # never let the eyeball poke through
    if opening:
        o = eye_opening(CENTRE + dirs * r[:, None]) * (1.0 - _smoothstep((a_eye - 0.75) / 0.2))
        r = (1 - o) * r + o * np.minimum(r, t_eye - 0.0015)
    return r


def build_geometry():
    """The template and what its construction knows about each head vertex.

    Returns a dict: v [V, 3], f [F, 3] (int64, outward), n_head (= Vh), eye_slices (left,
    right), eye_centres [2, 3], theta [Vh] (ray azimuth), side [Vh] (-1 upper-lip side of
    the mouth line, +1 lower, 0.5 on it, 0 away from the mouth band) and p_topo [Vh, 3]
    (the surface without the slot and the lid openings, i.e. mouth and eyes closed)."""
    TH, PT, phi_m = grid_angles()
    phi, depth, side = squeeze_rows(PT, TH, phi_m)
    d_final = directions(TH, phi).reshape(-1, 3)
    r_final = surface_radius(d_final, TH.ravel(), phi.ravel(), phi_m.ravel(), opening=True)
    rings = CENTRE + d_final * (r_final - depth.ravel())[:, None]
    d_topo = directions(TH, PT).reshape(-1, 3)
    r_topo = surface_radius(d_topo, TH.ravel(), PT.ravel(), phi_m.ravel())
    poles = np.array([[0, 1.0, 0], [0, -1.0, 0]])
    top, bot = np.split(CENTRE + poles * radial_distance(poles)[:, None], 2)
    v_head = np.concatenate([top, rings, bot])
    f_head = grid_faces(*TH.shape)
    # a radial graph is embedded iff every triangle keeps its orientation seen from CENTRE
    t = v_head[f_head] - CENTRE
    det = np.einsum("ij,ij->i", t[:, 0], np.cross(t[:, 1], t[:, 2]))
    if not (np.all(det > 0) or np.all(det < 0)):
        raise RuntimeError("head_geometry: the ray grid folds over itself; check the grid "
                           "and slot constants")
    if det[0] < 0:
        f_head = f_head[:, ::-1]                           # outward: positive volume
    verts, faces, slices = [v_head], [f_head], []
    for sx in (1.0, -1.0):
        ve, fe = _uv_sphere(EYE_CENTRE * np.array([sx, 1, 1]), EYE_RADIUS, EYE_RINGS,
                            EYE_SEGMENTS)
        start = sum(len(a) for a in verts)
        slices.append(slice(start, start + len(ve)))
        verts.append(ve)
        faces.append(fe + start)
    return {
        "v": np.concatenate(verts), "f": np.concatenate(faces), "n_head": len(v_head),
        "eye_slices": tuple(slices),
        "eye_centres": np.stack([EYE_CENTRE, EYE_CENTRE * np.array([-1, 1, 1])]),
        "theta": np.concatenate([[0.0], TH.ravel(), [0.0]]),
        "side": np.concatenate([[0.0], side.ravel(), [0.0]]),
        "p_topo": np.concatenate([top, CENTRE + d_topo * r_topo[:, None], bot]),
    }

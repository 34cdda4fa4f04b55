"""Rig of the synthetic head: skinning weights, joint regressor, identity and expression
bases and pose correctives, all in FLAME's layout and conventions (meters).

Shape legend: V vertices (head surface first, then the two eyeballs), Vh head-surface
vertices, J joints (5: root, neck, jaw, left eye, right eye), Q = 9 (J - 1) = 36
pose-corrective features.

Every field is a smooth function of the template position (near the mouth, the jaw weights
also use which side of the mouth line a vertex was built on), so nothing depends on the
vertex count. The facing walls of the mouth slot lie 1-2 mm apart; all fields vary over
centimetres, displace along a direction field that is smooth in space (the gradient of the
base implicit, the same on both walls) and avoid opposite vertical motion of the two lips,
so the surface stays free of self-intersections. Eyeballs move rigidly: identity bases
translate them with the skin around their socket; expressions and pose correctives leave
them alone.
"""
import numpy as np
import scipy.optimize
import scipy.sparse

from lib.synthetic.head_geometry import (
    EYE_RADIUS,
    MOUTH_Y,
    NECK_BOTTOM,
    NOSE_TIP_Y,
    mouth_mask,
    sdf_normals,
)

# rest joint targets (the regressor reproduces them from the template)
ROOT = np.array([0.0, -0.112, -0.026])
NECK = np.array([0.0, -0.068, -0.027])
JAW = np.array([0.0, -0.012, -0.002])
N_IDENTITY, N_EXPRESSION, N_POSE = 300, 100, 36


def _ss(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _gauss(p, c, s):
    """Anisotropic Gaussian bump. p: [N, 3], c: [3], s: [3] widths (inf: ignore) -> [N]."""
    return np.exp(-np.sum(((p - np.asarray(c)) / np.asarray(s)) ** 2, axis=1))


def _pair(p, c, s):
    """Mirror-symmetric pair of bumps at (+-cx, cy, cz). -> [N]"""
    c = np.asarray(c, dtype=float)
    return _gauss(p, c, s) + _gauss(p, c * np.array([-1.0, 1.0, 1.0]), s)


def smooth_normals(v, f, iters=12):
    """Area-weighted vertex normals, Laplacian smoothed. v: [N, 3], f: [F, 3] -> [N, 3]."""
    tri = v[f]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, f[:, k], fn)
    rows = np.concatenate([f[:, 0], f[:, 1], f[:, 2], f[:, 1], f[:, 2], f[:, 0]])
    cols = np.concatenate([f[:, 1], f[:, 2], f[:, 0], f[:, 0], f[:, 1], f[:, 2]])
    adj = scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(v),) * 2)
    adj.data[:] = 1.0
    deg = np.asarray(adj.sum(1)).ravel()
    for _ in range(iters):
        n = n / np.linalg.norm(n, axis=1, keepdims=True)
        n = 0.5 * n + 0.5 * (adj @ n) / deg[:, None]
    return n / np.linalg.norm(n, axis=1, keepdims=True)


class Rig:
    """Geometry-derived quantities shared by all bases. geo: build_geometry() output."""

    def __init__(self, geo):
        self.v = geo["v"]
        self.nh = geo["n_head"]
        self.p = self.v[: self.nh]
        f = geo["f"]
        # skin normals of the closed-mouth surface (for the jaw region's floor-facing skin)
        self.skin_n = smooth_normals(geo["p_topo"], f[(f < self.nh).all(1)])
        # displacement directions: smooth in space, the same on both walls of the slot
        self.n = sdf_normals(self.p)
        self.geo = geo
        x, y, z = self.p.T
        self.front = _ss((z - 0.02) / 0.04)
        # keep the neck's cut fixed vertically
        self.keep_y = _ss((y - NECK_BOTTOM) / 0.035)
        self.eye_ids = [np.arange(s.start, s.stop) for s in geo["eye_slices"]]
        self.eye_centres = geo["eye_centres"]
        d = [np.linalg.norm(self.p - c, axis=1) for c in self.eye_centres]
        self.socket = [np.flatnonzero((di > EYE_RADIUS) & (di < EYE_RADIUS + 0.007)) for di in d]

    def full(self, head_disp):
        """Head-surface displacement [Vh, 3] -> [V, 3], eyeballs translated with their socket."""
        out = np.zeros_like(self.v)
        out[: self.nh] = head_disp
        for ids, sock in zip(self.eye_ids, self.socket):
            out[ids] = head_disp[sock].mean(0)
        return out

    def along_normal(self, h):
        """Scalar height [Vh] -> displacement [Vh, 3] along the smooth normal field."""
        return h[:, None] * self.n


def _normalise(d, amp):
    """Scale a displacement [Vh, 3] so that its largest vertex offset is amp (m)."""
    return d * (amp / max(np.linalg.norm(d, axis=1).max(), 1e-12))


def _semantic_identity(r):
    """Named identity fields: list of (name, displacement [Vh, 3] with max offset = 1 std)."""
    p, (x, y, z), front = r.p, r.p.T, r.front
    zero = np.zeros_like(x)
    ky = r.keep_y
    out = []

    def add(name, d, amp_mm):
        out.append((name, _normalise(d, amp_mm * 1e-3)))

    add("head_width", np.stack([x * (1 - 0.4 * _ss((-0.06 - y) / 0.06)), zero, zero], 1), 6.0)
    length = (z + 0.01) * (1 - 0.5 * _ss((-0.07 - y) / 0.05))
    add("head_length", np.stack([zero, zero, length], 1), 7.0)
    add("cranium_height", np.stack([zero, (y - 0.0) * _ss(y / 0.07), zero], 1), 6.5)
    low = np.clip(0.02 - y, 0.0, 0.13)
    add("face_length", np.stack([zero, -low * front * ky, 0.3 * low * front * ky], 1), 5.0)
    jaw = _ss((-0.025 - y) / 0.03) * ky * _ss((z + 0.02) / 0.04)
    add("jaw_width", np.stack([x * jaw, zero, zero], 1), 4.5)
    nose = _gauss(p, (0, NOSE_TIP_Y + 0.008, 0.1), (0.016, 0.028, 0.05)) * front
    add("nose_projection", np.stack([zero, -0.3 * nose, nose], 1), 4.5)
    add("nose_width", np.stack([x * _gauss(p, (0, NOSE_TIP_Y - 0.004, 0.1), (0.03, 0.014, 0.05)),
                                zero, zero], 1) * front[:, None], 2.5)
    chin = _gauss(p, (0, -0.09, 0.08), (0.025, 0.018, 0.05)) * front
    add("chin", np.stack([zero, -0.4 * chin, chin], 1), 5.0)
    cheeks = _pair(p, (0.045, -0.015, 0.06), (0.018, 0.02, 0.04)) * front
    add("cheeks", r.along_normal(cheeks), 3.5)
    brow = _pair(p, (0.028, 0.043, 0.08), (0.022, 0.01, 0.04)) * front
    add("brow_ridge", r.along_normal(brow), 2.5)
    fh = _ss((y - 0.035) / 0.03) * front
    add("forehead_slope", np.stack([zero, zero, (y - 0.035) * fh], 1), 4.0)
    neck = _ss((-0.085 - y) / 0.02) * _ss((0.06 - z) / 0.03)
    add("neck_thickness", np.stack([x * neck, zero, (z - NECK[2]) * neck], 1), 4.0)
    eyes = _pair(p, (0.032, 0.024, 0.07), (0.02, 0.018, 0.05)) * front
    add("eye_spacing", np.stack([np.tanh(x / 0.012) * eyes, zero, zero], 1), 1.3)
    add("eye_height", np.stack([zero, eyes, zero], 1), 1.3)
    lips = _gauss(p, (0, MOUTH_Y, 0.095), (0.028, 0.014, 0.04)) * front
    add("lip_fullness", r.along_normal(lips), 1.8)
    add("mouth_width", np.stack([x * lips, zero, zero], 1), 2.0)
    add("jaw_angle", r.along_normal(_pair(p, (0.055, -0.075, 0.005), (0.02, 0.025, 0.03))), 3.0)
    mid = _gauss(p, (0, -0.02, 0.09), (0.04, 0.035, 0.05))
    add("midface_depth", np.stack([zero, zero, mid], 1), 3.0)
    add("occiput", r.along_normal(_gauss(p, (0, 0.02, -0.11), (0.05, 0.04, 0.05))), 4.0)
    add("temples", r.along_normal(_pair(p, (0.065, 0.055, 0.03), (0.02, 0.025, 0.03))), 2.5)
    add("ears", r.along_normal(_pair(p, (0.075, 0.004, -0.014), (0.015, 0.03, 0.02))), 2.5)
    return out


def _random_fields(r, rng, count, width, region=None):
    """Smooth random fields: sums of Gaussian bumps on the surface, mostly along the smooth
    normal field with some tangential sway. width: (min, max) bump widths (m); region: [Vh]
    weights where bumps may sit and act. -> list of [Vh, 3] (unnormalised)."""
    weight = np.ones(r.nh) if region is None else region
    prob = weight / weight.sum()
    out = []
    for _ in range(count):
        k = rng.integers(3, 8)
        centres = r.p[rng.choice(r.nh, size=k, p=prob)]
        widths = rng.uniform(*width, size=k)
        amps = rng.normal(size=k)
        tang = rng.normal(size=(k, 3)) * 0.35
        d = np.zeros_like(r.p)
        for c, s, a, t in zip(centres, widths, amps, tang):
            g = np.exp(-np.sum((r.p - c) ** 2, axis=1) / (2 * s * s))
            d += g[:, None] * (a * r.n + t)
        out.append(d * weight[:, None] * r.keep_y[:, None])
    return out


def _rms(d):
    return np.sqrt(np.mean(np.sum(d ** 2, axis=1)))


def _ordered(semantic, random_fields, rms_first, decay):
    """Stack fields with non-increasing RMS: semantic ones sorted by their RMS, then random
    ones scaled to RMS rms_first * decay**k below the smallest semantic RMS.
    Fields: lists of [V, 3] (or [Vh, 3]) -> [V, 3, len(semantic) + len(random_fields)]"""
    semantic = sorted(semantic, key=lambda d: -_rms(d))
    start = min(rms_first, 0.95 * _rms(semantic[-1]))
    scaled = [d * (start * decay ** k / max(_rms(d), 1e-15)) for k, d in enumerate(random_fields)]
    return np.stack(semantic + scaled, axis=-1)


def identity_bases(r, rng):
    """Identity shapedirs [V, 3, 300]: named low-frequency changes, then random smooth fields
    of decreasing size and variance."""
    sem = [r.full(d) for _, d in _semantic_identity(r)]
    n_rand = N_IDENTITY - len(sem)
    widths = np.linspace(0.045, 0.015, n_rand)
    rand = []
    for w in widths:
        rand += [r.full(d) for d in _random_fields(r, rng, 1, (0.7 * w, 1.3 * w))]
    return _ordered(sem, rand, 1e-3, 0.985)


def _semantic_expression(r):
    """Named expression fields (no relative vertical motion across the mouth line, so the
    lips never cross). -> list of (name, [Vh, 3])"""
    p, (x, y, _), front = r.p, r.p.T, r.front
    zero = np.zeros_like(x)
    sx = np.tanh(x / 0.012)                 # smooth sign: no tearing at the midline
    out = []

    def add(name, d, amp_mm):
        out.append((name, _normalise(d * front[:, None], amp_mm * 1e-3)))

    corners = _pair(p, (0.026, MOUTH_Y, 0.085), (0.016, 0.019, 0.03))
    cheek = _pair(p, (0.04, -0.02, 0.07), (0.02, 0.02, 0.04))
    add("smile", np.stack([0.35 * sx * corners + 0.1 * sx * cheek, 0.75 * corners + 0.35 * cheek,
                           -0.35 * corners], 1), 3.5)
    lips = _gauss(p, (0, MOUTH_Y, 0.095), (0.026, 0.017, 0.04))
    add("lip_pucker", np.stack([-x / 0.03 * lips, zero, lips], 1), 4.0)
    add("lips_press", np.stack([-0.2 * x / 0.03 * lips, zero, -lips], 1), 2.5)
    add("mouth_stretch", np.stack([sx * corners, -0.3 * corners, -0.2 * corners], 1), 3.0)
    brow = _pair(p, (0.03, 0.045, 0.08), (0.025, 0.018, 0.05)) \
        + 0.5 * _gauss(p, (0, 0.065, 0.08), (0.05, 0.02, 0.05))
    add("brow_raise", np.stack([zero, brow, 0.15 * brow], 1), 4.0)
    inner = _pair(p, (0.015, 0.042, 0.085), (0.013, 0.012, 0.04))
    add("brow_frown", np.stack([-0.6 * sx * inner, -inner, 0.2 * inner], 1), 3.0)
    near_eye = np.minimum(*[np.linalg.norm(p - c, axis=1) for c in r.eye_centres])
    closed = (r.geo["p_topo"] - r.p) * (near_eye < EYE_RADIUS + 0.008)[:, None]  # lids shut
    upper = _pair(p, (0.033, 0.033, 0.07), (0.014, 0.008, 0.04))
    add("eye_close", 0.6 * closed + np.stack([zero, -0.0015 * upper, zero], 1), 2.5)
    lower_half = (y < r.eye_centres[0, 1]).astype(float)
    under = _pair(p, (0.033, 0.008, 0.07), (0.016, 0.01, 0.04))
    add("eye_squint", 0.5 * closed * lower_half[:, None]
        + np.stack([zero, 0.0012 * under, 0.0003 * under], 1), 2.0)
    puff = _pair(p, (0.045, -0.045, 0.06), (0.018, 0.02, 0.04))
    add("cheek_puff", r.along_normal(puff), 4.0)
    wrinkle = _pair(p, (0.012, NOSE_TIP_Y - 0.008, 0.095), (0.01, 0.012, 0.04)) \
        + 0.4 * _gauss(p, (0, 0.02, 0.09), (0.012, 0.015, 0.04))
    add("nose_wrinkle", np.stack([zero, wrinkle, -0.2 * wrinkle], 1), 2.5)
    add("lip_corner_down", np.stack([0.1 * sx * corners, -corners, -0.2 * corners], 1), 3.0)
    above = _ss((y - MOUTH_Y - 0.002) / 0.014) * _gauss(p, (0, MOUTH_Y + 0.015, 0.09),
                                                           (0.022, 0.015, 0.04))
    add("upper_lip_raise", np.stack([zero, above, 0.3 * above], 1), 2.5)
    add("chin_raise", np.stack([zero, 0.5 * _gauss(p, (0, -0.085, 0.085), (0.02, 0.015, 0.04)),
                                _gauss(p, (0, -0.085, 0.085), (0.02, 0.015, 0.04))], 1), 2.5)
    return out


def expression_bases(r, rng):
    """Expression shapedirs [V, 3, 100]: named expressions, then small smooth localized face
    bumps; eyeballs never move."""
    sem = [d for _, d in _semantic_expression(r)]
    face = r.front * _ss((0.075 - r.p[:, 1]) / 0.03) * _ss((r.p[:, 1] + 0.1) / 0.02)
    rand = _random_fields(r, rng, N_EXPRESSION - len(sem), (0.008, 0.02), region=face)
    head = _ordered(sem, rand, 1e-3, 0.97)
    out = np.zeros((len(r.v), 3, head.shape[-1]))
    out[: r.nh] = head
    return out


def skinning_weights(r):
    """LBS weights [V, 5]: head on the neck joint, lower neck blending to the root, jaw
    region (chin, lower lip, lower cheeks, under the chin) on the jaw, eyeballs on 3/4."""
    x, y, z = r.p.T
    g = r.geo
    # jaw: below a line from the mouth up and back to the jaw joint, in front of the ramus,
    # fading under the chin towards the neck
    y_line = MOUTH_Y + 0.038 * _ss((0.09 - z) / 0.09)
    width = 0.004 + 0.018 * _ss((0.085 - z) / 0.04)
    w_jaw = _ss((y_line - y) / width + 0.5)
    w_jaw *= _ss((z + 0.035) / 0.08)                          # in front of the ramus
    # below the mandible's lower border the weight falls off linearly with the distance
    # from the neck axis, so the skin under the chin stretches instead of folding
    jaw_floor = -0.099 + 0.02 * _ss((0.045 - z) / 0.05)
    down = _ss((-r.skin_n[:, 1] - 0.3) / 0.4)                 # skin facing the floor
    above = _ss((y - jaw_floor) / 0.025 + 0.5) * (1.0 - down)
    rho = np.hypot(x, z - NECK[2])
    lin = np.clip((rho - 0.058) / 0.05, 0.0, 1.0) * _ss((y + 0.118) / 0.015)
    w_jaw *= 1.0 - (1.0 - above) * (1.0 - lin)
    # at the mouth the construction's side of the mouth line decides
    m = mouth_mask(g["theta"], 0.3) * (g["side"] != 0) * r.front
    side = np.clip(g["side"], 0.0, 1.0)                    # 0 upper, 1 lower, 0.5 floor
    w_jaw = (1 - m) * w_jaw + m * side
    w_root = _ss((-0.09 - y) / 0.052)
    w = np.zeros((len(r.v), 5))
    w[: r.nh, 0] = w_root
    w[: r.nh, 2] = w_jaw * (1 - w_root)
    w[: r.nh, 1] = 1.0 - w[: r.nh, 0] - w[: r.nh, 2]
    w[r.eye_ids[0], 3] = 1.0
    w[r.eye_ids[1], 4] = 1.0
    return w


def _fit_weights(points, target):
    """Non-negative weights summing to 1 with points^T w ~= target, close to uniform.
    points: [n, 3], target: [3] -> [n]"""
    n = len(points)
    lam = 1e3
    A = np.concatenate([lam * points.T, lam * np.ones((1, n)), np.eye(n)])
    b = np.concatenate([lam * target, [lam], np.full(n, 1.0 / n)])
    w, _ = scipy.optimize.nnls(A, b, maxiter=50 * n)
    return w / w.sum()


def joint_regressor(r):
    """Sparse J_regressor [5, V] (csc): each joint a convex combination of a few vertices.
    Root and neck: a ring around the neck; jaw: patches on both cheeks in front of the
    ears; eyes: all vertices of their eyeball (their mean is the centre)."""
    p = r.p
    x, y, z = p.T
    rows, cols, vals = [], [], []
    sets = [
        (np.flatnonzero((np.abs(y - ROOT[1]) < 0.006) & (z < 0.03)), ROOT),
        (np.flatnonzero((np.abs(y - NECK[1]) < 0.006) & (z < 0.0)), NECK),
        (np.flatnonzero((np.hypot(y - JAW[1], z - JAW[2]) < 0.012) & (np.abs(x) > 0.04)), JAW),
    ]
    for j, (ids, target) in enumerate(sets):
        w = _fit_weights(p[ids], target)
        keep = w > 1e-6
        rows += [j] * int(keep.sum())
        cols += list(ids[keep])
        vals += list(w[keep] / w[keep].sum())
    for j, ids in zip((3, 4), r.eye_ids):
        rows += [j] * len(ids)
        cols += list(ids)
        vals += [1.0 / len(ids)] * len(ids)
    return scipy.sparse.csc_matrix((vals, (rows, cols)), shape=(5, len(r.v)), dtype=np.float64)


def pose_correctives(r, rng):
    """posedirs [V, 3, Q] for the feature (R_j - I) of joints 1..4 (row-major). Small:
    a neck bulge and twist for neck rotations, a skin correction under the chin and at the
    cheeks for jaw rotations, upper lids that follow the eyes looking down, plus tiny smooth
    fields for the remaining entries; eyeballs are never touched."""
    x, y, z = r.p.T
    dirs = np.zeros((r.nh, 3, N_POSE))
    neck = _ss((-0.075 - y) / 0.025) * _ss((y - NECK_BOTTOM) / 0.02)
    neck_front = neck * _ss((z + 0.01) / 0.04)
    neck_back = neck * _ss((-0.03 - z) / 0.03)
    # neck, x rotation (nod): front bulges, back stretches; sin enters at (2,1) and -(1,2)
    nod = r.along_normal(0.004 * neck_front - 0.002 * neck_back)
    dirs[..., 7] += 0.5 * nod
    dirs[..., 5] -= 0.5 * nod
    # neck, y rotation (turn): a slight twist of the neck skin about y
    twist = 0.006 * neck[:, None] * np.stack([z - NECK[2], 0 * x, -x], 1)
    dirs[..., 2] += 0.5 * twist
    dirs[..., 6] -= 0.5 * twist
    # neck, z rotation (tilt): the side towards the tilt bulges
    tilt = r.along_normal(0.003 * neck * np.tanh(x / 0.02))
    dirs[..., 3] += 0.5 * tilt
    dirs[..., 1] -= 0.5 * tilt
    # jaw, x rotation (opening): the skin under the chin moves forward and down instead of
    # bunching up against the neck, the cheeks fill in
    sub = _gauss(r.p, (0, -0.102, 0.055), (0.03, 0.015, 0.03))
    cheek = _pair(r.p, (0.05, -0.068, 0.04), (0.02, 0.018, 0.04))
    jaw_fix = np.stack([0 * x, -0.4 * sub, sub], 1) * 0.012 + r.along_normal(0.004 * cheek)
    dirs[..., 9 + 7] += 0.5 * jaw_fix
    dirs[..., 9 + 5] -= 0.5 * jaw_fix
    # eyes, x rotation: the upper lid follows the gaze down a little
    for j, sgn in ((3, 1.0), (4, -1.0)):
        lid = _gauss(r.p, (sgn * 0.033, 0.031, 0.07), (0.014, 0.007, 0.03)) * r.front
        d = np.stack([0 * x, 0.004 * lid, 0 * x], 1)
        base = 9 * (j - 1)
        dirs[..., base + 7] += 0.5 * d
        dirs[..., base + 5] -= 0.5 * d
    # tiny smooth fields in the remaining entries, local to the joint that drives them
    regions = {1: neck, 2: _ss((-0.03 - y) / 0.03) * r.front,
               3: _gauss(r.p, (0.033, 0.024, 0.07), (0.018, 0.015, 0.04)),
               4: _gauss(r.p, (-0.033, 0.024, 0.07), (0.018, 0.015, 0.04))}
    for k in range(N_POSE):
        region = regions[k // 9 + 1]
        f = _random_fields(r, rng, 1, (0.01, 0.03), region=region + 1e-9)[0]
        dirs[..., k] += f * (3e-4 / max(np.abs(f).max(), 1e-15))
    out = np.zeros((len(r.v), 3, N_POSE))
    out[: r.nh] = dirs
    return out

"""Synthetic head model in FLAME 2020's pickle layout, so that everything runs and is
tested without the licensed FLAME file (docs/design.md, Synthetic stand-ins).

Shape legend: V vertices (its own count, never 5023), F faces, J = 5 joints (root, neck,
jaw, left eye, right eye), Sf = 400 shape-blendshape columns (300 identity + 100
expression), Q = 36 pose-corrective features.

`build_head_model(seed)` returns a dict with FLAME's keys, shapes and dtypes:
    v_template [V, 3] float64 (meters), f [F, 3] uint32, shapedirs [V, 3, 400] float64
    (one standard deviation per column), posedirs [V, 3, 36] float64, J_regressor
    scipy.sparse.csc_matrix [5, V] float64, J [5, 3], weights [V, 5], kintree_table [2, 5]
    int64, bs_style 'lbs', bs_type 'lrotmin'.
The template geometry is fixed; the seed draws the random parts of the bases. The same seed
gives bitwise identical arrays. `save_head_model` writes it as a plain pickle (numpy and
scipy.sparse only); `region_labels` names vertex regions from the geometry alone, so it
works on a loaded file as well.
"""
import numpy as np
import scipy.spatial

from lib.synthetic.head_bases import (
    Rig,
    expression_bases,
    identity_bases,
    joint_regressor,
    pose_correctives,
    skinning_weights,
)
from lib.synthetic.head_geometry import build_geometry
from lib.utils.atomic import atomic_pickle

FLAME_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "J", "weights",
              "kintree_table", "bs_style", "bs_type")
KINTREE = np.array([[2 ** 32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)


def build_head_model(seed=0):
    """Generate the synthetic head model. seed: int -> dict in FLAME's layout (see module)."""
    rng = np.random.default_rng(seed)
    geo = build_geometry()
    rig = Rig(geo)
    v = geo["v"].astype(np.float64)
    shapedirs = np.concatenate([identity_bases(rig, rng), expression_bases(rig, rng)], axis=-1)
    posedirs = pose_correctives(rig, rng)
    J_regressor = joint_regressor(rig)
    return {
        "v_template": v,
        "f": geo["f"].astype(np.uint32),
        "shapedirs": np.ascontiguousarray(shapedirs, dtype=np.float64),
        "posedirs": np.ascontiguousarray(posedirs, dtype=np.float64),
        "J_regressor": J_regressor,
        "J": np.asarray(J_regressor @ v, dtype=np.float64),
        "weights": skinning_weights(rig).astype(np.float64),
        "kintree_table": KINTREE.copy(),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }


def save_head_model(model, path):
    """Pickle a model dict (protocol 2) atomically, creating parent folders.
    model: dict from build_head_model; path: str or PathLike."""
    missing = [k for k in FLAME_KEYS if k not in model]
    if missing:
        raise ValueError(f"save_head_model({path}): model lacks FLAME keys {missing}")
    atomic_pickle(path, dict(model), protocol=2)


def _mouth_lines(v, w, front, eye_z):
    """Heights of the mouth: where the jaw weight crosses 1/2 inside the mouth (the highest
    such place on the front midline; lower ones are under the chin) and where the lips meet
    at the front. v: [V, 3], w: [V, 5], front: [V] -> (y_inner, y_lips)"""
    mid = front & (np.abs(v[:, 0]) < 0.006) & (v[:, 2] > eye_z)
    cross = mid & (w[:, 2] > 0.25) & (w[:, 2] < 0.75)
    if not cross.any():
        raise ValueError("region_labels: no vertices where the jaw weight crosses 1/2 "
                         "on the front midline; is this a FLAME-layout head model?")
    y = v[cross, 1]
    y_inner = float(np.median(y[y > y.max() - 0.005]))
    near = mid & (np.abs(v[:, 1] - y_inner) < 0.02)
    outer = near & (v[:, 2] > v[near, 2].max() - 0.006)
    up, low = outer & (w[:, 2] < 0.5), outer & (w[:, 2] >= 0.5)
    if not (up.any() and low.any()):
        return y_inner, y_inner
    return y_inner, float(0.5 * (v[up, 1].min() + v[low, 1].max()))


def region_labels(model):
    """Vertex regions from geometry, weights and rest joints.
    model: FLAME-layout dict -> {name: bool [V]} with 'eyes', 'iris', 'scalp', 'face',
    'brows', 'lips', 'mouth' (inside of the mouth slot), 'nose', 'neck', 'ears'."""
    v = np.asarray(model["v_template"], dtype=np.float64)
    w = np.asarray(model["weights"])
    J = np.asarray(model.get("J", model["J_regressor"] @ v))
    x, y, z = v.T
    ax = np.abs(x)
    eyes = (w[:, 3] + w[:, 4]) > 0.5
    head = ~eyes
    iris = np.zeros(len(v), bool)
    for j in (3, 4):
        on = w[:, j] > 0.5
        d = v[on] - J[j]
        iris[np.flatnonzero(on)] = d[:, 2] > np.cos(np.radians(30)) * np.linalg.norm(d, axis=1)
    ex, ey, ez = np.abs(J[3, 0] - J[4, 0]) / 2, (J[3, 1] + J[4, 1]) / 2, (J[3, 2] + J[4, 2]) / 2
    jaw, neck_j = J[2], J[1]
    front = head & (z > jaw[2] + 0.02)
    y_inner, my = _mouth_lines(v, w, front, ez)
    lip_h = np.where(y > my, 0.0085, 0.0105)                 # upper / lower lip height
    lip_zone = front & ((x / 0.025) ** 2 + ((y - my) / lip_h) ** 2 < 1) & (z > ez + 0.012)
    # inside of the mouth: between the two mouth heights and hidden behind the lips, i.e.
    # well behind the front-most skin over nearly the same (x, y)
    lo, hi = min(my, y_inner) - 0.003, max(my, y_inner) + 0.003
    cand = np.flatnonzero(front & (ax < 0.03) & (y > lo - 0.01) & (y < hi + 0.01))
    tree = scipy.spatial.cKDTree(v[cand, :2])
    local_max = np.array([z[cand[n]].max() for n in tree.query_ball_point(v[cand, :2], 0.003)])
    mouth = np.zeros(len(v), bool)
    mouth[cand] = (z[cand] < local_max - 0.003) & (y[cand] > lo) & (y[cand] < hi)
    lips = lip_zone & ~mouth
    nose = front & (ax < 0.021) & (y > my + 0.014) & (y < ey + 0.008) & (z > ez + 0.024)
    brows = front & (np.abs(ax - ex) < 0.021) & (y > ey + 0.012) & (y < ey + 0.027) \
        & (z > ez)
    hairline = np.interp(z, [-0.07, -0.03, 0.0, 0.05], [neck_j[1] + 0.025, ey, ey + 0.02,
                                                          ey + 0.045])
    ears = head & (ax > 0.064) & (y > jaw[1] - 0.018) & (y < jaw[1] + 0.048) \
        & (z > jaw[2] - 0.036) & (z < jaw[2] + 0.01)
    scalp = head & (y > hairline) & ~ears
    under_chin = (z > neck_j[2] + 0.06) & (y > neck_j[1] - 0.04)
    neck = head & (y < neck_j[1] - 0.03) & ~under_chin
    face = head & ~scalp & ~neck & ~ears & (z > jaw[2] - 0.01)
    return {"scalp": scalp, "face": face, "brows": brows, "lips": lips, "mouth": mouth,
            "eyes": eyes, "iris": iris, "nose": nose, "neck": neck, "ears": ears}


__all__ = ["build_head_model", "save_head_model", "region_labels", "FLAME_KEYS"]

"""Tests of the synthetic head model (lib/synthetic/head_model.py) against independent
truths: FLAME's pickle layout, mesh topology (trimesh), exact winding numbers, an exact
edge-triangle intersection search, a reference numpy LBS and rigid-motion identities.

Shape legend: V vertices, F faces, J joints; edges are [n_edges, 2].
"""
import os
import pickle

import numpy as np
import pytest
import scipy.sparse
import trimesh

from lib.synthetic.head_model import build_head_model, region_labels, save_head_model

KEYS = {"v_template", "f", "shapedirs", "posedirs", "J_regressor", "J", "weights",
        "kintree_table", "bs_style", "bs_type"}


@pytest.fixture(scope="module")
def model():
    return build_head_model(seed=0)


# ----------------------------------------------------------------------------- helpers
def _rodrigues(r):
    """Axis-angle [3] -> rotation [3, 3] (float64 reference)."""
    t = np.linalg.norm(r)
    if t < 1e-12:
        return np.eye(3)
    k = r / t
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def _lbs(m, shape=None, exp=None, pose=None):
    """Minimal FLAME forward in numpy. shape [<=300], exp [<=100], pose [15] -> [V, 3]."""
    beta = np.zeros(m["shapedirs"].shape[-1])
    if shape is not None:
        beta[: len(shape)] = shape
    if exp is not None:
        beta[300: 300 + len(exp)] = exp
    v = m["v_template"] + m["shapedirs"] @ beta
    J = m["J_regressor"] @ v
    pose = np.zeros(15) if pose is None else np.asarray(pose, float)
    R = np.stack([_rodrigues(pose[3 * i: 3 * i + 3]) for i in range(5)])
    v = v + m["posedirs"] @ (R[1:] - np.eye(3)).reshape(-1)
    parents = m["kintree_table"][0].astype(np.int64)
    G = np.zeros((5, 4, 4))
    for i in range(5):
        T = np.eye(4)
        T[:3, :3] = R[i]
        T[:3, 3] = J[i] - (J[parents[i]] if i else 0.0)
        G[i] = T if i == 0 else G[parents[i]] @ T
    for i in range(5):
        G[i, :3, 3] -= G[i, :3, :3] @ J[i]
    T = np.einsum("vj,jab->vab", m["weights"], G)
    return np.einsum("vab,vb->va", T[:, :3, :3], v) + T[:, :3, 3]


def _components(m):
    """Connected components of the mesh, largest first. -> list of vertex-index arrays."""
    f = m["f"].astype(np.int64)
    n = len(m["v_template"])
    adj = scipy.sparse.coo_matrix((np.ones(3 * len(f)), (f.ravel(), np.roll(f, 1, 1).ravel())),
                                  shape=(n, n))
    k, lab = scipy.sparse.csgraph.connected_components(adj, directed=False)
    comps = [np.flatnonzero(lab == i) for i in range(k)]
    return sorted(comps, key=len, reverse=True)


def _sub_faces(f, ids):
    """Faces whose vertices all lie in ids, reindexed. -> [F', 3]"""
    f = f.astype(np.int64)
    remap = -np.ones(f.max() + 1, np.int64)
    remap[ids] = np.arange(len(ids))
    sub = remap[f]
    return sub[(sub >= 0).all(1)]


def _winding_number(v, f, q):
    """Exact winding number of a closed mesh at point q (solid angles). -> float"""
    a, b, c = (v[f[:, i]] - q for i in range(3))
    la, lb, lc = (np.linalg.norm(x, axis=1) for x in (a, b, c))
    num = np.einsum("ij,ij->i", a, np.cross(b, c))
    den = la * lb * lc + np.einsum("ij,ij->i", a, b) * lc + np.einsum("ij,ij->i", b, c) * la \
        + np.einsum("ij,ij->i", c, a) * lb
    return float(np.sum(2 * np.arctan2(num, den)) / (4 * np.pi))


def _sorted_unique(a):
    a = np.sort(a)
    return a[np.concatenate([[True], a[1:] != a[:-1]])]


def _edges(f):
    """Unique undirected edges of faces [F, 3] -> [n_edges, 2]."""
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), 1)
    n = int(f.max()) + 1
    key = _sorted_unique(e[:, 0] * n + e[:, 1])
    return np.stack([key // n, key % n], 1)


def _crossings(v, f, cell=0.005):
    """Number of (edge, triangle) pairs that cross without sharing a vertex: 0 for an
    embedded surface. Candidates come from a uniform grid over bounding boxes.
    v: [N, 3], f: [F, 3] -> int"""
    f = np.asarray(f, dtype=np.int64)
    e = _edges(f)

    def cells(lo, hi):
        a = np.floor(lo / cell).astype(np.int64)
        size = np.floor(hi / cell).astype(np.int64) - a + 1
        n = size.prod(1)
        own = np.repeat(np.arange(len(lo)), n)
        off = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        s = size[own]
        ix = a[own, 0] + off % s[:, 0]
        iy = a[own, 1] + (off // s[:, 0]) % s[:, 1]
        iz = a[own, 2] + off // (s[:, 0] * s[:, 1])
        return own, ((ix + 1000) * 2000 + iy + 1000) * 2000 + iz + 1000

    tri = v[f]
    t_own, t_key = cells(tri.min(1), tri.max(1))
    p, q = v[e[:, 0]], v[e[:, 1]]
    e_own, e_key = cells(np.minimum(p, q), np.maximum(p, q))
    order = np.argsort(t_key, kind="stable")
    t_key, t_own = t_key[order], t_own[order]
    lo = np.searchsorted(t_key, e_key, "left")
    cnt = np.searchsorted(t_key, e_key, "right") - lo
    ei = np.repeat(e_own, cnt)
    ti = t_own[np.repeat(lo, cnt) + np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)]
    pair = _sorted_unique(ei * len(f) + ti)
    ei, ti = pair // len(f), pair % len(f)
    keep = ~((f[ti] == e[ei, 0:1]).any(1) | (f[ti] == e[ei, 1:2]).any(1))
    ei, ti = ei[keep], ti[keep]
    o, d = v[e[ei, 0]], v[e[ei, 1]] - v[e[ei, 0]]
    t0 = v[f[ti, 0]]
    e1, e2 = v[f[ti, 1]] - t0, v[f[ti, 2]] - t0
    pv = np.cross(d, e2)
    det = np.einsum("ij,ij->i", e1, pv)
    ok = np.abs(det) > 1e-30
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    s = o - t0
    u = np.einsum("ij,ij->i", s, pv) * inv
    qq = np.cross(s, e1)
    w = np.einsum("ij,ij->i", d, qq) * inv
    t = np.einsum("ij,ij->i", e2, qq) * inv
    return int(np.sum(ok & (u >= 0) & (w >= 0) & (u + w <= 1) & (t >= 0) & (t <= 1)))


def _face_normals(v, f):
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def _signed_volume(v, f):
    t = v[f]
    return float(np.einsum("ij,ij->i", t[:, 0], np.cross(t[:, 1], t[:, 2])).sum() / 6.0)


@pytest.fixture(scope="module")
def parts(model):
    """Head-surface vertices/faces and the two eyeballs (left = +x first)."""
    comps = _components(model)
    head, eyes = comps[0], comps[1:]
    eyes = sorted(eyes, key=lambda c: -model["v_template"][c, 0].mean())
    return {"head": head, "head_f": _sub_faces(model["f"], head), "eyes": eyes}


# ------------------------------------------------------------------------------- tests
def test_flame_layout(model):
    assert set(model) == KEYS
    V = len(model["v_template"])
    assert 3000 <= V <= 8000 and V != 5023
    assert model["v_template"].dtype == np.float64 and model["v_template"].shape == (V, 3)
    assert model["f"].dtype == np.uint32 and model["f"].shape[1] == 3
    assert model["f"].max() == V - 1 and model["f"].min() == 0
    assert model["shapedirs"].shape == (V, 3, 400) and model["shapedirs"].dtype == np.float64
    assert model["posedirs"].shape == (V, 3, 36) and model["posedirs"].dtype == np.float64
    assert isinstance(model["J_regressor"], scipy.sparse.csc_matrix)
    assert model["J_regressor"].shape == (5, V) and model["J_regressor"].dtype == np.float64
    assert model["J"].shape == (5, 3) and model["weights"].shape == (V, 5)
    assert model["weights"].dtype == np.float64
    assert model["kintree_table"].dtype == np.int64
    np.testing.assert_array_equal(model["kintree_table"],
                                  [[2 ** 32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]])
    assert model["bs_style"] == "lbs" and model["bs_type"] == "lrotmin"
    for k in ("v_template", "shapedirs", "posedirs", "weights", "J"):
        assert np.all(np.isfinite(model[k])), k


@pytest.mark.slow
def test_deterministic_and_seeded(model):
    again = build_head_model(seed=0)
    for k in KEYS - {"J_regressor", "bs_style", "bs_type"}:
        assert again[k].dtype == model[k].dtype
        assert again[k].tobytes() == model[k].tobytes(), k
    assert (again["J_regressor"] != model["J_regressor"]).nnz == 0
    other = build_head_model(seed=1)
    assert not np.array_equal(other["shapedirs"], model["shapedirs"])
    np.testing.assert_array_equal(other["v_template"], model["v_template"])


def test_components_closed_and_outward(model, parts):
    v, f = model["v_template"], model["f"].astype(np.int64)
    assert len(_components(model)) == 3
    head = trimesh.Trimesh(v[parts["head"]], parts["head_f"], process=False)
    assert head.is_watertight and head.is_winding_consistent and head.volume > 0
    assert _crossings(head.vertices, head.faces) == 0
    centre = head.vertices.mean(0)
    assert abs(_winding_number(head.vertices, head.faces, centre) - 1) < 1e-6
    for ids in parts["eyes"]:
        eye = trimesh.Trimesh(v[ids], _sub_faces(f, ids), process=False)
        assert eye.is_watertight and eye.is_winding_consistent
        r = np.linalg.norm(eye.vertices - eye.vertices.mean(0), axis=1)
        assert np.ptp(r) < 1e-9 and 0.009 < r.mean() < 0.016       # a sphere of eyeball size
        assert 0.9 * 4 / 3 * np.pi * r.mean() ** 3 < eye.volume < 4 / 3 * np.pi * r.mean() ** 3
        # the eyeball sits in its socket: its centre is inside the head
        assert _winding_number(head.vertices, head.faces, eye.vertices.mean(0)) > 0.99


def test_proportions_and_scaled_fit(model, parts):
    v = model["v_template"][parts["head"]]
    size = np.ptp(v, axis=0)
    assert 0.14 < size[0] < 0.19 and 0.25 < size[1] < 0.29 and 0.18 < size[2] < 0.26
    assert v[:, 1].min() > -0.15 and v[:, 1].max() < 0.125
    s = model["v_template"] * 6.0
    s[:, 2] -= (s[:, 2].min() + s[:, 2].max()) / 2
    assert np.abs(s).max() < 0.9


def test_skinning_weights(model, parts):
    w, v = model["weights"], model["v_template"]
    assert np.all(w >= 0) and np.allclose(w.sum(1), 1.0, atol=1e-12)
    left, right = parts["eyes"]
    assert np.all(w[left, 3] == 1.0) and np.all(w[right, 4] == 1.0)
    head = parts["head"]
    assert np.all(w[head, 3] == 0) and np.all(w[head, 4] == 0)
    hv = v[head]
    mid = np.abs(hv[:, 0]) < 0.004
    nose_tip = head[np.argmax(np.where(mid, hv[:, 2], -np.inf))]
    assert w[nose_tip, 1] > 0.99                                  # face on the neck joint
    chin_zone = mid & (hv[:, 1] < model["J"][2, 1] - 0.07)
    chin = head[np.argmax(np.where(chin_zone, hv[:, 2], -np.inf))]
    assert w[chin, 2] > 0.95                                      # chin on the jaw
    top = head[np.argmax(hv[:, 1])]
    assert w[top, 1] > 0.99
    bottom = head[hv[:, 1] < hv[:, 1].min() + 0.002]
    assert np.all(w[bottom, 0] > 0.95)                            # neck base on the root


def test_joint_regressor(model, parts):
    R, v, J = model["J_regressor"], model["v_template"], model["J"]
    dense = R.toarray()
    assert np.all(dense >= 0) and np.allclose(dense.sum(1), 1.0)
    assert np.all((dense > 0).sum(1) < 0.1 * len(v))
    np.testing.assert_allclose(R @ v, J, atol=1e-12)
    left, right = parts["eyes"]
    np.testing.assert_allclose(J[3], v[left].mean(0), atol=1e-9)
    np.testing.assert_allclose(J[4], v[right].mean(0), atol=1e-9)
    np.testing.assert_allclose(J[3] * [-1, 1, 1], J[4], atol=1e-9)
    assert J[3, 0] > 0.02
    assert np.all(np.abs(J[:3, 0]) < 1e-6)
    assert J[2, 1] < J[3, 1] - 0.015 and J[2, 2] < J[3, 2] - 0.03   # jaw below/behind eyes
    assert J[1, 1] < J[2, 1] - 0.02 and J[0, 1] < J[1, 1]          # neck, root below
    hv, hf = v[parts["head"]], parts["head_f"]
    ear_level = np.abs(hv[:, 1] - J[2, 1]) < 0.01
    assert hv[ear_level, 2].min() < J[2, 2] < hv[ear_level, 2].max() - 0.06
    for j in range(3):
        assert _winding_number(hv, hf, J[j]) > 0.99                # inside the head


def test_eyes_turn_rigidly_about_their_joints(model, parts):
    pose = np.zeros(15)
    pose[9:12] = [0.2, 0.5, 0.0]
    pose[12:15] = [-0.1, -0.3, 0.1]
    posed = _lbs(model, pose=pose)
    v, J = model["v_template"], model["J"]
    for ids, j in zip(parts["eyes"], (3, 4)):
        Rj = _rodrigues(pose[3 * j: 3 * j + 3])
        np.testing.assert_allclose(posed[ids], (v[ids] - J[j]) @ Rj.T + J[j], atol=1e-12)
    np.testing.assert_allclose(posed[parts["head"]], v[parts["head"]], atol=3e-3)


@pytest.mark.parametrize("angle", [0.2, 0.3, 0.4])
def test_jaw_opens_the_mouth(model, parts, angle):
    pose = np.zeros(15)
    pose[6] = angle
    posed = _lbs(model, pose=pose)
    v, w = model["v_template"], model["weights"]
    head = parts["head"]
    upper = head[(w[head, 1] > 0.999) & (v[head, 2] > model["J"][3, 2])]
    moved = np.linalg.norm(posed[upper] - v[upper], axis=1)
    assert moved.max() < 1e-3                                       # upper face stays
    assert np.all(moved[v[upper, 1] > model["J"][2, 1]] < 1e-5)
    lower = head[w[head, 2] > 0.999]
    drop = v[lower, 1] - posed[lower, 1]
    assert drop.max() > 0.07 * angle                                # chin/lower lip go down
    # the lips part: vertical gap between the lowest upper-face and highest lower-jaw
    # vertex on the front midline grows by centimetres
    mid = np.abs(v[:, 0]) < 0.004
    front_upper = upper[mid[upper]]
    front_lower = lower[mid[lower] & (v[lower, 2] > model["J"][3, 2] + 0.01)]
    gap0 = v[front_upper, 1].min() - v[front_lower, 1].max()
    gap1 = posed[front_upper, 1].min() - posed[front_lower, 1].max()
    assert gap1 - gap0 > 0.05 * angle
    sub = posed[head]
    hf = parts["head_f"]
    assert _crossings(sub, hf) == 0
    assert _signed_volume(sub, hf) > 0


def _plausible(model, parts, verts):
    """Closed head, still embedded, winding number ~1 inside, few flipped faces."""
    hf = parts["head_f"]
    ref = _face_normals(model["v_template"][parts["head"]], hf)
    sub = verts[parts["head"]]
    assert _signed_volume(sub, hf) > 0
    assert abs(_winding_number(sub, hf, sub.mean(0)) - 1) < 1e-6
    flipped = np.mean(np.einsum("ij,ij->i", _face_normals(sub, hf), ref) < 0)
    assert flipped < 0.002
    assert _crossings(sub, hf) == 0
    for ids, j in zip(parts["eyes"], (3, 4)):                       # eyes stay in sockets
        assert _winding_number(sub, hf, verts[ids].mean(0)) > 0.99


@pytest.mark.parametrize("k", range(10))
def test_identity_extremes_stay_plausible(model, parts, k):
    for s in (-2.0, 2.0):
        shape = np.zeros(300)
        shape[k] = s
        verts = _lbs(model, shape=shape)
        _plausible(model, parts, verts)
        s6 = verts * 6.0
        assert np.abs(s6[:, 0]).max() < 0.9 and np.abs(s6[:, 1]).max() < 0.95


@pytest.mark.parametrize("k", range(10))
def test_expression_extremes_stay_plausible(model, parts, k):
    for s in (-2.0, 2.0):
        exp = np.zeros(100)
        exp[k] = s
        _plausible(model, parts, _lbs(model, exp=exp))


def test_bases_structure(model, parts):
    sd, pd = model["shapedirs"], model["posedirs"]
    rms = np.sqrt(np.mean(np.sum(sd ** 2, axis=1), axis=0))
    assert np.all(np.diff(rms[:300]) <= 0) and np.all(np.diff(rms[300:]) <= 0)
    assert np.all(rms > 0)
    big = np.linalg.norm(sd[:, :, :10], axis=1).max(0)
    assert np.all(big > 0.002) and np.all(big < 0.012)            # visible, not wild
    for ids in parts["eyes"]:
        # identity moves each eyeball rigidly (a translation), expressions never move it
        np.testing.assert_allclose(sd[ids, :, :300], np.broadcast_to(sd[ids[:1], :, :300],
                                                                     sd[ids, :, :300].shape))
        assert np.all(sd[ids, :, 300:] == 0) and np.all(pd[ids] == 0)
    assert 0 < np.abs(pd).max() < 0.01                            # small pose correctives
    # smooth: neighbouring vertices move alike (displacement gradient well below 1)
    f = parts["head_f"]
    head = parts["head"]
    e = _edges(f)
    hv = model["v_template"][head]
    length = np.linalg.norm(hv[e[:, 0]] - hv[e[:, 1]], axis=1)
    for k in list(range(10)) + list(range(300, 310)):
        d = sd[head, :, k]
        grad = np.linalg.norm(d[e[:, 0]] - d[e[:, 1]], axis=1) / length
        assert np.percentile(grad, 99) < 0.5, k


def test_save_load_round_trip(model, tmp_path):
    path = tmp_path / "nested" / "dir" / "generic_model.pkl"
    save_head_model(model, path)
    assert sorted(os.listdir(path.parent)) == ["generic_model.pkl"]
    with open(path, "rb") as fh:
        raw = fh.read()
    assert raw[:2] == b"\x80\x02"                                 # pickle protocol 2
    loaded = pickle.loads(raw)
    assert set(loaded) == KEYS
    for k in KEYS - {"J_regressor", "bs_style", "bs_type"}:
        assert loaded[k].dtype == model[k].dtype and np.array_equal(loaded[k], model[k]), k
    assert isinstance(loaded["J_regressor"], scipy.sparse.csc_matrix)
    assert (loaded["J_regressor"] != model["J_regressor"]).nnz == 0
    assert loaded["bs_style"] == "lbs" and loaded["bs_type"] == "lrotmin"
    with pytest.raises(ValueError, match="lacks FLAME keys"):
        save_head_model({"v_template": model["v_template"]}, tmp_path / "bad.pkl")
    assert not (tmp_path / "bad.pkl").exists()


def test_region_labels(model, parts):
    labels = region_labels(model)
    v, J = model["v_template"], model["J"]
    V = len(v)
    need = {"scalp", "face", "brows", "lips", "eyes", "iris", "nose", "neck", "ears", "mouth"}
    assert need <= set(labels)
    for name, lab in labels.items():
        assert lab.dtype == bool and lab.shape == (V,) and lab.any(), name
    eyes = np.zeros(V, bool)
    eyes[np.concatenate(parts["eyes"])] = True
    np.testing.assert_array_equal(labels["eyes"], eyes)
    iris = labels["iris"]
    assert np.all(eyes[iris]) and 0.05 < iris.sum() / eyes.sum() < 0.2
    assert np.all(v[iris, 2] > J[3, 2] + 0.009)
    head = parts["head"]
    assert labels["scalp"][head[np.argmax(v[head, 1])]]            # top of the head
    assert labels["nose"][head[np.argmax(v[head, 2])]]             # most forward point
    assert labels["neck"][head[np.argmin(v[head, 1])]]
    assert not np.any(labels["scalp"] & labels["face"])
    eye_y = J[3, 1]
    assert v[labels["brows"], 1].min() > eye_y and np.all(v[labels["brows"], 2] > 0)
    nose_y, lips_y = v[labels["nose"], 1].mean(), v[labels["lips"], 1].mean()
    assert lips_y < nose_y < eye_y
    assert np.all(np.abs(v[labels["lips"], 0]) < 0.03)
    assert np.all(np.abs(v[labels["ears"], 0]) > 0.06)
    assert v[labels["scalp"], 1].mean() > eye_y + 0.03

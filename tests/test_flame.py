"""Tests of lib/flame against a float64 numpy reference and known transforms.

A small random model in FLAME's exact pickle layout is written into tmp_path
(V=300, 400 shapedirs components, sparse J_regressor, parents [-1, 0, 1, 1, 1]).
Tolerance for float32 torch vs float64 numpy: 1e-5 absolute (scaled space, |x| <~ 1).
"""
from __future__ import annotations

import math
import pickle
import sys
import types
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from lib.flame import FLAME, FlameFrames, FlameModelError, FLAMEServer, load_flame_model
from lib.flame.lbs import (
    batch_rodrigues,
    deform_canonical,
    matrix_to_axis_angle,
    pose_to_feature,
    rigid_chain,
    skin_offset,
    skin_points,
)

try:
    from flame_reference import reference_flame
except ImportError:  # tests collected as a package
    from tests.flame_reference import reference_flame

TOL = 1e-5
V, F, NJ = 300, 200, 5


def make_model(seed: int = 0) -> dict:
    """Random FLAME-layout model (float64 arrays, sparse J_regressor)."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(V, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    v_template = d * np.array([0.08, 0.11, 0.1]) + np.array([0.0, 0.02, 0.03])
    faces = rng.integers(0, V, size=(F, 3)).astype(np.uint32)
    shapedirs = rng.normal(scale=2e-3, size=(V, 3, 400))
    posedirs = rng.normal(scale=2e-3, size=(V, 3, 36))
    rows, cols, vals = [], [], []
    for j in range(NJ):
        idx = rng.choice(V, size=12, replace=False)
        wts = rng.uniform(0.1, 1.0, size=12)
        rows += [j] * 12
        cols += idx.tolist()
        vals += (wts / wts.sum()).tolist()
    J_regressor = sp.csc_matrix((vals, (rows, cols)), shape=(NJ, V))
    weights = rng.dirichlet(np.full(NJ, 0.5), size=V)
    kintree = np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)
    return {"v_template": v_template, "f": faces, "shapedirs": shapedirs,
            "posedirs": posedirs, "J_regressor": J_regressor, "weights": weights,
            "kintree_table": kintree, "bs_style": "lbs", "bs_type": "lrotmin"}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    model = make_model()
    path = tmp_path_factory.mktemp("flame") / "generic_model.pkl"
    with open(path, "wb") as fh:
        pickle.dump(model, fh, protocol=2)
    return model, path


@pytest.fixture(scope="module")
def flame(model_file):
    return FLAME(model_file[1])


@pytest.fixture(scope="module")
def server(model_file):
    return FLAMEServer(model_file[1])


def random_params(B, n_pose=15, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = torch.randn(B, 100, generator=g)
    exp = torch.randn(B, 50, generator=g)
    pose = 0.4 * torch.randn(B, n_pose, generator=g)
    return shape, exp, pose


# ----------------------------------------------------------------------------- FLAME
@pytest.mark.parametrize("n_pose", [15, 6])
def test_forward_matches_reference(model_file, flame, n_pose):
    model, _ = model_file
    shape, exp, pose = random_params(3, n_pose, seed=n_pose)
    out = flame(shape, exp, pose)
    worst = 0.0
    for b in range(3):
        ref = reference_flame(model, shape[b].double().numpy(), exp[b].double().numpy(),
                              pose[b].double().numpy())
        for key, got in (("vertices", out.vertices[b]), ("joints", out.joints[b]),
                         ("T", out.T[b]), ("pose_feature", out.pose_feature[b])):
            err = np.abs(got.double().numpy() - ref[key]).max()
            worst = max(worst, err)
            assert err < TOL, (key, err)
        assert flame.z_shift == pytest.approx(ref["z_shift"], abs=1e-12)
    assert out.vertices.shape == (3, V, 3) and out.T.shape == (3, NJ, 4, 4)
    assert out.weights.shape == (V, NJ) and out.pose_feature.shape == (3, 36)
    print(f"max |torch - reference| ({n_pose}-d pose): {worst:.3e}")


def test_buffers_and_attributes(model_file, flame):
    model, _ = model_file
    assert flame.parents == [-1, 0, 1, 1, 1]
    assert flame.faces.dtype == torch.long and flame.faces.shape == (F, 3)
    np.testing.assert_allclose(flame.expdirs.numpy(), model["shapedirs"][..., 300:350], atol=1e-7)
    np.testing.assert_allclose(flame.shapedirs.numpy(), model["shapedirs"][..., :100], atol=1e-7)
    np.testing.assert_allclose(flame.expdirs_scaled.numpy(), 6 * model["shapedirs"][..., 300:350],
                               atol=1e-6)
    np.testing.assert_allclose(flame.posedirs_scaled.numpy(),
                               6 * model["posedirs"].transpose(0, 2, 1), atol=1e-6)
    # zero parameters: the scaled template, centred in z
    zero = flame(torch.zeros(1, 100), torch.zeros(1, 50), torch.zeros(1, 15))
    z = zero.vertices[0, :, 2]
    assert abs(float(z.min() + z.max())) < 1e-6
    np.testing.assert_allclose(zero.vertices[0, :, :2].numpy(), 6 * model["v_template"][:, :2],
                               atol=1e-5)


def test_transforms_are_rigid(flame):
    shape, exp, pose = random_params(4, seed=7)
    T = flame(shape, exp, pose).T.double()
    R = T[..., :3, :3]
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(R.transpose(-1, -2) @ R, eye.expand_as(R), atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(4, NJ, dtype=torch.float64), atol=1e-5)
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.equal(T[..., 3, :], bottom.expand(4, NJ, 4))


def test_vertices_are_skinned_rest_vertices(model_file, flame):
    model, _ = model_file
    shape, exp, pose = random_params(2, seed=3)
    out = flame(shape, exp, pose)
    rest = flame.rest_vertices(shape, exp, out.pose_feature)
    # independent rest vertices: 6 * (template + offsets + correctives) + z_shift
    for b in range(2):
        v = model["v_template"] + model["shapedirs"][..., :100] @ shape[b].double().numpy() \
            + model["shapedirs"][..., 300:350] @ exp[b].double().numpy() \
            + model["posedirs"] @ out.pose_feature[b].double().numpy()
        expect = 6 * v + np.array([0, 0, flame.z_shift])
        assert np.abs(rest[b].double().numpy() - expect).max() < TOL
    skinned = skin_points(rest, out.weights.expand(2, -1, -1), out.T)
    assert torch.allclose(skinned, out.vertices, atol=TOL)


# ----------------------------------------------------------------------------- LBS
def test_rodrigues_matches_scipy_and_is_smooth_at_zero():
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(0)
    rv = np.concatenate([rng.normal(size=(20, 3)), 1e-6 * rng.normal(size=(5, 3)),
                         np.zeros((1, 3))])
    got = batch_rodrigues(torch.as_tensor(rv)).numpy()
    np.testing.assert_allclose(got, Rotation.from_rotvec(rv).as_matrix(), atol=1e-12)
    x = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(batch_rodrigues, (x,))
    x = torch.tensor([[1e-5, -2e-5, 3e-6]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(batch_rodrigues, (x,))
    x = torch.tensor([[0.3, -1.2, 0.5]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(batch_rodrigues, (x,))


def test_rigid_chain_and_pose_feature_known_values():
    rot = torch.eye(3).repeat(1, NJ, 1, 1)
    rot[0, 2] = batch_rodrigues(torch.tensor([0.0, 0.0, math.pi / 2]))
    joints = torch.tensor([[[0.0, 0, 0], [0, 1, 0], [1, 1, 0], [0, 2, 0], [0, 3, 0]]])
    posed, A = rigid_chain(rot, joints, [-1, 0, 1, 1, 1])
    assert torch.allclose(posed, joints, atol=1e-6)  # only jaw rotates, about itself
    p = torch.tensor([2.0, 1.0, 0.0, 1.0])  # rotate (2,1,0) by 90 deg about (1,1,0)
    assert torch.allclose(A[0, 2] @ p, torch.tensor([1.0, 2.0, 0.0, 1.0]), atol=1e-6)
    feat = pose_to_feature(rot)
    assert feat.shape == (1, 36)
    expect = torch.zeros(36)
    expect[9:18] = (rot[0, 2] - torch.eye(3)).reshape(-1)
    assert torch.allclose(feat[0], expect)


def test_skin_unskin_round_trip(flame):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, 3, generator=g, dtype=torch.float64)
    w = torch.softmax(torch.randn(2, 64, NJ, generator=g, dtype=torch.float64), -1)
    T = flame(*random_params(2, seed=9)).T.double()
    y = skin_points(x, w, T)
    # skin_offset with identity targets and no offset applies the inverse of the canonical blend
    eye = torch.eye(4, dtype=torch.float64).expand(2, 1, NJ, 4, 4)
    assert torch.allclose(skin_offset(y, w, torch.zeros_like(x), eye, T[:, None]), x, atol=1e-10)
    assert torch.allclose(skin_offset(x, w, torch.zeros_like(x), T[:, None], eye), y, atol=1e-10)


def test_deform_canonical_identity_and_flame_vertices(server, flame):
    shape, exp, pose = random_params(3, seed=11)
    params = torch.cat([torch.ones(3, 1), torch.zeros(3, 3), pose, shape, exp], dim=1)
    out = server(params)
    B = 3
    w = flame.lbs_weights.expand(B, -1, -1)
    E = flame.expdirs_scaled
    P = flame.posedirs_scaled
    item = replace(out, **{k: getattr(out, k)[:, None] for k in
                           ("exp", "pose_feature", "tfs", "exp_c", "pose_feature_c", "tfs_c")})
    same = deform_canonical(out.verts_c, w, E, P, item.exp_c, item.pose_feature_c,
                            item.tfs_c, item.exp_c, item.pose_feature_c, item.tfs_c)
    assert torch.allclose(same, out.verts_c, atol=1e-6)
    xd = deform_canonical(out.verts_c, w, E.expand(B, -1, -1, -1), P.expand(B, -1, -1, -1),
                          item.exp, item.pose_feature, item.tfs,
                          item.exp_c, item.pose_feature_c, item.tfs_c)
    assert (xd - out.verts).abs().max() < TOL


# ----------------------------------------------------------------------------- server
def test_server_canonical_and_param_lengths(server, flame):
    shape, exp, pose = random_params(2, seed=13)
    pose15 = pose.clone()
    pose15[:, 3:6] = 0
    pose15[:, 9:15] = 0
    pose6 = torch.cat([pose15[:, 0:3], pose15[:, 6:9]], dim=1)
    head = torch.cat([torch.rand(2, 1) + 0.5, torch.randn(2, 3)], dim=1)
    p169 = torch.cat([head, pose15, shape, exp], dim=1)
    p160 = torch.cat([head, pose6, shape, exp], dim=1)
    a, b = server(p169), server(p160)
    for key in ("verts", "joints", "tfs", "pose_feature", "verts_c", "verts_c_neutral", "pose"):
        assert torch.allclose(getattr(a, key), getattr(b, key), atol=1e-6), key
    parts = server.split_params(p160)
    assert parts["scale"].shape == (2, 1) and parts["transl"].shape == (2, 3)
    assert torch.equal(parts["shape"], shape) and torch.equal(parts["exp"], exp)
    expect_c = torch.zeros(2, 15)
    expect_c[:, 6] = 0.2
    assert torch.equal(a.pose_c, expect_c) and torch.equal(a.exp_c, torch.zeros(2, 50))
    ref_c = flame(shape, torch.zeros(2, 50), expect_c)
    assert torch.allclose(a.verts_c, ref_c.vertices, atol=1e-6)
    assert torch.allclose(a.tfs_c, ref_c.T, atol=1e-6)
    neutral = flame(torch.zeros(2, 100), torch.zeros(2, 50), expect_c)
    assert torch.allclose(a.verts_c_neutral, neutral.vertices, atol=1e-6)
    can = server.canonical(shape)
    assert torch.allclose(can.verts_c, a.verts_c, atol=1e-6)
    for bad in (168, 170, 10):
        with pytest.raises(ValueError, match=str(bad)):
            server.split_params(torch.zeros(2, bad))


def test_flame_frames_methods_match_the_plain_tensors(server):
    """index / detach / to / expand / require of the server's FlameFrames, against the server
    evaluated on the selected parameter rows and against plain tensor operations."""
    shape, exp, pose = random_params(3, seed=19)
    head = torch.cat([torch.rand(3, 1) + 0.5, torch.randn(3, 3)], dim=1)
    params = torch.cat([head, pose, shape, exp], dim=1).requires_grad_(True)
    out = server(params)
    names = ["verts", "joints", "tfs", "pose_feature", "pose", "shape", "exp", "scale", "transl",
             "verts_c", "joints_c", "tfs_c", "pose_feature_c", "exp_c", "pose_c", "verts_c_neutral"]
    assert out.present() == names and out.batch_size == 3
    can = server.canonical(shape)
    assert set(can.present()) == {"verts_c", "joints_c", "tfs_c", "pose_feature_c", "exp_c",
                                  "pose_c", "shape"} and can.verts is None
    # index: rows repeat and reorder as the server evaluated on those rows; an int keeps B = 1
    idx = torch.tensor([2, 0, 2])
    for sub, rows in ((out.index(idx), params[idx]), (out.index(1), params[1:2]),
                      (out.index(torch.tensor([True, False, True])), params[[0, 2]])):
        ref = server(rows)
        assert sub.present() == names and sub.batch_size == rows.shape[0]
        for name in names:
            assert torch.allclose(getattr(sub, name), getattr(ref, name), atol=1e-6), name
    assert can.index(slice(0, 2)).verts is None  # absent fields stay absent
    # detach: same values, no graph; the original keeps its graph
    assert out.verts.requires_grad
    det = out.detach()
    for name in names:
        assert not getattr(det, name).requires_grad
        assert torch.equal(getattr(det, name), getattr(out, name))
    # to: every field cast
    f64 = det.to(torch.float64)
    for name in names:
        v = getattr(f64, name)
        assert v.dtype == torch.float64 and torch.equal(v, getattr(det, name).double()), name
    # expand: a batch of 1 broadcasts; another size than B (or 1) is an error naming the field
    one = det.index(0).expand(4)
    assert one.tfs.shape == (4, 5, 4, 4) and torch.equal(one.tfs[3], det.tfs[0])
    assert torch.equal(det.expand(3).verts, det.verts)
    with pytest.raises(ValueError, match="'verts' has batch 3, expected 2"):
        det.expand(2, where="here")
    # require / check
    assert can.require("verts_c", "tfs_c") is can
    with pytest.raises(ValueError, match=r"here: the FLAME outputs lack \['verts', 'tfs'\]"):
        can.require("verts", "tfs", "tfs_c", where="here")
    with pytest.raises(TypeError, match="here: expected the FLAME server's FlameFrames.*dict"):
        FlameFrames.check({"tfs": det.tfs}, "here")
    with pytest.raises(ValueError, match="no tensor"):
        FlameFrames().batch_size


def test_view_params_and_scan_transform(server):
    shape, exp, pose = random_params(2, seed=17)
    params = torch.cat([torch.ones(2, 1), torch.zeros(2, 3), pose, shape, exp], dim=1)
    k = 3
    vp = server.view_params(params, k)
    # the view's root rotation is the yaw composed with the fitted one (float64 reference)
    yaw = 2 * math.pi * 3 / 9
    R_yaw = torch.tensor([[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0],
                          [-math.sin(yaw), 0, math.cos(yaw)]], dtype=torch.float64)
    want = R_yaw @ batch_rodrigues(params[:, 4:7].double())
    assert (batch_rodrigues(vp[:, 4:7].double()) - want).abs().max() < 1e-6
    assert torch.equal(vp[:, 7:], params[:, 7:]) and torch.equal(vp[:, :4], params[:, :4])
    T = server.scan_view_transform(params, k)
    scan = server(params).verts
    view = server(vp).verts
    moved = scan @ T[:, :3, :3].transpose(1, 2) + T[:, None, :3, 3]
    assert (moved - view).abs().max() < TOL
    # the original's formula: the posed scan turned by the yaw about the root joint
    j0 = server(params).joints[:, 0].double()                     # [B, 3]
    turned = (scan.double() - j0[:, None]) @ R_yaw.T + j0[:, None]
    assert (moved.double() - turned).abs().max() < TOL


def test_matrix_to_axis_angle_inverts_rodrigues():
    g = torch.Generator().manual_seed(3)
    axis = torch.nn.functional.normalize(
        torch.randn(500, 3, generator=g, dtype=torch.float64), dim=-1
    )
    angle = torch.rand(500, 1, generator=g, dtype=torch.float64) * (math.pi - 1e-3)
    rv = torch.cat([axis * angle, torch.zeros(1, 3, dtype=torch.float64),
                    torch.tensor([[1e-9, 0.0, 0.0], [0.0, 0.0, math.pi]], dtype=torch.float64)])
    out = matrix_to_axis_angle(batch_rodrigues(rv))
    assert (out[:-1] - rv[:-1]).abs().max() < 1e-9   # the same vector below pi
    # at pi the axis sign is ambiguous: the rotation must agree
    assert (batch_rodrigues(out) - batch_rodrigues(rv)).abs().max() < 1e-9


# ----------------------------------------------------------------------------- loader
def test_loader_reads_chumpy_pickle_without_chumpy(tmp_path):
    model = make_model(seed=2)
    chumpy = types.ModuleType("chumpy")
    ch_mod = types.ModuleType("chumpy.ch")

    class Ch:  # imitates chumpy.Ch's pickled state
        def __init__(self, x):
            self.x = x
            self._dirty_vars = {"x"}
            self._depends_on_deps = {}

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    ch_mod.Ch = Ch
    chumpy.ch = ch_mod
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = chumpy, ch_mod
    try:
        payload = dict(model)
        for key in ("v_template", "shapedirs", "posedirs", "weights"):
            payload[key] = Ch(model[key])
        raw = pickle.dumps(payload, protocol=2)
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]
    # emulate the legacy module paths of the Python-2 era file (GLOBAL lines are text)
    assert b"numpy._core.multiarray\n" in raw and b"scipy.sparse._csc\n" in raw
    raw = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    raw = raw.replace(b"scipy.sparse._csc\n", b"scipy.sparse.csc\n")
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(raw)
    loaded = load_flame_model(path)
    for key in ("v_template", "shapedirs", "posedirs", "weights"):
        assert isinstance(loaded[key], np.ndarray) and loaded[key].dtype == np.float64
        np.testing.assert_array_equal(loaded[key], model[key])
    assert sp.issparse(loaded["J_regressor"])
    assert loaded["f"].dtype == np.int64 and loaded["parents"] == [-1, 0, 1, 1, 1]


def test_loader_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    # hand-written protocol-0 pickle: {'v_template': os.system('touch <marker>')}
    payload = (b"(dp0\nS'v_template'\np1\ncos\nsystem\np2\n(S'touch " + str(marker).encode()
               + b"'\np3\ntp4\nRp5\ns.")
    path = tmp_path / "evil.pkl"
    path.write_bytes(payload)
    with pytest.raises(FlameModelError, match=r"os\.system") as info:
        load_flame_model(path)
    assert "evil.pkl" in str(info.value)
    assert not marker.exists()


def test_loader_missing_file_and_bad_shapes(tmp_path):
    with pytest.raises(FlameModelError) as info:
        load_flame_model(tmp_path / "nope.pkl")
    msg = str(info.value)
    assert "FLAME 2020" in msg and "flame.is.tue.mpg.de" in msg
    assert "tools/make_synthetic.py" in msg and "data/synthetic/flame/generic_model.pkl" in msg
    for key, bad in (("posedirs", np.zeros((V, 3, 35))), ("weights", np.zeros((V, 4))),
                     ("shapedirs", np.zeros((V, 3, 300))), ("J_regressor", np.zeros((5, V + 1)))):
        model = make_model(seed=3)
        model[key] = bad
        path = tmp_path / f"bad_{key}.pkl"
        with open(path, "wb") as fh:
            pickle.dump(model, fh, protocol=2)
        with pytest.raises(FlameModelError, match=key):
            load_flame_model(path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_parity(model_file):
    model, path = model_file
    flame = FLAME(path).to("cuda")
    shape, exp, pose = random_params(4, seed=21)
    out = flame(shape.cuda(), exp.cuda(), pose.cuda())
    assert out.vertices.is_cuda
    cpu = FLAME(path)(shape, exp, pose)
    assert torch.allclose(out.vertices.cpu(), cpu.vertices, atol=TOL)
    assert torch.allclose(out.T.cpu(), cpu.T, atol=TOL)
    server = FLAMEServer(path).to("cuda")
    params = torch.cat([torch.ones(4, 1), torch.zeros(4, 3), pose, shape, exp], dim=1).cuda()
    res = server(params)
    assert res.verts_c.is_cuda and res.tfs.device.type == "cuda"

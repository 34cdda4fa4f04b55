"""Synthetic FaceVerse-format data: parameter files, the scan transform, scans, motion, CLI.

Independent truths: hand-computed transforms, raw pickle contents, exact point-to-mesh
distances from libigl against the head model posed by FLAME, boundary-edge topology,
texture colours sampled at labelled surface points, and exact file equality.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from lib.dataset.faceverse_io import (
    PARAM_DIM,
    FlameParamsError,
    flame_to_scan_space,
    load_flame_params,
    params_to_vector,
    save_flame_params,
    scan_to_flame_space,
)
from lib.dataset.motion import MotionFormatError, load_motion, save_motion_json, save_motion_npz
from lib.synthetic.motion import make_motion
from lib.utils.atomic import is_temp_name

ROOT = Path(__file__).resolve().parents[1]
HAS_HEAD = importlib.util.find_spec("lib.synthetic.head_model") is not None
needs_head = pytest.mark.skipif(not HAS_HEAD, reason="lib/synthetic/head_model.py not present")


# ----------------------------------------------------------------------------- transform
def test_scan_to_flame_space_by_hand():
    # flip y, z -> z in {0, -2}, mid z -1 -> {1, -1}; 6 / 6 * (v - 0) + (0, 0, 0.5)
    v = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    out = scan_to_flame_space(v, 6.0, np.zeros(3), 0.5)
    np.testing.assert_allclose(out, [[1.0, -2.0, 1.5], [0.0, 0.0, -0.5]], atol=1e-15)
    # scale 2, transl (1, 0, 0): x -> 3 * (x - 1)
    out = scan_to_flame_space(v, 2.0, np.array([1.0, 0.0, 0.0]), 0.0)
    np.testing.assert_allclose(out[:, 0], [0.0, -3.0], atol=1e-15)


def test_transform_round_trip_exact():
    rng = np.random.default_rng(0)
    v = rng.normal(0.0, 0.6, (500, 3))
    for scale, z_shift, z_off in [(0.8, -0.07, 0.0), (1.3, 0.2, 5.0), (1.05, 0.0, -3.3)]:
        txy = rng.uniform(-1, 1, 2)
        v_scan, transl = flame_to_scan_space(v, scale, txy, z_shift, z_off)
        np.testing.assert_array_equal(transl[:2], txy)
        # the registered scan (before the forward mid-z subtraction) is centred in z
        reg = v_scan * np.array([1.0, -1.0, -1.0])
        assert abs(0.5 * (reg[:, 2].min() + reg[:, 2].max()) - z_off) < 1e-12
        back = scan_to_flame_space(v_scan, scale, transl, z_shift)
        np.testing.assert_allclose(back, v, rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------- params files
def test_params_file_layout_and_vector(tmp_path):
    path = tmp_path / "001_01_flame.pkl"
    pose, betas = np.arange(15) * 0.01, np.arange(150) * 0.001
    save_flame_params(path, pose, betas, 1.1, [0.1, 0.2, 0.3])
    with open(path, "rb") as fh:
        raw = pickle.load(fh)
    assert set(raw) == {"pose", "betas", "scale", "transl"}
    assert {k: raw[k].shape for k in raw} == {"pose": (15,), "betas": (150,), "scale": (1, 1),
                                              "transl": (1, 3)}
    assert all(raw[k].dtype == np.float32 for k in raw)
    d = load_flame_params(path)
    assert isinstance(d["scale"], float) and abs(d["scale"] - 1.1) < 1e-6
    vec = params_to_vector(d)
    assert vec.shape == (PARAM_DIM,) == (169,) and vec.dtype == np.float32
    # scale and translation move the scan into FLAME space (scan_to_flame_space); the vector
    # of a processed scan carries scale 1 and translation 0, as the original's preprocessing
    assert vec[0] == 1.0 and np.all(vec[1:4] == 0.0)
    np.testing.assert_allclose(vec[4:19], pose, rtol=1e-6)
    np.testing.assert_allclose(vec[19:119], betas[:100], rtol=1e-6)
    np.testing.assert_allclose(vec[119:169], betas[100:], rtol=1e-6)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary file


def _dump(path, obj):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def test_params_file_errors(tmp_path):
    good = {"pose": np.zeros(15, np.float32), "betas": np.zeros(150, np.float32),
            "scale": np.ones((1, 1), np.float32), "transl": np.zeros((1, 3), np.float32)}
    cases = {"missing.pkl": (None, "not found")}
    (tmp_path / "garbage.pkl").write_bytes(b"this is not a pickle")
    cases["garbage.pkl"] = (None, "not a readable")
    _dump(tmp_path / "nokey.pkl", {k: v for k, v in good.items() if k != "transl"})
    cases["nokey.pkl"] = (None, "'transl'")
    _dump(tmp_path / "short.pkl", {**good, "betas": np.zeros(149, np.float32)})
    cases["short.pkl"] = (None, "'betas' has 149 values")
    _dump(tmp_path / "nan.pkl", {**good, "pose": np.full(15, np.nan, np.float32)})
    cases["nan.pkl"] = (None, "'pose' contains NaN")
    _dump(tmp_path / "evil.pkl", os.system)  # a global that must never be resolved
    cases["evil.pkl"] = (None, "not a readable")
    for name, (_, msg) in cases.items():
        with pytest.raises(FlameParamsError) as err:
            load_flame_params(tmp_path / name)
        assert name in str(err.value) and msg in str(err.value), str(err.value)
    with pytest.raises(FlameParamsError):
        save_flame_params(tmp_path / "w.pkl", np.zeros(14), np.zeros(150), 1.0, np.zeros(3))


# ----------------------------------------------------------------------------- motion
def test_motion_is_talking_like_and_smooth():
    m = make_motion(n_frames=150, fps=30, seed=1)
    assert m["expression"].shape == (150, 50) and m["pose"].shape == (150, 15)
    assert m["shape"].shape == (100,)
    jaw = m["pose"][:, 6].astype(np.float64)
    assert jaw.min() >= 0.0 and 0.08 < jaw.max() < 0.4
    spec = np.abs(np.fft.rfft(jaw - jaw.mean()))
    freqs = np.fft.rfftfreq(150, 1 / 30)
    assert 2.5 <= freqs[np.argmax(spec)] <= 6.0  # syllable rate
    assert np.abs(m["pose"][:, :6]).max() < np.deg2rad(10)  # gentle head motion
    assert m["expression"].std(0)[:5].min() > 0.05  # expressions change
    # smooth: frame-to-frame changes are small compared with the ranges
    for arr in (m["expression"], m["pose"][:, :6]):
        assert np.abs(np.diff(arr, axis=0)).max() < 0.35 * (np.ptp(arr, axis=0).max() + 1e-9)
    again = make_motion(n_frames=150, fps=30, seed=1)
    np.testing.assert_array_equal(again["pose"], m["pose"])
    assert not np.array_equal(make_motion(150, 30, seed=2)["pose"], m["pose"])


def test_motion_files_round_trip(tmp_path):
    m = make_motion(n_frames=40, fps=30, seed=0)
    save_motion_json(tmp_path / "flame_params.json", m)
    save_motion_npz(tmp_path / "motion.npz", m)
    doc = json.loads((tmp_path / "flame_params.json").read_text())
    assert len(doc["shape_params"]) == 100 and len(doc["frames"]) == 40
    assert {"expression", "pose", "frame_id"} <= set(doc["frames"][7])
    assert doc["frames"][7]["frame_id"] == 7 and len(doc["frames"][7]["pose"]) == 15
    with np.load(tmp_path / "motion.npz") as z:
        assert z["expression"].shape == (40, 50) and z["pose"].shape == (40, 15)
    for name in ("flame_params.json", "motion.npz"):
        back = load_motion(tmp_path / name)
        for k in ("expression", "pose", "shape"):
            np.testing.assert_array_equal(back[k], m[k])


def test_motion_malformed_fields(tmp_path):
    m = make_motion(n_frames=6, fps=30, seed=0)
    save_motion_json(tmp_path / "ok.json", m)
    doc = json.loads((tmp_path / "ok.json").read_text())

    def bad_json(name, mutate):
        d = json.loads(json.dumps(doc))
        mutate(d)
        (tmp_path / name).write_text(json.dumps(d))
        with pytest.raises(MotionFormatError) as err:
            load_motion(tmp_path / name)
        assert name in str(err.value)
        return str(err.value)

    msg = bad_json("a.json", lambda d: d["frames"][3].__setitem__("expression", [0.0] * 49))
    assert "frames[3].expression has 49 values, expected 50" in msg
    assert "frames[2]" in bad_json("b.json", lambda d: d["frames"][2].pop("pose"))
    assert "shape_params" in bad_json("c.json", lambda d: d.pop("shape_params"))
    assert "frames[1].pose" in bad_json("d.json", lambda d: d["frames"][1].__setitem__(
        "pose", [0.0] * 15 + [1.0]))
    np.savez(tmp_path / "e.npz", expression=np.zeros((5, 50)))
    with pytest.raises(MotionFormatError, match="'pose'"):
        load_motion(tmp_path / "e.npz")
    np.savez(tmp_path / "f.npz", expression=np.zeros((5, 50)), pose=np.zeros((4, 15)))
    with pytest.raises(MotionFormatError, match="frames"):
        load_motion(tmp_path / "f.npz")
    (tmp_path / "g.json").write_text("{not json")
    with pytest.raises(MotionFormatError, match="g.json"):
        load_motion(tmp_path / "g.json")


# ----------------------------------------------------------------------------- scans
CLI_ARGS = ["--identities", "1", "--expressions", "2", "--seed", "3", "--faces", "30000",
            "--texture-size", "256", "--frames", "30", "--workers", "1"]


def _run_cli(out: Path) -> str:
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic.py"), "--out",
                          str(out), *CLI_ARGS], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def read_obj(path: Path):
    """Minimal independent OBJ reader: v, vt, f v/vt -> verts, faces, uvs, face_uvs."""
    v, vt, f, ft = [], [], [], []
    for line in path.read_text().splitlines():
        tok = line.split()
        if not tok:
            continue
        if tok[0] == "v":
            v.append([float(x) for x in tok[1:4]])
        elif tok[0] == "vt":
            vt.append([float(x) for x in tok[1:3]])
        elif tok[0] == "f":
            f.append([int(c.split("/")[0]) - 1 for c in tok[1:4]])
            ft.append([int(c.split("/")[1]) - 1 for c in tok[1:4]])
    return np.array(v), np.array(f), np.array(vt), np.array(ft)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    if not HAS_HEAD:
        pytest.skip("lib/synthetic/head_model.py not present")
    out = tmp_path_factory.mktemp("synthetic")
    _run_cli(out)
    return out


@pytest.fixture(scope="module")
def head(synth):
    import torch

    from lib.flame import FLAME
    from lib.flame.loader import load_flame_model
    from lib.synthetic.head_model import region_labels

    path = synth / "flame" / "generic_model.pkl"
    flame = FLAME(str(path))
    labels = region_labels(load_flame_model(str(path)))

    def posed(shape, exp, pose):
        with torch.no_grad():
            out = flame(torch.as_tensor(shape, dtype=torch.float32)[None],
                        torch.as_tensor(exp, dtype=torch.float32)[None],
                        torch.as_tensor(pose, dtype=torch.float32)[None])
        return out.vertices[0].double().numpy(), out.T[0].double().numpy()

    return {"path": path, "flame": flame, "labels": labels, "posed": posed,
            "faces": flame.faces.numpy().astype(np.int64)}


def _check_on_model(head, verts, shape, exp, pose):
    """Face-region scan vertices lie on the posed model; far-off vertices are hair on the scalp."""
    import igl

    mv, _ = head["posed"](shape, exp, pose)
    size = float((mv.max(0) - mv.min(0)).max())
    d2, _, _ = igl.point_mesh_squared_distance(verts, mv, head["faces"])
    dist = np.sqrt(d2)
    _, nn = cKDTree(mv).query(verts)
    lab = head["labels"]
    face = lab["face"][nn] & ~lab["scalp"][nn]
    assert face.sum() > 500
    assert dist[face].max() < 0.01 * size, (dist[face].max(), size)
    # anything clearly off the model is hair, and hair grows from the scalp (or its rim)
    far = dist > 0.01 * size
    f = head["faces"]
    rim = np.zeros(len(mv), bool)
    rim[f[lab["scalp"][f].any(1)].ravel()] = True
    assert rim[nn[far]].all()
    return far.mean()


@pytest.mark.slow
@needs_head
@pytest.mark.slow
def test_cli_layout_and_idempotence(synth):
    ids = ["001_01", "001_02"]
    for sid in ids:
        d = synth / "faceverse_dataset" / sid
        assert (d / f"{sid}.obj").is_file() and (d / f"{sid}.jpg").is_file()
        mtl = (d / f"{sid}.mtl").read_text()
        assert f"map_Kd {sid}.jpg" in mtl
        assert f"mtllib {sid}.mtl" in (d / f"{sid}.obj").read_text()[:200]
        assert (synth / "flame_params" / f"{sid}_flame.pkl").is_file()
    assert (synth / "flame" / "generic_model.pkl").is_file()
    assert load_motion(synth / "motion" / "flame_params.json")["pose"].shape == (30, 15)
    assert load_motion(synth / "motion" / "motion.npz")["expression"].shape == (30, 50)
    assert not [p for p in synth.rglob(".*") if is_temp_name(p.name)]
    before = {p: p.stat().st_mtime_ns for p in synth.rglob("*") if p.is_file()}
    stdout = _run_cli(synth)  # a rerun keeps complete outputs
    assert "0 scans made, 2 kept" in stdout
    assert before == {p: p.stat().st_mtime_ns for p in synth.rglob("*") if p.is_file()}


@needs_head
@pytest.mark.slow
def test_written_scan_lands_on_model_and_is_open_at_neck(synth, head):
    sid = "001_02"
    verts, faces, uvs, face_uvs = read_obj(synth / "faceverse_dataset" / sid / f"{sid}.obj")
    p = load_flame_params(synth / "flame_params" / f"{sid}_flame.pkl")
    shape, exp = p["betas"][:100], p["betas"][100:]
    vf = scan_to_flame_space(verts, p["scale"], p["transl"], head["flame"].z_shift)
    _check_on_model(head, vf, shape, exp, p["pose"])
    assert 20000 <= len(faces) <= 200000
    assert uvs.min() >= 0.0 and uvs.max() <= 1.0 and face_uvs.shape == faces.shape
    # a complete file: it ends with a newline and its faces use every vertex and texture
    # coordinate (load_obj takes unused ones, beyond a few, for a face list cut short)
    assert (synth / "faceverse_dataset" / sid / f"{sid}.obj").read_bytes().endswith(b"\n")
    assert len(np.unique(faces)) == len(verts) and len(np.unique(face_uvs)) == len(uvs)
    # one connected piece ...
    V = len(vf)
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    g = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(V, V))
    assert connected_components(g, directed=False)[0] == 1
    # ... whose only boundary is one planar loop across the neck (the root frame's y axis)
    key = np.sort(e, 1)
    uniq, counts = np.unique(key, axis=0, return_counts=True)
    border = uniq[counts == 1]
    assert len(border) > 10
    bv = np.unique(border)
    gb = sp.coo_matrix((np.ones(len(border)), (border[:, 0], border[:, 1])), shape=(V, V))
    n_loops = connected_components(gb, directed=False)[0] - (V - len(bv))
    assert n_loops == 1
    _, T = head["posed"](shape, exp, p["pose"])
    pts = vf[bv] - vf[bv].mean(0)
    normal = np.linalg.svd(pts)[2][-1]
    assert np.abs(pts @ normal).max() < 1e-4
    assert abs(normal @ T[0, :3, 1]) > 0.999  # cut plane perpendicular to the root's y axis
    assert (vf[bv] @ T[0, :3, 1]).max() < np.percentile(vf @ T[0, :3, 1], 10)


@pytest.fixture(scope="module")
def hair_scan(head):
    from lib.synthetic.scans import HeadContext, make_scan, make_style

    ctx = HeadContext.from_path(head["path"])
    rng = np.random.default_rng(11)
    style = make_style(3, rng)
    style["hair"] = "thick"
    args = (np.r_[rng.normal(0, 1, 10), np.zeros(90)], np.r_[rng.normal(0, 1, 10), np.zeros(40)],
            np.r_[0.05, 0.2, 0.0, 0.0, 0.0, 0.0, 0.2, np.zeros(8)])
    scan = make_scan(ctx, *args, style, np.random.default_rng(5), target_faces=25000,
                     texture_size=256)
    return {"ctx": ctx, "args": args, "style": style, "scan": scan}


@needs_head
@pytest.mark.slow
def test_hair_scan_geometry_and_determinism(head, hair_scan):
    from lib.synthetic.scans import make_scan

    scan = hair_scan["scan"]
    far_fraction = _check_on_model(head, scan.vertices, *hair_scan["args"])
    assert far_fraction > 0.05  # a thick hair volume the model cannot express
    again = make_scan(hair_scan["ctx"], *hair_scan["args"], hair_scan["style"],
                      np.random.default_rng(5), target_faces=25000, texture_size=256)
    for name in ("vertices", "faces", "uvs", "face_uvs", "texture"):
        np.testing.assert_array_equal(getattr(again, name), getattr(scan, name))


@needs_head
@pytest.mark.slow
def test_cli_scan_files_reproduce_exactly(synth, head, tmp_path):
    """The CLI's files equal a fresh in-process build from the same seeds (determinism)."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_synthetic as ms
    finally:
        sys.path.remove(str(ROOT / "tools"))
    from lib.synthetic.scans import HeadContext, make_scan, write_scan

    ctx = HeadContext.from_path(head["path"])
    person = ms.person_params(3, 1)
    sp_ = ms.scan_params(3, 1, 1, person["expressiveness"])
    scan = make_scan(ctx, person["shape"], sp_["exp"], sp_["pose"], person["style"],
                     np.random.default_rng(sp_["rng_seed"]), target_faces=30000, texture_size=256)
    write_scan(tmp_path, "001_01", scan, sp_["scale"], sp_["transl_xy"], sp_["z_offset"],
               ctx.flame.z_shift)
    for rel in ("faceverse_dataset/001_01/001_01.obj", "faceverse_dataset/001_01/001_01.jpg",
                "flame_params/001_01_flame.pkl"):
        assert (tmp_path / rel).read_bytes() == (synth / rel).read_bytes(), rel


def _texture_at(scan, faces_sel, rng, per_face=4):
    """Random surface points on the given faces -> (points (K,3), colours (K,3) in [0,1])."""
    k = len(faces_sel) * per_face
    fi = np.repeat(faces_sel, per_face)
    b = rng.dirichlet(np.ones(3), k)
    pts = (b[:, :, None] * scan.vertices[scan.faces[fi]]).sum(1)
    uv = (b[:, :, None] * scan.uvs[scan.face_uvs[fi]]).sum(1)
    H, W = scan.texture.shape[:2]
    col = scan.texture[np.clip(((1 - uv[:, 1]) * H).astype(int), 0, H - 1),
                       np.clip((uv[:, 0] * W).astype(int), 0, W - 1)] / 255.0
    return pts, col


@needs_head
@pytest.mark.slow
def test_texture_regions_differ_as_designed(head, hair_scan):
    scan, style = hair_scan["scan"], hair_scan["style"]
    mv, _ = head["posed"](*hair_scan["args"])
    lab = head["labels"]
    rng = np.random.default_rng(0)
    pts, col = _texture_at(scan, np.arange(len(scan.faces)), rng)
    _, nn = cKDTree(mv).query(pts)
    lum = col @ np.array([0.3, 0.59, 0.11])
    skin = lab["face"][nn] & ~(lab["lips"] | lab["brows"] | lab["eyes"] | lab["scalp"]
                               | lab["nose"])[nn]
    med = lambda m: np.median(col[m], axis=0)  # noqa: E731
    skin_c, lips_c, brow_c = med(skin), med(lab["lips"][nn]), med(lab["brows"][nn])
    np.testing.assert_allclose(skin_c, style["skin"], atol=0.12)
    assert lips_c[0] / lips_c[1] > 1.15 * skin_c[0] / skin_c[1]  # lips are redder
    assert brow_c @ [0.3, 0.59, 0.11] < 0.8 * (skin_c @ [0.3, 0.59, 0.11])  # brows darker
    # hair: points well off the model carry the hair colour
    import igl

    d2, _, _ = igl.point_mesh_squared_distance(pts, mv, head["faces"])
    size = float((mv.max(0) - mv.min(0)).max())
    hair = np.sqrt(d2) > 0.03 * size
    np.testing.assert_allclose(np.median(col[hair], axis=0), style["hair_color"], atol=0.15)
    # eyes: white sclera and a dark pupil both present on the eyeballs
    eye = lab["eyes"][nn]
    assert (lum[eye] > 0.75).mean() > 0.2 and (lum[eye] < 0.15).any()


@pytest.mark.slow
@needs_head
def test_holdout_persons_written_apart(tmp_path):
    """--holdout persons go under heldout/ (not where preprocessing looks) and are the very
    scans a run with more identities would have made for them."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_synthetic as ms
    finally:
        sys.path.remove(str(ROOT / "tools"))
    kw = {"seed": 3, "faces": 4000, "frames": 5, "texture_size": 64, "progress": False}
    a = ms.generate(tmp_path / "a", identities=1, expressions=1, holdout=1, **kw)
    assert a["made"] == 2
    assert sorted(p.name for p in (tmp_path / "a" / "faceverse_dataset").iterdir()) == ["001_01"]
    held = tmp_path / "a" / "heldout"
    assert sorted(p.name for p in (held / "faceverse_dataset").iterdir()) == ["002_01"]
    ms.generate(tmp_path / "b", identities=2, expressions=1, **kw)
    for rel in ("faceverse_dataset/002_01/002_01.obj", "flame_params/002_01_flame.pkl"):
        assert (held / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert ms.generate(tmp_path / "a", identities=1, expressions=1, holdout=1, **kw)["made"] == 0

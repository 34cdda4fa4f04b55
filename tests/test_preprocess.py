"""Scan preprocessing: OBJ loading, winding-number labels, sampling, renders, the CLI.

Everything is built in the test: analytic meshes, a tiny FLAME-format model, textured scans
in FaceVerse layout (written through the FaceVerse transform's inverse), bad inputs.
"""
from __future__ import annotations

import csv
import hashlib
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from PIL import Image

import preprocess
from lib.dataset.faceverse_io import flame_to_scan_space, save_flame_params
from lib.dataset.preprocessing import SampleSizes, is_complete
from lib.dataset.scan_sampling import occupancy_samples, surface_samples, texture_colors
from lib.dataset.winding import inside_mask, winding_number, winding_number_exact
from lib.utils.mesh_io import MeshLoadError, load_obj, save_obj, save_ply
from lib.utils.surface import face_areas_normals, sample_faces

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- meshes
def uv_sphere(radius=1.0, n_lat=24, n_lon=48, center=(0.0, 0.0, 0.0), y_min=None):
    """Outward-oriented UV sphere; uv = (longitude, latitude) mapping with u = 0.5 at +z.
    y_min: drop the faces entirely below this height (an open neck), and the vertices only
    they used (a scan file has no unused vertices: load_obj takes many for a cut-short file).
    Returns verts [V,3], faces [F,3], uvs [V,2] (uv index = vertex index)."""
    th = np.linspace(0, np.pi, n_lat + 1)             # polar angle from +y
    ph = np.linspace(-np.pi, np.pi, n_lon + 1)        # azimuth, 0 at +z, seam duplicated
    T, P = np.meshgrid(th, ph, indexing="ij")
    v = np.stack([np.sin(T) * np.sin(P), np.cos(T), np.sin(T) * np.cos(P)], -1).reshape(-1, 3)
    uv = np.stack([(P / (2 * np.pi) + 0.5), 1.0 - T / np.pi], -1).reshape(-1, 2)
    idx = np.arange((n_lat + 1) * (n_lon + 1)).reshape(n_lat + 1, n_lon + 1)
    a, b = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel()
    c, d = idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    f = np.concatenate([np.stack([a, c, d], 1), np.stack([a, d, b], 1)])
    v = v * radius + np.asarray(center)
    area, n = face_areas_normals(v, f)
    f = f[area > 1e-12]
    if y_min is not None:
        f = f[v[f][:, :, 1].max(1) > y_min]
        used, f = np.unique(f, return_inverse=True)
        v, uv, f = v[used], uv[used], f.reshape(-1, 3)
    return v, f, uv


def open_cylinder(radius=0.5, half_height=0.8, sections=128, rings=16):
    """Lateral surface of a cylinder along z (both ends open), outward-oriented."""
    ang = np.linspace(0, 2 * np.pi, sections, endpoint=False)
    zs = np.linspace(-half_height, half_height, rings + 1)
    v = np.stack([np.repeat(np.cos(ang)[None] * radius, rings + 1, 0),
                  np.repeat(np.sin(ang)[None] * radius, rings + 1, 0),
                  np.repeat(zs[:, None], sections, 1)], -1).reshape(-1, 3)
    i = np.arange(rings)[:, None] * sections
    j = np.arange(sections)[None]
    a, b = (i + j).ravel(), (i + (j + 1) % sections).ravel()
    c, d = a + sections, b + sections
    return v, np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])


# ----------------------------------------------------------------------------- OBJ IO
def test_obj_quads_negative_indices_texture(tmp_path):
    (tmp_path / "t.mtl").write_text("newmtl m\nKd 1 1 1\nmap_Kd -s 1 1 1 tex.png\n")
    img = np.zeros((4, 8, 3), np.uint8)
    img[..., 0] = 200
    Image.fromarray(img).save(tmp_path / "tex.png")
    (tmp_path / "t.obj").write_text(
        "# quad, then a triangle with relative indices\nmtllib t.mtl\n"
        "v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0 0.5 0.5 0.5\n"
        "vt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\nusemtl m\nf 1/1/1 2/2/1 3/3/1 4/4/1\n"
        "v 2 0 0\nvt 0.5 0.5\n  f -1/-1 -4/-4 -3/-3\n")
    m = load_obj(tmp_path / "t.obj", require_texture=True)
    assert m.verts.shape == (5, 3) and m.uvs.shape == (5, 2)
    np.testing.assert_array_equal(m.faces, [[0, 1, 2], [0, 2, 3], [4, 1, 2]])
    np.testing.assert_array_equal(m.face_uvs, [[0, 1, 2], [0, 2, 3], [4, 1, 2]])
    assert m.texture.shape == (4, 8, 3) and m.texture[0, 0, 0] == 200


def test_obj_without_vt_and_round_trip(tmp_path):
    v, f, uv = uv_sphere(n_lat=6, n_lon=8)
    save_obj(tmp_path / "a.obj", v, f)
    m = load_obj(tmp_path / "a.obj")
    assert m.uvs is None and m.face_uvs is None and m.texture is None
    np.testing.assert_allclose(m.verts, v, atol=1e-6)
    np.testing.assert_array_equal(m.faces, f)
    with pytest.raises(MeshLoadError, match="no texture coordinates"):
        load_obj(tmp_path / "a.obj", require_texture=True)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "tex.png")
    save_obj(tmp_path / "b.obj", v, f, uvs=uv, texture_name="tex.png")
    m = load_obj(tmp_path / "b.obj", require_texture=True)
    np.testing.assert_allclose(m.uvs[m.face_uvs], uv[f], atol=1e-6)
    save_ply(tmp_path / "a.ply", v, f, colors=np.ones_like(v) * 0.5, normals=v)
    assert (tmp_path / "a.ply").read_bytes().startswith(b"ply\nformat binary_little_endian")


def test_obj_vertex_colours_crlf_and_3d_texcoords(tmp_path):
    (tmp_path / "c.obj").write_bytes(b"v 0 0 0 1 0 0\r\nv 1 0 0 1 0 0\r\nv 0 1 0 1 1 1\r\n"
                                     b"vt 0 0 0\r\nvt 1 0 0\r\nvt 0 1 0\r\nf 1/1 2/2 3/3\r\n")
    m = load_obj(tmp_path / "c.obj")
    np.testing.assert_array_equal(m.verts, [[0, 0, 0], [1, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(m.uvs, [[0, 0], [1, 0], [0, 1]])


@pytest.mark.parametrize("text,problem", [
    (None, "file not found"),
    ("this is not\nan obj file at all\n", "no vertices"),
    ("v 0 0 0\nv 1 0 0\nv 0 1 0\n", "no faces"),
    ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 5\n", "refers to vertex 5"),
    ("v 0 0 0\nv 1 0 x\nv 0 1 0\nf 1 2 3\n", "malformed vertex"),
    ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2\n", "fewer than 3"),
    ("v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nf 1/1 2 3\n", "lack texture coordinates"),
    ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3.5\n", "non-integer index"),
    ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 0\n", "index 0"),
    ("v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nf 1/1 2/1 3/1\n", "texture image not found"),
    ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3", "ends mid-line"),
    ("# Vertices: 3\n# Faces: 2\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n", "states 2"),
])
def test_obj_errors_name_file_and_problem(tmp_path, text, problem):
    path = tmp_path / "bad_scan.obj"
    if text is not None:
        path.write_text(text)
    with pytest.raises(MeshLoadError, match=problem) as info:
        load_obj(path, require_texture=True)
    assert "bad_scan.obj" in str(info.value)


# ----------------------------------------------------------------------------- labels
def test_labels_sphere_analytic():
    v, f, _ = uv_sphere(radius=0.7, n_lat=48, n_lon=96)
    q = np.random.default_rng(0).uniform(-1, 1, (20000, 3))
    r = np.linalg.norm(q, axis=1)
    lab = inside_mask(v, f, q)
    # the polygonal sphere deviates from the analytic one by < 0.7 * (1 - cos(pi/48)) ~ 1.5e-3
    far = np.abs(r - 0.7) > 0.01
    np.testing.assert_array_equal(lab[far], r[far] < 0.7)
    # the fast (tree) winding number agrees with the exact solid-angle sum
    np.testing.assert_allclose(winding_number(v, f, q[:300]),
                               winding_number_exact(v, f, q[:300]), atol=0.02)
    # inward orientation gives w = -1 inside, and the same labels
    np.testing.assert_array_equal(inside_mask(v, f[:, ::-1], q), lab)


def test_labels_open_cylinder():
    """Both ends open: on the axis w(z) = (d_t/sqrt(d_t^2+r^2) + d_b/sqrt(d_b^2+r^2)) / 2
    (d_t, d_b signed distances to the end planes), ~0.85 at the centre, just under 0.5 at
    the openings. Threshold 1/2: the volume inside is labelled inside except a thin layer
    (< 0.02 deep here) at each opening; a ray-parity test would fail everywhere."""
    r0, h = 0.5, 0.8
    v, f = open_cylinder(r0, h)
    z = np.linspace(-1.2, 1.2, 49)
    axis = np.stack([np.zeros_like(z), np.zeros_like(z), z], 1)
    dt, db = h - z, h + z
    w_ref = 0.5 * (dt / np.hypot(dt, r0) + db / np.hypot(db, r0))
    np.testing.assert_allclose(winding_number_exact(v, f, axis), w_ref, atol=2e-3)
    np.testing.assert_allclose(winding_number(v, f, axis), w_ref, atol=0.01)

    rng = np.random.default_rng(1)
    q = rng.uniform(-1.2, 1.2, (40000, 3))
    rad = np.hypot(q[:, 0], q[:, 1])
    lab = inside_mask(v, f, q)
    in_vol = (rad < r0) & (np.abs(q[:, 2]) < h)
    deep = (rad < r0 - 0.005) & (np.abs(q[:, 2]) < h - 0.02)
    assert lab[deep].all()
    assert not lab[(rad > r0 + 0.02) | (np.abs(q[:, 2]) > h)].any()
    assert lab[in_vol].mean() > 0.98  # 98.5%: the misses are the thin layers at the openings


# ----------------------------------------------------------------------------- sampling
def test_area_weighting_and_normals():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 1], [0, 2, 1.0]])
    f = np.array([[0, 1, 2], [3, 4, 5]])             # areas 0.5 and 3
    areas, normals = face_areas_normals(v, f)
    face, bary = sample_faces(areas, 70000, np.random.default_rng(0))
    assert abs((face == 0).mean() - 0.5 / 3.5) < 0.005
    assert (bary >= 0).all() and np.allclose(bary.sum(1), 1)
    np.testing.assert_allclose(normals, [[0, 0, 1], [0, 0, 1]])


def test_colour_sampling_known_texture():
    """Plane z=0 over [-0.9,0.9]^2 with uv = ((x+1)/2, (y+1)/2) and a texture whose red grows
    with the column and green with height: bilinear sampling of a linear ramp is exact, so
    the colour at (x, y) is known in closed form."""
    H = W = 64
    rows, cols = np.mgrid[0:H, 0:W]
    tex = np.stack([4 * cols, 4 * (H - 1 - rows), np.full_like(cols, 100)], -1).astype(np.uint8)
    g = np.linspace(-0.9, 0.9, 11)
    X, Y = np.meshgrid(g, g)
    v = np.stack([X.ravel(), Y.ravel(), np.zeros(X.size)], 1)
    idx = np.arange(121).reshape(11, 11)
    a, b = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel()
    c, d = idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    f = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    uv = (v[:, :2] + 1) / 2
    s = surface_samples(v, f, uv, f, tex, np.random.default_rng(0), n=5000)
    p = s["surface_points"].astype(np.float64)
    u_, v_ = (p[:, 0] + 1) / 2, (p[:, 1] + 1) / 2
    raw = np.stack([4 * (u_ * W - 0.5), 4 * (v_ * H - 0.5), np.full_like(u_, 100)], 1) / 255
    np.testing.assert_allclose(s["surface_colors"], raw * 2 - 1, atol=1e-4)  # no stretching
    np.testing.assert_allclose(np.abs(s["surface_normals"][:, 2]), 1.0, atol=1e-6)
    # a uv exactly on a texel centre returns that texel
    c = texture_colors(tex, np.array([[(5 + 0.5) / W, 1 - (9 + 0.5) / H]]))
    np.testing.assert_allclose(c[0] * 255, tex[9, 5], atol=1e-3)


@pytest.mark.parametrize("sampling", ["vertices", "area"])
def test_occupancy_regions_and_labels(sampling):
    v, f, _ = uv_sphere(radius=0.6, n_lat=32, n_lon=64, center=(0, 0, 0.1))
    pts, occ = occupancy_samples(v, f, np.random.default_rng(0), n_face=700, n_rest=300,
                                 n_uniform=1000, sigma=0.0, sampling=sampling)
    assert pts.shape == (2000, 3) and occ.shape == (2000, 1) and pts.dtype == np.float32
    thr = 0.5 * v[:, 2].max()
    assert (pts[:700, 2] > thr).all() and (pts[700:1000, 2] <= thr).all()
    np.testing.assert_allclose(np.linalg.norm(pts[:1000] - [0, 0, 0.1], axis=1), 0.6, atol=3e-3)
    assert (np.abs(pts[1000:]) <= 1).all()
    r = np.linalg.norm(pts[1000:] - [0, 0, 0.1], axis=1)
    far = np.abs(r - 0.6) > 0.01
    np.testing.assert_array_equal(occ[1000:, 0][far], (r < 0.6)[far].astype(np.float32))
    pts2, _ = occupancy_samples(v, f, np.random.default_rng(0), 700, 300, 1000, 0.0,
                                sampling=sampling)
    np.testing.assert_array_equal(pts, pts2)
    if sampling == "vertices":  # unjittered: the points are scan vertices
        d = np.linalg.norm(pts[:1000, None].astype(np.float64) - v[None], axis=-1).min(1)
        assert d.max() < 1e-6


# ----------------------------------------------------------------------------- sharding
def test_shards_partition_sorted_list(tmp_path):
    names = [f"{p:03d}_{e:02d}" for p in (7, 1, 3) for e in (5, 2, 11)]
    for n in names:
        (tmp_path / n).mkdir()
    (tmp_path / "stray.txt").write_text("x")
    listed = preprocess.list_scans(tmp_path)
    assert listed == sorted(names)
    for tot in (1, 2, 4, 13):
        parts = [preprocess.shard(listed, tot, i) for i in range(tot)]
        flat = [n for p in parts for n in p]
        assert sorted(flat) == listed and len(flat) == len(set(flat))


# ----------------------------------------------------------------------------- end to end
N_VIEWS, RES = 4, 48
SMALL = ["--n_near", "2000", "--n_uniform", "2000", "--n_surface", "1000",
         "--views", str(N_VIEWS), "--res", str(RES), "--no_progress"]
SIZES = SampleSizes(n_face=1400, n_rest=600, n_uniform=2000, n_surface=1000)
CENTER, RADIUS, NECK_Y = np.array([0.0, 0.05, 0.0]), 0.6, -0.45


def make_flame_model(path):
    """A tiny model in FLAME's pickle layout: a sphere of radius 0.1 m (0.6 scaled) shifted
    by 0.01 m in z (so z_shift = -0.06), root joint at the template's centre."""
    rng = np.random.default_rng(5)
    v, f, _ = uv_sphere(radius=0.1, n_lat=6, n_lon=8)
    v = v + [0.0, 0.0, 0.01]
    V, J = len(v), 5
    reg = np.zeros((J, V))
    reg[0] = 1.0 / V                                   # root: the centroid (~ the centre)
    for j in range(1, J):
        reg[j, rng.choice(V, 6, replace=False)] = 1.0 / 6
    model = {"v_template": v, "f": f.astype(np.uint32),
             "shapedirs": rng.normal(scale=1e-4, size=(V, 3, 400)),
             "posedirs": rng.normal(scale=1e-4, size=(V, 3, 36)),
             "J_regressor": sp.csc_matrix(reg), "weights": rng.dirichlet(np.ones(J), size=V),
             "kintree_table": np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]])}
    with open(path, "wb") as fh:
        pickle.dump(model, fh, protocol=2)
    return -0.06


def front_texture(size=64):
    """Red where u in [0.4, 0.6] (the +z front of `uv_sphere`), blue elsewhere, + a ramp."""
    tex = np.zeros((size, size, 3), np.uint8)
    tex[..., 2] = 200
    cols = np.arange(size)
    front = (cols + 0.5) / size
    front = (front > 0.4) & (front < 0.6)
    tex[:, front] = [220, 20, 20]
    tex[..., 1] = np.linspace(0, 60, size).astype(np.uint8)[:, None]
    return tex


def write_scan(root, name, z_shift, scale=1.3, transl_xy=(0.02, -0.01), texture=None):
    """A textured sphere scan (open at the neck) in FaceVerse layout + its FLAME pickle;
    in FLAME space it is the sphere (CENTER, RADIUS) with global pose 0. texture: [H, W, 3]
    uint8 (default `front_texture()`)."""
    v, f, uv = uv_sphere(RADIUS, 24, 48, CENTER, y_min=NECK_Y)
    v_scan, transl = flame_to_scan_space(v, scale, transl_xy, z_shift, z_offset=0.3)
    d = root / "scans" / name
    d.mkdir(parents=True, exist_ok=True)
    save_obj(d / f"{name}.obj", v_scan, f, uvs=uv, texture_name=f"{name}.png")
    Image.fromarray(front_texture() if texture is None else texture).save(d / f"{name}.png")
    rng = np.random.default_rng(sum(name.encode()))
    pose = np.zeros(15)
    pose[6] = 0.1                                      # jaw open a little
    save_flame_params(root / "flame" / f"{name}_flame.pkl", pose,
                      rng.normal(scale=0.3, size=150), scale, transl)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("faceverse")
    (root / "flame").mkdir()
    z_shift = make_flame_model(root / "generic_model.pkl")
    for name in ("g_a", "g_b", "g_c"):
        write_scan(root, name, z_shift)
    return root


def cli(root, out, *extra):
    return ["--scan_folder", str(root / "scans"), "--flame_folder", str(root / "flame"),
            "--output_folder", str(out), "--flame_model", str(root / "generic_model.pkl"),
            "--data_list", str(out.parent / f"{out.name}.csv"), *SMALL, *extra]


def tree_digest(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(dataset):
    out = dataset / "ref"
    assert preprocess.main(cli(dataset, out)) == 0
    return out


def test_outputs_geometry_and_renders(dataset, reference):
    d = reference / "g_a"
    assert is_complete(d, N_VIEWS, RES, SIZES)
    occ = np.load(d / "occupancy.npz")
    assert str(occ["scan_name"]) == "g_a" and occ["flame_params"].shape == (169,)
    # the original's arrays: float64 parameters (scale 1, translation 0), the FLAME-space scan
    # (the analytic sphere) with its faces and vertex colours (the texture at each vertex's uv)
    assert occ["flame_params"].dtype == np.float64
    np.testing.assert_array_equal(occ["flame_params"][:4], [1, 0, 0, 0])
    assert str(occ["layout"]) == "project"
    sv, sf, sc = occ["scan_verts"], occ["scan_faces"], occ["scan_colors"]
    assert sv.dtype == sc.dtype == np.float32 and sf.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(sv - CENTER, axis=1), RADIUS, atol=1e-5)
    v_ref, f_ref, uv_ref = uv_sphere(RADIUS, 24, 48, CENTER, y_min=NECK_Y)
    np.testing.assert_array_equal(sf, f_ref)
    np.testing.assert_allclose(sc, texture_colors(front_texture(), uv_ref), atol=1e-6)
    pts, lab = occ["pts_d"], occ["occ_gt"][:, 0]
    # near-surface points: on the FLAME-space sphere up to the N(0, 0.01) jitter
    dist = np.linalg.norm(pts[:2000] - CENTER, axis=1) - RADIUS
    assert np.abs(dist).max() < 0.06 and abs(dist.std() - 0.01) < 0.004  # radial part of the jitter
    r = np.linalg.norm(pts[2000:] - CENTER, axis=1)
    sure = (np.abs(r - RADIUS) > 0.02) & (pts[2000:, 1] > NECK_Y + 0.1)
    np.testing.assert_array_equal(lab[2000:][sure], (r < RADIUS)[sure])
    surf = np.load(d / "surface.npz")
    p, n = surf["surface_points"], surf["surface_normals"]
    np.testing.assert_allclose(np.linalg.norm(p - CENTER, axis=1), RADIUS, atol=0.01)
    assert (np.sum(n * (p - CENTER), 1) > 0.95 * RADIUS).all()      # outward unit normals
    c = surf["surface_colors"]   # raw texture colour * 2 - 1: red 220, blue 200, green <= 60
    assert c.min() >= -1 and c.max() <= 220 / 127.5 - 1 + 1e-6 and c.max() > 200 / 127.5 - 1.01

    def img(k, kind):
        return np.asarray(Image.open(d / f"multi_view_{RES}" / f"{k:04d}_{kind}.png")) / 255.0

    # view 0 = the scan's own pose (global 0): silhouette = the disc of the sphere
    j, i = np.meshgrid(np.arange(RES), np.arange(RES))
    x, y = -1 + (j + 0.5) * 2 / RES, 1 - (i + 0.5) * 2 / RES
    rr = np.hypot(x - CENTER[0], y - CENTER[1])
    nrm = img(0, "normal")
    fg = (nrm != 1).any(-1)
    assert fg[(rr < RADIUS - 0.05) & (y > NECK_Y + 0.05)].all()   # open below the neck cut
    assert not fg[rr > RADIUS + 0.05].any()
    nn = nrm[fg] * 2 - 1
    assert np.abs(np.linalg.norm(nn, axis=1) - 1).max() < 0.03
    # normals (n + 1) / 2 of the analytic sphere; view 2 (half a turn about the root joint,
    # at the centre here) sees the back, whose normals in view space are the same
    inner = (rr < RADIUS - 0.05) & (y > NECK_Y + 0.05)
    n_ref = np.stack([x - CENTER[0], y - CENTER[1],
                      np.sqrt(np.clip(RADIUS**2 - rr**2, 0, None))], -1) / RADIUS
    for k in (0, 2):
        np.testing.assert_allclose(img(k, "normal")[inner] * 2 - 1, n_ref[inner], atol=0.05)
    mid = (RES // 2, RES // 2)
    assert img(0, "rgb")[mid][0] > 0.7 and img(2, "rgb")[mid][2] > 0.7   # front red, back blue
    # view k turns the head by 2*pi*k/K about +y: the red front moves to +x at k=1
    for k, sign in ((1, 1), (3, -1)):
        red = (img(k, "rgb")[..., 0] > 0.7) & (img(k, "rgb")[..., 2] < 0.3)
        assert red.sum() > 5 and sign * (x[red].mean()) > 0.3


def smooth_texture(size=64):
    """Colours in [0.1, 0.5] (far from a [0, 1] stretch of themselves): red grows with the
    column, green with the row, blue constant 0.3. Smooth, so a half-pixel offset between a
    sample and a pixel centre changes the colour by little."""
    t = (np.arange(size) + 0.5) / size
    tex = np.empty((size, size, 3))
    tex[..., 0] = 0.1 + 0.4 * t[None, :]
    tex[..., 1] = 0.1 + 0.4 * t[:, None]
    tex[..., 2] = 0.3
    return np.round(tex * 255).astype(np.uint8)


@pytest.mark.parametrize("source", ["vertices", "texture"])
def test_surface_and_render_colours_on_one_scale(dataset, tmp_path, source):
    """The 3D colour targets (surface samples) and the 2D ones (the RGB renders, v / 127.5 - 1
    as lib/dataset/fine.py reads them) agree where a sample is visible in view 0, for either
    colour source; the former per-scan min/max stretch of the samples would not."""
    import torch

    from lib.dataset.preprocessing import load_scan
    from lib.dataset.scan_render import view_transforms
    from lib.flame import FLAMEServer
    from lib.render.camera import project
    from lib.render.rasterizer import rasterize

    root = tmp_path / "smooth"
    (root / "flame").mkdir(parents=True)
    z_shift = make_flame_model(root / "generic_model.pkl")
    write_scan(root, "g_s", z_shift, texture=smooth_texture())
    out = root / "out"
    assert preprocess.main(cli(root, out, "--colour_source", source)) == 0
    d = out / "g_s"
    surf = np.load(d / "surface.npz")
    params = np.load(d / "occupancy.npz")["flame_params"]
    server = FLAMEServer(str(root / "generic_model.pkl"))
    T = view_transforms(params, server, N_VIEWS)[0].double()            # view 0, [4, 4]
    R, t = T[:3, :3], T[:3, 3]
    p = torch.from_numpy(surf["surface_points"]).double() @ R.T + t     # [N, 3] view space
    n = torch.from_numpy(surf["surface_normals"]).double() @ R.T
    # visible: facing the camera (+z) and at the renderer's depth of the pixel it falls in
    mesh, _ = load_scan(root / "scans" / "g_s" / "g_s.obj", root / "flame" / "g_s_flame.pkl",
                        server.flame.z_shift)
    vk = torch.from_numpy(mesh.verts) @ R.T + t
    frags = rasterize(vk.float(), torch.as_tensor(mesh.faces, dtype=torch.long), RES)
    pix = project(p, RES).round().long()                                # [N, 2] (col, row)
    inside = ((pix >= 0) & (pix < RES)).all(1)
    col, row = pix[:, 0].clamp(0, RES - 1), pix[:, 1].clamp(0, RES - 1)
    zbuf = frags.zbuf[0].double()[row, col]
    vis = inside & (n[:, 2] > 0.5) & frags.mask[0][row, col] & ((p[:, 2] - zbuf).abs() < 0.05)
    assert vis.sum() > 200
    rgb = np.asarray(Image.open(d / f"multi_view_{RES}" / "0000_rgb.png")).astype(np.float64)
    target_2d = rgb[row[vis].numpy(), col[vis].numpy()] / 127.5 - 1.0  # [M, 3]
    c = surf["surface_colors"].astype(np.float64)
    err = np.abs(c[vis.numpy()] - target_2d).mean()
    assert err < 0.05, err
    # the raw scale itself: texture colour * 2 - 1 lies in [0.1, 0.5] * 2 - 1
    assert c.min() > 2 * 0.1 - 1 - 0.01 and c.max() < 2 * 0.5 - 1 + 0.01
    # the former per-scan stretch (min/max over all samples and channels to [-1, 1]) fails
    unit = (c + 1) / 2
    old = (unit - unit.min()) / (unit.max() - unit.min()) * 2 - 1
    assert np.abs(old[vis.numpy()] - target_2d).mean() > 0.2


def test_skip_if_done(dataset, reference, capsys):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    assert preprocess.main(cli(dataset, reference)) == 0
    assert "0 processed, 3 already complete" in capsys.readouterr().out
    after = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    assert before == after


def test_resume_after_damage_is_identical(dataset, reference):
    import shutil

    out = dataset / "damaged"
    shutil.copytree(reference, out)
    (out / "g_a" / "surface.npz").unlink()
    (out / "g_b" / f"multi_view_{RES}" / "0002_rgb.png").unlink()
    (out / "g_c" / "occupancy.npz").write_bytes(b"PK\x03\x04 truncated")
    (out / "g_c" / ".occupancy.tmp-999.npz").write_bytes(b"half")   # a killed writer's temp
    assert preprocess.main(cli(dataset, out)) == 0
    assert tree_digest(out) == tree_digest(reference)


def test_outputs_with_stretched_colours_are_redone(dataset, reference, capsys):
    """A scan processed before the colour scale was recorded (its record has no
    `colour_scale`, its surface colours are stretched per scan) is redone by a rerun."""
    import json
    import shutil

    out = dataset / "old_scale"
    shutil.copytree(reference, out)
    rec_path = out / "g_a" / "provenance.json"
    rec = json.loads(rec_path.read_text())
    assert rec["settings"].pop("colour_scale") == "raw"
    rec_path.write_text(json.dumps(rec))
    with np.load(out / "g_a" / "surface.npz") as z:
        surf = dict(z)
    c = surf["surface_colors"]
    surf["surface_colors"] = ((c - c.min()) / (c.max() - c.min()) * 2 - 1).astype(np.float32)
    np.savez(out / "g_a" / "surface.npz", **surf)
    assert preprocess.main(cli(dataset, out)) == 0
    assert ("g_a: settings changed (colour_scale (not recorded) -> raw); reprocessed"
            in capsys.readouterr().out)
    assert tree_digest(out) == tree_digest(reference)


def test_earlier_outputs_are_redone(dataset, reference, capsys):
    """Outputs of an earlier version (yaw-only views, area samples, texture colours; a record
    without those settings, occupancy.npz with the four arrays and float32 parameters) count
    as complete but made with other settings: a rerun redoes them, saying what changed."""
    import json
    import shutil

    out = dataset / "earlier"
    shutil.copytree(reference, out)
    for name in ("g_a", "g_b"):
        rec_path = out / name / "provenance.json"
        rec = json.loads(rec_path.read_text())
        for k in ("occ_sampling", "colour_source", "views"):
            del rec["settings"][k]
        rec_path.write_text(json.dumps(rec))
        with np.load(out / name / "occupancy.npz") as z:
            np.savez(out / name / "occupancy.npz",
                     flame_params=z["flame_params"].astype(np.float32),
                     scan_name=z["scan_name"], pts_d=z["pts_d"], occ_gt=z["occ_gt"])
        assert is_complete(out / name, N_VIEWS, RES, SIZES)   # the earlier arrays are valid
    (out / "g_b" / "provenance.json").unlink()               # no record: kept as it is
    kept = tree_digest(out / "g_b")
    assert preprocess.main(cli(dataset, out)) == 0
    text = capsys.readouterr().out
    assert ("g_a: settings changed (colour_source (not recorded) -> vertices, occ_sampling "
            "(not recorded) -> vertices, views (not recorded) -> yaw_after_fit); reprocessed"
            in text)
    assert "1 processed, 1 already complete, 1 kept without a provenance record" in text
    assert tree_digest(out / "g_a") == tree_digest(reference / "g_a")
    assert tree_digest(out / "g_b") == kept


def test_switching_the_method_redoes_the_scans(dataset, reference, capsys):
    """--occ_sampling area / --colour_source texture give other samples and renders, recorded
    as such; switching back redoes them and restores the default outputs byte for byte."""
    import json
    import shutil

    out = dataset / "switched"
    shutil.copytree(reference, out)
    extra = ("--occ_sampling", "area", "--colour_source", "texture")
    assert preprocess.main(cli(dataset, out, *extra)) == 0
    text = capsys.readouterr().out
    assert ("g_a: settings changed (colour_source vertices -> texture, occ_sampling vertices "
            "-> area); reprocessed") in text
    rec = json.loads((out / "g_a" / "provenance.json").read_text())["settings"]
    assert (rec["occ_sampling"], rec["colour_source"], rec["views"]) == \
        ("area", "texture", "yaw_after_fit")
    for name, kind in (("occupancy.npz", "pts_d"), ("surface.npz", "surface_colors")):
        with np.load(out / "g_a" / name) as a, np.load(reference / "g_a" / name) as b:
            assert not np.array_equal(a[kind], b[kind])
    assert preprocess.main(cli(dataset, out)) == 0
    assert "settings changed (colour_source texture -> vertices" in capsys.readouterr().out
    assert tree_digest(out) == tree_digest(reference)


def test_kill_and_resume_is_identical(dataset, reference):
    out = dataset / "killed"
    cmd = [sys.executable, str(ROOT / "preprocess.py"), *cli(dataset, out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "g_a" / "surface.npz").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)   # mid-scan: g_a's renders and the others are missing
    proc.wait()
    assert not (out.parent / "killed.csv").exists()
    assert not is_complete(out / "g_c", N_VIEWS, RES, SIZES)
    assert preprocess.main(cli(dataset, out)) == 0
    assert tree_digest(out) == tree_digest(reference)


def test_shards_do_not_clobber_the_data_list(dataset, reference):
    out = dataset / "sharded"
    assert preprocess.main(cli(dataset, out, "--tot", "2", "--id", "1")) == 0
    rows = list(csv.reader(open(out.parent / "sharded.csv")))
    assert rows == [["id", "dataset"], ["g_b", "faceverse"]]
    assert preprocess.main(cli(dataset, out, "--tot", "2", "--id", "0")) == 0
    rows = list(csv.reader(open(out.parent / "sharded.csv")))
    assert rows == [["id", "dataset"]] + [[n, "faceverse"] for n in ("g_a", "g_b", "g_c")]
    assert tree_digest(out) == tree_digest(reference)


def _pickle(path, **d):
    with open(path, "wb") as fh:
        pickle.dump({k: np.asarray(v, np.float32) for k, v in d.items()}, fh)


def test_bad_scans_reported_and_others_processed(dataset, tmp_path, capsys):
    import shutil

    root = tmp_path / "mixed"
    shutil.copytree(dataset / "scans", root / "scans", ignore=shutil.ignore_patterns("g_c"))
    shutil.copytree(dataset / "flame", root / "flame")
    shutil.copy(dataset / "generic_model.pkl", root)
    scans, flame = root / "scans", root / "flame"
    good = dict(pose=np.zeros(15), betas=np.zeros(150), scale=np.ones((1, 1)),
                transl=np.zeros((1, 3)))

    def clone(name, pkl=True):          # a copy of g_a under another name
        d = scans / name
        d.mkdir()
        text = (scans / "g_a" / "g_a.obj").read_text().replace("g_a.mtl", f"{name}.mtl")
        (d / f"{name}.obj").write_text(text)
        (d / f"{name}.mtl").write_text((scans / "g_a" / "g_a.mtl").read_text()
                                       .replace("g_a.png", f"{name}.png"))
        shutil.copy(scans / "g_a" / "g_a.png", d / f"{name}.png")
        if pkl:
            shutil.copy(flame / "g_a_flame.pkl", flame / f"{name}_flame.pkl")
        return d

    expect = {}
    clone("b_noobj").joinpath("b_noobj.obj").unlink()
    expect["b_noobj"] = "b_noobj.obj: file not found"
    clone("b_garbage").joinpath("b_garbage.obj").write_text("%PDF-1.4 garbage\n\x7f\x01 ###\n")
    expect["b_garbage"] = "no vertices"
    clone("b_nofaces").joinpath("b_nofaces.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    expect["b_nofaces"] = "no faces"
    d = clone("b_notex")
    (d / "b_notex.png").unlink()
    expect["b_notex"] = "texture image not found"
    clone("b_nopkl", pkl=False)
    expect["b_nopkl"] = "b_nopkl_flame.pkl: FLAME parameter file not found"
    clone("b_key", pkl=False)
    _pickle(flame / "b_key_flame.pkl", **{k: v for k, v in good.items() if k != "betas"})
    expect["b_key"] = "missing key 'betas'"
    clone("b_nan", pkl=False)
    _pickle(flame / "b_nan_flame.pkl", **{**good, "pose": np.full(15, np.nan)})
    expect["b_nan"] = "NaN"
    clone("b_len", pkl=False)
    _pickle(flame / "b_len_flame.pkl", **{**good, "betas": np.zeros(100)})
    expect["b_len"] = "'betas' has 100 values, expected 150"

    out = root / "out"
    code = preprocess.main(cli(root, out))
    err = capsys.readouterr()
    assert code == 1
    lines = [ln for ln in err.err.splitlines() if ln.startswith("FAILED ")]
    assert len(lines) == len(expect)
    for name, phrase in expect.items():
        (line,) = [ln for ln in lines if ln.startswith(f"FAILED {name}:")]
        assert phrase in line, line
    assert ("2 processed, 0 already complete, 0 kept without a provenance record, 8 failed"
            in err.out)
    rows = list(csv.reader(open(root / "out.csv")))
    assert rows == [["id", "dataset"], ["g_a", "faceverse"], ["g_b", "faceverse"]]
    for name in expect:
        assert not is_complete(out / name, N_VIEWS, RES, SIZES)


@pytest.mark.skipif(not (ROOT / "tools" / "make_synthetic.py").is_file(),
                    reason="synthetic generator not present")
@pytest.mark.slow
def test_synthetic_generator_scan(tmp_path):
    """A small scan of the project's synthetic generator (FaceVerse layout, hair, open neck)
    goes through: complete outputs, balanced near-surface labels, a head in every view."""
    syn = tmp_path / "syn"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic.py"), "--out", str(syn),
                    "--identities", "1", "--expressions", "1", "--faces", "4000",
                    "--texture-size", "128", "--frames", "10"],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    out = tmp_path / "processed"
    argv = ["--scan_folder", str(syn / "faceverse_dataset"), "--flame_folder",
            str(syn / "flame_params"), "--output_folder", str(out), "--flame_model",
            str(syn / "flame" / "generic_model.pkl"), "--data_list", str(tmp_path / "l.csv"),
            *SMALL]
    assert preprocess.main(argv) == 0
    (name,) = [p.name for p in out.iterdir()]
    assert is_complete(out / name, N_VIEWS, RES, SIZES)
    occ = np.load(out / name / "occupancy.npz")["occ_gt"][:, 0]
    assert 0.35 < occ[:2000].mean() < 0.65 and 0.02 < occ[2000:].mean() < 0.5
    for k in range(N_VIEWS):
        im = np.asarray(Image.open(out / name / f"multi_view_{RES}" / f"{k:04d}_rgb.png"))
        assert (im != 255).any(-1).mean() > 0.1

"""Damaged or stale inputs are refused instead of passing as good: truncated OBJ files, scans
that do not match their FLAME fit, empty or mistyped folders, unsafe scan ids, and
preprocessing outputs whose sources changed since they were made.

Independent truths: the bytes cut from a file (chosen positions), the number of stray
vertices written, hashlib digests of the source files, the raw arrays of the FLAME pickles,
byte equality of an untouched data list, file modification times of untouched outputs.
Inputs are built here: scans of the project's synthetic generator (lib/synthetic/scans.py,
on the session's synthetic head model) and the tiny sphere scans and FLAME model of
tests/test_preprocess.py.
"""
from __future__ import annotations

import csv
import hashlib
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_preprocess import N_VIEWS, RES, SIZES, cli, make_flame_model, uv_sphere, write_scan

import preprocess
from lib.dataset.faceverse import DataListError, read_data_list, validate_scan_id
from lib.dataset.faceverse_io import load_flame_params, save_flame_params
from lib.dataset.preprocessing import PROVENANCE_NAME, check_scan_fit, is_complete, load_scan
from lib.utils.mesh_io import STRAY_FRACTION, STRAY_MIN, MeshLoadError, load_obj, save_obj

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def gen(head_model_path, tmp_path_factory):
    """One generator scan per hair style (~3000 faces) in FaceVerse layout + FLAME pickles."""
    from lib.flame import FLAMEServer
    from lib.synthetic.scans import STYLE_ORDER, HeadContext, make_scan, make_style
    from lib.synthetic.scans import write_scan as write_synthetic

    root = tmp_path_factory.mktemp("gen")
    ctx = HeadContext.from_path(head_model_path)
    rng = np.random.default_rng(3)
    ids = []
    for i in range(len(STYLE_ORDER)):
        style = make_style(i, rng)
        shape = np.r_[rng.normal(0, 1, 10), np.zeros(90)]
        exp = np.r_[rng.normal(0, 0.8, 10), np.zeros(40)]
        pose = np.zeros(15)
        pose[:3] = rng.normal(0, 0.08, 3)
        pose[6] = rng.uniform(0, 0.3)
        scan = make_scan(ctx, shape, exp, pose, style, np.random.default_rng(i),
                         target_faces=3000, texture_size=32)
        sid = f"{i + 1:03d}_01"
        write_synthetic(root, sid, scan, rng.uniform(0.8, 1.2), rng.uniform(-0.05, 0.05, 2),
                        rng.uniform(-0.5, 0.5), ctx.flame.z_shift)
        ids.append(sid)
    return {"root": root, "ids": ids, "model": Path(head_model_path),
            "server": FLAMEServer(str(head_model_path))}


def gen_argv(gen, scans: Path, flame: Path, out: Path, *extra) -> list[str]:
    return ["--scan_folder", str(scans), "--flame_folder", str(flame), "--output_folder",
            str(out), "--flame_model", str(gen["model"]), "--data_list",
            str(out.parent / f"{out.name}.csv"), "--n_near", "1000", "--n_uniform", "1000",
            "--n_surface", "500", "--views", "2", "--res", "32", "--no_progress", *extra]


def copy_variant(src_dir: Path, src_pkl: Path, scans: Path, flame: Path, name: str,
                 obj_bytes: bytes) -> Path:
    """A scan folder `name` holding obj_bytes as <name>.obj plus the source's .mtl and
    texture (under their own names, which the OBJ refers to) and a copy of its pickle."""
    d = scans / name
    d.mkdir(parents=True)
    for p in src_dir.iterdir():
        if p.suffix != ".obj":
            shutil.copy(p, d / p.name)
    (d / f"{name}.obj").write_bytes(obj_bytes)
    flame.mkdir(parents=True, exist_ok=True)
    shutil.copy(src_pkl, flame / f"{name}_flame.pkl")
    return d


def face_start(data: bytes) -> int:
    """Byte offset of the first face line."""
    return data.index(b"\nf ") + 1


def cut_faces_at_line_end(data: bytes, keep: float | int) -> bytes:
    """The file cut right after its first `keep` face lines (an int) or the first `keep`
    fraction of them (a float); the faces come last in these files."""
    start = face_start(data)
    lines = data[start:].splitlines(keepends=True)
    n = keep if isinstance(keep, int) else int(len(lines) * keep)
    return data[:start] + b"".join(lines[:n])


def data_list_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


# ----------------------------------------------------------------------------- load_obj
def test_generator_scans_pass_and_a_few_stray_vertices_are_tolerated(gen, tmp_path):
    root, server = gen["root"], gen["server"]
    for sid in gen["ids"]:  # every hair style: loads, and matches its FLAME fit
        obj = root / "faceverse_dataset" / sid / f"{sid}.obj"
        mesh, params = load_scan(obj, root / "flame_params" / f"{sid}_flame.pkl",
                                 server.flame.z_shift)
        check_scan_fit(mesh, params, server, obj)
    # stray vertices (scanner debris): up to the tolerance they load, one more is refused
    sid = gen["ids"][2]
    src = root / "faceverse_dataset" / sid / f"{sid}.obj"
    data = src.read_bytes()
    n_verts = data.count(b"\nv ") + data.startswith(b"v ")
    allowed = max(STRAY_MIN, int(STRAY_FRACTION * n_verts))
    rng = np.random.default_rng(0)
    at = data.index(b"\nvt ") + 1  # after the last vertex line: face indices stay valid
    for n, ok in ((8, True), (allowed, True), (allowed + 1, False)):
        pts = rng.uniform(-0.1, 0.1, (n, 3))
        extra = "".join("v {:.6f} {:.6f} {:.6f}\n".format(*p) for p in pts).encode()
        d = copy_variant(src.parent, root / "flame_params" / f"{sid}_flame.pkl",
                         tmp_path / "scans", tmp_path / "flame", f"stray{n}",
                         data[:at] + extra + data[at:])
        if ok:
            mesh, params = load_scan(d / f"stray{n}.obj", tmp_path / "flame" /
                                     f"stray{n}_flame.pkl", server.flame.z_shift)
            assert len(mesh.verts) == n_verts + n
            check_scan_fit(mesh, params, server, d / f"stray{n}.obj")
        else:
            with pytest.raises(MeshLoadError, match=f"{n} of {n_verts + n} vertices are used "
                                                    "by no face"):
                load_obj(d / f"stray{n}.obj")


def test_truncation_refused_by_load_obj(gen, tmp_path):
    sid = gen["ids"][0]
    data = (gen["root"] / "faceverse_dataset" / sid / f"{sid}.obj").read_bytes()
    n_v, n_f = data.count(b"\nv ") + data.startswith(b"v "), data.count(b"\nf ")

    def load(name, content):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(MeshLoadError) as info:
            load_obj(path, load_texture=False)
        assert str(info.value).startswith(str(path))
        return info.value.problem

    # a cut at a random byte in the middle of a face line
    mid = face_start(data) + (len(data) - face_start(data)) // 2
    mid += data[mid - 1:mid] == b"\n"
    assert load("mid.obj", data[:mid]).startswith("ends mid-line")
    # 30% of the faces cut at a line end: about 30% of the vertices lose all their faces
    problem = load("line.obj", cut_faces_at_line_end(data, 0.7))
    assert "vertices are used by no face" in problem
    unused = int(problem.split()[0])
    assert 0.15 * n_v < unused < 0.45 * n_v
    # counts stated in comments: MeshLab's header and the one-line form; one face short
    for header in (f"# Vertices: {n_v}\n# Faces: {n_f}\n", f"# {n_v} vertices, {n_f} faces\n"):
        complete = header.encode() + data
        assert len(load_obj(_write(tmp_path / "c.obj", complete), False).faces) == n_f
        short = cut_faces_at_line_end(complete, n_f - 1)
        assert short.count(b"\nf ") == n_f - 1
        assert f"has {n_f - 1} faces" in load("short.obj", short)
    # per-corner texture coordinates (MeshLab's wedge layout) on a mesh whose every vertex is
    # still used after the cut: the unused texture coordinates give the truncation away
    v, f, _ = uv_sphere(0.6, 24, 48, (0, 0.05, 0), y_min=-0.45)
    vt = np.random.default_rng(1).uniform(0, 1, (3 * len(f), 2))
    save_obj(tmp_path / "wedge.obj", v, f, uvs=vt, face_uvs=np.arange(3 * len(f)).reshape(-1, 3))
    wedge = (tmp_path / "wedge.obj").read_bytes()
    assert len(load_obj(tmp_path / "wedge.obj").faces) == len(f)
    kept = f[:int(len(f) * 0.7)]
    assert len(v) - len(np.unique(kept)) <= STRAY_MIN  # the vertex check cannot see it
    assert "texture coordinates are used by no face" in load("wedge_cut.obj",
                                                             cut_faces_at_line_end(wedge, 0.7))


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


# ----------------------------------------------------------------------------- preprocess
def test_damaged_scans_refused_by_preprocess(gen, tmp_path, capsys):
    """A cut at a line end (30% of the faces gone) and 40 cuts at random bytes of the face
    section: each is refused (a one-line failure naming its file) and never listed, while
    the intact copy is processed. Cuts right after a newline are the line-end case; a
    line-end cut that drops only the last few faces is a complete mesh with a small hole,
    which no check can tell from a real one unless the file states its counts (tested in
    test_truncation_refused_by_load_obj)."""
    root, sid = gen["root"], gen["ids"][1]
    src_dir = root / "faceverse_dataset" / sid
    pkl = root / "flame_params" / f"{sid}_flame.pkl"
    data = (src_dir / f"{sid}.obj").read_bytes()
    scans, flame = tmp_path / "scans", tmp_path / "flame"
    copy_variant(src_dir, pkl, scans, flame, "intact", data)
    copy_variant(src_dir, pkl, scans, flame, "cut_line", cut_faces_at_line_end(data, 0.7))
    start = face_start(data)
    inside = [k for k in range(start + 1, len(data)) if data[k - 1:k] != b"\n"]
    cuts = np.random.default_rng(7).choice(inside, 40, replace=False)
    names = ["cut_line"]
    for i, k in enumerate(sorted(cuts)):
        names.append(f"cut_{i:02d}")
        copy_variant(src_dir, pkl, scans, flame, names[-1], data[:k])
    out = tmp_path / "out"
    code = preprocess.main(gen_argv(gen, scans, flame, out))
    cap = capsys.readouterr()
    assert code == 1
    failed = {ln.split(":")[0][len("FAILED "):]: ln for ln in cap.err.splitlines()
              if ln.startswith("FAILED ")}
    assert sorted(failed) == sorted(names)
    for name in names:
        assert f"{name}.obj" in failed[name], failed[name]
        assert not (out / name / "occupancy.npz").exists()
    assert "ends mid-line" in failed["cut_00"] and "used by no face" in failed["cut_line"]
    assert "1 processed, 0 already complete, 0 kept without a provenance record, 41 failed" \
        in cap.out
    assert data_list_rows(tmp_path / "out.csv") == [["id", "dataset"], ["intact", "faceverse"]]


@pytest.fixture()
def spheres(tmp_path):
    """Three sphere scans (tests/test_preprocess.py) and the tiny FLAME model."""
    root = tmp_path / "spheres"
    (root / "flame").mkdir(parents=True)
    z_shift = make_flame_model(root / "generic_model.pkl")
    for name in ("g_a", "g_b", "g_c"):
        write_scan(root, name, z_shift)
    return root, z_shift


def test_scans_that_do_not_match_their_fit_are_refused(spheres, capsys):
    root, z_shift = spheres
    scans, flame = root / "scans", root / "flame"
    # the last 30% of the faces gone, re-written with no stray vertex line, comment or
    # missing newline: every vertex is still used, so only the fit check can see the holes
    write_scan(root, "s_holes", z_shift)
    obj = scans / "s_holes" / "s_holes.obj"
    m = load_obj(obj)
    save_obj(obj, m.verts, m.faces[:int(0.7 * len(m.faces))], uvs=m.uvs,
             face_uvs=m.face_uvs[:int(0.7 * len(m.faces))], texture_name="s_holes.png")
    assert len(load_obj(obj).faces) == int(0.7 * len(m.faces))
    # a pickle that does not belong to the scan: wrong scale, wrong translation
    for name, change in (("s_scale", {"scale": 3.9}), ("s_shift", {"shift": 0.3})):
        write_scan(root, name, z_shift)
        p = load_flame_params(flame / f"{name}_flame.pkl")
        transl = p["transl"] + [change.get("shift", 0.0), 0, 0]
        save_flame_params(flame / f"{name}_flame.pkl", p["pose"], p["betas"],
                          change.get("scale", p["scale"]), transl)
    out = root / "out"
    assert preprocess.main(cli(root, out)) == 1
    err = capsys.readouterr().err
    lines = {ln.split(":")[0][len("FAILED "):]: ln for ln in err.splitlines()
             if ln.startswith("FAILED ")}
    assert sorted(lines) == ["s_holes", "s_scale", "s_shift"]
    assert "s_holes.obj: the surface falls apart into" in lines["s_holes"]
    assert "s_scale.obj: in FLAME space the scan's extent" in lines["s_scale"]
    assert "s_scale_flame.pkl do not match" in lines["s_scale"]
    assert "s_shift.obj: in FLAME space the scan's centre is off" in lines["s_shift"]
    assert [r[0] for r in data_list_rows(root / "out.csv")[1:]] == ["g_a", "g_b", "g_c"]


# ----------------------------------------------------------------------------- folders
def test_empty_scan_folder_is_an_error_and_keeps_the_data_list(tmp_path):
    data_list = tmp_path / "list.csv"
    data_list.write_bytes(b"id,dataset\r\nkeep_me,faceverse\n")  # any bytes: must stay
    before = data_list.read_bytes()
    empty = tmp_path / "scans"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a scan folder")
    (empty / ".cache").mkdir()  # hidden folders are not scans
    res = subprocess.run([sys.executable, str(ROOT / "preprocess.py"), "--scan_folder",
                          str(empty), "--output_folder", str(tmp_path / "out"), "--data_list",
                          str(data_list), "--no_progress"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"preprocess.py: error: scan folder {empty} holds no scan folders (<id>/<id>.obj); "
        "check --scan_folder"]
    assert data_list.read_bytes() == before and not (tmp_path / "out").exists()
    # a folder that does not exist: the same kind of error
    assert preprocess.main(["--scan_folder", str(tmp_path / "scnas"), "--data_list",
                            str(data_list)]) == 2
    assert data_list.read_bytes() == before


def test_no_complete_scans_leaves_the_data_list(spheres, capsys):
    root, _ = spheres
    data_list = root / "out.csv"
    data_list.write_bytes(b"id,dataset\ng_a,faceverse\ng_b,faceverse\n")
    before = data_list.read_bytes()
    # a mistyped --flame_folder: every scan fails, nothing complete in the output folder
    code = preprocess.main(cli(root, root / "out", "--flame_folder", str(root / "flmae")))
    cap = capsys.readouterr()
    assert code == 2
    assert len([ln for ln in cap.err.splitlines() if ln.startswith("FAILED ")]) == 3
    assert cap.err.splitlines()[-1] == (
        f"preprocess.py: error: output folder {root / 'out'} holds no complete scans (for "
        f"--views {N_VIEWS} --res {RES}); data list {data_list} left unchanged (check "
        "--output_folder and the failures above)")
    assert data_list.read_bytes() == before
    # a shard with no scans of its own, writing to a mistyped (empty) output folder
    assert preprocess.main(cli(root, root / "out", "--tot", "4", "--id", "3")) == 2
    assert "holds no complete scans" in capsys.readouterr().err
    assert data_list.read_bytes() == before


# ----------------------------------------------------------------------------- ids
@pytest.mark.parametrize("bad,problem", [
    ("../escape", "path separator"), ("a/b", "path separator"), ("a\\b", "path separator"),
    ("..", "relative folder"), (".", "relative folder"), (".hidden", "starts with a dot"),
    ("a b", "whitespace"), ("a\tb", "whitespace"), ("a\x07b", "control character"),
])
def test_unsafe_ids_are_refused(tmp_path, bad, problem):
    with pytest.raises(ValueError, match=problem):
        validate_scan_id(bad, "somewhere")
    path = tmp_path / "list.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([["id", "dataset"], ["001_01", "faceverse"], [bad, "faceverse"]])
    with pytest.raises(DataListError) as info:
        read_data_list(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: scan id {bad!r} ") and problem in msg and "\n" not in msg


def test_safe_ids_and_unsafe_scan_folder_names(spheres, capsys):
    for good in ("001_01", "g_a", "scan-7.v2", "Ärger"):
        assert validate_scan_id(good, "x") == good
    root, _ = spheres
    shutil.copytree(root / "scans" / "g_a", root / "scans" / "g a")
    shutil.copy(root / "flame" / "g_a_flame.pkl", root / "flame" / "g a_flame.pkl")
    assert preprocess.main(cli(root, root / "out")) == 1
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("FAILED ")]
    assert line.startswith("FAILED g a: ") and "scan id 'g a' contains whitespace" in line
    assert str(root / "scans" / "g a") in line and not (root / "out" / "g a").exists()
    assert read_data_list(root / "out.csv") == ["g_a", "g_b", "g_c"]


# ----------------------------------------------------------------------------- provenance
def _mtimes(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_provenance_records_and_reruns(spheres, capsys):
    root, _ = spheres
    out = root / "out"
    assert preprocess.main(cli(root, out)) == 0
    capsys.readouterr()
    # the record: sha256 of exactly the files the scan was made from, and the settings
    rec = json.loads((out / "g_a" / PROVENANCE_NAME).read_text())
    d = root / "scans" / "g_a"
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert [(e["role"], e["file"], e["sha256"]) for e in rec["sources"]] == [
        ("scan mesh", "g_a.obj", sha(d / "g_a.obj")), ("material", "g_a.mtl", sha(d / "g_a.mtl")),
        ("texture", "g_a.png", sha(d / "g_a.png")),
        ("flame params", "g_a_flame.pkl", sha(root / "flame" / "g_a_flame.pkl"))]
    assert rec["settings"]["n_views"] == N_VIEWS and rec["settings"]["res"] == RES
    assert rec["settings"]["n_uniform"] == SIZES.n_uniform

    # new FLAME parameters for g_b: g_b is redone, the others are not touched
    pkl = root / "flame" / "g_b_flame.pkl"
    p = load_flame_params(pkl)
    save_flame_params(pkl, p["pose"] + 0.05, np.random.default_rng(9).normal(0, 0.5, 150),
                      p["scale"], p["transl"])
    untouched = {k: v for k, v in _mtimes(out).items() if "g_b" not in k.parts}
    assert preprocess.main(cli(root, out)) == 0
    cap = capsys.readouterr()
    assert "g_b: sources changed (flame params g_b_flame.pkl); reprocessed" in cap.out
    assert "1 processed, 2 already complete, 0 kept without a provenance record, 0 failed" \
        in cap.out
    with open(pkl, "rb") as fh:
        raw = pickle.load(fh)
    # the scan is moved into FLAME space by scale / transl; its vector carries 1, 0, 0, 0
    expect = np.concatenate(
        [[1.0, 0.0, 0.0, 0.0]] + [raw[k].reshape(-1) for k in ("pose", "betas")]
    )
    expect = expect.astype(np.float32)
    np.testing.assert_array_equal(np.load(out / "g_b" / "occupancy.npz")["flame_params"], expect)
    assert json.loads((out / "g_b" / PROVENANCE_NAME).read_text())["sources"][-1]["sha256"] \
        == sha(pkl)
    assert {k: v for k, v in _mtimes(out).items() if "g_b" not in k.parts} == untouched

    # complete outputs without a record are kept as they are, and counted
    (out / "g_c" / PROVENANCE_NAME).unlink()
    before = _mtimes(out / "g_c")
    assert preprocess.main(cli(root, out)) == 0
    assert "0 processed, 2 already complete, 1 kept without a provenance record, 0 failed" \
        in capsys.readouterr().out
    assert _mtimes(out / "g_c") == before and not (out / "g_c" / PROVENANCE_NAME).exists()
    assert read_data_list(root / "out.csv") == ["g_a", "g_b", "g_c"]

    # another texture, and other settings: redone, each named
    Image.fromarray(np.full((8, 8, 3), 77, np.uint8)).save(d / "g_a.png")
    assert preprocess.main(cli(root, out)) == 0
    assert "g_a: sources changed (texture g_a.png); reprocessed" in capsys.readouterr().out
    assert preprocess.main(cli(root, out, "--views", str(N_VIEWS - 1))) == 0
    assert f"g_b: settings changed (n_views {N_VIEWS} -> {N_VIEWS - 1}); reprocessed" \
        in capsys.readouterr().out

    # a source damaged after processing: the stale outputs go, the scan is not listed
    obj = d / "g_a.obj"
    obj.write_bytes(obj.read_bytes()[:-5])
    assert preprocess.main(cli(root, out)) == 1
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("FAILED ")]
    assert line.startswith("FAILED g_a: sources changed (scan mesh g_a.obj); ")
    assert "g_a.obj: ends mid-line" in line
    assert not is_complete(out / "g_a", N_VIEWS, RES, SIZES)
    assert read_data_list(root / "out.csv") == ["g_b", "g_c"]

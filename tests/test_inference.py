"""test.py (inference): every eval_mode on a tiny GANHead trained in this module through the
real entry points (train.py stage 1 -> precompute.py -> train.py stage 2), plus the pieces
with analytic truths (Gaussian sampling per code, metrics on spheres, FaceVerse transform).

Asserted properties: output files, counts and image sizes; changing z_color (or z_detail)
leaves the geometry bit-identical; the reenacted mouth follows FLAME's jaw while the skull
stays; fitting lowers the Chamfer distance from its start and the landmark-free FLAME fit
recovers a scan given in other units, position and orientation; clear errors."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import head_colors, random_flame_params
from test_fine_stage import RES, TINY_NETS, _run
from test_train import ROOT

pytestmark = pytest.mark.slow

# stage 1 gets a wider skinning network and a strong FLAME weight prior so that 40 steps learn
# a jaw; stage 2 must build the same networks
NETS = [*TINY_NETS, "model.deformer.lbs_network.width=64"]
SMALL = ["test.res=48", "test.mesh_res=32", "test.n_frames=6", "test.control.n_steps=4",
         "test.grid_cols=3", "test.sample.n_samples=2", "test.device=cpu"]
IMG = 48


def _entry():
    spec = importlib.util.spec_from_file_location("ganhead_test_entry", ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tiny_fine_dataset, tmp_path_factory):
    data = tiny_fine_dataset
    root = tmp_path_factory.mktemp("inference")
    common = ["datamodule=synthetic", *NETS, f"datamodule.processed_dir={data['processed']}",
              f"datamodule.data_list={data['data_list']}",
              f"datamodule.flame_model={data['flame']}", f"output_dir_coarse={root / 'coarse'}"]
    fine = ["+experiments=fine_cpu", f"datamodule.load_res={RES}", "precompute.mesh_res=32",
            "datamodule.surface_points=200", "trainer.check_val_every_n_epoch=100"]
    _run("train.py", [*common, "+experiments=cpu", f"output_dir={root / 'coarse'}",
                      "trainer.max_epochs=10", "model.optim.lr=1e-2", "model.lambda_prior_w=100",
                      "seed=7"])
    _run("precompute.py", [*common, *fine])
    _run("train.py", [*common, *fine, f"output_dir={root / 'fine'}", "datamodule.repeat=4",
                      f"starting_path={root / 'coarse' / 'checkpoints' / 'last.ckpt'}",
                      "trainer.max_epochs=6"])
    return {"root": root, "data": data, "coarse": root / "coarse" / "checkpoints" / "last.ckpt",
            "fine": root / "fine" / "checkpoints" / "last.ckpt", "entry": _entry()}


def _overrides(trained, mode: str, out: Path, ckpt=None, *extra: str) -> list[str]:
    data = trained["data"]
    return [f"eval_mode={mode}", "datamodule=synthetic",
            f"datamodule.processed_dir={data['processed']}",
            f"datamodule.data_list={data['data_list']}",
            f"datamodule.flame_model={data['flame']}", f"output_dir={out}",
            f"ckpt={ckpt or trained['fine']}", *SMALL, *extra]


def run_mode(trained, mode: str, out: Path, *extra: str, ckpt=None) -> dict:
    """test.py's run() in this process (no interpreter start-up per mode)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=_overrides(trained, mode, out, ckpt, *extra))
    return trained["entry"].run(cfg)


class _Ply:
    """A binary little-endian PLY as written by lib.utils.mesh_io.save_ply, read from its
    header (trimesh may recompute the normals): vertices [V, 3], vertex_normals [V, 3],
    colors [V, 3] uint8 (or None), faces [F, 3]."""

    _TYPES = {"float": "<f4", "uchar": "u1", "int": "<i4"}

    def __init__(self, path: Path):
        data = Path(path).read_bytes()
        end = data.index(b"end_header\n") + len(b"end_header\n")
        fields, counts, element = [], {}, None
        for line in data[:end].decode("ascii").splitlines():
            parts = line.split()
            if parts[0] == "element":
                element = parts[1]
                counts[element] = int(parts[2])
            elif parts[0] == "property" and element == "vertex":
                fields.append((parts[2], self._TYPES[parts[1]]))
        rec = np.frombuffer(data, dtype=fields, count=counts["vertex"], offset=end)
        self.vertices = np.stack([rec["x"], rec["y"], rec["z"]], 1).astype(np.float64)
        names = rec.dtype.names
        self.vertex_normals = (np.stack([rec["nx"], rec["ny"], rec["nz"]], 1)
                               if "nx" in names else None)
        self.colors = np.stack([rec["red"], rec["green"], rec["blue"]], 1) if "red" in names \
            else None
        faces = np.frombuffer(data, dtype=[("n", "u1"), ("i", "<i4", (3,))],
                              count=counts.get("face", 0), offset=end + rec.nbytes)
        self.faces = faces["i"].astype(np.int64)


def _ply(path: Path) -> _Ply:
    return _Ply(path)


def _png_shape(path: Path) -> tuple[int, ...]:
    from PIL import Image

    with Image.open(path) as im:
        return (im.height, im.width)


def _video_frames(path: Path) -> list[np.ndarray]:
    import imageio.v2 as imageio

    with imageio.get_reader(str(path)) as reader:
        return [f for f in reader]


def _grid(rows: int, cols: int, h: int, w: int, pad: int = 2) -> tuple[int, int]:
    """Size of lib.render.images.make_grid of rows x cols tiles of h x w."""
    return pad + rows * (h + pad), pad + cols * (w + pad)


# ---------------------------------------------------------------------------- pieces
def test_each_code_is_sampled_from_its_own_gaussian():
    from types import SimpleNamespace

    from lib.inference.sampling import sample_codes

    g = torch.Generator().manual_seed(0)
    emb = {name: torch.nn.Embedding(50, dim) for name, dim in
           (("z_shapes", 6), ("z_details", 5), ("z_colors", 4))}
    with torch.no_grad():
        emb["z_shapes"].weight.copy_(1.0 + 0.1 * torch.randn(50, 6, generator=g))
        emb["z_details"].weight.copy_(-2.0 + 0.5 * torch.randn(50, 5, generator=g))
        emb["z_colors"].weight.copy_(3.0 + 2.0 * torch.randn(50, 4, generator=g))
    model = SimpleNamespace(**emb, bbox_min=torch.zeros(3),
                            flame_server=SimpleNamespace(n_shape=100))
    codes = sample_codes(model, 4000, std_scale=0.5, seed=1)
    assert len(codes) == 4000 and codes[0]["betas"].shape == (1, 100)
    for name in ("z_shape", "z_detail", "z_color"):
        rows = emb[name + "s"].weight.detach()
        draws = torch.cat([c[name] for c in codes])
        assert draws.shape == (4000, rows.shape[1])
        std = rows.std(0)
        assert torch.allclose(draws.mean(0), rows.mean(0), atol=4 * 0.5 * std.max() / 60)
        assert torch.allclose(draws.std(0), 0.5 * std, rtol=0.1)


def test_metrics_of_concentric_spheres():
    import trimesh

    from lib.inference.metrics import mesh_metrics, point_metrics, sample_surface

    s = trimesh.creation.icosphere(subdivisions=4)
    m = mesh_metrics(torch.tensor(s.vertices * 1.1), s.faces, torch.tensor(s.vertices), s.faces,
                     n=8000)
    assert m["head_size"] == pytest.approx(2 * 3 ** 0.5, rel=1e-3)
    assert m["chamfer_l1"] == pytest.approx(0.1, abs=0.004)
    assert m["chamfer_l2"] == pytest.approx(0.01, abs=0.001)
    assert m["normal_consistency"] > 0.99
    assert m["fscore_1pct"] == 0.0 and m["fscore_2pct"] == 0.0  # 0.1 > 2% of 3.46
    p, n = sample_surface(s.vertices, s.faces, 5000)
    near = point_metrics(p * 1.01, n, p, -n, size=3.46)  # 1% larger, flipped normals
    assert near["fscore_1pct"] == 1.0 and near["normal_consistency"] > 0.99


def test_subjects_by_row_or_scan_id(tmp_path):
    from types import SimpleNamespace

    from lib.inference.loading import InferenceError, resolve_subject

    (tmp_path / "list.csv").write_text("id,dataset\n123_45,x\n062_17,x\n100_01,x\n")
    model = SimpleNamespace(z_shapes=torch.nn.Embedding(3, 2))
    ids = {"062_17": 0, "100_01": 1, "123_45": 2}  # sorted, as the embedding rows
    for sid, row in ids.items():
        assert resolve_subject(model, sid, tmp_path / "list.csv").index == row
    assert resolve_subject(model, 12345, tmp_path / "list.csv").name == "123_45"  # Hydra's int
    assert resolve_subject(model, 1, tmp_path / "list.csv").name == "100_01"
    assert resolve_subject(model, "2").name == "subject002"
    with pytest.raises(InferenceError, match="stores no scan ids and the training data list"):
        resolve_subject(model, "062_17")
    # a checkpoint's own ids win over a data list in another order
    model.scan_ids = ["123_45", "100_01", "062_17"]
    assert resolve_subject(model, "062_17", tmp_path / "list.csv").index == 2
    with pytest.raises(InferenceError, match="'777_01' is not among the checkpoint's scan ids"):
        resolve_subject(model, "777_01", tmp_path / "list.csv")


def test_faceverse_similarity_matches_the_preprocessing_transform():
    from lib.dataset.faceverse_io import scan_to_flame_space
    from lib.inference.fitting import faceverse_similarity

    rng = np.random.default_rng(0)
    v = rng.normal(size=(500, 3)) * [0.1, 0.12, 0.09] + [0.02, 1.5, -0.3]
    sim = faceverse_similarity(v, 1.17, [0.01, 0.02, -0.03], -0.25)
    assert np.allclose(sim.apply(v), scan_to_flame_space(v, 1.17, [0.01, 0.02, -0.03], -0.25))


# ---------------------------------------------------------------------------- modes
def test_sample_through_the_entry_point(trained):
    out = trained["root"] / "run_sample"
    log = _run("test.py", _overrides(trained, "sample", out))
    assert "eval_mode=sample done" in log
    folder = out / "sample"
    summary = json.loads((folder / "summary.json").read_text())
    assert len(summary["samples"]) == 2
    for k, info in enumerate(summary["samples"]):
        d = folder / f"sample_{k:03d}"
        canon, posed = _ply(d / "canonical.ply"), _ply(d / "posed.ply")
        assert len(canon.vertices) == len(posed.vertices) == info["n_verts"] > 100
        assert len(canon.faces) == info["n_faces"]
        assert canon.colors.shape == (info["n_verts"], 3) and canon.vertex_normals is not None
        assert not np.allclose(canon.vertices, posed.vertices)  # posed: turned, jaw open
        frames = _video_frames(d / "turntable.mp4")
        assert len(frames) == 6 and frames[0].shape[:2] == (IMG, 2 * IMG)  # RGB | normal
        assert _png_shape(d / "turntable.png") == _grid(2, 3, IMG, IMG)
    assert _png_shape(folder / "samples.png") == _grid(1, 2, IMG, 2 * IMG)


def test_z_color_changes_colour_but_not_geometry(trained, tmp_path):
    from lib.inference.avatar import Avatar
    from lib.inference.loading import load_model, resolve_subject, subject_codes

    summary = run_mode(trained, "z_color", tmp_path, "test.save_meshes=true")
    assert summary["n_geometries"] == 1 and len(summary["steps"]) == 4
    meshes = [_ply(tmp_path / "z_color" / "meshes" / f"step_{i:03d}.ply") for i in range(4)]
    for m in meshes[1:]:
        assert np.array_equal(m.vertices, meshes[0].vertices)
        assert np.array_equal(m.vertex_normals, meshes[0].vertex_normals)
    # (no uint8 colour comparison here: the tiny model's subjects' learned z_color codes can
    # lie so close that their colours round to the same bytes; the float check below decides)
    assert _png_shape(tmp_path / "z_color" / "z_color.png") == _grid(2, 3, IMG, IMG)
    assert len(_video_frames(tmp_path / "z_color" / "z_color.mp4")) == 2 * 4 - 2  # forth, back

    # independently extracted avatars that differ only in z_color: same mesh and normals
    model = load_model(trained["fine"], trained["data"]["flame"])
    a = subject_codes(model, resolve_subject(model, 0))
    other = a["z_color"] + torch.randn(a["z_color"].shape,
                                       generator=torch.Generator().manual_seed(0))
    one = Avatar.from_codes(model, a, mesh_res=32)
    two = Avatar.from_codes(model, {**a, "z_color": other}, mesh_res=32)
    assert torch.equal(one.verts_c, two.verts_c) and torch.equal(one.faces, two.faces)
    assert torch.equal(one.surface()[0], two.surface()[0])
    # (the tiny model's colours barely depend on z_color: its training scans share one texture)
    assert not torch.equal(one.surface()[1], two.surface()[1])


@pytest.mark.parametrize("mode,geometries", [("interp", 4), ("z_shape", 4), ("z_detail", 1),
                                             ("betas", 4), ("thetas", 1)])
def test_control_modes(trained, tmp_path, mode, geometries):
    summary = run_mode(trained, mode, tmp_path, "test.save_meshes=true")
    n = 6 if mode == "thetas" else 4
    assert len(summary["steps"]) == n and summary["n_geometries"] == geometries
    assert _png_shape(tmp_path / mode / f"{mode}.png") == _grid(2, 3, IMG, IMG)
    assert len(_video_frames(tmp_path / mode / f"{mode}.mp4")) == 2 * n - 2
    meshes = [_ply(tmp_path / mode / "meshes" / f"step_{i:03d}.ply") for i in range(n)]
    same = [np.array_equal(a.vertices, b.vertices) for a, b in zip(meshes, meshes[1:])]
    if mode == "z_detail":  # normals change, vertices do not
        assert all(same)
        assert not np.array_equal(meshes[0].vertex_normals, meshes[-1].vertex_normals)
    else:
        assert not any(same)


def test_stage1_checkpoint_geometry_only(trained, tmp_path):
    from lib.inference.loading import InferenceError

    summary = run_mode(trained, "z_shape", tmp_path, ckpt=trained["coarse"])
    assert summary["n_geometries"] == 4
    with pytest.raises(InferenceError, match=r"stage-1 \(coarse\) checkpoint.*[Tt]rain stage 2"):
        run_mode(trained, "z_color", tmp_path, ckpt=trained["coarse"])


def test_reenact_mouth_follows_the_jaw(trained, tmp_path):
    from lib.dataset.motion import save_motion_npz
    from lib.flame import FLAMEServer
    from lib.utils.knn import nearest_neighbor

    pose = np.zeros((3, 15), np.float32)
    pose[1, 6] = 0.35            # jaw open
    pose[2, 1] = 0.4             # head turned, jaw closed
    motion = tmp_path / "motion.npz"
    save_motion_npz(motion, {"expression": np.zeros((3, 50), np.float32), "pose": pose,
                             "shape": np.zeros(100, np.float32)})
    summary = run_mode(trained, "reenact", tmp_path, "subject=001_01", f"motion={motion}",
                       "test.save_meshes=true")
    folder = tmp_path / "reenact"
    assert summary["frames"] == 3 and summary["fps_deform"] > summary["fps_deform_render"] > 0
    assert json.loads((folder / "timing.json").read_text())["frames"] == 3
    frames = _video_frames(folder / "reenact.mp4")
    assert len(frames) == 3 and frames[0].shape[:2] == (IMG, 3 * IMG)  # RGB | normal | FLAME
    v = [torch.as_tensor(_ply(folder / "meshes" / f"frame_{i:04d}.ply").vertices).float()
         for i in range(3)]
    assert len(v[0]) == summary["n_verts"]

    # FLAME with the subject's shape, posed like the frames: which parts move with the jaw
    with np.load(trained["data"]["processed"] / "001_01" / "occupancy.npz") as occ:
        params = np.repeat(occ["flame_params"][None], 2, 0)
    params[:, 4:19] = pose[:2]
    with torch.no_grad():
        flame = FLAMEServer(str(trained["data"]["flame"]))(torch.from_numpy(params)).verts
    f_move = flame[1] - flame[0]
    dist, idx = (t[0] for t in nearest_neighbor(v[0][None], flame[:1]))
    near = dist < 0.06
    mouth = near & (f_move.norm(dim=-1)[idx] > 0.5 * f_move.norm(dim=-1).max())
    skull = near & (f_move.norm(dim=-1)[idx] < 0.01)
    assert mouth.sum() >= 5 and skull.sum() >= 50
    a_move = v[1] - v[0]
    ratio = a_move[mouth].norm(dim=-1).mean() / f_move[idx[mouth]].norm(dim=-1).mean()
    cos = torch.nn.functional.cosine_similarity(a_move[mouth], f_move[idx[mouth]], dim=-1)
    assert ratio > 0.4, f"the avatar's mouth moves {ratio:.2f} of FLAME's jaw motion"
    assert cos.mean() > 0.8
    assert a_move[skull].norm(dim=-1).mean() < 0.5 * a_move[mouth].norm(dim=-1).mean()


def _heldout_scan(trained, path: Path) -> dict:
    """A posed head-model mesh of a new identity, in other units (x 0.2), position and
    orientation (y and z flipped, as FaceVerse scans), with vertex colours."""
    import trimesh

    from lib.flame import FLAMEServer

    server = FLAMEServer(str(trained["data"]["flame"]))
    params = random_flame_params(np.random.default_rng(11), jaw=0.15)
    with torch.no_grad():
        v = server(torch.from_numpy(params)[None]).verts[0].double().numpy()
    raw = (v * [1.0, -1.0, -1.0]) * 0.2 + [3.0, -1.0, 5.0]
    colors = (head_colors(server.flame.v_template.numpy()) * 255).astype(np.uint8)
    trimesh.Trimesh(raw, server.flame.faces.numpy(), vertex_colors=colors,
                    process=False).export(str(path))
    return {"params": params, "flame_space": v}


FIT = ["test.fit.n_surface=4000", "test.fit.n_near=4000", "test.fit.n_uniform=1000",
       "test.fit.shape_steps=60", "test.fit.detail_steps=15", "test.fit.shape_lr=0.03",
       "test.fit.batch=600", "test.fit.n_metric=5000", "test.fit.flame.rigid_steps=60",
       "test.fit.flame.full_steps=100"]


def test_fit_of_a_heldout_scan_in_other_units(trained, tmp_path):
    scan = tmp_path / "heldout.ply"
    _heldout_scan(trained, scan)
    metrics = run_mode(trained, "fit", tmp_path, f"scan={scan}", *FIT)
    folder = tmp_path / "fit"
    for name in ("fitted.ply", "fitted_canonical.ply", "flame_only.ply", "scan_flame_space.ply",
                 "metrics.json", "fit.json", "codes.npz"):
        assert (folder / name).is_file(), name
    assert _png_shape(folder / "compare.png") == _grid(2, 5, IMG, IMG)
    fit = json.loads((folder / "fit.json").read_text())
    # the FaceVerse layout (y down, z backward), found by an axis or a principal-axes candidate
    found = np.asarray(fit["transform"]["rotation"])
    assert np.degrees(np.arccos(np.clip((np.trace(found @ np.diag([1.0, -1.0, -1.0])) - 1) / 2,
                                        -1, 1))) < 5.0
    assert fit["transform"]["scale"] == pytest.approx(5.0, rel=0.1)
    size = metrics["head_size"]
    # the scan is a FLAME mesh: the landmark-free FLAME fit must nearly coincide with it
    assert metrics["flame_only"]["chamfer_l1"] < 0.012 * size
    assert metrics["flame_only"]["fscore_2pct"] > 0.9
    # the fit brings more of the surface close to the scan than its start (the codes' means);
    # the tiny model's fit can add a few far-off pieces, which Chamfer distances weigh heavily
    # (seed 7: F-score at 2% 0.68 -> 0.77 while Chamfer-L1 moves 0.0430 -> 0.0440)
    assert metrics["fit"]["fscore_2pct"] > metrics["start"]["fscore_2pct"] + 0.02
    assert metrics["fit"]["fscore_1pct"] > metrics["start"]["fscore_1pct"]
    assert metrics["color_fitted"] and len(fit["detail"]["color"]) == 15
    for key in ("chamfer_l1", "chamfer_l2", "normal_consistency", "fscore_1pct", "fscore_2pct"):
        assert np.isfinite(metrics["fit"][key]) and np.isfinite(metrics["flame_only"][key])


def test_geometry_fit_with_given_flame_parameters_on_stage1(trained, tmp_path):
    from lib.dataset.faceverse_io import flame_to_scan_space, save_flame_params
    from lib.flame import FLAMEServer
    from lib.utils.mesh_io import save_obj

    server = FLAMEServer(str(trained["data"]["flame"]))
    params = random_flame_params(np.random.default_rng(12), jaw=0.1)
    with torch.no_grad():
        v = server(torch.from_numpy(params)[None]).verts[0].double().numpy()
    raw, transl = flame_to_scan_space(v, 1.2, [0.03, -0.02], server.flame.z_shift, 0.1)
    save_obj(tmp_path / "scan.obj", raw, server.flame.faces.numpy())  # untextured
    save_flame_params(tmp_path / "scan_flame.pkl", params[4:19], params[19:169], 1.2, transl)
    metrics = run_mode(trained, "fit", tmp_path, f"scan={tmp_path / 'scan.obj'}",
                       f"flame={tmp_path / 'scan_flame.pkl'}", *FIT, "test.fit.shape_steps=3",
                       "test.fit.tune_steps=3", ckpt=trained["coarse"])
    assert metrics["flame_params_from"].endswith("scan_flame.pkl")
    # the opt-in tuning: scored before and after, its weights saved beside the codes
    assert metrics["tuned"]["steps"] == 3 and metrics["tuned"]["weight_drift"] > 0
    assert set(metrics["stages"]["tune_vs_z_shape_fit"]) == {
        "chamfer_l1", "fscore_1pct", "fscore_2pct", "normal_consistency"}
    state = torch.load(tmp_path / "fit" / "tuned_networks.pt", weights_only=True)
    assert set(state) == {"generator", "occ_network"}
    assert not metrics["color_fitted"]
    # the FaceVerse registration puts the scan exactly onto FLAME (same vertices here)
    registered = _ply(tmp_path / "fit" / "scan_flame_space.ply").vertices
    assert np.allclose(registered, _ply(tmp_path / "fit" / "flame_only.ply").vertices, atol=1e-4)


# ---------------------------------------------------------------------------- errors
def test_missing_checkpoint_is_a_clear_cli_error(trained, tmp_path):
    import subprocess
    import sys

    args = _overrides(trained, "sample", tmp_path, tmp_path / "nope.ckpt")
    res = subprocess.run([sys.executable, str(ROOT / "test.py"), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "nope.ckpt not found" in res.stderr and "Traceback" not in res.stderr


def test_bad_inputs_are_named(trained, tmp_path):
    from lib.dataset.motion import MotionFormatError
    from lib.inference.loading import InferenceError

    bad = tmp_path / "motion.npz"
    np.savez(bad, expression=np.zeros((4, 50)))
    with pytest.raises(MotionFormatError, match="missing field 'pose'"):
        run_mode(trained, "reenact", tmp_path, f"motion={bad}")
    doc = {"shape_params": [0.0] * 100, "frames": [{"expression": [0.0] * 50, "pose": [0.0] * 15},
                                                  {"pose": [0.0] * 15}]}
    (tmp_path / "motion.json").write_text(json.dumps(doc))
    with pytest.raises(MotionFormatError, match=r"frames\[1\] is missing field 'expression'"):
        run_mode(trained, "reenact", tmp_path, f"motion={tmp_path / 'motion.json'}")
    with pytest.raises(InferenceError, match="needs motion="):
        run_mode(trained, "reenact", tmp_path)
    (tmp_path / "broken.ply").write_text("not a mesh at all")
    with pytest.raises(InferenceError, match="broken.ply does not load"):
        run_mode(trained, "fit", tmp_path, f"scan={tmp_path / 'broken.ply'}")
    (tmp_path / "broken.obj").write_text("v 0 0 0\nv 1 0 0\nf 1 2 7\n")
    with pytest.raises(InferenceError, match="broken.obj does not load: face refers to vertex 7"):
        run_mode(trained, "fit", tmp_path, f"scan={tmp_path / 'broken.obj'}")
    with pytest.raises(InferenceError, match="neither a row.* nor a scan id"):
        run_mode(trained, "thetas", tmp_path, "subject=999_99")  # Hydra reads 99999
    with pytest.raises(InferenceError, match="subject='abc' is not among the checkpoint's scan"):
        run_mode(trained, "thetas", tmp_path, "subject=abc")
    with pytest.raises(InferenceError, match="eval_mode='nope'"):
        run_mode(trained, "nope", tmp_path)

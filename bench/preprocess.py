"""Benchmark of the per-scan preprocessing on a ~100k-face textured scan.

Shape legend: V vertices, F faces, H/W render size, Ht/Wt texture size.

Builds (in a temporary folder) a FaceVerse-layout scan: a noisy, bumpy sphere open at the
neck with spherical uvs and a procedural texture, written through the inverse FaceVerse
transform, its FLAME pickle, and a tiny model in FLAME's pickle layout (only the root joint
matters for the view transforms). Then times each phase with the full sizes
(docs/design.md, Processed scan folder: 200k occupancy points, 100k surface samples, 9 views
x 2 images at 256^2), and the whole
`process_scan` on a fresh output folder.

    .venv/bin/python bench/preprocess.py [--faces 100000] [--tex 2048] [--threads 2] [--repeat 2]
"""
from __future__ import annotations

import argparse
import math
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.dataset.faceverse_io import flame_to_scan_space, save_flame_params  # noqa: E402
from lib.dataset.preprocessing import SampleSizes, load_scan, process_scan  # noqa: E402
from lib.dataset.scan_render import render_views, save_views  # noqa: E402
from lib.dataset.scan_sampling import occupancy_samples, surface_samples  # noqa: E402
from lib.dataset.winding import inside_mask  # noqa: E402
from lib.flame import FLAMEServer  # noqa: E402
from lib.utils.mesh_io import save_npz, save_obj  # noqa: E402


def head_like_scan(n_faces: int, seed: int = 0):
    """Noisy bumpy sphere (radius ~0.75, FLAME space) open below y = -0.55, ~n_faces faces.
    Returns verts [V,3], faces [F,3], uvs [V,2] (face_uvs = faces)."""
    rng = np.random.default_rng(seed)
    n_lat = int(round(math.sqrt(n_faces / 4.0 * 1.28)))  # ~ 11% lost to the open neck
    n_lon = 2 * n_lat
    th = np.linspace(0.02, np.pi, n_lat + 1)
    ph = np.linspace(-np.pi, np.pi, n_lon + 1)
    T, P = np.meshgrid(th, ph, indexing="ij")
    r = 0.72 + 0.04 * np.sin(5 * T) * np.cos(3 * P) + 0.003 * rng.normal(size=T.shape)
    v = np.stack([r * np.sin(T) * np.sin(P), r * np.cos(T), r * np.sin(T) * np.cos(P)], -1)
    v, uv = v.reshape(-1, 3), np.stack([P / (2 * np.pi) + 0.5, 1 - T / np.pi], -1).reshape(-1, 2)
    idx = np.arange(v.shape[0]).reshape(n_lat + 1, n_lon + 1)
    a, b = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel()
    c, d = idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    f = np.concatenate([np.stack([a, c, d], 1), np.stack([a, d, b], 1)])
    f = f[v[f][:, :, 1].max(1) > -0.55]                     # open neck
    return v + [0.0, 0.05, 0.0], f, uv


def procedural_texture(size: int, seed: int = 0) -> np.ndarray:
    """[size, size, 3] uint8: smooth colour waves plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.6 + 0.3 * np.sin(12 * x), 0.45 + 0.25 * np.cos(9 * y),
                    0.4 + 0.2 * np.sin(7 * (x + y))], -1)
    img = img + 0.03 * rng.normal(size=img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def tiny_flame_model(path) -> float:
    """A small model in FLAME's pickle layout; returns its z_shift (scaled space)."""
    rng = np.random.default_rng(1)
    n = 200
    d = rng.normal(size=(n, 3))
    vt = 0.1 * d / np.linalg.norm(d, axis=1, keepdims=True)
    reg = np.zeros((5, n))
    reg[0] = 1.0 / n
    for j in range(1, 5):
        reg[j, rng.choice(n, 8, replace=False)] = 1.0 / 8
    model = {"v_template": vt, "f": rng.integers(0, n, (300, 3)).astype(np.uint32),
             "shapedirs": rng.normal(scale=1e-4, size=(n, 3, 400)),
             "posedirs": rng.normal(scale=1e-4, size=(n, 3, 36)),
             "J_regressor": sp.csc_matrix(reg), "weights": rng.dirichlet(np.ones(5), size=n),
             "kintree_table": np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]])}
    with open(path, "wb") as fh:
        pickle.dump(model, fh, protocol=2)
    z = vt[:, 2] * 6.0
    return float(-(z.min() + z.max()) / 2)


def build(root: Path, n_faces: int, tex: int):
    from PIL import Image

    z_shift = tiny_flame_model(root / "generic_model.pkl")
    v, f, uv = head_like_scan(n_faces)
    v_scan, transl = flame_to_scan_space(v, 1.2, (0.01, -0.02), z_shift, z_offset=0.4)
    d = root / "scans" / "000_01"
    d.mkdir(parents=True)
    save_obj(d / "000_01.obj", v_scan, f, uvs=uv, texture_name="000_01.jpg")
    Image.fromarray(procedural_texture(tex)).save(d / "000_01.jpg", quality=92)
    pose = np.zeros(15)
    pose[:3] = [0.1, 0.3, 0.0]
    save_flame_params(root / "flame" / "000_01_flame.pkl", pose, np.zeros(150), 1.2, transl)
    return d, root / "flame" / "000_01_flame.pkl", len(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faces", type=int, default=100000)
    ap.add_argument("--tex", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="best of N per phase")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scan_dir", help="bench this FaceVerse-layout scan folder instead "
                    "(with --flame_pkl and --flame_model), e.g. one from tools/make_synthetic.py")
    ap.add_argument("--flame_pkl")
    ap.add_argument("--flame_model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    try:
        if args.scan_dir:
            scan_dir, pkl = Path(args.scan_dir), Path(args.flame_pkl)
            server = FLAMEServer(args.flame_model).to(args.device)
            what = str(scan_dir)
        else:
            scan_dir, pkl, n_f = build(root, args.faces, args.tex)
            server = FLAMEServer(root / "generic_model.pkl").to(args.device)
            what = f"bumpy sphere, texture {args.tex}^2 jpg"
        sizes = SampleSizes()
        obj = scan_dir / f"{scan_dir.name}.obj"

        def best(fn):
            t, out = float("inf"), None
            for _ in range(args.repeat):
                tic = time.perf_counter()
                out = fn()
                t = min(t, time.perf_counter() - tic)
            return t, out

        rows = []
        t, (mesh, params) = best(lambda: load_scan(obj, pkl, server.flame.z_shift))
        print(f"scan: {what}: {len(mesh.faces)} faces, texture {mesh.texture.shape[1]}x"
              f"{mesh.texture.shape[0]}; torch threads {args.threads}; device {args.device}; "
              f"best of {args.repeat}")
        rows.append(("load (OBJ + texture + params)", t))
        rng = lambda k: np.random.default_rng([0, k])  # noqa: E731
        t, (pts, occ) = best(lambda: occupancy_samples(mesh.verts, mesh.faces, rng(0)))
        rows.append(("occupancy (200k points + labels)", t))
        t, _ = best(lambda: inside_mask(mesh.verts, mesh.faces, pts))
        rows.append(("  of which winding numbers", t))
        t, surf = best(lambda: surface_samples(mesh.verts, mesh.faces, mesh.uvs, mesh.face_uvs,
                                               mesh.texture, rng(1)))
        rows.append(("surface samples (100k)", t))
        t, (nrm, rgb) = best(lambda: render_views(mesh, params, server, 9, 256, args.device))
        rows.append(("renders (9 views x 2 at 256^2)", t))
        out = root / "out"

        def write():
            save_npz(out / "occupancy.npz", flame_params=params, scan_name=np.str_("000_01"),
                     pts_d=pts, occ_gt=occ)
            save_npz(out / "surface.npz", **surf)
            save_views(out, nrm, rgb)
        t, _ = best(write)
        rows.append(("write (2 npz + 18 png)", t))
        total = sum(t for name, t in rows if not name.startswith("  "))
        rows.append(("sum of phases", total))
        outs = []
        for i in range(args.repeat):
            tic = time.perf_counter()
            r = process_scan(scan_dir, pkl, server, root / f"full{i}", 9, 256, sizes=sizes,
                             device=args.device)
            outs.append(time.perf_counter() - tic)
            assert r.status == "done", r.message
        rows.append(("process_scan end to end", min(outs)))
        tic = time.perf_counter()
        r = process_scan(scan_dir, pkl, server, root / "full0", 9, 256, sizes=sizes)
        rows.append(("process_scan, already complete (skip)", time.perf_counter() - tic))
        w = max(len(n) for n, _ in rows)
        for name, t in rows:
            print(f"{name:<{w}}  {t:7.3f} s")
        print(f"occupied fraction {occ.mean():.3f} (near {occ[:100000].mean():.3f}, "
              f"uniform {occ[100000:].mean():.3f})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

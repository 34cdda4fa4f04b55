"""Shared fixtures: the synthetic head model and a tiny preprocessed data set made from it.

The data set is made directly from posed head-model meshes (no scans), so it is fast: per
item, points near the posed surface and uniform points, labelled by winding number.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def head_model_path(tmp_path_factory) -> Path:
    from lib.synthetic.head_model import build_head_model, save_head_model

    path = tmp_path_factory.mktemp("head") / "generic_model.pkl"
    save_head_model(build_head_model(seed=0), path)
    return path


def random_flame_params(rng: np.random.Generator, jaw: float = 0.0) -> np.ndarray:
    """A 169-d parameter vector: scale 1, no translation, small pose, random shape/exp."""
    p = np.zeros(169, np.float32)
    p[0] = 1.0
    pose = rng.normal(0, 0.05, 15)
    pose[6] = jaw
    p[4:19] = pose
    p[19:119] = rng.normal(0, 0.7, 100) * (np.arange(100) < 10)
    p[119:169] = rng.normal(0, 0.7, 50) * (np.arange(50) < 5)
    return p


def make_processed_dataset(root: Path, model_path: Path, n_subjects: int = 2,
                           n_surface: int = 4000, n_uniform: int = 4000, seed: int = 0
                           ) -> tuple[Path, Path]:
    """Write `<root>/processed/<id>/occupancy.npz` and `<root>/data_list.csv`.

    Returns (processed_dir, data_list).
    """
    from lib.dataset.winding import inside_mask
    from lib.flame import FLAMEServer

    server = FLAMEServer(str(model_path))
    rng = np.random.default_rng(seed)
    faces = server.flame.faces.numpy()
    processed = root / "processed"
    ids = []
    for s in range(n_subjects):
        sid = f"{s + 1:03d}_01"
        params = random_flame_params(rng, jaw=0.1 * s)
        with torch.no_grad():
            verts = server(torch.from_numpy(params)[None]).verts[0].numpy()
        idx = rng.integers(0, len(verts), n_surface)
        near = verts[idx] + rng.normal(0, 0.02, (n_surface, 3))
        uni = rng.uniform(-1, 1, (n_uniform, 3))
        pts = np.concatenate([near, uni]).astype(np.float32)
        occ = inside_mask(verts, faces, pts).astype(np.float32)[:, None]
        out = processed / sid
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "occupancy.npz", flame_params=params, scan_name=sid, pts_d=pts,
                 occ_gt=occ)
        ids.append(sid)
    data_list = root / "data_list.csv"
    with open(data_list, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "dataset"])
        writer.writerows([[i, "synthetic"] for i in ids])
    return processed, data_list


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, head_model_path):
    root = tmp_path_factory.mktemp("tiny_data")
    processed, data_list = make_processed_dataset(root, head_model_path)
    return {"processed": processed, "data_list": data_list, "flame": head_model_path}


def head_colors(template: np.ndarray) -> np.ndarray:
    """A smooth per-vertex colour [V, 3] in [0.1, 0.9] from template positions [V, 3]."""
    t = np.asarray(template, dtype=np.float64)
    return (0.5 + 0.4 * np.sin(2.5 * t + np.array([0.0, 1.0, 2.0]))).astype(np.float32)


def add_fine_data(processed: Path, model_path: Path, res: int = 32, n_views: int = 9,
                  n_surface: int = 4000, seed: int = 0) -> None:
    """Add stage-2 inputs to every scan of `processed` (made by make_processed_dataset):
    `surface.npz` (area-weighted samples of the posed head-model mesh, face normals, vertex
    colours mapped to [-1, 1] without per-scan normalization) and `multi_view_<res>/` normal
    and colour renders of the 9 views (same colours, so both targets agree)."""
    from lib.dataset.scan_render import save_views, view_transforms
    from lib.flame import FLAMEServer
    from lib.render.images import to_uint8
    from lib.render.shading import render_normals, render_vertex_colors
    from lib.utils.surface import area_samples

    server = FLAMEServer(str(model_path))
    faces = server.flame.faces
    colors = head_colors(server.flame.v_template.numpy())
    rng = np.random.default_rng(seed)
    for scan in sorted(p for p in processed.iterdir() if p.is_dir()):
        with np.load(scan / "occupancy.npz") as occ:
            params = occ["flame_params"]
        with torch.no_grad():
            verts = server(torch.from_numpy(params)[None]).verts[0]
        v, f = verts.numpy(), faces.numpy()
        pts, normals, face, bary = area_samples(v, f, n_surface, rng)
        col = np.einsum("nk,nkc->nc", bary, colors[f[face]])
        np.savez(scan / "surface.npz",
                 surface_points=pts.astype(np.float32),
                 surface_normals=normals.astype(np.float32),
                 surface_colors=(2.0 * col - 1.0).astype(np.float32))
        T = view_transforms(params, server, n_views)
        vk = verts @ T[:, :3, :3].transpose(1, 2) + T[:, None, :3, 3]
        normal = render_normals(vk, faces, res)
        rgb = render_vertex_colors(vk, faces, torch.from_numpy(colors), res)
        save_views(scan, np.stack([to_uint8(x) for x in normal]),
                   np.stack([to_uint8(x) for x in rgb]))


@pytest.fixture(scope="session")
def tiny_fine_dataset(tmp_path_factory, head_model_path):
    """tiny_dataset's layout plus surface samples and 32 x 32 renders of 9 views."""
    root = tmp_path_factory.mktemp("tiny_fine_data")
    processed, data_list = make_processed_dataset(root, head_model_path)
    add_fine_data(processed, head_model_path, res=32)
    return {"processed": processed, "data_list": data_list, "flame": head_model_path,
            "res": 32}

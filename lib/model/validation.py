"""Validation metrics and pictures: volumetric IoU, canonical-mesh extraction of a subject,
explicit deformation to its scan's pose, renders coloured by skinning weights.

Shape legend: B batch (1 in validation), N points, V mesh vertices, J joints.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lib.flame.frames import FlameFrames
from lib.model.explicit import deform_mesh, mesh_fields, weight_colors
from lib.utils.extraction import extract_mesh


def iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Volumetric IoU of two boolean occupancies. pred, gt: [...]. Returns a scalar."""
    inter = (pred & gt).sum().float()
    union = (pred | gt).sum().float()
    return inter / union.clamp_min(1.0)


@torch.no_grad()
def extract_canonical_mesh(model, z_shape: torch.Tensor, shape: torch.Tensor,
                           res_init: int = 16, res_final: int = 128):
    """The subject's canonical (jaw 0.2) mesh. z_shape: [1, Z]; shape: [1, 100].

    The grid is the original's: the cube around the subject's shaped canonical FLAME vertices
    (1.1 times their bounding box's longest extent, lib/utils/extraction.py).
    Returns the extraction result (verts [V, 3], faces [F, 3]) of lib.utils.extraction.
    """
    volume = model.generator(z_shape)
    verts_c = model.flame_server.canonical(shape).verts_c[0]  # [V, 3]

    def occ_fn(points: torch.Tensor) -> torch.Tensor:  # [M, 3] -> [M]
        return model.canonical_occupancy(points[None], z_shape, shape, volume)[0, :, 0]

    return extract_mesh(occ_fn, verts_c.amin(0), verts_c.amax(0), res_init=res_init,
                        res_final=res_final, device=z_shape.device)


@torch.no_grad()
def save_validation_picture(model, z_shape: torch.Tensor, flame_out: FlameFrames, path: Path,
                            res_init: int = 16, res_final: int = 128, res: int = 256) -> Path:
    """Canonical and deformed mesh of one subject, front and side, coloured by weights."""
    from lib.render.images import add_label, make_grid, save_png
    from lib.render.shading import render_shaded

    mesh = extract_canonical_mesh(model, z_shape[:1], flame_out.shape[:1], res_init, res_final)
    if mesh.verts.shape[0] == 0:
        return path  # nothing to draw yet (empty occupancy early in training)
    fields = mesh_fields(mesh.verts, model.deformer.lbs_net, flame_out.shape[:1])
    verts_d = deform_mesh(mesh.verts, fields, flame_out.index(0))[0]
    colors = weight_colors(fields[0])[None]
    tiles = []
    for label, verts in (("canonical", mesh.verts), ("deformed", verts_d)):
        for angle in (0.0, np.pi / 2):
            c, s = float(np.cos(angle)), float(np.sin(angle))
            rot = verts.new_tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
            img = render_shaded((verts @ rot.T)[None], mesh.faces, res, colors=colors)[0]
            tiles.append(add_label(img.cpu().numpy(), label))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(path, make_grid(tiles, ncols=4))
    return path

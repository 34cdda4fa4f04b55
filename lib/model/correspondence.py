"""2D-3D correspondences for stage 2 (DESIGN §6, precompute): for every training scan and
view, the canonical point that each pixel shows.

The subject's canonical mesh is extracted once with its learned codes, deformed explicitly
to each view's FLAME parameters with the learned skinning, and rasterized with the camera of
preprocessing; per pixel the canonical vertex positions are interpolated.

Shape legend: K views (9), R image resolution, V mesh vertices, P parameters (169).
"""
from __future__ import annotations

import torch

from lib.model.explicit import deform_mesh, mesh_fields
from lib.model.validation import extract_canonical_mesh
from lib.render.rasterizer import interpolate, rasterize


@torch.no_grad()
def scan_correspondences(model, index: int, params: torch.Tensor, n_views: int = 9,
                         res: int = 256, mesh_res: int = 256) -> dict[str, torch.Tensor]:
    """Correspondence cache of one training scan.

    model: a trained GANHead; index: the scan's embedding row; params: [P] its FLAME vector.
    Returns: cache [K, R, R, 4] float32 (canonical xyz, mask), view_params [K, P],
    and the canonical mesh (verts_c [V, 3], faces [F, 3]).
    """
    device = model.bbox_min.device
    params = params.to(device).reshape(1, -1)
    idx = torch.tensor([index], device=device)
    z_shape = model.codes(idx)["z_shape"]
    server = model.flame_server
    smpl = server(params)
    mesh = extract_canonical_mesh(model, z_shape, smpl["shape"], res_final=mesh_res)
    fields = mesh_fields(mesh.verts, model.deformer.lbs_net, smpl["shape"])
    view_params = torch.cat([server.view_params(params, k, n_views) for k in range(n_views)])
    verts_d = deform_mesh(mesh.verts, fields, server(view_params))  # [K, V, 3]
    frags = rasterize(verts_d, mesh.faces, res)
    xc = interpolate(frags, mesh.faces, mesh.verts)  # [K, R, R, 3]
    mask = frags.mask.to(xc.dtype)[..., None]
    return {"cache": torch.cat([xc * mask, mask], dim=-1), "view_params": view_params,
            "verts_c": mesh.verts, "faces": mesh.faces}

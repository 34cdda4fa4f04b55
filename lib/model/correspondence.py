"""2D-3D correspondences for stage 2 (precompute): for every training scan and view, the
shape-neutral canonical point that each pixel shows.

The subject's canonical mesh is extracted once with its learned codes and deformed explicitly
to each view's FLAME parameters with the learned skinning; rasterizing it with the camera of
preprocessing gives, per pixel, the deformed surface point that the view shows (the
original renders the same depth map with pyrender). Then, by `method`:

- "search" (default, the original's): the deformer's correspondence search finds each
  surface point's canonical point (lib/model/query.surface_correspondences: evaluation-mode
  initialization, the valid root of highest occupancy); the mask is the pixels whose search
  found a valid root (the original's mask is every depth hit, even where the search failed;
  such pixels carried an arbitrary point into stage 2: a defect fixed here);
- "mesh": the canonical mesh's vertices interpolated with the rasterizer's barycentrics, no
  search (this project's choice: exact on the extracted mesh, no failed pixels, faster;
  README "Differences from the original");
and the shaped canonical point x_c is stored as its shape-neutral point x_n = x_c +
disp(x_c, betas), the cache's content in the original (stage 2 queries its networks there:
lib/model/cache_render.py).

Shape legend: K views (9), R image resolution, V mesh vertices, P parameters (169), M pixels
of one view that hit the mesh.
"""
from __future__ import annotations

import torch

from lib.model.explicit import deform_mesh, mesh_fields
from lib.model.query import surface_correspondences
from lib.model.validation import extract_canonical_mesh
from lib.render.rasterizer import interpolate, rasterize
from lib.utils.errors import ModuleErrors

__all__ = ["scan_correspondences", "METHODS"]

_err = ModuleErrors(__name__)

METHODS = ("search", "mesh")


@torch.no_grad()
def scan_correspondences(model, index: int, params: torch.Tensor, n_views: int = 9,
                         res: int = 256, mesh_res: int = 256, method: str = "search",
                         chunk: int = 16384) -> dict[str, torch.Tensor]:
    """Correspondence cache of one training scan.

    model: a trained GANHead; index: the scan's embedding row; params: [P] its FLAME vector;
    method: "search" or "mesh" (module docstring); chunk: surface points per search call.
    Returns: cache [K, R, R, 4] float32 (shape-neutral canonical xyz, mask; xyz 0 outside the
    mask), view_params [K, P], the canonical mesh (verts_c [V, 3], faces [F, 3]) and
    n_hit [K], n_valid [K] (pixels hitting the mesh; of those, pixels kept).
    """
    if method not in METHODS:
        raise _err(f"method {method!r} is not one of "
                   f"{METHODS}")
    device = model.bbox_min.device
    params = params.to(device).reshape(1, -1)
    idx = torch.tensor([index], device=device)
    z_shape = model.codes(idx)["z_shape"]
    server = model.flame_server
    flame_out = server(params)
    betas = flame_out.shape
    mesh = extract_canonical_mesh(model, z_shape, betas, res_final=mesh_res)
    fields = mesh_fields(mesh.verts, model.deformer.lbs_net, betas)
    view_params = torch.cat([server.view_params(params, k, n_views) for k in range(n_views)])
    flame_views = server(view_params)
    verts_d = deform_mesh(mesh.verts, fields, flame_views)  # [K, V, 3]
    frags = rasterize(verts_d, mesh.faces, res)
    hit = frags.mask  # [K, R, R] bool
    if method == "mesh":
        xc = interpolate(frags, mesh.faces, mesh.verts)  # [K, R, R, 3] shaped canonical
        valid = hit
    else:
        xd = interpolate(frags, mesh.faces, verts_d)  # [K, R, R, 3] deformed surface points
        volume = model.generator(z_shape)
        xc = torch.zeros_like(xd)
        valid = torch.zeros_like(hit)
        for k in range(n_views):
            pix = hit[k].nonzero(as_tuple=True)
            pts = xd[k][pix]  # [M, 3]
            flame_k = flame_views.index(k)
            for s in range(0, pts.shape[0], chunk):
                xs, ok = surface_correspondences(model, pts[None, s:s + chunk], z_shape,
                                                 flame_k, eval_mode=True, volume=volume)
                rows = tuple(p[s:s + chunk] for p in pix)
                xc[k][rows] = xs[0]
                valid[k][rows] = ok[0]
    xn = xc + model.disp_net(xc.reshape(1, -1, 3), betas).reshape(xc.shape)
    mask = valid.to(xn.dtype)[..., None]
    return {"cache": torch.cat([xn * mask, mask], dim=-1).float(), "view_params": view_params,
            "verts_c": mesh.verts, "faces": mesh.faces,
            "n_hit": hit.reshape(n_views, -1).sum(1), "n_valid": valid.reshape(n_views, -1).sum(1)}

"""Queries of a GANHead: its learned codes, occupancy at deformed points and the surface
attributes (canonical point, skinned normal, colour) of deformed surface points.

Shape legend: B batch, N points, M points queried together (surface samples, canonical
points), I deformer inits, J joints, Z/D/C widths of z_shape / z_detail / z_color, P the
FLAME parameter vector (169: scale, translation, pose 15, shape 100, expression 50), Ch
feature widths, Gz/Gy/Gx the feature volume's cells along z/y/x.

The model's methods `codes`, `occupancy` and `surface` (lib/model/ganhead.py) call the
functions of the same names here; training (lib/model/fine_stage.py), precompute, inference
(lib/inference/) and the tests use them and the building blocks below:
- `codes(model, rows)`: the embedding rows of training subjects;
- `occupancy(model, xd, params, codes)`: logits in deformed (posed) space, the
  evaluation-mode search, the maximum over valid initializations (SKIPPED_LOGIT where none
  is valid);
- `surface(model, xd, params, codes)`: among the valid initializations the correspondence
  with the highest occupancy, then the normal network's normal skinned to the pose and the
  texture network's colour there (stage-2 models).
Normals are skinned as in the original: n_d = normalize(A^-T n_c) with A = sum_j w_j
tfs[j][:3, :3] the blend of the TARGET joint transforms only (no canonical transforms) and w
the skinning weights of the shaped canonical point, i.e. the LBS network at its shape-neutral
point (`blend_transforms`, `skin_normals`).
The correspondence search runs without gradients; normals and colours keep theirs to the
codes and networks, so latent fitting can use `surface` directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lib.flame.frames import FlameFrames
from lib.model.deformer import inv3
from lib.model.generator import sample_volume
from lib.utils.errors import ModuleErrors

__all__ = ["codes", "occupancy", "surface", "pose_exp_condition", "geometry_features",
           "query_fine", "blend_transforms", "skin_normals", "surface_correspondences"]



_err = ModuleErrors(__name__)


# ---------------------------------------------------------------------------- the model's API
def codes(model, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """rows: LongTensor [B] (e.g. model.subject_rows(ids)) -> {"z_shape": [B, Z], "z_detail":
    [B, D], "z_color": [B, C]} (with gradients to the embeddings)."""
    rows = torch.as_tensor(rows, dtype=torch.long, device=model.bbox_min.device).reshape(-1)
    n = model.z_shapes.num_embeddings
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise _err(f"rows {rows.tolist()[:8]} out of range: the model has {n} subjects")
    return {"z_shape": model.z_shapes(rows), "z_detail": model.z_details(rows),
            "z_color": model.z_colors(rows)}


def _check(model, xd: torch.Tensor, params: torch.Tensor, codes: dict, keys) -> int:
    if xd.dim() != 3 or xd.shape[-1] != 3:
        raise _err(f"xd must be [B, N, 3], got {tuple(xd.shape)}")
    B = xd.shape[0]
    if params.dim() != 2 or params.shape[0] != B:
        raise _err(f"params must be [B={B}, P], got {tuple(params.shape)}")
    missing = [k for k in keys if k not in codes]
    if missing:
        raise _err(f"codes lack {missing} (have {sorted(codes)})")
    for k in keys:
        if codes[k].shape[0] != B:
            raise _err(f"codes[{k!r}] has {codes[k].shape[0]} rows for a batch of {B}")
    return B


def occupancy(model, xd: torch.Tensor, params: torch.Tensor, codes: dict) -> torch.Tensor:
    """Occupancy logits of deformed points.

    xd: [B, N, 3] posed points; params: [B, P]; codes: {"z_shape": [B, Z], ...}.
    Returns logits [B, N] (SKIPPED_LOGIT of lib/model/deformer.py where no init is valid)."""
    _check(model, xd, params, codes, ("z_shape",))
    flame_out = model.flame_server(params.to(xd))
    z_shape = codes["z_shape"]
    volume = model.generator(z_shape)
    cond = {"z_shape": z_shape, "shape": flame_out.shape}
    occ = model.deformer.query_occupancy(xd, cond, flame_out, model.occupancy_fn(volume),
                                         model.disp_net, eval_mode=True)
    return occ[..., 0]


def surface(model, xd: torch.Tensor, params: torch.Tensor, codes: dict) -> dict:
    """Attributes of deformed surface points (stage-2 models).

    xd: [B, N, 3] posed points on (or near) the surface; params: [B, P]; codes: z_shape,
    z_detail, z_color rows [B, .]. Returns {"xc": [B, N, 3] shaped canonical point (0 where
    invalid), "valid": [B, N] bool, "normal": [B, N, 3] unit normal in deformed space, "color":
    [B, N, 3] the texture network's output} (normal and colour 0 where invalid)."""
    _check(model, xd, params, codes, ("z_shape", "z_detail", "z_color"))
    if model.hparams.get("stage", "coarse") != "fine":
        raise _err("surface() needs a stage-2 (fine) model: the normal and texture networks "
                   "of a stage-1 checkpoint are untrained")
    flame_out = model.flame_server(params.to(xd))
    z_shape = codes["z_shape"]
    with torch.no_grad():
        volume = model.generator(z_shape)
        xc, valid = surface_correspondences(model, xd, z_shape, flame_out, eval_mode=True,
                                            volume=volume)
        w = model.deformer.lbs_net(xc, flame_out.shape)[0]
        blend = blend_transforms(w, flame_out.tfs)
    normal_c, rgb = query_fine(model, xc, z_shape, flame_out.shape, codes["z_detail"],
                               codes["z_color"], pose_exp_condition(flame_out), volume)
    keep = valid[..., None].to(rgb.dtype)
    return {"xc": xc, "valid": valid, "normal": skin_normals(blend, normal_c) * keep,
            "color": rgb * keep}


# ---------------------------------------------------------------------------- building blocks
def pose_exp_condition(flame_out: FlameFrames) -> torch.Tensor:
    """Texture condition from the FLAME server's outputs: the full pose [B, 15] (global rotation
    included, as the original's `thetas`), then expression [B, 50] -> [B, 65]. Stage 2 passes
    the scan's own parameters, never a view's, so a rendered view does not change colours."""
    flame_out.require("pose", "exp", where="pose_exp_condition")
    return torch.cat([flame_out.pose, flame_out.exp], dim=-1)


@torch.no_grad()
def geometry_features(model, xc: torch.Tensor, z_shape: torch.Tensor, shape: torch.Tensor,
                      volume: torch.Tensor | None = None, neutral: bool = False):
    """Frozen geometry at canonical points. xc: [B, M, 3] shaped canonical points (neutral:
    already shape-neutral, as the precompute cache holds them); z_shape: [B, Z];
    shape: [B, 100]; volume: the generator's [B, Ch, Gz, Gy, Gx] for z_shape (computed when None).
    Returns x_n [B, M, 3] (shape-neutral points: xc + disp(xc, shape), or xc itself when
    neutral) and the occupancy network's last hidden features [B, M, Ch]."""
    volume = model.generator(z_shape) if volume is None else volume
    xn = xc if neutral else xc + model.disp_net(xc, shape)
    feat = sample_volume(volume, xn, model.bbox_min, model.bbox_max)
    return xn, model.occ_network(xn, feat, return_features=True)[1]


def query_fine(model, xc: torch.Tensor, z_shape: torch.Tensor, shape: torch.Tensor,
               z_detail: torch.Tensor, z_color: torch.Tensor, pose_exp: torch.Tensor,
               volume: torch.Tensor | None = None, neutral: bool = False):
    """Canonical normals and colours at canonical points.

    xc: [B, M, 3] shaped canonical points (neutral: shape-neutral ones); z_shape: [B, Z];
    shape: [B, 100]; z_detail: [B, D]; z_color: [B, C]; pose_exp: [B, 65]; volume as in
    geometry_features. Returns normal_c [B, M, 3] (unit, canonical frame) and rgb [B, M, 3]
    (linear output, trained toward [-1, 1])."""
    xn, gfeat = geometry_features(model, xc, z_shape, shape, volume, neutral=neutral)
    M = xc.shape[1]

    def rows(z: torch.Tensor) -> torch.Tensor:  # [B, Ch] -> [B, M, Ch]
        return z[:, None, :].expand(-1, M, -1)

    normal_c, nfeat = model.norm_network(xn, torch.cat([rows(z_detail), gfeat], dim=-1),
                                         return_features=True)
    rgb = model.tex_network(xn, torch.cat([rows(z_color), rows(pose_exp), gfeat, nfeat], dim=-1))
    return normal_c, rgb


def blend_transforms(w: torch.Tensor, tfs: torch.Tensor) -> torch.Tensor:
    """Linear part of the blended target transform, sum_j w_j tfs[j][:3, :3].
    w: [B, M, J]; tfs: [B, J, 4, 4] (target joint transforms). Returns [B, M, 3, 3]."""
    return torch.einsum("bmj,bjrc->bmrc", w, tfs[..., :3, :3])


def skin_normals(blend: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """Normals skinned by the inverse-transpose of the blend: blend [B, M, 3, 3]
    (blend_transforms); normals [B, M, 3] -> unit normalize(blend^-T n) [B, M, 3] (0 where the
    blend is singular)."""
    inv, _ = inv3(blend)
    return F.normalize((inv.transpose(-1, -2) @ normals[..., None])[..., 0], dim=-1, eps=1e-6)


@torch.no_grad()
def surface_correspondences(
    model,
    pts_d: torch.Tensor,
    z_shape: torch.Tensor,
    flame_out: FlameFrames,
    eval_mode: bool = False,
    volume: torch.Tensor | None = None,
):
    """Canonical points of posed surface samples through the deformer (no gradient).

    pts_d: [B, M, 3] in the scan's posed space; z_shape: [B, Z]; flame_out: the FLAME server's
    FlameFrames of the scan's parameters; volume as in geometry_features. Among the valid inits
    the one with the highest occupancy is kept. Returns xc [B, M, 3] (0 where none is valid)
    and valid [B, M] bool."""
    cond = {"z_shape": z_shape, "shape": flame_out.shape}
    xc, valid = model.deformer(pts_d, cond, flame_out, eval_mode=eval_mode)  # [B, M, I, 3]
    B, M, I, _ = xc.shape
    xc = torch.where(valid[..., None], xc, torch.zeros_like(xc))  # diverged inits may be NaN
    occ = model.canonical_occupancy(xc.reshape(B, M * I, 3), z_shape, flame_out.shape, volume)
    occ = occ.reshape(B, M, I).masked_fill(~valid, float("-inf"))
    best = occ.argmax(dim=-1)  # [B, M]
    xc = torch.gather(xc, 2, best[..., None, None].expand(B, M, 1, 3))[:, :, 0]
    return xc, valid.any(dim=-1)

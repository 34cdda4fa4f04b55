"""Fitting an avatar's latent codes to a scan with every network frozen (eval_mode=fit).

Shape legend: N points, M valid surface samples, K points per step, Z/D/C code widths,
P parameter-vector length (169), I deformer initializations, J joints.

The scan is already in FLAME space and posed by FLAME parameters `params` [1, P] (from its
FLAME file or `lib.inference.flame_fit`). Then, as in training but for the codes only:
1. z_shape: occupancy of points around the scan (near-surface and uniform, labelled inside/
   outside by the generalized winding number of the scan) through the learned deformer
   (deformed -> canonical by Broyden, gradients to z_shape by implicit differentiation, the
   occupancy network at the shape-neutral point): BCE over the points that have a valid
   correspondence + lambda_reg * mean(z_shape^2);
2. z_detail and z_color: the scan's surface samples are taken to canonical space once (with
   the fitted z_shape); the normal network's normals, skinned to the scan's pose, are pulled
   to the scan normals (1 - cos) and the texture network's colours to the scan's colours
   (squared error, colours c in [0, 1] as c * 2 - 1 as in preprocessing; skipped for
   untextured scans) + lambda_reg * (mean(z_detail^2) + mean(z_color^2)).
Codes start from the means of the learned embeddings.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lib.model.deformer import SKIPPED_LOGIT
from lib.model.query import (
    blend_transforms,
    pose_exp_condition,
    query_fine,
    skin_normals,
    surface_correspondences,
)

__all__ = ["occupancy_samples", "fit_shape", "fit_detail_color"]


def occupancy_samples(verts: np.ndarray, faces: np.ndarray, surface_pts: np.ndarray,
                      n_near: int, n_uniform: int, sigmas=(0.01, 0.05), bbox_min=(-1, -1, -1),
                      bbox_max=(1, 1, 1), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points around a scan and their labels.

    verts [V, 3], faces [F, 3]: the scan in FLAME space; surface_pts [S, 3]: samples on it.
    n_near points are surface samples jittered by N(0, sigma^2) (the sigmas share them
    equally), n_uniform are uniform in the box. Returns pts [N, 3] float32 and occ [N]
    float32 (1 inside by winding number)."""
    from lib.dataset.winding import inside_mask

    rng = np.random.default_rng(seed)
    parts = []
    per = np.array_split(np.arange(n_near), len(sigmas))
    for sigma, idx in zip(sigmas, per):
        base = surface_pts[rng.integers(0, len(surface_pts), len(idx))]
        parts.append(base + rng.normal(0.0, sigma, base.shape))
    parts.append(rng.uniform(bbox_min, bbox_max, (n_uniform, 3)))
    pts = np.concatenate(parts).astype(np.float32)
    occ = inside_mask(verts, faces, pts).astype(np.float32)
    return pts, occ


def fit_shape(model, params: torch.Tensor, pts: torch.Tensor, occ: torch.Tensor,
              z_init: torch.Tensor, steps: int = 100, lr: float = 1e-2, batch: int = 2000,
              lambda_reg: float = 1e-3, seed: int = 0) -> tuple[torch.Tensor, list[float]]:
    """Optimize z_shape (step 1 of the module docstring). params: [1, P]; pts: [N, 3] and
    occ: [N] on the model's device; z_init: [1, Z]. Returns z_shape [1, Z] (detached) and the
    BCE per step."""
    z = z_init.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    history = []
    for _ in tqdm(range(steps), desc="fit z_shape", unit="step"):
        idx = torch.randint(0, pts.shape[0], (min(batch, pts.shape[0]),), generator=gen)
        idx = idx.to(pts.device)
        logits = model.occupancy(pts[idx][None], params, {"z_shape": z})[0]
        valid = logits > SKIPPED_LOGIT  # a valid correspondence was found
        if not bool(valid.any()):
            raise RuntimeError("fit_shape: no point found a canonical correspondence; is the "
                               "scan in FLAME space (check the FLAME fit)?")
        bce = F.binary_cross_entropy_with_logits(logits[valid], occ[idx][valid])
        loss = bce + lambda_reg * (z ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(bce.detach()))
    return z.detach(), history


def fit_detail_color(model, params: torch.Tensor, z_shape: torch.Tensor, pts: torch.Tensor,
                     normals: torch.Tensor, colors: torch.Tensor | None, z_detail: torch.Tensor,
                     z_color: torch.Tensor, steps: int = 100, lr: float = 1e-2,
                     batch: int = 2000, lambda_reg: float = 1e-3, lambda_color: float = 1.0,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Optimize z_detail and (with colours) z_color (step 2 of the module docstring).

    params: [1, P]; z_shape: [1, Z] (fitted); pts, normals: [N, 3] scan samples in FLAME space
    (unit outward normals); colors: [N, 3] in [-1, 1] or None; z_detail [1, D], z_color
    [1, C]: starting codes. Returns z_detail, z_color (detached) and a history dict with
    per-step 'normal' (mean 1 - cos) and 'color' (mean squared error) and 'valid' (fraction of
    samples with a canonical correspondence)."""
    server = model.flame_server
    with torch.no_grad():
        flame_out = server(params)
        volume = model.generator(z_shape)
        xc, valid = surface_correspondences(model, pts[None], z_shape, flame_out, eval_mode=True,
                                            volume=volume)
        keep = valid[0]
        if not bool(keep.any()):
            raise RuntimeError("fit_detail_color: no scan sample found a canonical "
                               "correspondence; is the scan in FLAME space?")
        xc = xc[0, keep]
        n_gt = F.normalize(normals[keep], dim=-1)
        c_gt = None if colors is None else colors[keep]
        w = model.deformer.lbs_net(xc[None], flame_out.shape)[0]
        rot = blend_transforms(w, flame_out.tfs)[0]  # [M, 3, 3]
        pose_exp = pose_exp_condition(flame_out)
    zd = z_detail.detach().clone().requires_grad_(True)
    zc = z_color.detach().clone().requires_grad_(c_gt is not None)
    opt = torch.optim.Adam([zd, zc] if c_gt is not None else [zd], lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    history = {"normal": [], "color": [], "valid": float(keep.float().mean())}
    M = xc.shape[0]
    for _ in tqdm(range(steps), desc="fit z_detail/z_color", unit="step"):
        idx = torch.randint(0, M, (min(batch, M),), generator=gen).to(xc.device)
        normal_c, rgb = query_fine(model, xc[idx][None], z_shape, flame_out.shape, zd, zc,
                                   pose_exp, volume)
        n = skin_normals(rot[idx][None], normal_c)[0]
        loss_n = (1.0 - (n * n_gt[idx]).sum(-1)).mean()
        loss = loss_n + lambda_reg * (zd ** 2).mean()
        if c_gt is not None:
            loss_c = ((rgb[0] - c_gt[idx]) ** 2).mean()
            loss = loss + lambda_color * loss_c + lambda_reg * (zc ** 2).mean()
            history["color"].append(float(loss_c.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history["normal"].append(float(loss_n.detach()))
    return zd.detach(), zc.detach(), history

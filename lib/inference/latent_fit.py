"""Fitting an avatar's latent codes to a scan with every network frozen (eval_mode=fit).

Shape legend: N points (N' of them kept; per step min(batch, N)), M valid surface samples,
Z/D/C code widths, P parameter-vector length (169), I deformer initializations, J joints.

The scan is already in FLAME space and posed by FLAME parameters `params` [1, P] (from its
FLAME file or `lib.inference.flame_fit`). Then, as in training but for the codes only:
1. z_shape: occupancy of points around the scan (near-surface and uniform, labelled inside/
   outside by the generalized winding number w of the scan; points where w is ambiguous
   (|w| strictly between `ambiguous[0]` and `ambiguous[1]`: next to holes and the crop's cut)
   and points below the neck plane (where a cropped scan says nothing) are left out) through
   the learned deformer (deformed -> canonical by Broyden, gradients to z_shape by implicit
   differentiation, the occupancy network at the shape-neutral point): BCE over the points
   that have a valid correspondence + lambda_reg * mean(z_shape^2) (the training prior).
   With `std` (the per-dimension spread of the learned embeddings) the code moves in units of
   that spread, z = z_init + std * u (Adam on u: its step then means the same for every
   dimension, whose spreads differ by orders of magnitude from the code's raw scale), and
   lambda_code * mean(((z - mean) / std)^2) keeps it among the learned codes;
2. z_detail and z_color: the scan's surface samples are taken to canonical space once (with
   the fitted z_shape); the normal network's normals, skinned to the scan's pose, are pulled
   to the scan normals (1 - cos) and the texture network's colours to the scan's colours
   (squared error, colours c in [0, 1] as c * 2 - 1 as in preprocessing; skipped for
   untextured scans) + lambda_reg * (mean(z_detail^2) + mean(z_color^2)).
The codes start from `pick_start`: of the candidate codes (lib/inference/fitting.py
start_candidates), the one whose z_shape has the lowest occupancy BCE on a fixed subset of
the points.
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

__all__ = ["occupancy_samples", "occupancy_bce", "batch_bce", "pick_start", "fit_shape",
           "fit_detail_color"]


def occupancy_samples(verts: np.ndarray, faces: np.ndarray, surface_pts: np.ndarray,
                      n_near: int, n_uniform: int, sigmas=(0.01, 0.05), bbox_min=(-1, -1, -1),
                      bbox_max=(1, 1, 1), seed: int = 0, ambiguous=None, plane=None
                      ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Points around a scan and their labels.

    verts [V, 3], faces [F, 3]: the scan in FLAME space; surface_pts [M, 3]: samples on it.
    n_near points are surface samples jittered by N(0, sigma^2) (the sigmas share them
    equally), n_uniform are uniform in the box (N = n_near + n_uniform in all). ambiguous:
    (lo, hi) or None: points with lo < |w| < hi are dropped; plane: (point [3], normal [3]) or
    None: points with (x - point) . normal <= 0 are dropped. Returns pts [N', 3] float32,
    occ [N'] float32 (1 where |w| > 1/2, inside) and the counts of drawn, dropped and kept
    points."""
    from lib.dataset.winding import INSIDE_THRESHOLD, winding_number

    rng = np.random.default_rng(seed)
    parts = []
    per = np.array_split(np.arange(n_near), len(sigmas))
    for sigma, idx in zip(sigmas, per):
        base = surface_pts[rng.integers(0, len(surface_pts), len(idx))]
        parts.append(base + rng.normal(0.0, sigma, base.shape))
    parts.append(rng.uniform(bbox_min, bbox_max, (n_uniform, 3)))
    pts = np.concatenate(parts).astype(np.float32)
    w = np.abs(winding_number(verts, faces, pts))
    keep = np.ones(len(pts), dtype=bool)
    stats = {"points": int(len(pts))}
    if ambiguous is not None:
        lo, hi = (float(a) for a in ambiguous)
        unsure = (w > lo) & (w < hi)
        stats["ambiguous_winding"] = int(unsure.sum())
        keep &= ~unsure
    if plane is not None:
        below = (pts - np.asarray(plane[0])) @ np.asarray(plane[1]) <= 0
        stats["below_neck"] = int((below & keep).sum())
        keep &= ~below
    stats["kept"] = int(keep.sum())
    return pts[keep], (w[keep] > INSIDE_THRESHOLD).astype(np.float32), stats


def occupancy_bce(model, params: torch.Tensor, pts: torch.Tensor, occ: torch.Tensor,
                  z_shape: torch.Tensor) -> torch.Tensor:
    """BCE of the occupancy of z_shape [1, Z] at pts [N, 3] against occ [N] over the points
    with a canonical correspondence (params [1, P]): a scalar tensor (inf when none has one)."""
    logits = model.occupancy(pts[None], params, {"z_shape": z_shape})[0]
    valid = logits > SKIPPED_LOGIT  # a valid correspondence was found
    if not bool(valid.any()):
        return logits.new_tensor(float("inf"))
    return F.binary_cross_entropy_with_logits(logits[valid], occ[valid])


def batch_bce(model, params: torch.Tensor, pts: torch.Tensor, occ: torch.Tensor,
              z_shape: torch.Tensor, batch: int, gen: torch.Generator, caller: str
              ) -> torch.Tensor:
    """BCE of the occupancy of z_shape [1, Z] on a random batch (min(batch, N) points drawn
    with gen) of pts [N, 3] / occ [N] (params [1, P]), over the points with a canonical
    correspondence: a scalar tensor with gradients. Raises (naming caller) when none has
    one."""
    idx = torch.randint(0, pts.shape[0], (min(batch, pts.shape[0]),), generator=gen)
    idx = idx.to(pts.device)
    logits = model.occupancy(pts[idx][None], params, {"z_shape": z_shape})[0]
    valid = logits > SKIPPED_LOGIT  # a valid correspondence was found
    if not bool(valid.any()):
        raise RuntimeError(f"{caller}: no point found a canonical correspondence; is the "
                           "scan in FLAME space (check the FLAME fit)?")
    return F.binary_cross_entropy_with_logits(logits[valid], occ[idx][valid])


def pick_start(model, params: torch.Tensor, pts: torch.Tensor, occ: torch.Tensor,
               candidates: list[dict], n_points: int = 3000, seed: int = 0
               ) -> tuple[int, list[float]]:
    """The candidate start whose z_shape ([1, Z] under the key 'z_shape') has the lowest
    occupancy BCE on one fixed random subset of n_points of pts [N, 3] / occ [N] (params
    [1, P]). Returns its index and every candidate's BCE."""
    if not candidates:
        raise ValueError("pick_start: no candidate codes")
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(pts.shape[0], generator=gen)[:n_points].to(pts.device)
    scores = []
    with torch.no_grad():
        for cand in tqdm(candidates, desc="score start codes", unit="code", leave=False):
            scores.append(float(occupancy_bce(model, params, pts[idx], occ[idx],
                                              cand["z_shape"])))
    return int(np.argmin(scores)), scores


def fit_shape(model, params: torch.Tensor, pts: torch.Tensor, occ: torch.Tensor,
              z_init: torch.Tensor, steps: int = 100, lr: float = 1e-2, batch: int = 2000,
              lambda_reg: float = 1e-3, seed: int = 0, std: torch.Tensor | None = None,
              mean: torch.Tensor | None = None, lambda_code: float = 0.0
              ) -> tuple[torch.Tensor, list[float]]:
    """Optimize z_shape (step 1 of the module docstring). params: [1, P]; pts: [N, 3] and
    occ: [N] on the model's device; z_init: [1, Z]; std, mean: [Z] or None (the learned
    embeddings' spread and mean: with std the code moves in units of std, and lambda_code
    weighs its Gaussian prior around mean, else around z_init). Returns z_shape [1, Z]
    (detached) and the BCE per step."""
    z0 = z_init.detach().clone()
    # the optimized variable: u (z = z0 + std * u) in units of the spread, else z itself
    var = torch.zeros_like(z0) if std is not None else z0.clone()
    var.requires_grad_(True)
    opt = torch.optim.Adam([var], lr=lr)
    centre = z0 if mean is None else mean

    def code() -> torch.Tensor:
        return z0 + std * var if std is not None else var

    gen = torch.Generator().manual_seed(int(seed))
    history = []
    for _ in tqdm(range(steps), desc="fit z_shape", unit="step"):
        z = code()
        bce = batch_bce(model, params, pts, occ, z, batch, gen, "fit_shape")
        loss = bce + lambda_reg * (z ** 2).mean()
        if std is not None and lambda_code > 0:
            loss = loss + lambda_code * (((z - centre) / std) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(bce.detach()))
    return code().detach(), history


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

"""Stage-1 losses (DESIGN §6): occupancy, FLAME prior, bone bootstrapping, deshape, latents.

Shape legend: B batch, N points, M prior points, V FLAME vertices, J joints (5),
K expression components (50), P pose-feature size (36).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lib.utils.knn import nearest_neighbor


def occupancy_loss(occ_logits: torch.Tensor, occ_gt: torch.Tensor) -> torch.Tensor:
    """BCE with logits. occ_logits, occ_gt: [B, N, 1]. Returns a scalar."""
    return F.binary_cross_entropy_with_logits(occ_logits, occ_gt)


def flame_prior_loss(xc: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
                     pose_dirs: torch.Tensor, expr_dirs: torch.Tensor, verts_c: torch.Tensor,
                     flame_w: torch.Tensor, flame_pose_dirs: torch.Tensor,
                     flame_expr_dirs: torch.Tensor, radius: float = 0.1
                     ) -> dict[str, torch.Tensor]:
    """Pull the learned fields to those of the nearest canonical FLAME vertex.

    Only canonical points within `radius` of the canonical FLAME vertices count. Each term
    is a sum of squares divided by the number of counted points (the caller weights them:
    lambda 100 for the two bases, 0.2 for the weights in the original).

    xc: [B, M, 3] canonical points; mask: [B, M] bool (valid correspondences);
    w: [B, M, J]; pose_dirs: [B, M, P, 3]; expr_dirs: [B, M, 3, K] (fields at xc);
    verts_c: [B, V, 3] canonical FLAME vertices; flame_w: [V, J];
    flame_pose_dirs: [V, P, 3]; flame_expr_dirs: [V, 3, K] (scaled space).
    Returns: dict of scalars 'w', 'pose', 'exp' and the count 'n'.
    """
    dist, idx = nearest_neighbor(xc.detach(), verts_c.detach())
    near = mask & (dist < radius)  # [B, M]
    n = near.sum().clamp_min(1).to(xc.dtype)
    idx_n = idx[near]  # [n]
    out = {
        "w": ((w[near] - flame_w[idx_n]) ** 2).sum() / n,
        "pose": ((pose_dirs[near] - flame_pose_dirs[idx_n]) ** 2).sum() / n,
        "exp": ((expr_dirs[near] - flame_expr_dirs[idx_n]) ** 2).sum() / n,
        "n": n.detach(),
    }
    return out


def bone_points(joints: torch.Tensor, parents: list[int], per_bone: int = 10) -> torch.Tensor:
    """Points evenly spaced on the bones (segments from each joint to its parent).

    joints: [B, J, 3]. Returns: [B, (J - 1) * per_bone, 3].
    """
    t = torch.linspace(0.0, 1.0, per_bone, device=joints.device, dtype=joints.dtype)
    segs = []
    for j, p in enumerate(parents):
        if p < 0:
            continue
        a, b = joints[:, p], joints[:, j]  # [B, 3]
        segs.append(a[:, None] + t[None, :, None] * (b - a)[:, None])
    return torch.cat(segs, dim=1)


def bone_weight_targets(parents: list[int], n_joints: int, device=None) -> torch.Tensor:
    """One-hot weights on the parent bone for every non-root joint. Returns: [J - 1, J]."""
    rows = [F.one_hot(torch.tensor(p), n_joints) for p in parents if p >= 0]
    return torch.stack(rows).float().to(device)


def deshape_loss(verts_c: torch.Tensor, dx: torch.Tensor, verts_c_neutral: torch.Tensor
                 ) -> torch.Tensor:
    """MSE between displaced shaped canonical vertices and the shape-neutral ones.

    verts_c, dx, verts_c_neutral: [B, V, 3]. Returns a scalar.
    """
    return F.mse_loss(verts_c + dx, verts_c_neutral)


def latent_reg(z: torch.Tensor) -> torch.Tensor:
    """Mean square of the latent codes. z: [B, D]. Returns a scalar."""
    return (z ** 2).mean()

"""Stage-1 losses: occupancy, FLAME prior, bone bootstrapping, deshape, latents.

Shape legend: B batch, N points, M prior points, V FLAME vertices, J joints (5),
X expression components (50), Q pose-feature size (36), per_bone points per bone.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lib.utils.knn import nearest_neighbor

# The original keeps the points whose *squared* distance to the nearest canonical FLAME vertex
# is below 0.1 (pytorch3d's knn_points returns squared distances): a radius of sqrt(0.1).
PRIOR_RADIUS = math.sqrt(0.1)


def occupancy_loss(occ_logits: torch.Tensor, occ_gt: torch.Tensor) -> torch.Tensor:
    """BCE with logits, mean over all entries. occ_logits, occ_gt: [B, N, 1]. Returns a scalar."""
    return F.binary_cross_entropy_with_logits(occ_logits, occ_gt)


def flame_prior_loss(xc: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
                     pose_dirs: torch.Tensor, expr_dirs: torch.Tensor, verts_c: torch.Tensor,
                     flame_w: torch.Tensor, flame_pose_dirs: torch.Tensor,
                     flame_expr_dirs: torch.Tensor, radius: float = PRIOR_RADIUS
                     ) -> dict[str, torch.Tensor]:
    """Pull the learned LBS fields to those of the nearest canonical FLAME vertex.

    Only points closer than `radius` to their nearest vertex of verts_c count (the nearest
    vertex is found without gradient). Each term is the sum of squared differences over the
    counted points divided by their number (the caller weights them: 100 for the two bases,
    0.2 for the weights in the original). An empty set gives zeros.

    xc: [B, M, 3] points where the fields were evaluated; mask: [B, M] bool (points that may
    count); w: [B, M, J]; pose_dirs: [B, M, Q, 3]; expr_dirs: [B, M, 3, X] (fields at xc);
    verts_c: [B, V, 3] canonical FLAME vertices in the space of xc; flame_w: [V, J];
    flame_pose_dirs: [V, Q, 3]; flame_expr_dirs: [V, 3, X] (scaled space).
    Returns: dict of scalars 'w', 'pose', 'exp' and the count 'n'.
    """
    dist, idx = nearest_neighbor(xc.detach(), verts_c.detach())
    near = mask & (dist < radius)  # [B, M]
    n = near.sum().clamp_min(1).to(xc.dtype)
    idx_n = idx[near]  # [n]
    return {
        "w": ((w[near] - flame_w[idx_n]) ** 2).sum() / n,
        "pose": ((pose_dirs[near] - flame_pose_dirs[idx_n]) ** 2).sum() / n,
        "exp": ((expr_dirs[near] - flame_expr_dirs[idx_n]) ** 2).sum() / n,
        "n": n.detach(),
    }


def bones(parents: list[int]) -> list[tuple[int, int]]:
    """(parent, child) joint pairs of every non-root joint, in joint order."""
    return [(int(p), j) for j, p in enumerate(parents) if p >= 0]


def bone_points(joints: torch.Tensor, parents: list[int], per_bone: int = 5,
                sigma: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Jittered points on the bones (segments parent joint -> child joint).

    On every bone, per_bone points at the fractions linspace(0, 1, per_bone) plus Gaussian
    noise of std `sigma` (drawn per batch item, point and bone), clamped to [0, 1].
    joints: [B, J, 3]. Returns: [B, n_bones * per_bone, 3] (bones in joint order).
    """
    B = joints.shape[0]
    base = torch.linspace(0.0, 1.0, per_bone, device=joints.device, dtype=joints.dtype)
    segs = []
    for p, j in bones(parents):
        noise = torch.randn(B, per_bone, generator=generator, dtype=joints.dtype,
                            device="cpu" if generator is not None else joints.device)
        t = (base + sigma * noise.to(joints.device)).clamp(0.0, 1.0)     # [B, per_bone]
        a, b = joints[:, p], joints[:, j]                                   # [B, 3]
        segs.append(a[:, None] + t[..., None] * (b - a)[:, None])
    return torch.cat(segs, dim=1)


def joint_weight_targets(joints: torch.Tensor, parents: list[int]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Skinning-weight targets at the joints: every joint one-hot on itself, then every
    non-root joint again one-hot on its parent (the two targets of a child joint conflict:
    under an MSE its weights settle between its own bone and its parent's).

    joints: [B, J, 3]. Returns points [B, J + n_bones, 3] and targets [J + n_bones, J].
    """
    J = joints.shape[1]
    pairs = bones(parents)
    idx = list(range(J)) + [j for _, j in pairs]
    hot = list(range(J)) + [p for p, _ in pairs]
    target = F.one_hot(torch.tensor(hot, device=joints.device), J).to(joints.dtype)
    return joints[:, idx], target


def deshape_loss(verts_c: torch.Tensor, dx: torch.Tensor, verts_c_neutral: torch.Tensor
                 ) -> torch.Tensor:
    """MSE between displaced shaped canonical vertices and the shape-neutral ones.

    verts_c, dx, verts_c_neutral: [B, V, 3]. Returns a scalar.
    """
    return F.mse_loss(verts_c + dx, verts_c_neutral)


def latent_reg(z: torch.Tensor) -> torch.Tensor:
    """Mean square of the latent codes. z: [B, Z|D|C] (any code). Returns a scalar."""
    return (z ** 2).mean()

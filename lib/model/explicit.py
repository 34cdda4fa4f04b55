"""Explicit deformation of an extracted canonical mesh (no root finding needed).

Once the canonical mesh of an avatar is extracted, every vertex carries the learned
skinning weights and blendshape bases of the LBS network, so any FLAME frame deforms it with
one network pass (docs/design.md, Forward skinning): used by validation pictures, precompute
and reenactment.

Shape legend: B batch (frames), V mesh vertices, J joints, X expression components,
Q pose-feature size.
"""
from __future__ import annotations

import torch

from lib.flame.frames import FlameFrames
from lib.flame.lbs import deform_canonical

# One colour per joint for pictures coloured by skinning weights:
# root, neck, jaw, left eye, right eye.
JOINT_COLORS = torch.tensor([
    [0.55, 0.55, 0.55],
    [0.20, 0.55, 0.90],
    [0.95, 0.45, 0.15],
    [0.20, 0.80, 0.30],
    [0.85, 0.20, 0.65],
])
# deform_canonical's per-frame arguments, in its order
_FRAME_FIELDS = ("exp", "pose_feature", "tfs", "exp_c", "pose_feature_c", "tfs_c")


@torch.no_grad()
def mesh_fields(verts_c: torch.Tensor, lbs_net, betas: torch.Tensor, chunk: int = 50_000
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Learned fields at the (shaped) canonical mesh vertices, in chunks.

    verts_c: [V, 3]; lbs_net: the deformer's (xc, betas) -> fields; betas: [1, 100].
    Returns: w [V, J], pose_dirs [V, Q, 3], expr_dirs [V, 3, X].
    """
    ws, ps, es = [], [], []
    for start in range(0, verts_c.shape[0], chunk):
        w, p, e = lbs_net(verts_c[None, start:start + chunk], betas)
        ws.append(w[0])
        ps.append(p[0])
        es.append(e[0])
    return torch.cat(ws), torch.cat(ps), torch.cat(es)


@torch.no_grad()
def deform_mesh(verts_c: torch.Tensor, fields: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                flame_out: FlameFrames) -> torch.Tensor:
    """Deform canonical mesh vertices to every frame of `flame_out` (the FLAME server's).

    verts_c: [V, 3]; fields: (w [V, J], pose_dirs [V, Q, 3], expr_dirs [V, 3, X]).
    flame_out: FlameFrames with tfs [B, J, 4, 4], pose_feature [B, Q], exp [B, X] and the
    canonical tfs_c, pose_feature_c, exp_c.
    Returns: verts_d [B, V, 3].
    """
    w, pose_dirs, expr_dirs = fields
    FlameFrames.check(flame_out, "deform_mesh").require(*_FRAME_FIELDS, where="deform_mesh")
    # one frame at a time: the blend intermediates stay [V, ...] rather than [B, V, ...]
    return torch.stack([deform_canonical(verts_c, w, expr_dirs, pose_dirs,
                                         *(getattr(flame_out, k)[b] for k in _FRAME_FIELDS))
                        for b in range(flame_out.tfs.shape[0])])


def weight_colors(w: torch.Tensor) -> torch.Tensor:
    """Blend the joint colours by skinning weights. w: [..., J]. Returns: [..., 3] in [0,1]."""
    colors = JOINT_COLORS.to(w)
    if w.shape[-1] != colors.shape[0]:
        raise ValueError(f"weight_colors: expected {colors.shape[0]} joints, got {w.shape[-1]}")
    return w @ colors

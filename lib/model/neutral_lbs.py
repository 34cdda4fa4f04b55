"""Skinning fields of the shaped canonical space, read in the shape-neutral space (as the original).

Shape legend: B batch, N points, S FLAME shape parameters (betas, 100), J joints (5),
Q pose-feature size (36), X expression components (50), A points flattened across the batch.

The LBS network (lib/model/networks.LBSNetwork) is unconditioned: one skinning-weight and
blendshape field shared by every subject, defined in the shape-neutral canonical space. A
point x_c of a subject's (shaped) canonical space takes the fields of its shape-neutral
counterpart x_n = x_c + disp(x_c, betas), the displacement network that also maps occupancy
queries to the neutral space:

    fields(x_c, betas) = LBS(x_c + disp(x_c, betas))

`NeutralLBS(lbs, disp_net)` is that composition with the deformer's `lbs_net` signature
(lib/model/deformer.py): `(xc [B, N, 3], betas [B, S]) -> (w [B, N, J], pose_dirs
[B, N, Q, 3], expr_dirs [B, N, 3, X])`. Gradients of everything computed from the fields,
the deformer's implicit correction included, reach both networks.

Ownership: the LBS network is a submodule (state_dict keys `lbs.*`); the displacement network
is only referenced, its owner (GANHead.disp_net) registers it, so its parameters appear once in
a model's state_dict and parameters(). Casts and moves of this module (`.to`, `.double`, ...)
reach the referenced network too (its owner's own cast is then a no-op), so that a deformer
moved alone stays consistent.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["NeutralLBS"]


class NeutralLBS(nn.Module):
    """fields(x_c, betas) = lbs(x_c + disp_net(x_c, betas)).

    Args:
        lbs: lib.model.networks.LBSNetwork (unconditioned): x_n [B, N, 3] -> (w, pose_dirs,
            expr_dirs).
        disp_net: displacement network (x_c [B, N, 3], betas [B, S]) -> dx [B, N, 3]
            (lib.model.networks.build_displacement_network); referenced, not registered.
    """

    def __init__(self, lbs: nn.Module, disp_net: nn.Module):
        super().__init__()
        self.lbs = lbs
        # a reference: not in state_dict / parameters()
        object.__setattr__(self, "disp_net", disp_net)

    @property
    def n_joints(self) -> int:
        """J."""
        return self.lbs.n_joints

    def warp(self, xc: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
        """Shape-neutral points: xc [B, N, 3], betas [B, S] (or [B, N, S]) -> x_n [B, N, 3]."""
        return xc + self.disp_net(xc, betas)

    def forward(self, xc: torch.Tensor, betas: torch.Tensor, return_logits: bool = False):
        """xc [B, N, 3] shaped canonical points, betas [B, S] (or [B, N, S]) -> w [B, N, J],
        pose_dirs [B, N, Q, 3], expr_dirs [B, N, 3, X] (and logits [B, N, J] with return_logits):
        the LBS network's fields at x_c + disp(x_c, betas)."""
        return self.lbs(self.warp(xc, betas), return_logits=return_logits)

    def folded(self, betas: torch.Tensor, d_pose: torch.Tensor, d_exp: torch.Tensor):
        """Both networks frozen for one search (lib/model/folded_lbs.py): betas [B, S], pose-
        feature change d_pose [B, Q], expression change d_exp [B, X] -> a callable
        (x [A, 3], bidx [A]) -> (w [A, J], blendshape offset [A, 3]); differentiable when built
        with grad enabled."""
        from lib.model.folded_lbs import FoldedLBS

        return FoldedLBS(self.lbs, self.disp_net, betas, d_pose, d_exp)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.disp_net._apply(fn, *args, **kwargs)
        return self

    def extra_repr(self) -> str:
        return f"disp_net={type(self.disp_net).__name__} (referenced; registered by its owner)"

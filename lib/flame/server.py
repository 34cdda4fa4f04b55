"""FLAME parameter server: per-frame parameter vectors -> posed and canonical FLAME outputs.

Shape legend: B batch, V vertices, J joints (5), Q pose feature (36), S identity
components (100), X expression components (50), P parameter-vector length
(169 = scale 1 + transl 3 + pose 15 + shape S + exp X, or 160 with a 6-d pose).

Canonical space: the subject's shape, expression 0, pose 0 except the jaw's x-rotation
``canonical_jaw`` (0.2 rad). Shape-neutral canonical space: additionally shape 0.
All outputs are in the scaled FLAME space (see lib/flame/flame.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lib.flame.flame import FLAME, expand_pose
from lib.flame.frames import FlameFrames
from lib.flame.lbs import batch_rodrigues, matrix_to_axis_angle, rigid_inverse

__all__ = ["FLAMEServer"]

_JAW_X = 6  # index of the jaw's x rotation in the 15-d pose


class FLAMEServer(nn.Module):
    """Wraps :class:`FLAME` for the [B, 169] / [B, 160] parameter vectors of the dataset.

    model_path: generic_model.pkl; n_shape, n_exp: components used; canonical_jaw: jaw
    opening (radians about x) of the canonical space.
    """

    def __init__(self, model_path, n_shape: int = 100, n_exp: int = 50,
                 canonical_jaw: float = 0.2):
        super().__init__()
        self.flame = FLAME(model_path, n_shape=n_shape, n_exp=n_exp)
        self.n_shape = int(n_shape)
        self.n_exp = int(n_exp)
        self.canonical_jaw = float(canonical_jaw)
        self.full_length = 4 + 15 + self.n_shape + self.n_exp  # 169
        self.short_length = 4 + 6 + self.n_shape + self.n_exp  # 160

    # ------------------------------------------------------------ parameters
    def split_params(self, params: torch.Tensor) -> dict:
        """params [B, 169] or [B, 160] -> dict(scale [B,1], transl [B,3], pose [B,15],
        shape [B,S], exp [B,X]). A 160-vector's 6-d pose gets zero neck and eyes."""
        if params.dim() == 1:
            params = params[None]
        length = params.shape[-1]
        if params.dim() != 2 or length not in (self.full_length, self.short_length):
            raise ValueError(
                f"FLAME parameter vector has length {length}; expected {self.full_length} "
                f"(scale 1, transl 3, pose 15, shape {self.n_shape}, exp {self.n_exp}) or "
                f"{self.short_length} (6-d pose)")
        n_pose = 15 if length == self.full_length else 6
        i = 4 + n_pose
        return {
            "scale": params[:, 0:1],
            "transl": params[:, 1:4],
            "pose": expand_pose(params[:, 4:i]),
            "shape": params[:, i:i + self.n_shape],
            "exp": params[:, i + self.n_shape:i + self.n_shape + self.n_exp],
        }

    def canonical_pose(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """Canonical pose [batch, 15]: zeros except jaw x-rotation = canonical_jaw."""
        pose = torch.zeros(batch, 15, dtype=like.dtype, device=like.device)
        pose[:, _JAW_X] = self.canonical_jaw
        return pose

    # ------------------------------------------------------------ evaluation
    def canonical(self, shape: torch.Tensor) -> FlameFrames:
        """Canonical-space FLAME for shapes [B, S] -> FlameFrames with verts_c [B,V,3],
        joints_c [B,J,3], tfs_c [B,J,4,4], pose_feature_c [B,Q], exp_c [B,X] zeros,
        pose_c [B,15] and shape [B,S] (the other fields None)."""
        ref = self.flame.v_template
        shape = shape.to(device=ref.device, dtype=ref.dtype)
        B = shape.shape[0]
        exp_c = torch.zeros(B, self.n_exp, dtype=ref.dtype, device=ref.device)
        pose_c = self.canonical_pose(B, ref)
        out = self.flame(shape, exp_c, pose_c)
        return FlameFrames(verts_c=out.vertices, joints_c=out.joints, tfs_c=out.T,
                           pose_feature_c=out.pose_feature, exp_c=exp_c, pose_c=pose_c,
                           shape=shape)

    def forward(self, params: torch.Tensor) -> FlameFrames:
        """params [B, 169] or [B, 160] -> FlameFrames (lib/flame/frames.py) with every field:
        posed (scaled by scale, moved by transl): verts [B,V,3], joints [B,J,3], tfs [B,J,4,4],
               pose_feature [B,Q],
               pose [B,15], shape [B,S], exp [B,X], scale [B,1], transl [B,3];
        canonical: verts_c, joints_c, tfs_c, pose_feature_c, exp_c (zeros), pose_c [B,15];
        shape-neutral canonical: verts_c_neutral [B,V,3]."""
        ref = self.flame.v_template
        p = self.split_params(params.to(device=ref.device, dtype=ref.dtype))
        B = p["shape"].shape[0]
        zeros_shape = torch.zeros_like(p["shape"])
        zeros_exp = torch.zeros_like(p["exp"])
        pose_c = self.canonical_pose(B, ref)
        # one batched FLAME call: posed | canonical | shape-neutral canonical
        out = self.flame(torch.cat([p["shape"], p["shape"], zeros_shape]),
                         torch.cat([p["exp"], zeros_exp, zeros_exp]),
                         torch.cat([p["pose"], pose_c, pose_c]))
        posed, canon, neutral = (slice(0, B), slice(B, 2 * B), slice(2 * B, 3 * B))
        # the parameters' scale s and translation t move the posed FLAME (x -> s x + t, as the
        # original's server does; processed scans have s = 1, t = 0); canonical spaces never
        s, t = p["scale"], p["transl"]
        tfs = out.T[posed].clone()
        tfs[:, :, :3, :] = tfs[:, :, :3, :] * s[:, None, :, None]
        tfs[:, :, :3, 3] = tfs[:, :, :3, 3] + t[:, None, :]
        return FlameFrames(
            verts=out.vertices[posed] * s[:, None] + t[:, None],
            joints=out.joints[posed] * s[:, None] + t[:, None], tfs=tfs,
            pose_feature=out.pose_feature[posed], pose=p["pose"], shape=p["shape"],
            exp=p["exp"], scale=p["scale"], transl=p["transl"],
            verts_c=out.vertices[canon], joints_c=out.joints[canon],
            tfs_c=out.T[canon], pose_feature_c=out.pose_feature[canon],
            exp_c=zeros_exp, pose_c=pose_c,
            verts_c_neutral=out.vertices[neutral],
        )

    # ------------------------------------------------------------ multi-view
    def view_params(self, params: torch.Tensor, k, n_views: int = 9) -> torch.Tensor:
        """Copy of params [B, 169 or 160] seen from view k: the global rotation R becomes
        R_y(2*pi*k/n_views) @ R (the view's yaw composed with the fitted rotation, as the
        original's views), every other entry unchanged.

        k: int or tensor [B] of view indices. Returns [B, same length]. A scan posed by params
        is moved to view k by `scan_view_transform` (a yaw about the root joint).
        """
        self.split_params(params)  # validates the length
        out = params.clone()
        angle = torch.as_tensor(k, dtype=params.dtype, device=params.device) \
            * (2.0 * math.pi / n_views)
        yaw = torch.zeros(*params.shape[:-1], 3, dtype=params.dtype, device=params.device)
        yaw[..., 1] = angle
        root = batch_rodrigues(yaw) @ batch_rodrigues(params[..., 4:7])
        out[..., 4:7] = matrix_to_axis_angle(root)
        return out

    def scan_view_transform(self, params: torch.Tensor, k, n_views: int = 9) -> torch.Tensor:
        """Rigid transform [B, 4, 4] moving a scan posed by params to view k:
        T_view[root] @ inverse(T_scan[root]) in the scaled space, i.e. the view's yaw about
        the root joint (the original's view transform)."""
        ref = self.flame.v_template
        params = params.to(device=ref.device, dtype=ref.dtype)
        both = torch.cat([params, self.view_params(params, k, n_views)])
        p = self.split_params(both)
        T = self.flame(p["shape"], p["exp"], p["pose"]).T[:, 0]
        B = params.shape[0]
        return T[B:] @ rigid_inverse(T[:B])

"""FLAME layer in the project's scaled, z-centred head space.

Shape legend: B batch, V vertices, F faces, J joints (5), Q pose feature (36),
S identity components (n_shape, default 100), X expression components (n_exp, default 50).

FLAME works in meters; every output here lives in the scaled space
``x_s = 6 * x + (0, 0, z_shift)`` where ``z_shift = -(zmin + zmax) / 2`` of the scaled
template's z range. With ``M = [[6 I, (0,0,z_shift)], [0, 1]]`` the joint transforms are
``T = M A M^-1`` (A: FLAME's rest-to-posed bone transforms), so
``vertices == skin_points(rest_scaled, weights, T)`` where
``rest_scaled = 6 * (template + shape + expression offsets + pose correctives) + (0,0,z_shift)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from lib.flame.lbs import (
    batch_rodrigues,
    blend_offsets,
    pose_offsets,
    pose_to_feature,
    rigid_chain,
    skin_points,
)
from lib.flame.loader import EXPR_OFFSET, N_JOINTS, load_flame_model

__all__ = ["FLAME", "FlameOutput", "expand_pose", "SCALE_FACTOR"]

SCALE_FACTOR = 6.0


@dataclass
class FlameOutput:
    """FLAME layer results in the scaled space (FLAMEServer turns them into the FlameFrames
    of lib/flame/frames.py, which the rest of the project reads).

    vertices [B, V, 3]; joints [B, J, 3] posed joints; T [B, J, 4, 4] rest->posed bone
    transforms; weights [V, J] skinning weights; pose_feature [B, Q].
    """

    vertices: torch.Tensor
    joints: torch.Tensor
    T: torch.Tensor
    weights: torch.Tensor
    pose_feature: torch.Tensor


def expand_pose(pose: torch.Tensor) -> torch.Tensor:
    """pose [B, 15] (global, neck, jaw, eyes) or [B, 6] (global, jaw) -> [B, 15].

    A 6-d pose gets zero neck and eye rotations.
    """
    if pose.dim() != 2 or pose.shape[1] not in (6, 3 * N_JOINTS):
        raise ValueError(f"pose must be [B, 15] or [B, 6], got {tuple(pose.shape)}")
    if pose.shape[1] == 6:
        zero = torch.zeros_like(pose[:, :3])
        pose = torch.cat([pose[:, :3], zero, pose[:, 3:6], zero, zero], dim=1)
    return pose


class FLAME(nn.Module):
    """FLAME 2020 (or a synthetic model in its pickle format) as a torch module.

    model_path: path of generic_model.pkl; n_shape: identity components used (<= 300);
    n_exp: expression components used (taken from shapedirs[..., 300:300+n_exp]).

    Buffers (float32 unless noted, FLAME units = meters; not saved in state_dicts):
        v_template [V, 3], shapedirs [V, 3, S], expdirs [V, 3, X], posedirs [V, 3, Q],
        J_regressor [J, V] (dense), lbs_weights [V, J], faces [F, 3] long;
        scaled for the deformer (x6): expdirs_scaled [V, 3, X], posedirs_scaled [V, Q, 3].
    Attributes: scale_factor (6.0), z_shift (float), parents (list, root -1), n_shape, n_exp.
    """

    def __init__(self, model_path, n_shape: int = 100, n_exp: int = 50):
        super().__init__()
        model = load_flame_model(model_path, n_shape=n_shape, n_exp=n_exp)
        self.model_path = str(model_path)
        self.n_shape = int(n_shape)
        self.n_exp = int(n_exp)
        self.scale_factor = SCALE_FACTOR
        self.parents = list(model["parents"])
        vt = model["v_template"]
        z = vt[:, 2] * SCALE_FACTOR
        self.z_shift = float(-(z.min() + z.max()) / 2.0)

        jr = model["J_regressor"]
        jr = jr.toarray() if sp.issparse(jr) else np.asarray(jr)
        sd = model["shapedirs"]
        f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
        # Not persistent: a checkpoint re-reads the model file instead of carrying FLAME's arrays
        # (FLAME's licence forbids redistributing them, and they were half a checkpoint);
        # fingerprint() lets a checkpoint check that the file is the one it was trained with.
        buffers = {
            "v_template": f32(vt),
            "shapedirs": f32(sd[..., :n_shape]),
            "expdirs": f32(sd[..., EXPR_OFFSET:EXPR_OFFSET + n_exp]),
            "posedirs": f32(model["posedirs"]),
            "J_regressor": f32(jr),
            "lbs_weights": f32(model["weights"]),
            "faces": torch.as_tensor(model["f"], dtype=torch.long),
            "expdirs_scaled": f32(sd[..., EXPR_OFFSET:EXPR_OFFSET + n_exp] * SCALE_FACTOR),
            "posedirs_scaled": f32(np.transpose(model["posedirs"], (0, 2, 1)) * SCALE_FACTOR),
            "shift": torch.tensor([0.0, 0.0, self.z_shift]),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    # ------------------------------------------------------------------ helpers
    @property
    def weights(self) -> torch.Tensor:
        """Skinning weights [V, J]."""
        return self.lbs_weights

    @property
    def num_vertices(self) -> int:
        return int(self.v_template.shape[0])

    def fingerprint(self) -> dict:
        """A few numbers that identify the loaded model file (plain Python, for checkpoints):
        vertex, face and joint counts, components used, and float64 sums of the template,
        the skinning weights, the template joints the regressor gives (index-weighted, so
        swapped or moved joints differ) and
        the used identity, expression and pose-corrective bases."""
        d = lambda t: float(t.detach().double().sum())  # noqa: E731
        rank = torch.arange(1, len(self.parents) + 1, device=self.lbs_weights.device)
        return {"n_vertices": int(self.v_template.shape[0]), "n_faces": int(self.faces.shape[0]),
                "n_joints": len(self.parents), "n_shape": self.n_shape, "n_exp": self.n_exp,
                "v_template_sum": d(self.v_template),
                "abs_v_template_sum": d(self.v_template.abs()),
                "lbs_weights_sum": d(self.lbs_weights * rank),
                "shapedirs_sum": d(self.shapedirs.abs()), "expdirs_sum": d(self.expdirs.abs()),
                "posedirs_sum": d(self.posedirs.abs()),
                "J_regressor_sum": d((self.J_regressor.double() @ self.v_template.double())
                                     * rank.to(self.J_regressor.device)[:, None])}

    def to_scaled(self, x: torch.Tensor) -> torch.Tensor:
        """FLAME meters -> scaled space. x: [..., 3] -> [..., 3]."""
        return x * self.scale_factor + self.shift.to(x)

    def _prepare(self, shape_params, expression_params, pose_params=None):
        ref = self.v_template
        shape_params = shape_params.to(device=ref.device, dtype=ref.dtype)
        expression_params = expression_params.to(device=ref.device, dtype=ref.dtype)
        if shape_params.dim() != 2 or shape_params.shape[1] != self.n_shape:
            raise ValueError(f"shape_params must be [B, {self.n_shape}], got "
                             f"{tuple(shape_params.shape)}")
        if expression_params.dim() != 2 or expression_params.shape[1] != self.n_exp:
            raise ValueError(f"expression_params must be [B, {self.n_exp}], got "
                             f"{tuple(expression_params.shape)}")
        if shape_params.shape[0] != expression_params.shape[0]:
            raise ValueError("shape_params and expression_params batch sizes differ")
        if pose_params is not None:
            pose_params = expand_pose(pose_params.to(device=ref.device, dtype=ref.dtype))
            if pose_params.shape[0] != shape_params.shape[0]:
                raise ValueError("pose_params batch size differs from shape_params")
        return shape_params, expression_params, pose_params

    def shaped_template(self, shape_params, expression_params) -> torch.Tensor:
        """Template + identity + expression offsets in meters.

        shape_params [B, S], expression_params [B, X] -> [B, V, 3].
        """
        shape_params, expression_params, _ = self._prepare(shape_params, expression_params)
        return (self.v_template + blend_offsets(self.shapedirs, shape_params)
                + blend_offsets(self.expdirs, expression_params))

    def rest_joints(self, shape_params, expression_params) -> torch.Tensor:
        """Rest joints J_regressor @ shaped template, scaled space. [B,S],[B,X] -> [B, J, 3]."""
        v = self.shaped_template(shape_params, expression_params)
        return self.to_scaled(torch.einsum("jv,bvc->bjc", self.J_regressor, v))

    def rest_vertices(self, shape_params, expression_params, pose_feature) -> torch.Tensor:
        """Unposed vertices with pose correctives, scaled space (input of skinning).

        shape_params [B, S], expression_params [B, X], pose_feature [B, Q] -> [B, V, 3].
        """
        v = self.shaped_template(shape_params, expression_params)
        v = v + pose_offsets(self.posedirs.transpose(1, 2), pose_feature.to(v))
        return self.to_scaled(v)

    def scaled_transforms(self, A: torch.Tensor) -> torch.Tensor:
        """Conjugate meter-space transforms by M: T = M A M^-1. A [B, J, 4, 4] -> [B, J, 4, 4]."""
        R = A[..., :3, :3]
        s = self.shift.to(A)
        t = self.scale_factor * A[..., :3, 3] + s - R @ s
        T = A.clone()
        T[..., :3, 3] = t
        return T

    # ------------------------------------------------------------------ forward
    def forward(self, shape_params, expression_params, pose_params) -> FlameOutput:
        """shape_params [B, S], expression_params [B, X], pose_params [B, 15] or [B, 6]
        -> FlameOutput (vertices [B,V,3], joints [B,J,3], T [B,J,4,4], weights [V,J],
        pose_feature [B,Q]), all in the scaled space."""
        shape_params, expression_params, pose = self._prepare(
            shape_params, expression_params, pose_params)
        B = shape_params.shape[0]
        rotmats = batch_rodrigues(pose.reshape(B, N_JOINTS, 3))  # [B, J, 3, 3]
        pose_feature = pose_to_feature(rotmats)  # [B, Q]
        v_shaped = (self.v_template + blend_offsets(self.shapedirs, shape_params)
                    + blend_offsets(self.expdirs, expression_params))
        joints_rest = torch.einsum("jv,bvc->bjc", self.J_regressor, v_shaped)
        v_posed = v_shaped + pose_offsets(self.posedirs.transpose(1, 2), pose_feature)
        joints_posed, A = rigid_chain(rotmats, joints_rest, self.parents)
        T = self.scaled_transforms(A)
        rest_scaled = self.to_scaled(v_posed)
        w = self.lbs_weights.expand(B, -1, -1)
        vertices = skin_points(rest_scaled, w, T)
        return FlameOutput(vertices=vertices, joints=self.to_scaled(joints_posed), T=T,
                           weights=self.lbs_weights, pose_feature=pose_feature)

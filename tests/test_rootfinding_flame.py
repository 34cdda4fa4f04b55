"""Root finding against the head model's own deformation (independent truth: FLAME).

The LBS network is replaced by the head model's own fields (weights, expression and pose
bases of the nearest canonical vertex). The posed model vertices are then exactly the
forward deformation of the canonical vertices, so the search must find the canonical
vertices again: jaw open and head turned 30 degrees, error < 1e-4 for >= 99% of points.
"""
from __future__ import annotations

import math

import pytest
import torch

from lib.flame import FLAMEServer
from lib.model.deformer import ForwardDeformer
from lib.utils.knn import nearest_neighbor


class NearestVertexFields(torch.nn.Module):
    """Stand-in LBS network: fields of the nearest canonical FLAME vertex.

    verts_c: [V, 3] canonical vertices; weights [V, J]; pose_dirs [V, Q, 3]; expr_dirs [V, 3, X].
    forward(xc [B, N, 3], betas) -> (w [B, N, J], pose_dirs [B, N, Q, 3], expr_dirs [B, N, 3, X]).
    """

    def __init__(self, verts_c, weights, pose_dirs, expr_dirs):
        super().__init__()
        self.register_buffer("verts_c", verts_c)
        self.register_buffer("weights", weights)
        self.register_buffer("pose_dirs", pose_dirs)
        self.register_buffer("expr_dirs", expr_dirs)

    def forward(self, xc, betas):
        B, N, _ = xc.shape
        _, idx = nearest_neighbor(xc.detach().reshape(1, B * N, 3), self.verts_c[None])
        idx = idx.reshape(B, N)
        return self.weights[idx], self.pose_dirs[idx], self.expr_dirs[idx]


@pytest.mark.parametrize("eval_mode", [False, True])
def test_search_recovers_canonical_model_vertices(head_model_path, eval_mode):
    torch.manual_seed(0)
    server = FLAMEServer(str(head_model_path))
    flame = server.flame
    params = torch.zeros(1, 169)
    params[0, 0] = 1.0
    params[0, 19:24] = torch.tensor([1.0, -0.8, 0.5, 0.3, -0.4])  # identity
    params[0, 119:122] = torch.tensor([1.0, -1.0, 0.5])  # expression
    params[0, 4 + 1] = math.radians(30)  # head turned 30 degrees (global y)
    params[0, 4 + 6] = 0.3  # jaw open
    with torch.no_grad():
        flame_out = server(params)
    fields = NearestVertexFields(flame_out.verts_c[0], flame.weights, flame.posedirs_scaled,
                                 flame.expdirs_scaled)
    deformer = ForwardDeformer(fields, n_joints=len(flame.parents), max_steps=50)
    # every second vertex keeps the test fast; all regions (jaw, eyes, neck) are covered
    sel = torch.arange(0, flame_out.verts.shape[1], 2)
    xd = flame_out.verts[:, sel]
    truth = flame_out.verts_c[:, sel]
    cond = {"shape": flame_out.shape}
    with torch.no_grad():
        xc, valid = deformer(xd, cond, flame_out, eval_mode=eval_mode)
    err = (xc - truth[:, :, None]).norm(dim=-1)  # [1, N, I]
    err = torch.where(valid, err, torch.full_like(err, float("inf")))
    recovered = (err.min(dim=-1).values < 1e-4).float().mean().item()
    assert recovered >= 0.99, f"only {recovered:.4f} of the vertices recovered"

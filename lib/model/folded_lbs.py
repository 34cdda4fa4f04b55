"""The skinning fields folded for one correspondence search: same values, less work.

Shape legend: B batch, A points flattened across the batch (each with a batch index), S FLAME
shape parameters (betas, 100), J joints, Q pose-feature size (36), X expression components
(50), E encoded point width, n hidden width; `blendshape_dim` = 3 Q + 3 X = 258 blendshape
coefficients, `cond_dim` a network's condition width.

The fields of a shaped canonical point x (lib/model/neutral_lbs.py) are the unconditioned LBS
network at the shape-neutral point x + disp(x, betas). Within one search the networks' weights
and every batch item's betas, pose feature and expression are fixed, so parts of the plain
evaluation (displacement network -> LBS network -> deform_canonical) repeat the same work for every
point and every step:
- the weight-norm parametrization recomputes each layer's weight on every call: done once here;
- a layer of the displacement network conditioned on betas multiplies the 100-wide code for
  every point: its part of the layer, W_b betas + b, is one [B, n] bias per item, gathered per
  point;
- the 258 blendshape coefficients are only ever contracted with the item's (fixed) pose-feature
  and expression changes, giving one 3-vector offset; the tail layer and that contraction fold
  into one [3, n] matrix per item.
Per point that leaves the two encodings, the hidden layers, J skinning logits and a 3 x n
product, and none of the plain path's [A, S] and [A, blendshape_dim] tensors.

`FoldedLBS(lbs, disp_net, betas, d_pose, d_exp)(x, bidx) -> (w [A, J], offset [A, 3])`;
`FoldedSkinning(tfs, tfs_c)(x, w, offset, bidx) -> x_d [A, 3]` finishes the deformation as
lib/flame/lbs.skin_offset does, without gathering each point's [J, 4, 4] transforms: the
blended rows sum_j w_j tfs[j] of every item come out of one [A, J] x [J, 24 B] product and each
point keeps its item's 24, then the 3x3 inverse-apply runs channels-first (Cramer's rule).
lib/flame/lbs.deform_canonical (the plain path) stays the reference: tests/test_fast_deformer.py
compares values and gradients.
"""
from __future__ import annotations

import math

import torch

from lib.flame.lbs import adjugate3
from lib.utils.errors import ModuleErrors

__all__ = ["FoldedLBS", "FoldedSkinning", "FoldedMLP"]

_err = ModuleErrors(__name__)


class FoldedMLP:
    """An ImplicitNetwork (lib/model/networks.py) frozen at a per-item condition: weights read
    once, the condition's columns of each conditioned layer folded into a per-item bias.

    net: the network (output activation None); cond: [B, cond_dim] per-item condition (None for an
    unconditioned network); dtype: of the evaluation. Call with x [A, 3], bidx [A] ->
    (out [A, d_out] the output layer's value, h_tail [A, n] the input of the network's tail
    head, or None when it has none). Differentiable like the plain network when built and
    called with grad enabled (gradients reach the parameters, cond and x)."""

    def __init__(self, net, cond: torch.Tensor | None, dtype: torch.dtype):
        if net.out_activation is not None:
            raise _err(f"FoldedMLP folds networks without an output "
                       f"activation, got {net.out_activation!r}")
        self.net = net
        self.W = [lin.weight.to(dtype) for lin in net.layers]   # weight norm applied once
        self.b = [lin.bias.to(dtype) for lin in net.layers]
        self.cond_bias = {}
        if net.cond_dim > 0:
            if cond is None or cond.dim() != 2 or cond.shape[1] != net.cond_dim:
                raise _err(f"the network needs a [B, {net.cond_dim}] "
                           f"condition, got {None if cond is None else tuple(cond.shape)}")
            cond_dim, c = net.cond_dim, cond.to(dtype)
            for l in net.cond_layers:
                self.cond_bias[l] = c @ self.W[l][:, -cond_dim:].t() + self.b[l]     # [B, n_l]
                self.W[l] = self.W[l][:, :-cond_dim].contiguous()

    def __call__(self, x: torch.Tensor, bidx: torch.Tensor):
        net = self.net
        emb = net.embedder(x)                                                      # [A, E]
        h, h_tail = emb, None
        for l in range(len(self.W)):
            if l > 0 and l == net.tail_layer:
                h_tail = h
            if l in net.skip_layers:
                h = torch.cat([h, emb], dim=-1) / math.sqrt(2.0)
            if l in self.cond_bias:
                h = torch.addmm(self.cond_bias[l][bidx], h, self.W[l].t())
            else:
                h = torch.addmm(self.b[l], h, self.W[l].t())
            if l < net.depth:
                h = net.softplus(h, inplace=not torch.is_grad_enabled())
        return h, h_tail


class FoldedLBS:
    """The fields of lib/model/neutral_lbs.NeutralLBS frozen for one search: lbs (LBSNetwork,
    unconditioned) evaluated at x + disp_net(x, betas), with betas [B, S], pose-feature change
    d_pose [B, Q] (pose_feature - pose_feature_c) and expression change d_exp [B, X]
    (exp - exp_c). Call with x [A, 3] shaped canonical points, bidx [A] -> w [A, J] (softmax
    weights), offset [A, 3] (Ed d_exp + Pd^T d_pose at x: expression and pose-corrective
    bases Ed, Pd). Built under torch.no_grad() it holds no graph (the search); built with grad
    enabled, the folding is part of the graph, so gradients reach both networks' parameters,
    betas, d_pose, d_exp and x as through the plain networks (the implicit correction)."""

    def __init__(
        self, lbs, disp_net, betas: torch.Tensor, d_pose: torch.Tensor, d_exp: torch.Tensor
    ):
        dt = betas.dtype
        self.disp = FoldedMLP(disp_net, betas, dt)
        self.lbs = FoldedMLP(lbs.net, None, dt)
        self.scale = float(lbs.softmax_scale)
        Q, X = lbs.pose_feature_dim, lbs.n_exp
        B = betas.shape[0]
        # offset_r = sum_p tail[3 p + r] d_pose[p] + sum_k tail[3 Q + X r + k] d_exp[k]
        zeros_p, zeros_x = d_pose.new_zeros(B, Q).to(dt), d_exp.new_zeros(B, X).to(dt)
        rows = []
        for r in range(3):
            pose_part = torch.stack([d_pose.to(dt) if c == r else zeros_p for c in range(3)],
                                    dim=-1)
            exp_part = [d_exp.to(dt) if c == r else zeros_x for c in range(3)]
            rows.append(torch.cat([pose_part.reshape(B, 3 * Q)] + exp_part, dim=-1))
        M = torch.stack(rows, dim=1)                                    # [B, 3, blendshape_dim]
        Wt, bt = lbs.net.tail.weight.to(dt), lbs.net.tail.bias.to(dt)
        # all items' folded tails side by side: one [A, n] x [n, 3 B] product, then each
        # point keeps its item's 3 columns (cheaper than a gathered [A, 3, n] per point)
        self.B = B
        self.tail_W = (M @ Wt).reshape(3 * B, -1).t().contiguous()                   # [n, 3 B]
        self.tail_b = (M @ bt).reshape(3 * B)                                        # [3 B]

    def __call__(self, x: torch.Tensor, bidx: torch.Tensor):
        xn = x + self.disp(x, bidx)[0]                                             # shape-neutral
        h, h_tail = self.lbs(xn, bidx)
        w = torch.softmax(self.scale * h, dim=-1)
        all_items = torch.addmm(self.tail_b, h_tail, self.tail_W).view(-1, self.B, 3)  # [A, B, 3]
        offset = all_items[torch.arange(x.shape[0], device=x.device), bidx]        # [A, 3]
        return w, offset


class FoldedSkinning:
    """Skinning of one search's items: tfs, tfs_c [B, J, 4, 4] (target and canonical joint
    transforms). Call with x [A, 3] canonical points, w [A, J], offset [A, 3], bidx [A] ->
    x_d [A, 3] = (sum_j w_j tfs[j]) ((sum_j w_j tfs_c[j])^-1 x + offset), the value of
    lib/flame/lbs.skin_offset (also where the canonical blend is singular: its inverse is
    taken as 0 there, lbs.inv3's rule). Differentiable like FoldedLBS: built with grad
    enabled, gradients reach tfs, tfs_c, x, w and offset."""

    def __init__(self, tfs: torch.Tensor, tfs_c: torch.Tensor):
        B, J = tfs.shape[:2]
        rows = torch.stack([tfs_c[:, :, :3, :], tfs[:, :, :3, :]], dim=1)  # [B, 2, J, 3, 4]
        self.T = rows.permute(2, 0, 1, 3, 4).reshape(J, B * 24).contiguous()          # [J, 24 B]
        self.B = B

    def __call__(
        self, x: torch.Tensor, w: torch.Tensor, offset: torch.Tensor, bidx: torch.Tensor
    ) -> torch.Tensor:
        A = x.shape[0]
        M = (w.to(self.T.dtype) @ self.T).view(A, self.B, 24)
        M = M[torch.arange(A, device=x.device), bidx].t()                        # [24, A]
        c, d = M[:12].view(3, 4, A), M[12:].view(3, 4, A)                         # blended rows
        v = x.t() - c[:, 3]                                                       # [3, A]
        adj, det, ok = adjugate3(c[:, :3])
        inv_det = torch.where(ok, 1.0 / torch.where(ok, det, torch.ones_like(det)),
                              torch.zeros_like(det))
        xr = (adj[0] * v[0] + adj[1] * v[1] + adj[2] * v[2]) * inv_det + offset.t()  # [3, A]
        return (d[:, 0] * xr[0] + d[:, 1] * xr[1] + d[:, 2] * xr[2] + d[:, 3]).t()

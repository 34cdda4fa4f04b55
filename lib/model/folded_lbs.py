"""The LBS network folded for one correspondence search (no gradients): same values, less work.

Shape legend: B batch, A points flattened across the batch (each with a batch index), Z z_shape
width, J joints, P pose-feature size (36), X expression components (50), T = 3 P + 3 X blendshape
coefficients (258), E encoded point width, n hidden width.

Within one search the network's weights and every batch item's z_shape, pose feature and
expression are fixed, so three parts of the plain evaluation (LBSNetwork -> lbs_deform) repeat
the same work for every point and every step:
- the weight-norm parametrization recomputes each layer's weight on every call: done once here;
- a layer conditioned on z_shape multiplies the 256-wide code for every point: its part of the
  layer, W_z z + b, is one [B, n] bias per item, gathered per point;
- the 258 blendshape coefficients are only ever contracted with the item's (fixed) pose-feature
  and expression changes, giving one 3-vector offset; the tail layer and that contraction fold
  into one [3, n] matrix per item.
Per point that leaves the encoding, the hidden layers, J skinning logits and a 3 x n product:
about half the multiply-adds of the plain network and none of its [A, Z] and [A, T] tensors.

`FoldedLBS(lbs_net, z, d_pose, d_exp)(x, bidx) -> (w [A, J], offset [A, 3])`; the skinning
that lbs_deform also ends with, lib/model/deformer.skin_offset, finishes the deformation.
lib/model/deformer.py's plain path stays the reference; tests/test_fast_deformer.py compares.
"""
from __future__ import annotations

import math

import torch

__all__ = ["FoldedLBS"]


class FoldedLBS:
    """lbs_net (lib.model.networks.LBSNetwork) frozen at z [B, Z] with pose-feature change
    d_pose [B, P] (pose_feature - pose_feature_c) and expression change d_exp [B, X]
    (exp - exp_c). Call with x [A, 3], bidx [A] -> w [A, J] (softmax weights), offset [A, 3]
    (E d_exp + Pd^T d_pose at x). Holds no graph; use under torch.no_grad()."""

    def __init__(self, lbs_net, z: torch.Tensor, d_pose: torch.Tensor, d_exp: torch.Tensor):
        net = lbs_net.net
        self.net, self.scale = net, float(lbs_net.softmax_scale)
        with torch.no_grad():
            dt = z.dtype
            self.W = [lin.weight.detach().to(dt) for lin in net.layers]   # weight norm applied once
            self.b = [lin.bias.detach().to(dt) for lin in net.layers]
            self.cond_bias = {}
            for l in net.cond_layers:
                C = net.cond_dim
                self.cond_bias[l] = z.detach() @ self.W[l][:, -C:].t() + self.b[l]  # [B, n_l]
                self.W[l] = self.W[l][:, :-C].contiguous()
            P, X = lbs_net.pose_feature_dim, lbs_net.n_exp
            B = z.shape[0]
            # offset_r = sum_p tail[3 p + r] d_pose[p] + sum_k tail[3 P + X r + k] d_exp[k]
            M = torch.zeros(B, 3, 3 * P + 3 * X, dtype=dt, device=z.device)      # [B, 3, T]
            for r in range(3):
                M[:, r, r:3 * P:3] = d_pose.detach().to(dt)
                M[:, r, 3 * P + X * r:3 * P + X * (r + 1)] = d_exp.detach().to(dt)
            Wt, bt = net.tail.weight.detach().to(dt), net.tail.bias.detach().to(dt)
            # all items' folded tails side by side: one [A, n] x [n, 3 B] product, then each
            # point keeps its item's 3 columns (cheaper than a gathered [A, 3, n] per point)
            self.B = B
            self.tail_W = (M @ Wt).reshape(3 * B, -1).t().contiguous()             # [n, 3 B]
            self.tail_b = (M @ bt).reshape(3 * B)                                  # [3 B]

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
                h = net.softplus(h)
        w = torch.softmax(self.scale * h, dim=-1)
        all_items = torch.addmm(self.tail_b, h_tail, self.tail_W).view(-1, self.B, 3)  # [A, B, 3]
        offset = all_items[torch.arange(x.shape[0], device=x.device), bidx]        # [A, 3]
        return w, offset

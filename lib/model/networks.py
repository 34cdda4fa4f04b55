"""Implicit MLPs of GANHead: occupancy, skinning/blendshapes, displacement, normal, texture.

Shape legend: B batch, N points, E positional-encoding width, J joints, Q pose-feature
size (36), X expression count (50); the condition width `cond_dim`, the feature width
`ImplicitNetwork.feature_dim` and the extra head's width `zero_init_tail` go by their names.

Layer numbering used by every argument below: an `ImplicitNetwork` of depth `depth` has
layers 0..depth; layers 0..depth-1 are hidden (softplus, beta=100) and layer `depth` is
the output layer. "At layer l" means "concatenated to the input of layer l", which is
the output of hidden layer number l (counted from 1). So `cond_layers=[0]` feeds the
condition with the encoded point, `skip_layer=4` re-feeds the encoded point to layer 4,
and `tail_layer=3` reads the output of the third hidden layer.

Skip connection: the layer before a skip layer outputs `width - E` channels, and the
skip layer sees `cat([h, embed(x)]) / sqrt(2)`, so its input width is `width` again.
With width 256, depth 4, skip 4 and multires 4 the last hidden layer is the one before
the skip, hence `feature_dim = 256 - 27 = 229` (the geometry features; docs/design.md, Networks).
A layer's input is ordered [previous output | encoding (skip layers) | condition
(cond layers)]; layer 0 sees [encoding | condition].

Initialization (as in the original GANHead code):
- geometric init (the geometry network only; IDR's sphere init, sign flipped for occupancy):
  every hidden layer W ~ N(0, 2 / fan_out), bias 0, except that the sinusoid columns of the
  encoding are zero (layer 0's, and the re-fed copy at a hidden skip layer); the raw xyz,
  hidden and conditioning columns are random. The output layer W ~ N(-sqrt(pi / n_in), 1e-4)
  over all of its n_in input columns (re-fed encoding included when the skip enters the
  output layer, as it does in the geometry network), bias = `bias`. On average over the
  random weights, with the condition at zero and softplus taken as ReLU:
  without a skip into the output layer, out(x) ~= bias - |x| (IDR's sphere);
  with it (n_h hidden + E encoding inputs), out(x) ~= bias - a |x| - c * sum(embed(x)),
  a = sqrt(n_h / (2 n_in)), c = sqrt(pi / n_in) / sqrt(2). For the geometry network
  (a = 0.67, c = 0.078) the encoding's cos channels, all 1 at the origin, and softplus's
  offset (log 2 / 100 per unit at zero, about -0.2 on out(x) near the origin) bring the
  origin to about -0.1, and the zero level ripples with direction: the initial occupied set
  is a rippled shell (about 0.25 < |x| < 1.3 on average), not a ball.
  tests/test_networks.py checks both against these formulas.
- otherwise torch's default nn.Linear init (Kaiming-uniform weights, uniform bias).
- weight norm on every layer of the MLP (`weight_norm=True`); the zero-initialized extra head
  (`zero_init_tail`, the skinning network's blendshapes) is a plain Linear.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as _weight_norm

from lib.model.embedder import PositionalEncoding
from lib.utils.errors import ModuleErrors

_ACTIVATIONS = (None, "normalize")


_err = ModuleErrors(__name__)


class Softplus(nn.Module):
    """softplus(x) = log(1 + exp(beta x)) / beta, its input clamped below at -cut / beta.

    Same values as nn.Softplus(beta) to within exp(-cut) / beta (1.4e-13 at the default cut 25,
    beta 100) and gradients to within sigmoid(-cut) (1.4e-11): below the clamp the true value
    and slope are that small. The clamp keeps torch's CPU kernels on their fast path: where
    beta x lies in about [-103, -40], exp returns denormals and log1p gets arguments under
    1e-17, which take scalar slow paths (measured, 2 cores: a [9000, 128] forward 8-25 ms
    instead of 1.6-1.9 ms, forward + backward 11-35 ms instead of 6-7 ms; trained networks put
    many pre-activations there). Deviation from the original's nn.Softplus(beta=100): speed only.
    """

    def __init__(self, beta: float = 100.0, cut: float = 25.0):
        super().__init__()
        self.beta, self.floor = float(beta), -float(cut) / float(beta)

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """x: any shape. inplace: clamp x itself (saves a copy; only for a tensor the caller owns
        and no graph needs)."""
        if torch.is_grad_enabled() and x.requires_grad:
            return _ClampedSoftplus.apply(x, self.beta, self.floor)
        return F.softplus(x.clamp_(min=self.floor) if inplace else x.clamp(min=self.floor),
                          beta=self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, floor={self.floor}"


class _ClampedSoftplus(torch.autograd.Function):
    """softplus(max(x, floor)) whose backward is softplus's slope at max(x, floor) (sigmoid(-cut)
    below the floor instead of the clamp's exact 0: within sigmoid(-cut) of the true slope, and
    no mask pass). Twice differentiable: the backward is aten's softplus_backward."""

    @staticmethod
    def forward(ctx, x, beta, floor):
        ctx.save_for_backward(x)
        ctx.beta, ctx.floor = beta, floor
        return F.softplus(x.clamp(min=floor), beta=beta)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors  # clamped here, so that a double backward sees the clamp
        dx = torch.ops.aten.softplus_backward(grad, x.clamp(min=ctx.floor), ctx.beta, 20.0)
        return dx, None, None


def _as_layer_list(layers: None | int | Sequence[int]) -> list[int]:
    if layers is None:
        return []
    if isinstance(layers, int):
        return [layers]
    return sorted(int(v) for v in layers)


class ImplicitOutput(NamedTuple):
    out: torch.Tensor  # [B, N, d_out] after the output activation
    features: torch.Tensor  # [B, N, feature_dim] last hidden activations
    tail: torch.Tensor | None  # [B, N, zero_init_tail] or None


class ImplicitNetwork(nn.Module):
    """Conditioned MLP on points with positional encoding, one skip and weight norm.

    Args:
        d_in: point dimension (3).
        d_out: output channels of the main head.
        width, depth: hidden width and number of hidden layers.
        skip_layer: layer(s) (1..depth) that re-receive the encoded point, or None.
        multires: positional-encoding octaves (0: raw coordinates).
        cond_dim: width of the conditioning vector (0: unconditioned).
        cond_layers: layers (0..depth) whose input gets the condition concatenated.
        geometric_init: IDR sphere init (module docstring); otherwise torch's default init.
        bias: output bias of the geometric init (the sphere's radius when no skip enters
            the output layer).
        weight_norm: weight-normalize every layer of the MLP (not the extra head).
        zero_init_tail: width of an extra linear head (0: none), weights and bias zero.
        tail_layer: which hidden layer (1..depth) the extra head reads.
        out_activation: None (linear) or "normalize" (unit length).
    """

    def __init__(
        self,
        d_in: int = 3,
        d_out: int = 1,
        width: int = 256,
        depth: int = 4,
        skip_layer: None | int | Sequence[int] = None,
        multires: int = 0,
        cond_dim: int = 0,
        cond_layers: None | int | Sequence[int] = (0,),
        geometric_init: bool = False,
        bias: float = 1.0,
        weight_norm: bool = True,
        zero_init_tail: int = 0,
        tail_layer: int | None = None,
        out_activation: str | None = None,
    ):
        super().__init__()
        self.embedder = PositionalEncoding(d_in, multires)
        self.d_in, self.d_out = int(d_in), int(d_out)
        self.width, self.depth = int(width), int(depth)
        self.skip_layers = _as_layer_list(skip_layer)
        self.cond_dim = int(cond_dim)
        self.cond_layers = _as_layer_list(cond_layers) if self.cond_dim > 0 else []
        self.out_activation = out_activation
        self.tail_dim, self.tail_layer = int(zero_init_tail), tail_layer
        E = self.embedder.out_dim
        if depth < 1 or d_out < 1:
            raise _err(f"depth and d_out must be >= 1, got depth={depth}, d_out={d_out}")
        if any(l < 1 or l > depth for l in self.skip_layers):
            raise _err(f"skip_layer must lie in 1..depth={depth}, got {self.skip_layers}")
        if any(l < 0 or l > depth for l in self.cond_layers):
            raise _err(f"cond_layers must lie in 0..depth={depth}, got {self.cond_layers}")
        if self.skip_layers and width <= E:
            raise _err(f"width {width} must exceed the encoding width {E} to hold a skip")
        if out_activation not in _ACTIVATIONS:
            raise _err(f"out_activation must be one of {_ACTIVATIONS}, got {out_activation!r}")
        if self.tail_dim > 0 and (tail_layer is None or not 1 <= tail_layer <= depth):
            raise _err(f"zero_init_tail needs tail_layer in 1..depth={depth}, got {tail_layer}")

        # hidden output widths: the layer before a skip leaves room for the re-fed encoding
        self._hidden_dims = [width - E if (l + 1) in self.skip_layers else width
                             for l in range(depth)]
        layers = []
        for l in range(depth + 1):
            prev = E if l == 0 else self._hidden_dims[l - 1]
            n_in = (prev + (E if l in self.skip_layers else 0)
                    + (self.cond_dim if l in self.cond_layers else 0))
            n_out = d_out if l == depth else self._hidden_dims[l]
            lin = nn.Linear(n_in, n_out)
            if geometric_init:
                self._geometric_init(lin, l, prev, E, float(bias))
            if weight_norm:
                _weight_norm(lin)  # registers the parametrization in place (g = |v| per row)
            layers.append(lin)
        self.layers = nn.ModuleList(layers)
        self.softplus = Softplus(beta=100.0)
        self.tail = None
        if self.tail_dim > 0:
            self.tail = nn.Linear(self._hidden_dims[tail_layer - 1], self.tail_dim)
            nn.init.zeros_(self.tail.weight)
            nn.init.zeros_(self.tail.bias)

    def _geometric_init(self, lin: nn.Linear, l: int, prev: int, E: int, bias: float) -> None:
        """Sphere init of layer `l`; its input columns are [prev | encoding (skip) | cond].

        The output layer's rule comes first: when the skip enters the output layer, none of
        its columns is zeroed and the mean weight is taken over the full input width."""
        d, w = self.d_in, lin.weight
        with torch.no_grad():
            if l == self.depth:
                nn.init.normal_(w, -math.sqrt(math.pi) / math.sqrt(lin.in_features), 1e-4)
                nn.init.constant_(lin.bias, bias)
                return
            nn.init.normal_(w, 0.0, math.sqrt(2.0) / math.sqrt(lin.out_features))
            nn.init.zeros_(lin.bias)
            if l == 0:
                w[:, d:E] = 0.0  # sinusoids of the input encoding
            if l in self.skip_layers:
                w[:, prev + d:prev + E] = 0.0  # sinusoids of the re-fed encoding

    @property
    def embed_dim(self) -> int:
        """E: width of the encoded point."""
        return self.embedder.out_dim

    @property
    def feature_dim(self) -> int:
        """Width of the last hidden layer (returned as features)."""
        return self._hidden_dims[-1]

    def forward_all(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> ImplicitOutput:
        """Evaluate the network.

        Args:
            x: [B, N, d_in] points.
            cond: [B, cond_dim] (shared by all points), [B, N, cond_dim], or None when
                cond_dim == 0.
        Returns:
            ImplicitOutput(out [B, N, d_out], features [B, N, feature_dim],
            tail [B, N, zero_init_tail] or None).
        """
        if x.dim() != 3 or x.shape[-1] != self.d_in:
            raise _err(f"x must be [B, N, {self.d_in}], got {tuple(x.shape)}")
        B, N, _ = x.shape
        per_item = False
        if self.cond_dim > 0:
            if cond is None:
                raise _err(f"this network needs a condition of width {self.cond_dim}")
            per_item = cond.dim() == 2 and tuple(cond.shape) == (B, self.cond_dim)
            if per_item:  # folded into a per-item bias below instead of repeated for every point
                cond = cond[:, None, :]
            elif cond.dim() != 3 or tuple(cond.shape) != (B, N, self.cond_dim):
                raise _err(f"cond must be [{B}, {self.cond_dim}] or [{B}, {N}, {self.cond_dim}], "
                           f"got {tuple(cond.shape)}")
            cond = cond.to(x.dtype)
        emb = self.embedder(x)
        h, tail, features = emb, None, None
        for l, lin in enumerate(self.layers):
            if l > 0 and l == self.tail_layer and self.tail is not None:
                tail = self.tail(h)
            if l == self.depth:
                features = h
            if l in self.skip_layers:
                h = torch.cat([h, emb], dim=-1) / math.sqrt(2.0)
            if l in self.cond_layers and per_item:
                # [h | cond] W^T + b = h W_h^T + (cond W_c^T + b): the condition's part once per
                # item (same values and gradients, none of the [B, N, cond_dim] work)
                W = lin.weight
                h = (F.linear(h, W[:, :-self.cond_dim])
                     + F.linear(cond, W[:, -self.cond_dim:], lin.bias))
            elif l in self.cond_layers:
                h = lin(torch.cat([h, cond], dim=-1))
            else:
                h = lin(h)
            if l < self.depth:  # h is this layer's fresh output: clamped in place without a graph
                h = self.softplus(h, inplace=not torch.is_grad_enabled())
        if self.out_activation == "normalize":
            h = F.normalize(h, dim=-1, eps=1e-6)
        return ImplicitOutput(h, features, tail)

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor | None = None, return_features: bool = False
    ):
        """x: [B, N, d_in], cond: [B, cond_dim] / [B, N, cond_dim] / None -> out [B, N, d_out]
        (and features [B, N, feature_dim] when `return_features`)."""
        res = self.forward_all(x, cond)
        return (res.out, res.features) if return_features else res.out


class LBSNetwork(nn.Module):
    """Skinning weights and blendshape bases as continuous fields of the shape-neutral
    canonical point (unconditioned, as in the original; lib/model/neutral_lbs.py evaluates it
    at x_c + disp(x_c, betas)).

    The main head gives J skinning logits; a zero-initialized head on hidden layer
    `tail_layer` gives Q*3 pose-corrective and 3*X expression coefficients per point.

    Args:
        n_joints: J (5); pose_feature_dim: Q (36); n_exp: X (50).
        width, depth, multires, skip_layer, tail_layer: ImplicitNetwork args.
        softmax_scale: weights = softmax(softmax_scale * logits) (20).
    """

    def __init__(self, n_joints: int = 5, pose_feature_dim: int = 36, n_exp: int = 50,
                 width: int = 128, depth: int = 4, multires: int = 0, skip_layer=None,
                 tail_layer: int = 3, softmax_scale: float = 20.0, weight_norm: bool = True):
        super().__init__()
        self.n_joints, self.n_exp = int(n_joints), int(n_exp)
        self.pose_feature_dim = int(pose_feature_dim)
        self.softmax_scale = float(softmax_scale)
        self.net = ImplicitNetwork(d_in=3, d_out=self.n_joints, width=width, depth=depth,
                                   skip_layer=skip_layer, multires=multires, cond_dim=0,
                                   weight_norm=weight_norm, zero_init_tail=self.blendshape_dim,
                                   tail_layer=tail_layer)

    @property
    def blendshape_dim(self) -> int:
        """Q * 3 + 3 * X (258 by default)."""
        return self.pose_feature_dim * 3 + 3 * self.n_exp

    def forward(self, xn: torch.Tensor, return_logits: bool = False):
        """Args: xn [B, N, 3] shape-neutral canonical points.
        Returns: w [B, N, J] (rows sum to 1), pose_dirs [B, N, Q, 3] (offset = pose_feature @
        pose_dirs), expr_dirs [B, N, 3, X] (offset = expr_dirs @ exp); plus logits [B, N, J]
        when `return_logits`."""
        res = self.net.forward_all(xn)
        B, N = xn.shape[:2]
        w = torch.softmax(self.softmax_scale * res.out, dim=-1)
        n_pose = self.pose_feature_dim * 3
        pose_dirs = res.tail[..., :n_pose].reshape(B, N, self.pose_feature_dim, 3)
        expr_dirs = res.tail[..., n_pose:].reshape(B, N, 3, self.n_exp)
        if return_logits:
            return w, pose_dirs, expr_dirs, res.out
        return w, pose_dirs, expr_dirs


def build_geometry_network(
    feature_dim: int = 64,
    width: int = 256,
    depth: int = 4,
    multires: int = 4,
    skip_layer=4,
    bias: float = 1.0,
    weight_norm: bool = True,
) -> ImplicitNetwork:
    """Occupancy logits x_c [B, N, 3] + volume feature [B, N, feature_dim] -> [B, N, 1].
    `feature_dim` must equal the generator's `out_channels`. Geometric init with output bias
    `bias`; the skip enters the output layer (skip_layer == depth by default), so the initial
    zero level is a rippled blob rather than a sphere of radius `bias`."""
    return ImplicitNetwork(d_in=3, d_out=1, width=width, depth=depth, skip_layer=skip_layer,
                           multires=multires, cond_dim=feature_dim, cond_layers=[0],
                           geometric_init=True, bias=bias, weight_norm=weight_norm)


def build_displacement_network(n_shape: int = 100, width: int = 128, depth: int = 4,
                               weight_norm: bool = True) -> ImplicitNetwork:
    """x_c [B, N, 3] + FLAME shape [B, n_shape] -> dx [B, N, 3] (default init: dx is small
    but not zero at init)."""
    return ImplicitNetwork(d_in=3, d_out=3, width=width, depth=depth, multires=0, cond_dim=n_shape,
                           cond_layers=[0], weight_norm=weight_norm)


def build_normal_network(detail_dim: int = 128, geometry_feature_dim: int = 229, width: int = 256,
                         depth: int = 8, multires: int = 6, skip_layer=4,
                         weight_norm: bool = True) -> ImplicitNetwork:
    """x_c + cat(z_detail, geometry features) -> unit normal [B, N, 3].
    Pass `geometry_feature_dim=geometry_net.feature_dim`. Normalized at the output; normal
    skinning is linear in the normal and renormalizes, so the skinned direction (and its
    gradient) is that of normalizing only after skinning."""
    return ImplicitNetwork(d_in=3, d_out=3, width=width, depth=depth, skip_layer=skip_layer,
                           multires=multires, cond_dim=detail_dim + geometry_feature_dim,
                           cond_layers=[0], weight_norm=weight_norm, out_activation="normalize")


def build_texture_network(
    color_dim: int = 64,
    pose_exp_dim: int = 65,
    geometry_feature_dim: int = 229,
    normal_feature_dim: int = 256,
    width: int = 256,
    depth: int = 8,
    multires: int = 6,
    skip_layer=4,
    weight_norm: bool = True,
) -> ImplicitNetwork:
    """x_c + cat(z_color, pose/expression, geometry features, normal features) -> rgb [B, N, 3],
    linear (unbounded; trained toward [-1, 1] targets, clamped only where written as images).
    Pass the feature widths from `geometry_net.feature_dim` and `normal_net.feature_dim`."""
    cond_dim = color_dim + pose_exp_dim + geometry_feature_dim + normal_feature_dim
    return ImplicitNetwork(d_in=3, d_out=3, width=width, depth=depth, skip_layer=skip_layer,
                           multires=multires, cond_dim=cond_dim, cond_layers=[0],
                           weight_norm=weight_norm)


def build_head_networks(
    volume_feature_dim: int = 64,
    detail_dim: int = 128,
    color_dim: int = 64,
    n_shape: int = 100,
    n_exp: int = 50,
    n_pose: int = 15,
    n_joints: int = 5,
    pose_feature_dim: int = 36,
    geometry_bias: float = 1.0,
) -> nn.ModuleDict:
    """All five networks with the default architecture (docs/design.md, Networks) and every
    derived width taken from the built networks: keys geometry, lbs, displacement, normal,
    texture."""
    geometry = build_geometry_network(feature_dim=volume_feature_dim, bias=geometry_bias)
    normal = build_normal_network(detail_dim=detail_dim, geometry_feature_dim=geometry.feature_dim)
    texture = build_texture_network(color_dim=color_dim, pose_exp_dim=n_pose + n_exp,
                                    geometry_feature_dim=geometry.feature_dim,
                                    normal_feature_dim=normal.feature_dim)
    return nn.ModuleDict(dict(
        geometry=geometry,
        lbs=LBSNetwork(n_joints=n_joints, pose_feature_dim=pose_feature_dim, n_exp=n_exp),
        displacement=build_displacement_network(n_shape=n_shape),
        normal=normal,
        texture=texture,
    ))

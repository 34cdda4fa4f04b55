"""Tests of lib/model/broyden.py and lib/model/deformer.py against analytic truths.

Shape legend: B batch, N points, I inits, J joints (5), X expression components, Q pose
feature (36).

The stand-in LBS fields are an analytic smooth field: skinning weights are a softmax of negative
squared distances to 5 centres (shifted by the item's betas, cond['shape'], so per-item
conditioning matters), pose and expression bases are small sinusoids. Joint transforms come from
a 5-joint chain (FLAME's hierarchy) with random rotations up to 35 degrees; the canonical pose
opens the jaw by 0.2 rad. The fields of GANHead (lib/model/neutral_lbs.py: the unconditioned LBS
network at x_c + disp(x_c, betas)) are tested on small real networks against the composition
computed by hand and finite differences.
"""
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from lib.flame.frames import FlameFrames
from lib.flame.lbs import deform_canonical
from lib.model.broyden import broyden
from lib.model.deformer import SKIPPED_LOGIT, ForwardDeformer, inv3
from lib.model.networks import LBSNetwork, build_displacement_network
from lib.model.neutral_lbs import NeutralLBS

PARENTS = [-1, 0, 1, 1, 1]
JOINTS = [[0.0, -0.6, -0.1], [0.0, -0.35, -0.1], [0.0, -0.15, 0.05], [0.3, 0.25, 0.45],
          [-0.3, 0.25, 0.45]]
CENTRES = [[0.0, -0.95, -0.1], [0.0, 0.3, -0.15], [0.0, -0.45, 0.4], [0.3, 0.22, 0.6],
           [-0.3, 0.22, 0.6]]
K_EXP, N_BETAS = 10, 100


def rodrigues(r):
    """r [..., 3] axis-angle -> [..., 3, 3] (test's own implementation)."""
    t = r.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = r / t
    K = torch.zeros(*r.shape[:-1], 3, 3, dtype=r.dtype)
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    K = K - K.transpose(-1, -2)
    s, c = torch.sin(t)[..., None], torch.cos(t)[..., None]
    return torch.eye(3, dtype=r.dtype) + s * K + (1 - c) * (K @ K)


def chain(rot, joints, transl):
    """rot [B, J, 3, 3], joints [J, 3], transl [B, 3] -> bone transforms [B, J, 4, 4] (rest
    joint removed)."""
    B, J = rot.shape[:2]
    G = []
    for j in range(J):
        p = PARENTS[j]
        L = torch.eye(4, dtype=rot.dtype).repeat(B, 1, 1)
        L[:, :3, :3] = rot[:, j]
        L[:, :3, 3] = joints[j] - joints[p] if p >= 0 else joints[j] + transl
        G.append(L if p < 0 else G[p] @ L)
    rest = torch.eye(4, dtype=rot.dtype).repeat(B, J, 1, 1)
    rest[..., :3, 3] = -joints
    return torch.stack(G, 1) @ rest


class Field(nn.Module):
    """Analytic LBS field: (xc [B, N, 3], betas [B, S]) -> w [B, N, 5], pose_dirs [B, N, Q, 3],
    expr_dirs [B, N, 3, X]."""

    def __init__(self, tau=0.15, amp=0.02, seed=0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("centres", torch.tensor(CENTRES, dtype=dtype))
        self.register_buffer("fp", (torch.rand(36, 3, 3, generator=g) * 4 - 2).to(dtype))
        self.register_buffer("pp", (torch.rand(36, 3, generator=g) * 6).to(dtype))
        self.register_buffer("fe", (torch.rand(3, K_EXP, 3, generator=g) * 4 - 2).to(dtype))
        self.register_buffer("pe", (torch.rand(3, K_EXP, generator=g) * 6).to(dtype))
        self.tau, self.amp = tau, amp
        self.expr_scale = 1.0  # plain attribute: gradcheck replaces it by a tensor
        self.calls = []

    def forward(self, xc, betas):
        B, N, _ = xc.shape
        self.calls.append(B * N)
        c = self.centres + 0.05 * torch.tanh(betas[:, :15]).reshape(B, 1, 5, 3)
        w = torch.softmax(-((xc[:, :, None, :] - c) ** 2).sum(-1) / self.tau, dim=-1)
        pd = self.amp * torch.sin(torch.einsum("bnd,pcd->bnpc", xc, self.fp) + self.pp)
        phase = torch.einsum("bnd,ckd->bnck", xc, self.fe) + self.pe
        ed = self.amp * self.expr_scale * torch.sin(phase)
        return w, pd, ed


def make_flame(B, max_deg=35.0, seed=1, dtype=torch.float32):
    """Random target pose (rotations up to max_deg per joint) and the canonical one (jaw 0.2)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    joints = torch.tensor(JOINTS, dtype=f64)
    axis = torch.nn.functional.normalize(torch.randn(B, 5, 3, generator=g, dtype=f64), dim=-1)
    rot = rodrigues(axis * torch.rand(B, 5, 1, generator=g, dtype=f64) * math.radians(max_deg))
    rv_c = torch.zeros(B, 5, 3, dtype=f64)
    rv_c[:, 2, 0] = 0.2
    rot_c = rodrigues(rv_c)
    eye = torch.eye(3, dtype=f64)
    out = FlameFrames(
        tfs=chain(rot, joints, torch.randn(B, 3, generator=g, dtype=f64) * 0.05),
        tfs_c=chain(rot_c, joints, torch.zeros(B, 3, dtype=f64)),
        pose_feature=(rot[:, 1:] - eye).reshape(B, -1),
        pose_feature_c=(rot_c[:, 1:] - eye).reshape(B, -1),
        exp=torch.randn(B, K_EXP, generator=g, dtype=f64),
        exp_c=torch.zeros(B, K_EXP, dtype=f64),
    )
    return out.to(dtype)


def setup_problem(B=2, N=300, dtype=torch.float32, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    field = Field(dtype=dtype)
    cond = dict(shape=torch.randn(B, N_BETAS, generator=g).to(dtype))
    fl = make_flame(B, dtype=dtype, seed=seed + 1)
    d = ForwardDeformer(field, **kw)
    xc_true = (torch.rand(B, N, 3, generator=g) * 1.6 - 0.8).to(dtype)
    with torch.no_grad():
        xd = d.forward_deform(xc_true, cond, fl)
    return d, field, cond, fl, xc_true, xd


def recovered(xc, valid, xc_true, tol=1e-4):
    """[B, N] bool: some valid init lies within tol of the truth."""
    return (((xc - xc_true[:, :, None]).norm(dim=-1) < tol) & valid).any(-1)


# ---------------------------------------------------------------------------------- broyden
def test_broyden_solves_sine_system_and_flags_divergence():
    g = torch.Generator().manual_seed(0)
    M = 200
    x_true = torch.randn(M, 3, generator=g, dtype=torch.float64) * 2
    y = x_true + 0.1 * torch.sin(x_true)
    bad = torch.arange(M) % 4 == 0  # these systems read g(x) = x^2 + 1: no root, residual >= 1
    sizes = []

    def g_fn(x, mask):
        sizes.append(x.shape[0])
        good = x + 0.1 * torch.sin(x) - y[mask]
        return torch.where(bad[mask][:, None], x * x + 1.0, good)

    J0 = torch.eye(3, dtype=torch.float64).repeat(M, 1, 1)
    out = broyden(g_fn, torch.zeros(M, 3, dtype=torch.float64), J0, max_steps=50, cvg_thresh=1e-10)
    assert out["valid_ids"].tolist() == (~bad).tolist()
    assert (out["result"][~bad] - x_true[~bad]).abs().max() < 1e-6
    assert (out["diff"][~bad] < 1e-10).all() and (out["diff"][bad] >= 1.0).all()
    assert 0 < out["n_steps"] < 50
    # only active points are evaluated: the rootless ones drop out after their first step
    assert sizes[0] == sizes[1] == M and sizes[2] <= M - bad.sum() and sizes[-1] < sizes[2]
    again = broyden(g_fn, torch.zeros(M, 3, dtype=torch.float64), J0, max_steps=50,
                    cvg_thresh=1e-10)
    assert torch.equal(again["result"], out["result"])  # deterministic


def test_broyden_linear_system_exact_jacobian_and_max_steps():
    A = torch.tensor([[2.0, 0.3, 0.0], [0.1, 1.5, -0.2], [0.0, 0.4, 1.0]], dtype=torch.float64)
    b = torch.randn(10, 3, dtype=torch.float64)
    g_fn = lambda x, mask: x @ A.T - b[mask]  # noqa: E731
    out = broyden(g_fn, torch.zeros(10, 3, dtype=torch.float64),
                  torch.linalg.inv(A).repeat(10, 1, 1))
    assert out["n_steps"] == 1 and out["valid_ids"].all()
    assert torch.allclose(out["result"], torch.linalg.solve(A, b.T).T, atol=1e-12)
    # Broyden terminates on a linear n-dim system within 2n steps (Gay 1979), from any H0
    eye = torch.eye(3, dtype=torch.float64).repeat(10, 1, 1)
    lin = broyden(g_fn, torch.zeros(10, 3, dtype=torch.float64), eye, cvg_thresh=1e-9,
                  dvg_thresh=1e9)
    assert lin["valid_ids"].all() and lin["n_steps"] <= 7
    assert torch.allclose(lin["result"], torch.linalg.solve(A, b.T).T, atol=1e-8)
    zero = broyden(g_fn, torch.zeros(10, 3, dtype=torch.float64),
                   torch.eye(3, dtype=torch.float64).repeat(10, 1, 1), max_steps=0)
    assert zero["n_steps"] == 0 and not zero["valid_ids"].any()
    with pytest.raises(ValueError, match="broyden.py"):
        broyden(g_fn, torch.zeros(10, 2), torch.eye(3).repeat(10, 1, 1))


# ----------------------------------------------------------------------------- forward deformation
def _pointwise_reference(xc, w, pd, ed, fl, b):
    """The forward deformation of one point (docs/design.md, Forward skinning) in float64, with
    4x4 solves: xc [3], w [J], pd [Q, 3], ed [3, X], frame b of fl (FlameFrames) -> xd [3]."""
    Ac = sum(w[j] * fl.tfs_c[b, j] for j in range(5))
    Ad = sum(w[j] * fl.tfs[b, j] for j in range(5))
    xr = torch.linalg.solve(Ac, torch.cat([xc, xc.new_ones(1)]))[:3]
    xr = xr - pd.T @ fl.pose_feature_c[b] - ed @ fl.exp_c[b]
    xr = xr + ed @ fl.exp[b] + pd.T @ fl.pose_feature[b]
    return (Ad @ torch.cat([xr, xr.new_ones(1)]))[:3]


def test_forward_deform_matches_pointwise_reference():
    d, field, cond, fl, xc, _ = setup_problem(B=2, N=20, dtype=torch.float64)
    fl.exp_c = torch.randn(2, K_EXP, dtype=torch.float64)  # non-zero canonical expression
    xd = d.forward_deform(xc, cond, fl)
    w, pd, ed = field(xc, cond["shape"])
    for b in range(2):
        for n in range(20):
            ref = _pointwise_reference(xc[b, n], w[b, n], pd[b, n], ed[b, n], fl, b)
            assert torch.allclose(xd[b, n], ref, atol=1e-12)
    same = replace(fl, tfs=fl.tfs_c, pose_feature=fl.pose_feature_c, exp=fl.exp_c)
    # canonical -> canonical
    assert torch.allclose(d.forward_deform(xc, cond, same), xc, atol=1e-12)


def test_explicit_mesh_deformation_matches_pointwise_reference():
    """lib/model/explicit.deform_mesh (fields shared by all frames, one frame at a time) gives
    the pointwise forward deformation of every frame."""
    from lib.model.explicit import deform_mesh

    _, field, cond, fl, xc, _ = setup_problem(B=3, N=15, dtype=torch.float64)
    fl.exp_c = torch.randn(3, K_EXP, dtype=torch.float64)
    w, pd, ed = (f[0] for f in field(xc[:1], cond["shape"][:1]))
    xd = deform_mesh(xc[0], (w, pd, ed), fl)
    assert xd.shape == (3, 15, 3)
    for b in range(3):
        for n in range(15):
            ref = _pointwise_reference(xc[0, n], w[n], pd[n], ed[n], fl, b)
            assert torch.allclose(xd[b, n], ref, atol=1e-12)


@pytest.mark.parametrize("bone", [1, 2])
def test_rigid_init_is_exact_for_one_hot_weights(bone):
    class Rigid(nn.Module):  # whole space follows one bone, no blendshapes
        def forward(self, xc, betas):
            B, N, _ = xc.shape
            w = torch.zeros(B, N, 5, dtype=xc.dtype)
            w[..., bone] = 1
            return w, xc.new_zeros(B, N, 36, 3), xc.new_zeros(B, N, 3, K_EXP)

    fl = make_flame(2)
    d = ForwardDeformer(Rigid())
    xc = torch.rand(2, 50, 3) - 0.5
    cond = dict(shape=torch.zeros(2, N_BETAS))
    xd = d.forward_deform(xc, cond, fl)
    init = d.init_points(xd, fl)
    assert init.shape == (2, 50, 5, 3)
    assert torch.allclose(init[:, :, bone], xc, atol=1e-5)
    for eval_mode in (False, True):
        out, valid, info = d.search(xd, cond, fl, eval_mode=eval_mode, return_info=True)
        assert valid.all()
        assert torch.allclose(out, xc[:, :, None].expand_as(out), atol=1e-5)
        # the exact Jacobian init solves a rigid field in one step; the evaluation-mode init
        # (sum_j w_j tfs[j])^-1, canonical transforms left out as in the original, only where the
        # bone's canonical transform is a translation (bone 1; the jaw's opens 0.2 rad)
        assert info["n_steps"] == 1 if (not eval_mode or bone == 1) else info["n_steps"] > 1


# ---------------------------------------------------------------------------------- search
@pytest.mark.parametrize("eval_mode", [False, True])
def test_round_trip_recovers_canonical_points(eval_mode):
    d, _, cond, fl, xc_true, xd = setup_problem(B=2, N=400)
    with torch.no_grad():
        xc, valid, info = d(xd, cond, fl, eval_mode=eval_mode, return_info=True)
    assert xc.shape == (2, 400, 5, 3) and valid.shape == (2, 400, 5)
    assert recovered(xc, valid, xc_true).float().mean() >= 0.99
    assert (info["diff"][valid] < 1e-5).all() and 0 < info["n_steps"] <= 50
    # every valid root really maps onto x_d
    xd_back = d.forward_deform(xc.reshape(2, -1, 3), cond, fl).reshape(2, 400, 5, 3)
    err = (xd_back - xd[:, :, None]).norm(dim=-1)
    assert (err[valid] < 2e-5).all()


def test_chunking_matches_single_chunk():
    d, _, cond, fl, _, xd = setup_problem(B=2, N=150)
    with torch.no_grad():
        xc1, v1 = d.search(xd, cond, fl)
        d.chunk_size = 37  # chunks straddle batch items
        xc2, v2 = d.search(xd, cond, fl)
    assert (v1 == v2).float().mean() > 0.995
    both = v1 & v2
    assert torch.allclose(xc1[both], xc2[both], atol=1e-5)


def test_point_mask_skips_points():
    d, _, cond, fl, xc_true, xd = setup_problem(B=2, N=60)
    mask = torch.rand(2, 60, generator=torch.Generator().manual_seed(3)) < 0.5
    with torch.no_grad():
        xc, valid = d(xd, cond, fl, point_mask=mask)
    assert not valid[~mask].any()
    assert recovered(xc, valid, xc_true)[mask].float().mean() >= 0.99


# ----------------------------------------------------------------------------- implicit gradient
def test_implicit_gradient_matches_finite_differences():
    d, field, cond, fl, _, _ = setup_problem(B=2, N=3, dtype=torch.float64, max_steps=100,
                                             cvg_thresh=1e-13)
    g = torch.Generator().manual_seed(5)
    xc_true = torch.rand(2, 3, 3, generator=g, dtype=torch.float64) * 1.2 - 0.6
    xd0 = d.forward_deform(xc_true, cond, fl).detach()
    with torch.no_grad():
        _, mask0 = d(xd0, cond, fl)
    assert mask0.any(-1).all()

    def fn(theta, xd):
        field.expr_scale = theta[3]  # a parameter of the field
        tfs = fl.tfs.clone()
        tfs[:, 2, :3, 3] = tfs[:, 2, :3, 3] + theta[:3]  # jaw bone translation
        xc, valid = d(xd, cond, replace(fl, tfs=tfs))
        return torch.where(mask0[..., None], xc, torch.zeros_like(xc))

    theta = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
    xd = xd0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (theta, xd), eps=1e-6, atol=1e-5, rtol=1e-3)
    field.expr_scale = 1.0


class ShiftedField(Field):
    """Field with a learnable offset of all centres (an nn.Parameter of the 'network')."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(3))

    def forward(self, xc, betas):
        return super().forward(xc - self.shift, betas)


def test_implicit_gradient_reaches_lbs_parameters():
    d, _, cond, fl, xc_true, xd = setup_problem(B=1, N=20)
    field = ShiftedField()
    d.lbs_net = field
    xc, valid = d(xd, cond, fl)
    xc[valid].sum().backward()
    assert field.shift.grad is not None and field.shift.grad.abs().sum() > 0
    with torch.no_grad():
        xc_ng, _ = d(xd, cond, fl)
    assert torch.equal(xc.detach()[valid], xc_ng[valid])  # the correction keeps the value
    field.shift.grad = None  # occupancy of deformed points is differentiable w.r.t. the LBS field
    occ = d.query_occupancy(xd, cond, fl, lambda x, c: 10.0 * (0.5 - x.norm(dim=-1, keepdim=True)))
    occ[occ > SKIPPED_LOGIT].sum().backward()
    assert field.shift.grad is not None and field.shift.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- GANHead's fields
def neutral_fields(seed=0, dtype=torch.float64):
    """NeutralLBS (lib/model/neutral_lbs.py) on small real networks, every parameter perturbed
    (the zero-initialized blendshape head and displacement output included, so that the warp and
    the blendshapes matter). Returns (fields, lbs, disp)."""
    torch.manual_seed(seed)
    lbs = LBSNetwork(n_exp=K_EXP, width=32, depth=3, tail_layer=2, softmax_scale=5.0)
    disp = build_displacement_network(n_shape=N_BETAS, width=16, depth=2)
    with torch.no_grad():
        for p in list(lbs.parameters()) + list(disp.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    return NeutralLBS(lbs, disp).to(dtype), lbs, disp


def test_fields_are_the_unconditioned_lbs_network_at_the_shape_neutral_point():
    f64 = torch.float64
    fields, lbs, disp = neutral_fields()
    assert disp.layers[0].bias.dtype == f64  # casting the fields casts the referenced network
    d = ForwardDeformer(fields)
    g = torch.Generator().manual_seed(0)
    xc = torch.rand(2, 30, 3, generator=g, dtype=f64) * 1.6 - 0.8
    betas = torch.randn(2, N_BETAS, generator=g, dtype=f64)
    fl = make_flame(2, dtype=f64)
    # by hand: the displacement network on (x_c, betas), then the LBS network alone at x_n
    xn = xc + disp(xc, betas)
    assert (xn - xc).norm(dim=-1).mean() > 1e-2  # the warp matters here
    w_ref, pd_ref, ed_ref = lbs(xn)
    for got, ref in zip(d._fields(xc, betas), (w_ref, pd_ref, ed_ref)):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-14)
    assert ed_ref.abs().max() > 1e-3 and pd_ref.abs().max() > 1e-3
    assert (d._fields(xc, betas.flip(0))[0] - w_ref).abs().max() > 1e-3  # each item's betas count
    xd = d.forward_deform(xc, {"shape": betas}, fl)
    ref = deform_canonical(xc, w_ref, ed_ref, pd_ref, fl.exp[:, None], fl.pose_feature[:, None],
                           fl.tfs[:, None], fl.exp_c[:, None], fl.pose_feature_c[:, None],
                           fl.tfs_c[:, None])
    torch.testing.assert_close(xd, ref, rtol=0, atol=1e-13)
    # the displacement network is referenced, not owned: its parameters are not the deformer's
    assert all(k.startswith("lbs_net.lbs.net.") for k in d.state_dict())
    disp_ids = {id(p) for p in disp.parameters()}
    assert not any(id(p) in disp_ids for p in d.parameters())


def test_eval_mode_jacobian_init_is_the_inverse_blended_target_transform():
    """(sum_j w_j tfs[j])[:3, :3]^-1 with w the fields at the initial point (through the warp);
    the canonical transforms are left out, as in the original."""
    f64 = torch.float64
    fields, lbs, disp = neutral_fields(seed=1)
    d = ForwardDeformer(fields)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(40, 3, generator=g, dtype=f64) - 0.5
    bidx = torch.randint(0, 2, (40,), generator=g)
    betas = torch.randn(2, N_BETAS, generator=g, dtype=f64)
    fl = d._checked_flame(make_flame(2, dtype=f64), 2, x0)
    w = lbs(x0[:, None] + disp(x0[:, None], betas[bidx]))[0][:, 0]                   # [A, J]
    A = sum(w[:, j, None, None] * fl.tfs[bidx, j, :3, :3] for j in range(5))
    got = d._init_J_inv(x0, bidx, betas, fl, eval_mode=True)
    torch.testing.assert_close(got, torch.linalg.inv(A), rtol=1e-10, atol=1e-12)


def test_implicit_gradient_reaches_the_displacement_network_finite_differences():
    """d x_c / d theta of the found roots for the displacement network's parameters theta:
    non-zero for every parameter and equal to central finite differences of re-solved roots."""
    f64 = torch.float64
    fields, _, disp = neutral_fields(seed=2)
    d = ForwardDeformer(fields, max_steps=100, cvg_thresh=1e-13)
    g = torch.Generator().manual_seed(7)
    xc_true = torch.rand(2, 3, 3, generator=g, dtype=f64) * 1.2 - 0.6
    cond = {"shape": torch.randn(2, N_BETAS, generator=g, dtype=f64)}
    fl = make_flame(2, dtype=f64, seed=2)
    with torch.no_grad():
        xd = d.forward_deform(xc_true, cond, fl)
    xc, valid = d(xd, cond, fl)
    assert valid.any(-1).all()
    weight = torch.randn(xc.shape, generator=g, dtype=f64)

    def loss_of(x):
        return (torch.where(valid[..., None], x, torch.zeros_like(x)) * weight).sum()

    named = dict(disp.named_parameters())
    grads = dict(zip(named, torch.autograd.grad(loss_of(xc), list(named.values()))))
    assert all(gr.abs().max() > 0 for gr in grads.values()), \
        {k: float(v.abs().max()) for k, v in grads.items()}
    picks = [(name, tuple(int(i) for i in torch.unravel_index(gr.abs().argmax(), gr.shape)))
             for name, gr in grads.items()]
    first_v = grads["layers.0.parametrizations.weight.original1"].abs()
    for cols in (slice(0, 3), slice(3, None)):  # the first layer's xyz and betas columns
        r, c = torch.unravel_index(first_v[:, cols].argmax(), first_v[:, cols].shape)
        picks.append(("layers.0.parametrizations.weight.original1", (int(r), int(c) + cols.start)))
    eps = 1e-6
    for name, idx in picks:
        p = named[name]
        with torch.no_grad():
            p[idx] += eps
            xp, vp = d(xd, cond, fl)
            p[idx] -= 2 * eps
            xm, vm = d(xd, cond, fl)
            p[idx] += eps
        assert torch.equal(vp, valid) and torch.equal(vm, valid)
        fd = float(loss_of(xp) - loss_of(xm)) / (2 * eps)
        an = float(grads[name][idx])
        assert abs(fd - an) <= 1e-5 * abs(an) + 1e-9, (name, idx, fd, an)


# ---------------------------------------------------------------------------------- occupancy
def test_query_occupancy_sphere_and_skipping():
    d, _, cond, fl, xc_true, xd = setup_problem(B=2, N=200)
    shift = torch.tensor([0.02, -0.01, 0.03])
    disp_net = lambda x, shape: shift.expand_as(x) + 0 * shape[:, None, :1]  # noqa: E731
    sphere = lambda x, c: (10.0 * (0.5 - x.norm(dim=-1, keepdim=True)))  # noqa: E731
    with torch.no_grad():
        occ = d.query_occupancy(xd, cond, fl, sphere, disp_net=disp_net)
    assert occ.shape == (2, 200, 1)
    truth = sphere(xc_true + shift, cond)
    ok = recovered(*d(xd, cond, fl), xc_true)
    # the true root is valid; other valid roots can only raise the max
    assert (occ[ok] >= truth[ok] - 1e-3).all()
    assert ((occ - truth).abs()[ok] < 1e-3).float().mean() > 0.97
    # far-point skipping: "vertices" only near half of the points
    # every 10th vertex is one of the first 100 points
    verts = xd[:, :100].repeat_interleave(10, dim=1)
    occ_skip = d.query_occupancy(xd, cond, replace(fl, verts=verts), sphere, disp_net=disp_net,
                                 skip_far=True)
    near = torch.cdist(xd, xd[:, :100]).amin(-1) <= 0.11
    assert (occ_skip[~near] == SKIPPED_LOGIT).all()
    assert torch.allclose(occ_skip[near], occ[near], atol=1e-4)
    xc_n = d.to_neutral(xc_true[:, :, None].expand(-1, -1, 5, -1), cond["shape"], disp_net)
    assert torch.allclose(xc_n, (xc_true + shift)[:, :, None].expand(-1, -1, 5, -1))


def test_inv3_and_errors():
    m = torch.randn(100, 3, 3, dtype=torch.float64)
    inv, ok = inv3(m)
    assert ok.all() and torch.allclose(inv, torch.linalg.inv(m), atol=1e-8)
    sing = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 0.0]])
    assert not inv3(sing)[1]
    d, _, cond, fl, _, xd = setup_problem(B=2, N=5)
    with pytest.raises(ValueError, match="deformer.py.*tfs_c"):
        d.search(xd, cond, replace(fl, tfs_c=None))
    with pytest.raises(ValueError, match="lacks 'shape'"):
        d.search(xd, {}, fl)
    with pytest.raises(ValueError, match=r"cond\['shape'\] must be"):
        d.search(xd, {"shape": cond["shape"][:1]}, fl)
    with pytest.raises(ValueError, match="init_bones"):
        ForwardDeformer(Field(), init_bones=(0, 7))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    d, _, cond, fl, xc_true, xd = setup_problem(B=2, N=300)
    with torch.no_grad():
        xc, valid = d(xd, cond, fl, eval_mode=True)
    dev = torch.device("cuda")
    dg = d.to(dev)
    with torch.no_grad():
        xc_g, valid_g = dg(xd.to(dev), {k: v.to(dev) for k, v in cond.items()},
                           fl.to(dev), eval_mode=True)
    assert (valid_g.cpu() == valid).float().mean() > 0.99
    both = valid & valid_g.cpu()
    assert torch.allclose(xc_g.cpu()[both], xc[both], atol=1e-4)
    assert recovered(xc_g.cpu(), valid_g.cpu(), xc_true).float().mean() >= 0.99

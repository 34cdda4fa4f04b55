"""Tests of lib/model/fast_deformer.py: the grid pieces against analytic truths, and the fast
search against the exact one (lib/model/deformer.py) on the same networks.

Shape legend: B batch (4), N points, I inits (5), J joints (5), S betas width (100).

Networks: GANHead's fields (lib/model/neutral_lbs.py): the real unconditioned LBSNetwork (128x4)
at x_c + disp(x_c, betas), with the real displacement network (128x4, conditioned on the 100
betas). The LBS network is briefly fitted to a smooth head-like skinning (softmax of -d^2/0.15 to
5 bone centres; an untrained one is almost rigid); its zero-initialized blendshape head and the
displacement network's zero-initialized output layer get small random weights, so the
expression and pose-corrective offsets and the warp are non-zero. Batch: 4 items with their own
betas and expression; item 0 opens the jaw
0.3 rad, item 1 turns the head 30 degrees at the neck, item 2 does both, item 3 is a random pose
(up to 25 degrees per joint). The canonical pose opens the jaw 0.2 rad.

Tolerances: converged fraction within 0.5 percentage points of the exact search; correspondences
valid in both within 1e-4 (each search stops at a residual below cvg_thresh = 1e-5); gradients
with respect to both networks' parameters (and x_d): float64 with cvg_thresh 1e-11, relative 1e-5;
float32 at the default settings, 1e-3 of the largest entry (measured about 1e-5).
"""
import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

# the analytic skeleton and Rodrigues formula of the exact deformer's tests
from test_deformer import CENTRES, JOINTS, PARENTS, rodrigues  # noqa: E402
from torch import nn

from lib.flame.frames import FlameFrames
from lib.model.deformer import SKIPPED_LOGIT, ForwardDeformer
from lib.model.fast_deformer import BakedGrid, FastForwardDeformer, spline_matrix
from lib.model.networks import ImplicitNetwork, LBSNetwork, build_displacement_network
from lib.model.neutral_lbs import NeutralLBS


def chain(rot):
    """Local rotations [B, 5, 3, 3] -> bone transforms [B, 5, 4, 4] (FLAME hierarchy, rest
    joints removed)."""
    B = rot.shape[0]
    joints = torch.tensor(JOINTS, dtype=rot.dtype)
    G = []
    for j, p in enumerate(PARENTS):
        L = torch.eye(4, dtype=rot.dtype).repeat(B, 1, 1)
        L[:, :3, :3] = rot[:, j]
        L[:, :3, 3] = joints[j] - (joints[p] if p >= 0 else 0)
        G.append(L if p < 0 else G[p] @ L)
    rest = torch.eye(4, dtype=rot.dtype).repeat(B, 5, 1, 1)
    rest[..., :3, 3] = -joints
    return torch.stack(G, 1) @ rest


def make_problem(N=300, seed=0, dtype=torch.float32):
    """cond, flame_out and deformed points xd [4, N, 3] for the four named poses."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    rv = torch.zeros(4, 5, 3, dtype=f64)
    rv[0, 2, 0] = rv[2, 2, 0] = 0.3                     # jaw open
    rv[1, 1, 1] = rv[2, 1, 1] = math.radians(30.0)      # head turned at the neck
    axis = nn.functional.normalize(torch.randn(5, 3, generator=g, dtype=f64), dim=-1)
    rv[3] = axis * torch.rand(5, 1, generator=g, dtype=f64) * math.radians(25.0)
    rv_c = torch.zeros(4, 5, 3, dtype=f64)
    rv_c[:, 2, 0] = 0.2
    R, R_c = rodrigues(rv), rodrigues(rv_c)
    eye = torch.eye(3, dtype=f64)
    fl = FlameFrames(tfs=chain(R), tfs_c=chain(R_c), pose_feature=(R[:, 1:] - eye).reshape(4, -1),
                     pose_feature_c=(R_c[:, 1:] - eye).reshape(4, -1),
                     exp=torch.randn(4, 50, generator=g, dtype=f64) * 0.5,
                     exp_c=torch.zeros(4, 50, dtype=f64))
    cond = dict(shape=torch.randn(4, 100, generator=g, dtype=f64) * 0.5)
    n_ball = N * 8 // 9
    ball = nn.functional.normalize(torch.randn(4, n_ball, 3, generator=g, dtype=f64), dim=-1)
    ball = ball * (0.5 + 0.1 * torch.randn(4, n_ball, 1, generator=g, dtype=f64))
    xd = torch.cat([ball, torch.rand(4, N - n_ball, 3, generator=g, dtype=f64) * 2 - 1], 1)
    return xd.to(dtype), {k: v.to(dtype) for k, v in cond.items()}, fl.to(dtype)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are small: one thread avoids OpenMP oversubscription on shared 2-core
    machines."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def all_params(fields):
    """Parameters of both networks of a NeutralLBS (the displacement network is referenced, not
    registered, so fields.parameters() holds the LBS network's only)."""
    return list(fields.parameters()) + list(fields.disp_net.parameters())


@pytest.fixture(scope="module")
def net(one_thread):
    """NeutralLBS: LBSNetwork fitted for 80 Adam steps to a smooth skinning (through the warp),
    small random blendshapes, a displacement network with a small random output layer."""
    torch.manual_seed(0)
    lbs, disp = LBSNetwork(), build_displacement_network()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        disp.layers[-1].weight.copy_(torch.randn(disp.layers[-1].weight.shape, generator=g) * 0.01)
    fields = NeutralLBS(lbs, disp)
    _, cond, _ = make_problem(N=9)
    centres = torch.tensor(CENTRES)
    opt = torch.optim.Adam(lbs.parameters(), lr=3e-3)
    for _ in range(80):
        x = torch.rand(4, 256, 3, generator=g) * 2 - 1
        target = torch.softmax(-((x[:, :, None] - centres) ** 2).sum(-1) / 0.15, dim=-1)
        loss = ((fields(x, cond["shape"])[0] - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        lbs.net.tail.weight.copy_(torch.randn(lbs.net.tail.weight.shape, generator=g) * 0.003)
    for p in all_params(fields):
        p.grad = None
    return fields


def residual(d, xc, xd, cond, fl):
    """|forward_deform(xc) - xd| per init: xc [B, N, I, 3], xd [B, N, 3] -> [B, N, I]."""
    B, N, I, _ = xc.shape
    with torch.no_grad():
        back = d.forward_deform(xc.reshape(B, N * I, 3), cond, fl).reshape(B, N, I, 3)
    return (back - xd[:, :, None]).norm(dim=-1)


def assert_agree(xe, ve, xf, vf, tol=1e-4, frac_pp=0.5):
    """Fast vs exact: valid fractions within frac_pp points, correspondences valid in both
    within tol."""
    assert abs(vf.float().mean() - ve.float().mean()) * 100 <= frac_pp
    both = ve & vf
    assert both.float().mean() > 0.95
    assert (xf - xe).norm(dim=-1)[both].max() < tol


# ---------------------------------------------------------------------------------- grid pieces
def test_spline_matrix_reproduces_cubics_and_interpolates():
    for n, m in ((4, 10), (7, 25), (16, 61)):
        M = spline_matrix(n, m)
        xs, xf = np.linspace(0, 1, n), np.linspace(0, 1, m)
        for coef in ([1.0, -2.0, 0.5, 3.0], [0.2, 0.0, -1.0, 0.0]):
            p = np.polynomial.Polynomial(coef)
            # not-a-knot is exact on cubics
            assert np.allclose(M.numpy() @ p(xs), p(xf), atol=1e-10)
        if (m - 1) % (n - 1) == 0:  # fine nodes on the coarse ones reproduce the samples
            step = (m - 1) // (n - 1)
            assert torch.allclose(M[::step], torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(spline_matrix(2, 5) @ torch.tensor([1.0, 3.0], dtype=torch.float64),
                          torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="fast_deformer.py"):
        spline_matrix(1, 4)


def test_baked_grid_is_exact_on_trilinear_fields_inside_and_outside():
    """A trilinear polynomial field is reproduced exactly, with its Jacobian, also when
    extrapolated."""
    g = torch.Generator().manual_seed(0)
    # two slots, 8 monomials, 3 channels
    coef = torch.randn(2, 8, 3, generator=g, dtype=torch.float64)

    def field(p, k):  # p [..., 3] -> [..., 3]
        x, y, z = p[..., 0:1], p[..., 1:2], p[..., 2:3]
        mono = torch.cat([torch.ones_like(x), x, y, z, x * y, x * z, y * z, x * y * z], -1)
        return mono @ coef[k]

    lo, hi = torch.tensor([-1.0, -0.5, 0.0]), torch.tensor([1.0, 1.5, 0.8])
    D, H, W = 4, 6, 5
    zz, yy, xx = torch.meshgrid(*[torch.linspace(float(lo[i]), float(hi[i]), n, dtype=torch.float64)
                                  for i, n in ((2, D), (1, H), (0, W))], indexing="ij")
    nodes = torch.stack([xx, yy, zz], -1)
    grid = BakedGrid(torch.stack([field(nodes, 0), field(nodes, 1)]), lo, hi)
    p = torch.rand(400, 3, generator=g, dtype=torch.float64) * 3 - 1.5  # about half outside the box
    slot = torch.arange(400) % 2
    val, jac = grid(p.t().contiguous(), slot)
    truth = torch.stack([field(p[i], int(slot[i])) for i in range(400)])
    assert torch.allclose(val.t(), truth, atol=1e-10)
    for k in range(2):
        # [5, 3, 5, 3]
        Jt = torch.autograd.functional.jacobian(lambda q: field(q, k), p[slot == k][:5])
        Jt = torch.stack([Jt[i, :, i] for i in range(5)])
        assert torch.allclose(jac.permute(2, 0, 1)[slot == k][:5], Jt, atol=1e-10)


# ---------------------------------------------------------------------------------- bake
def test_bake_samples_forward_deform_on_the_lattice(net):
    xd, cond, fl = make_problem(N=9)
    fd = FastForwardDeformer(
        net, grid_res=(5, 6, 7), bbox_min=(-0.9, -1.0, -0.8), bbox_max=(1.0, 0.9, 0.7), upsample=3
    )
    with torch.no_grad():
        grid = fd.bake(cond["shape"], fd._checked_flame(fl, 4, xd))
        lo, hi = fd.bbox_min, fd.bbox_max
        axes = [torch.linspace(float(lo[i]), float(hi[i]), n) for i, n in ((2, 5), (1, 6), (0, 7))]
        zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
        nodes = torch.stack([xx, yy, zz], -1).reshape(1, -1, 3).expand(4, -1, -1)
        truth = fd.forward_deform(nodes.contiguous(), cond, fl)               # [4, 210, 3]
    assert fd.lookup_res == (13, 16, 19)
    lattice = grid.flat.reshape(3, 4, 13, 16, 19)[:, :, ::3, ::3, ::3]       # the network's nodes
    assert torch.allclose(lattice.permute(1, 2, 3, 4, 0).reshape(4, -1, 3), truth, atol=1e-5)
    # between the nodes the spline-refined lattice follows the network better than trilinear
    # interpolation of the network's lattice itself
    p = torch.rand(4, 200, 3, generator=torch.Generator().manual_seed(2)) * (hi - lo) + lo
    slot = torch.arange(4).repeat_interleave(200)
    errs = []
    for up in (3, 1):
        f12 = FastForwardDeformer(net, grid_res=(12, 12, 12), bbox_min=tuple(lo.tolist()),
                                  bbox_max=tuple(hi.tolist()), upsample=up)
        with torch.no_grad():
            g12 = f12.bake(cond["shape"], f12._checked_flame(fl, 4, xd))
            exact = f12.forward_deform(p, cond, fl).reshape(-1, 3)
        err = (g12(p.reshape(-1, 3).t().contiguous(), slot)[0].t() - exact).norm(dim=-1)
        errs.append(err.median())
    assert errs[0] < 0.5 * errs[1] and errs[0] < 1e-3


# ---------------------------------------------------------------------------------- fast vs exact
@pytest.mark.parametrize("eval_mode", [False, True])
def test_fast_matches_exact_on_four_named_poses(net, eval_mode):
    xd, cond, fl = make_problem(N=300)
    exact, fast = ForwardDeformer(net), FastForwardDeformer(net)
    with torch.no_grad():
        xe, ve = exact(xd, cond, fl, eval_mode=eval_mode)
        xf, vf, info = fast(xd, cond, fl, eval_mode=eval_mode, return_info=True)
    assert xf.shape == (4, 300, 5, 3) and vf.shape == (4, 300, 5)
    assert_agree(xe, ve, xf, vf)
    assert torch.equal(ve.any(-1), vf.any(-1))
    # validity means the same as in the exact search: the networks' residual is below cvg_thresh
    assert (residual(exact, xf, xd, cond, fl)[vf] < 1.2e-5).all()
    assert (info["diff"][vf] < 1e-5).all()
    # inits of one point that found the same root were polished once
    assert info["n_solved"] == 4 * 300 * 5 and info["n_polished"] < 0.5 * info["n_solved"]
    # each item used its own betas and pose: swapping two items' conditioning changes the roots
    swap = [1, 0, 2, 3]
    with torch.no_grad():
        xs, vs = fast(xd, {k: v[swap] for k, v in cond.items()}, fl.index(torch.tensor(swap)))
    both = vs[:2] & vf[:2]
    assert (xs[:2] - xf[:2]).norm(dim=-1)[both].median() > 1e-2


def test_gradients_match_exact_float64(net):
    """Implicit-differentiation gradients (LBS parameters and x_d) of fast and exact
    correspondences."""
    net64 = copy.deepcopy(net).double()
    xd, cond, fl = make_problem(N=12, dtype=torch.float64)
    kw = dict(cvg_thresh=1e-11, max_steps=60)
    runs = []
    for d in (ForwardDeformer(net64, **kw), FastForwardDeformer(net64, exact_steps=3, **kw)):
        x = xd.clone().requires_grad_(True)
        runs.append((x,) + tuple(d(x, cond, fl, return_info=True)))
    (x_e, xe, ve, _), (x_f, xf, vf, info) = runs
    both = ve & vf
    assert info["n_polished"] > 0 and both.float().mean() > 0.95
    assert (xe - xf).norm(dim=-1)[both].max() < 1e-9
    w = torch.randn(xe.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    params = [p for p in all_params(net64) if p.requires_grad]
    out = [torch.autograd.grad((torch.where(both[..., None], xc, torch.zeros_like(xc)) * w).sum(),
                               params + [x], allow_unused=True)
           for x, xc in ((x_e, xe), (x_f, xf))]
    n_checked = 0
    for ge, gf in zip(*out):
        assert (ge is None) == (gf is None)
        if ge is not None:
            torch.testing.assert_close(gf, ge, rtol=1e-5, atol=1e-8 * float(ge.abs().max()))
            n_checked += 1
    # weights, biases (both networks) and x_d all receive gradients
    assert n_checked >= 16 and out[0][-1].abs().max() > 0
    assert all(g.abs().max() > 0 for g in out[0][-len(list(net64.disp_net.parameters())) - 1:-1])


def test_gradients_match_exact_float32_default_settings(net):
    xd, cond, fl = make_problem(N=100)
    res = []
    for d in (ForwardDeformer(net), FastForwardDeformer(net)):
        xc, valid = d(xd, cond, fl)
        res.append((xc, valid))
    both = res[0][1] & res[1][1]
    grads = []
    for xc, _ in res:
        for p in all_params(net):
            p.grad = None
        (torch.where(both[..., None], xc, torch.zeros_like(xc)) ** 2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in all_params(net) if p.grad is not None]))
    for p in all_params(net):
        p.grad = None
    # correspondences differ by up to ~2e-5 (two searches stopping below 1e-5); measured ~1e-5
    # relative
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-3 * float(grads[0].abs().max()))
    assert (grads[1] - grads[0]).norm() < 1e-3 * grads[0].norm()


# ----------------------------------------------------------------------------- failures, box, masks
def test_polish_failures_are_invalid_or_solved_by_the_fallback(net):
    xd, cond, fl = make_problem(N=200)
    exact = ForwardDeformer(net)
    coarse = dict(grid_res=(3, 3, 3), upsample=1, exact_steps=1)
    with torch.no_grad():
        xe, ve = exact(xd, cond, fl)
        fast_n = FastForwardDeformer(net, fallback=False, **coarse)
        fast_f = FastForwardDeformer(net, fallback=True, **coarse)
        xn, vn, info_n = fast_n(xd, cond, fl, return_info=True)
        xf, vf, info_f = fast_f(xd, cond, fl, return_info=True)
    # a 3^3 lattice is far too coarse for one polishing step: many inits stay unconverged and
    # are invalid
    assert vn.float().mean() < ve.float().mean() - 0.05
    assert info_n["n_fallback"] == info_n["n_further"] == 0
    assert (residual(exact, xn, xd, cond, fl)[vn] < 1.2e-5).all()
    diff_n = info_n["diff"][~vn]
    assert torch.isinf(diff_n).sum() + (diff_n >= 1e-5).sum() == (~vn).sum()
    # with the fallback they are polished further: same answers as the exact mode
    assert info_f["n_further"] > 0
    assert_agree(xe, ve, xf, vf)
    assert (residual(exact, xf, xd, cond, fl)[vf] < 1.2e-5).all()


class NoSharedInits(FastForwardDeformer):
    """Every init bone searched on the grid, even where its rigid map equals another's."""

    def _same_inits(self, fl, tol=1e-6):
        B, I = fl.tfs.shape[0], self.n_init
        return torch.arange(I).expand(B, I)


class GridFailsOnOddPoints(NoSharedInits):
    """The grid search 'fails' (no root) for every init of the odd points."""

    def _grid_newton(self, grid, x0, slot, target):
        x, r, steps = super()._grid_newton(grid, x0, slot, target)
        odd = (torch.arange(r.numel()) // self.n_init) % 2 == 1
        return torch.where(odd, float("nan"), x), torch.where(odd, float("inf"), r), steps


def test_points_without_a_grid_root_get_the_exact_search(net):
    xd, cond, fl = make_problem(N=60)
    exact = ForwardDeformer(net)
    with torch.no_grad():
        xe, ve = exact(xd, cond, fl)
        xn, vn, info_n = GridFailsOnOddPoints(net, fallback=False)(xd, cond, fl, return_info=True)
        xf, vf, info_f = GridFailsOnOddPoints(net)(xd, cond, fl, return_info=True)
    odd = torch.arange(4 * 60).reshape(4, 60) % 2 == 1
    assert not vn[odd].any() and vn[~odd].any(-1).all() and info_n["n_fallback"] == 0
    assert info_f["n_fallback"] == odd.sum() * 5 and torch.equal(vf.any(-1), ve.any(-1))
    assert_agree(xe, ve, xf, vf)
    assert (residual(exact, xf, xd, cond, fl)[vf] < 1.2e-5).all()


def test_roots_outside_the_grid_box(net):
    """Canonical roots outside a small box: the boundary cells are extrapolated, the networks
    decide."""
    xd, cond, fl = make_problem(N=200)
    box = dict(bbox_min=(-0.4, -0.4, -0.4), bbox_max=(0.4, 0.4, 0.4))
    exact = ForwardDeformer(net)
    with torch.no_grad():
        xe, ve = exact(xd, cond, fl)
        outside = (xe.abs() > 0.4).any(-1) & ve
        assert outside.float().mean() > 0.3
        xn, vn = FastForwardDeformer(net, fallback=False, **box)(xd, cond, fl)
        xf, vf = FastForwardDeformer(net, **box)(xd, cond, fl)
    assert (residual(exact, xn, xd, cond, fl)[vn] < 1.2e-5).all()
    # most are found from the extrapolated grid alone
    assert (vn & outside).sum() > 0.5 * outside.sum()
    assert_agree(xe, ve, xf, vf)


def test_point_mask_chunking_and_skipped_occupancy(net):
    xd, cond, fl = make_problem(N=120)
    mask = torch.rand(4, 120, generator=torch.Generator().manual_seed(4)) < 0.6
    fast = FastForwardDeformer(net)
    with torch.no_grad():
        xf, vf = fast(xd, cond, fl, point_mask=mask)
        assert not vf[~mask].any() and vf[mask].any(-1).float().mean() > 0.99
        fast.chunk_size = 77  # chunks straddle batch items; the bake is chunked too
        xc, vc = fast(xd, cond, fl, point_mask=mask)
        assert torch.equal(vc, vf) and torch.allclose(xc[vf], xf[vf], atol=1e-6)
        only_item_2 = torch.zeros_like(mask)
        only_item_2[2] = True
        x2, v2 = fast(xd, cond, fl, point_mask=only_item_2)  # bakes item 2 only
        x1, v1 = fast(xd[2:3], {k: v[2:3] for k, v in cond.items()}, fl.index(2))
        assert not v2[[0, 1, 3]].any() and torch.equal(v2[2], v1[0])
        assert torch.allclose(x2[2][v2[2]], x1[0][v1[0]], atol=1e-6)
        sphere = lambda x, c: 10.0 * (0.5 - x.norm(dim=-1, keepdim=True))  # noqa: E731
        occ_e = ForwardDeformer(net).query_occupancy(xd, cond, fl, sphere)
        occ_f = FastForwardDeformer(net).query_occupancy(xd, cond, fl, sphere)
    found = occ_e > SKIPPED_LOGIT
    assert torch.equal(found, occ_f > SKIPPED_LOGIT)
    assert (occ_e - occ_f)[found].abs().max() < 1e-3


def test_deduplicated_correction_equals_the_parent_one(net):
    """Merged inits share one correction: same values and gradients as the row-by-row one."""
    xd, cond, fl = make_problem(N=40)
    fast = FastForwardDeformer(net)
    with torch.no_grad():
        xc, valid = fast.search(xd, cond, fl)
    B, N, I = valid.shape
    v = valid.reshape(-1).nonzero().squeeze(1)
    assert v.numel() > xc.reshape(-1, 3)[v].unique(dim=0).shape[0]  # there are duplicates
    out = []
    for fn in (ForwardDeformer._implicit_correction, FastForwardDeformer._implicit_correction):
        for p in all_params(net):
            p.grad = None
        x = xd.clone().requires_grad_(True)
        s = fast._checked_flame(fl, B, x)
        corr = fn(fast, xc.reshape(-1, 3)[v], v // (N * I), x.reshape(-1, 3)[v // I],
                  cond["shape"], s)
        (corr * torch.linspace(-1, 1, corr.numel()).reshape(corr.shape)).sum().backward()
        out.append((corr.detach(), x.grad, [p.grad for p in all_params(net) if p.grad is not None]))
    for p in all_params(net):
        p.grad = None
    (c0, gx0, gp0), (c1, gx1, gp1) = out
    assert torch.equal(c0, c1)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp0, gp1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_state_dict_and_argument_errors(net):
    exact, fast = ForwardDeformer(net), FastForwardDeformer(net)
    assert exact.state_dict().keys() == fast.state_dict().keys()  # checkpoints load in either mode
    fast.load_state_dict(exact.state_dict())
    for kw in (dict(grid_res=(16, 16)), dict(grid_res=(1, 16, 16)),
               dict(bbox_min=(0, 0, 0), bbox_max=(1, 1, 0)), dict(upsample=0),
               dict(exact_steps=0)):
        with pytest.raises(ValueError, match="fast_deformer.py"):
            FastForwardDeformer(net, **kw)
    xd, cond, fl = make_problem(N=5)
    with pytest.raises(ValueError, match="xd must be"):
        fast.search(xd[0], cond, fl)
    with pytest.raises(ValueError, match="point_mask"):
        fast.search(xd, cond, fl, point_mask=torch.ones(4, 3, dtype=torch.bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(net):
    xd, cond, fl = make_problem(N=200)
    fast = FastForwardDeformer(net)
    with torch.no_grad():
        xc, valid = fast(xd, cond, fl, eval_mode=True)
    dev = torch.device("cuda")
    fg = copy.deepcopy(fast).to(dev)
    with torch.no_grad():
        xg, vg = fg(xd.to(dev), {k: v.to(dev) for k, v in cond.items()}, fl.to(dev),
                    eval_mode=True)
    assert_agree(xc, valid, xg.cpu(), vg.cpu())


def _perturbed(fields, std):
    """fields (NeutralLBS) with N(0, std^2) added to every parameter of both networks
    (blendshape head and displacement output included), in place."""
    with torch.no_grad():
        for p in all_params(fields):
            p.add_(torch.randn_like(p) * std)
    return fields


def _float64_points(n, seed):
    """A float64 problem (make_problem with n points per item) and n random canonical points per
    item, flattened: xd, cond, fl, x [B * n, 3] in [-1, 1]^3, bidx [B * n]."""
    xd, cond, fl = make_problem(N=n, dtype=torch.float64)
    B = xd.shape[0]
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B * n, 3, generator=g, dtype=torch.float64) * 2 - 1
    return xd, cond, fl, x, torch.randint(0, B, (B * n,), generator=g)


@pytest.mark.parametrize("variant", ["default", "encoded_skip"])
def test_folded_lbs_equals_the_plain_network_float64(net, variant):
    """FoldedLBS (weights read once, the betas part of the displacement network and the
    blendshape head folded per item) gives the plain fields' weights and blendshape offset, and
    skin_offset the plain forward deformation."""
    from lib.flame.lbs import deform_canonical, skin_offset

    if variant == "default":
        fields = copy.deepcopy(net).double()
    else:  # positional encodings, skip layers and the betas at two layers of the displacement
        torch.manual_seed(3)
        disp = ImplicitNetwork(d_in=3, d_out=3, width=48, depth=3, skip_layer=2, multires=2,
                               cond_dim=100, cond_layers=(0, 2))
        fields = _perturbed(NeutralLBS(LBSNetwork(multires=4, skip_layer=2), disp).double(), 0.05)
    xd, cond, fl, x, bidx = _float64_points(60, seed=5)
    with torch.no_grad():
        w_ref, pd, ed = fields(x[:, None], cond["shape"][bidx])
        fold = fields.folded(cond["shape"], fl.pose_feature - fl.pose_feature_c, fl.exp - fl.exp_c)
        w, offset = fold(x, bidx)
        off_ref = ((ed[:, 0] * (fl.exp - fl.exp_c)[bidx][:, None, :]).sum(-1)
                   + (pd[:, 0] * (fl.pose_feature - fl.pose_feature_c)[bidx][:, :, None]).sum(-2))
        xd_ref = deform_canonical(x, w_ref[:, 0], ed[:, 0], pd[:, 0], fl.exp[bidx],
                                  fl.pose_feature[bidx], fl.tfs[bidx], fl.exp_c[bidx],
                                  fl.pose_feature_c[bidx], fl.tfs_c[bidx])
        xd_fold = skin_offset(x, w, offset, fl.tfs[bidx], fl.tfs_c[bidx])
    assert off_ref.abs().max() > 1e-3  # the blendshapes matter here
    dx = fields.disp_net(x[:, None], cond["shape"][bidx])
    assert dx.norm(dim=-1).mean() > 3e-3  # and so does the warp
    torch.testing.assert_close(w, w_ref[:, 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(offset, off_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(xd_fold, xd_ref, rtol=0, atol=1e-12)


def test_folded_deformation_keeps_the_plain_gradients_float64(net):
    """Built with grad enabled, the folded network + FoldedSkinning (the implicit correction's
    path) give the plain forward deformation's values and its gradients with respect to the
    networks' parameters, betas, the joint transforms, the expression and x."""
    fields = _perturbed(copy.deepcopy(net).double(), 0.02)
    xd, cond, fl, x0, bidx = _float64_points(40, seed=6)
    B = xd.shape[0]
    weight = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def grads(folded):
        d = FastForwardDeformer(fields, folded=folded)
        betas = cond["shape"].clone().requires_grad_(True)
        checked = d._checked_flame(fl, B, xd)
        flg = replace(checked, tfs=checked.tfs.clone().requires_grad_(True),
                      tfs_c=checked.tfs_c.clone().requires_grad_(True),
                      exp=checked.exp.clone().requires_grad_(True))
        x = x0.clone().requires_grad_(True)
        out = d.folded_deform(betas, flg)(x, bidx)
        leaves = [x, betas, flg.tfs, flg.tfs_c, flg.exp] + all_params(fields)
        return out.detach(), torch.autograd.grad((out * weight).sum(), leaves, allow_unused=True)

    val_p, grad_p = grads(False)
    val_f, grad_f = grads(True)
    torch.testing.assert_close(val_f, val_p, rtol=0, atol=1e-12)
    n_nonzero = 0
    for gp, gf in zip(grad_p, grad_f):
        if gp is None:  # e.g. parameters of no output here
            assert gf is None or gf.abs().max() == 0
            continue
        torch.testing.assert_close(gf, gp, rtol=1e-9, atol=1e-11)
        n_nonzero += int(gp.abs().max() > 0)
    # x, betas, transforms, expression and both networks' layers get gradients
    assert n_nonzero >= 20


def test_folded_skinning_matches_deform_canonical_values_and_gradients():
    """FoldedSkinning (blended rows from one product, Cramer's rule) fed the blendshape offset
    against the one plain forward skinning, lib/flame/lbs.deform_canonical, in float64: values,
    and gradients with respect to x, w, both transforms and the blendshape inputs, including a
    point whose canonical blend is singular (inverse taken as 0)."""
    from lib.flame.lbs import deform_canonical
    from lib.model.folded_lbs import FoldedSkinning

    g = torch.Generator().manual_seed(2)
    f64 = torch.float64
    B, J, A, X, Q = 3, 5, 50, 4, 6
    R = rodrigues(torch.randn(B, J, 3, generator=g, dtype=f64) * 0.5)
    tfs = torch.eye(4, dtype=f64).repeat(B, J, 1, 1)
    tfs[..., :3, :3], tfs[..., :3, 3] = R, torch.randn(B, J, 3, generator=g, dtype=f64)
    tfs_c = tfs.flip(1).clone()
    tfs_c[0, 0, :3, :3] = torch.zeros(3, 3, dtype=f64)  # item 0, bone 0: singular
    x = torch.randn(A, 3, generator=g, dtype=f64)
    w = torch.softmax(torch.randn(A, J, generator=g, dtype=f64), -1)
    w[0] = torch.tensor([1.0, 0, 0, 0, 0], dtype=f64)
    ed = torch.randn(A, 3, X, generator=g, dtype=f64) * 0.1
    pd = torch.randn(A, Q, 3, generator=g, dtype=f64) * 0.1
    exp, exp_c = torch.randn(2, B, X, generator=g, dtype=f64)
    pf, pf_c = torch.randn(2, B, Q, generator=g, dtype=f64)
    bidx = torch.randint(0, B, (A,), generator=g)
    bidx[0] = 0
    weight = torch.randn(A, 3, generator=g, dtype=f64)

    def run(folded):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, tfs, tfs_c, ed, pd, exp, pf)]
        xl, wl, tl, tcl, el, pl, exl, pfl = leaves
        if folded:
            offset = torch.einsum("ack,ak->ac", el, (exl - exp_c)[bidx]) \
                + torch.einsum("aqc,aq->ac", pl, (pfl - pf_c)[bidx])
            out = FoldedSkinning(tl, tcl)(xl, wl, offset, bidx)
        else:
            out = deform_canonical(
                xl, wl, el, pl, exl[bidx], pfl[bidx], tl[bidx], exp_c[bidx], pf_c[bidx], tcl[bidx]
            )
        return out.detach(), torch.autograd.grad((out * weight).sum(), leaves)

    ref, grad_ref = run(False)
    out, grad_out = run(True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for gf, gr in zip(grad_out, grad_ref):
        assert gr.abs().max() > 0
        torch.testing.assert_close(gf, gr, rtol=1e-10, atol=1e-11)
    # the singular point: x_r = offset (inverse 0), then the target blend
    off0 = ed[0] @ (exp - exp_c)[0] + pd[0].T @ (pf - pf_c)[0]
    torch.testing.assert_close(out[0], tfs[0, 0, :3, :3] @ off0 + tfs[0, 0, :3, 3], rtol=0,
                               atol=1e-12)


def test_folded_search_equals_the_plain_search(net):
    xd, cond, fl = make_problem(N=200)
    plain = FastForwardDeformer(net, folded=False)
    fast = FastForwardDeformer(net)
    xp, vp = plain.search(xd, cond, fl)
    xf, vf = fast.search(xd, cond, fl)
    assert (vp != vf).float().mean() < 0.002
    assert (xp - xf).norm(dim=-1)[vp & vf].max() < 1e-5


def test_inits_with_equal_rigid_maps_are_searched_once(net):
    xd, cond, fl = make_problem(N=200)
    rep = FastForwardDeformer(net)._same_inits(fl)
    # items 0-2 keep their eyes at rest: eye inits (3, 4) start where the neck's (1) does; item 0
    # does not turn the neck either, so the neck's start is the root's; item 3 moves every joint
    assert rep.tolist() == [[0, 0, 2, 0, 0], [0, 1, 2, 1, 1], [0, 1, 2, 1, 1], [0, 1, 2, 3, 4]]
    with torch.no_grad():
        xs, vs, info = FastForwardDeformer(net).search(xd, cond, fl, return_info=True)
        xa, va = NoSharedInits(net).search(xd, cond, fl)
    assert (vs != va).float().mean() < 0.002
    assert (xs - xa).norm(dim=-1)[vs & va].max() < 1e-5


def test_occupancy_once_per_distinct_root_same_values_and_gradients(net):
    """The fast deformer's occupancy_of_valid evaluates one init per distinct root: the logits
    and the gradients (occupancy network, LBS and displacement networks) equal
    ForwardDeformer's evaluation of every valid init on the same correspondences."""
    torch.manual_seed(4)
    occ_net = nn.Sequential(nn.Linear(3, 32), nn.Softplus(beta=10), nn.Linear(32, 1)).double()
    net = copy.deepcopy(net).double()
    xd, cond, fl = make_problem(N=150, dtype=torch.float64)
    fast = FastForwardDeformer(net)
    xc, valid = fast(xd, cond, fl)  # with the implicit-differentiation graph
    rep = fast.repeated_roots(xc, valid)
    assert rep.any() and not (rep & ~valid).any()
    calls = []

    def occ_fn(x, c):
        calls.append(x.shape[1])
        return occ_net(x)

    params = list(occ_net.parameters()) + all_params(net)
    out = {}
    for name, fn in (("all", ForwardDeformer.occupancy_of_valid),
                     ("distinct", FastForwardDeformer.occupancy_of_valid)):
        occ = fn(fast, xc, valid, cond, occ_fn)
        weight = torch.linspace(-1, 1, occ.numel(), dtype=occ.dtype).view_as(occ)
        grads = torch.autograd.grad((occ * weight).sum(), params,
                                    retain_graph=True, allow_unused=True)
        out[name] = (occ.detach(), grads)
    assert calls[1] < calls[0]  # fewer points evaluated
    torch.testing.assert_close(out["distinct"][0], out["all"][0], rtol=0, atol=0)
    for ga, gd in zip(out["all"][1], out["distinct"][1]):
        if ga is not None:
            torch.testing.assert_close(gd, ga, rtol=1e-9, atol=1e-12)

"""Fast correspondence search: the deformation baked into a grid, finished through the networks.

Shape legend:
    B batch items (also the items of one bake: those with points to search), N points,
    I initializations (5), J joints (5), S betas width, Gz/Gy/Gx network lattice along z/y/x
    (grid_res), Gz'/Gy'/Gx' refined lookup lattice, A entries flattened across the batch, each
    with a batch index (inits, the inits polished through the networks, points of a chunk).

Same problem as lib/model/deformer.py (find x_c with forward_deform(x_c) = x_d from I rigid
initializations), solved in stages (Fast-SNARF's idea, in plain torch):

1. Bake. For one batch item (its betas, pose and expression) the deformed position of a
   canonical point, F(x_c) = forward_deform(x_c), depends only on the skinning weights (J) and
   the pose/expression offset (3) there. The LBS fields (displacement network, then the LBS
   network at the shape-neutral point) are evaluated once per item on a
   Gz x Gy x Gx lattice over [bbox_min, bbox_max] and F itself is stored: 3 channels that already
   combine the J + 3 field values with the item's joint transforms, so a search step needs no
   skinning algebra.
2. Refine. A not-a-knot cubic spline along each axis resamples the lattice to (n-1)*upsample+1
   nodes (interpolation error of order h^4 of the network lattice, at the price of trilinear
   lookups).
3. Grid search. Damped Newton on the trilinear interpolant (analytic Jacobian) from the rigid
   inits, with the exact search's convergence and divergence thresholds. Outside the box the
   boundary cell's trilinear polynomial is extrapolated (the deformation is smooth there).
   Bones whose rigid maps coincide for an item (the eyes and the neck when neither turns) give
   identical inits: each such init is searched once and its root copied.
4. Merge. Inits of one point whose grid roots lie within merge_tol are one root: it is
   polished once and shared.
5. Polish. Chord-Newton steps through the networks (exact residuals) from each grid root:
   x <- x - G^-1 (F(x) - x_d) with G the interpolant's Jacobian at the grid root, at most
   exact_steps steps. An init is valid only if the networks' residual is below cvg_thresh, as
   in the exact search.
6. Fallback (fallback=True). Roots not converged after the polish are polished further by
   Broyden (lib/model/broyden.py; up to max_steps in all); points left without any valid init
   get the exact search from their rigid inits. Other inits without a converged root are
   invalid (their point has a root already, almost always the same one; the exact search's
   small tail of steps is spared). With fallback=False nothing is polished further or
   searched exactly.

forward, the implicit correction (gradients by implicit differentiation through the networks),
query_occupancy and to_neutral are ForwardDeformer's; the correction and occupancy_of_valid
are evaluated once per distinct root (merged and coincident inits share theirs bit for bit),
with identical values and gradients. The extra constructor arguments add no state_dict keys:
checkpoints load in either mode.

The bake and the polish (no gradients) evaluate the fields folded for the search
(lib/model/folded_lbs.py: weights read once, the betas' part of the displacement network's
first layer and the blendshape head folded per item, same values to rounding) and the
skinning as one product for all items; the implicit correction uses the same folding built
with its graph, so gradients reach both networks' parameters, betas and the FLAME inputs as
through the plain networks (tested against them in float64).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.interpolate import CubicSpline

from lib.flame.frames import FlameFrames
from lib.model.deformer import ForwardDeformer, adjugate3, inv3
from lib.model.folded_lbs import FoldedSkinning
from lib.utils.errors import ModuleErrors

__all__ = ["FastForwardDeformer", "spline_matrix", "BakedGrid"]


_err = ModuleErrors(__name__)


def spline_matrix(n: int, n_fine: int) -> torch.Tensor:
    """Linear map from n equally spaced samples to n_fine equally spaced samples of their
    not-a-knot cubic spline over the same interval (end nodes shared; n = 2: a line, n = 3: a
    parabola). Returns [n_fine, n] float64."""
    if n < 2 or n_fine < 2:
        raise _err(f"spline_matrix needs n, n_fine >= 2, got {n}, {n_fine}")
    spline = CubicSpline(np.linspace(0.0, 1.0, n), np.eye(n), bc_type="not-a-knot")
    return torch.from_numpy(spline(np.linspace(0.0, 1.0, n_fine)))


def _unique_rows(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact duplicate rows: key [A, n_cols] -> first [A'] (index of one row per distinct row,
    A' <= A), inverse [A] (key[i] == key[first[inverse[i]]]). Lexicographic order by stable
    column sorts (torch.unique with dim=0 loops over rows on CPU)."""
    A = key.shape[0]
    order = torch.arange(A, device=key.device)
    for c in reversed(range(key.shape[1])):
        order = order[torch.sort(key[order, c], stable=True).indices]
    srt = key[order]
    new = torch.ones(A, dtype=torch.bool, device=key.device)
    new[1:] = (srt[1:] != srt[:-1]).any(dim=1)
    inverse = torch.empty(A, dtype=torch.long, device=key.device)
    inverse[order] = torch.cumsum(new.long(), 0) - 1
    return order[new], inverse


class BakedGrid:
    """Trilinear interpolant of deformed positions on a lattice, one lattice per baked item.

    values: [B, Gz', Gy', Gx', 3] (node (b, iz, iy, ix) at x = lo + (ix, iy, iz) * step), or
    with channels_first [3, B, Gz', Gy', Gx'] (stored as is, no transposing copy); lo, hi: [3]
    (x, y, z).
    Points are passed channels-first (structure of arrays, contiguous rows vectorize better):
    call with x [3, A] and slot [A] (which of the B lattices) -> value [3, A] and Jacobian
    [3, 3, A] (J[r, c, a] = dF_r / dx_c). Outside [lo, hi] the boundary cell is extrapolated.
    """

    def __init__(
        self, values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, channels_first: bool = False
    ):
        if channels_first:
            _, B, Gz, Gy, Gx = values.shape
            self.flat = values.contiguous().reshape(-1)  # [3 * B*Gz'*Gy'*Gx']
        else:
            B, Gz, Gy, Gx, _ = values.shape
            self.flat = values.reshape(-1, 3).t().contiguous().reshape(-1)
        if min(Gz, Gy, Gx) < 2:
            raise _err(f"a baked lattice needs >= 2 nodes per axis, got {(Gz, Gy, Gx)}")
        self.dims = (Gz, Gy, Gx)
        dev, dt = values.device, values.dtype
        # [3, 1] x, y, z
        self.n_cells = torch.tensor([Gx - 1, Gy - 1, Gz - 1], device=dev, dtype=dt)[:, None]
        self.lo = lo.to(device=dev, dtype=dt)[:, None]
        # cells per unit
        self.scale = self.n_cells / (hi.to(device=dev, dtype=dt)[:, None] - self.lo)
        # flat offsets of channel r and corner k (bit order dz, dy, dx): [3, 8, 1]
        corners = torch.tensor([(dz * Gy + dy) * Gx + dx for dz in (0, 1) for dy in (0, 1)
                                for dx in (0, 1)], device=dev)
        self.offsets = ((torch.arange(3, device=dev) * (B * Gz * Gy * Gx))[:, None, None]
                        + corners[None, :, None])

    def __call__(self, x: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        Gz, Gy, Gx = self.dims
        u = (x - self.lo) * self.scale                             # [3, A] in cells
        i0 = torch.minimum(torch.nan_to_num(u.floor(), nan=0.0).clamp_(min=0), self.n_cells - 1)
        t = u - i0                                                 # outside [0,1]: extrapolation
        il = i0.long()
        base = ((slot * Gz + il[2]) * Gy + il[1]) * Gx + il[0]     # [A]
        c = self.flat.take(self.offsets + base).view(3, 4, 2, -1)  # [3, x-edge, end, A]
        tx, ty, tz = t[0], t[1], t[2]
        ex = c[:, :, 1] - c[:, :, 0]                               # x-differences [3, 4, A]
        a = (c[:, :, 0] + tx * ex).view(3, 2, 2, -1)               # x-lerps, edge = (dz, dy)
        ex = ex.view(3, 2, 2, -1)
        ey = a[:, :, 1] - a[:, :, 0]                               # [3, 2, A]
        b = a[:, :, 0] + ty * ey                                   # y-lerps, by dz
        exy = ex[:, :, 0] + ty * (ex[:, :, 1] - ex[:, :, 0])
        ez = b[:, 1] - b[:, 0]
        val = b[:, 0] + tz * ez
        jx = exy[:, 0] + tz * (exy[:, 1] - exy[:, 0])
        jy = ey[:, 0] + tz * (ey[:, 1] - ey[:, 0])
        jac = torch.stack([jx * self.scale[0], jy * self.scale[1], ez * self.scale[2]], dim=1)
        return val, jac  # jac: [3, 3, A]


def _sqnorm(v: torch.Tensor) -> torch.Tensor:
    """Squared norm of channels-first vectors: v [3, A] -> [A] (faster than a reduction over
    dim 0)."""
    return v[0] * v[0] + v[1] * v[1] + v[2] * v[2]


def _solve3(jac: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channels-first 3x3 solves by Cramer's rule: jac [3, 3, A], r [3, A] ->
    (jac^-1 r [3, A], ok [A])."""
    adj, det, ok = adjugate3(jac)
    sol = ((adj[0] * r[0] + adj[1] * r[1] + adj[2] * r[2])
           / torch.where(ok, det, torch.ones_like(det)))
    return sol, ok


class FastForwardDeformer(ForwardDeformer):
    """ForwardDeformer whose search runs on a baked grid and is finished through the networks.

    Args (besides ForwardDeformer's: lbs_net, n_joints, max_steps, cvg_thresh, dvg_thresh,
    chunk_size, init_bones, skip_thresh, skip_stride):
        grid_res: (Gz, Gy, Gx) network lattice along (z, y, x); the LBS network is evaluated
            Gz*Gy*Gx times per batch item and search call (12^3 = 1728: 0.8 evaluations per point
            at 2250 points per item, enough for smooth skinning; sharper fields polish longer).
        bbox_min, bbox_max: (x, y, z) corners of the canonical box the lattice spans.
        exact_steps: chord-Newton steps through the networks from each grid root (the polish).
        upsample: cubic-spline refinement factor of the lookup lattice (1: trilinear on the
            network lattice itself).
        merge_tol: inits of one point whose grid roots are closer than this are polished once.
        grid_tol: grid roots with an interpolant residual above this are not polished.
        fallback: polish unconverged roots further and give points without any root the exact
            search from their rigid inits (module docstring, stage 6).
        folded: evaluate the networks in the bake and the polish through lbs_net.folded(...)
            (lib/model/folded_lbs.py: weights read once, betas and blendshape parts folded per
            item; same values to float rounding) when lbs_net has it; False: the plain path.
    """

    def __init__(
        self,
        lbs_net,
        n_joints: int = 5,
        max_steps: int = 50,
        cvg_thresh: float = 1e-5,
        dvg_thresh: float = 1.0,
        chunk_size: int = 20000,
        init_bones: Sequence[int] = (0, 1, 2, 3, 4),
        skip_thresh: float = 0.11,
        skip_stride: int = 10,
        grid_res: Sequence[int] = (12, 12, 12),
        bbox_min: Sequence[float] = (-1.0, -1.0, -1.0),
        bbox_max: Sequence[float] = (1.0, 1.0, 1.0),
        exact_steps: int = 2,
        upsample: int = 4,
        merge_tol: float = 1e-4,
        grid_tol: float = 1e-3,
        fallback: bool = True,
        folded: bool = True,
    ):
        super().__init__(lbs_net, n_joints=n_joints, max_steps=max_steps, cvg_thresh=cvg_thresh,
                         dvg_thresh=dvg_thresh, chunk_size=chunk_size, init_bones=init_bones,
                         skip_thresh=skip_thresh, skip_stride=skip_stride)
        res = tuple(int(r) for r in grid_res)
        if len(res) != 3 or min(res) < 2:
            raise _err(f"grid_res must be 3 sizes (Gz, Gy, Gx) >= 2, got {grid_res}")
        lo = torch.as_tensor(bbox_min, dtype=torch.float32).reshape(-1)
        hi = torch.as_tensor(bbox_max, dtype=torch.float32).reshape(-1)
        if lo.numel() != 3 or hi.numel() != 3 or not bool((hi > lo).all()):
            raise _err(f"bbox_min {tuple(bbox_min)} must be 3 values below bbox_max "
                       f"{tuple(bbox_max)}")
        if int(upsample) < 1 or int(exact_steps) < 1:
            raise _err(f"upsample and exact_steps must be >= 1, got {upsample}, {exact_steps}")
        self.grid_res, self.upsample, self.exact_steps = res, int(upsample), int(exact_steps)
        self.merge_tol, self.grid_tol = float(merge_tol), float(grid_tol)
        self.fallback = bool(fallback)
        self.folded = bool(folded)
        self.register_buffer("bbox_min", lo, persistent=False)
        self.register_buffer("bbox_max", hi, persistent=False)
        zz, yy, xx = torch.meshgrid(*[torch.linspace(0.0, 1.0, n, dtype=torch.float64)
                                      for n in res], indexing="ij")
        self.register_buffer("lattice_unit", torch.stack([xx, yy, zz], -1).reshape(-1, 3).float(),
                             persistent=False)
        for name, n in zip(("up_z", "up_y", "up_x"), res):
            self.register_buffer(name, spline_matrix(n, (n - 1) * self.upsample + 1).float(),
                                 persistent=False)

    @property
    def lookup_res(self) -> tuple[int, int, int]:
        """(Gz', Gy', Gx') of the refined lattice."""
        return tuple((n - 1) * self.upsample + 1 for n in self.grid_res)

    # ------------------------------------------------------------------ bake
    def folded_deform(self, betas: torch.Tensor, fl: FlameFrames):
        """The forward deformation of B items: betas [B, S], fl (_checked_flame's, leading dim B) ->
        callable (x [A, 3], slot [A] in 0..B-1) -> x_d [A, 3]. Folded (lib/model/folded_lbs.py)
        when enabled and lbs_net supports it, else the plain networks. Called under no_grad it
        holds no graph (the search); with grad enabled gradients flow as through the plain path
        (the implicit correction)."""
        make = getattr(self.lbs_net, "folded", None) if self.folded else None
        fold = None if make is None else make(betas, fl.pose_feature - fl.pose_feature_c,
                                              fl.exp - fl.exp_c)
        if fold is None:
            return lambda x, slot: self._deform_flat(x, slot, betas, fl)

        skin = FoldedSkinning(fl.tfs, fl.tfs_c)

        def deform(x, slot):
            w, offset = fold(x, slot)
            return skin(x, w, offset, slot)
        return deform

    def bake(self, betas: torch.Tensor, fl: FlameFrames, deform=None) -> BakedGrid:
        """Deformed positions of the lattice for B items: betas [B, S], fl (_checked_flame's,
        leading dim B); deform: folded_deform(betas, fl) when the caller has it already.

        The network sees about chunk_size * I lattice points per call.
        Returns the refined BakedGrid over [bbox_min, bbox_max]."""
        B, dt = betas.shape[0], fl.tfs.dtype
        deform = self.folded_deform(betas, fl) if deform is None else deform
        lo, hi = self.bbox_min.to(dt), self.bbox_max.to(dt)
        pts = lo + self.lattice_unit.to(dt) * (hi - lo)                       # [Gz*Gy*Gx, 3]
        g = max(1, (self.chunk_size * self.n_init) // max(B, 1))
        slots = torch.arange(B, device=betas.device)
        vals = []
        for s in range(0, pts.shape[0], g):
            chunk = pts[s:s + g]
            x = chunk.expand(B, -1, -1).reshape(-1, 3)
            vals.append(deform(x, slots.repeat_interleave(chunk.shape[0])).reshape(B, -1, 3))
        # [3, B, Gz, Gy, Gx]
        F = torch.cat(vals, dim=1).permute(2, 0, 1).reshape(3, B, *self.grid_res)
        if self.upsample > 1:  # channels-first throughout: the lookups want [3, ...] rows
            F = torch.einsum("ad,ckdhw->ckahw", self.up_z.to(dt), F)
            F = torch.einsum("bh,ckahw->ckabw", self.up_y.to(dt), F)
            F = torch.einsum("ew,ckabw->ckabe", self.up_x.to(dt), F)
        return BakedGrid(F, lo, hi, channels_first=True)

    # ------------------------------------------------------------------ grid search
    def _grid_newton(
        self, grid: BakedGrid, x0: torch.Tensor, slot: torch.Tensor, target: torch.Tensor
    ):
        """Damped Newton on grid(x) = target, channels-first: x0 [3, A], slot [A], target [3, A].

        Returns the best iterate [3, A], its interpolant residual norm [A] and the iterations run.
        A step that does not lower the residual is halved (up to 4 times, lookups are cheap) before
        the init is given up; otherwise the rules of lib/model/broyden.py: stop below cvg_thresh,
        drop when the residual exceeds dvg_thresh or is not finite. The iterate with the smallest
        residual is kept. Works on compacted arrays of the still active inits."""
        A = x0.shape[1]
        out_x, out_r = x0.clone(), torch.full((A,), float("inf"), dtype=x0.dtype, device=x0.device)
        idx, x, sl, tg = torch.arange(A, device=x0.device), x0, slot, target
        bx, br = x0, out_r.clone()                         # best so far = last accepted iterate
        step, lam = torch.zeros_like(x0), torch.ones_like(out_r)  # last Newton step, its fraction
        steps = 0
        for it in range(self.max_steps + 1):
            val, jac = grid(x, sl)
            r = val - tg
            rn = _sqnorm(r).sqrt()
            better = rn < br  # False for NaN
            retry = ~better & (lam > 0.07)  # halve the step
            br = torch.where(better, rn, br)
            bx = torch.where(better, x, bx)
            if it == self.max_steps:
                go = torch.zeros_like(better)
            else:
                dx, ok = _solve3(jac, r)
                cont = ok if it == 0 else retry | (better & ok & (rn <= self.dvg_thresh))
                go = cont & (br >= self.cvg_thresh)
            if not bool(go.all()):
                stop = ~go
                out_x[:, idx[stop]], out_r[idx[stop]] = bx[:, stop], br[stop]
                if not bool(go.any()):
                    break
                idx, sl, br, lam, retry = idx[go], sl[go], br[go], lam[go], retry[go]
                x, tg, bx, dx, step = x[:, go], tg[:, go], bx[:, go], dx[:, go], step[:, go]
            lam = torch.where(retry, lam * 0.5, torch.ones_like(lam))
            step = torch.where(retry, step, dx)
            x = bx - lam * step
            steps += 1
        return out_x, out_r, steps

    @staticmethod
    def _merge(xg: torch.Tensor, ok: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Group the inits of each point by grid root: xg [A, I, 3], ok [A, I] bool.

        Init i follows the first leader j < i whose root is within tol; an ok init that follows
        no one leads. Returns leader [A, I] bool (inits to polish) and rep [A, I] long (the leader
        standing for each init: itself for leaders and for inits that are not ok)."""
        A, I, _ = xg.shape
        leader = ok.clone()
        rep = torch.arange(I, device=xg.device).repeat(A, 1)
        for i in range(1, I):
            free = ok[:, i].clone()
            for j in range(i):
                m = free & leader[:, j] & ((xg[:, i] - xg[:, j]).norm(dim=-1) < tol)
                rep[:, i] = torch.where(m, j, rep[:, i])
                free &= ~m
            leader[:, i] = free
        return leader, rep

    # ------------------------------------------------------------------ implicit differentiation
    def _implicit_correction(self, xc_star, bidx, target, betas, fl: FlameFrames) -> torch.Tensor:
        """ForwardDeformer's correction, x_c = x_c* - J^-1 (r(x_c*) - r(x_c*).detach()) with
        r = forward_deform - x_d, evaluated once per distinct (batch item, x_c*) row.

        Merged inits share their root exactly, so their network term is computed once and
        gathered; the x_d term (r is linear in x_d) stays per row. Values and gradients equal the
        parent's. xc_star [A, 3], bidx [A], target [A, 3] (may carry a graph) -> [A, 3]."""
        first, inverse = _unique_rows(torch.cat([bidx[:, None].to(xc_star.dtype),
                                                 xc_star.detach()], dim=1))
        with torch.enable_grad():
            x = xc_star.detach()[first].requires_grad_(True)                         # [A', 3]
            f = self.folded_deform(betas, fl)(x, bidx[first])  # folded with its graph (folded_lbs)
            J = self._jacobian(f, x, keep_graph=True)
        J_inv, _ = inv3(J.detach())  # zero (no gradient) where singular
        d_net = (J_inv @ (f - f.detach())[..., None])[..., 0]                         # [A', 3]
        d_tgt = (J_inv[inverse] @ (target - target.detach())[..., None])[..., 0]       # [A, 3]
        return xc_star.detach() - d_net[inverse] + d_tgt

    # ------------------------------------------------------------------ occupancy
    def occupancy_of_valid(
        self,
        xc: torch.Tensor,
        valid: torch.Tensor,
        cond: dict[str, torch.Tensor],
        occ_fn,
        disp_net=None,
    ) -> torch.Tensor:
        """ForwardDeformer.occupancy_of_valid, evaluating occ_fn (and disp_net) once per distinct
        root of a point: xc [B, n, I, 3], valid [B, n, I] -> occ [B, n, 1].

        Merged and coincident inits carry bit-identical roots, so their logits are equal; the max
        over a point's inits is the same with one of them, and so is its gradient (amax shares it
        evenly among equal entries whose graphs meet in the same root; here one entry takes it
        all)."""
        return super().occupancy_of_valid(xc, valid & ~self.repeated_roots(xc, valid), cond,
                                          occ_fn, disp_net)

    @staticmethod
    def repeated_roots(xc: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Valid inits whose root equals (bit for bit) that of an earlier valid init of the same
        point: xc [B, n, I, 3], valid [B, n, I] -> [B, n, I] bool."""
        x = xc.detach()
        rep = torch.zeros_like(valid)
        for i in range(1, x.shape[2]):
            same = (x[:, :, :i] == x[:, :, i:i + 1]).all(-1) & valid[:, :, :i]     # [B, n, i]
            rep[:, :, i] = valid[:, :, i] & same.any(-1)
        return rep

    # ------------------------------------------------------------------ search
    def search(
        self,
        xd: torch.Tensor,
        cond: dict[str, torch.Tensor],
        flame_out: FlameFrames,
        eval_mode: bool = False,
        point_mask: torch.Tensor | None = None,
        return_info: bool = False,
    ):
        """Roots of forward_deform(x_c) = x_d from every init, without gradients (same contract as
        ForwardDeformer.search).

        xd: [B, N, 3]; point_mask: optional [B, N] bool. Returns xc [B, N, I, 3], valid_ids
        [B, N, I] and with return_info a dict: diff [B, N, I] the networks' residual norms (inf
        where none was taken), n_steps (most Broyden steps through the networks of a polish or
        fallback), grid_steps (most Newton steps on the grid), n_solved (inits searched),
        n_polished (grid roots polished), n_further (polished further), n_fallback (inits given
        the exact search).
        eval_mode only affects the fallback's initial Jacobian (as in the exact search).
        """
        if xd.dim() != 3 or xd.shape[-1] != 3:
            raise _err(f"xd must be [B, N, 3], got {tuple(xd.shape)}")
        B, N, _ = xd.shape
        I = self.n_init
        info = dict(n_steps=0, grid_steps=0, n_polished=0, n_further=0, n_fallback=0, n_solved=0)
        with torch.no_grad():
            xd0, betas, fl, x_init, xc, valid, diff, pts = self._search_setup(xd, cond, flame_out,
                                                                          point_mask)
            if pts.numel() > 0:
                items = torch.unique(pts // N)                             # [B'], B' <= B
                slot_of = torch.full((B,), -1, dtype=torch.long, device=xd.device)
                slot_of[items] = torch.arange(items.numel(), device=xd.device)
                betas_k, fl_k = betas[items], fl.index(items)
                deform_k = self.folded_deform(betas_k, fl_k)                           # by slot

                def deform(x, b):  # by batch index
                    return deform_k(x, slot_of[b])
                grid = self.bake(betas_k, fl_k, deform_k)
                init_rep = self._same_inits(fl)                                        # [B, I]
                for s in range(0, pts.numel(), self.chunk_size):
                    p = pts[s:s + self.chunk_size]
                    xc[p], valid[p], diff[p] = self._solve_chunk(
                        grid, slot_of, p, N, x_init[p], xd0.reshape(B * N, 3)[p], betas, fl,
                        eval_mode, info, deform, init_rep)
        xc, valid = xc.reshape(B, N, I, 3), valid.reshape(B, N, I)
        if return_info:
            return xc, valid, dict(info, diff=diff.reshape(B, N, I))
        return xc, valid

    def _same_inits(self, fl: FlameFrames, tol: float = 1e-6) -> torch.Tensor:
        """For each item and init bone, the first init bone with the same rigid map
        tfs_c[j] inv(tfs[j]) (entries within tol): [B, I] long (itself when unique)."""
        T = self.init_maps(fl)  # [B, I, 4, 4]
        I = T.shape[1]
        same = (T[:, :, None] - T[:, None, :]).abs().flatten(-2).amax(-1) <= tol      # [B, I, I]
        lower = torch.ones(I, I, dtype=torch.bool, device=T.device).tril()
        return (same & lower).int().argmax(dim=-1)  # first True per row

    def _grid_j_inv(self, grid: BakedGrid, x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Inverse interpolant Jacobians at x [A, 3] (lattices slot [A]) -> [A, 3, 3]; identity
        where singular."""
        _, jac = grid(x.t(), slot)
        j_inv, ok = inv3(jac.permute(2, 0, 1))
        eye = torch.eye(3, dtype=j_inv.dtype, device=j_inv.device).expand_as(j_inv)
        return torch.where(ok[:, None, None], j_inv, eye)

    def _polish(self, grid: BakedGrid, x0: torch.Tensor, bidx: torch.Tensor, slot: torch.Tensor,
                target: torch.Tensor, deform) -> dict[str, object]:
        """Chord Newton through the networks from grid roots: x0 [A, 3], bidx [A] batch items,
        slot [A] their lattices, target [A, 3]; deform (x [A', 3], bidx [A']) -> x_d [A', 3].

        Up to exact_steps steps x <- x - G^-1 (deform(x) - x_d), G the interpolant's Jacobian at
        x0 (identity where singular), kept for every step: near the root G differs from the
        networks' Jacobian by the interpolation error only, so each step shrinks the residual by
        about that factor, without Broyden's per-step matrix updates. Rules of broyden(): an init
        stops below cvg_thresh, is dropped after a step above dvg_thresh or not finite, and its
        iterate with the smallest residual is kept. Returns broyden's dict (result [A, 3],
        diff [A], valid_ids [A], n_steps)."""
        A = x0.shape[0]
        _, jac = grid(x0.t(), slot)
        adj, det, ok = adjugate3(jac)  # G^-1 v = sum_k adj[k] v_k / det
        g_inv = torch.where(ok, adj / torch.where(ok, det, torch.ones_like(det)),
                            torch.eye(3, dtype=x0.dtype, device=x0.device)[:, :, None])
        g_inv = g_inv.permute(2, 0, 1)                                                # [A, k, i]
        best_x, best = x0.clone(), torch.full((A,), float("inf"), dtype=x0.dtype, device=x0.device)
        idx, x, n_steps = torch.arange(A, device=x0.device), x0, 0
        for it in range(self.exact_steps + 1):
            r = deform(x, bidx[idx]) - target[idx]                                  # [A', 3]
            rn = r.norm(dim=-1)
            fin = torch.isfinite(rn)
            better = fin & (rn < best[idx])
            best[idx] = torch.where(better, rn, best[idx])
            best_x[idx] = torch.where(better[:, None], x, best_x[idx])
            if it == self.exact_steps:
                break
            go = fin & (best[idx] >= self.cvg_thresh) & ((rn <= self.dvg_thresh) | (it == 0))
            if not bool(go.any()):
                break
            idx, x, r = idx[go], x[go], r[go]
            x = x - (g_inv[idx] * r[:, :, None]).sum(1)
            n_steps += 1
        return dict(result=best_x, diff=best, valid_ids=best < self.cvg_thresh, n_steps=n_steps)

    def _update(self, ids, out, xc, valid, diff) -> None:
        """Write a Broyden result for inits ids [A] where it converged or lowered the residual."""
        take = out["valid_ids"] | (out["diff"] < diff[ids])
        xc[ids] = torch.where(take[:, None], out["result"], xc[ids])
        diff[ids] = torch.where(take, out["diff"], diff[ids])
        valid[ids] = out["valid_ids"]

    def _solve_chunk(self, grid, slot_of, p, N, x0, xd_p, betas, fl, eval_mode, info,
                     deform=None, init_rep=None):
        """Grid search, merge, polish and fallback for points p [c] (flat indices into B*N).

        x0: [c, I, 3] rigid inits; xd_p: [c, 3]; deform: (x [A, 3], batch index [A]) -> x_d [A, 3]
        for the Broyden residuals (default the plain networks); init_rep: [B, I] the init each
        init copies its grid root from (_same_inits; default: itself). Returns xc [c, I, 3],
        valid [c, I], diff [c, I]; updates the counters in info."""
        c, I = p.numel(), self.n_init
        bidx = (p // N).repeat_interleave(I)                                           # [c*I]
        slot = slot_of[bidx]
        target = xd_p.repeat_interleave(I, dim=0)                                      # [c*I, 3]
        x0f = x0.reshape(-1, 3)
        # inits of bones whose rigid map equals an earlier bone's (e.g. eyes and neck at rest)
        # start at the same point: search once, copy the root
        rep_b = (init_rep[p // N] if init_rep is not None
                 else torch.arange(I, device=p.device).expand(c, I))
        src = (torch.arange(c, device=p.device)[:, None] * I + rep_b).reshape(-1)      # [c*I]
        own = src == torch.arange(c * I, device=p.device)
        xs, rs, g_steps = self._grid_newton(grid, x0f[own].t().contiguous(), slot[own],
                                            target[own].t().contiguous())
        xg = torch.empty_like(x0f)
        rg = torch.empty(c * I, dtype=x0f.dtype, device=x0f.device)
        xg[own], rg[own] = xs.t(), rs
        xg, rg = xg[src], rg[src]  # [c*I, 3], [c*I]
        found = (rg < self.grid_tol).reshape(c, I)
        leader, rep = self._merge(xg.reshape(c, I, 3), found, self.merge_tol)
        xc, valid = xg.clone(), torch.zeros(c * I, dtype=torch.bool, device=xg.device)
        diff = torch.full((c * I,), float("inf"), dtype=xg.dtype, device=xg.device)
        lead = leader.reshape(-1).nonzero().squeeze(1)                                # [A']
        if lead.numel() > 0:  # polish
            if deform is None:
                def deform(x, b):
                    return self._deform_flat(x, b, betas, fl)
            out = self._polish(grid, xg[lead], bidx[lead], slot[lead], target[lead], deform)
            self._update(lead, out, xc, valid, diff)
            info["n_steps"] = max(info["n_steps"], out["n_steps"])
        further = lead[~valid[lead] & (diff[lead] <= self.dvg_thresh)] if lead.numel() else lead
        if self.fallback and further.numel() > 0 and self.max_steps > self.exact_steps:
            # from the best iterate
            out = self._solve_exact(xc[further], bidx[further], target[further], betas, fl,
                                    eval_mode, max_steps=self.max_steps - self.exact_steps,
                                    J_inv=self._grid_j_inv(grid, xc[further], slot[further]),
                                    deform=deform)
            self._update(further, out, xc, valid, diff)
            info["n_steps"] = max(info["n_steps"], self.exact_steps + out["n_steps"])
            info["n_further"] += int(further.numel())
        # followers take their leader's root (same point, same target)
        foll = (found & ~leader).reshape(-1).nonzero().squeeze(1)
        if foll.numel() > 0:
            src = (foll // I) * I + rep.reshape(-1)[foll]
            xc[foll], valid[foll], diff[foll] = xc[src], valid[src], diff[src]
        # points left without any root: the exact search from the rigid inits
        no_root = ~valid.reshape(c, I).any(-1, keepdim=True)
        rest = no_root.expand(c, I).reshape(-1).nonzero().squeeze(1)
        if self.fallback and rest.numel() > 0:
            out = self._solve_exact(x0f[rest], bidx[rest], target[rest], betas, fl, eval_mode,
                                    deform=deform)
            self._update(rest, out, xc, valid, diff)
            info["n_steps"] = max(info["n_steps"], out["n_steps"])
            info["n_fallback"] += int(rest.numel())
        info["grid_steps"] = max(info["grid_steps"], g_steps)
        info["n_polished"] += int(lead.numel())
        info["n_solved"] += c * I
        return xc.reshape(c, I, 3), valid.reshape(c, I), diff.reshape(c, I)

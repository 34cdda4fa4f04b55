"""Forward deformation with learned LBS fields and its inversion (deformed -> canonical).

Shape legend:
    B batch, N points, I initializations (bones used to start the search, 5 by default),
    J joints (5), X expression components (50), Q pose-feature size (36), S FLAME shape
    parameters (betas, 100), V FLAME vertices, A points flattened across the batch (each
    carries a batch index).

Arguments shared by the methods:
    cond: dict with 'shape' [B, S] (FLAME shape, betas): the per-item condition of the LBS
        fields (lib/model/neutral_lbs.py evaluates the unconditioned skinning network at the
        shape-neutral point x_c + disp(x_c, betas)) and of the shape-neutral mapping of
        occupancy; other keys are passed through to occ_fn.
    flame_out: the FLAME server's FlameFrames (lib/flame/frames.py); fields read: tfs
        [B, J, 4, 4] target joint transforms, tfs_c [B, J, 4, 4] canonical ones, pose_feature
        [B, Q], pose_feature_c [B, Q], exp [B, X], optional exp_c [B, X] (zeros when None), and
        verts [B, V, 3] (posed vertices, only to skip far points). A leading dim of 1 is
        broadcast to B.

forward deformation (docs/design.md, Forward skinning; lib/flame/lbs.deform_canonical), with
w, E, Pd the LBS fields of the shaped canonical point x_c (lbs_net(x_c, betas)):
    x_r = (sum_j w_j tfs_c[j])^-1 x_c - Pd^T pose_feature_c - E exp_c + E exp + Pd^T pose_feature
    x_d = (sum_j w_j tfs[j]) x_r
The inverse is found per point by Broyden's method from I rigid initializations; gradients reach
the LBS fields (and the inputs) by implicit differentiation.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lib.flame.frames import FlameFrames
from lib.flame.lbs import adjugate3, deform_canonical, inv3, skin_offset
from lib.model.broyden import broyden
from lib.utils.errors import ModuleErrors

# inv3, adjugate3 and skin_offset live in lib/flame/lbs.py (re-exported for the model's modules)
__all__ = ["ForwardDeformer", "skin_offset", "inv3", "adjugate3", "SKIPPED_LOGIT"]

SKIPPED_LOGIT = -1000.0  # occupancy logit of skipped points and of invalid initializations


_err = ModuleErrors(__name__)


_DEFORM_FIELDS = ("tfs", "tfs_c", "pose_feature", "pose_feature_c", "exp")  # exp_c: zeros when None


class ForwardDeformer(nn.Module):
    """Correspondence search x_d -> x_c through learned LBS fields.

    Args:
        lbs_net: callable ``(xc [B, N, 3], betas [B, S]) -> (w [B, N, J], pose_dirs [B, N, Q, 3],
            expr_dirs [B, N, 3, X])`` (GANHead: lib/model/neutral_lbs.NeutralLBS); registered as
            a submodule when it is an nn.Module.
        n_joints: J.
        max_steps, cvg_thresh, dvg_thresh: Broyden settings (see lib/model/broyden.py).
        chunk_size: deformed points solved together (each with I unknowns); bounds memory.
        init_bones: bones whose rigid inverse gives the I initializations.
        skip_thresh, skip_stride: far-point skipping in query_occupancy (distance to every
            skip_stride-th posed FLAME vertex).
    """

    def __init__(self, lbs_net: Callable, n_joints: int = 5, max_steps: int = 50,
                 cvg_thresh: float = 1e-5, dvg_thresh: float = 1.0, chunk_size: int = 20000,
                 init_bones: Sequence[int] = (0, 1, 2, 3, 4), skip_thresh: float = 0.11,
                 skip_stride: int = 10):
        super().__init__()
        self.lbs_net = lbs_net
        self.n_joints = int(n_joints)
        self.max_steps = int(max_steps)
        self.cvg_thresh, self.dvg_thresh = float(cvg_thresh), float(dvg_thresh)
        self.chunk_size = int(chunk_size)
        if self.chunk_size < 1:
            raise _err(f"chunk_size must be >= 1, got {chunk_size}")
        bones = [int(j) for j in init_bones]
        if not bones or any(j < 0 or j >= self.n_joints for j in bones):
            raise _err(f"init_bones must be non-empty indices in [0, {self.n_joints}), "
                       f"got {init_bones}")
        self.register_buffer("init_bones", torch.tensor(bones, dtype=torch.long), persistent=False)
        self.skip_thresh, self.skip_stride = float(skip_thresh), int(skip_stride)

    @property
    def n_init(self) -> int:
        """I."""
        return int(self.init_bones.numel())

    # ------------------------------------------------------------------ inputs and fields
    def _checked_flame(self, flame_out: FlameFrames, B: int, ref: torch.Tensor) -> FlameFrames:
        """The fields of flame_out that the deformation reads (tfs, tfs_c, pose_feature,
        pose_feature_c, exp, exp_c; exp_c zeros when None), checked, cast to ref's dtype, with
        leading dim B; the other fields None."""
        where = "lib/model/deformer.py"
        f = FlameFrames.check(flame_out, where).require(*_DEFORM_FIELDS, where=where)
        out = FlameFrames(tfs=f.tfs, tfs_c=f.tfs_c, pose_feature=f.pose_feature,
                          pose_feature_c=f.pose_feature_c, exp=f.exp,
                          exp_c=torch.zeros_like(f.exp) if f.exp_c is None else f.exp_c)
        out = out.to(dtype=ref.dtype).expand(B, where=where)
        for name, tfs in (("tfs", out.tfs), ("tfs_c", out.tfs_c)):
            if tuple(tfs.shape[1:]) != (self.n_joints, 4, 4):
                raise _err(f"FLAME output '{name}' must be [B, {self.n_joints}, 4, 4], "
                           f"got {tuple(tfs.shape)}")
        return out

    @staticmethod
    def _betas(cond: dict[str, torch.Tensor], B: int) -> torch.Tensor:
        """cond['shape'] [B, S] (checked): the LBS fields' per-item condition."""
        if "shape" not in cond:
            raise _err(f"cond lacks 'shape' (FLAME betas, has {sorted(cond)})")
        betas = cond["shape"]
        if betas.dim() != 2 or betas.shape[0] != B:
            raise _err(f"cond['shape'] must be [{B}, S], got {tuple(betas.shape)}")
        return betas

    def _fields(self, xc: torch.Tensor, betas: torch.Tensor):
        """LBS fields at xc [B, N, 3] with betas [B, S] -> w [B, N, J], pose_dirs [B, N, Q, 3],
        expr_dirs [B, N, 3, X]."""
        w, pose_dirs, expr_dirs = self.lbs_net(xc, betas)
        if w.shape[-1] != self.n_joints or w.shape[:2] != xc.shape[:2]:
            raise _err(f"lbs_net returned weights {tuple(w.shape)} for points {tuple(xc.shape)}")
        return w, pose_dirs, expr_dirs

    def _deform_flat(self, xc: torch.Tensor, bidx: torch.Tensor, betas: torch.Tensor,
                     fl: FlameFrames) -> torch.Tensor:
        """Forward deformation of flattened points: xc [A, 3], bidx [A] -> xd [A, 3]; fl as
        returned by _checked_flame.

        Each point is its own batch item for the LBS network (betas gathered per point)."""
        w, pd, ed = self._fields(xc[:, None, :], betas[bidx])
        g = fl.index(bidx)
        return deform_canonical(xc, w[:, 0], ed[:, 0], pd[:, 0], g.exp, g.pose_feature, g.tfs,
                                g.exp_c, g.pose_feature_c, g.tfs_c)

    def forward_deform(self, xc: torch.Tensor, cond: dict[str, torch.Tensor],
                       flame_out: FlameFrames) -> torch.Tensor:
        """Deform canonical points to the target pose/expression. xc: [B, N, 3] -> xd: [B, N, 3]."""
        B = xc.shape[0]
        return self._deform_items(xc, self._betas(cond, B), self._checked_flame(flame_out, B, xc))

    def _deform_items(self, xc: torch.Tensor, betas: torch.Tensor, fl: FlameFrames) -> torch.Tensor:
        """forward_deform on checked inputs: xc [B, N, 3], betas [B, S], fl as returned by
        _checked_flame -> xd [B, N, 3]."""
        w, pd, ed = self._fields(xc, betas)
        return deform_canonical(xc, w, ed, pd, fl.exp[:, None], fl.pose_feature[:, None],
                                fl.tfs[:, None], fl.exp_c[:, None], fl.pose_feature_c[:, None],
                                fl.tfs_c[:, None])

    # ------------------------------------------------------------------ initialization
    def init_maps(self, fl: FlameFrames) -> torch.Tensor:
        """Rigid map of each init bone, tfs_c[j] @ inv(tfs[j]): fl (_checked_flame's) ->
        [B, I, 4, 4]."""
        return fl.tfs_c[:, self.init_bones] @ torch.linalg.inv(fl.tfs[:, self.init_bones])

    def init_points(self, xd: torch.Tensor, flame_out: FlameFrames) -> torch.Tensor:
        """Rigid inverse per init bone: x_init = tfs_c[j] @ inv(tfs[j]) x_d.
        xd [B, N, 3] -> [B, N, I, 3]."""
        T = self.init_maps(self._checked_flame(flame_out, xd.shape[0], xd))  # [B, I, 4, 4]
        return torch.einsum("birc,bnc->bnir", T[:, :, :3, :3], xd) + T[:, None, :, :3, 3]

    @staticmethod
    def _jacobian(f: torch.Tensor, x: torch.Tensor, keep_graph: bool) -> torch.Tensor:
        """d f / d x for per-point maps: f [A, 3] (graph from x), x [A, 3] -> J [A, 3, 3],
        J[a,k,l] = df_k/dx_l."""
        rows = []
        for k in range(3):
            (gk,) = torch.autograd.grad(f[:, k].sum(), x, retain_graph=keep_graph or k < 2)
            rows.append(gk)
        return torch.stack(rows, dim=1)

    def _init_J_inv(
        self,
        x0: torch.Tensor,
        bidx: torch.Tensor,
        betas: torch.Tensor,
        fl: FlameFrames,
        eval_mode: bool,
    ):
        """Initial inverse Jacobians at x0 [A, 3] -> [A, 3, 3] (identity where singular).

        eval_mode: the inverse of the blended target transform (sum_j w_j tfs[j])[:3, :3], w the
        LBS weights at x0 (the original's evaluation-mode initialization: the canonical
        transforms are left out). Otherwise the exact Jacobian of the forward deformation."""
        if eval_mode:
            with torch.no_grad():
                w = self._fields(x0[:, None, :], betas[bidx])[0][:, 0]  # [A, J]
                J = torch.einsum("aj,ajrc->arc", w, fl.tfs[bidx][..., :3, :3])
        else:  # exact Jacobian of the forward deformation by autograd
            with torch.enable_grad():
                x = x0.detach().requires_grad_(True)
                f = self._deform_flat(x, bidx, betas.detach(), fl.detach())
                J = self._jacobian(f, x, keep_graph=False)
        J_inv, ok = inv3(J.detach())
        eye = torch.eye(3, dtype=x0.dtype, device=x0.device).expand_as(J_inv)
        return torch.where(ok[:, None, None], J_inv, eye)

    # ------------------------------------------------------------------ search
    def _search_setup(self, xd, cond, flame_out, point_mask):
        """Detached inputs and the empty result buffers shared by every search mode.

        xd: [B, N, 3]; point_mask: optional [B, N]. Returns xd0 [B, N, 3], betas [B, S], fl (the
        detached _checked_flame), x_init [B*N, I, 3], xc [B*N, I, 3] (a copy of x_init),
        valid [B*N, I] False, diff [B*N, I] inf, pts [A] flat indices of the points to solve.
        """
        B, N, _ = xd.shape
        I = self.n_init
        xd0 = xd.detach()
        betas = self._betas(cond, B).detach().to(xd.dtype)
        fl = self._checked_flame(flame_out, B, xd0).detach()
        x_init = self.init_points(xd0, fl).reshape(B * N, I, 3)
        valid = torch.zeros(B * N, I, dtype=torch.bool, device=xd.device)
        diff = torch.full((B * N, I), float("inf"), dtype=xd.dtype, device=xd.device)
        if point_mask is None:
            pts = torch.arange(B * N, device=xd.device)
        else:
            if tuple(point_mask.shape) != (B, N):
                raise _err(f"point_mask must be [{B}, {N}], got {tuple(point_mask.shape)}")
            pts = point_mask.reshape(-1).nonzero().squeeze(1)
        return xd0, betas, fl, x_init, x_init.clone(), valid, diff, pts

    def search(self, xd: torch.Tensor, cond: dict[str, torch.Tensor], flame_out: FlameFrames,
               eval_mode: bool = False, point_mask: torch.Tensor | None = None,
               return_info: bool = False):
        """Roots of forward_deform(x_c) = x_d from every init, without gradients.

        xd: [B, N, 3]; point_mask: optional [B, N] bool, points to solve (others stay at their
        inits and are invalid). Returns xc [B, N, I, 3], valid_ids [B, N, I] bool, and with
        return_info a dict(diff [B, N, I] residual norms, n_steps int = most Broyden steps of a
        chunk).
        """
        if xd.dim() != 3 or xd.shape[-1] != 3:
            raise _err(f"xd must be [B, N, 3], got {tuple(xd.shape)}")
        B, N, _ = xd.shape
        I = self.n_init
        with torch.no_grad():
            xd0, betas, fl, x_init, xc, valid, diff, pts = self._search_setup(xd, cond, flame_out,
                                                                          point_mask)
            xd_flat = xd0.reshape(B * N, 3)
            n_steps = 0
            for s in range(0, pts.numel(), self.chunk_size):
                p = pts[s:s + self.chunk_size]                      # [c]
                bidx = (p // N).repeat_interleave(I)                # [c*I]
                target = xd_flat[p].repeat_interleave(I, dim=0)     # [c*I, 3]
                out = self._solve_exact(x_init[p].reshape(-1, 3), bidx, target, betas, fl,
                                        eval_mode)
                xc[p] = out["result"].reshape(-1, I, 3)
                valid[p] = out["valid_ids"].reshape(-1, I)
                diff[p] = out["diff"].reshape(-1, I)
                n_steps = max(n_steps, out["n_steps"])
        xc, valid = xc.reshape(B, N, I, 3), valid.reshape(B, N, I)
        if return_info:
            return xc, valid, dict(diff=diff.reshape(B, N, I), n_steps=n_steps)
        return xc, valid

    def _solve_exact(
        self,
        x0: torch.Tensor,
        bidx: torch.Tensor,
        target: torch.Tensor,
        betas: torch.Tensor,
        fl: FlameFrames,
        eval_mode: bool,
        max_steps: int | None = None,
        J_inv: torch.Tensor | None = None,
        deform: Callable | None = None,
    ):
        """Broyden through the networks from x0 [A, 3] (batch items bidx [A], targets x_d [A, 3]).

        J_inv: initial inverse Jacobians [A, 3, 3] (default: _init_J_inv); max_steps defaults to
        self.max_steps; deform: (x [A', 3], bidx [A']) -> x_d [A', 3], the forward deformation
        (default: the plain networks, _deform_flat). Returns broyden's dict (result [A, 3],
        diff [A], valid_ids [A], n_steps)."""
        J0 = self._init_J_inv(x0, bidx, betas, fl, eval_mode) if J_inv is None else J_inv
        if deform is None:
            def deform(x, b):
                return self._deform_flat(x, b, betas, fl)

        def residual(x, mask):
            return deform(x, bidx[mask]) - target[mask]

        steps = self.max_steps if max_steps is None else int(max_steps)
        return broyden(residual, x0, J0, steps, self.cvg_thresh, self.dvg_thresh)

    def _implicit_correction(self, xc_star, bidx, target, betas, fl: FlameFrames) -> torch.Tensor:
        """x_c = x_c* - J^-1 (r(x_c*) - r(x_c*).detach()), r = forward_deform - x_d,
        J = dr/dx_c at x_c*.

        Value unchanged; gradients d x_c = -J^-1 d r reach the LBS fields, betas, the FLAME
        outputs and x_d. xc_star [A, 3], bidx [A], target (x_d, may carry a graph) [A, 3] ->
        [A, 3].
        """
        with torch.enable_grad():
            x = xc_star.detach().requires_grad_(True)
            f = self._deform_flat(x, bidx, betas, fl)
            J = self._jacobian(f, x, keep_graph=True)
        J_inv, _ = inv3(J.detach())  # zero (no gradient) where singular
        r = f - target
        return x.detach() - (J_inv @ (r - r.detach())[..., None])[..., 0]

    def forward(self, xd: torch.Tensor, cond: dict[str, torch.Tensor], flame_out: FlameFrames,
                eval_mode: bool = False, point_mask: torch.Tensor | None = None,
                return_info: bool = False):
        """Canonical correspondences of deformed points.

        xd: [B, N, 3]; eval_mode picks the cheap Jacobian initialization; point_mask [B, N] as in
        search. Returns xc [B, N, I, 3], valid_ids [B, N, I] (and the info dict with return_info).
        When grad mode is on, valid entries of xc carry the implicit-differentiation graph.
        """
        xc, valid, info = self.search(xd, cond, flame_out, eval_mode, point_mask, return_info=True)
        if torch.is_grad_enabled():
            B, N, I = valid.shape
            v = valid.reshape(-1).nonzero().squeeze(1)  # flat indices into B*N*I
            if v.numel() > 0:
                fl = self._checked_flame(flame_out, B, xd)
                target = xd.reshape(B * N, 3)[v // I]
                corr = self._implicit_correction(xc.reshape(-1, 3)[v], v // (N * I), target,
                                                 self._betas(cond, B).to(xd.dtype), fl)
                xc = xc.reshape(-1, 3).index_put((v,), corr).reshape(B, N, I, 3)
        return (xc, valid, info) if return_info else (xc, valid)

    # ------------------------------------------------------------------ occupancy
    @staticmethod
    def to_neutral(xc: torch.Tensor, shape: torch.Tensor, disp_net: Callable) -> torch.Tensor:
        """Map to the shape-neutral canonical space: x_c + disp_net(x_c, shape).

        xc: [B, ..., 3] (e.g. [B, N, I, 3]); shape: [B, 100]; disp_net: (x [B, M, 3], shape) ->
        dx [B, M, 3]. Returns [B, ..., 3]."""
        B = xc.shape[0]
        flat = xc.reshape(B, -1, 3)
        return (flat + disp_net(flat, shape)).reshape(xc.shape)

    def near_mask(self, xd: torch.Tensor, verts: torch.Tensor) -> torch.Tensor:
        """True where x_d is within skip_thresh of every skip_stride-th vertex.
        xd [B, N, 3], verts [B, V, 3] -> [B, N]."""
        sub = verts[:, ::self.skip_stride].to(xd.dtype)
        if sub.shape[0] == 1 and xd.shape[0] > 1:
            sub = sub.expand(xd.shape[0], -1, -1)
        out = []
        for s in range(0, xd.shape[1], self.chunk_size):
            dist = torch.cdist(xd[:, s:s + self.chunk_size], sub).amin(dim=-1)
            out.append(dist <= self.skip_thresh)
        return torch.cat(out, dim=1)

    def query_occupancy(
        self,
        xd: torch.Tensor,
        cond: dict[str, torch.Tensor],
        flame_out: FlameFrames,
        occ_fn: Callable,
        disp_net: Callable | None = None,
        eval_mode: bool = False,
        skip_far: bool = False,
    ) -> torch.Tensor:
        """Occupancy logits of deformed points: max over valid inits of occ_fn at the neutral x_c.

        xd: [B, N, 3]; occ_fn: (x [B, M, 3], cond) -> logits [B, M, 1] (or [B, M]); disp_net as in
        to_neutral (uses cond['shape']), None to skip the neutral mapping; skip_far: points farther
        than skip_thresh from flame_out.verts are not searched (inference).
        Returns occ [B, N, 1]; SKIPPED_LOGIT (-1000) where no init is valid or the point was
        skipped. Only valid correspondences are sent to disp_net / occ_fn (packed per batch
        item).
        """
        B, N, _ = xd.shape
        if skip_far:
            FlameFrames.check(flame_out, "lib/model/deformer.py skip_far").require(
                "verts", where="lib/model/deformer.py skip_far (posed vertices [B, V, 3])")
        near = self.near_mask(xd, flame_out.verts) if skip_far else None
        step = max(1, self.chunk_size // B)
        outs = []
        for s in range(0, N, step):
            sl = slice(s, s + step)
            xc, valid = self.forward(xd[:, sl], cond, flame_out, eval_mode,
                                     None if near is None else near[:, sl])
            outs.append(self.occupancy_of_valid(xc, valid, cond, occ_fn, disp_net))
        return torch.cat(outs, dim=1)

    def occupancy_of_valid(
        self,
        xc: torch.Tensor,
        valid: torch.Tensor,
        cond: dict[str, torch.Tensor],
        occ_fn: Callable,
        disp_net: Callable | None = None,
    ) -> torch.Tensor:
        """Occupancy from given correspondences: xc [B, n, I, 3], valid [B, n, I] -> occ [B, n, 1].

        Max over valid inits of occ_fn(to_neutral(xc)); SKIPPED_LOGIT where none is valid. Only
        valid points are evaluated, packed per batch item into [B, L, 3] (L = most valid per item).
        occ_fn and disp_net as in query_occupancy."""
        B, n, I, _ = xc.shape
        flat_valid = valid.reshape(B, n * I)
        occ = torch.full((B, n * I), SKIPPED_LOGIT, dtype=xc.dtype, device=xc.device)
        L = int(flat_valid.sum(dim=1).max()) if flat_valid.numel() else 0
        if L > 0:
            b, m = flat_valid.nonzero(as_tuple=True)
            # rank among the valid of item b
            pos = (torch.cumsum(flat_valid.long(), dim=1) - 1)[b, m]
            packed = xc.new_zeros(B, L, 3).index_put((b, pos), xc.reshape(B, n * I, 3)[b, m])
            if disp_net is not None:
                if "shape" not in cond:
                    raise _err(f"cond lacks 'shape' needed by disp_net (has {sorted(cond)})")
                packed = self.to_neutral(packed, cond["shape"].to(xc.dtype), disp_net)
            val = occ_fn(packed, cond)
            if val.dim() == 3:
                val = val[..., 0]
            if tuple(val.shape) != (B, L):
                raise _err(f"occ_fn returned {tuple(val.shape)} for points {(B, L, 3)}")
            occ = occ.index_put((b, m), val[b, pos].to(xc.dtype))
        return occ.reshape(B, n, I).amax(dim=2, keepdim=True)


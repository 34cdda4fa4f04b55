"""Batched Broyden root finder for many independent 3D systems g(x) = 0.

Shape legend:
    M  number of independent systems (points; e.g. B * N * I flattened)
    A  number of systems still active at a given step (A <= M)

Each system m has its own unknown x_m in R^3, residual g_m(x_m) in R^3 and inverse-Jacobian
estimate H_m (3x3). One step of the "good" Broyden method is

    dx  = -H g(x)                    (quasi-Newton step)
    dg  = g(x + dx) - g(x)
    H  <- H + (dx - H dg) (dx^T H) / (dx^T H dg)      (Sherman-Morrison form of the
                                                         rank-one secant update of J)

Only active systems (not yet converged, not diverged) are stepped and evaluated: the residual
callback receives just those points, so the work per step is proportional to the number of
unconverged points. The function is pure (no module state), deterministic, and runs under
whatever grad mode the caller chose (the deformer calls it under ``torch.no_grad``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from lib.utils.errors import ModuleErrors

__all__ = ["broyden"]

ResidualFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Skip a secant update when |dx^T H dg| <= _COS_GUARD * |H^T dx| * |dg|, i.e. when the update
# direction is (numerically) orthogonal to the secant and the rank-one formula would blow up.
_COS_GUARD = 1e-7


_err = ModuleErrors(__name__)


def broyden(
    g: ResidualFn,
    x_init: torch.Tensor,
    J_inv_init: torch.Tensor,
    max_steps: int = 50,
    cvg_thresh: float = 1e-5,
    dvg_thresh: float = 1.0,
) -> dict[str, object]:
    """Solve g(x) = 0 for M independent 3D systems with Broyden's (good) method.

    Args:
        g: residual callback ``g(x_active [A, 3], mask [M] bool) -> residual [A, 3]``.
            ``mask`` says which of the M systems the A rows of ``x_active`` are (in increasing
            index order, i.e. ``x_active`` plays the role of ``x[mask]``), so the callback can
            gather per-system data (targets, conditioning). The first call has all M active.
        x_init: [M, 3] initial guesses.
        J_inv_init: [M, 3, 3] initial inverse-Jacobian estimates (dg/dx)^-1.
        max_steps: maximum number of Broyden iterations.
        cvg_thresh: a system has converged once its residual norm is < cvg_thresh.
        dvg_thresh: a system is dropped (diverged) when, after a step, its residual norm is
            > dvg_thresh or not finite. The initial residual is not judged.

    Returns:
        dict with
            result: [M, 3] the iterate with the smallest residual norm seen for each system,
            diff: [M] that smallest residual norm,
            valid_ids: [M] bool, converged (diff < cvg_thresh) and hence not diverged,
            n_steps: int, number of iterations actually run (0 if all started converged).
    """
    if x_init.dim() != 2 or x_init.shape[-1] != 3:
        raise _err(f"x_init must be [M, 3], got {tuple(x_init.shape)}")
    M = x_init.shape[0]
    if tuple(J_inv_init.shape) != (M, 3, 3):
        raise _err(f"J_inv_init must be [{M}, 3, 3], got {tuple(J_inv_init.shape)}")
    if max_steps < 0:
        raise _err(f"max_steps must be >= 0, got {max_steps}")

    x = x_init.detach().clone()
    H = J_inv_init.detach().to(x.dtype).clone()
    active = torch.ones(M, dtype=torch.bool, device=x.device)
    gx = _checked(g, x, active)

    res = gx.norm(dim=-1)
    finite = torch.isfinite(res)
    best_x = x.clone()
    best_res = torch.where(finite, res, torch.full_like(res, float("inf")))
    active = finite & (best_res >= cvg_thresh)

    n_steps = 0
    for _ in range(max_steps):
        idx = active.nonzero().squeeze(1)  # [A]
        if idx.numel() == 0:
            break
        n_steps += 1
        H_a, g_a = H[idx], gx[idx]                           # [A, 3, 3], [A, 3]
        dx = -(H_a @ g_a[..., None])[..., 0]                 # [A, 3]
        x_new = x[idx] + dx
        g_new = _checked(g, x_new, active)                   # [A, 3]
        dg = g_new - g_a

        # good Broyden update of the inverse Jacobian, skipped where it is ill-conditioned
        vT = (dx[:, None, :] @ H_a)[:, 0, :]                 # dx^T H   [A, 3]
        denom = (vT * dg).sum(-1)                            # dx^T H dg  [A]
        scale = vT.norm(dim=-1) * dg.norm(dim=-1)
        ok = (denom.abs() > _COS_GUARD * scale) & torch.isfinite(denom) & (scale > 0)
        safe = torch.where(ok, denom, torch.ones_like(denom))
        u = (dx - (H_a @ dg[..., None])[..., 0]) / safe[:, None]
        H_new = H_a + torch.where(ok[:, None, None], u[:, :, None] * vT[:, None, :],
                                  torch.zeros_like(H_a))

        x.index_copy_(0, idx, x_new)
        gx.index_copy_(0, idx, g_new)
        H.index_copy_(0, idx, H_new)

        r_new = g_new.norm(dim=-1)
        fin = torch.isfinite(r_new)
        better = fin & (r_new < best_res[idx])
        best_res.index_copy_(0, idx, torch.where(better, r_new, best_res[idx]))
        best_x.index_copy_(0, idx, torch.where(better[:, None], x_new, best_x[idx]))

        done = (best_res[idx] < cvg_thresh) | ~fin | (r_new > dvg_thresh)
        active.index_copy_(0, idx, ~done)

    return dict(result=best_x, diff=best_res, valid_ids=best_res < cvg_thresh, n_steps=n_steps)


def _checked(g: ResidualFn, x_active: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Call the residual callback and check its shape: x_active [A, 3] -> [A, 3]."""
    out = g(x_active, mask)
    if tuple(out.shape) != tuple(x_active.shape):
        raise _err(f"residual callback returned {tuple(out.shape)} for input "
                   f"{tuple(x_active.shape)}")
    return out.detach().to(x_active.dtype)

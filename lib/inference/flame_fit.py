"""FLAME fit of a raw scan in arbitrary units, position and (a few candidate) orientations,
without landmarks (eval_mode=fit when no FLAME parameters are given).

Shape legend: N scan samples, V FLAME vertices, S shape components, X expression components,
P parameter-vector length (169).

Unknowns: a similarity taking the scan into FLAME space, x_f = s * x @ R0.T + t (R0 one of
`lib.inference.scan.ORIENTATIONS`, s and t optimized), and FLAME's global, neck and jaw
rotations, shape and expression (eyes stay 0). Coarse to fine:
1. per candidate orientation R0: scale and translation from the centroids and RMS radii of
   area-weighted samples of the scan and of the FLAME template (mean shape, zero pose);
   then s, t and the global rotation by Adam on the robust Chamfer loss below with a wide
   kernel; the orientation with the lowest loss is kept;
2. everything, the kernel narrowing from `sigma_full[0]` to `sigma_full[1]`, with quadratic
   priors pulling shape, expression and the neck/jaw rotations to 0.
Robust Chamfer: with d_sf the distance from each scan sample to its nearest FLAME vertex and
d_fs from each FLAME vertex to its nearest scan sample,
    loss = mean rho(d_sf^2) + mean rho(d_fs^2),   rho(q) = q / (q + sigma^2)  (Geman-McClure)
so hair, shoulders and FLAME's inner parts (eyeballs, mouth) that have no counterpart saturate
instead of dragging the fit. Nearest pairs are found without gradients (k-d trees) every
`pair_every` steps, then the squared distances of the pairs
are differentiated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from lib.inference.metrics import sample_surface
from lib.inference.scan import ORIENTATIONS, Similarity
from lib.utils.knn import nearest_exact

__all__ = ["FlameFit", "initial_similarity", "nearest_pairs", "robust_chamfer", "fit_flame"]


@dataclass
class FlameFit:
    """transform: scan -> FLAME space; params: [P] FLAME vector (scale 1, translation 0: the
    scan is moved instead); orientation: the kept candidate; loss: final robust Chamfer;
    history: loss per step of the kept run."""

    transform: Similarity
    params: torch.Tensor
    orientation: str
    loss: float
    history: list = field(default_factory=list)


def initial_similarity(scan_pts: np.ndarray, template_pts: np.ndarray, rotation: np.ndarray
                       ) -> tuple[float, np.ndarray]:
    """Scale and translation matching centroid and RMS radius of the rotated scan samples
    scan_pts [N, 3] to template_pts [M, 3]. Returns (s, t [3])."""
    x = np.asarray(scan_pts, dtype=np.float64) @ rotation.T
    y = np.asarray(template_pts, dtype=np.float64)
    cx, cy = x.mean(0), y.mean(0)
    rx = np.sqrt(((x - cx) ** 2).sum(1).mean())
    ry = np.sqrt(((y - cy) ** 2).sum(1).mean())
    if not rx > 0:
        raise ValueError("initial_similarity: the scan samples are all at one point")
    s = ry / rx
    return float(s), cy - s * cx


def nearest_pairs(x: torch.Tensor, verts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-neighbour indices both ways, without gradients (k-d trees on the CPU: the
    point sets are small). x: [N, 3]; verts: [V, 3]. Returns i_xv [N] (nearest vertex of
    each point) and i_vx [V] (nearest point of each vertex), long on x's device."""
    return nearest_exact(x, verts)[1], nearest_exact(verts, x)[1].to(x.device)


def robust_chamfer(x: torch.Tensor, verts: torch.Tensor, sigma: float, pairs=None
                   ) -> torch.Tensor:
    """Geman-McClure Chamfer (module docstring) between points x [N, 3] and verts [V, 3].
    pairs: (i_xv [N], i_vx [V]) from `nearest_pairs` (found here when None)."""
    i_xv, i_vx = nearest_pairs(x, verts) if pairs is None else pairs
    q_xv = ((x - verts[i_xv]) ** 2).sum(-1)
    q_vx = ((verts - x[i_vx]) ** 2).sum(-1)
    s2 = sigma * sigma
    return (q_xv / (q_xv + s2)).mean() + (q_vx / (q_vx + s2)).mean()


class _Unknowns(torch.nn.Module):
    """Optimized quantities; `pose()` assembles the 15-d pose (eyes 0)."""

    def __init__(self, s: float, t: np.ndarray, n_shape: int, n_exp: int):
        super().__init__()
        self.log_s = torch.nn.Parameter(torch.tensor(float(np.log(s))))
        self.t = torch.nn.Parameter(torch.as_tensor(t, dtype=torch.float32))
        self.rot = torch.nn.Parameter(torch.zeros(3))
        self.neck = torch.nn.Parameter(torch.zeros(3))
        self.jaw = torch.nn.Parameter(torch.zeros(3))
        self.shape = torch.nn.Parameter(torch.zeros(n_shape))
        self.exp = torch.nn.Parameter(torch.zeros(n_exp))

    def pose(self) -> torch.Tensor:
        return torch.cat([self.rot, self.neck, self.jaw, self.rot.new_zeros(6)])


def _run(flame, uk: _Unknowns, pts: torch.Tensor, R: torch.Tensor, steps: int, lr: float,
         sigmas: tuple[float, float], full: bool, prior: dict, desc: str,
         pair_every: int) -> list[float]:
    """Adam on the robust Chamfer (+ priors when `full`); only s, t and the global rotation
    move unless `full`; nearest pairs are renewed every `pair_every` steps (ICP style).
    pts: [N, 3] raw scan samples; R: [3, 3]. Returns the loss history."""
    params = [uk.log_s, uk.t, uk.rot] + ([uk.neck, uk.jaw, uk.shape, uk.exp] if full else [])
    opt = torch.optim.Adam(params, lr=lr)
    history = []
    for i in tqdm(range(steps), desc=desc, unit="step", leave=False):
        frac = i / max(steps - 1, 1)
        sigma = sigmas[0] * (sigmas[1] / sigmas[0]) ** frac
        x = torch.exp(uk.log_s) * pts @ R.T + uk.t
        verts = flame(uk.shape[None], uk.exp[None], uk.pose()[None]).vertices[0]
        if i % pair_every == 0:
            pairs = nearest_pairs(x.detach(), verts.detach())
        loss = robust_chamfer(x, verts, sigma, pairs)
        total = loss
        if full:
            total = total + prior["shape"] * (uk.shape ** 2).sum() \
                + prior["exp"] * (uk.exp ** 2).sum() \
                + prior["pose"] * ((uk.neck ** 2).sum() + (uk.jaw ** 2).sum())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        history.append(float(loss.detach()))
    return history


def fit_flame(server, scan_pts: np.ndarray, orientations=("identity", "flip_yz"),
              n_points: int = 2000, rigid_steps: int = 100, full_steps: int = 200,
              lr: float = 0.01, sigma_rigid: float = 0.15, sigma_full=(0.08, 0.03),
              prior_shape: float = 1e-4, prior_exp: float = 1e-4, prior_pose: float = 1e-2,
              pair_every: int = 1, seed: int = 0) -> FlameFit:
    """Fit FLAME to a scan given by its area-weighted samples scan_pts [N, 3] (file units).

    server: a FLAMEServer (its FLAME runs on the CPU here; the fit is small). Returns FlameFit.
    """
    unknown = [o for o in orientations if o not in ORIENTATIONS]
    if unknown or not orientations:
        raise ValueError(f"fit_flame: orientations must be among {sorted(ORIENTATIONS)}, "
                         f"got {list(orientations)}")
    flame = server.flame
    dev = flame.v_template.device
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(scan_pts), size=min(n_points, len(scan_pts)), replace=False)
    pts = torch.as_tensor(scan_pts[pick], dtype=torch.float32, device=dev)
    with torch.no_grad():
        zero = torch.zeros(1, 15, device=dev)
        tmpl = flame(torch.zeros(1, server.n_shape, device=dev),
                     torch.zeros(1, server.n_exp, device=dev), zero).vertices[0]
    tmpl_pts = sample_surface(tmpl, flame.faces, 20000, seed)[0].cpu().numpy()
    scan_ref = scan_pts[rng.choice(len(scan_pts), size=min(20000, len(scan_pts)), replace=False)]
    prior = {"shape": prior_shape, "exp": prior_exp, "pose": prior_pose}

    best = None
    for name in orientations:
        R0 = ORIENTATIONS[name]
        s, t = initial_similarity(scan_ref, tmpl_pts, R0)
        uk = _Unknowns(s, t, server.n_shape, server.n_exp).to(dev)
        R = torch.as_tensor(R0, dtype=torch.float32, device=dev)
        hist = _run(flame, uk, pts, R, rigid_steps, lr, (sigma_rigid, sigma_rigid), False, prior,
                    f"FLAME rigid ({name})", pair_every)
        loss = hist[-1] if hist else float("inf")
        if best is None or loss < best[0]:
            best = (loss, name, uk, R, hist)
    _, name, uk, R, hist = best
    hist = hist + _run(flame, uk, pts, R, full_steps, lr, tuple(sigma_full), True, prior,
                       "FLAME shape/pose/expression", pair_every)
    with torch.no_grad():
        params = torch.zeros(server.full_length, device=dev)
        params[0] = 1.0
        params[4:19] = uk.pose()
        params[19:19 + server.n_shape] = uk.shape
        params[19 + server.n_shape:] = uk.exp
        x = torch.exp(uk.log_s) * pts @ R.T + uk.t
        verts = flame(uk.shape[None], uk.exp[None], uk.pose()[None]).vertices[0]
        final = float(robust_chamfer(x, verts, sigma_full[1]))
    transform = Similarity(scale=float(torch.exp(uk.log_s.detach())),
                           rotation=ORIENTATIONS[name].copy(),
                           translation=uk.t.detach().cpu().double().numpy())
    return FlameFit(transform=transform, params=params.cpu(), orientation=name, loss=final,
                    history=hist)

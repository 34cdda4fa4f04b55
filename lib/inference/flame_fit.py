"""FLAME fit of a raw scan in arbitrary units, position and orientation, without landmarks
(eval_mode=fit when no FLAME parameters are given).

Shape legend: N scan samples, V FLAME vertices, S shape components, X expression components,
P parameter-vector length (169).

Unknowns: a similarity taking the scan into FLAME space, x_f = s * x @ (R_d R0).T + t (R0 a
candidate orientation, R_d a small rotation, s and t optimized), and FLAME's global, neck and
jaw rotations, shape and expression (eyes stay 0). Coarse to fine:
1. candidates: every orientation R0 (`orientations`: names of
   `lib.inference.scan.ORIENTATIONS`, `any` for the 24 rotations that map axes onto axes,
   `pca` for those 24 after aligning the scan's principal axes with the coordinate axes)
   times every head fraction h of `head_fractions`: scale and translation match the centroid
   and RMS radius of the top h of the rotated scan (along FLAME's up axis: a bust's head is its
   top part) to those of the FLAME template (mean shape, zero pose). Each candidate is judged
   on its own head part (the top h of the samples): `screen_steps` rigid steps (s, t, R_d) of
   `screen_points` samples against as many template vertices; the best `keep_candidates` then
   take `rigid_steps` steps against the whole template with the kernel narrowing from
   `sigma_rigid` to `sigma_full[0]` (so that the face, not only the head's outline, decides
   between front and back); the lowest final loss wins;
2. everything (R_d frozen; FLAME's global rotation takes over), the kernel narrowing from
   `sigma_full[0]` to `sigma_full[1]`, with quadratic priors pulling shape, expression and the
   neck/jaw rotations to 0.
Robust Chamfer: with d_sf the distance from each scan sample to its nearest FLAME vertex and
d_fs from each FLAME vertex to its nearest scan sample,
    loss = mean rho(d_sf^2) + mean rho(d_fs^2),   rho(q) = q / (q + sigma^2)  (Geman-McClure)
so hair, shoulders and FLAME's inner parts (eyeballs, mouth) that have no counterpart saturate
instead of dragging the fit. Nearest pairs are found without gradients (k-d trees) every
`pair_every` steps (every step in the rigid stage), then the squared distances of the pairs
are differentiated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from lib.flame.lbs import batch_rodrigues
from lib.inference.metrics import sample_surface
from lib.inference.scan import ORIENTATIONS, Similarity, axis_rotations
from lib.utils.errors import ModuleErrors
from lib.utils.knn import nearest_exact

__all__ = ["FlameFit", "initial_similarity", "principal_frame", "nearest_pairs",
           "robust_chamfer", "fit_flame"]

_err = ModuleErrors(__name__)


@dataclass
class FlameFit:
    """transform: scan -> FLAME space; params: [P] FLAME vector (scale 1, translation 0: the
    scan is moved instead); orientation: the kept candidate's name; loss: final robust
    Chamfer; history: loss per step of the kept run; candidates: per candidate its name, head
    fraction, screening loss and (for the kept few) rigid loss."""

    transform: Similarity
    params: torch.Tensor
    orientation: str
    loss: float
    history: list = field(default_factory=list)
    candidates: list = field(default_factory=list)


def initial_similarity(scan_pts: np.ndarray, template_pts: np.ndarray, rotation: np.ndarray,
                       head_fraction: float = 1.0) -> tuple[float, np.ndarray]:
    """Scale and translation matching centroid and RMS radius of the rotated scan samples
    scan_pts [N, 3] (only the top head_fraction of their extent along y) to template_pts
    [M, 3]. Returns (s, t [3])."""
    x = np.asarray(scan_pts, dtype=np.float64) @ rotation.T
    y = np.asarray(template_pts, dtype=np.float64)
    if head_fraction < 1.0:
        x = x[x[:, 1] >= x[:, 1].max() - head_fraction * np.ptp(x[:, 1])]
    cx, cy = x.mean(0), y.mean(0)
    rx = np.sqrt(((x - cx) ** 2).sum(1).mean())
    ry = np.sqrt(((y - cy) ** 2).sum(1).mean())
    if not rx > 0:
        raise _err("initial_similarity: the scan samples are all at one point")
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
         sigmas: tuple[float, float], prior: dict, desc: str, pair_every: int) -> list[float]:
    """Adam on the robust Chamfer plus the priors, every unknown moving; nearest pairs are
    renewed every `pair_every` steps (ICP style). pts: [N, 3] raw scan samples; R: [3, 3].
    Returns the loss history (the Chamfer term)."""
    opt = torch.optim.Adam(uk.parameters(), lr=lr)
    history = []
    for i in tqdm(range(steps), desc=desc, unit="step", leave=False):
        frac = i / max(steps - 1, 1)
        sigma = sigmas[0] * (sigmas[1] / sigmas[0]) ** frac
        x = torch.exp(uk.log_s) * pts @ R.T + uk.t
        verts = flame(uk.shape[None], uk.exp[None], uk.pose()[None]).vertices[0]
        if i % pair_every == 0:
            pairs = nearest_pairs(x.detach(), verts.detach())
        loss = robust_chamfer(x, verts, sigma, pairs)
        total = loss + prior["shape"] * (uk.shape ** 2).sum() \
            + prior["exp"] * (uk.exp ** 2).sum() \
            + prior["pose"] * ((uk.neck ** 2).sum() + (uk.jaw ** 2).sum())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        history.append(float(loss.detach()))
    return history


class _Rigid(torch.nn.Module):
    """The scan's similarity during the rigid stage, x_f = s * (x - c) @ (R_d R0).T + t_c: a
    small rotation R_d (axis-angle rvec [3]) about the centre c [3] of the candidate's head
    part (raw units; rotating about the raw origin would swing a scan far from it by its
    distance times the angle), log-scale and t_c [3] (where c lands)."""

    def __init__(self, s: float, t: np.ndarray, centre: torch.Tensor, R0: torch.Tensor):
        super().__init__()
        self.register_buffer("centre", centre.detach().clone())
        self.log_s = torch.nn.Parameter(torch.tensor(float(np.log(s))))
        t_c = float(s) * centre @ R0.T + torch.as_tensor(t, dtype=centre.dtype)
        self.t = torch.nn.Parameter(t_c.detach().clone())
        self.rvec = torch.nn.Parameter(torch.zeros(3, dtype=centre.dtype))

    def rotation(self, R0: torch.Tensor) -> torch.Tensor:
        """R_d R0: [3, 3]."""
        return batch_rodrigues(self.rvec) @ R0

    def forward(self, pts: torch.Tensor, R0: torch.Tensor) -> torch.Tensor:
        """pts [N, 3] raw -> [N, 3] in FLAME space."""
        return torch.exp(self.log_s) * (pts - self.centre) @ self.rotation(R0).T + self.t

    @torch.no_grad()
    def similarity(self, R0: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """The same map as x_f = s * x @ R.T + t: (s, R [3, 3], t [3])."""
        s, R = float(torch.exp(self.log_s)), self.rotation(R0)
        return s, R, self.t - s * self.centre @ R.T


def _rigid(model: _Rigid, pts: torch.Tensor, R0: torch.Tensor, tmpl: torch.Tensor, steps: int,
           lr: float, sigmas: tuple[float, float]) -> list[float]:
    """Adam on the robust Chamfer between the moved scan samples pts [N, 3] and the fixed
    template vertices tmpl [V, 3], the kernel narrowing geometrically from sigmas[0] to
    sigmas[1]. Returns the loss history."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for i in range(steps):
        sigma = sigmas[0] * (sigmas[1] / sigmas[0]) ** (i / max(steps - 1, 1))
        x = model(pts, R0)
        loss = robust_chamfer(x, tmpl, sigma, nearest_pairs(x.detach(), tmpl))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return history


def _top_part(pts: torch.Tensor, R: torch.Tensor, h: float) -> torch.Tensor:
    """The samples [N', 3] of pts [N, 3] in the top fraction h of their extent along y after
    the rotation R [3, 3] (a bust's head hypothesis)."""
    y = (pts @ R.T)[:, 1]
    return pts[y >= y.max() - h * (y.max() - y.min())]


def principal_frame(pts: np.ndarray) -> np.ndarray:
    """The principal axes of points pts [N, 3] as the columns of a rotation E [3, 3] (det +1),
    largest variance first: E.T maps them onto x, y, z."""
    x = np.asarray(pts, dtype=np.float64)
    _, vecs = np.linalg.eigh(np.cov((x - x.mean(0)).T))
    E = vecs[:, ::-1].copy()
    if np.linalg.det(E) < 0:
        E[:, 2] *= -1.0
    return E


def _orientation_set(orientations, scan_pts: np.ndarray | None = None
                     ) -> dict[str, np.ndarray]:
    """Candidate rotations [3, 3] by name: `any` -> all 24 axis rotations; `pca` -> the 24
    axis rotations after the one taking the scan's principal axes (of scan_pts [N, 3]) onto
    the coordinate axes (named `pca_<axis rotation>`: a scan in any orientation then has a
    candidate within the principal axes' error of its own); other names: the named
    ORIENTATIONS. Names may be combined."""
    names = [orientations] if isinstance(orientations, str) else list(orientations)
    unknown = [o for o in names if o not in ORIENTATIONS and o not in ("any", "pca")]
    if unknown or not names:
        raise _err(f"fit_flame: orientations must be 'any', 'pca' or among "
                   f"{sorted(ORIENTATIONS)}, got {names}")
    out = axis_rotations() if "any" in names else {}
    out.update({o: ORIENTATIONS[o] for o in names if o in ORIENTATIONS})
    if "pca" in names:
        if scan_pts is None:
            raise _err("fit_flame: the 'pca' orientations need the scan's points")
        Et = principal_frame(scan_pts).T
        out.update({f"pca_{k}": Q @ Et for k, Q in axis_rotations().items()})
    return out


def fit_flame(server, scan_pts: np.ndarray, orientations=("any", "pca"),
              head_fractions=(1.0, 0.6, 0.4), n_points: int = 2000, screen_points: int = 500,
              screen_steps: int = 15, keep_candidates: int = 6, rigid_steps: int = 100,
              full_steps: int = 200, lr: float = 0.01, sigma_rigid: float = 0.15,
              sigma_full=(0.08, 0.03), prior_shape: float = 1e-4, prior_exp: float = 1e-4,
              prior_pose: float = 1e-2, pair_every: int = 1, seed: int = 0) -> FlameFit:
    """Fit FLAME to a scan given by its area-weighted samples scan_pts [N, 3] (file units).

    server: a FLAMEServer (its FLAME runs on the CPU here; the fit is small). Returns FlameFit.
    """
    cands = _orientation_set(orientations, scan_pts)
    fractions = [float(h) for h in head_fractions]
    if not fractions or not all(0.0 < h <= 1.0 for h in fractions):
        raise _err(f"fit_flame: head_fractions must be in (0, 1], got {fractions}")
    flame = server.flame
    dev = flame.v_template.device
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(scan_pts), size=min(n_points, len(scan_pts)), replace=False)
    pts = torch.as_tensor(scan_pts[pick], dtype=torch.float32, device=dev)
    n_screen = min(screen_points, len(pts))
    with torch.no_grad():
        zero = torch.zeros(1, 15, device=dev)
        tmpl = flame(torch.zeros(1, server.n_shape, device=dev),
                     torch.zeros(1, server.n_exp, device=dev), zero).vertices[0]
    tmpl_pts = sample_surface(tmpl, flame.faces, 20000, seed)[0].cpu().numpy()
    scan_ref = scan_pts[rng.choice(len(scan_pts), size=min(20000, len(scan_pts)), replace=False)]
    prior = {"shape": prior_shape, "exp": prior_exp, "pose": prior_pose}

    # screening: as many template vertices (a random subset) as scan samples
    sub = rng.choice(len(tmpl), size=min(n_screen, len(tmpl)), replace=False)
    tmpl_few = tmpl[torch.as_tensor(sub, device=dev)]
    screened = []
    for name, R0 in tqdm(cands.items(), desc="FLAME orientation search", unit="orientation",
                         leave=False):
        R = torch.as_tensor(R0, dtype=torch.float32, device=dev)
        for h in fractions:
            s, t = initial_similarity(scan_ref, tmpl_pts, R0, h)
            top = _top_part(pts, R, h)
            rig = _Rigid(s, t, top.mean(0), R).to(dev)
            hist = _rigid(rig, top[:n_screen], R, tmpl_few, screen_steps, 2 * lr,
                          (sigma_rigid, sigma_rigid))
            screened.append({"name": name, "head_fraction": h, "top": top, "R": R,
                             "model": rig, "loss": hist[-1] if hist else float("inf")})
    screened.sort(key=lambda c: c["loss"])
    best = None
    for cand in tqdm(screened[:max(1, keep_candidates)], desc="FLAME rigid (kept candidates)",
                     unit="candidate", leave=False):
        hist = _rigid(cand["model"], cand["top"], cand["R"], tmpl, rigid_steps, lr,
                      (sigma_rigid, sigma_full[0]))
        cand["rigid_loss"] = hist[-1] if hist else cand["loss"]
        if best is None or cand["rigid_loss"] < best[0]:
            best = (cand["rigid_loss"], cand, hist)
    _, cand, hist = best
    s, R, t = cand["model"].similarity(cand["R"])
    uk = _Unknowns(s, t.cpu().numpy(), server.n_shape, server.n_exp).to(dev)
    hist = hist + _run(flame, uk, pts, R, full_steps, lr, tuple(sigma_full), prior,
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
                           rotation=R.cpu().double().numpy(),
                           translation=uk.t.detach().cpu().double().numpy())
    table = [{"name": c["name"], "head_fraction": c["head_fraction"],
              "screen_loss": round(c["loss"], 5),
              **({"rigid_loss": round(c["rigid_loss"], 5)} if "rigid_loss" in c else {})}
             for c in screened]
    return FlameFit(transform=transform, params=params.cpu(), orientation=cand["name"],
                    loss=final, history=hist, candidates=table)

"""Raw scan fitting, end to end (docs/design.md, Inference; eval_mode=fit).

Shape legend: V vertices, F faces, N samples, P parameter-vector length (169), H/W image.

Steps of `run_fit`:
1. load the scan (`lib.inference.scan`); colours come from its texture or vertex colours;
2. FLAME space: with a FaceVerse parameter file (`flame=<pkl>`), its registration (scale,
   translation, the y/z flip) and FLAME parameters; without one, `lib.inference.flame_fit`
   finds a similarity (scale, translation, orientation) and FLAME's pose, shape, expression;
3. z_shape, then z_detail and z_color (`lib.inference.latent_fit`), networks frozen; an
   untextured scan (or `geometry_only`) fits z_shape and z_detail only;
4. metrics (`lib.inference.metrics`) in FLAME space against the scan, for the fit, for the
   FLAME-only fit (the baseline) and for the starting codes (the embeddings' means).
Options: `FitOptions` (the `test.fit` block of configs/config.yaml; its `flame` sub-block,
`FlameFitOptions`, configures step 2 without a parameter file).
Outputs under `out_dir`: `fitted.ply` (posed, FLAME space, colours and normals),
`fitted_canonical.ply`, `flame_only.ply`, `scan_flame_space.ply`, `compare.png` (front and
side: scan | scan normals | FLAME only | fit RGB | fit normals), `metrics.json`, `fit.json`
(transform, FLAME parameters, loss histories) and `codes.npz`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lib.inference.avatar import Avatar
from lib.inference.loading import InferenceError, is_stage2, require_stage2
from lib.inference.metrics import head_size, mesh_metrics
from lib.inference.options import ConfigOptions
from lib.inference.sampling import code_gaussians
from lib.inference.scan import ScanData, Similarity, load_scan, scan_samples
from lib.render.images import add_label, make_grid, save_png
from lib.render.shading import render_normals, render_shaded, render_texture, render_vertex_colors
from lib.utils.atomic import atomic_path

__all__ = ["FitOptions", "FlameFitOptions", "faceverse_similarity", "render_scan", "run_fit"]


@dataclass(frozen=True)
class FlameFitOptions(ConfigOptions):
    """The FLAME fit of a scan without a parameter file (lib/inference/flame_fit.fit_flame's
    arguments): the `test.fit.flame` block of configs/config.yaml."""

    BLOCK = "test.fit.flame"
    # candidate orientations of the scan (flip_yz: the FaceVerse layout, y down)
    orientations: tuple[str, ...] = ("identity", "flip_yz")
    n_points: int = 2000    # scan samples the fit matches
    rigid_steps: int = 100  # Adam steps on scale, rotation and translation ...
    full_steps: int = 200   # ... then on those and FLAME's pose, shape and expression
    lr: float = 1e-2        # Adam learning rate


@dataclass(frozen=True)
class FitOptions(ConfigOptions):
    """Options of eval_mode=fit: the `test.fit` block of configs/config.yaml (defaults equal
    the config's; lib/inference/options.py builds and checks them)."""

    BLOCK = "test.fit"
    geometry_only: bool = False   # fit z_shape / z_detail only, even for a textured scan
    n_surface: int = 20000        # scan surface samples (normals, colours, occupancy seeds)
    n_near: int = 20000           # occupancy points near the scan (half at sigma 0.01, half 0.05)
    n_uniform: int = 5000         # occupancy points uniform in the bounding box
    shape_steps: int = 100        # Adam steps on z_shape
    detail_steps: int = 100       # Adam steps on z_detail / z_color
    shape_lr: float = 3e-2        # Adam learning rate of z_shape ...
    detail_lr: float = 1e-2       # ... and of z_detail / z_color
    batch: int = 2000             # points per step
    lambda_reg: float = 1e-3      # mean-square penalty of the codes
    n_metric: int = 20000         # samples per surface for the metrics
    res: int = 256                # compare.png tile size
    mesh_res: int = 128           # canonical mesh extraction resolution (cells per axis)
    seed: int = 42                # seed of the samples and of the fits
    flame: FlameFitOptions = field(default_factory=FlameFitOptions)


def faceverse_similarity(verts: np.ndarray, scale: float, transl, z_shift: float) -> Similarity:
    """The FaceVerse registration (lib.dataset.faceverse_io.scan_to_flame_space) of a scan
    with vertices verts [V, 3] as a Similarity: flip y and z, subtract the mid z, then
    6 / scale * (v - transl) + (0, 0, z_shift)."""
    R = np.diag([1.0, -1.0, -1.0])
    w = np.asarray(verts, dtype=np.float64) @ R.T
    mid = 0.5 * (w[:, 2].min() + w[:, 2].max())
    s = 6.0 / float(scale)
    t = -s * (np.asarray(transl, dtype=np.float64).reshape(3) + np.array([0.0, 0.0, mid]))
    return Similarity(scale=s, rotation=R, translation=t + np.array([0.0, 0.0, z_shift]))


def _rot_y(angle: float, like: torch.Tensor) -> torch.Tensor:
    """[3, 3] rotation by angle about the vertical (y) axis."""
    c, s = math.cos(angle), math.sin(angle)
    return like.new_tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _turn(verts: torch.Tensor, angle: float, center: torch.Tensor) -> torch.Tensor:
    """verts [V, 3] turned by angle about the vertical axis through center [3]."""
    return (verts - center) @ _rot_y(angle, verts).T + center


def render_scan(scan: ScanData, verts_f: torch.Tensor, res: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour (texture, vertex colours, or shaded grey) and normal image [H, W, 3] of a scan
    whose vertices in FLAME space are verts_f [V, 3]."""
    faces = torch.as_tensor(scan.faces, device=verts_f.device)
    if scan.texture is not None:
        tex = torch.as_tensor(scan.texture, device=verts_f.device).float() / 255.0
        rgb = render_texture(verts_f, faces, torch.as_tensor(scan.uvs).to(verts_f),
                             torch.as_tensor(scan.face_uvs, device=verts_f.device), tex, res)
    elif scan.vertex_colors is not None:
        rgb = render_vertex_colors(verts_f, faces, torch.as_tensor(scan.vertex_colors).to(verts_f),
                                   res)
    else:
        rgb = render_shaded(verts_f, faces, res)
    return rgb[0], render_normals(verts_f, faces, res)[0]


def _posed(avatar: Avatar, params: torch.Tensor):
    verts, normals = avatar.pose(params)
    return verts[0], normals[0]


class _Clock:
    """Seconds per phase: clock('name') records the time since the previous call."""

    def __init__(self):
        self.laps, self._t = {}, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 3)
        self._t = now


def _write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


def run_fit(model, scan_path, out_dir, options: FitOptions | None = None,
            flame_path=None) -> dict:
    """Fit a raw scan (module docstring). options: FitOptions (None: the defaults);
    flame_path: optional FaceVerse `<id>_flame.pkl` (else FLAME is fitted with
    options.flame). Returns the metrics dict (also written to metrics.json, with the seconds
    per phase)."""
    from lib.inference.latent_fit import fit_detail_color, fit_shape, occupancy_samples

    o = options or FitOptions()
    seed, res, mesh_res, n_metric = o.seed, o.res, o.mesh_res, o.n_metric
    batch, lambda_reg = o.batch, o.lambda_reg
    out_dir = Path(out_dir)
    clock = _Clock()
    scan = load_scan(scan_path)
    use_color = scan.has_color and not o.geometry_only
    if use_color:
        require_stage2(model, f"fitting the colours of the textured scan {scan_path} "
                              "(add test.fit.geometry_only=true to fit its geometry only)")
    server = model.flame_server
    ref = model.bbox_min
    samples = scan_samples(scan, o.n_surface, seed)

    if flame_path is not None:
        from lib.dataset.faceverse_io import load_flame_params, params_to_vector

        p = load_flame_params(flame_path)
        transform = faceverse_similarity(scan.verts, p["scale"], p["transl"],
                                         server.flame.z_shift)
        params = torch.as_tensor(params_to_vector(p))
        flame_info = {"source": str(flame_path)}
    else:
        from lib.inference.flame_fit import fit_flame

        ff = fit_flame(server, samples["points"], seed=seed, **asdict(o.flame))
        transform, params = ff.transform, ff.params
        flame_info = {"source": "fitted", "orientation": ff.orientation, "loss": ff.loss,
                      "history": ff.history}
    clock("flame")
    params = params.to(ref).reshape(1, -1)
    verts_f = transform.apply(scan.verts)
    pts_f = transform.apply(samples["points"])
    nrm_f = transform.apply_normals(samples["normals"])

    occ_pts, occ = occupancy_samples(verts_f, scan.faces, pts_f, o.n_near, o.n_uniform,
                                     bbox_min=ref.cpu().numpy(),
                                     bbox_max=model.bbox_max.cpu().numpy(), seed=seed)
    means = {k: g.mean[None].to(ref) for k, g in code_gaussians(model).items()}
    betas = server.split_params(params)["shape"]
    start = Avatar(model, means["z_shape"], means["z_detail"], means["z_color"], betas,
                   mesh_res=mesh_res)
    z_shape, shape_hist = fit_shape(model, params, torch.as_tensor(occ_pts).to(ref),
                                    torch.as_tensor(occ).to(ref), means["z_shape"],
                                    o.shape_steps, o.shape_lr, batch, lambda_reg, seed)
    clock("z_shape")
    z_detail, z_color, detail_hist = means["z_detail"], means["z_color"], {}
    if is_stage2(model) and o.detail_steps > 0:
        colors = None
        if use_color:
            from lib.dataset.scan_sampling import colour_targets

            colors = torch.as_tensor(colour_targets(samples["colors"])).to(ref)
        z_detail, z_color, detail_hist = fit_detail_color(
            model, params, z_shape, torch.as_tensor(pts_f).to(ref), torch.as_tensor(nrm_f).to(ref),
            colors, z_detail, z_color, o.detail_steps, o.detail_lr, batch, lambda_reg, seed=seed)
    clock("z_detail_color")
    fitted = Avatar(model, z_shape, z_detail, z_color, betas, mesh_res=mesh_res)

    # ---------------------------------------------------------------- metrics
    scan_v = torch.as_tensor(verts_f).to(ref)
    size = head_size(verts_f)
    with torch.no_grad():
        flame_v = server(params).verts[0]
    fit_v, fit_n = _posed(fitted, params)
    start_v, _ = _posed(start, params)
    faces_scan = torch.as_tensor(scan.faces, device=ref.device)
    metrics = {
        "scan": str(scan_path), "units": "FLAME space (FLAME meters x 6)", "head_size": size,
        "fscore_thresholds": {"fscore_1pct": 0.01 * size, "fscore_2pct": 0.02 * size},
        "fit": mesh_metrics(fit_v, fitted.faces, scan_v, faces_scan, n_metric, seed, size),
        "flame_only": mesh_metrics(flame_v, server.flame.faces, scan_v, faces_scan, n_metric,
                                   seed, size),
        "start": mesh_metrics(start_v, start.faces, scan_v, faces_scan, n_metric, seed, size),
        "color_fitted": bool(use_color and is_stage2(model)),
        "flame_params_from": flame_info["source"],
    }
    clock("metrics")

    # ---------------------------------------------------------------- files
    fitted.save_mesh(out_dir / "fitted.ply", fit_v, fit_n)
    fitted.save_canonical(out_dir / "fitted_canonical.ply")
    from lib.utils.mesh_io import save_ply

    save_ply(out_dir / "flame_only.ply", flame_v.cpu().numpy(), server.flame.faces.cpu().numpy())
    save_ply(out_dir / "scan_flame_space.ply", verts_f, scan.faces, colors=scan.vertex_colors)
    center = scan_v.mean(dim=0)
    tiles = []
    for angle, view in ((0.0, "front"), (math.pi / 2, "side")):
        scan_rgb, scan_nrm = render_scan(scan, _turn(scan_v, angle, center), res)
        flame_img = render_shaded(_turn(flame_v, angle, center), server.flame.faces, res)[0]
        R = _rot_y(angle, ref)
        fit_rgb, fit_nrm = fitted.render(_turn(fit_v, angle, center)[None], (fit_n @ R.T)[None],
                                         res)
        for img, label in ((scan_rgb, f"scan {view}"), (scan_nrm, "scan normals"),
                           (flame_img, "FLAME only"), (fit_rgb[0], "fit"),
                           (fit_nrm[0], "fit normals")):
            tiles.append(add_label(img.cpu().numpy(), label))
    save_png(out_dir / "compare.png", make_grid(tiles, ncols=5))
    _write_json(out_dir / "fit.json", {
        "transform": transform.to_dict(), "flame": flame_info,
        "flame_params": params[0].cpu().tolist(), "shape_bce": shape_hist,
        "detail": detail_hist})
    from lib.utils.mesh_io import save_npz

    save_npz(out_dir / "codes.npz", z_shape=z_shape.cpu().numpy(),
             z_detail=z_detail.cpu().numpy(), z_color=z_color.cpu().numpy(),
             flame_params=params.cpu().numpy())
    clock("files")
    metrics["seconds"] = clock.laps
    _write_json(out_dir / "metrics.json", metrics)
    if not np.isfinite(metrics["fit"]["chamfer_l1"]):
        raise InferenceError(f"fit of {scan_path}: non-finite metrics")
    return metrics

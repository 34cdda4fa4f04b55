"""Raw scan fitting, end to end (docs/design.md, Inference; eval_mode=fit).

Shape legend: V vertices, F faces, N samples, P parameter-vector length (169), H/W image.

Steps of `run_fit`:
1. load the scan (`lib.inference.scan`); colours come from its texture or vertex colours;
2. FLAME space: with a FaceVerse parameter file (`flame=<pkl>`), its registration (scale,
   translation, the y/z flip) and FLAME parameters; without one, `lib.inference.flame_fit`
   finds a similarity (scale, translation, orientation) and FLAME's pose, shape, expression;
3. the head region (`lib.inference.crop`, unless `crop.enabled` is false): the neck,
   shoulders, torso, loose pieces and spikes beyond the fitted FLAME head are cut off; the
   rest is what is fitted and scored;
4. the start (`start_candidates`, `lib.inference.latent_fit.pick_start`): among the training
   codes whose FLAME shapes are nearest the fitted one (`init.nearest`), the codes' mean and
   `init.samples` draws from their Gaussians, the one with the lowest occupancy BCE;
5. z_shape (with the opt-in `code_units=spread` in units of the embeddings' spread, with the
   codes' Gaussian prior), then z_detail and z_color (`lib.inference.latent_fit`), networks frozen;
   an untextured scan (or `geometry_only`) fits z_shape and z_detail only; with the opt-in
   `tune_steps` > 0, the shape generator and occupancy network are tuned to the scan between
   the two (`lib.inference.tune`, the fitted z_shape held);
6. metrics (`lib.inference.metrics`) in FLAME space against the (cropped) scan, for the fit,
   the FLAME-only fit (the baseline), the chosen start and the codes' mean, and what each
   stage bought (`stages`); `safeguard` says whether the fit beat its start and the baseline
   (reported, never hidden or swapped: the fitted codes are written either way).
Options: `FitOptions` (the `test.fit` block of configs/config.yaml; its sub-blocks `flame`
(`FlameFitOptions`, step 2 without a parameter file), `crop` (`CropOptions`, step 3) and `init`
(`StartOptions`, step 4)).
Outputs under `out_dir`: `fitted.ply` (posed, FLAME space, colours and normals),
`fitted_canonical.ply`, `flame_only.ply`, `scan_flame_space.ply` (the whole scan moved into
FLAME space), `scan_head_region.ply` (what the crop kept: fitted and scored; only when it cut
something), `compare.png` (front and side: head region | its normals | FLAME only | fit RGB |
fit normals), `metrics.json`, `fit.json` (transform, FLAME parameters and candidates, loss
histories) and `codes.npz`; when tuned, `tuned_networks.pt` (the tuned modules' weights)
and the z_shape fit's metrics before tuning (`tuned.z_shape_fit`).
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lib.inference.avatar import Avatar
from lib.inference.loading import InferenceError, is_stage2, require_stage2, resolve_subject
from lib.inference.metrics import head_size, mesh_metrics
from lib.inference.options import ConfigOptions
from lib.inference.sampling import CODE_NAMES, code_gaussians, evenly
from lib.inference.scan import ScanData, Similarity, load_scan, scan_samples
from lib.render.images import add_label, make_grid, save_png
from lib.render.shading import render_normals, render_shaded, render_texture, render_vertex_colors
from lib.utils.atomic import atomic_path

__all__ = ["FitOptions", "FlameFitOptions", "CropOptions", "StartOptions", "CODE_UNITS",
           "faceverse_similarity", "render_scan", "training_betas", "start_candidates",
           "run_fit"]

CODE_UNITS = ("spread", "raw")  # test.fit.code_units


@dataclass(frozen=True)
class FlameFitOptions(ConfigOptions):
    """The FLAME fit of a scan without a parameter file (lib/inference/flame_fit.fit_flame's
    arguments): the `test.fit.flame` block of configs/config.yaml."""

    BLOCK = "test.fit.flame"
    # candidate orientations of the scan: `any` (the 24 axis-to-axis rotations), `pca` (those
    # 24 after aligning the scan's principal axes: any angle) or names of
    # lib/inference/scan.ORIENTATIONS (identity, flip_yz: the FaceVerse layout, y down, ...)
    orientations: tuple[str, ...] = ("any", "pca")
    # top fractions of the scan (along the candidate's up axis) tried as the head (busts)
    head_fractions: tuple[float, ...] = (1.0, 0.6, 0.4)
    n_points: int = 2000      # scan samples the fit matches
    screen_points: int = 500  # of them, those that screen every candidate ...
    screen_steps: int = 15    # ... in this many rigid steps;
    keep_candidates: int = 6  # the best few then take
    rigid_steps: int = 100    # Adam steps on scale, rotation and translation ...
    full_steps: int = 200     # ... then on those and FLAME's pose, shape and expression
    lr: float = 1e-2          # Adam learning rate


@dataclass(frozen=True)
class CropOptions(ConfigOptions):
    """The head region of the scan (lib/inference/crop.crop_head's settings): the
    `test.fit.crop` block of configs/config.yaml."""

    BLOCK = "test.fit.crop"
    enabled: bool = True      # false: the whole scan is fitted and scored
    neck_cut: float = 0.03    # neck plane: FLAME's lowest point + this x its height (up axis)
    margin: float = 0.15      # faces farther from FLAME than this x its height go
    spike_edge: float = 10.0  # faces with an edge over this x the median edge go
    min_piece: float = 0.02   # pieces under this fraction of the kept area go


@dataclass(frozen=True)
class StartOptions(ConfigOptions):
    """The start of the latent fit (`start_candidates`, latent_fit.pick_start): the
    `test.fit.init` block of configs/config.yaml. nearest = samples = 0: the codes' mean."""

    BLOCK = "test.fit.init"
    nearest: int = 3       # the training codes with the nearest FLAME shapes ...
    samples: int = 4       # ... and draws from the codes' Gaussians (beside their mean)
    n_points: int = 3000   # occupancy points that score them


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
    # raw: Adam on z_shape itself; spread (opt-in): in units of the codes' per-dimension spread
    code_units: str = "raw"
    lambda_code: float = 1e-2     # weight of the codes' Gaussian prior (code_units=spread)
    # opt-in: Adam steps tuning the shape generator and occupancy network to the scan after
    # the z_shape fit (lib/inference/tune.py; 0: every network frozen, the original method)
    tune_steps: int = 0
    tune_lr: float = 1e-4         # Adam learning rate of the tuned weights
    lambda_anchor: float = 1.0    # weight of the mean-square change of the tuned weights
    # occupancy points with |winding number| strictly inside this range are dropped; None
    # keeps all
    ambiguous: tuple[float, ...] | None = (0.3, 0.7)
    flame: FlameFitOptions = field(default_factory=FlameFitOptions)
    crop: CropOptions = field(default_factory=CropOptions)
    init: StartOptions = field(default_factory=StartOptions)

    def __post_init__(self):
        if self.code_units not in CODE_UNITS:
            raise InferenceError(f"{self.BLOCK}.code_units={self.code_units!r} is not one of "
                                 f"{', '.join(CODE_UNITS)}")
        if self.tune_steps < 0:
            raise InferenceError(f"{self.BLOCK}.tune_steps must be >= 0, got {self.tune_steps}")
        if self.ambiguous is not None and not (
                len(self.ambiguous) == 2 and 0 <= self.ambiguous[0] < self.ambiguous[1]):
            raise InferenceError(f"{self.BLOCK}.ambiguous must be null or [lo, hi] with "
                                 f"0 <= lo < hi, got {list(self.ambiguous)}")


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


def training_betas(model, processed_dir=None, data_list=None) -> torch.Tensor | None:
    """FLAME shapes [n_subjects, S] of the checkpoint's training subjects in embedding-row
    order, read from processed_dir (None when processed_dir is None or any of them is
    unknown)."""
    if processed_dir is None:
        return None
    rows = []
    for i in range(model.z_shapes.num_embeddings):
        try:
            sub = resolve_subject(model, i, data_list, processed_dir)
        except InferenceError:
            return None
        if sub.params is None:
            return None
        rows.append(model.flame_server.split_params(torch.as_tensor(sub.params)[None])["shape"])
    return torch.cat(rows).to(model.bbox_min)


def start_candidates(model, betas: torch.Tensor, train_betas: torch.Tensor | None,
                     nearest: int = 3, samples: int = 4, seed: int = 0) -> list[dict]:
    """Starting codes to choose from: the embeddings' mean, the `nearest` training subjects by
    FLAME shape (train_betas [n_subjects, S] against betas [1, S]; without train_betas, rows
    spread evenly over the embeddings) and `samples` draws from the embeddings' Gaussians.
    Each a dict of name, z_shape [1, Z], z_detail [1, D], z_color [1, C]."""
    fits = code_gaussians(model)
    ref = model.bbox_min
    out = [{"name": "code_mean", **{k: fits[k].mean[None].to(ref) for k in CODE_NAMES}}]
    if nearest > 0:
        if train_betas is not None:
            d = (train_betas - betas.reshape(1, -1).to(train_betas)).norm(dim=1)
            rows = [int(i) for i in torch.argsort(d)[:nearest]]
        else:
            rows = evenly(model.z_shapes.num_embeddings, nearest)
        for r in rows:
            idx = torch.tensor([r], device=ref.device)
            out.append({"name": f"training_row_{r}",
                        **{k: getattr(model, k + "s")(idx).detach() for k in CODE_NAMES}})
    gen = torch.Generator().manual_seed(int(seed))
    draws = {k: fits[k].sample(samples, 1.0, gen).to(ref) for k in CODE_NAMES}
    for i in range(samples):
        out.append({"name": f"sample_{i}", **{k: draws[k][i:i + 1] for k in CODE_NAMES}})
    return out


_GAIN_KEYS = ("chamfer_l1", "fscore_1pct", "fscore_2pct", "normal_consistency")


def _gain(after: dict, before: dict) -> dict:
    """Metric differences after - before (negative Chamfer, positive F-score: better)."""
    return {k: round(after[k] - before[k], 6) for k in _GAIN_KEYS}


def _beats(fit: dict, other: dict) -> dict:
    return {"chamfer_l1": fit["chamfer_l1"] < other["chamfer_l1"],
            "fscore_1pct": fit["fscore_1pct"] > other["fscore_1pct"]}


def run_fit(model, scan_path, out_dir, options: FitOptions | None = None,
            flame_path=None, processed_dir=None, data_list=None) -> dict:
    """Fit a raw scan (module docstring). options: FitOptions (None: the defaults);
    flame_path: optional FaceVerse `<id>_flame.pkl` (else FLAME is fitted with
    options.flame); processed_dir / data_list: the training data (datamodule.processed_dir,
    datamodule.data_list), whose FLAME shapes pick the nearest training codes to start from
    (without them those rows are spread over the embeddings). Returns the metrics dict (also
    written to metrics.json, with the seconds per phase)."""
    o = options or FitOptions()
    if o.tune_steps <= 0:
        return _fit(model, scan_path, out_dir, o, flame_path, processed_dir, data_list)
    from lib.inference.tune import restore_state, tuned_state

    trained = tuned_state(model)
    try:
        return _fit(model, scan_path, out_dir, o, flame_path, processed_dir, data_list)
    finally:  # the model keeps its trained weights for the next scan
        restore_state(model, trained)


def _fit(model, scan_path, out_dir, o: FitOptions, flame_path, processed_dir, data_list
         ) -> dict:
    """run_fit's work, with the options o; a tuned model is left tuned."""
    from lib.inference.crop import apply_crop, crop_head
    from lib.inference.latent_fit import (
        fit_detail_color,
        fit_shape,
        occupancy_samples,
        pick_start,
    )

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
                      "history": ff.history, "candidates": ff.candidates}
    clock("flame")
    params = params.to(ref).reshape(1, -1)
    with torch.no_grad():
        frames = server(params)
    flame_v = frames.verts[0]

    whole = scan
    plane, crop_info = None, {"enabled": False}
    if o.crop.enabled:
        c = o.crop
        cut = crop_head(transform.apply(scan.verts), scan.faces, flame_v, server.flame.faces,
                        frames.tfs[0, 0, :3, :3], c.neck_cut, c.margin, c.spike_edge,
                        c.min_piece, seed)
        if not cut.keep.any():
            raise InferenceError(f"fit of {scan_path}: no part of the scan lies in the head "
                                 "region of the fitted FLAME head (check the FLAME fit, or "
                                 "test.fit.crop.enabled=false)")
        crop_info = {"enabled": True, **cut.stats}
        if not cut.keep.all():
            scan = apply_crop(scan, cut.keep)
            samples = scan_samples(scan, o.n_surface, seed)
        plane = (cut.plane_point, cut.plane_normal)
    clock("crop")
    verts_f = transform.apply(scan.verts)
    pts_f = transform.apply(samples["points"])
    nrm_f = transform.apply_normals(samples["normals"])

    occ_pts, occ, occ_info = occupancy_samples(
        verts_f, scan.faces, pts_f, o.n_near, o.n_uniform, bbox_min=ref.cpu().numpy(),
        bbox_max=model.bbox_max.cpu().numpy(), seed=seed, ambiguous=o.ambiguous, plane=plane)
    occ_pts, occ = torch.as_tensor(occ_pts).to(ref), torch.as_tensor(occ).to(ref)
    betas = server.split_params(params)["shape"]
    cands = start_candidates(model, betas, training_betas(model, processed_dir, data_list),
                             o.init.nearest, o.init.samples, seed)
    best, scores = pick_start(model, params, occ_pts, occ, cands, o.init.n_points, seed)
    chosen = cands[best]
    clock("start")
    gauss = code_gaussians(model)["z_shape"]
    spread = None
    if o.code_units == "spread" and float(gauss.std.max()) > 0:
        # a dimension whose codes do not spread (one training subject) still moves a little
        spread = gauss.std.to(ref).clamp_min(1e-3 * float(gauss.std.max()))
    z_shape, shape_hist = fit_shape(model, params, occ_pts, occ, chosen["z_shape"],
                                    o.shape_steps, o.shape_lr, batch, lambda_reg, seed,
                                    std=spread, mean=gauss.mean.to(ref),
                                    lambda_code=o.lambda_code)
    clock("z_shape")

    scan_v = torch.as_tensor(verts_f).to(ref)
    size = head_size(verts_f)
    faces_scan = torch.as_tensor(scan.faces, device=ref.device)

    def score(verts, faces) -> dict:
        return mesh_metrics(verts, faces, scan_v, faces_scan, n_metric, seed, size)

    def score_codes(codes: dict) -> dict:
        avatar = Avatar(model, codes["z_shape"], codes["z_detail"], codes["z_color"], betas,
                        mesh_res=mesh_res)
        return score(_posed(avatar, params)[0], avatar.faces)

    # the start, the codes' mean and (when tuning follows) the z_shape fit are scored with the
    # trained networks, before tuning changes them; geometry depends on z_shape only
    start_m = score_codes(chosen)
    mean_m = start_m if best == 0 else score_codes(cands[0])
    shape_m, tune_hist = None, None
    if o.tune_steps > 0:
        from lib.inference.tune import tune_shape_networks

        shape_m = score_codes({**chosen, "z_shape": z_shape})
        clock("metrics_before_tune")
        tune_hist = tune_shape_networks(model, params, occ_pts, occ, z_shape, o.tune_steps,
                                        o.tune_lr, batch, o.lambda_anchor, seed)
        clock("tune")
    z_detail, z_color, detail_hist = chosen["z_detail"], chosen["z_color"], {}
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
    fit_v, fit_n = _posed(fitted, params)
    fit_m = score(fit_v, fitted.faces)
    flame_m = score(flame_v, server.flame.faces)
    beats = {"start": _beats(fit_m, start_m), "flame_only": _beats(fit_m, flame_m)}
    normal_loss = detail_hist.get("normal")
    metrics = {
        "scan": str(scan_path), "units": "FLAME space (FLAME meters x 6)", "head_size": size,
        "fscore_thresholds": {"fscore_1pct": 0.01 * size, "fscore_2pct": 0.02 * size},
        "fit": fit_m, "flame_only": flame_m, "start": start_m, "code_mean": mean_m,
        "stages": {"start_vs_code_mean": _gain(start_m, mean_m),
                   "z_shape_fit_vs_start": _gain(shape_m or fit_m, start_m),
                   **({"tune_vs_z_shape_fit": _gain(fit_m, shape_m)} if shape_m else {}),
                   "fit_vs_flame_only": _gain(fit_m, flame_m),
                   "z_detail_normal_loss": [normal_loss[0], normal_loss[-1]] if normal_loss
                   else None},
        "start_choice": {"chosen": chosen["name"],
                         "candidates": [{"name": c["name"], "bce": round(sc, 5)}
                                        for c, sc in zip(cands, scores)]},
        "safeguard": {"fit_beats": beats,
                      "note": "reported only: the fitted codes are written either way"},
        "crop": crop_info, "occupancy_points": occ_info,
        "code_units": o.code_units, "lambda_code": o.lambda_code,
        "tuned": None if shape_m is None else {
            "z_shape_fit": shape_m, "steps": o.tune_steps, "lr": o.tune_lr,
            "lambda_anchor": o.lambda_anchor, "weight_drift": tune_hist["drift"]},
        "color_fitted": bool(use_color and is_stage2(model)),
        "flame_params_from": flame_info["source"],
    }
    if not all(beats["start"].values()):
        warnings.warn(f"lib/inference/fitting.py: the fit of {scan_path} did not beat its start "
                      "on every metric (metrics.json: safeguard)", stacklevel=2)
    clock("metrics")

    # ---------------------------------------------------------------- files
    fitted.save_mesh(out_dir / "fitted.ply", fit_v, fit_n)
    fitted.save_canonical(out_dir / "fitted_canonical.ply")
    from lib.utils.mesh_io import save_ply

    save_ply(out_dir / "flame_only.ply", flame_v.cpu().numpy(), server.flame.faces.cpu().numpy())
    save_ply(out_dir / "scan_flame_space.ply", transform.apply(whole.verts), whole.faces,
             colors=whole.vertex_colors)
    if scan is not whole:
        save_ply(out_dir / "scan_head_region.ply", verts_f, scan.faces, colors=scan.vertex_colors)
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
        "detail": detail_hist, "tune_bce": None if tune_hist is None else tune_hist["bce"]})
    if tune_hist is not None:
        from lib.inference.tune import tuned_state

        with atomic_path(out_dir / "tuned_networks.pt") as tmp:
            torch.save(tuned_state(model), tmp)
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

"""New avatars from the learned latent spaces (docs/design.md, Inference; eval_mode=sample).

Shape legend: n_subjects training subjects (rows of a latent table), Z|D|C the width of one
code (Z, D or C for z_shape, z_detail, z_color), S FLAME shape components (betas), X
expression components, T frames/steps, B frames, V vertices, H/W image rows/columns.

Each embedding (z_shape, z_detail, z_color) gets its own Gaussian, fitted to its n_subjects
learned rows. With `covariance="diagonal"` (the original's) it is per dimension: the mean and
standard deviation of every column. With `covariance="full"` (this project's opt-in) it is the
rows' sample covariance, of rank at most n_subjects - 1: a draw is the mean plus a random
Gaussian mix of the rows' deviations from it, so it stays in the span of the learned codes. The
per-dimension draw spreads its variance over all Z|D|C dimensions, most of them ones the
networks never saw vary; its heads are near copies of the mean head (README, Differences from
the original, has the measured diversity of both). A sample draws every code from its own
Gaussian (the original drew the colour code from the detail code's statistics: a bug), with the
deviations scaled by `std_scale` (< 1 trades variety for typicality). Sampled avatars get the
mean FLAME shape (betas 0) unless one is given.

`run_sample` (options: `SampleOptions`, the `test.sample` block) writes, per avatar
`sample_<k>/`: `canonical.ply` and `posed.ply` (vertex colours and normals), `turntable.mp4`
(RGB | normal per frame) and `turntable.png` (a grid: RGB views over normal views); and
`samples.png` (front RGB and normal of every sample).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lib.inference.avatar import Avatar, side_by_side, yaw_pose
from lib.inference.options import ConfigOptions
from lib.render.images import add_label, make_grid, save_png, save_video

__all__ = ["COVARIANCES", "GaussianFit", "fit_gaussian", "code_gaussians", "sample_codes", "lerp",
           "evenly", "turntable", "SampleOptions", "run_sample"]

CODE_NAMES = ("z_shape", "z_detail", "z_color")


COVARIANCES = ("diagonal", "full")


@dataclass
class GaussianFit:
    """The Gaussian of n_subjects code rows: mean [Z|D|C], per-dimension std [Z|D|C], and the
    scaled deviations [n_subjects, Z|D|C] ((rows - mean) / sqrt(n_subjects - 1)), whose Gram
    matrix deviations^T deviations is the rows' sample covariance [Z|D|C, Z|D|C]."""

    mean: torch.Tensor
    std: torch.Tensor
    deviations: torch.Tensor

    def sample(self, n: int, std_scale: float = 1.0, generator: torch.Generator | None = None,
               covariance: str = "diagonal") -> torch.Tensor:
        """n draws [n, Z|D|C] (noise drawn on the CPU so a seed gives the same codes on every
        device): covariance "diagonal": mean + std_scale * std * N(0, I) (identity of size
        Z|D|C); covariance "full": mean + std_scale * N(0, I) @ deviations (identity of size
        n_subjects), a draw of N(mean, std_scale^2 * sample covariance)."""
        if covariance == "diagonal":
            eps = torch.randn(n, self.mean.shape[0], generator=generator, dtype=torch.float32)
            return self.mean[None] + float(std_scale) * self.std[None] * eps.to(self.mean)
        if covariance == "full":
            eps = torch.randn(n, self.deviations.shape[0], generator=generator,
                              dtype=torch.float32)
            return self.mean[None] + float(std_scale) * (eps.to(self.mean) @ self.deviations)
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")


def fit_gaussian(rows: torch.Tensor) -> GaussianFit:
    """Gaussian of rows [n_subjects, Z|D|C]: the mean and the (unbiased; 0 for one row)
    standard deviation of every column, and the deviations (rows - mean) / sqrt(n_subjects - 1)
    [n_subjects, Z|D|C] (0 for one row)."""
    rows = rows.detach().float()
    if rows.dim() != 2 or rows.shape[0] < 1:
        raise ValueError(f"fit_gaussian: rows must be [n_subjects >= 1, Z|D|C], got "
                         f"{tuple(rows.shape)}")
    mean = rows.mean(dim=0)
    n = rows.shape[0]
    std = rows.std(dim=0) if n > 1 else torch.zeros_like(rows[0])
    deviations = (rows - mean) / math.sqrt(n - 1) if n > 1 else torch.zeros_like(rows)
    return GaussianFit(mean=mean, std=std, deviations=deviations)


def code_gaussians(model) -> dict[str, GaussianFit]:
    """One Gaussian per learned embedding: {'z_shape': .., 'z_detail': .., 'z_color': ..}."""
    return {name: fit_gaussian(getattr(model, name + "s").weight) for name in CODE_NAMES}


def sample_codes(model, n: int, std_scale: float = 1.0, seed: int = 0,
                 betas: torch.Tensor | None = None, covariance: str = "diagonal"
                 ) -> list[dict[str, torch.Tensor]]:
    """n sampled avatars: dicts of z_shape [1, Z], z_detail [1, D], z_color [1, C] (each from
    its own Gaussian, `covariance` as in GaussianFit.sample) and betas [1, S] (given, else
    zeros)."""
    gen = torch.Generator().manual_seed(int(seed))
    fits = code_gaussians(model)
    draws = {name: fits[name].sample(n, std_scale, gen, covariance) for name in CODE_NAMES}
    ref = model.bbox_min
    b = ref.new_zeros(1, model.flame_server.n_shape) if betas is None else betas.to(ref)
    return [{**{name: draws[name][i:i + 1] for name in CODE_NAMES}, "betas": b.reshape(1, -1)}
            for i in range(n)]


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """(1 - t) a + t b for tensors of one shape."""
    return a + float(t) * (b - a)


def evenly(n_items: int, n_pick: int) -> list[int]:
    """n_pick indices spread evenly over range(n_items), first and last included."""
    n_pick = max(1, min(int(n_pick), n_items))
    if n_pick == 1:
        return [0]
    return [round(i * (n_items - 1) / (n_pick - 1)) for i in range(n_pick)]


def turntable(avatar: Avatar, n_frames: int, res: int, pose: torch.Tensor | None = None,
              exp: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rendered turntable: the head turned about the vertical axis by 2 pi k / n_frames.
    pose: [15] pose of the head besides the turn (default neutral), exp: [X].
    Returns rgb and normal images [T, H, W, 3] (float32 numpy)."""
    ref = avatar.betas
    angles = [2.0 * math.pi * k / n_frames for k in range(n_frames)]
    poses = yaw_pose(angles, ref)
    if pose is not None:
        poses[:, 3:] = pose.to(ref).reshape(-1)[3:]
    exps = None if exp is None else exp.to(ref).reshape(1, -1).expand(n_frames, -1)
    return avatar.render_params(avatar.params(poses, exps), res)


def default_posed_frame(ref: torch.Tensor, n_exp: int, motion: dict | None, rng: np.random.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pose [15] and expression [X] of a sample's posed mesh: a random frame of `motion`
    (dict of numpy expression [T, X] and pose [T, 15]) when given, else the head turned a
    little with the jaw open."""
    if motion is not None:
        t = int(rng.integers(0, motion["pose"].shape[0]))
        pose = torch.as_tensor(motion["pose"][t], dtype=ref.dtype, device=ref.device)
        exp = torch.as_tensor(motion["expression"][t], dtype=ref.dtype, device=ref.device)
        return pose, exp[:n_exp]
    pose = ref.new_zeros(15)
    pose[0], pose[1], pose[6] = 0.1, 0.35, 0.25
    return pose, ref.new_zeros(n_exp)


@dataclass(frozen=True)
class SampleOptions(ConfigOptions):
    """Options of eval_mode=sample: the `test.sample` block of configs/config.yaml (defaults
    equal the config's; lib/inference/options.py builds and checks them)."""

    BLOCK = "test.sample"
    n_samples: int = 4      # avatars drawn
    std_scale: float = 1.0  # scale of the fitted Gaussians' standard deviations
    covariance: str = "diagonal"  # "diagonal" (the original's) | "full" (the rows' covariance)
    seed: int = 42          # seed of the draws and of the posed frames
    n_frames: int = 24      # turntable frames
    fps: int = 25           # turntable video frame rate
    grid_cols: int = 8      # views per row of turntable.png
    res: int = 256          # rendered image size
    mesh_res: int = 128     # canonical mesh extraction resolution (cells per axis)


def run_sample(model, out_dir, options: SampleOptions | None = None,
               motion: dict | None = None) -> dict:
    """eval_mode=sample (module docstring). options: SampleOptions (None: the defaults);
    motion: optional loaded motion (posed meshes use its random frames). Returns a summary
    dict (per sample: vertex/face counts, files)."""
    o = options or SampleOptions()
    out_dir = Path(out_dir)
    rng = np.random.default_rng(o.seed)
    if o.covariance not in COVARIANCES:
        raise ValueError(f"test.sample.covariance must be one of {COVARIANCES}, got "
                         f"{o.covariance!r}")
    codes = sample_codes(model, o.n_samples, o.std_scale, o.seed, covariance=o.covariance)
    fronts, summary = [], {"n_samples": o.n_samples, "std_scale": o.std_scale,
                           "covariance": o.covariance, "samples": []}
    for k, c in enumerate(tqdm(codes, desc="sample", unit="avatar")):
        folder = out_dir / f"sample_{k:03d}"
        avatar = Avatar.from_codes(model, c, mesh_res=o.mesh_res)
        avatar.save_canonical(folder / "canonical.ply")
        pose, exp = default_posed_frame(avatar.betas, model.flame_server.n_exp, motion, rng)
        verts, normals = avatar.pose(avatar.params(pose[None], exp[None]))
        avatar.save_mesh(folder / "posed.ply", verts[0], normals[0])
        rgb, nrm = turntable(avatar, o.n_frames, o.res)
        save_video(folder / "turntable.mp4", [side_by_side(a, b) for a, b in zip(rgb, nrm)],
                   o.fps)
        pick = evenly(o.n_frames, o.grid_cols)
        save_png(folder / "turntable.png",
                 make_grid([rgb[i] for i in pick] + [nrm[i] for i in pick], ncols=len(pick)))
        fronts.append(add_label(side_by_side(rgb[0], nrm[0]), f"sample {k}"))
        summary["samples"].append({"folder": folder.name, "n_verts": int(avatar.verts_c.shape[0]),
                                   "n_faces": int(avatar.faces.shape[0])})
    save_png(out_dir / "samples.png", make_grid(fronts, ncols=min(4, len(fronts))))
    return summary

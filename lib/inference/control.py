"""Disentangled control: vary one factor of an avatar while holding the others
(docs/design.md, Inference; eval_mode = interp, z_shape, z_detail, z_color, betas, thetas).

Shape legend: T steps, Z/D/C code widths, S FLAME shape components, X expression components,
V vertices, H/W image rows/columns.

Between avatar A and avatar B (two training subjects, or a subject and a sample):
    interp     all codes and the FLAME shape go from A to B together
    z_shape    only z_shape (coarse geometry) goes from A to B
    z_detail   only z_detail (normals) goes from A to B
    z_color    only z_color (texture) goes from A to B
and for avatar A alone:
    betas      FLAME shape component `component` swept over +-`amount` around A's value
    thetas     the jaw opens and closes, then the head turns from right to left
Every step is posed (neutral expression, front view) and rendered as RGB and normal images.
The canonical mesh is extracted once per distinct (z_shape, betas): z_detail, z_color and
thetas steps all share one mesh, so those factors cannot change the geometry.

Options: `ControlOptions` (the `test.control` block of configs/config.yaml).
Outputs under `out_dir`: `<mode>.mp4` (RGB | normal, played forth and back), `<mode>.png` (grid:
RGB row over normal row of evenly spaced steps, labelled), and with `save_meshes`
`meshes/step_<t>.ply` (posed mesh with colours and normals).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lib.inference.avatar import Avatar, side_by_side
from lib.inference.options import ConfigOptions
from lib.inference.sampling import evenly, lerp
from lib.render.images import add_label, make_grid, save_png, save_video

__all__ = ["CONTROL_MODES", "GEOMETRY_ONLY_MODES", "ControlOptions", "control_steps",
           "run_control"]

CONTROL_MODES = ("interp", "z_shape", "z_detail", "z_color", "betas", "thetas")
GEOMETRY_ONLY_MODES = ("z_shape", "betas", "thetas")  # meaningful with a stage-1 checkpoint
CONTROL_FPS = 6
_VARIED = {"interp": ("z_shape", "z_detail", "z_color", "betas"), "z_shape": ("z_shape",),
           "z_detail": ("z_detail",), "z_color": ("z_color",)}


def _thetas(t: float, ref: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Pose [15] of step t in [0, 1]: in the first half the jaw opens to 0.4 rad and closes,
    in the second half the head turns from -0.6 to +0.6 rad about the vertical axis."""
    pose = ref.new_zeros(15)
    if t <= 0.5:
        pose[6] = 0.4 * math.sin(math.pi * 2.0 * t)
        return pose, f"jaw {float(pose[6]):.2f}"
    pose[1] = 0.6 * (4.0 * t - 3.0)
    return pose, f"yaw {float(pose[1]):+.2f}"


def control_steps(mode: str, a: dict, b: dict | None, n_steps: int, component: int = 0,
                  amount: float = 2.0) -> list[tuple[str, dict, torch.Tensor]]:
    """The steps of a control mode.

    a, b: codes of avatars A and B (dicts of z_shape [1, Z], z_detail [1, D], z_color [1, C],
    betas [1, S]); b may be None for betas/thetas. Returns [(label, codes, pose [15])] * T."""
    if mode not in CONTROL_MODES:
        raise ValueError(f"control mode must be one of {CONTROL_MODES}, got {mode!r}")
    if n_steps < 2:
        raise ValueError(f"{mode}: need at least 2 steps, got {n_steps}")
    ref = a["z_shape"]
    neutral = ref.new_zeros(15)
    steps = []
    for i in range(n_steps):
        t = i / (n_steps - 1)
        codes = dict(a)
        if mode in _VARIED:
            if b is None:
                raise ValueError(f"{mode} interpolates between two avatars; b is missing")
            for name in _VARIED[mode]:
                codes[name] = lerp(a[name], b[name], t)
            steps.append((f"t={t:.2f}", codes, neutral))
        elif mode == "betas":
            if not 0 <= component < a["betas"].shape[-1]:
                raise ValueError(f"betas: component {component} outside "
                                 f"0..{a['betas'].shape[-1] - 1}")
            value = float(a["betas"][0, component]) + amount * (2.0 * t - 1.0)
            betas = a["betas"].clone()
            betas[0, component] = value
            codes["betas"] = betas
            steps.append((f"beta{component}={value:+.2f}", codes, neutral))
        else:  # thetas
            pose, label = _thetas(t, ref)
            steps.append((label, codes, pose))
    return steps


def _geometry_key(codes: dict) -> tuple:
    return tuple(codes[k].detach().cpu().numpy().tobytes() for k in ("z_shape", "betas"))


@dataclass(frozen=True)
class ControlOptions(ConfigOptions):
    """Options of the control modes: the `test.control` block of configs/config.yaml
    (defaults equal the config's; lib/inference/options.py builds and checks them)."""

    BLOCK = "test.control"
    n_steps: int = 8            # interp / z_* / betas steps (each new z_shape or betas: a mesh)
    n_frames: int = 24          # thetas frames
    component: int = 0          # betas: FLAME shape component swept ...
    amount: float = 2.0         # ... over +-amount around the subject's value
    save_meshes: bool = False   # also write one .ply per step
    grid_cols: int = 8          # steps shown in the .png grid
    res: int = 256              # rendered image size
    mesh_res: int = 128         # canonical mesh extraction resolution (cells per axis)


def run_control(model, mode: str, out_dir, a: dict, b: dict | None,
                options: ControlOptions | None = None,
                names: tuple[str, str] = ("A", "B")) -> dict:
    """Run one control mode (module docstring): avatar codes a and b as in control_steps;
    options: ControlOptions (None: the defaults; thetas takes n_frames steps, the other modes
    n_steps); names: display names of A and B.
    Returns a summary: mode, steps (labels), n_geometries (canonical meshes extracted),
    n_verts per step, files."""
    o = options or ControlOptions()
    out_dir = Path(out_dir)
    n_steps = o.n_frames if mode == "thetas" else o.n_steps
    steps = control_steps(mode, a, b, n_steps, o.component, o.amount)
    geometries: dict[tuple, Avatar] = {}
    frames, rgbs, nrms, n_verts = [], [], [], []
    for i, (label, codes, pose) in enumerate(tqdm(steps, desc=mode, unit="step")):
        key = _geometry_key(codes)
        if key in geometries:
            avatar = geometries[key].with_codes(codes["z_detail"], codes["z_color"])
        else:
            avatar = Avatar.from_codes(model, codes, mesh_res=o.mesh_res)
            geometries[key] = avatar
        verts, normals = avatar.pose(avatar.params(pose[None]))
        rgb, nrm = avatar.render(verts, normals, o.res)
        rgbs.append(rgb[0].cpu().numpy())
        nrms.append(nrm[0].cpu().numpy())
        frames.append(side_by_side(rgb[0], nrm[0]))
        n_verts.append(int(verts.shape[1]))
        if o.save_meshes:
            avatar.save_mesh(out_dir / "meshes" / f"step_{i:03d}.ply", verts[0], normals[0])
    video = save_video(out_dir / f"{mode}.mp4", frames + frames[-2:0:-1], fps=CONTROL_FPS)
    pick = evenly(len(steps), o.grid_cols)
    tiles = [add_label(rgbs[i], steps[i][0]) for i in pick] + [nrms[i] for i in pick]
    grid = save_png(out_dir / f"{mode}.png", make_grid(tiles, ncols=len(pick)))
    what = f"{names[0]} -> {names[1]}" if mode in _VARIED else names[0]
    return {"mode": mode, "avatars": what, "steps": [s[0] for s in steps],
            "n_geometries": len(geometries), "n_verts": n_verts,
            "files": [str(video), str(grid)]}

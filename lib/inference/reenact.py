"""Reenactment: an avatar driven by a FLAME parameter sequence (docs/design.md,
Inference and Motion sequences; eval_mode=reenact).

Shape legend: T frames, B frames of one batch, V avatar vertices, Vf FLAME vertices,
S shape components, X expression components, P parameter-vector length (169),
H/W image rows/columns.

The canonical mesh is extracted once (Avatar.mesh); every frame is then one explicit LBS pass
with the learned skinning weights and blendshape bases (no root finding), so animation runs at
interactive rates. The avatar keeps its own FLAME shape; the motion supplies pose and
expression. Each video frame shows RGB | normal of the avatar | the driving FLAME mesh (the
motion's own shape, shaded).

Options: `ReenactOptions` (the `test.reenact` block of configs/config.yaml).
Outputs under `out_dir`: `reenact.mp4`, `frames.png` (a few frames), `timing.json`, and with
`save_meshes` `meshes/frame_<t>.ply` (posed mesh with colours and normals).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lib.inference.avatar import Avatar, make_params
from lib.inference.options import ConfigOptions
from lib.inference.sampling import evenly
from lib.render.images import add_label, make_grid, save_png, save_video
from lib.render.shading import render_shaded
from lib.utils.atomic import atomic_path

__all__ = ["ReenactOptions", "motion_tensors", "run_reenact"]


@dataclass(frozen=True)
class ReenactOptions(ConfigOptions):
    """Options of eval_mode=reenact: the `test.reenact` block of configs/config.yaml
    (defaults equal the config's; lib/inference/options.py builds and checks them)."""

    BLOCK = "test.reenact"
    max_frames: int | None = None   # use at most this many frames of the motion (None: all)
    batch: int = 8                  # frames posed and rendered together
    save_meshes: bool = False       # also write one .ply per frame
    grid_cols: int = 8              # frames.png shows min(grid_cols, 4) frames
    res: int = 256                  # rendered image size
    mesh_res: int = 128             # canonical mesh extraction resolution of the avatar


def motion_tensors(motion: dict, n_exp: int, ref: torch.Tensor, max_frames: int | None = None
                   ) -> dict[str, torch.Tensor]:
    """A loaded motion (lib.dataset.motion.load_motion: expression [T, 50], pose [T, 15],
    shape [S]) as tensors like `ref`: pose [T, 15], exp [T, n_exp] (cut or zero-padded),
    shape [1, S]; at most max_frames frames."""
    exp = torch.as_tensor(np.asarray(motion["expression"]), dtype=ref.dtype, device=ref.device)
    pose = torch.as_tensor(np.asarray(motion["pose"]), dtype=ref.dtype, device=ref.device)
    if max_frames is not None:
        exp, pose = exp[:int(max_frames)], pose[:int(max_frames)]
    if exp.shape[1] < n_exp:
        exp = torch.cat([exp, exp.new_zeros(exp.shape[0], n_exp - exp.shape[1])], dim=1)
    shape = torch.as_tensor(np.asarray(motion["shape"]), dtype=ref.dtype, device=ref.device)
    return {"pose": pose, "exp": exp[:, :n_exp], "shape": shape.reshape(1, -1)}


def _sync(ref: torch.Tensor) -> None:
    if ref.is_cuda:
        torch.cuda.synchronize(ref.device)


def run_reenact(model, avatar: Avatar, motion: dict, out_dir,
                options: ReenactOptions | None = None, name: str = "avatar") -> dict:
    """Drive `avatar` with `motion` (module docstring). options: ReenactOptions (None: the
    defaults; its mesh_res is the caller's, for extracting `avatar`); name: the avatar's
    display name. Returns the timing summary (also written to timing.json): frames, vertices,
    extraction seconds, frames per second of deformation alone and with rendering."""
    o = options or ReenactOptions()
    res, batch = o.res, o.batch
    out_dir = Path(out_dir)
    ref = avatar.betas
    server = model.flame_server
    m = motion_tensors(motion, server.n_exp, ref, o.max_frames)
    T = m["pose"].shape[0]
    fps = float(motion.get("fps", 25.0))
    n_shape = server.n_shape
    drive_shape = m["shape"][:, :n_shape]
    if drive_shape.shape[1] < n_shape:
        pad = drive_shape.new_zeros(1, n_shape - drive_shape.shape[1])
        drive_shape = torch.cat([drive_shape, pad], dim=1)

    _sync(ref)
    t0 = time.perf_counter()
    avatar.surface()  # mesh extraction, fields and per-vertex normals/colours, once
    _ = avatar.fields
    _sync(ref)
    t_extract = time.perf_counter() - t0

    frames, t_deform, t_render = [], 0.0, 0.0
    for s in tqdm(range(0, T, batch), desc="reenact", unit="batch"):
        pose, exp = m["pose"][s:s + batch], m["exp"][s:s + batch]
        t1 = time.perf_counter()
        verts, normals = avatar.pose(avatar.params(pose, exp))
        _sync(ref)
        t2 = time.perf_counter()
        rgb, nrm = avatar.render(verts, normals, res)
        _sync(ref)
        t3 = time.perf_counter()
        t_deform += t2 - t1
        t_render += t3 - t2
        with torch.no_grad():
            drive = server(make_params(drive_shape, pose, exp)).verts
            flame_img = render_shaded(drive, server.flame.faces, res)
        for i in range(verts.shape[0]):
            frames.append(np.concatenate([rgb[i].cpu().numpy(), nrm[i].cpu().numpy(),
                                          flame_img[i].cpu().numpy()], axis=1))
            if o.save_meshes:
                avatar.save_mesh(out_dir / "meshes" / f"frame_{s + i:04d}.ply", verts[i],
                                 normals[i])
    video = save_video(out_dir / "reenact.mp4", frames, fps=max(1, round(fps)))
    pick = evenly(T, min(o.grid_cols, 4))
    save_png(out_dir / "frames.png",
             make_grid([add_label(frames[i], f"frame {i}") for i in pick], ncols=1))
    summary = {
        "avatar": name, "frames": T, "n_verts": int(avatar.verts_c.shape[0]),
        "n_faces": int(avatar.faces.shape[0]), "res": res, "batch": batch,
        "device": str(ref.device), "extract_s": t_extract,
        "fps_deform": T / max(t_deform, 1e-9),
        "fps_deform_render": T / max(t_deform + t_render, 1e-9),
        "video": str(video),
    }
    with atomic_path(out_dir / "timing.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary

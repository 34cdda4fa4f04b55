"""`make demo`: the whole pipeline on the built-in synthetic data, phase by phase.

Each phase prints one progress line with its time and is resumable: a phase whose outputs
exist is reused, so a second `make demo` finishes in a fraction of the time.

Phases: synthetic data (head model, FaceVerse-format scans, a motion sequence), pictures
of the head model and the scans, preprocessing, stage-1 training on the CPU experiment.
Everything is written under `<out>/` (data under `--data`).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def phase(name: str):
    """Decorator-free timer: `with phase('x'):` prints the phase's line and time."""

    class _Phase:
        def __enter__(self):
            self.t0 = time.time()
            print(f"[demo] {name} ...", flush=True)
            return self

        def __exit__(self, *exc):
            if exc[0] is None:
                print(f"[demo] {name}: done in {time.time() - self.t0:.1f} s", flush=True)
            return False

    return _Phase()


def run(cmd: list[str]) -> None:
    """Run a pipeline step (an entry point of the project) and stop the demo if it fails."""
    res = subprocess.run([sys.executable, *cmd], cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"[demo] step failed (exit {res.returncode}): {' '.join(cmd)}")


def make_data(data: Path, identities: int, expressions: int, seed: int) -> None:
    run(["tools/make_synthetic.py", "--out", str(data), "--identities", str(identities),
         "--expressions", str(expressions), "--seed", str(seed)])


def preprocess(data: Path) -> None:
    run(["preprocess.py", "--scan_folder", str(data / "faceverse_dataset"),
         "--flame_folder", str(data / "flame_params"),
         "--output_folder", str(data / "processed"),
         "--flame_model", str(data / "flame" / "generic_model.pkl"),
         "--data_list", str(data / "data_list.csv")])


def train_stage1(data: Path, out: Path, epochs: int) -> Path:
    """Stage 1 on the CPU experiment; resumes a killed run, skips a finished one."""
    import torch as _torch

    run_dir = out / "coarse"
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file() and _torch.load(last, map_location="cpu",
                                      weights_only=False)["epoch"] >= epochs:
        print(f"[demo] stage 1: {last} already trained for {epochs} epochs")
        return last
    run(["train.py", "expname=coarse", "datamodule=synthetic", "+experiments=cpu",
         f"output_dir={run_dir}", f"datamodule.processed_dir={data / 'processed'}",
         f"datamodule.data_list={data / 'data_list.csv'}",
         f"datamodule.flame_model={data / 'flame' / 'generic_model.pkl'}",
         f"trainer.max_epochs={epochs}", f"resume={str(last.is_file()).lower()}"])
    return last


def head_model_pictures(model_path: Path, out: Path, res: int = 256) -> Path:
    """Grid of the head model: neutral, +-2 std of identity components, jaw, eyes, expressions."""
    from lib.flame import FLAME
    from lib.render.images import add_label, make_grid, save_png
    from lib.render.shading import render_shaded

    flame = FLAME(str(model_path))
    cases: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def params(shape=None, exp=None, pose=None):
        s = torch.zeros(1, 100)
        e = torch.zeros(1, 50)
        p = torch.zeros(1, 15)
        for idx, val in (shape or {}).items():
            s[0, idx] = val
        for idx, val in (exp or {}).items():
            e[0, idx] = val
        for idx, val in (pose or {}).items():
            p[0, idx] = val
        return s, e, p

    cases.append(("neutral", *params()))
    for comp in range(3):
        for sign in (-2, 2):
            cases.append((f"shape {comp} {sign:+d} sd", *params(shape={comp: float(sign)})))
    cases.append(("jaw open 0.3", *params(pose={6: 0.3})))
    cases.append(("eyes left", *params(pose={10: 0.4, 13: 0.4})))
    cases.append(("eyes up", *params(pose={9: -0.3, 12: -0.3})))
    for comp in range(4):
        cases.append((f"expression {comp} +2", *params(exp={comp: 2.0})))
    cases.append(("head turned", *params(pose={1: 0.5, 4: 0.2})))

    tiles = []
    with torch.no_grad():
        for label, s, e, p in cases:
            verts = flame(s, e, p).vertices
            front = render_shaded(verts, flame.faces, res)[0]
            side = render_shaded(_rotate_y(verts, np.pi / 2), flame.faces, res)[0]
            tiles.append(add_label(torch.cat([front, side], dim=1).numpy(), label))
    path = out / "head_model.png"
    save_png(path, make_grid(tiles, ncols=4))
    return path


def scan_pictures(data: Path, out: Path, max_scans: int = 6, res: int = 256) -> Path:
    """Front and side renders of a few synthetic scans, in FLAME space (DESIGN §3)."""
    from lib.dataset.faceverse_io import load_flame_params, scan_to_flame_space
    from lib.flame import FLAME
    from lib.render.images import add_label, make_grid, save_png
    from lib.render.shading import render_texture
    from lib.utils.mesh_io import load_obj

    z_shift = FLAME(str(data / "flame" / "generic_model.pkl")).z_shift
    scan_dirs = sorted(p for p in (data / "faceverse_dataset").iterdir() if p.is_dir())
    tiles = []
    for scan_dir in scan_dirs[:max_scans]:
        sid = scan_dir.name
        mesh = load_obj(scan_dir / f"{sid}.obj")
        fp = load_flame_params(data / "flame_params" / f"{sid}_flame.pkl")
        v = scan_to_flame_space(mesh.verts, fp["scale"], fp["transl"], z_shift)
        verts = torch.as_tensor(v, dtype=torch.float32)[None]
        faces = torch.as_tensor(mesh.faces, dtype=torch.long)
        uvs = torch.as_tensor(mesh.uvs, dtype=torch.float32)
        fuv = torch.as_tensor(mesh.face_uvs, dtype=torch.long)
        tex = torch.as_tensor(mesh.texture, dtype=torch.float32) / 255.0
        front = render_texture(verts, faces, uvs, fuv, tex, res)[0]
        side = render_texture(_rotate_y(verts, np.pi / 2), faces, uvs, fuv, tex, res)[0]
        tiles.append(add_label(torch.cat([front, side], dim=1).numpy(), f"{sid} ({len(faces)} faces)"))
    path = out / "scans.png"
    save_png(path, make_grid(tiles, ncols=3))
    return path


def _rotate_y(verts: torch.Tensor, angle: float) -> torch.Tensor:
    """verts: [B, V, 3] rotated about the y axis through the origin by `angle` radians."""
    c, s = float(np.cos(angle)), float(np.sin(angle))
    rot = verts.new_tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    return verts @ rot.T


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic")
    ap.add_argument("--identities", type=int, default=4)
    ap.add_argument("--expressions", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20, help="stage-1 epochs (cpu experiment)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    written: list[Path] = []

    with phase("synthetic data"):
        make_data(args.data, args.identities, args.expressions, args.seed)
    with phase("head model pictures"):
        written.append(head_model_pictures(args.data / "flame" / "generic_model.pkl", args.out))
    with phase("scan pictures"):
        written.append(scan_pictures(args.data, args.out))
    with phase("preprocessing"):
        preprocess(args.data)
    with phase("stage 1 training (cpu experiment)"):
        written.append(train_stage1(args.data, args.out, args.epochs))
        written.extend(sorted((args.out / "coarse" / "medias").glob("*.png"))[-2:])

    print(f"[demo] finished in {time.time() - t0:.1f} s; wrote:")
    for p in written:
        print(f"  {p}")


if __name__ == "__main__":
    main()

"""Benchmark of reenactment (lib/inference/reenact.py): how fast an extracted avatar animates.

Shape legend: T frames, B frames per call, V avatar vertices, F faces, H/W image (res).

The canonical mesh is extracted once; then every frame is one explicit LBS pass of the V
vertices (learned weights and blendshape bases at the vertices), skinned network normals, and
optionally a rasterization of the RGB and normal images. Printed per thread count:
    extract        seconds to extract the mesh and evaluate its fields, normals, colours (once)
    deform  B=1    frames per second of deformation alone, one frame per call (interactive)
    +render B=1    the same plus the RGB and normal images at res x res
    deform  B=8 / +render B=8   the same with 8 frames per call (offline throughput)

    .venv/bin/python bench/reenact.py [--ckpt outputs/fine/checkpoints/last.ckpt]
        [--flame data/synthetic/flame/generic_model.pkl] [--mesh-res 128] [--res 256]
        [--frames 40] [--threads 1 2] [--device cpu]

Without --ckpt a GANHead of the default (full) configuration with random weights is used, in
stage-2 mode so the colour path runs; its geometric initialization gives a sphere-like
surface, so V is about that of a head extracted at the same resolution. Without --flame the
synthetic head model is built into a temporary folder.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def default_model(flame: str, device: torch.device):
    """A randomly initialized full-size GANHead (stage 'fine') from configs/config.yaml."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lib.model.ganhead import GANHead

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"datamodule.flame_model={flame}",
                                                       "model.stage=fine"])
    torch.manual_seed(0)
    model = GANHead(n_subjects=4, **OmegaConf.to_container(cfg.model, resolve=True))
    return model.eval().requires_grad_(False).to(device)


def timed(fn, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main() -> None:
    from lib.inference.avatar import Avatar
    from lib.inference.loading import load_model
    from lib.inference.reenact import motion_tensors
    from lib.inference.sampling import sample_codes
    from lib.synthetic.motion import make_motion

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--flame", default=None)
    ap.add_argument("--mesh-res", type=int, default=128)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    tmp = None
    flame = args.flame
    if flame is None:
        from lib.synthetic.head_model import build_head_model, save_head_model

        tmp = tempfile.TemporaryDirectory()
        flame = str(Path(tmp.name) / "generic_model.pkl")
        save_head_model(build_head_model(seed=0), flame)
    model = load_model(args.ckpt, flame, dev) if args.ckpt else default_model(flame, dev)
    motion = motion_tensors(make_motion(n_frames=args.frames, seed=0), model.flame_server.n_exp,
                            model.bbox_min)
    codes = sample_codes(model, 1, seed=0)[0]
    print(f"device {dev}, mesh_res {args.mesh_res}, image {args.res}x{args.res}, "
          f"{args.frames} frames, model {'checkpoint ' + args.ckpt if args.ckpt else 'random'}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        avatar = Avatar.from_codes(model, codes, mesh_res=args.mesh_res)
        t_extract = timed(lambda: (avatar.surface(), avatar.fields), sync)
        params = avatar.params(motion["pose"], motion["exp"])
        T = params.shape[0]
        row = {"extract": f"{t_extract:.2f} s"}
        for B in (1, 8):
            def deform():
                for s in range(0, T, B):
                    avatar.pose(params[s:s + B])

            def deform_render():
                for s in range(0, T, B):
                    avatar.render(*avatar.pose(params[s:s + B]), args.res)

            deform()  # warm-up
            row[f"deform B={B}"] = f"{T / timed(deform, sync):.1f} fps"
            row[f"+render B={B}"] = f"{T / timed(deform_render, sync):.1f} fps"
        print(f"threads {threads}: V={avatar.verts_c.shape[0]} F={avatar.faces.shape[0]}  "
              + "  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

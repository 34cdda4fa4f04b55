"""Seconds per stage-1 training step (forward, backward, optimizer step) of the GANHead module.

    python bench/train_step.py [--sizes default cpu] [--modes exact fast] [--steps 3]

Builds the model from the Hydra configs (the default experiment and `+experiments=cpu`),
with the synthetic head model, on batches of points near posed head-model surfaces.
Prints one row per (size, deformer mode): seconds per step, points per step, valid fraction.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_batch(server, batch_size: int, n_points: int, n_subjects: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    params = torch.zeros(batch_size, 169)
    params[:, 0] = 1.0
    params[:, 4:19] = 0.05 * torch.randn(batch_size, 15, generator=g)
    params[:, 10] = 0.2  # jaw open
    params[:, 19:29] = 0.7 * torch.randn(batch_size, 10, generator=g)
    with torch.no_grad():
        verts = server(params)["verts"]
    idx = torch.randint(0, verts.shape[1], (batch_size, n_points), generator=g)
    pts = torch.gather(verts, 1, idx[..., None].expand(-1, -1, 3))
    pts = pts + 0.02 * torch.randn(pts.shape, generator=g)
    return {"params": params, "index": torch.arange(batch_size) % n_subjects, "pts_d": pts,
            "occ_gt": (torch.rand(batch_size, n_points, 1, generator=g) > 0.5).float()}


def bench(size: str, mode: str, steps: int, flame_path: Path) -> dict:
    from lib.model.ganhead import GANHead

    overrides = [f"datamodule.flame_model={flame_path}", f"model.deformer.mode={mode}"]
    if size == "cpu":
        overrides.insert(0, "+experiments=cpu")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    model = GANHead(n_subjects=8, output_dir=tempfile.mkdtemp(),
                    **OmegaConf.to_container(cfg.model, resolve=True))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    dm = cfg.datamodule
    n_points = dm.points_per_frame + dm.points_per_frame // 8
    batch = make_batch(model.flame_server, dm.batch_size, n_points, 8)
    times, valid = [], []
    for step in range(steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        terms = model.coarse_losses(batch)
        loss = sum(v for k, v in terms.items() if k != "valid_frac")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step:
            times.append(time.perf_counter() - t0)
            valid.append(float(terms["valid_frac"]))
    return {"size": size, "mode": mode, "batch": dm.batch_size, "points": n_points,
            "s_per_step": sum(times) / len(times), "valid": sum(valid) / len(valid)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["cpu", "default"])
    ap.add_argument("--modes", nargs="+", default=["exact", "fast"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lib.synthetic.head_model import build_head_model, save_head_model

    flame_path = Path(tempfile.mkdtemp()) / "generic_model.pkl"
    save_head_model(build_head_model(seed=0), flame_path)
    print(f"device cpu, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'size':8s} {'mode':6s} {'batch':>5s} {'points':>7s} {'s/step':>8s} {'valid':>6s}")
    for size in args.sizes:
        for mode in args.modes:
            try:
                r = bench(size, mode, args.steps, flame_path)
            except (ValueError, KeyError) as err:
                print(f"{size:8s} {mode:6s} unavailable: {err}")
                continue
            print(f"{r['size']:8s} {r['mode']:6s} {r['batch']:5d} {r['points']:7d} "
                  f"{r['s_per_step']:8.2f} {r['valid']:6.3f}", flush=True)


if __name__ == "__main__":
    main()

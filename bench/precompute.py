"""Seconds per scan of the stage-2 cache writer (lib/model/correspondence.py, the work of
precompute.py for one scan): canonical mesh extraction (16^3 -> mesh_res^3), LBS fields at
the vertices, explicit deformation to the 9 views, rasterization at res x res.

    python bench/precompute.py [--sizes cpu default] [--scans 2] [--device cpu]

Shape legend: V mesh vertices, F mesh faces, R cache resolution.

The model is built from the Hydra configs (`default`: the default networks, mesh_res 256,
R 256; `cpu`: +experiments=fine_cpu, mesh_res 128, R 128) with the synthetic head model and
untrained weights: the geometric init makes the occupancy a sphere of radius 0.6, a surface of
about the area of a head, so extraction does comparable work to a trained model. Prints one
row per size: seconds per scan (mean over --scans after a warm-up scan), split into mesh
extraction and the rest, the mesh size and the covered pixel fraction.
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


def build(size: str, flame_path: Path, device: torch.device):
    from lib.model.ganhead import GANHead

    overrides = [f"datamodule.flame_model={flame_path}", "+experiments=fine"]
    if size == "cpu":
        overrides[-1] = "+experiments=fine_cpu"
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    model = GANHead(n_subjects=4, output_dir=tempfile.mkdtemp(),
                    **OmegaConf.to_container(cfg.model, resolve=True))
    return model.eval().to(device), cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(size: str, scans: int, flame_path: Path, device: torch.device) -> dict:
    from lib.model import validation
    from lib.model.correspondence import scan_correspondences

    model, cfg = build(size, flame_path, device)
    res, mesh_res = int(cfg.datamodule.load_res), int(cfg.precompute.mesh_res)
    params = torch.zeros(169)
    params[0] = 1.0
    params[10] = 0.2  # jaw
    extract = validation.extract_canonical_mesh
    spent = {"extract": 0.0}

    def timed_extract(*args, **kwargs):  # wraps the extraction to split the time
        sync(device)
        t0 = time.perf_counter()
        mesh = extract(*args, **kwargs)
        sync(device)
        spent["extract"] += time.perf_counter() - t0
        return mesh

    import lib.model.correspondence as corr

    corr.extract_canonical_mesh = timed_extract
    try:
        total, out = [], None
        for i in range(scans + 1):  # the first scan warms up
            spent["extract"] = 0.0
            sync(device)
            t0 = time.perf_counter()
            out = scan_correspondences(model, i % 4, params, n_views=int(cfg.datamodule.n_views),
                                       res=res, mesh_res=mesh_res)
            sync(device)
            if i:
                total.append((time.perf_counter() - t0, spent["extract"]))
    finally:
        corr.extract_canonical_mesh = extract
    s = sum(t for t, _ in total) / len(total)
    e = sum(x for _, x in total) / len(total)
    return {"size": size, "res": res, "mesh_res": mesh_res, "s_per_scan": s, "extract": e,
            "V": out["verts_c"].shape[0], "F": out["faces"].shape[0],
            "covered": float(out["cache"][..., 3].mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["cpu", "default"])
    ap.add_argument("--scans", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lib.synthetic.head_model import build_head_model, save_head_model

    device = torch.device(args.device)
    flame_path = Path(tempfile.mkdtemp()) / "generic_model.pkl"
    save_head_model(build_head_model(seed=0), flame_path)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} threads"
    print(f"device {name}, torch {torch.__version__}")
    print(f"{'size':8s} {'res':>4s} {'mesh':>5s} {'s/scan':>8s} {'extract':>8s} {'V':>8s} "
          f"{'F':>8s} {'covered':>8s}")
    for size in args.sizes:
        r = bench(size, args.scans, flame_path, device)
        print(f"{r['size']:8s} {r['res']:4d} {r['mesh_res']:5d} {r['s_per_scan']:8.2f} "
              f"{r['extract']:8.2f} {r['V']:8d} {r['F']:8d} {r['covered']:8.3f}", flush=True)


if __name__ == "__main__":
    main()

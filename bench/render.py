"""Benchmark of lib/render on a ~100k-face textured mesh at 256x256.

Shape legend: V vertices, F faces, H/W image (256), Ht/Wt texture (1024).

Prints seconds per view for rasterize, normal render and texture render, and per scan
(9 views x 2 images, as preprocessing does: one rasterization per view shared by the
normal and RGB image), for each requested thread count.

    .venv/bin/python bench/render.py [--threads 1 2] [--device cpu] [--repeat 3]
"""
from __future__ import annotations

import argparse
import math
import time

import torch


def build_mesh(n_lat: int = 224, n_lon: int = 224, seed: int = 0, device="cpu"):
    """Noisy UV sphere: verts [V,3], faces [F,3], uvs [V,2] (face_uvs = faces)."""
    g = torch.Generator().manual_seed(seed)
    th = torch.linspace(0, math.pi, n_lat + 1, dtype=torch.float64)[1:-1]   # polar, no poles
    ph = torch.linspace(0, 2 * math.pi, n_lon + 1, dtype=torch.float64)     # seam duplicated
    T, P = torch.meshgrid(th, ph, indexing="ij")
    r = 0.75 + 0.01 * torch.randn(T.shape, generator=g, dtype=torch.float64)
    r = r + 0.05 * torch.sin(5 * T) * torch.cos(3 * P)
    xyz = torch.stack([r * torch.sin(T) * torch.sin(P), r * torch.cos(T),
                       r * torch.sin(T) * torch.cos(P)], -1).reshape(-1, 3)
    uv = torch.stack([P / (2 * math.pi), 1 - T / math.pi], -1).reshape(-1, 2)
    nr, nc = T.shape
    idx = torch.arange(nr * nc).reshape(nr, nc)
    a, b = idx[:-1, :-1].reshape(-1), idx[:-1, 1:].reshape(-1)
    c, d = idx[1:, :-1].reshape(-1), idx[1:, 1:].reshape(-1)
    faces = torch.cat([torch.stack([a, c, b], 1), torch.stack([b, c, d], 1)])
    # close the poles with fans
    top = torch.tensor([[0.0, 0.75, 0.0]], dtype=torch.float64)
    bot = torch.tensor([[0.0, -0.75, 0.0]], dtype=torch.float64)
    it, ib = nr * nc, nr * nc + 1
    ring0, ring1 = idx[0], idx[-1]
    fan_t = torch.stack([torch.full_like(ring0[:-1], it), ring0[:-1], ring0[1:]], 1)
    fan_b = torch.stack([torch.full_like(ring1[:-1], ib), ring1[1:], ring1[:-1]], 1)
    verts = torch.cat([xyz, top, bot]).float()
    uvs = torch.cat([uv, torch.tensor([[0.5, 1.0], [0.5, 0.0]], dtype=torch.float64)]).float()
    faces = torch.cat([faces, fan_t, fan_b])
    return verts.to(device), faces.to(device), uvs.to(device)


def rot_y(verts: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate [V,3] about +y by angle (radians)."""
    c, s = math.cos(angle), math.sin(angle)
    R = torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=verts.dtype, device=verts.device)
    return verts @ R.T


def timeit(fn, repeat: int, sync) -> tuple[float, float]:
    """Best wall-clock and best process-CPU seconds of fn over `repeat` runs."""
    fn()
    sync()
    wall = cpu = float("inf")
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall = min(wall, time.perf_counter() - t)
        cpu = min(cpu, time.process_time() - c)
    return wall, cpu


def main():
    from lib.render import rasterize, render_normals, render_texture

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--res", type=int, default=256)
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    verts, faces, uvs = build_mesh(device=dev)
    g = torch.Generator().manual_seed(1)
    tex = torch.rand(1024, 1024, 3, generator=g).to(dev)
    res = args.res
    print(f"mesh: V={verts.shape[0]} F={faces.shape[0]}, res={res}, device={dev}, "
          f"texture 1024x1024")
    frags = rasterize(verts, faces, res)
    print(f"covered pixels: {int(frags.mask.sum())}")
    views = [rot_y(verts, 2 * math.pi * k / 9) for k in range(9)]

    def scan():
        for v in views:
            fr = rasterize(v, faces, res)
            render_normals(v, faces, res, frags=fr)
            render_texture(v, faces, uvs, faces, tex, res, frags=fr)

    def scan_batched():
        vb = torch.stack(views)
        fr = rasterize(vb, faces, res)
        render_normals(vb, faces, res, frags=fr)
        render_texture(vb, faces, uvs, faces, tex, res, frags=fr)

    for nt in (args.threads if dev.type == "cpu" else [torch.get_num_threads()]):
        torch.set_num_threads(nt)
        t_r = timeit(lambda: rasterize(verts, faces, res), args.repeat, sync)
        t_n = timeit(lambda: render_normals(verts, faces, res), args.repeat, sync)
        t_t = timeit(lambda: render_texture(verts, faces, uvs, faces, tex, res),
                     args.repeat, sync)
        t_s = timeit(scan, 1, sync)
        t_b = timeit(scan_batched, 1, sync)
        print(f"threads={nt} (seconds, wall / process CPU):")
        print(f"  rasterize per view                    {t_r[0]:.3f} / {t_r[1]:.3f}")
        print(f"  normal image per view (incl. raster)  {t_n[0]:.3f} / {t_n[1]:.3f}")
        print(f"  texture image per view (incl. raster) {t_t[0]:.3f} / {t_t[1]:.3f}")
        print(f"  scan, 9 views x 2 images (shared)     {t_s[0]:.3f} / {t_s[1]:.3f}")
        print(f"  scan, batched [9,V,3] call            {t_b[0]:.3f} / {t_b[1]:.3f}")

if __name__ == "__main__":
    main()

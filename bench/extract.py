"""Benchmark of lib/utils/extraction.py: seconds per mesh and occupancy queries of the
hierarchical extraction (16^3 -> 256^3) against the dense 257^3 grid.

Shape legend: N query points.

Two occupancies:
- `head`: analytic head-like shape (cranium ellipsoid, face ellipsoid, nose, two ears, neck
  cylinder, smooth union) with a sinusoidal surface detail; cheap, so the figures show the
  extraction overhead (grid bookkeeping, marching cubes, components).
- `mlp`: a random-initialized MLP (positional encoding with 6 octaves, 4 hidden layers of 256,
  softplus) added to a sphere logit so that a surface exists; its cost is dominated by the
  network, like the real occupancy network.

Usage: python bench/extract.py [--res 256] [--device cpu] [--dense head|all|none]
The dense timing of the MLP is off by default on CPU (17M network queries); without it the
dense time is estimated from the measured query throughput.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from lib.utils.extraction import (
    dense_grid_values,
    hierarchical_grid_values,
    mesh_from_grid,
    padded_box,
)


def smooth_max(a: torch.Tensor, b: torch.Tensor, k: float = 0.05) -> torch.Tensor:
    """Smooth union of two logits a, b [N] (log-sum-exp with temperature k)."""
    return k * torch.logaddexp(a / k, b / k)


def head_occupancy(p: torch.Tensor) -> torch.Tensor:
    """p: [N, 3] -> logit [N]: positive inside a head-like shape in about [-0.8, 0.8]^3."""
    def ellipsoid(c, a):
        c = torch.tensor(c, device=p.device)
        a = torch.tensor(a, device=p.device)
        q = (p - c) / a
        return (1.0 - q.norm(dim=-1)) * a.min()

    def sphere(c, r):
        return r - (p - torch.tensor(c, device=p.device)).norm(dim=-1)

    d = ellipsoid((0.0, 0.15, -0.05), (0.55, 0.62, 0.62))          # cranium
    d = smooth_max(d, ellipsoid((0.0, -0.2, 0.12), (0.42, 0.45, 0.45)))  # face / jaw
    d = smooth_max(d, sphere((0.0, -0.05, 0.58), 0.1), k=0.02)       # nose
    d = smooth_max(d, ellipsoid((0.55, 0.0, -0.05), (0.06, 0.14, 0.09)), k=0.02)   # ears
    d = smooth_max(d, ellipsoid((-0.55, 0.0, -0.05), (0.06, 0.14, 0.09)), k=0.02)
    neck = torch.minimum(0.25 - p[:, [0, 2]].norm(dim=-1), p[:, 1] + 0.85)
    d = smooth_max(d, neck)
    detail = 0.01 * torch.sin(25 * p[:, 0]) * torch.sin(25 * p[:, 1]) * torch.sin(25 * p[:, 2])
    return 20.0 * (d + detail)


class RandomOccupancyMLP(nn.Module):
    """Random MLP occupancy: PE(6 octaves) -> 4 x (Linear 256, softplus) -> Linear 1, plus a
    sphere logit of radius 0.6 so that the level-0 surface exists. forward: [N, 3] -> [N]."""

    def __init__(self, multires: int = 6, width: int = 256, depth: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2.0 ** torch.arange(multires, dtype=torch.float32))
        dims = [3 * (1 + 2 * multires)] + [width] * depth + [1]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.normal_(0, 1.0 / math.sqrt(layer.in_features), generator=g)
                layer.bias.zero_()
        self.act = nn.Softplus(beta=100)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        x = p[..., None] * self.freqs  # [N, 3, L]
        h = torch.cat([p, torch.sin(x).flatten(1), torch.cos(x).flatten(1)], dim=-1)
        for layer in self.layers[:-1]:
            h = self.act(layer(h))
        out = self.layers[-1](h)[:, 0]
        return 10.0 * (0.6 - p.norm(dim=-1)) + out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(name, fn, device, res, dense: bool, repeats: int):
    lo, hi = padded_box(torch.tensor([-0.8, -0.9, -0.7]), torch.tensor([0.8, 0.8, 0.75]), 0.05)
    n_dense = (res + 1) ** 3
    times_q, times_mc = [], []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        values, n_q = hierarchical_grid_values(fn, lo, hi, 16, res, 0.0, 100_000, device)
        sync(device)
        t1 = time.perf_counter()
        mesh = mesh_from_grid(values, lo, hi, 0.0, True, n_q)
        sync(device)
        times_q.append(t1 - t0)
        times_mc.append(time.perf_counter() - t1)
    tq, tmc = min(times_q), min(times_mc)
    print(f"[{name}] hierarchical 16->{res}: {tq + tmc:.2f} s/mesh (queries+grid {tq:.2f} s, "
          f"marching cubes+component {tmc:.2f} s); queries {n_q:,} = "
          f"{100 * n_q / n_dense:.1f}% of dense {n_dense:,}; mesh V={mesh.verts.shape[0]:,} "
          f"F={mesh.faces.shape[0]:,}")
    if dense:
        sync(device)
        t0 = time.perf_counter()
        d = dense_grid_values(fn, lo, hi, res, 100_000, device)
        sync(device)
        t1 = time.perf_counter()
        ref = mesh_from_grid(d, lo, hi, 0.0, True, n_dense)
        t2 = time.perf_counter()
        same = (ref.verts.shape == mesh.verts.shape
                and (ref.verts - mesh.verts).abs().max().item() < 1e-5)
        print(f"[{name}] dense {res + 1}^3: {t2 - t0:.2f} s/mesh (queries {t1 - t0:.2f} s); "
              f"hierarchical mesh identical to dense: {same}")
    else:
        sync(device)
        pts = torch.rand(200_000, 3, device=device) * 2 - 1
        t0 = time.perf_counter()
        with torch.no_grad():
            fn(pts)
        sync(device)
        rate = pts.shape[0] / (time.perf_counter() - t0)
        print(f"[{name}] dense {res + 1}^3 not run; estimated queries alone "
              f"{n_dense / rate:.1f} s at {rate / 1e6:.2f} M points/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dense", choices=["head", "all", "none"], default=None,
                    help="which occupancies also get the dense timing (default: head on CPU, "
                         "all on CUDA)")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    device = torch.device(args.device)
    dense = args.dense or ("all" if device.type == "cuda" else "head")
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    mlp = RandomOccupancyMLP().to(device).eval()
    bench_one("head", head_occupancy, device, args.res, dense in ("head", "all"), args.repeats)
    bench_one("mlp", mlp, device, args.res, dense == "all", args.repeats)


if __name__ == "__main__":
    main()

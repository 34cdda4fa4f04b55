"""Benchmark of the correspondence search (lib/model/deformer.py) at the original settings.

Shape legend: B batch, N points per item, I inits (5), J joints (5), Z z_shape width (256).

Uses the real LBS (128x4, conditioned on z_shape, 5 + 258 outputs) and displacement (128x4)
networks of lib/model/networks.py when they import, else stand-in MLPs of the same sizes.
Joint transforms are a random FLAME-like pose (rotations up to 25 degrees per joint, canonical
jaw opened 0.2 rad). Reports, for training mode (autograd Jacobian init + implicit correction,
plus the backward of a dummy loss) and evaluation mode (blended-rotation init, no grad):
points per second, converged fraction, mean residual and Broyden steps taken.

    .venv/bin/python bench/deformer.py [--batch 4] [--points 2250] [--max-steps 50] [--device cpu]
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from lib.model.deformer import ForwardDeformer

JOINTS = [[0.0, -0.6, -0.1], [0.0, -0.35, -0.1], [0.0, -0.15, 0.05], [0.3, 0.25, 0.45], [-0.3, 0.25, 0.45]]
CENTRES = [[0.0, -0.95, -0.1], [0.0, 0.3, -0.15], [0.0, -0.45, 0.4], [0.3, 0.22, 0.6], [-0.3, 0.22, 0.6]]
PARENTS = [-1, 0, 1, 1, 1]


class StandInLBS(nn.Module):
    """x_c [B,N,3] + z [B,Z] -> w [B,N,5], pose_dirs [B,N,36,3], expr_dirs [B,N,3,50] (128x4 MLP)."""

    def __init__(self, z_dim=256, width=128, depth=4):
        super().__init__()
        dims = [3 + z_dim] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.w_head, self.bs_head = nn.Linear(width, 5), nn.Linear(width, 36 * 3 + 3 * 50)
        nn.init.zeros_(self.bs_head.weight)
        nn.init.zeros_(self.bs_head.bias)
        self.act = nn.Softplus(beta=100)

    def forward(self, xc, z):
        B, N, _ = xc.shape
        h = torch.cat([xc, z[:, None].expand(-1, N, -1) if z.dim() == 2 else z], -1)
        for lin in self.hidden:
            h = self.act(lin(h))
        bs = self.bs_head(h)
        return (torch.softmax(20 * self.w_head(h), -1), bs[..., :108].reshape(B, N, 36, 3),
                bs[..., 108:].reshape(B, N, 3, 50))


class StandInDisp(nn.Module):
    """x_c [B,N,3] + shape [B,100] -> dx [B,N,3] (128x4 MLP)."""

    def __init__(self, width=128, depth=4):
        super().__init__()
        dims = [103] + [width] * depth + [3]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x, shape):
        h = torch.cat([x, shape[:, None].expand(-1, x.shape[1], -1)], -1)
        for i, lin in enumerate(self.layers):
            h = lin(h)
            if i < len(self.layers) - 1:
                h = nn.functional.softplus(h, beta=100)
        return 0.01 * h


def build_networks():
    """(lbs_net, disp_net, label): real networks when lib/model/networks.py provides them."""
    try:
        from lib.model.networks import LBSNetwork, build_displacement_network
        return (LBSNetwork(shape_dim=256, n_joints=5, pose_feature_dim=36, n_exp=50),
                build_displacement_network(n_shape=100), "lib/model/networks.py")
    except Exception as exc:  # noqa: BLE001 - the bench must run before networks.py exists
        print(f"(networks.py unavailable: {exc!r}; using stand-in MLPs)")
        return StandInLBS(), StandInDisp(), "stand-in MLPs"


def fit_weights(lbs_net, z, steps, n=2048, seed=0):
    """Fit the LBS weights to a smooth head-like skinning (softmax of -d^2/0.15 to 5 bone
    centres) for `steps` Adam steps, so the search sees a non-trivial field (an untrained
    network blends all bones almost uniformly: a near-rigid map). z: [B, Z]. Returns the final MSE."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor(CENTRES, device=z.device)
    opt = torch.optim.Adam(lbs_net.parameters(), lr=1e-3)
    loss = torch.zeros(())
    for _ in range(steps):
        x = (torch.rand(z.shape[0], n // z.shape[0], 3, generator=g) * 2 - 1).to(z.device)
        target = torch.softmax(-((x[:, :, None] - centres) ** 2).sum(-1) / 0.15, dim=-1)
        loss = ((lbs_net(x, z)[0] - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def rot(rv):
    """Axis-angle [..., 3] -> [..., 3, 3]."""
    t = rv.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = rv / t
    K = torch.zeros(*rv.shape[:-1], 3, 3)
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    K = K - K.transpose(-1, -2)
    return torch.eye(3) + torch.sin(t)[..., None] * K + (1 - torch.cos(t))[..., None] * (K @ K)


def transforms(R):
    """R [B,5,3,3] local rotations -> bone transforms [B,5,4,4] (FLAME hierarchy)."""
    B = R.shape[0]
    joints = torch.tensor(JOINTS)
    G = []
    for j, p in enumerate(PARENTS):
        L = torch.eye(4).repeat(B, 1, 1)
        L[:, :3, :3] = R[:, j]
        L[:, :3, 3] = joints[j] - (joints[p] if p >= 0 else 0)
        G.append(L if p < 0 else G[p] @ L)
    rest = torch.eye(4).repeat(B, 5, 1, 1)
    rest[..., :3, 3] = -joints
    return torch.stack(G, 1) @ rest


def make_inputs(B, N, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    axis = nn.functional.normalize(torch.randn(B, 5, 3, generator=g), dim=-1)
    R = rot(axis * torch.rand(B, 5, 1, generator=g) * math.radians(25))
    rv_c = torch.zeros(B, 5, 3)
    rv_c[:, 2, 0] = 0.2
    R_c = rot(rv_c)
    smpl_out = dict(tfs=transforms(R), tfs_c=transforms(R_c),
                    pose_feature=(R[:, 1:] - torch.eye(3)).reshape(B, -1),
                    pose_feature_c=(R_c[:, 1:] - torch.eye(3)).reshape(B, -1),
                    exp=torch.randn(B, 50, generator=g) * 0.5, exp_c=torch.zeros(B, 50))
    cond = dict(z_shape=torch.randn(B, 256, generator=g) * 0.1, shape=torch.randn(B, 100, generator=g) * 0.5)
    n_surf = N * 8 // 9  # 2000 "near-surface" (inside a ball) + 250 uniform per item at N=2250
    ball = nn.functional.normalize(torch.randn(B, n_surf, 3, generator=g), dim=-1)
    ball = ball * (0.5 + 0.1 * torch.randn(B, n_surf, 1, generator=g))
    xd = torch.cat([ball, torch.rand(B, N - n_surf, 3, generator=g) * 2 - 1], 1)
    to = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return xd.to(device), to(cond), to(smpl_out)


def report(name, n_pts, seconds, valid, info):
    diff = info["diff"][valid]
    print(f"{name:<34s} {n_pts / seconds:10.0f} pts/s  {seconds:7.2f} s  "
          f"valid inits {valid.float().mean():.3f}  points with a root {valid.any(-1).float().mean():.3f}  "
          f"mean residual (valid) {diff.mean() if diff.numel() else float('nan'):.2e}  "
          f"Broyden steps {info['n_steps']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--points", type=int, default=2250)
    ap.add_argument("--max-steps", type=int, default=50)
    ap.add_argument("--chunk-size", type=int, default=20000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fit-steps", type=int, default=200, help="Adam steps fitting the LBS weights (0: untrained)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    lbs_net, disp_net, label = build_networks()
    deformer = ForwardDeformer(lbs_net, max_steps=args.max_steps, chunk_size=args.chunk_size).to(device)
    disp_net = disp_net.to(device)
    xd, cond, smpl_out = make_inputs(args.batch, args.points, device)
    n_pts = xd.shape[0] * xd.shape[1]
    if args.fit_steps > 0:
        t0 = time.perf_counter()
        mse = fit_weights(deformer.lbs_net, cond["z_shape"], args.fit_steps)
        print(f"fitted LBS weights to a smooth skinning: {args.fit_steps} steps, mse {mse:.2e}, "
              f"{time.perf_counter() - t0:.1f} s (not timed below)")
        deformer.lbs_net.zero_grad(set_to_none=True)
    print(f"networks: {label}; device {device}, torch threads {torch.get_num_threads()}; "
          f"{args.batch} x {args.points} = {n_pts} points, {deformer.n_init} inits, max_steps {args.max_steps}")

    deformer(xd[:, :64], cond, smpl_out, eval_mode=False)  # warm-up (first-call allocations)
    sync()
    t0 = time.perf_counter()
    xc, valid, info = deformer(xd, cond, smpl_out, eval_mode=False, return_info=True)
    sync()
    t_fwd = time.perf_counter() - t0
    report("train: search + implicit corr.", n_pts, t_fwd, valid, info)
    t0 = time.perf_counter()
    loss = (xc[valid] ** 2).sum()
    loss.backward()
    sync()
    print(f"{'train: backward of a dummy loss':<34s} {time.perf_counter() - t0:7.2f} s")

    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        xc, valid, info = deformer(xd, cond, smpl_out, eval_mode=True, return_info=True)
        sync()
        report("eval: search (no grad)", n_pts, time.perf_counter() - t0, valid, info)
        occ_fn = lambda x, c: 10 * (0.5 - x.norm(dim=-1, keepdim=True))  # noqa: E731
        sync()
        t0 = time.perf_counter()
        occ = deformer.query_occupancy(xd, cond, smpl_out, occ_fn, disp_net=disp_net, eval_mode=True)
        sync()
        dt = time.perf_counter() - t0
        print(f"{'eval: query_occupancy (+disp net)':<34s} {n_pts / dt:10.0f} pts/s  {dt:7.2f} s  "
              f"inside {(occ > 0).float().mean():.3f}")


if __name__ == "__main__":
    main()

"""Benchmark of the correspondence search: exact (lib/model/deformer.py) and fast
(lib/model/fast_deformer.py) side by side, on the same networks and points, at the original
settings.

Shape legend: B batch, N points per item, I inits (5), J joints (5), S betas width (100).

Uses the deformer's fields of GANHead: the unconditioned LBS network (128x4, 5 + 258 outputs)
evaluated at x_c + disp(x_c, betas) with the displacement network (128x4, conditioned on the
100 FLAME betas) of lib/model/networks.py (lib/model/neutral_lbs.py). The LBS weights are fitted
to a smooth head-like skinning (--fit-steps, --tau), the zero-initialized blendshape head gets
small random weights (--blendshapes), so expression and pose-corrective offsets are non-zero,
and so does the displacement network's zero-initialized output layer (--disp, a non-trivial
warp). Poses ('named', the default): every item has its own betas and expression;
item k % 4 is 0 jaw opened 0.3 rad, 1 head turned 30 degrees (neck yaw), 2 both, 3 a random pose
(rotations up to 25 degrees per joint); the canonical pose opens the jaw 0.2 rad. 'random': all
items random.

Three phases, both modes on the same points: train (search + implicit correction with grad on,
then the backward of a dummy loss), search (the training-mode search alone, no grad) and eval
(evaluation-mode search, no grad). Per mode: points per second, wall and process CPU seconds, LBS
network evaluations per point (forward calls; a load-independent cost measure), converged
fraction (valid inits, points with a root), mean and max error of the valid correspondences
against a high-accuracy reference (each one refined in float64 through the networks to a residual
below 1e-11), and steps (fast: Newton steps on the grid + Broyden steps through the networks).
Then the speed-ups and how the two modes agree, and query_occupancy in both modes. Times are the
fastest of --repeats runs, the modes interleaved so that both see the same machine load.

    .venv/bin/python bench/deformer.py [--batch 4] [--points 2250] [--threads 2]
                                       [--grid-res 12 12 12]
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

# this checkout's lib, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.flame.frames import FlameFrames  # noqa: E402
from lib.model.deformer import ForwardDeformer  # noqa: E402
from lib.model.fast_deformer import FastForwardDeformer  # noqa: E402

JOINTS = [[0.0, -0.6, -0.1], [0.0, -0.35, -0.1], [0.0, -0.15, 0.05], [0.3, 0.25, 0.45],
          [-0.3, 0.25, 0.45]]
CENTRES = [[0.0, -0.95, -0.1], [0.0, 0.3, -0.15], [0.0, -0.45, 0.4], [0.3, 0.22, 0.6],
           [-0.3, 0.22, 0.6]]
PARENTS = [-1, 0, 1, 1, 1]


def build_networks(disp_std=0.0, seed=0):
    """(lbs_net, lbs, disp_net): the deformer's fields NeutralLBS(lbs, disp_net) of
    lib/model/neutral_lbs.py, with the unconditioned LBSNetwork (128x4) and the displacement
    network (128x4) of lib/model/networks.py. disp_std: std of the displacement network's
    zero-initialized output layer (0: the identity warp of an untrained network)."""
    from lib.model.networks import LBSNetwork, build_displacement_network
    from lib.model.neutral_lbs import NeutralLBS

    lbs = LBSNetwork(n_joints=5, pose_feature_dim=36, n_exp=50)
    disp = build_displacement_network(n_shape=100)
    if disp_std > 0:
        g = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            out = disp.layers[-1]
            out.weight.copy_(torch.randn(out.weight.shape, generator=g) * disp_std)
    return NeutralLBS(lbs, disp), lbs, disp


def fit_weights(lbs_net, betas, steps, n=2048, seed=0, tau=0.15):
    """Fit the LBS weights to a smooth head-like skinning (softmax of -d^2/tau to 5 bone
    centres, in the shaped canonical space) for `steps` Adam steps of the LBS network, so the
    search sees a non-trivial field (an untrained network blends all bones almost uniformly: a
    near-rigid map). betas: [B, S]. Returns the final MSE."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor(CENTRES, device=betas.device)
    opt = torch.optim.Adam(lbs_net.lbs.parameters(), lr=1e-3)
    loss = torch.zeros(())
    for _ in range(steps):
        x = torch.rand(betas.shape[0], n // betas.shape[0], 3, generator=g) * 2 - 1
        x = x.to(betas.device)
        target = torch.softmax(-((x[:, :, None] - centres) ** 2).sum(-1) / tau, dim=-1)
        loss = ((lbs_net(x, betas)[0] - target) ** 2).mean()
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


def named_rotvecs(B, g):
    """Local axis-angle rotations [B, 5, 3]: item k % 4 = jaw 0.3 rad, neck yaw 30 deg, both,
    random."""
    rv = torch.zeros(B, 5, 3)
    for k in range(B):
        kind = k % 4
        if kind in (0, 2):
            rv[k, 2, 0] = 0.3                      # jaw opened (x axis)
        if kind in (1, 2):
            rv[k, 1, 1] = math.radians(30.0)       # head turned at the neck (y axis)
        if kind == 3:
            axis = nn.functional.normalize(torch.randn(5, 3, generator=g), dim=-1)
            rv[k] = axis * torch.rand(5, 1, generator=g) * math.radians(25)
    return rv


def make_inputs(B, N, device, seed=0, poses="named"):
    """xd [B, N, 3] (8/9 in a shell of radius ~0.5, 1/9 uniform in [-1,1]^3), cond, flame_out."""
    g = torch.Generator().manual_seed(seed)
    if poses == "named":
        rv = named_rotvecs(B, g)
    else:
        axis = nn.functional.normalize(torch.randn(B, 5, 3, generator=g), dim=-1)
        rv = axis * torch.rand(B, 5, 1, generator=g) * math.radians(25)
    R = rot(rv)
    rv_c = torch.zeros(B, 5, 3)
    rv_c[:, 2, 0] = 0.2
    R_c = rot(rv_c)
    flame_out = FlameFrames(tfs=transforms(R), tfs_c=transforms(R_c),
                            pose_feature=(R[:, 1:] - torch.eye(3)).reshape(B, -1),
                            pose_feature_c=(R_c[:, 1:] - torch.eye(3)).reshape(B, -1),
                            exp=torch.randn(B, 50, generator=g) * 0.5, exp_c=torch.zeros(B, 50))
    cond = dict(z_shape=torch.randn(B, 256, generator=g) * 0.1,
                shape=torch.randn(B, 100, generator=g) * 0.5)
    n_surf = N * 8 // 9  # 2000 "near-surface" (inside a ball) + 250 uniform per item at N=2250
    ball = nn.functional.normalize(torch.randn(B, n_surf, 3, generator=g), dim=-1)
    ball = ball * (0.5 + 0.1 * torch.randn(B, n_surf, 1, generator=g))
    xd = torch.cat([ball, torch.rand(B, N - n_surf, 3, generator=g) * 2 - 1], 1)
    return xd.to(device), {k: v.to(device) for k, v in cond.items()}, flame_out.to(device)


def set_blendshapes(lbs, std, seed=0):
    """Give the zero-initialized blendshape head of LBSNetwork weights ~ N(0, std) (0: keep
    zeros)."""
    tail = lbs.net.tail
    if std <= 0:
        return
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        tail.weight.copy_(torch.randn(tail.weight.shape, generator=g) * std)


def offsets_size(lbs_net, cond, flame_out, n=2000):
    """Mean norm of the expression + pose-corrective offset at random canonical points."""
    B = cond["shape"].shape[0]
    x = torch.rand(B, n, 3, device=cond["shape"].device) * 2 - 1
    with torch.no_grad():
        _, pd, ed = lbs_net(x, cond["shape"])
        o = (ed * (flame_out.exp - flame_out.exp_c)[:, None, None]).sum(-1)
        o = o + (pd * (flame_out.pose_feature - flame_out.pose_feature_c)[:, None, :, None]).sum(-2)
    return float(o.norm(dim=-1).mean())


def reference_error(ref, xc, valid, xd, cond, flame_out):
    """Distance of each valid correspondence to the root found by refining it in float64.

    ref: a float64 ForwardDeformer (tight cvg_thresh). xc [B, N, I, 3], valid [B, N, I].
    Returns (mean, max, count of refinements that did not converge)."""
    B, N, I, _ = xc.shape
    b, n, i = valid.nonzero(as_tuple=True)
    if b.numel() == 0:
        return float("nan"), float("nan"), 0
    x0 = xc.detach()[b, n, i].double()
    with torch.no_grad():
        fl = ref._checked_flame(flame_out, B, xd.double()).to(torch.float64)
        out = ref._solve_exact(x0, b, xd.detach()[b, n].double(), cond["shape"].double(), fl,
                               eval_mode=False)
    err = (out["result"] - x0).norm(dim=-1)
    return float(err.mean()), float(err.max()), int((~out["valid_ids"]).sum())


class Counted(nn.Module):
    """Wraps the LBS network and counts the points it evaluates (forward calls; the backward
    passes of autograd Jacobians are not counted): a cost measure independent of machine load."""

    def __init__(self, net):
        super().__init__()
        self.net, self.count = net, 0

    def forward(self, xc, betas):
        self.count += xc.shape[0] * xc.shape[1]
        return self.net(xc, betas)

    def folded(self, betas, d_pose, d_exp):
        """The folded evaluator of the fast search (lib/model/folded_lbs.py), counted too."""
        fold = self.net.folded(betas, d_pose, d_exp)

        def call(x, bidx):
            self.count += x.shape[0]
            return fold(x, bidx)
        return call


def timed_once(fn, sync):
    """(wall s, process CPU s, result) of one call of fn()."""
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0, out


def steps_text(info):
    if "grid_steps" in info:
        extra = (f", {info['n_further']} further, {info['n_fallback']} fallback"
                 if info["n_solved"] else "")
        return (f"{info['grid_steps']} grid + {info['n_steps']} net "
                f"({info['n_polished']} polished{extra})")
    return f"{info['n_steps']} net"


PHASES = (("train", "search + implicit correction, grad on (training)", False, True),
          ("search", "search only, training-mode init, no grad", False, False),
          ("eval", "search, evaluation-mode init, no grad", True, False))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--points", type=int, default=2250)
    ap.add_argument("--max-steps", type=int, default=50)
    ap.add_argument("--chunk-size", type=int, default=20000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fit-steps", type=int, default=200,
                    help="Adam steps fitting the LBS weights (0: untrained)")
    ap.add_argument("--tau", type=float, default=0.15,
                    help="width of the fitted skinning (smaller: sharper)")
    ap.add_argument("--blendshapes", type=float, default=0.003,
                    help="std of the blendshape head weights (0: zeros)")
    ap.add_argument("--disp", type=float, default=0.01,
                    help="std of the displacement network's output weights (0: zeros, the "
                         "identity warp)")
    ap.add_argument("--poses", choices=("named", "random"), default="named")
    ap.add_argument("--grid-res", type=int, nargs=3, default=(12, 12, 12), metavar=("D", "H", "W"))
    ap.add_argument("--upsample", type=int, default=4)
    ap.add_argument("--exact-steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed runs per measurement (fastest is kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--no-occupancy", action="store_true", help="skip the query_occupancy rows")
    ap.add_argument("--seed", type=int, default=0, help="network initialization and inputs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(args.seed)
    lbs_net, lbs, disp_net = build_networks(args.disp, seed=args.seed)
    lbs_net = lbs_net.to(device)  # moves the referenced displacement network too
    xd, cond, flame_out = make_inputs(args.batch, args.points, device, seed=args.seed,
                                      poses=args.poses)
    n_pts = xd.shape[0] * xd.shape[1]
    if args.fit_steps > 0:
        t0 = time.perf_counter()
        mse = fit_weights(lbs_net, cond["shape"], args.fit_steps, tau=args.tau)
        print(f"fitted LBS weights to a smooth skinning (tau {args.tau}): {args.fit_steps} "
              f"steps, mse {mse:.2e}, {time.perf_counter() - t0:.1f} s (not timed below)")
        lbs_net.zero_grad(set_to_none=True)
    set_blendshapes(lbs, args.blendshapes)
    with torch.no_grad():
        probe = torch.rand(cond["shape"].shape[0], 2000, 3, device=device) * 2 - 1
        disp_mean = float(disp_net(probe, cond["shape"]).norm(dim=-1).mean())
    counted = Counted(lbs_net)
    common = dict(max_steps=args.max_steps, chunk_size=args.chunk_size)
    modes = {"exact": ForwardDeformer(counted, **common).to(device),
             "fast": FastForwardDeformer(counted, grid_res=args.grid_res, upsample=args.upsample,
                                         exact_steps=args.exact_steps, **common).to(device)}
    ref = ForwardDeformer(copy.deepcopy(lbs_net).double(), max_steps=30, cvg_thresh=1e-11,
                          dvg_thresh=1e9, chunk_size=args.chunk_size).to(device)
    fast = modes["fast"]
    print(f"networks: LBS at x + disp(x, betas) (lib/model/neutral_lbs.py), mean |disp| "
          f"{disp_mean:.3f}; device {device}, torch threads {torch.get_num_threads()}; "
          f"{args.batch} x {args.points} = {n_pts} points, {fast.n_init} inits, max_steps "
          f"{args.max_steps}, poses {args.poses}, "
          f"mean offset {offsets_size(lbs_net, cond, flame_out):.3f}")
    box = f"{tuple(fast.bbox_min.tolist())}..{tuple(fast.bbox_max.tolist())}"
    print(f"fast: grid {fast.grid_res} (LBS evaluations per item) refined to {fast.lookup_res}, "
          f"exact_steps {fast.exact_steps}, box {box}")
    for d in modes.values():  # warm-up (first-call allocations)
        d(xd[:, :64], cond, flame_out, eval_mode=False)

    print(f"\n{'phase':<6s} {'mode':<6s} {'pts/s':>10s} {'wall s':>8s} {'cpu s':>7s} "
          f"{'LBS/pt':>7s} {'valid inits':>12s} {'pts w/ root':>12s} {'err mean':>10s} "
          f"{'err max':>10s}  steps")
    summary = []
    for phase, text, eval_mode, grad in PHASES:
        def run(d, eval_mode=eval_mode, grad=grad):
            with torch.set_grad_enabled(grad):
                if grad:
                    return d(xd, cond, flame_out, eval_mode=eval_mode, return_info=True)
                return d.search(xd, cond, flame_out, eval_mode=eval_mode, return_info=True)

        wall, cpu = {n: float("inf") for n in modes}, {n: float("inf") for n in modes}
        out, evals = {}, {}
        # modes interleaved, so that both see the same machine load
        for _ in range(max(1, args.repeats)):
            for name, d in modes.items():
                counted.count = 0
                t, c, out[name] = timed_once(lambda d=d: run(d), sync)
                wall[name], cpu[name] = min(wall[name], t), min(cpu[name], c)
                evals[name] = counted.count
        for name in modes:
            xc, valid, info = out[name]
            err = reference_error(ref, xc, valid, xd, cond, flame_out)
            print(f"{phase:<6s} {name:<6s} {n_pts / wall[name]:10.0f} {wall[name]:8.3f} "
                  f"{cpu[name]:7.2f} {evals[name] / n_pts:7.1f} {valid.float().mean():12.5f} "
                  f"{valid.any(-1).float().mean():12.5f} {err[0]:10.2e} {err[1]:10.2e}  "
                  f"{steps_text(info)}"
                  + ("" if err[2] == 0 else f"  ({err[2]} refinements failed)"))
            if grad:
                t, _, _ = timed_once(lambda: (xc[valid] ** 2).sum().backward(), sync)
                print(f"{'':14s}backward of a dummy loss {t:8.3f} s")
                lbs_net.zero_grad(set_to_none=True)
                disp_net.zero_grad(set_to_none=True)
        (xe, ve, _), (xf, vf, _) = out["exact"], out["fast"]
        both = ve & vf
        d = (xe - xf).detach().norm(dim=-1)[both]
        summary.append(
            f"{phase:<6s} ({text}): fast/exact {wall['exact'] / wall['fast']:.1f}x wall, "
            f"{cpu['exact'] / cpu['fast']:.1f}x CPU, {evals['exact'] / max(evals['fast'], 1):.1f}x "
            f"fewer LBS evaluations; valid inits differ on {(ve != vf).float().mean():.5f}; on "
            f"inits valid in both |xc_fast - xc_exact| max "
            f"{d.max() if d.numel() else float('nan'):.1e}, {int((d > 1e-4).sum())} above 1e-4")
    print("\n" + "\n".join(summary))

    if not args.no_occupancy:
        occ_fn = lambda x, c: 10 * (0.5 - x.norm(dim=-1, keepdim=True))  # noqa: E731
        occ = {}
        for name, d in modes.items():
            with torch.no_grad():
                t, _, occ[name] = timed_once(
                    lambda d=d: d.query_occupancy(xd, cond, flame_out, occ_fn,
                                                  disp_net=disp_net, eval_mode=True), sync)
            print(f"eval {name:<5s} query_occupancy (+disp net) {n_pts / t:10.0f} pts/s "
                  f"{t:8.3f} s  inside {(occ[name] > 0).float().mean():.4f}")
        flips = ((occ["exact"] > 0) != (occ["fast"] > 0)).float().mean()
        print(f"occupancy: inside/outside labels differ on {flips:.5f} of the points; "
              f"max |logit difference| {(occ['exact'] - occ['fast']).abs().max():.2e}")


if __name__ == "__main__":
    main()

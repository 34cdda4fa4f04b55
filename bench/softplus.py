"""The implicit networks with torch's nn.Softplus(beta=100) and with lib.model.networks.Softplus
(input clamped at -25/beta), side by side: forward + backward milliseconds and the largest
output difference.

    .venv/bin/python bench/softplus.py [--ckpt outputs/fine_holdout/checkpoints/last.ckpt]
                                       [--points 6000] [--repeats 6] [--threads 2]
                                       [--fine-step
                                        --flame_model data/synthetic/flame/generic_model.pkl]

Networks: the normal network (8 x 256, stage 2) and the occupancy network (4 x 256, stage 1,
on a random 64-channel feature), the LBS network (4 x 128). Weights: freshly initialized, and
from --ckpt where it holds them (a trained checkpoint: trained networks put many
pre-activations where torch's exp / log1p take their slow scalar paths). Points are uniform in
[-0.8, 0.8]^3, conditions N(0, 0.3^2). Times are the fastest of --repeats, both variants
interleaved so that they see the same machine load.

With --fine-step (and a `fine_cpu` stage-2 --ckpt): whole stage-2 training steps (the bench
batch of bench/train_step.py, the checkpoint's trained networks) with every implicit network
on one softplus and then the other, interleaved; medians of --repeats steps.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.model import networks as N  # noqa: E402
from lib.model.checkpoint import read_project_checkpoint  # noqa: E402


class TorchSoftplus(nn.Softplus):
    """nn.Softplus with the `inplace` argument the networks pass (ignored)."""

    def forward(self, x, inplace=False):  # noqa: D102
        return super().forward(x)


def cases(ckpt: Path | None):
    """(label, network, inputs) with inputs the positional arguments of network(...)."""
    state = {}
    if ckpt is not None:
        state = read_project_checkpoint(ckpt)["state_dict"]
    specs = [
        ("normal 8x256", "norm_network.", N.build_normal_network, 128 + 229),
        ("occupancy 4x256", "occ_network.", lambda: N.build_geometry_network(feature_dim=64), 64),
        ("LBS 4x128", "deformer.lbs_net.", N.LBSNetwork, 256),
    ]
    for label, prefix, build, cdim in specs:
        torch.manual_seed(0)
        net = build()
        yield f"{label}, initialized", net, cdim
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            net = build()
            try:
                net.load_state_dict(sub)
            except RuntimeError as err:  # another size than the default configs
                print(f"({label}: {ckpt} holds other sizes, skipped: {str(err).splitlines()[0]})")
                continue
            yield f"{label}, trained ({ckpt.name})", net, cdim


def fine_step(ckpt: Path, flame_model: Path, repeats: int) -> None:
    """Median seconds of a stage-2 (fine_cpu) training step with nn.Softplus and with the
    clamped Softplus in every implicit network, from the trained networks of ckpt."""
    import statistics
    import tempfile

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lib.model.ganhead import GANHead
    sys.path.insert(0, str(ROOT / "bench"))
    from train_step import make_fine_batch

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"datamodule.flame_model={flame_model}",
                                                       "+experiments=fine_cpu"])
    checkpoint = read_project_checkpoint(ckpt)
    model = GANHead(n_subjects=checkpoint["state_dict"]["z_shapes.weight"].shape[0],
                    output_dir=tempfile.mkdtemp(),
                    **OmegaConf.to_container(cfg.model, resolve=True))
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=False)
    opt = model.configure_optimizers()
    opt = opt[0] if isinstance(opt, list) else opt
    dm = cfg.datamodule
    batch = make_fine_batch(model.flame_server, dm.batch_size, dm.load_res, dm.surface_points, 8)
    mlps = [m for m in model.modules() if isinstance(m, N.ImplicitNetwork)]
    variants = {"nn.Softplus": TorchSoftplus(beta=100), "clamped": mlps[0].softplus}
    times = {k: [] for k in variants}
    for step in range(repeats + 1):
        for name, sp in variants.items():
            for m in mlps:
                m.softplus = sp
            t0 = time.perf_counter()
            terms, _ = model.stage.render_and_losses(batch)
            loss = sum(v for k, v in terms.items() if k != "valid_3d")
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"stage-2 step (fine_cpu, {ckpt.name}'s trained networks, {len(mlps)} implicit networks): "
        f"nn.Softplus {med['nn.Softplus']:.2f} s, clamped {med['clamped']:.2f} s "
        f"({med['nn.Softplus'] / med['clamped']:.1f}x)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--points", type=int, default=6000)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fine-step", action="store_true",
                    help="also time stage-2 steps (needs a fine_cpu --ckpt)")
    ap.add_argument("--flame_model", type=Path,
                    default=ROOT / "data/synthetic/flame/generic_model.pkl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.fine_step and args.ckpt is None:
        raise SystemExit("bench/softplus.py: --fine-step needs --ckpt (a fine_cpu stage-2 "
                         "checkpoint)")
    print(f"device cpu, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"2 x {args.points} points")
    print(f"{'network':44s} {'nn.Softplus ms':>15s} {'clamped ms':>11s} {'speed-up':>9s} "
          f"{'max |diff|':>11s}")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, args.points, 3, generator=g) * 1.6 - 0.8
    for label, net, cdim in cases(args.ckpt):
        cond = torch.randn(2, cdim, generator=g) * 0.3
        mlp = getattr(net, "net", net)  # LBSNetwork wraps its ImplicitNetwork
        variants = {"torch": TorchSoftplus(beta=100), "clamped": mlp.softplus}

        def run():
            out = net(x, cond)
            out = out[0] if isinstance(out, tuple) else out
            out.square().sum().backward()
            return out.detach()

        best, outs = {k: float("inf") for k in variants}, {}
        for _ in range(args.repeats):
            for name, sp in variants.items():
                mlp.softplus = sp
                outs[name] = run()
                t = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - t)
        mlp.softplus = variants["clamped"]
        diff = (outs["torch"] - outs["clamped"]).abs().max().item()
        print(f"{label:44s} {best['torch'] * 1e3:15.1f} {best['clamped'] * 1e3:11.1f} "
              f"{best['torch'] / best['clamped']:8.2f}x {diff:11.1e}")
    if args.fine_step:
        fine_step(args.ckpt, args.flame_model, args.repeats)


if __name__ == "__main__":
    main()

"""Seconds per training step (forward, backward, optimizer step) of the GANHead module.

    python bench/train_step.py [--stages coarse fine] [--sizes default cpu] [--modes exact fast]
                               [--steps 3] [--gan] [--ckpt outputs/coarse_cpu/checkpoints/last.ckpt]

Builds the model from the Hydra configs (stage 1: the default experiment and
`+experiments=cpu`; stage 2: `+experiments=fine` and `+experiments=fine_cpu`), with the
synthetic head model. Stage 1 runs on batches of points near posed head-model surfaces and
prints one row per (size, deformer mode), the modes' steps interleaved, medians of --steps:
seconds per step, points per step, valid fraction,
then the forward seconds per step spent in the correspondence search, the implicit correction
and the feature-volume generator, and the generator's forward + backward timed alone (a cost
both deformer modes share, so a floor under the step).
Stage 2 (lib/model/fine_stage.py) runs on a batch whose cache is the canonical head-model
mesh rasterized in the view (so about the real share of pixels is covered), random target
images, and surface samples of the posed mesh; its rows give seconds per step, the image
resolution, the points queried per step (masked pixels + surface samples) and the valid
fraction of the surface search. With --gan a second row per size adds both critics: the
generator step, a discriminator step and the lazy R1 step amortized (its time / d_reg_every).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.model.checkpoint import read_project_checkpoint  # noqa: E402


def make_batch(server, batch_size: int, n_points: int, n_subjects: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    params = torch.zeros(batch_size, 169)
    params[:, 0] = 1.0
    params[:, 4:19] = 0.05 * torch.randn(batch_size, 15, generator=g)
    params[:, 10] = 0.2  # jaw open
    params[:, 19:29] = 0.7 * torch.randn(batch_size, 10, generator=g)
    with torch.no_grad():
        verts = server(params).verts
    idx = torch.randint(0, verts.shape[1], (batch_size, n_points), generator=g)
    pts = torch.gather(verts, 1, idx[..., None].expand(-1, -1, 3))
    pts = pts + 0.02 * torch.randn(pts.shape, generator=g)
    return {"params": params, "index": torch.arange(batch_size) % n_subjects, "pts_d": pts,
            "occ_gt": (torch.rand(batch_size, n_points, 1, generator=g) > 0.5).float()}


def make_fine_batch(server, batch_size: int, res: int, n_surface: int, n_subjects: int,
                    seed: int = 0) -> dict:
    """A stage-2 batch from the FLAME (head-model) mesh: cache [B, R, R, 3] = canonical vertex
    positions rasterized in a random view, img_mask = cache mask, random images in [-1, 1],
    surface samples [B, S, 3] near the posed vertices."""
    from lib.render.rasterizer import interpolate, rasterize

    g = torch.Generator().manual_seed(seed)
    params = make_batch(server, batch_size, 1, n_subjects, seed)["params"]
    views = torch.randint(0, 9, (batch_size,), generator=g)
    view_params = server.view_params(params, views, 9)
    with torch.no_grad():
        out, out_v = server(params), server(view_params)
        frags = rasterize(out_v.verts, server.flame.faces, res)
        cache = interpolate(frags, server.flame.faces, out.verts_c)
    idx = torch.randint(0, out.verts.shape[1], (batch_size, n_surface), generator=g)
    surf = torch.gather(out.verts, 1, idx[..., None].expand(-1, -1, 3))
    mask = frags.mask
    return {"index": torch.arange(batch_size) % n_subjects, "params": params,
            "view_params": view_params,
            "normal_img": torch.rand(batch_size, 3, res, res, generator=g) * 2 - 1,
            "rgb_img": torch.rand(batch_size, 3, res, res, generator=g) * 2 - 1,
            "img_mask": mask[:, None], "cache_pts": cache * mask[..., None], "cache_mask": mask,
            "surface_points": surf + 0.005 * torch.randn(surf.shape, generator=g),
            "surface_normals": torch.nn.functional.normalize(
                torch.randn(surf.shape, generator=g), dim=-1),
            "surface_colors": torch.rand(surf.shape, generator=g) * 2 - 1}


def bench_fine(size: str, mode: str, steps: int, flame_path: Path, gan: bool) -> dict:
    """Seconds per stage-2 step (see the module docstring)."""
    from lib.model import adversarial
    from lib.model.ganhead import GANHead

    overrides = [f"datamodule.flame_model={flame_path}", f"deformer={mode}",
                 "+experiments=fine_cpu" if size == "cpu" else "+experiments=fine"]
    if gan:
        overrides += ["model.use_gan=true", "model.use_gan_color=true"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    model = GANHead(n_subjects=8, output_dir=tempfile.mkdtemp(),
                    **OmegaConf.to_container(cfg.model, resolve=True))
    opts = model.configure_optimizers()
    opt, opt_d = (opts[0], opts[1]) if isinstance(opts, list) else (opts, None)
    dm = cfg.datamodule
    batch = make_fine_batch(model.flame_server, dm.batch_size, dm.load_res, dm.surface_points, 8)
    times, valid = [], []
    r1_time = 0.0
    for step in range(steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        terms, out = model.stage.render_and_losses(batch)
        if gan:
            terms.update(adversarial.generator_gan_terms(model, out))
        loss = sum(v for k, v in terms.items() if k != "valid_3d")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if gan:
            d_loss, _ = adversarial.discriminator_loss(model, out, 1)
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
            if step == 1:  # time one critics' step with R1, amortized over d_reg_every steps
                t1 = time.perf_counter()
                opt_d.zero_grad()
                adversarial.discriminator_loss(model, out, 0)[0].backward()
                opt_d.step()
                r1_time = time.perf_counter() - t1
        if step:
            times.append(time.perf_counter() - t0 - (r1_time if step == 1 else 0.0))
            valid.append(float(terms["valid_3d"]))
    n_points = int(batch["cache_mask"].sum()) + dm.batch_size * dm.surface_points
    s = sum(times) / len(times) + r1_time / cfg.model.d_reg_every
    return {"size": size + ("+gan" if gan else ""), "mode": mode, "batch": dm.batch_size,
            "res": dm.load_res, "points": n_points, "s_per_step": s,
            "valid": sum(valid) / len(valid)}


class CoarseRun:
    """One stage-1 model (size, deformer mode) ready to step; with ckpt, the networks and codes
    of a trained stage-1 checkpoint of the same size (learned, non-rigid skinning) and no bone
    bootstrapping. step() runs one timed training step and records its figures."""

    def __init__(self, size: str, mode: str, flame_path: Path, ckpt: Path | None = None):
        from lib.model.ganhead import GANHead

        overrides = [f"datamodule.flame_model={flame_path}", f"deformer={mode}"]
        if size == "cpu":
            overrides.insert(0, "+experiments=cpu")
        state, n_subjects = None, 8
        if ckpt is not None:
            checkpoint = read_project_checkpoint(ckpt)
            state = checkpoint["state_dict"]
            n_subjects = state["z_shapes.weight"].shape[0]
            overrides.append("model.nepochs_pretrain=0")
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        self.model = GANHead(n_subjects=n_subjects, output_dir=tempfile.mkdtemp(),
                             **OmegaConf.to_container(cfg.model, resolve=True))
        if state is not None:
            self.model.on_load_checkpoint(checkpoint)  # checks the head model, drops FLAME arrays
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if unexpected or any(not k.startswith(("disc_",)) for k in missing):
                raise ValueError(f"{ckpt} does not fit the '{size}' networks: missing "
                                 f"{missing[:3]}, unexpected {unexpected[:3]}")
        self.opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad],
                                    lr=1e-3)
        dm = cfg.datamodule
        self.size, self.mode, self.batch_size = size, mode, dm.batch_size
        self.n_points = dm.points_per_frame + dm.points_per_frame // 8
        self.batch = make_batch(self.model.flame_server, dm.batch_size, self.n_points, 8)
        self.spent = {}
        _time_calls(self.spent, self.model.deformer, ("search", "_implicit_correction"))
        _time_calls(self.spent, self.model, ("generator",), forward=True)
        self.rows = []  # per timed step: (seconds, valid fraction, search, correction, generator)

    def step(self, record: bool = True) -> None:
        for k in self.spent:
            self.spent[k] = 0.0
        t0 = time.perf_counter()
        terms = self.model.stage.losses(self.batch)
        loss = sum(v for k, v in terms.items() if k != "valid_frac")
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if record:
            self.rows.append((time.perf_counter() - t0, float(terms["valid_frac"]),
                              self.spent["search"], self.spent["_implicit_correction"],
                              self.spent["generator"]))

    def generator_time(self) -> float:
        """The generator's forward and backward alone (shared by both modes: a floor under the
        step), fastest of 3."""
        z = self.model.z_shapes(self.batch["index"]).detach().requires_grad_(True)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            volume = self.model.generator(z)
            volume.backward(torch.ones_like(volume))
            best = min(best, time.perf_counter() - t0)
        return best

    def result(self) -> dict:
        med = lambda i: statistics.median(r[i] for r in self.rows)  # noqa: E731
        return {"size": self.size, "mode": self.mode, "batch": self.batch_size,
                "points": self.n_points, "s_per_step": med(0), "valid": med(1),
                "search": med(2), "correction": med(3), "generator": med(4),
                "generator_fb": self.generator_time()}


def _time_calls(spent: dict, owner, names, forward: bool = False) -> None:
    """Wrap owner.<name> (or, with forward, the forward of the submodule owner.<name>) so that
    the seconds spent in it accumulate in spent[name] (forward passes only)."""
    for name in names:
        target, attr = (getattr(owner, name), "forward") if forward else (owner, name)
        fn = getattr(target, attr)

        def timed(*a, _fn=fn, _name=name, **k):
            t = time.perf_counter()
            out = _fn(*a, **k)
            spent[_name] += time.perf_counter() - t
            return out
        setattr(target, attr, timed)
        spent[name] = 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", nargs="+", default=["coarse", "fine"])
    ap.add_argument("--sizes", nargs="+", default=["cpu", "default"])
    ap.add_argument("--gan", action="store_true", help="stage 2: also time both critics")
    ap.add_argument("--modes", nargs="+", default=["exact", "fast"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ckpt", type=Path, default=None,
                    help="stage 1: start from this trained stage-1 checkpoint (its size)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lib.synthetic.head_model import build_head_model, save_head_model

    flame_path = Path(tempfile.mkdtemp()) / "generic_model.pkl"
    save_head_model(build_head_model(seed=0), flame_path)
    print(f"device cpu, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if "coarse" in args.stages:
        run_coarse(args, flame_path)
    if "fine" in args.stages:
        print(f"stage 2 {'size':12s} {'mode':6s} {'batch':>5s} {'res':>4s} {'points':>7s} "
              f"{'s/step':>8s} {'valid':>6s}")
        for size in args.sizes:
            for mode in args.modes:
                for gan in ([False, True] if args.gan else [False]):
                    try:
                        r = bench_fine(size, mode, args.steps, flame_path, gan)
                    except (ValueError, KeyError) as err:
                        print(f"stage 2 {size:12s} {mode:6s} unavailable: {err}")
                        continue
                    print(f"stage 2 {r['size']:12s} {r['mode']:6s} {r['batch']:5d} {r['res']:4d} "
                          f"{r['points']:7d} {r['s_per_step']:8.2f} {r['valid']:6.3f}", flush=True)


def run_coarse(args, flame_path: Path) -> None:
    """Per size: one model per mode, their steps interleaved (so that every mode sees the same
    machine load), the median of --steps timed steps after one warm-up step each."""
    print(f"{'size':8s} {'mode':6s} {'batch':>5s} {'points':>7s} {'s/step':>8s} {'valid':>6s}"
          f"   forward seconds per step in: {'search':>7s} {'correction':>10s} "
          f"{'generator':>9s}   generator fwd+bwd")
    for size in args.sizes:
        runs = []
        for mode in args.modes:
            try:
                runs.append(CoarseRun(size, mode, flame_path, args.ckpt))
            except (ValueError, KeyError) as err:
                print(f"{size:8s} {mode:6s} unavailable: {err}")
        for step in range(args.steps + 1):
            for run in runs:
                run.step(record=step > 0)
        results = [run.result() for run in runs]
        for r in results:
            print(f"{r['size']:8s} {r['mode']:6s} {r['batch']:5d} {r['points']:7d} "
                  f"{r['s_per_step']:8.2f} {r['valid']:6.3f}   {'':29s}{r['search']:7.3f} "
                  f"{r['correction']:10.3f} {r['generator']:9.3f}   {r['generator_fb']:8.3f}",
                  flush=True)
        if len(results) > 1:
            base = results[0]
            print(f"  {size}: step speed-up over {base['mode']}: "
                  + ", ".join(f"{r['mode']} {base['s_per_step'] / r['s_per_step']:.2f}x"
                              for r in results[1:]))


if __name__ == "__main__":
    main()

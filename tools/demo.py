"""`make demo`: the whole pipeline on the built-in synthetic data, phase by phase.

Each phase prints one progress line with its time and is resumable: a phase whose outputs
exist (and are newer than what they were made from) is reused, so a second `make demo`
finishes in a fraction of the time; a killed training run resumes from its last checkpoint.

Phases: synthetic data (head model, FaceVerse-format scans of a population of persons, a
held-out person, out-of-distribution persons, a motion sequence, a picture of every person),
pictures of the head model and the scans, preprocessing, stage 1 (`cpu` experiment),
precompute (`--precompute mesh`: the extracted mesh's points, no search) and stage 2
(`fine_cpu`), then test.py: sampled avatars and their diversity against
the training persons (tools/diversity.py), a reenactment with the motion sequence and fits of
the held-out scan and of an out-of-distribution scan (the shape networks tuned to each,
`--tune-steps`); finally the training scans beside the
model's renders (a view trained on and a held-out one), loss plots and `<out>/index.html`, a
gallery of all of it that opens from disk.
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
sys.path.insert(0, str(ROOT))

from lib.model.checkpoint import read_project_checkpoint  # noqa: E402
from lib.utils.checkpoint_io import last_checkpoint  # noqa: E402

TIMES: dict[str, float] = {}


def phase(name: str):
    """`with phase('x'):` prints the phase's start and end line with its time (kept in TIMES)."""

    class _Phase:
        def __enter__(self):
            self.t0 = time.time()
            print(f"[demo] {name} ...", flush=True)
            return self

        def __exit__(self, *exc):
            if exc[0] is None:
                TIMES[name] = time.time() - self.t0
                print(f"[demo] {name}: done in {TIMES[name]:.1f} s", flush=True)
            return False

    return _Phase()


def is_fresh(path: Path, *sources: Path) -> bool:
    """path exists and is newer than every existing source (so a phase's output is reused only
    while what it was made from is unchanged)."""
    if not path.is_file():
        return False
    t = path.stat().st_mtime
    return all(not src.exists() or src.stat().st_mtime <= t for src in sources)


def run(cmd: list[str]) -> None:
    """Run a pipeline step (an entry point of the project) and stop the demo if it fails."""
    res = subprocess.run([sys.executable, *cmd], cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"[demo] step failed (exit {res.returncode}): {' '.join(cmd)}")


def make_data(data: Path, args, preview: Path) -> None:
    """A population of synthetic persons (tools/make_synthetic.py), the held-out and the
    out-of-distribution persons, and a preview picture of every person."""
    run(["tools/make_synthetic.py", "--out", str(data), "--identities", str(args.identities),
         "--expressions", str(args.expressions), "--holdout", str(args.holdout),
         "--ood", str(args.ood), "--faces", str(args.faces), "--texture-size",
         str(args.texture_size), "--seed", str(args.seed), "--preview", str(preview)])


def diversity(data: Path, out: Path) -> dict:
    """Mean pairwise Chamfer-L1 among the sampled avatars against that among the training
    persons (tools/diversity.py) -> its JSON result."""
    import json

    path = out / "diversity.json"
    meshes = sorted((out / "fine" / "sample").glob("sample_*/canonical.ply"))
    if not is_fresh(path, *meshes):
        run(["tools/diversity.py", "--scans", str(data), "--meshes", *map(str, meshes),
             "--json", str(path)])
    return json.loads(path.read_text())


def preprocess(data: Path) -> None:
    run(["preprocess.py", "--scan_folder", str(data / "faceverse_dataset"),
         "--flame_folder", str(data / "flame_params"),
         "--output_folder", str(data / "processed"),
         "--flame_model", str(data / "flame" / "generic_model.pkl"),
         "--data_list", str(data / "data_list.csv")])


def data_overrides(data: Path, out: Path) -> list[str]:
    """Hydra overrides shared by every train/precompute/test call of the demo."""
    return ["datamodule=synthetic", f"datamodule.processed_dir={data / 'processed'}",
            f"datamodule.data_list={data / 'data_list.csv'}",
            f"datamodule.flame_model={data / 'flame' / 'generic_model.pkl'}",
            f"output_dir_coarse={out / 'coarse'}"]


def train(stage: str, data: Path, out: Path, epochs: int, extra: list[str]) -> Path:
    """Stage 1 ('coarse', cpu experiment) or 2 ('fine', fine_cpu); resumes a killed run and
    skips a finished one. Returns the run's last checkpoint."""
    run_dir = out / stage
    last = last_checkpoint(run_dir)
    if last.is_file() and read_project_checkpoint(last)["epoch"] >= epochs:
        print(f"[demo] {stage}: {last} already trained for {epochs} epochs")
        return last
    experiment = "cpu" if stage == "coarse" else "fine_cpu"
    run(["train.py", f"expname={stage}", *data_overrides(data, out), f"+experiments={experiment}",
         f"output_dir={run_dir}", f"trainer.max_epochs={epochs}",
         f"resume={str(last.is_file()).lower()}", "trainer.enable_progress_bar=false", *extra])
    return last


def test_mode(mode: str, data: Path, out: Path, ckpt: Path, extra: list[str]) -> Path:
    """test.py eval_mode=<mode> on the stage-2 checkpoint, unless its summary is newer.
    Returns <out>/fine/<mode>/."""
    folder = out / "fine" / mode
    if is_fresh(folder / "summary.json", ckpt):
        print(f"[demo] {mode}: {folder} is up to date")
        return folder
    run(["test.py", "expname=fine", *data_overrides(data, out), "+experiments=fine_cpu",
         f"output_dir={out / 'fine'}", f"ckpt={ckpt}", f"eval_mode={mode}", *extra])
    return folder


def reconstructions(data: Path, out: Path, ckpt: Path, views: list[int],
                    max_persons: int = 8) -> tuple[Path, dict]:
    """The first scan of the first max_persons training persons, real renders beside the
    model's, at the given views (a trained one and held-out ones). Returns the picture and the
    mean PSNR per view."""
    import json

    from lib.dataset.fine import ScanImageDataset
    from lib.inference.loading import load_model
    from lib.inference.reconstruction import comparison_grid, score_views
    from lib.render.images import save_png
    from lib.utils.atomic import atomic_path

    path, table = out / "reconstructions.png", out / "reconstructions.json"
    if is_fresh(path, ckpt) and is_fresh(table, ckpt):
        return path, json.loads(table.read_text())
    from omegaconf import OmegaConf

    model = load_model(ckpt, str(data / "flame" / "generic_model.pkl"))
    res = int(OmegaConf.load(out / "fine" / "config.yaml").datamodule.load_res)
    ds = ScanImageDataset(data / "processed", data / "data_list.csv", out / "coarse" /
                          f"cache_{res}", load_res=res, repeat=len(views), fixed_view=True,
                          surface_points=16, views=views)
    firsts = [sid for sid in ds.items if sid.endswith("_01")][:max_persons]
    scores = score_views(model, ds, firsts, views)
    save_png(path, comparison_grid(scores))
    psnr = {f"view {k}": {"rgb": float(np.mean([s.psnr_rgb for s in scores if s.view == k])),
                          "normal": float(np.mean([s.psnr_normal for s in scores
                                                   if s.view == k]))} for k in views}
    with atomic_path(table) as tmp:
        tmp.write_text(json.dumps(psnr, indent=2))
    return path, psnr


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
    """Front and side renders of a few synthetic scans, in FLAME space (docs/design.md, Scans
    in FLAME space)."""
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
        tile = torch.cat([front, side], dim=1).numpy()
        tiles.append(add_label(tile, f"{sid} ({len(faces)} faces)"))
    path = out / "scans.png"
    save_png(path, make_grid(tiles, ncols=3))
    return path


def _rotate_y(verts: torch.Tensor, angle: float) -> torch.Tensor:
    """verts: [B, V, 3] rotated about the y axis through the origin by `angle` radians."""
    c, s = float(np.cos(angle)), float(np.sin(angle))
    rot = verts.new_tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    return verts @ rot.T


def phase_times(out: Path) -> dict[str, float]:
    """Seconds per phase, kept in <out>/timings.json across runs: a phase's time is replaced
    only when this run took at least half as long (it redid the work), so a rerun that reuses
    everything keeps the times of the run that made the outputs."""
    import json

    from lib.utils.atomic import atomic_path

    path = out / "timings.json"
    times = json.loads(path.read_text()) if path.is_file() else {}
    times.update({k: v for k, v in TIMES.items() if k not in times or v >= 0.5 * times[k]})
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(times, indent=2))
    return times


def gallery(out: Path, data: Path, pics: dict, psnr: dict, views: list[int],
            held: list[int], div: dict, fits: dict) -> Path:
    """<out>/index.html: every picture and video of the run, the fit's metrics and the times."""
    import json

    from lib.utils.gallery import plot_losses, write_gallery

    fine = out / "fine"
    plots = []
    for stage, title in (("coarse", "stage 1 (occupancy, skinning)"),
                         ("fine", "stage 2 (normals, colour)")):
        logs = sorted((out / stage / "logs").glob("version_*/metrics.csv"))
        if logs:
            plots.append({"path": plot_losses(logs, out / f"losses_{stage}.png", title),
                          "caption": f"{title}: losses against the training step", "wide": True})
    samples = sorted((fine / "sample").glob("sample_*/turntable.mp4"))
    fit_tables = {}
    for name, (sid, folder) in fits.items():
        metrics = json.loads((folder / "metrics.json").read_text())
        frozen = (metrics.get("tuned") or {}).get("z_shape_fit")  # before tuning
        fit_tables[name] = {
            key: (f"fit {metrics['fit'][key]:.4g}  |  "
                  + (f"networks frozen {frozen[key]:.4g}  |  " if frozen else "")
                  + f"FLAME only {metrics['flame_only'][key]:.4g}")
            for key in ("chamfer_l1", "chamfer_l2", "normal_consistency", "fscore_1pct",
                        "fscore_2pct") if key in metrics.get("fit", {})}
    tr, sa = div["training"], div["meshes"]
    div_rows = {"training persons": f"{tr['mean']:.4f} (std {tr['std']:.4f}, "
                                    f"{tr['meshes']} meshes)",
                "sampled avatars": f"{sa['mean']:.4f} (std {sa['std']:.4f}, "
                                   f"{sa['meshes']} meshes)",
                "samples / training": f"{div['ratio']:.3f}"}
    reen = json.loads((fine / "reenact" / "summary.json").read_text())
    fps = {k: v for k, v in reen.items() if isinstance(v, (int, float))}
    psnr_rows = {f"{k} ({'held out' if int(k.split()[1]) in held else 'trained'})":
                 f"RGB {v['rgb']:.2f} dB, normal {v['normal']:.2f} dB" for k, v in psnr.items()}
    sections = [
        {"title": "Synthetic data",
         "text": "The built-in stand-in for FLAME and FaceVerse: a FLAME-format head model "
                 "(identity, expression, jaw, eyes) and textured scans of a population of "
                 "persons (shapes, hair styles, ages, colours), plus held-out and "
                 "out-of-distribution persons never trained on.",
         "items": [{"path": pics["head_model"], "caption": "head model: identity, jaw, eyes, "
                                                           "expressions (front | side)"},
                   {"path": pics["population"], "caption": "every person's first scan "
                                                           "(front | side)", "wide": True},
                   {"path": pics["scans"], "caption": "training scans (front | side)"}]},
        {"title": "Training", "items": plots},
        {"title": "Reconstructions",
         "text": "The first scan of every training person: preprocessed render beside the "
                 "model's render (colour, then normals), in view(s) "
                 f"{', '.join(map(str, views))}; views {held} were never trained on.",
         "items": [{"path": pics["recon"], "caption": "scan | model, RGB and normals",
                    "wide": True},
                   {"kind": "table", "data": psnr_rows, "caption": "masked PSNR (mean)"}]},
        {"title": "Sampled avatars",
         "text": "New avatars: z_shape, z_detail and z_color each drawn from a Gaussian fitted "
                 "to the learned codes; turntables of colour and normals.",
         "items": [{"path": fine / "sample" / "samples.png", "caption": "front views",
                    "wide": True},
                   {"kind": "table", "data": div_rows,
                    "caption": "diversity: mean pairwise Chamfer-L1 (tools/diversity.py)"}]
         + [{"path": p, "caption": p.parent.name + " turntable"} for p in samples]},
        {"title": "Reenactment",
         "text": "A training subject driven by the synthetic FLAME motion sequence, beside the "
                 "driving FLAME mesh.",
         "items": [{"path": fine / "reenact" / "reenact.mp4", "caption": "RGB | normals | FLAME"},
                   {"path": fine / "reenact" / "frames.png", "caption": "a few frames"},
                   {"kind": "table", "data": fps, "caption": "timing"}]},
        *[{"title": f"Fitting a {name} scan ({sid})",
           "text": "A person never seen in training, posed by its FLAME parameters: z_shape "
                   "optimized with the networks frozen, the shape networks then tuned to the "
                   "scan (test.fit.tune_steps), then z_detail and z_color."
                   + (" Out of distribution: a hair style and shapes the training persons do "
                      "not have." if name != "held-out" else ""),
           "items": [{"path": folder / "compare.png", "wide": True,
                      "caption": "scan | scan normals | FLAME only | fit | fit normals"},
                     {"kind": "table", "data": fit_tables[name],
                      "caption": "fit vs FLAME-only baseline"}]}
          for name, (sid, folder) in fits.items()],
        {"title": "Run",
         "items": [{"kind": "table",
                    "caption": "seconds per phase when it last did its work (a rerun reuses "
                               "finished phases in a second or so)",
                    "data": {k: f"{v:.1f}" for k, v in phase_times(out).items()}}]},
    ]
    return write_gallery(out / "index.html", "GANHead demo",
                         "The whole GANHead pipeline on synthetic data, on this machine's CPU: "
                         "data, preprocessing, two training stages, sampling, reenactment and "
                         "scan fitting.", sections)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic")
    ap.add_argument("--identities", type=int, default=16, help="training persons")
    ap.add_argument("--expressions", type=int, default=2)
    ap.add_argument("--holdout", type=int, default=1, help="held-out persons (fit)")
    ap.add_argument("--ood", type=int, default=2, help="out-of-distribution persons")
    ap.add_argument("--faces", type=int, default=30000, help="approximate faces per scan")
    ap.add_argument("--texture-size", type=int, default=512)
    ap.add_argument("--samples", type=int, default=8, help="sampled avatars")
    ap.add_argument("--epochs", type=int, default=12, help="stage-1 epochs (cpu experiment)")
    ap.add_argument("--epochs2", type=int, default=6, help="stage-2 epochs (fine_cpu)")
    ap.add_argument("--precompute", choices=("search", "mesh"), default="mesh",
                    help="precompute.method (search: the original's)")
    ap.add_argument("--tune-steps", type=int, default=100,
                    help="steps tuning the shape networks to each fitted scan (0: frozen)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pics: dict[str, Path] = {}
    data, out = args.data, args.out

    with phase("synthetic data"):
        pics["population"] = out / "population.png"
        make_data(data, args, pics["population"])
    model_path = data / "flame" / "generic_model.pkl"
    with phase("head model pictures"):
        pics["head_model"] = out / "head_model.png"
        if not is_fresh(pics["head_model"], model_path):
            head_model_pictures(model_path, out)
    with phase("scan pictures"):
        pics["scans"] = out / "scans.png"
        if not is_fresh(pics["scans"], *(data / "faceverse_dataset").glob("*/*.obj")):
            scan_pictures(data, out)
    with phase("preprocessing"):
        preprocess(data)
    with phase("stage 1 training (cpu experiment)"):
        coarse = train("coarse", data, out, args.epochs, [])
    with phase("precompute (stage-2 cache)"):
        # each pixel's point from the extracted mesh instead of the deformer's search: the
        # same cache to within 1e-4 (README: Benchmarks) in less than half the time
        run(["precompute.py", "expname=coarse", *data_overrides(data, out),
             "+experiments=fine_cpu", f"ckpt={coarse}", f"precompute.method={args.precompute}"])
    with phase("stage 2 training (fine_cpu experiment)"):
        fine = train("fine", data, out, args.epochs2, [f"starting_path={coarse}"])
    small = ["test.res=192", "test.mesh_res=128"]
    with phase("test.py sample"):
        test_mode("sample", data, out, fine,
                  [*small, f"test.sample.n_samples={args.samples}", "test.n_frames=24",
                   "test.sample.covariance=full"])
    with phase("sampling diversity"):
        div = diversity(data, out)
    with phase("test.py reenact"):
        test_mode("reenact", data, out, fine,
                  [*small, "subject=001_01", f"motion={data / 'motion' / 'flame_params.json'}",
                   "test.reenact.max_frames=90"])
    held_scans = sorted((data / "heldout" / "faceverse_dataset").glob("*/*.obj"))
    if not held_scans:
        raise SystemExit(f"[demo] no held-out scan under {data / 'heldout'} (--holdout 0?)")
    scan = held_scans[0]
    fits = {}
    for name, root in (("held-out", data / "heldout"), ("out-of-distribution", data / "ood")):
        scans = sorted((root / "faceverse_dataset").glob("*/*.obj"))
        if not scans:
            continue
        scan = scans[0]
        folder = out / "fine" if name == "held-out" else out / "ood"
        with phase(f"test.py fit ({name} scan)"):
            tune = f"test.fit.tune_steps={args.tune_steps}"
            if name == "held-out":
                test_mode("fit", data, out, fine, [*small, tune, f"scan={scan}",
                          f"flame={root / 'flame_params' / (scan.stem + '_flame.pkl')}"])
            elif not is_fresh(folder / "fit" / "summary.json", fine):
                run(["test.py", "expname=fine", *data_overrides(data, out),
                     "+experiments=fine_cpu", f"output_dir={folder}", f"ckpt={fine}",
                     "eval_mode=fit", *small, tune, f"scan={scan}",
                     f"flame={root / 'flame_params' / (scan.stem + '_flame.pkl')}"])
        fits[name] = (scan.parent.name, folder / "fit")
    if "held-out" not in fits:
        raise SystemExit(f"[demo] no held-out scan under {data / 'heldout'} (--holdout 0?)")
    from omegaconf import OmegaConf

    held = [int(k) for k in OmegaConf.load(out / "fine" / "config.yaml").datamodule.holdout_views]
    views = [0, *held]
    with phase("reconstructions"):
        pics["recon"], psnr = reconstructions(data, out, fine, views)
    with phase("gallery"):
        page = gallery(out, data, pics, psnr, views, held, div, fits)

    print(f"[demo] finished in {time.time() - t0:.1f} s; wrote:")
    for p in [*pics.values(), coarse, fine, out / "fine" / "sample", out / "fine" / "reenact",
              *[f for _, f in fits.values()], page]:
        print(f"  {p}")
    print(f"[demo] open {page} in a browser")


if __name__ == "__main__":
    main()

"""Raw scan fitting on out-of-distribution held-out persons under real-scan conditions.

    python bench/fit_real.py --ckpt outputs/demo/fine/checkpoints/last.ckpt \\
        --head-model data/demo/flame/generic_model.pkl --processed data/demo/processed \\
        --out outputs/fit_real [--persons 6] [--variant new|before] [--set KEY=VALUE ...]

Persons are drawn from the synthetic head model with identities wider than the training
population's (shape coefficients 1.5x the spread), their own hair style, a mild expression,
and each gets real-scan conditions (lib/synthetic/bust.py), cycling through: other units
(metres or millimetres) and a random orientation, a neck/shoulders/torso, holes, spikes.
Each scan is fitted by test.py's fit (lib/inference/fitting.py run_fit, the `test.fit` block
of configs/config.yaml with the --set overrides) with FLAME fitted (no parameter file);
`--variant before` turns off what the crop, the start search, the code units, the
ambiguous-point filter and the orientation/bust search added (FLAME fitted with the
identity and flip_yz orientations, the whole scan as the head; for comparison). Prints one
row per scan and the means, and writes <out>/<variant>/results.json.

With `--scans DIR` it fits the scans of a synthetic data set's folder instead (for example
the out-of-distribution persons, `--scans data/synthetic/ood`: DIR/faceverse_dataset/<id>/
<id>.obj), each with its FaceVerse parameter file DIR/flame_params/<id>_flame.pkl, or with
FLAME fitted when `--fit-flame` is given.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONDITIONS = [
    ("metres, rotated", dict(units=1.0 / 6.0, rotate=True)),
    ("torso, metres", dict(units=1.0 / 6.0, torso=True)),
    ("torso, holes, millimetres, rotated", dict(units=1000.0 / 6.0, torso=True, holes=True,
                                                rotate=True)),
    ("holes, spikes", dict(units=1.0, holes=True, spikes=True)),
    ("torso, holes, spikes, rotated, mm", dict(units=1000.0 / 6.0, torso=True, holes=True,
                                               spikes=True, rotate=True)),
    ("clean", dict(units=1.0)),
]


def make_person(ctx, k: int, seed: int, out: Path) -> tuple[Path, str]:
    """Scan of OOD person k under condition k % len(CONDITIONS), written as a .ply with vertex
    colours. Returns its path and the condition's name."""
    import trimesh

    from lib.dataset.scan_sampling import texture_colors
    from lib.synthetic.bust import add_spikes, add_torso, punch_holes, random_rotation, rigid_units
    from lib.synthetic.scans import STYLE_ORDER, make_scan, make_style

    rng = np.random.default_rng(np.random.SeedSequence([seed, 77, k]))
    shape = np.zeros(100)
    shape[:10] = rng.normal(0.0, 1.5, 10)
    shape[10:30] = rng.normal(0.0, 0.6, 20)
    exp = np.zeros(50)
    exp[:10] = rng.normal(0.0, 0.3, 10)
    pose = np.zeros(15)
    pose[6] = rng.uniform(0.0, 0.08)
    style = make_style(int(rng.integers(0, 50)), rng)
    style["hair"] = STYLE_ORDER[k % len(STYLE_ORDER)]
    style["seed"] = int(rng.integers(0, 2**31 - 1))
    scan = make_scan(ctx, shape, exp, pose, style, rng, target_faces=30000, texture_size=512)
    uv_of_vertex = np.zeros((len(scan.vertices), 2))
    uv_of_vertex[scan.faces.reshape(-1)] = scan.uvs[scan.face_uvs.reshape(-1)]
    v, f = scan.vertices, scan.faces
    c = texture_colors(scan.texture, uv_of_vertex)
    name, cond = CONDITIONS[k % len(CONDITIONS)]
    n_head = len(f)
    if cond.get("torso"):
        v, f, c, n_head = add_torso(v, f, c)
    keep = np.ones(len(f), dtype=bool)
    if cond.get("holes"):
        head_ids = np.unique(f[:n_head])
        keep = punch_holes(v, f, 6, 0.06, rng, among=head_ids)
    if cond.get("spikes"):
        v = add_spikes(v, f[:n_head], 15, 0.5, rng)
    R = random_rotation(rng) if cond.get("rotate") else np.eye(3)
    v = rigid_units(v, cond["units"], R, rng.uniform(-1, 1, 3) * cond["units"])
    path = out / f"person{k:02d}.ply"
    trimesh.Trimesh(v, f[keep], vertex_colors=(np.clip(c, 0, 1) * 255).astype(np.uint8),
                    process=False).export(str(path))
    return path, name


def before_options(fit):
    """FitOptions `fit` with the additions of the scan-fitting work turned off (module
    docstring)."""
    from dataclasses import replace

    return replace(fit, crop=replace(fit.crop, enabled=False),
                   init=replace(fit.init, nearest=0, samples=0), code_units="raw",
                   ambiguous=None, lambda_code=0.0,
                   flame=replace(fit.flame, orientations=("identity", "flip_yz"),
                                 head_fractions=(1.0,), keep_candidates=2))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--head-model", type=Path, required=True)
    ap.add_argument("--processed", type=Path, default=None,
                    help="the training data (its FLAME shapes pick the nearest training codes)")
    ap.add_argument("--data-list", type=Path, default=None,
                    help="the training data list (for checkpoints without scan ids)")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "fit_real")
    ap.add_argument("--persons", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", choices=("new", "before"), default="new")
    ap.add_argument("--mesh-res", type=int, default=128)
    ap.add_argument("--only", type=int, nargs="*", default=None, help="person numbers")
    ap.add_argument("--scans", type=Path, default=None,
                    help="fit this data set folder's scans instead of generated persons")
    ap.add_argument("--fit-flame", action="store_true",
                    help="with --scans: fit FLAME instead of reading the parameter files")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="test.fit overrides, e.g. shape_steps=50 batch=1000")
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    from lib.inference.fitting import FitOptions, run_fit
    from lib.inference.loading import load_model
    from lib.synthetic.scans import HeadContext
    from lib.utils.atomic import atomic_path

    cfg = OmegaConf.load(ROOT / "configs" / "config.yaml").test.fit
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.set))
    # the block's interpolations (res, mesh_res, seed) point outside it: set them here
    for key, value in (("res", 192), ("mesh_res", args.mesh_res), ("seed", args.seed)):
        cfg[key] = value
    fit = FitOptions.from_config(cfg)
    if args.variant == "before":
        fit = before_options(fit)
    scans = args.out / "scans"
    if args.scans is None:
        scans.mkdir(parents=True, exist_ok=True)
    ctx = HeadContext.from_path(str(args.head_model))
    model = load_model(args.ckpt, str(args.head_model), "cpu")
    rows = []
    if args.scans is not None:
        paths = sorted((args.scans / "faceverse_dataset").glob("*/*.obj"))
        if not paths:
            raise SystemExit(f"bench/fit_real.py: no scans under {args.scans}/faceverse_dataset")
        persons = args.only if args.only else range(len(paths))
    else:
        persons = args.only if args.only else range(args.persons)
    for k in persons:
        flame = None
        if args.scans is not None:
            path = paths[k]
            cond = "FLAME fitted" if args.fit_flame else "FaceVerse parameters"
            if not args.fit_flame:
                flame = args.scans / "flame_params" / f"{path.stem}_flame.pkl"
        else:
            path, cond = make_person(ctx, k, args.seed, scans)
        t0 = time.time()
        m = run_fit(model, path, args.out / args.variant / path.stem, fit, flame_path=flame,
                    processed_dir=args.processed, data_list=args.data_list)
        scored = {w: m[w] for w in ("fit", "flame_only", "start")}
        if m.get("tuned"):  # the z_shape fit before tuning
            scored["z_shape_fit"] = m["tuned"]["z_shape_fit"]
        row = {"person": path.stem if args.scans is not None else k, "condition": cond,
               "seconds": round(time.time() - t0, 1),
               **{f"{w}_{key}": v[key] for w, v in scored.items()
                  for key in ("chamfer_l1", "fscore_1pct")},
               "start": m["start_choice"]["chosen"],
               "cropped_area": 1 - m["crop"].get("kept", {}).get("area_fraction", 1.0)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    mean = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]
            if key.endswith(("chamfer_l1", "fscore_1pct"))}
    print("mean", json.dumps(mean))
    res = {"rows": rows, "mean": mean, "variant": args.variant}
    (args.out / args.variant).mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / args.variant / "results.json") as tmp:
        tmp.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()

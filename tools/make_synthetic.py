"""Generate the synthetic stand-in for FLAME + FaceVerse: a population of textured scans
(docs/design.md, Synthetic stand-ins).

    python tools/make_synthetic.py --out data/synthetic --identities 64 --expressions 2 \
        --ood 8 --preview data/synthetic/population.png

writes
    <out>/flame/generic_model.pkl                         synthetic head model (FLAME pickle layout)
    <out>/faceverse_dataset/<id>/<id>.obj, .mtl, .jpg     textured scans, ids PPP_EE
    <out>/flame_params/<id>_flame.pkl                     their FaceVerse FLAME parameters
    <out>/motion/flame_params.json, motion.npz            a talking-like motion sequence
    <out>/heldout/faceverse_dataset/, flame_params/       with --holdout N: persons
                                                          identities+1 .. identities+N
                                                          (expression 01), never trained on,
                                                          for test.py's scan fitting
    <out>/ood/faceverse_dataset/, flame_params/           with --ood N: out-of-distribution
                                                          persons 901 .. 900+N (expressions
                                                          01 .. --ood-expressions), never
                                                          trained on
    --preview PNG                                         front views of every person's
                                                          first scan (training, then OOD)

Persons are drawn by lib/synthetic/population.py: identity coefficients of the head model's
whole shape space with std --spread (its leading 20 inside their 99th percentile), an age,
a hair style (every training style once per block of consecutive persons, bald included),
a hair length, skin, hair and iris colours, a beard for about a third, and an
expressiveness; expression 01 is near neutral, the others have random expression
coefficients, jaw openings and small head/neck/eye rotations scaled by the person's
expressiveness. Held-out persons are drawn like training persons. OOD persons come from
--ood-seed (default: seed + 1000) and their own random stream: every one wears the hair
style --ood-hair (never drawn for training), has a leading identity 1.15-1.5x further out
than any training person can be, and dyed hair colours. Every scan has a random FaceVerse
registration (scale, translation). Outputs that already exist completely are kept (use
--force to rebuild); every file is written atomically, and each scan is seeded from (seed,
person, expression) alone, so partial reruns, and runs with more identities, reproduce the
same persons.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def scan_id(person: int, expression: int) -> str:
    """1-based person and expression numbers -> FaceVerse-style id 'PPP_EE'."""
    return f"{person:03d}_{expression:02d}"


def scan_paths(out: Path, sid: str) -> list[Path]:
    d = out / "faceverse_dataset" / sid
    return [d / f"{sid}.obj", d / f"{sid}.mtl", d / f"{sid}.jpg",
            out / "flame_params" / f"{sid}_flame.pkl"]


OOD_FIRST = 901  # OOD person numbers start here, so their ids never meet training ones


def person_params(seed: int, person: int, population=None, ood: bool = False) -> dict:
    """A person (lib.synthetic.population.draw_person) from (seed, person) alone."""
    from lib.synthetic.population import Population, draw_person

    return draw_person(seed, person, population or Population(), ood)


def scan_params(seed: int, person: int, expression: int, expressiveness: float = 1.0,
                ood: bool = False) -> dict:
    """Expression (50,), pose (15,), FaceVerse registration of one scan; expressiveness
    scales the expression coefficients and the jaw opening."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 4 if ood else 2, person,
                                                        expression]))
    exp = np.zeros(50)
    pose = np.zeros(15)
    if expression == 1:  # near neutral
        exp[:10] = rng.normal(0.0, 0.1, 10)
        pose[6] = rng.uniform(0.0, 0.04)
        pose[0:3] = rng.normal(0.0, 0.02, 3)
    else:
        exp[:10] = rng.normal(0.0, 1.0, 10) * np.linspace(1.2, 0.6, 10) * expressiveness
        exp[10:20] = rng.normal(0.0, 0.3, 10) * expressiveness
        pose[6] = min(rng.uniform(0.0, 0.35) * expressiveness, 0.4)  # jaw opening
        pose[0:3] = np.clip(rng.normal(0.0, [0.08, 0.15, 0.05]), -0.3, 0.3)   # global
        pose[3:6] = np.clip(rng.normal(0.0, [0.05, 0.08, 0.03]), -0.15, 0.15)  # neck
        gaze = rng.normal(0.0, [0.1, 0.15])
        pose[9:11] = pose[12:14] = gaze                          # both eyes: pitch, yaw
    return {"exp": exp.astype(np.float32), "pose": pose.astype(np.float32),
            "scale": float(rng.uniform(0.8, 1.3)), "transl_xy": rng.uniform(-0.08, 0.08, 2),
            "z_offset": float(rng.uniform(-0.15, 0.15)),
            "rng_seed": int(rng.integers(0, 2**31 - 1))}


_CTX = None


def _init_worker(model_path: str) -> None:
    global _CTX
    import torch

    from lib.synthetic.scans import HeadContext

    torch.set_num_threads(1)
    _CTX = HeadContext.from_path(model_path)


def _make_one(task: dict) -> tuple[str, int, float]:
    from lib.synthetic.scans import make_scan, write_scan

    t0 = time.time()
    scan = make_scan(_CTX, task["shape"], task["exp"], task["pose"], task["style"],
                     np.random.default_rng(task["rng_seed"]), target_faces=task["faces"],
                     texture_size=task["texture_size"])
    write_scan(task["out"], task["id"], scan, task["scale"], task["transl_xy"], task["z_offset"],
               _CTX.flame.z_shift)
    return task["id"], len(scan.faces), time.time() - t0


def write_head_model(path: Path, seed: int) -> None:
    """Build the synthetic head model and write it (atomically) to `path`."""
    from lib.synthetic.head_model import build_head_model, save_head_model

    save_head_model(build_head_model(seed=seed), path)


def plan_scans(out: Path, identities: int, expressions: int, seed: int = 0, holdout: int = 0,
               ood: int = 0, ood_expressions: int = 1, ood_seed: int | None = None,
               population=None) -> list[dict]:
    """Every scan of the data set: dicts of id, root folder, person, ood flag and the
    person's and the scan's parameters. Training persons 1..identities (every expression)
    under out/; held-out persons (expression 01) under out/heldout/ and OOD persons
    OOD_FIRST.. under out/ood/, so that preprocessing and the data list never see them."""
    from lib.synthetic.population import Population

    population = population or Population()
    if ood and identities + holdout >= OOD_FIRST:
        raise ValueError(f"identities + holdout must stay below {OOD_FIRST} with ood persons "
                         f"(they are numbered {OOD_FIRST}..), got {identities + holdout}")
    if ood > 999 - OOD_FIRST + 1:
        raise ValueError(f"at most {999 - OOD_FIRST + 1} ood persons, got {ood}")
    ood_seed = seed + 1000 if ood_seed is None else ood_seed
    rows = [(p, e, out, seed, False) for p in range(1, identities + 1)
            for e in range(1, expressions + 1)]
    rows += [(p, 1, out / "heldout", seed, False)
             for p in range(identities + 1, identities + holdout + 1)]
    rows += [(OOD_FIRST + k, e, out / "ood", ood_seed, True) for k in range(ood)
             for e in range(1, ood_expressions + 1)]
    plan = []
    for p, e, root, s, is_ood in rows:
        # OOD persons are numbered 1.. in their own stream
        number = p - OOD_FIRST + 1 if is_ood else p
        person = person_params(s, number, population, is_ood)
        plan.append({"id": scan_id(p, e), "root": Path(root), "person": person, "ood": is_ood,
                     "scan": scan_params(s, number, e, person["expressiveness"], is_ood)})
    return plan


def generate(out: Path, identities: int, expressions: int, seed: int = 0, faces: int = 60000,
             frames: int = 150, texture_size: int = 1024, force: bool = False,
             workers: int = 1, progress: bool = True, holdout: int = 0, ood: int = 0,
             ood_expressions: int = 1, ood_seed: int | None = None, population=None) -> dict:
    """Write the whole synthetic data set under `out`; returns a summary dict."""
    from tqdm import tqdm

    from lib.dataset.motion import save_motion_json, save_motion_npz
    from lib.synthetic.motion import make_motion

    out = Path(out)
    t0 = time.time()
    model_path = out / "flame" / "generic_model.pkl"
    if force or not model_path.is_file():
        write_head_model(model_path, seed)

    tasks, skipped = [], 0
    plan = plan_scans(out, identities, expressions, seed, holdout, ood, ood_expressions,
                      ood_seed, population)
    for item in plan:
        if not force and all(f.is_file() for f in scan_paths(item["root"], item["id"])):
            skipped += 1
            continue
        person = item["person"]
        tasks.append({"id": item["id"], "out": str(item["root"]), "faces": faces,
                      "texture_size": texture_size, "shape": person["shape"],
                      "style": person["style"], **item["scan"]})

    face_counts = {}
    bar = tqdm(total=len(tasks), desc="synthetic scans", unit="scan", disable=not progress)
    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)),
                                 mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(str(model_path),)) as pool:
            for sid, n_faces, _ in pool.map(_make_one, tasks):
                face_counts[sid] = n_faces
                bar.update(1)
    elif tasks:
        _init_worker(str(model_path))
        for task in tasks:
            sid, n_faces, _ = _make_one(task)
            face_counts[sid] = n_faces
            bar.update(1)
    bar.close()

    motion_dir = out / "motion"
    json_path, npz_path = motion_dir / "flame_params.json", motion_dir / "motion.npz"
    if force or not (json_path.is_file() and npz_path.is_file()):
        motion = make_motion(n_frames=frames, fps=30.0, seed=seed)
        save_motion_json(json_path, motion)
        save_motion_npz(npz_path, motion)
    return {"made": len(tasks), "skipped": skipped, "faces": face_counts,
            "seconds": time.time() - t0, "plan": plan}


def preview(out: Path, plan: list[dict], path: Path, res: int = 160, ncols: int = 6) -> Path:
    """A picture of the population: front and side views (textured, in FLAME space) of every
    person's first scan, training persons first, labelled with id, hair style and identity
    radius (`leading_radius`: <= 1 in training)."""
    import torch

    from lib.dataset.faceverse_io import load_flame_params, scan_to_flame_space
    from lib.flame import FLAME
    from lib.render.images import add_label, make_grid, save_png
    from lib.render.shading import render_texture
    from lib.synthetic.population import leading_radius
    from lib.utils.mesh_io import load_obj

    z_shift = FLAME(str(out / "flame" / "generic_model.pkl")).z_shift
    seen, tiles = set(), []
    for item in plan:
        key = (item["root"], item["id"].split("_")[0])
        if key in seen:
            continue
        seen.add(key)
        obj, pkl = scan_paths(item["root"], item["id"])[0], scan_paths(item["root"],
                                                                       item["id"])[3]
        mesh = load_obj(obj)
        fp = load_flame_params(pkl)
        v = scan_to_flame_space(mesh.verts, fp["scale"], fp["transl"], z_shift)
        verts = torch.as_tensor(v, dtype=torch.float32)[None]
        side = verts @ torch.tensor([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
        args = (torch.as_tensor(mesh.faces, dtype=torch.long),
                torch.as_tensor(mesh.uvs, dtype=torch.float32),
                torch.as_tensor(mesh.face_uvs, dtype=torch.long),
                torch.as_tensor(mesh.texture, dtype=torch.float32) / 255.0, res)
        img = torch.cat([render_texture(verts, *args)[0], render_texture(side, *args)[0]], 1)
        person = item["person"]
        kind = "OOD " if item["ood"] else "held " if item["root"].name == "heldout" else ""
        label = (f"{kind}{item['id']} {person['style']['hair']} "
                 f"r{leading_radius(person['shape']):.2f}")
        tiles.append(add_label(img.numpy(), label))
    save_png(path, make_grid(tiles, ncols=min(ncols, len(tiles))))
    return path


def main(argv=None) -> dict:
    from lib.synthetic.hair import HAIR_STYLES
    from lib.synthetic.population import Population

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "synthetic")
    ap.add_argument("--identities", type=int, default=48, help="training persons")
    ap.add_argument("--expressions", type=int, default=2, help="scans per training person")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faces", type=int, default=60000, help="approximate faces per scan")
    ap.add_argument("--frames", type=int, default=150, help="motion sequence length")
    ap.add_argument("--texture-size", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--force", action="store_true", help="rebuild outputs that exist")
    ap.add_argument("--holdout", type=int, default=0,
                    help="extra persons written under <out>/heldout/ (never trained on)")
    ap.add_argument("--spread", type=float, default=1.0,
                    help="std of every identity coefficient (the head model's unit: 1)")
    ap.add_argument("--ood", type=int, default=0,
                    help="out-of-distribution persons written under <out>/ood/ (never "
                         "trained on): the --ood-hair style, extreme identities, dyed hair")
    ap.add_argument("--ood-expressions", type=int, default=1,
                    help="scans per OOD person (expression 01 near neutral)")
    ap.add_argument("--ood-seed", type=int, default=None,
                    help="seed of the OOD persons (default: --seed + 1000)")
    ap.add_argument("--ood-hair", default="mohawk", choices=sorted(HAIR_STYLES),
                    help="hair style kept out of the training persons; every OOD person "
                         "wears it")
    ap.add_argument("--preview", type=Path, default=None,
                    help="write a PNG of every person's first scan (front and side views)")
    args = ap.parse_args(argv)
    for name in ("holdout", "ood"):
        if getattr(args, name) < 0:
            ap.error(f"--{name} must be >= 0")
    if not args.spread > 0:
        ap.error("--spread must be > 0")
    if args.ood_expressions < 1:
        ap.error("--ood-expressions must be >= 1")
    for name in ("identities", "expressions", "faces", "frames", "texture_size", "workers"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        summary = generate(args.out, args.identities, args.expressions, args.seed, args.faces,
                           args.frames, args.texture_size, args.force, args.workers,
                           holdout=args.holdout, ood=args.ood,
                           ood_expressions=args.ood_expressions, ood_seed=args.ood_seed,
                           population=Population(args.spread, args.ood_hair))
    except ValueError as err:
        ap.error(str(err))
    if args.preview is not None:
        print(f"[make_synthetic] preview: {preview(args.out, summary['plan'], args.preview)}")
    counts = list(summary["faces"].values())
    extra = f", faces {min(counts)}-{max(counts)}" if counts else ""
    print(f"[make_synthetic] {summary['made']} scans made, {summary['skipped']} kept{extra}; "
          f"{args.out} ready in {summary['seconds']:.1f} s")
    return summary


if __name__ == "__main__":
    main()

"""Generate the synthetic stand-in for FLAME + FaceVerse (docs/design.md, Synthetic stand-ins).

    python tools/make_synthetic.py --out data/synthetic --identities 4 --expressions 3 --seed 0

writes
    <out>/flame/generic_model.pkl                         synthetic head model (FLAME pickle layout)
    <out>/faceverse_dataset/<id>/<id>.obj, .mtl, .jpg     textured scans, ids PPP_EE
    <out>/flame_params/<id>_flame.pkl                     their FaceVerse FLAME parameters
    <out>/motion/flame_params.json, motion.npz            a talking-like motion sequence
    <out>/heldout/faceverse_dataset/, flame_params/       with --holdout N: persons
                                                          identities+1 .. identities+N
                                                          (expression 01), never trained on,
                                                          for test.py's scan fitting

Person PPP (001..) has its own identity coefficients, hair style (cycling bald, short,
medium, thick, bun), skin tone, hair and iris colours; expression 01 is near neutral, the
others have random expression coefficients, jaw openings and small head/neck/eye rotations.
Every scan has a random FaceVerse registration (scale, translation). Outputs that already
exist completely are kept (use --force to rebuild); every file is written atomically, and
each scan is seeded from (seed, person, expression) alone, so partial reruns reproduce the
same data.
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


def person_params(seed: int, person: int) -> dict:
    """Identity (100,) and look of a person, from (seed, person) alone."""
    from lib.synthetic.scans import make_style

    rng = np.random.default_rng(np.random.SeedSequence([seed, 1, person]))
    shape = np.zeros(100)
    shape[:10] = rng.normal(0.0, 1.0, 10)
    shape[10:30] = rng.normal(0.0, 0.4, 20)
    style = make_style(person - 1, rng)
    style["seed"] = int(rng.integers(0, 2**31 - 1))
    return {"shape": shape.astype(np.float32), "style": style}


def scan_params(seed: int, person: int, expression: int) -> dict:
    """Expression (50,), pose (15,), FaceVerse registration of one scan."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2, person, expression]))
    exp = np.zeros(50)
    pose = np.zeros(15)
    if expression == 1:  # near neutral
        exp[:10] = rng.normal(0.0, 0.1, 10)
        pose[6] = rng.uniform(0.0, 0.04)
        pose[0:3] = rng.normal(0.0, 0.02, 3)
    else:
        exp[:10] = rng.normal(0.0, 1.0, 10) * np.linspace(1.2, 0.6, 10)
        exp[10:20] = rng.normal(0.0, 0.3, 10)
        pose[6] = rng.uniform(0.0, 0.35)                         # jaw opening
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


def generate(out: Path, identities: int, expressions: int, seed: int = 0, faces: int = 60000,
             frames: int = 150, texture_size: int = 1024, force: bool = False,
             workers: int = 1, progress: bool = True, holdout: int = 0) -> dict:
    """Write the whole synthetic data set under `out`; returns a summary dict."""
    from tqdm import tqdm

    from lib.synthetic.motion import make_motion, save_motion_json, save_motion_npz

    out = Path(out)
    t0 = time.time()
    model_path = out / "flame" / "generic_model.pkl"
    if force or not model_path.is_file():
        write_head_model(model_path, seed)

    tasks, skipped = [], 0
    # training persons (every expression) under out/, held-out persons (expression 01) under
    # out/heldout/ so that preprocessing and the data list never see them
    plan = [(p, e, out) for p in range(1, identities + 1) for e in range(1, expressions + 1)]
    plan += [(p, 1, out / "heldout") for p in range(identities + 1, identities + holdout + 1)]
    for p, e, root in plan:
        person = person_params(seed, p)
        sid = scan_id(p, e)
        if not force and all(f.is_file() for f in scan_paths(root, sid)):
            skipped += 1
            continue
        tasks.append({"id": sid, "out": str(root), "faces": faces, "texture_size": texture_size,
                      "shape": person["shape"], "style": person["style"],
                      **scan_params(seed, p, e)})

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
            "seconds": time.time() - t0}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "synthetic")
    ap.add_argument("--identities", type=int, default=4)
    ap.add_argument("--expressions", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faces", type=int, default=60000, help="approximate faces per scan")
    ap.add_argument("--frames", type=int, default=150, help="motion sequence length")
    ap.add_argument("--texture-size", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--force", action="store_true", help="rebuild outputs that exist")
    ap.add_argument("--holdout", type=int, default=0,
                    help="extra persons written under <out>/heldout/ (never trained on)")
    args = ap.parse_args(argv)
    if args.holdout < 0:
        ap.error("--holdout must be >= 0")
    for name in ("identities", "expressions", "faces", "frames", "texture_size", "workers"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    summary = generate(args.out, args.identities, args.expressions, args.seed, args.faces,
                       args.frames, args.texture_size, args.force, args.workers,
                       holdout=args.holdout)
    counts = list(summary["faces"].values())
    extra = f", faces {min(counts)}-{max(counts)}" if counts else ""
    print(f"[make_synthetic] {summary['made']} scans made, {summary['skipped']} kept{extra}; "
          f"{args.out} ready in {summary['seconds']:.1f} s")
    return summary


if __name__ == "__main__":
    main()

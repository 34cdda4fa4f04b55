"""Sampling diversity: mean pairwise Chamfer-L1 among meshes (sampled avatars, training scans).

    python tools/diversity.py --scans data/demo \
        --meshes 'outputs/demo/fine/sample/sample_*/canonical.ply' --json diversity.json

--scans DIR   one scan per person (expression --expression, default 01) of a synthetic or
              FaceVerse-layout folder (DIR/faceverse_dataset, DIR/flame_params, the head model
              --flame_model, default DIR/flame/generic_model.pkl), moved into FLAME space
--meshes GLOB meshes already in FLAME space (PLY or OBJ; e.g. test.py's sampled avatars)

Every set is cut at one common height (the highest lowest point of all meshes, unless
--min-y is given), so open scans and closed avatars cover the same part of the head; the
result per set is lib.utils.diversity.diversity (mean, std, min, max over all pairs) and,
with both sets, the ratio of the sampled avatars' mean to the training persons' and every
mesh's distance to its nearest training scan (near 0: copies of training persons).
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def scan_meshes(folder: Path, expression: str = "01", flame_model: Path | None = None
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{scan id: (verts [V, 3] in FLAME space, faces [F, 3])} of every person's scan with the
    given expression under folder/faceverse_dataset."""
    from lib.dataset.faceverse_io import load_flame_params, scan_to_flame_space
    from lib.flame import FLAME
    from lib.utils.mesh_io import load_obj

    model = flame_model or folder / "flame" / "generic_model.pkl"
    if not Path(model).is_file():
        raise SystemExit(f"[diversity] no head model at {model} (give --flame_model)")
    z_shift = FLAME(str(model)).z_shift
    scans = sorted((folder / "faceverse_dataset").glob(f"*_{expression}/*_{expression}.obj"))
    out = {}
    for obj in scans:
        sid = obj.stem
        mesh = load_obj(obj, load_texture=False)
        fp = load_flame_params(folder / "flame_params" / f"{sid}_flame.pkl")
        out[sid] = (scan_to_flame_space(mesh.verts, fp["scale"], fp["transl"], z_shift),
                    np.asarray(mesh.faces))
    return out


def file_meshes(patterns: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{path: (verts, faces)} of every mesh file matching the glob patterns."""
    import trimesh

    out = {}
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            mesh = trimesh.load(path, process=False, force="mesh")
            out[path] = (np.asarray(mesh.vertices), np.asarray(mesh.faces))
    return out


def main(argv=None) -> dict:
    from lib.utils.atomic import atomic_path
    from lib.utils.diversity import diversity, mesh_points, nearest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=Path, default=None, help="training folder (see below)")
    ap.add_argument("--expression", default="01", help="which scan of every person")
    ap.add_argument("--flame_model", type=Path, default=None)
    ap.add_argument("--meshes", nargs="*", default=[], help="glob(s) of FLAME-space meshes")
    ap.add_argument("--points", type=int, default=5000, help="samples per mesh")
    ap.add_argument("--min-y", type=float, default=None, help="cut height (FLAME y)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args(argv)
    sets = {}
    if args.scans is not None:
        sets["training"] = scan_meshes(args.scans, args.expression, args.flame_model)
    if args.meshes:
        sets["meshes"] = file_meshes(args.meshes)
    for name, meshes in sets.items():
        if len(meshes) < 2:
            ap.error(f"{name}: need at least 2 meshes, found {len(meshes)}")
    if not sets:
        ap.error("give --scans and/or --meshes")
    min_y = args.min_y
    if min_y is None:
        min_y = max(float(v[:, 1].min()) for meshes in sets.values() for v, _ in meshes.values())
    result, pts = {"min_y": min_y, "points": args.points}, {}
    for name, meshes in sets.items():
        pts[name] = [mesh_points(v, f, args.points, seed=k, min_y=min_y)
                     for k, (v, f) in enumerate(meshes.values())]
        result[name] = {**diversity(pts[name]), "items": list(meshes)}
        print(f"[diversity] {name}: {len(pts[name])} meshes, mean pairwise Chamfer-L1 "
              f"{result[name]['mean']:.5f} (std {result[name]['std']:.5f})")
    if len(sets) == 2:
        result["ratio"] = result["meshes"]["mean"] / result["training"]["mean"]
        result["nearest_training"] = nearest(pts["meshes"], pts["training"])
        print(f"[diversity] meshes / training: {result['ratio']:.3f}; a mesh's nearest "
              f"training scan: {result['nearest_training']['mean']:.5f} on average")
    if args.json is not None:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

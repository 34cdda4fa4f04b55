"""Write this project's processed scans (and stage-2 cache) in the original GANHead's layout.

    python tools/original_layout.py --processed data/demo/processed --data_list \
        data/demo/data_list.csv --flame_model data/demo/flame/generic_model.pkl \
        --out data/demo/original_layout [--cache outputs/demo/coarse/cache_128]

For each scan of the data list, `<out>/processed/<id>/` gets what the original's
preprocess.py saves (lib/dataset/processed_layout.py documents both layouts):
`occupancy.npz` by `np.savez` with scan_name, flame_params float64 (169,) with 1, 0, 0, 0 in
[0:4], scan_colors, scan_verts, scan_faces, pts_d, occ_gt (no `layout` key); `surface.npz`;
`multi_view_256/` with the 9 RGBA PNG pairs, alpha = the scan's coverage of the view (255 on
the mesh, 0 off it) and RGB the picture on white. With `--cache`, `<out>/cache_img_dvr_pyrender/`
gets the original's cache files: `<id>.npy` [9, R, R, 4] (points 1 outside the mask) and
`<id>_pose.npy` [9, 169]. The data list is copied to `<out>/data_list.csv`.

The content is this project's processing, so training on `<out>` and on the input must give the
same batches (tests/test_preprocess_original_layout.py checks that on a synthetic scan): use it
to check that a run reads the original's folders, or to hand data to users of the original code.
Writes a scan's folder under a temporary name and renames it, so a killed run leaves no half
folder; scans already present in `<out>` are skipped.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_VIEWS, RES = 9, 256  # the original always renders 9 views at 256 x 256


def view_coverage(scan_dir: Path, flame_model, params: np.ndarray) -> np.ndarray:
    """[9, 256, 256] bool: where the scan (scan_verts, scan_faces of its occupancy.npz, in
    FLAME space) covers each view: the alpha of the original's renders."""
    import torch

    from lib.dataset.scan_render import view_transforms, view_vertices
    from lib.flame import FLAMEServer
    from lib.render.rasterizer import rasterize

    with np.load(scan_dir / "occupancy.npz") as z:
        v = torch.from_numpy(z["scan_verts"]).float()
        f = torch.from_numpy(z["scan_faces"]).long()
    server = flame_model if isinstance(flame_model, FLAMEServer) else FLAMEServer(str(flame_model))
    T = view_transforms(params, server, N_VIEWS).float()
    return rasterize(view_vertices(v, T), f, RES).mask.numpy()


def write_original_scan(ours: Path, dst: Path, flame_model, scan_id: str | None = None) -> None:
    """The scan processed into `ours` (this project's layout, 9 views at 256) written to `dst`
    in the original's layout (module docstring); dst must not exist. flame_model: path or
    lib.flame.FLAMEServer; scan_id: default ours' folder name."""
    from PIL import Image

    ours, dst = Path(ours), Path(dst)
    need = ["occupancy.npz", "surface.npz"] + [f"multi_view_{RES}/{k:04d}_{kind}.png"
                                               for k in range(N_VIEWS)
                                               for kind in ("normal", "rgb")]
    missing = [n for n in need if not (ours / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{ours}: lacks {missing[:3]} (process it with preprocess.py "
                                f"--views {N_VIEWS} --res {RES} first)")
    dst.mkdir(parents=True)
    with np.load(ours / "occupancy.npz") as z:
        occ = {k: z[k] for k in z.files}
    if "scan_verts" not in occ:
        raise ValueError(f"{ours / 'occupancy.npz'}: no scan_verts (made by an earlier "
                         "preprocess.py; rerun it)")
    params = occ["flame_params"].astype(np.float64)
    params[0], params[1:4] = 1.0, 0.0
    # the original's keys, in the order its preprocess.py fills its dict
    np.savez(dst / "occupancy.npz", scan_name=np.str_(scan_id or ours.name), flame_params=params,
             scan_colors=occ["scan_colors"].astype(np.float32),
             scan_verts=occ["scan_verts"].astype(np.float32),
             scan_faces=occ["scan_faces"].astype(np.int64),
             pts_d=occ["pts_d"].astype(np.float32), occ_gt=occ["occ_gt"].astype(np.float32))
    with np.load(ours / "surface.npz") as z:
        np.savez(dst / "surface.npz", surface_points=z["surface_points"],
                 surface_normals=z["surface_normals"], surface_colors=z["surface_colors"])
    cover = view_coverage(ours, flame_model, params)
    views = dst / f"multi_view_{RES}"
    views.mkdir()
    for k in range(N_VIEWS):
        alpha = np.where(cover[k], 255, 0).astype(np.uint8)[..., None]
        for kind in ("normal", "rgb"):
            rgb = np.asarray(Image.open(ours / f"multi_view_{RES}" / f"{k:04d}_{kind}.png"))
            Image.fromarray(np.concatenate([rgb[..., :3], alpha], -1), "RGBA").save(
                views / f"{k:04d}_{kind}.png")


def write_original_cache(cache_npz: Path, dst_dir: Path, scan_id: str) -> None:
    """This project's `<id>.npz` cache as the original's `<id>.npy` (points 1 outside the mask)
    and `<id>_pose.npy` in dst_dir."""
    with np.load(cache_npz) as z:
        cache, vp = z["cache"].astype(np.float32), z["view_params"]
    cache[..., :3][cache[..., 3] < 0.5] = 1.0
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name, arr in ((f"{scan_id}_pose.npy", vp), (f"{scan_id}.npy", cache)):
        tmp = dst_dir / f".{name}.tmp.npy"
        np.save(tmp, arr)
        tmp.replace(dst_dir / name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processed", required=True, help="this project's processed folder")
    p.add_argument("--data_list", required=True)
    p.add_argument("--flame_model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--cache", default=None, help="this project's stage-2 cache folder")
    a = p.parse_args(argv)
    from tqdm import tqdm

    from lib.dataset.faceverse import read_data_list
    from lib.flame import FLAMEServer

    ids = read_data_list(a.data_list)
    out = Path(a.out)
    (out / "processed").mkdir(parents=True, exist_ok=True)
    server = FLAMEServer(a.flame_model)
    for sid in tqdm(ids, desc="original layout", unit="scan"):
        dst = out / "processed" / sid
        if not dst.is_dir():
            tmp = out / "processed" / f".{sid}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            write_original_scan(Path(a.processed) / sid, tmp, server, sid)
            tmp.rename(dst)
        if a.cache:
            write_original_cache(Path(a.cache) / f"{sid}.npz", out / "cache_img_dvr_pyrender", sid)
    shutil.copyfile(a.data_list, out / "data_list.csv")
    print(f"{len(ids)} scans in the original's layout under {out / 'processed'}"
          + (f", caches under {out / 'cache_img_dvr_pyrender'}" if a.cache else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

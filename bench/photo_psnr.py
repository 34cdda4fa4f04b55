"""Masked photo PSNR of a stage-2 model: rendered vs preprocessed normal and RGB images.

    python bench/photo_psnr.py --ckpt outputs/fine/checkpoints/last.ckpt \
        --processed data/synthetic/processed --data_list data/synthetic/data_list.csv \
        --cache_dir outputs/coarse/cache_128 --flame_model data/synthetic/flame/generic_model.pkl \
        --res 128 [--views 0 1 ... 8] [--scans 0] [--out picture.png]

For every (scan, view) pair, renders the normal and colour images from the cached canonical
points exactly as training does, and reports PSNR over the mask (cache mask and render
foreground), images in [0, 1]. `--views` selects the views to score (e.g. the views held
out of training).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key in ("ckpt", "processed", "data_list", "cache_dir", "flame_model"):
        ap.add_argument(f"--{key}", required=True)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--views", type=int, nargs="+", default=list(range(9)))
    ap.add_argument("--scans", type=int, default=0, help="0: all")
    ap.add_argument("--out", type=Path, default=None, help="a grid picture of the first scan")
    args = ap.parse_args()
    from lib.dataset.fine import ScanImageDataset
    from lib.inference.reconstruction import comparison_grid, score_views
    from lib.model.ganhead import GANHead

    model = GANHead.load_from_checkpoint(args.ckpt, map_location="cpu",
                                         flame_model=args.flame_model).eval()
    ds = ScanImageDataset(args.processed, args.data_list, args.cache_dir, load_res=args.res,
                          repeat=len(args.views), fixed_view=True, surface_points=16,
                          views=args.views)
    scans = ds.items if args.scans <= 0 else ds.items[:args.scans]
    psnr_n, psnr_c = [], []
    for scan_id in scans:
        scores = score_views(model, ds, [scan_id], args.views)
        psnr_n += [sc.psnr_normal for sc in scores]
        psnr_c += [sc.psnr_rgb for sc in scores]
        print(f"{scan_id}: normal PSNR {np.mean(psnr_n[-len(scores):]):.2f} dB, "
              f"rgb PSNR {np.mean(psnr_c[-len(scores):]):.2f} dB", flush=True)
        if args.out is not None and scan_id == scans[0]:
            first = scores
    print(f"mean over {len(scans)} scans x views {args.views}: normal {np.mean(psnr_n):.2f} dB,"
          f" rgb {np.mean(psnr_c):.2f} dB")
    if args.out is not None:
        from lib.render.images import save_png

        # one row per view of the first scan
        save_png(args.out, np.concatenate([comparison_grid([sc]) for sc in first], axis=0))
        print(f"picture: {args.out} (columns: real rgb, rendered rgb, real normal, rendered "
              "normal)")


if __name__ == "__main__":
    main()

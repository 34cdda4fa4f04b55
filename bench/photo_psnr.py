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
import torch
from torch.utils.data import default_collate

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
    from lib.model.fine_stage import masked_psnr, render_and_losses
    from lib.model.ganhead import GANHead

    model = GANHead.load_from_checkpoint(args.ckpt, map_location="cpu",
                                         flame_model=args.flame_model).eval()
    ds = ScanImageDataset(args.processed, args.data_list, args.cache_dir, load_res=args.res,
                          repeat=len(args.views), fixed_view=True, surface_points=16,
                          views=args.views)
    scans = ds.items if args.scans <= 0 else ds.items[:args.scans]
    psnr_n, psnr_c, tiles = [], [], []
    for s, scan_id in enumerate(scans):
        for k in args.views:
            # item i shows scan i % n_scans in view views[i // n_scans]
            i = ds.views.index(k) * len(ds.items) + ds.items.index(scan_id)
            batch = default_collate([ds[i]])
            with torch.no_grad():
                _, out = render_and_losses(model, batch, with_surface=False)
            psnr_n.append(float(masked_psnr(out["fake_normal"], out["real_normal"],
                                            out["mask"])[0]))
            psnr_c.append(float(masked_psnr(out["fake_rgb"], out["real_rgb"], out["mask"])[0]))
            if s == 0 and args.out is not None:
                tiles.append(torch.cat([out["real_normal"][0], out["fake_normal"][0],
                                        out["real_rgb"][0], out["fake_rgb"][0]], dim=2))
        print(f"{scan_id}: normal PSNR {np.mean(psnr_n[-len(args.views):]):.2f} dB, "
              f"rgb PSNR {np.mean(psnr_c[-len(args.views):]):.2f} dB", flush=True)
    print(f"mean over {len(scans)} scans x views {args.views}: normal {np.mean(psnr_n):.2f} dB,"
          f" rgb {np.mean(psnr_c):.2f} dB")
    if tiles:
        from lib.render.images import save_png

        grid = torch.cat(tiles, dim=1).permute(1, 2, 0).clamp(-1, 1) * 0.5 + 0.5
        save_png(args.out, grid.numpy())
        print(f"picture: {args.out} (columns: real normal, rendered normal, real rgb, rendered)")


if __name__ == "__main__":
    main()

"""Volumetric IoU of a stage-1 model against the preprocessed labels of the uniform points.

    python bench/iou.py --ckpt outputs/coarse/checkpoints/last.ckpt \
        --processed data/synthetic/processed --data_list data/synthetic/data_list.csv \
        --flame_model data/synthetic/flame/generic_model.pkl [--points 20000] [--scans 0] \
        [--deformer exact|fast]

For every training scan (or the first --scans), the uniform half of occupancy.npz (points
uniform in [-1,1]^3 labelled by winding number) is classified by the model in deformed space
(evaluation-mode correspondence search, max over valid initializations); prints the IoU per
scan and the mean. --deformer: the search of configs/deformer/<name>.yaml (class and
settings) on the checkpoint's networks, instead of the checkpoint's own deformer.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def deformer_entry(ckpt: str, name: str) -> dict:
    """The deformer hyper-parameter: configs/deformer/<name>.yaml with the checkpoint's
    skinning and displacement networks."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lib.utils.checkpoint_io import read_checkpoint

    stored = read_checkpoint(ckpt)["hyper_parameters"]["deformer"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"deformer={name}"])
    entry = OmegaConf.to_container(cfg.model.deformer, resolve=True)
    return {**entry, "lbs_network": stored["lbs_network"], "disp_network": stored["disp_network"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--processed", required=True)
    ap.add_argument("--data_list", required=True)
    ap.add_argument("--flame_model", required=True)
    ap.add_argument("--points", type=int, default=20000)
    ap.add_argument("--scans", type=int, default=0, help="0: all")
    ap.add_argument("--deformer", default=None,
                    help="configs/deformer/<name>.yaml instead of the checkpoint's deformer")
    args = ap.parse_args()
    from lib.dataset.faceverse import read_data_list
    from lib.model.ganhead import GANHead
    from lib.model.validation import iou

    kwargs = {"flame_model": args.flame_model}
    if args.deformer is not None:
        kwargs["deformer"] = deformer_entry(args.ckpt, args.deformer)
    model = GANHead.load_from_checkpoint(args.ckpt, map_location="cpu", **kwargs).eval()
    ids = read_data_list(args.data_list)
    todo = ids if args.scans <= 0 else ids[:args.scans]
    rng = np.random.default_rng(0)
    values = []
    t0 = time.time()
    # embedding rows through the checkpoint's scan ids (data-list order for older checkpoints)
    rows = (model.subject_rows(todo) if model.scan_ids is not None
            else torch.tensor([ids.index(sid) for sid in todo]))
    for sid, row in zip(todo, rows):
        with np.load(Path(args.processed) / sid / "occupancy.npz") as occ:
            pts, lab, params = occ["pts_d"], occ["occ_gt"], occ["flame_params"]
        half = pts.shape[0] // 2
        sel = half + rng.choice(pts.shape[0] - half, args.points, replace=False)
        with torch.no_grad():
            logits = model.occupancy(torch.as_tensor(pts[sel])[None].float(),
                                     torch.as_tensor(params)[None].float(), model.codes(row[None]))
        value = float(iou(logits[0, :, None] > 0, torch.as_tensor(lab[sel]) > 0.5))
        values.append(value)
        print(f"{sid}: IoU {value:.4f}", flush=True)
    print(f"mean IoU over {len(values)} scans ({args.points} uniform points each): "
          f"{np.mean(values):.4f} (min {np.min(values):.4f}); {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()

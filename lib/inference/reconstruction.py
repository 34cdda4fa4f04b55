"""How well a stage-2 model reproduces its training scans' renders, view by view.

Shape legend: R image size (the cache's and load_res), H/W rows/columns of a grid image.

For a (scan, view) pair the model's normal and colour images are rendered exactly as stage-2
training renders them (from the precompute cache's canonical points,
lib/model/cache_render.render_cache) and
compared with the preprocessed renders over the mask where both show the head. Scoring the
views held out of training (`datamodule.holdout_views`) measures how well the learned
appearance generalizes to unseen viewpoints.

- `score_views(model, dataset, scan_ids, views)`: PSNR per pair and the four images.
- `comparison_grid(scores)`: one row per scan, per view real RGB | model RGB
  | real normal | model normal, labelled.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import default_collate

__all__ = ["ViewScore", "score_views", "comparison_grid"]


@dataclass
class ViewScore:
    """One (scan, view) comparison: PSNR in dB of the [0, 1] images over the mask, and
    images [R, R, 3] float32 numpy in [0, 1] (white outside the model's render)."""
    scan_id: str
    view: int
    psnr_normal: float
    psnr_rgb: float
    images: dict


def _to_unit(img: torch.Tensor) -> np.ndarray:
    """img: [3, R, R] in [-1, 1] -> [R, R, 3] float32 numpy in [0, 1]."""
    return (img.detach().float().cpu().permute(1, 2, 0).clamp(-1, 1) * 0.5 + 0.5).numpy()


@torch.no_grad()
def score_views(model, dataset, scan_ids: list[str], views: list[int]) -> list[ViewScore]:
    """model: a stage-2 GANHead (eval); dataset: a `ScanImageDataset` built with
    fixed_view=True, views ⊇ `views` and repeat = len(dataset.views) (so every pair has an
    item); scan_ids: scans among dataset.items. Returns one ViewScore per (scan, view), scans
    outer."""
    from lib.model.cache_render import masked_psnr, render_cache

    if not dataset.fixed_view or dataset.repeat < len(dataset.views):
        raise ValueError("score_views needs a ScanImageDataset with fixed_view=True and "
                         "repeat >= len(views)")
    missing = [k for k in views if k not in dataset.views]
    if missing:
        raise ValueError(f"views {missing} are not among the dataset's views {dataset.views}")
    device = next(model.parameters()).device
    scores = []
    for scan_id in scan_ids:
        for k in views:
            batch = default_collate([dataset[dataset.fixed_item(scan_id, k)]])
            batch = {key: v.to(device) if torch.is_tensor(v) else v for key, v in batch.items()}
            server = model.flame_server
            cache_mask = batch["cache_mask"].bool()
            r = render_cache(model, batch["cache_pts"], cache_mask, server(batch["params"]),
                             server(batch["view_params"]), model.codes(batch["index"]))
            R = cache_mask.shape[-1]
            out = {"fake_rgb": r["rgb"], "fake_normal": r["normal"], "real_rgb": batch["rgb_img"],
                   "real_normal": batch["normal_img"],
                   "mask": cache_mask & batch["img_mask"].reshape(-1, R, R).bool()}
            images = {}
            for key in ("real_rgb", "fake_rgb", "real_normal", "fake_normal"):
                img = out[key][0]
                if key.startswith("fake"):  # white where the model's cache shows nothing
                    img = torch.where(batch["cache_mask"][0][None], img, torch.ones_like(img))
                images[key] = _to_unit(img)
            scores.append(ViewScore(
                scan_id, int(k),
                float(masked_psnr(out["fake_normal"], out["real_normal"], out["mask"])[0]),
                float(masked_psnr(out["fake_rgb"], out["real_rgb"], out["mask"])[0]), images))
    return scores


def comparison_grid(scores: list[ViewScore], labels: bool = True) -> np.ndarray:
    """scores: from score_views (scans outer, the same views for each scan). Returns a float32
    grid [H, W, 3] in [0, 1]: one row per scan, per view real RGB | model RGB | real normal |
    model normal."""
    from lib.render.images import add_label, make_grid

    n_views = len({sc.view for sc in scores})
    tiles = []
    for sc in scores:
        for key, name in (("real_rgb", "scan"), ("fake_rgb", "model"),
                          ("real_normal", "scan"), ("fake_normal", "model")):
            img = sc.images[key]
            if labels and img.shape[0] >= 64:
                text = f"{sc.scan_id} v{sc.view} {name}" if key == "real_rgb" else name
                if key == "fake_rgb":
                    text = f"model {sc.psnr_rgb:.1f} dB"
                img = add_label(img, text)
            tiles.append(img)
    return make_grid(tiles, ncols=4 * n_views)

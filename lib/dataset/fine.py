"""Stage-2 (fine) training items: one view of a scan with its renders, cache and surface samples.

Shape legend: P = 169 FLAME parameter vector, H/W image rows/columns (= load_res),
R cache resolution (must equal load_res), M surface samples (per item:
surface_points), n_views views.

Files read (all read-only), for a scan `<id>` in either layout, this project's or the
original GANHead's (lib/dataset/processed_layout.py tells them apart by their files):
    <processed_dir>/<id>/occupancy.npz              flame_params (P,)
    <processed_dir>/<id>/multi_view_<res>/{k:04d}_normal.png, {k:04d}_rgb.png  (res: view_res,
                                                    or load_res if present, else 256)
    <processed_dir>/<id>/surface.npz                surface_points / _normals / _colors (M, 3)
    <cache_dir>/<id>.npz                            cache (n_views, R, R, 4),
                                                    view_params (n_views, P)
      or the original's <cache_dir>/<id>.npy with <id>_pose.npy (lib/dataset/cache_file.py)
The cache is written by precompute.py from the stage-1 checkpoint: per view and pixel the
shape-neutral canonical point it shows (xyz) and a mask channel (> 0.5 = a correspondence).

Image encoding: 8-bit PNG values v map to v / 127.5 - 1, so 0 -> -1 and 255 -> 1 exactly;
normal images hold (n + 1) / 2, so the returned normal image is n itself (unnormalized after
8-bit quantization). Background is white (1, 1, 1) in both images (the original's RGBA
renders: their stored RGB, alpha dropped as its data module's `convert('RGB')` does).

Image mask (`img_mask`): a pixel is foreground when it is foreground in its RGB render OR in
its normal render; in a PNG with alpha (the original's) that is alpha > 127, in one without
(ours) not pure white (255, 255, 255). A unit normal can never encode to pure white
((n + 1) / 2 = 1 needs n = (1, 1, 1)), so a white-textured scan pixel is still foreground;
the renders have no anti-aliasing, so the background is exactly white
(processed_layout.read_view). When the images are resized to load_res (bilinear), the mask
is resized bilinearly and thresholded at 0.5.

Randomness: the view and the surface subset come from `np.random.default_rng()` (fresh OS
entropy per item, so DataLoader workers differ) unless `seed` is given; with
`fixed_view=True` item i shows scan i % n_scans in view views[(i // n_scans) % len(views)]
(so repeat = len(views) visits every (scan, view) pair once) and the surface subset is seeded
by the item index (validation is the same every epoch).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lib.dataset.cache_file import CacheFileError, read_cache
from lib.dataset.faceverse import read_data_list
from lib.dataset.processed_layout import LayoutError, load_npz_keys, read_flame_params, read_view
from lib.utils.errors import ModuleErrors

__all__ = ["FineDataError", "ScanImageDataset"]

_err = ModuleErrors(__name__)
SURFACE_KEYS = ("surface_points", "surface_normals", "surface_colors")


class FineDataError(ValueError):
    """A stage-2 input file is missing or malformed (the message names the file)."""


def _resize_rgb(img: np.ndarray, res: int) -> np.ndarray:
    """img: uint8 [h, w, 3] -> uint8 [res, res, 3] (PIL bilinear)."""
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((res, res), Image.BILINEAR), dtype=np.uint8)


def _resize_mask(mask: np.ndarray, res: int) -> np.ndarray:
    """mask: bool [h, w] -> bool [res, res] (bilinear on 0/1, threshold 0.5)."""
    from PIL import Image

    im = Image.fromarray(mask.astype(np.float32)).resize((res, res), Image.BILINEAR)
    return np.asarray(im) > 0.5


def _to_signed(img: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1] (0 -> -1, 255 -> 1 exactly)."""
    return torch.from_numpy(img.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def _load_npz(path: Path, keys: tuple[str, ...], hint: str) -> dict[str, np.ndarray]:
    """Read `keys` from an .npz (only those members are decompressed); FineDataError naming
    the file otherwise."""
    return load_npz_keys(path, keys, hint, error=FineDataError)


class ScanImageDataset(Dataset):
    """Stage-2 items, each scan repeated `repeat` times per epoch.

    Arguments: processed_dir (preprocess.py output), data_list (CSV; its sorted ids give the
    embedding rows), cache_dir (precompute.py output), n_views, load_res (image size H = W,
    must equal the cache's R), surface_points (M), repeat, subset (use only the first
    `subset` scans; embedding rows still count every scan), fixed_view (validation), seed,
    view_res (the renders' folder is multi_view_<view_res>; None: multi_view_<load_res> if
    present, else multi_view_256, whose images are then resized to load_res), views (the view
    indices items may show, e.g. all but some held out for validation; None: all n_views).

    Item (dict):
        index: int, the scan's embedding row;  scan_id: str;  view: int k
        params: [P] float32 scan FLAME parameters
        view_params: [P] float32 parameters of view k (FLAMEServer.view_params: yaw 2 pi k /
            n_views composed with the fitted global rotation)
        normal_img, rgb_img: [3, H, W] float32 in [-1, 1];  img_mask: [1, H, W] bool
        cache_pts: [R, R, 3] float32 canonical points;  cache_mask: [R, R] bool
        surface_points, surface_normals, surface_colors: [M, 3] float32
    """

    def __init__(self, processed_dir: str | os.PathLike, data_list: str | os.PathLike,
                 cache_dir: str | os.PathLike, n_views: int = 9, load_res: int = 256,
                 surface_points: int = 2000, repeat: int = 10, subset: int | None = None,
                 fixed_view: bool = False, seed: int | None = None,
                 view_res: int | None = None, views: Sequence[int] | None = None):
        if cache_dir is None:
            raise _err("cache_dir is not set; run precompute.py on the stage-1 checkpoint and pass "
                       "its cache folder", FineDataError)
        self.processed_dir = Path(processed_dir)
        self.cache_dir = Path(cache_dir)
        self.ids = read_data_list(data_list)
        self.n_subjects = len(self.ids)
        self._row = {sid: r for r, sid in enumerate(self.ids)}
        self.items = self.ids if subset is None else self.ids[:max(1, int(subset))]
        self.n_views = int(n_views)
        self.load_res = int(load_res)
        self.surface_points = int(surface_points)
        self.repeat = max(1, int(repeat))
        self.fixed_view = bool(fixed_view)
        self.seed = seed
        self.view_res = None if view_res is None else int(view_res)
        if self.n_views < 1 or self.load_res < 1 or self.surface_points < 1:
            raise _err("n_views, load_res and surface_points must be >= 1", FineDataError)
        self.views = list(range(self.n_views)) if views is None else sorted(set(map(int, views)))
        bad = [k for k in self.views if not 0 <= k < self.n_views]
        if not self.views or bad:
            raise _err(f"views {list(views)} must be a non-empty subset of 0..{self.n_views - 1}",
                       FineDataError)

    def __len__(self) -> int:
        return len(self.items) * self.repeat

    def index_of(self, scan_id: str) -> int:
        """Embedding row of a scan id."""
        return self._row[scan_id]

    def fixed_item(self, scan_id: str, view: int) -> int:
        """With fixed_view: the item index showing scan_id in view `view` (one of self.views)."""
        return self.views.index(int(view)) * len(self.items) + self.items.index(scan_id)

    def _rng(self, i: int) -> np.random.Generator:
        if self.fixed_view:
            return np.random.default_rng((0 if self.seed is None else int(self.seed), i))
        if self.seed is not None:
            return np.random.default_rng((int(self.seed), i))
        return np.random.default_rng()

    def _cache(self, scan_id: str, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (points [R, R, 3], mask [R, R] bool, view_params [P]) of view k."""
        hint = "run precompute.py (stage-1 checkpoint) to write the stage-2 cache"
        try:
            cache, vp, path = read_cache(self.cache_dir, scan_id, hint)
        except CacheFileError as err:
            raise FineDataError(str(err)) from None
        if cache.ndim != 4 or cache.shape[0] != self.n_views or cache.shape[-1] != 4 \
                or cache.shape[1] != cache.shape[2]:
            raise FineDataError(f"{path}: cache has shape {cache.shape}, expected "
                                f"({self.n_views}, R, R, 4); {hint} with n_views={self.n_views}")
        if cache.shape[1] != self.load_res:
            raise FineDataError(f"{path}: cache resolution {cache.shape[1]} != load_res "
                                f"{self.load_res}; {hint} at res={self.load_res} or set "
                                f"load_res={cache.shape[1]}")
        if vp.ndim != 2 or vp.shape[0] != self.n_views:
            raise FineDataError(f"{path}: view_params has shape {vp.shape}, expected "
                                f"({self.n_views}, P); {hint}")
        view = cache[k].astype(np.float32, copy=False)
        return view[..., :3], view[..., 3] > 0.5, vp[k].astype(np.float32).reshape(-1)

    def _view_dir(self, scan_id: str) -> Path:
        """The renders' folder: multi_view_<view_res>, or when view_res is None the first of
        multi_view_<load_res>, multi_view_256 that exists."""
        res = [self.view_res] if self.view_res is not None else [self.load_res, 256]
        cands = [self.processed_dir / scan_id / f"multi_view_{r}" for r in dict.fromkeys(res)]
        for d in cands:
            if d.is_dir():
                return d
        raise FineDataError(f"{cands[0]}: renders not found (looked for "
                            f"{[str(c) for c in cands]}); rerun preprocess.py for this scan")

    def _images(self, scan_id: str, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (normal uint8 [H, W, 3], rgb uint8 [H, W, 3], mask bool [H, W]) at load_res."""
        try:
            normal, rgb, mask = read_view(self._view_dir(scan_id), k)
        except LayoutError as err:
            raise FineDataError(str(err)) from None
        if normal.shape[0] != self.load_res or normal.shape[1] != self.load_res:
            normal = _resize_rgb(normal, self.load_res)
            rgb = _resize_rgb(rgb, self.load_res)
            mask = _resize_mask(mask, self.load_res)
        return normal, rgb, mask

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        scan_id = self.items[i % len(self.items)]
        rng = self._rng(i)
        k = self.views[(i // len(self.items)) % len(self.views)] if self.fixed_view \
            else self.views[int(rng.integers(0, len(self.views)))]
        scan_dir = self.processed_dir / scan_id

        try:
            params = read_flame_params(scan_dir)
        except LayoutError as err:
            raise FineDataError(str(err)) from None
        pts, cmask, vparams = self._cache(scan_id, k)
        normal, rgb, mask = self._images(scan_id, k)
        if vparams.shape != params.shape:
            raise FineDataError(f"{self.cache_dir / scan_id}: cache view_params width "
                                f"{vparams.shape[0]} != flame_params width {params.shape[0]} of "
                                f"{scan_dir / 'occupancy.npz'}; rerun precompute.py")

        surf = _load_npz(scan_dir / "surface.npz", SURFACE_KEYS, "rerun preprocess.py")
        n_avail = surf["surface_points"].shape[0]
        if any(surf[key].shape != (n_avail, 3) for key in SURFACE_KEYS) or n_avail == 0:
            raise FineDataError(f"{scan_dir / 'surface.npz'}: expected three (M, 3) arrays "
                                f"with M > 0, got {[surf[key].shape for key in SURFACE_KEYS]}")
        sel = rng.choice(n_avail, self.surface_points,
                         replace=self.surface_points > n_avail)

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

        return {
            "index": self.index_of(scan_id),
            "scan_id": scan_id,
            "view": k,
            "params": t(params),
            "view_params": t(vparams),
            "normal_img": _to_signed(normal),
            "rgb_img": _to_signed(rgb),
            "img_mask": torch.from_numpy(np.ascontiguousarray(mask))[None],
            "cache_pts": t(pts),
            "cache_mask": torch.from_numpy(np.ascontiguousarray(cmask)),
            **{key: t(surf[key][sel]) for key in SURFACE_KEYS},
        }

"""A synthetic scan processed here and the same content in the original GANHead's layout train
the same way: the stage-1 datasets and data module and the stage-2 dataset give identical
items from both folders.

The original's layout is written by tools/original_layout.py from its documented formats (what
its preprocess.py saves; lib/dataset/processed_layout.py): occupancy.npz by `np.savez` with
scan_name, flame_params float64 (169,) with 1, 0, 0, 0 in [0:4], scan_colors, scan_verts,
scan_faces, pts_d, occ_gt; surface.npz; multi_view_256/ with 9 RGBA PNG pairs whose alpha is the
rasterizer's coverage of the view (255 on the mesh, 0 off it) and whose RGB is the picture
on a white background. The content is this project's processing of the scan (so the test
asks whether the readers treat both layouts alike, not whether two samplers agree).
"""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from test_preprocess import cli, make_flame_model, write_scan
from test_processed_layout import assert_same_items

import preprocess
from lib.dataset.processed_layout import detect_layout, read_view
from tools.original_layout import write_original_scan

N_VIEWS, RES, LOAD_RES = 9, 256, 64
SID = "g_o"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("orig_layout")
    (root / "flame").mkdir()
    z_shift = make_flame_model(root / "generic_model.pkl")
    write_scan(root, SID, z_shift)
    ours = root / "ours"
    assert preprocess.main(cli(root, ours, "--views", str(N_VIEWS), "--res", str(RES))) == 0
    orig = root / "original"
    write_original_scan(ours / SID, orig / SID, root / "generic_model.pkl")
    data_list = root / "ours.csv"
    cache = root / "cache"
    cache.mkdir()
    rng = np.random.default_rng(7)
    c = rng.uniform(-1, 1, (N_VIEWS, LOAD_RES, LOAD_RES, 4)).astype(np.float32)
    np.savez(cache / f"{SID}.npz", cache=c,
             view_params=rng.normal(size=(N_VIEWS, 169)).astype(np.float32))
    return {"project": ours, "original": orig, "list": data_list, "cache": cache,
            "model": root / "generic_model.pkl"}


def test_layouts_and_files(folders):
    assert detect_layout(folders["project"] / SID) == "project"
    assert detect_layout(folders["original"] / SID) == "original"
    assert list(csv.reader(open(folders["list"]))) == [["id", "dataset"], [SID, "faceverse"]]
    with np.load(folders["original"] / SID / "occupancy.npz") as z:
        assert z["flame_params"].dtype == np.float64
        np.testing.assert_array_equal(z["flame_params"][:4], [1, 0, 0, 0])


def test_stage1_items_and_batches(folders):
    from lib.dataset.datamodule import ScanDataModule
    from lib.dataset.faceverse import ScanOccupancyDataset, ScanUniformDataset

    sets = {k: ScanOccupancyDataset(folders[k], folders["list"], points_per_frame=300,
                                    repeat=3, deterministic=True)
            for k in ("project", "original")}
    for i in range(3):
        assert_same_items(sets["project"][i], sets["original"][i])
    vals = {k: ScanUniformDataset(folders[k], folders["list"], n_points=500)
            for k in ("project", "original")}
    assert_same_items(vals["project"][0], vals["original"][0])
    # the data module's shuffled, randomly subsampled training batches under one seed
    batches = {}
    for k in ("project", "original"):
        dm = ScanDataModule(str(folders[k]), str(folders["list"]), batch_size=2, num_workers=0,
                            points_per_frame=200, repeat=4, val_points=300)
        assert dm.check() == [SID]
        dm.setup()
        torch.manual_seed(11)
        batches[k] = [b for b in dm.train_dataloader()] + [b for b in dm.val_dataloader()]
    assert len(batches["project"]) == len(batches["original"]) == 3
    for a, b in zip(batches["project"], batches["original"]):
        assert_same_items(a, b)


def test_stage2_images_masks_params(folders):
    from lib.dataset.fine import ScanImageDataset

    sets = {k: ScanImageDataset(folders[k], folders["list"], folders["cache"], n_views=N_VIEWS,
                                load_res=LOAD_RES, surface_points=200, repeat=N_VIEWS,
                                fixed_view=True, seed=0) for k in ("project", "original")}
    for i in range(N_VIEWS):
        a, b = sets["project"][i], sets["original"][i]
        assert a["view"] == i
        assert a["img_mask"].any() and not a["img_mask"].all()
        assert_same_items(a, b)
    # at the renders' own resolution: the same pictures, and the mask from our white
    # background equals the original's alpha (the rasterizer's coverage)
    for k in range(N_VIEWS):
        got = [read_view(folders[x] / SID / f"multi_view_{RES}", k)
               for x in ("project", "original")]
        for a, b in zip(*got):
            np.testing.assert_array_equal(a, b)

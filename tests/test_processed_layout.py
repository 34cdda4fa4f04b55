"""Processed scan folders in the original GANHead's layout are read as they are and never
reprocessed (lib/dataset/processed_layout.py).

The original's layout is emulated here from its documented formats (the module docstring):
occupancy.npz written by `np.savez` with flame_params float64 (entries 0:4 = 1, 0, 0, 0)
and the extra keys scan_verts / scan_faces / scan_colors, surface.npz with the same keys as
ours, and multi_view_256/ with 9 RGBA PNG pairs (RGB on white, alpha 255 on the mesh, 0 off
it), made from a synthetic scan this project processed itself.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import add_fine_data, make_processed_dataset
from PIL import Image

from lib.dataset.processed_layout import (
    LayoutError,
    detect_layout,
    read_flame_params,
    read_png,
    read_view,
)

ORIG_VIEWS, ORIG_RES = 9, 256


def _upsample(img: np.ndarray, res: int) -> np.ndarray:
    """uint8 [h, w, Ch] -> [res, res, Ch], nearest pixel (for res a multiple of h: repetition)."""
    return np.asarray(Image.fromarray(img).resize((res, res), Image.NEAREST))


def _our_views_at_256(scan: Path, res: int) -> None:
    """Move a project-layout scan's multi_view_<res> renders to multi_view_256 (upsampled
    by repetition), so both layouts hold the same 256 x 256 pictures."""
    src, dst = scan / f"multi_view_{res}", scan / f"multi_view_{ORIG_RES}"
    dst.mkdir()
    for p in sorted(src.glob("*.png")):
        Image.fromarray(_upsample(np.asarray(Image.open(p).convert("RGB")), ORIG_RES)).save(
            dst / p.name)
    shutil.rmtree(src)


def write_original_layout(ours: Path, dst: Path, res: int) -> None:
    """The original GANHead's outputs for the scan processed into `ours` (project layout,
    renders in multi_view_<res>): the same samples and pictures in the original's files."""
    dst.mkdir(parents=True)
    rng = np.random.default_rng(3)
    with np.load(ours / "occupancy.npz") as occ:
        params = occ["flame_params"].astype(np.float64)
        params[0], params[1:4] = 1.0, 0.0
        v = rng.normal(size=(50, 3)).astype(np.float32)
        np.savez(dst / "occupancy.npz", scan_name=dst.name, flame_params=params,
                 scan_colors=rng.uniform(size=(50, 3)).astype(np.float32), scan_verts=v,
                 scan_faces=rng.integers(0, 50, (96, 3)).astype(np.int64),
                 pts_d=occ["pts_d"].astype(np.float32), occ_gt=occ["occ_gt"].astype(np.float32))
    with np.load(ours / "surface.npz") as surf:
        np.savez(dst / "surface.npz", **{k: surf[k].astype(np.float32) for k in surf.files})
    views = dst / f"multi_view_{ORIG_RES}"
    views.mkdir()
    for k in range(ORIG_VIEWS):
        pics = {kind: np.asarray(Image.open(ours / f"multi_view_{res}" / f"{k:04d}_{kind}.png")
                                 .convert("RGB")) for kind in ("normal", "rgb")}
        fg = (pics["normal"] != 255).any(-1) | (pics["rgb"] != 255).any(-1)
        alpha = np.where(fg, 255, 0).astype(np.uint8)
        for kind, rgb in pics.items():
            rgba = np.concatenate([rgb, alpha[..., None]], -1)
            Image.fromarray(_upsample(rgba, ORIG_RES), "RGBA").save(views / f"{k:04d}_{kind}.png")


def assert_same_items(a: dict, b: dict) -> None:
    """Two dataset items (or batches) are identical: keys, tensors (dtype and values), the rest."""
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def _write_cache(cache: Path, sid: str, res: int) -> None:
    rng = np.random.default_rng(sum(sid.encode()))
    c = rng.uniform(-1, 1, (ORIG_VIEWS, res, res, 4)).astype(np.float32)
    c[..., 3] = c[..., 3] > 0
    np.savez(cache / f"{sid}.npz", cache=c,
             view_params=rng.normal(size=(ORIG_VIEWS, 169)).astype(np.float32))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, head_model_path):
    """{'project': processed dir, 'original': processed dir, 'list', 'cache'}: the same two
    synthetic scans in both layouts."""
    root = tmp_path_factory.mktemp("layouts")
    processed, data_list = make_processed_dataset(root, head_model_path, n_surface=600,
                                                  n_uniform=600)
    add_fine_data(processed, head_model_path, res=32, n_surface=500)
    orig, cache = root / "original", root / "cache"
    cache.mkdir()
    for scan in sorted(p for p in processed.iterdir() if p.is_dir()):
        write_original_layout(scan, orig / scan.name, res=32)
        _our_views_at_256(scan, 32)
        _write_cache(cache, scan.name, 32)
    return {"project": processed, "original": orig, "list": data_list, "cache": cache}


def test_pil_convert_rgb_drops_alpha_without_compositing():
    """The original's data module reads renders with PIL's convert('RGB'): alpha is dropped
    and the stored RGB kept, even under alpha 0 (so no compositing onto black or white)."""
    rgba = np.array([[[10, 20, 30, 0], [255, 255, 255, 255]]], np.uint8)
    assert np.asarray(Image.fromarray(rgba, "RGBA").convert("RGB")).tolist() == \
        [[[10, 20, 30], [255, 255, 255]]]


def test_read_png_alpha_rule(tmp_path):
    rgba = np.array([[[10, 20, 30, 0], [255, 255, 255, 255], [255, 255, 255, 0]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb, fg = read_png(tmp_path / "a.png")
    assert rgb.tolist() == [[[10, 20, 30], [255, 255, 255], [255, 255, 255]]]
    assert fg.tolist() == [[False, True, False]]   # alpha decides, not the colour
    Image.fromarray(rgba[..., :3]).save(tmp_path / "b.png")   # ours: no alpha
    assert read_png(tmp_path / "b.png")[1].tolist() == [[True, False, False]]


def test_detection_and_flame_params(layouts):
    for sid in ("001_01", "002_01"):
        assert detect_layout(layouts["project"] / sid) == "project"
        assert detect_layout(layouts["original"] / sid) == "original"
        with np.load(layouts["original"] / sid / "occupancy.npz") as z:
            assert z["flame_params"].dtype == np.float64        # as the original writes it
        with np.load(layouts["project"] / sid / "occupancy.npz") as z:
            ref = z["flame_params"]
        p = read_flame_params(layouts["original"] / sid)
        assert p.dtype == np.float32 and p.shape == (169,)
        np.testing.assert_array_equal(p, ref)


def test_stage1_same_batches(layouts):
    from lib.dataset.faceverse import ScanOccupancyDataset

    sets = {k: ScanOccupancyDataset(layouts[k], layouts["list"], points_per_frame=64,
                                    repeat=2, deterministic=True)
            for k in ("project", "original")}
    assert len(sets["project"]) == len(sets["original"]) == 4
    for i in range(4):
        assert_same_items(sets["project"][i], sets["original"][i])


def test_stage2_same_images_and_masks(layouts):
    from lib.dataset.fine import ScanImageDataset

    sets = {k: ScanImageDataset(layouts[k], layouts["list"], layouts["cache"], n_views=9,
                                load_res=32, surface_points=50, repeat=9, fixed_view=True,
                                seed=0) for k in ("project", "original")}
    for i in range(0, len(sets["project"]), 5):
        a, b = sets["project"][i], sets["original"][i]
        assert a["img_mask"].any() and not a["img_mask"].all()
        assert_same_items(a, b)
    # at the renders' own 256 x 256: the same pictures; the mask from alpha = ours from white
    for k in (0, 4):
        got = [read_view(layouts[x] / "001_01" / "multi_view_256", k)
               for x in ("project", "original")]
        for a, b in zip(*got):
            np.testing.assert_array_equal(a, b)


def test_datamodule_check_and_inference_params(layouts):
    from lib.dataset.datamodule import ScanDataModule
    from lib.inference.loading import resolve_subject

    dm = ScanDataModule(str(layouts["original"]), str(layouts["list"]), stage="fine")
    assert dm.check() == ["001_01", "002_01"]
    model = SimpleNamespace(z_shapes=SimpleNamespace(num_embeddings=2),
                            scan_ids=["001_01", "002_01"])
    s = resolve_subject(model, "002_01", processed_dir=layouts["original"])
    np.testing.assert_array_equal(s.params, read_flame_params(layouts["project"] / "002_01"))


def test_neither_layout_names_the_file(layouts, tmp_path):
    from lib.dataset.datamodule import ScanDataModule
    from lib.dataset.faceverse import DataListError, ScanOccupancyDataset
    from lib.dataset.fine import FineDataError, ScanImageDataset

    bad = tmp_path / "processed"
    shutil.copytree(layouts["original"], bad)
    occ = bad / "001_01" / "occupancy.npz"
    np.savez(occ, flame_params=np.zeros(169), points=np.zeros((4, 3), np.float32))
    with pytest.raises(LayoutError, match=f"{occ}: keys.*neither"):
        detect_layout(occ.parent)
    with pytest.raises(DataListError, match=str(occ)):
        ScanOccupancyDataset(bad, layouts["list"], deterministic=True)[0]
    with pytest.raises(DataListError, match=str(occ)):
        ScanDataModule(str(bad), str(layouts["list"])).check()
    with pytest.raises(FineDataError, match=str(occ)):
        ScanImageDataset(bad, layouts["list"], layouts["cache"], load_res=32, seed=0)[0]
    (bad / "002_01" / "surface.npz").unlink()   # stage 2 needs it; nothing is derived
    with pytest.raises(FineDataError, match=str(bad / "002_01" / "surface.npz")):
        ScanImageDataset(bad, layouts["list"], layouts["cache"], load_res=32, seed=0,
                         fixed_view=True)[1]


# ----------------------------------------------------------------------------- preprocess.py
def _state(folder: Path) -> dict:
    """{path: (mtime, bytes)} of every file, {path: None} of every folder (hidden ones too)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_preprocess_keeps_the_originals_outputs(tmp_path, capsys):
    from test_preprocess import N_VIEWS, RES, SIZES, cli, make_flame_model, write_scan

    import preprocess
    from lib.dataset.preprocessing import is_complete

    (tmp_path / "flame").mkdir()
    z_shift = make_flame_model(tmp_path / "generic_model.pkl")
    for name in ("g_a", "g_b"):
        write_scan(tmp_path, name, z_shift)
    ours = tmp_path / "ours"
    assert preprocess.main(cli(tmp_path, ours, "--views", "9")) == 0
    # the output folder holds the original's results for both scans (g_b: renders missing)
    out = tmp_path / "out"
    for name in ("g_a", "g_b"):
        write_original_layout(ours / name, out / name, res=RES)
    for p in (out / "g_b" / "multi_view_256").glob("0008_*.png"):
        p.unlink()
    capsys.readouterr()
    before = _state(out)
    assert is_complete(out / "g_a", N_VIEWS, RES, SIZES)
    assert is_complete(out / "g_a", N_VIEWS, RES, SIZES, deep=False)
    assert not is_complete(out / "g_b", N_VIEWS, RES, SIZES)
    assert preprocess.main(cli(tmp_path, out)) == 1        # g_b incomplete: reported
    cap = capsys.readouterr()
    assert "g_a: kept as the original GANHead's output" in cap.out
    assert "1 kept as the original GANHead's outputs" in cap.out
    assert "FAILED g_b:" in cap.err and "0008_normal.png" in cap.err and "not overwritten" \
        in cap.err
    assert _state(out) == before                            # every file: bytes and mtimes
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert rows == ["id,dataset", "g_a,faceverse"]

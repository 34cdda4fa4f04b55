"""Stage-2 dataset (lib/dataset/fine.py) on a small fake processed folder and cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lib.dataset.fine import FineDataError, ScanImageDataset

IDS_UNSORTED = ["b_02", "a_01", "c_03"]
IDS = sorted(IDS_UNSORTED)
N_VIEWS, R, M = 3, 16, 500


def _rgb(scan: int, k: int, res: int) -> np.ndarray:
    """White background; a foreground square with known values, one pure-white texel."""
    img = np.full((res, res, 3), 255, np.uint8)
    a, b = res // 4, 3 * res // 4
    img[a:b, a:b] = (255, 0, 10 * scan + k)
    img[a, a] = (255, 255, 255)  # white texture inside the head: still foreground
    return img


def _normal(scan: int, k: int, res: int) -> np.ndarray:
    img = np.full((res, res, 3), 255, np.uint8)
    a, b = res // 4, 3 * res // 4
    img[a:b, a:b] = (0, 128, 200 + k)
    return img


def _params(scan: int) -> np.ndarray:
    return (np.arange(169) * 0.01 + scan).astype(np.float32)


def _view_params(scan: int) -> np.ndarray:
    return np.stack([_params(scan) + 100 * (k + 1) for k in range(N_VIEWS)])


def _cache(scan: int) -> np.ndarray:
    rng = np.random.default_rng(scan)
    c = rng.standard_normal((N_VIEWS, R, R, 4)).astype(np.float32)
    c[..., 3] = (rng.random((N_VIEWS, R, R)) > 0.5).astype(np.float32)
    return c


def _surface(scan: int) -> dict[str, np.ndarray]:
    i = np.arange(M, dtype=np.float32)[:, None] * np.array([[1.0, 2.0, 3.0]], np.float32)
    return {"surface_points": i + scan, "surface_normals": i + scan + 0.5,
            "surface_colors": -(i + scan)}


def _make(tmp_path, img_res=R, folder_res=256, with_cache=True):
    proc, cache = tmp_path / "processed", tmp_path / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (tmp_path / "list.csv").write_text(
        "id,dataset\n" + "".join(f"{s},faceverse\n" for s in IDS_UNSORTED))
    for s in IDS_UNSORTED:
        n = IDS.index(s)
        d = proc / s / f"multi_view_{folder_res}"
        d.mkdir(parents=True)
        np.savez(proc / s / "occupancy.npz", flame_params=_params(n), scan_name=s,
                 pts_d=np.zeros((8, 3), np.float32), occ_gt=np.zeros((8, 1), np.float32))
        np.savez(proc / s / "surface.npz", **_surface(n))
        for k in range(N_VIEWS):
            Image.fromarray(_normal(n, k, img_res)).save(d / f"{k:04d}_normal.png")
            Image.fromarray(_rgb(n, k, img_res)).save(d / f"{k:04d}_rgb.png")
        if with_cache:
            np.savez(cache / f"{s}.npz", cache=_cache(n), view_params=_view_params(n))
    return proc, tmp_path / "list.csv", cache


def _ds(tmp_path, **kw):
    proc, lst, cache = _make(tmp_path)
    kw = {"n_views": N_VIEWS, "load_res": R, "surface_points": 64, "repeat": 2, **kw}
    return ScanImageDataset(proc, lst, cache, **kw)


def test_item_values_round_trip(tmp_path):
    ds = _ds(tmp_path, fixed_view=True)
    assert len(ds) == 3 * 2 and ds.n_subjects == 3
    for i in range(len(ds)):
        it = ds[i]
        n, k = i % 3, (i // 3) % N_VIEWS  # every (scan, view) pair in turn
        assert it["scan_id"] == IDS[n] and it["index"] == n and it["view"] == k
        assert it["params"].dtype == torch.float32 and it["params"].shape == (169,)
        # processed scans live in FLAME space: a stored scale / translation reads as 1 / 0
        want = _params(n)
        want[0], want[1:4] = 1.0, 0.0
        assert torch.equal(it["params"], torch.from_numpy(want))
        assert torch.equal(it["view_params"], torch.from_numpy(_view_params(n)[k]))
        for key, ref in (("normal_img", _normal(n, k, R)), ("rgb_img", _rgb(n, k, R))):
            img = it[key]
            assert img.shape == (3, R, R) and img.dtype == torch.float32
            expect = torch.from_numpy(ref.astype(np.float64) / 127.5 - 1.0).permute(2, 0, 1)
            assert torch.allclose(img.double(), expect, atol=1e-7)
        # Exact end points: 255 -> 1, 0 -> -1.
        assert it["rgb_img"][0, 0, 0].item() == 1.0
        assert it["rgb_img"][1, R // 2, R // 2].item() == -1.0
        assert it["normal_img"][0, R // 2, R // 2].item() == -1.0
        c = _cache(n)[k]
        assert it["cache_pts"].shape == (R, R, 3) and it["cache_pts"].dtype == torch.float32
        assert torch.equal(it["cache_pts"], torch.from_numpy(c[..., :3]))
        assert it["cache_mask"].dtype == torch.bool
        assert torch.equal(it["cache_mask"], torch.from_numpy(c[..., 3] == 1.0))


def test_mask_from_white_background(tmp_path):
    it = _ds(tmp_path, fixed_view=True)[0]
    mask = it["img_mask"]
    assert mask.shape == (1, R, R) and mask.dtype == torch.bool
    expect = torch.zeros(R, R, dtype=torch.bool)
    expect[R // 4:3 * R // 4, R // 4:3 * R // 4] = True
    assert torch.equal(mask[0], expect)
    # The white texel is foreground (its normal is not white).
    assert mask[0, R // 4, R // 4] and (it["rgb_img"][:, R // 4, R // 4] == 1.0).all()


def test_surface_subset(tmp_path):
    it = _ds(tmp_path, fixed_view=True)[1]  # scan 1
    p, nrm, col = it["surface_points"], it["surface_normals"], it["surface_colors"]
    assert p.shape == nrm.shape == col.shape == (64, 3) and p.dtype == torch.float32
    # Rows of the three arrays stay paired, come from the file, and are distinct.
    assert torch.equal(nrm, p + 0.5) and torch.equal(col, -p)
    idx = p[:, 0] - 1
    assert torch.equal(p, idx[:, None] * torch.tensor([1.0, 2.0, 3.0]) + 1)
    assert idx.min() >= 0 and idx.max() < M and len(set(idx.tolist())) == 64
    # More requested than stored: sampled with replacement.
    big = _ds(tmp_path / "big", surface_points=M + 10)[0]
    assert big["surface_points"].shape == (M + 10, 3)


def test_fixed_view_deterministic(tmp_path):
    ds = _ds(tmp_path, fixed_view=True)
    a, b = ds[4], ds[4]
    assert a["view"] == b["view"] == (4 // 3) % N_VIEWS
    for key in ("surface_points", "normal_img", "cache_pts"):
        assert torch.equal(a[key], b[key])


def test_random_views(tmp_path):
    ds = _ds(tmp_path)
    views = {ds[0]["view"] for _ in range(40)}
    assert views == set(range(N_VIEWS))  # P(miss one in 40 draws) ~ 3 * (2/3)^40 ~ 1e-7
    seeded = _ds(tmp_path / "s", seed=7)
    assert [seeded[i]["view"] for i in range(6)] == [seeded[i]["view"] for i in range(6)]


def test_view_subset(tmp_path):
    # training on all but view 1, validating on view 1 only
    train = _ds(tmp_path, views=[0, 2])
    assert {train[0]["view"] for _ in range(40)} == {0, 2}  # P(miss one) ~ 2 * 2^-40
    held = _ds(tmp_path / "held", views=[1], fixed_view=True, repeat=1)
    assert [(it["scan_id"], it["view"]) for it in held] == [(sid, 1) for sid in IDS]
    both = _ds(tmp_path / "both", views=[2, 0], fixed_view=True, repeat=2)
    pairs = [(it["scan_id"], it["view"]) for it in both]
    assert sorted(pairs) == sorted((sid, k) for sid in IDS for k in (0, 2))
    assert all(pairs[both.fixed_item(sid, k)] == (sid, k) for sid, k in pairs)
    for n, bad in enumerate(([], [N_VIEWS])):
        with pytest.raises(FineDataError, match="views"):
            _ds(tmp_path / f"bad{n}", views=bad)


def test_index_is_sorted_order_and_subset(tmp_path):
    ds = _ds(tmp_path, subset=2, repeat=1)
    assert [ds[i]["scan_id"] for i in range(len(ds))] == IDS[:2]
    assert [ds[i]["index"] for i in range(len(ds))] == [0, 1]
    assert ds.n_subjects == 3


def test_resize_to_load_res(tmp_path):
    proc, lst, cache = _make(tmp_path, img_res=2 * R)
    ds = ScanImageDataset(proc, lst, cache, n_views=N_VIEWS, load_res=R, surface_points=8,
                          fixed_view=True)
    it = ds[0]
    assert it["rgb_img"].shape == (3, R, R) and it["img_mask"].shape == (1, R, R)
    # Constant regions survive bilinear resizing: background white, square interior as set.
    assert (it["rgb_img"][:, 0, 0] == 1.0).all()
    assert it["rgb_img"][1, R // 2, R // 2].item() == -1.0
    assert it["img_mask"][0, R // 2, R // 2] and not it["img_mask"][0, 0, 0]
    assert it["img_mask"].sum() == (R // 2) ** 2


def test_folder_of_load_res_found(tmp_path):
    proc, lst, cache = _make(tmp_path, folder_res=R)  # multi_view_16
    ds = ScanImageDataset(proc, lst, cache, n_views=N_VIEWS, load_res=R, surface_points=8)
    assert ds[0]["rgb_img"].shape == (3, R, R)


def test_missing_cache_mentions_precompute(tmp_path):
    proc, lst, cache = _make(tmp_path, with_cache=False)
    ds = ScanImageDataset(proc, lst, cache, n_views=N_VIEWS, load_res=R)
    with pytest.raises(FineDataError, match="precompute.py") as err:
        ds[0]
    assert f"{IDS[0]}.npz" in str(err.value)


def test_cache_mismatch_errors(tmp_path):
    proc, lst, cache = _make(tmp_path)
    with pytest.raises(FineDataError, match="load_res"):
        ScanImageDataset(proc, lst, cache, n_views=N_VIEWS, load_res=2 * R, fixed_view=True)[0]
    with pytest.raises(FineDataError, match="n_views"):
        ScanImageDataset(proc, lst, cache, n_views=N_VIEWS + 1, load_res=R, fixed_view=True)[0]


def test_missing_render_names_file(tmp_path):
    proc, lst, cache = _make(tmp_path)
    (proc / IDS[0] / "multi_view_256" / "0000_rgb.png").unlink()
    ds = ScanImageDataset(proc, lst, cache, n_views=N_VIEWS, load_res=R, fixed_view=True)
    with pytest.raises(FineDataError, match="0000_rgb.png"):
        ds[0]
    (proc / IDS[1] / "surface.npz").unlink()
    with pytest.raises(FineDataError, match="surface.npz"):
        ds[1]


def test_collate(tmp_path):
    ds = _ds(tmp_path)
    batch = next(iter(DataLoader(ds, batch_size=2, shuffle=False)))
    assert batch["index"].tolist() == [0, 1]
    assert batch["normal_img"].shape == (2, 3, R, R)
    assert batch["cache_mask"].shape == (2, R, R) and batch["cache_mask"].dtype == torch.bool
    assert batch["surface_points"].shape == (2, 64, 3)
    assert batch["view_params"].shape == (2, 169) and batch["view"].shape == (2,)


def test_original_cache_files_read_as_ours(tmp_path):
    """The original's cache (`<id>.npy` with points set to 1 outside the mask, float64
    `<id>_pose.npy`) gives the same items as this project's `<id>.npz` of the same content."""
    proc, lst, ours = _make(tmp_path)
    orig = tmp_path / "cache_img_dvr_pyrender"
    orig.mkdir()
    for n, s in enumerate(IDS):
        c = _cache(n).copy()
        c[..., :3][c[..., 3] < 0.5] = 1.0  # the original's fill outside the mask
        np.save(orig / f"{s}.npy", c)
        np.save(orig / f"{s}_pose.npy", _view_params(n).astype(np.float64))
    kw = {"n_views": N_VIEWS, "load_res": R, "surface_points": 16, "fixed_view": True}
    a = ScanImageDataset(proc, lst, ours, **kw)
    b = ScanImageDataset(proc, lst, orig, **kw)
    for i in range(len(a)):
        x, y = a[i], b[i]
        m = x["cache_mask"]
        assert torch.equal(m, y["cache_mask"]) and m.any()
        assert torch.equal(x["cache_pts"][m], y["cache_pts"][m])
        for key in ("view_params", "params", "normal_img", "rgb_img", "surface_points"):
            assert torch.equal(x[key], y[key]), key
    # tools/original_layout.py writes the same files from ours
    from tools.original_layout import write_original_cache

    tool = tmp_path / "tool"
    write_original_cache(ours / f"{IDS[0]}.npz", tool, IDS[0])
    np.testing.assert_array_equal(np.load(tool / f"{IDS[0]}.npy"), np.load(orig / f"{IDS[0]}.npy"))
    np.testing.assert_array_equal(np.load(tool / f"{IDS[0]}_pose.npy"),
                                  np.load(orig / f"{IDS[0]}_pose.npy").astype(np.float32))
    (orig / f"{IDS[0]}_pose.npy").unlink()  # neither layout complete: both files named
    with pytest.raises(FineDataError, match=f"{IDS[0]}.npz.*{IDS[0]}_pose.npy"):
        b[0]


def test_datamodule_accepts_the_original_cache(tmp_path, capsys):
    from lib.dataset.datamodule import ScanDataModule

    proc, lst, _ = _make(tmp_path, with_cache=False)
    orig = tmp_path / "cache_img_dvr_pyrender"
    orig.mkdir()
    for n, s in enumerate(IDS):
        np.save(orig / f"{s}.npy", _cache(n))
        np.save(orig / f"{s}_pose.npy", _view_params(n))
    dm = ScanDataModule(processed_dir=str(proc), data_list=str(lst), stage="fine",
                    cache_dir=str(orig), load_res=R, n_views=N_VIEWS)
    dm.check_cache(geometry="digest", source="last.ckpt")
    assert "3 cache file(s)" in capsys.readouterr().out

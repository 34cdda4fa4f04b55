"""lib/utils/knn.py: nearest neighbours against a float64 brute-force reference."""
import numpy as np
import torch

from lib.utils.knn import NearestTree, _nearest_brute, nearest_exact, nearest_neighbor


def _reference(x, y):
    d = np.linalg.norm(x[:, :, None, :] - y[:, None, :, :], axis=-1)  # [B, N, V] float64
    return d.min(-1), d.argmin(-1)


def test_cpu_tree_and_brute_force_match_float64_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 500, 3, generator=g) * 2 - 1
    y = torch.rand(2, 300, 3, generator=g) * 2 - 1
    ref_d, ref_i = _reference(x.double().numpy(), y.double().numpy())
    for d, i in (nearest_neighbor(x, y), _nearest_brute(x, y, chunk=128)):
        assert d.shape == (2, 500) and d.dtype == torch.float32 and i.dtype == torch.long
        np.testing.assert_allclose(d.numpy(), ref_d, atol=1e-5)
        # indices agree except where two references are (nearly) equally close
        same = i.numpy() == ref_i
        dist = np.linalg.norm(x.numpy()[:, :, None] - y.numpy()[:, None], axis=-1)
        gap = np.take_along_axis(dist, i.numpy()[..., None], -1)[..., 0] - ref_d
        assert (same | (np.abs(gap) < 1e-5)).all()
    assert (nearest_neighbor(x, y)[1].numpy() == ref_i).mean() > 0.999


def test_empty_inputs():
    d, i = nearest_neighbor(torch.zeros(1, 0, 3), torch.rand(1, 5, 3))
    assert d.shape == (1, 0) and i.shape == (1, 0)


def test_exact_helpers_match_float64_reference():
    """nearest_exact (torch, results on the query's device and dtype) and NearestTree (numpy,
    one tree for several queries) give the float64 brute-force distances and indices."""
    rng = np.random.default_rng(1)
    y = rng.uniform(-1, 1, (300, 3))
    xs = [rng.uniform(-1, 1, (n, 3)) for n in (200, 50)]
    tree = NearestTree(torch.from_numpy(y).float())  # a tensor is read as float64 numbers
    for x in xs:
        ref_d, ref_i = (r[0] for r in _reference(x[None],
                                                 y.astype(np.float32).astype(np.float64)[None]))
        d, i = tree.query(x)
        assert d.dtype == np.float64 and i.dtype == np.int64
        np.testing.assert_allclose(d, ref_d, rtol=0, atol=1e-12)
        assert (i == ref_i).all()
        dt, it = nearest_exact(torch.from_numpy(x), torch.from_numpy(y).float())
        assert dt.dtype == torch.float64 and it.dtype == torch.long
        np.testing.assert_allclose(dt.numpy(), ref_d, rtol=0, atol=1e-12)
        assert (it.numpy() == ref_i).all()

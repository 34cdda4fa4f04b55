"""lib/utils/knn.py: nearest neighbours against a float64 brute-force reference."""
import numpy as np
import torch

from lib.utils.knn import _nearest_brute, nearest_neighbor


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
        gap = np.take_along_axis(np.linalg.norm(x.numpy()[:, :, None] - y.numpy()[:, None], axis=-1),
                                 i.numpy()[..., None], -1)[..., 0] - ref_d
        assert (same | (np.abs(gap) < 1e-5)).all()
    assert (nearest_neighbor(x, y)[1].numpy() == ref_i).mean() > 0.999


def test_empty_inputs():
    d, i = nearest_neighbor(torch.zeros(1, 0, 3), torch.rand(1, 5, 3))
    assert d.shape == (1, 0) and i.shape == (1, 0)

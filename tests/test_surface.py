"""lib/utils/surface.py: area-weighted samples against known areas and planes."""
import numpy as np
import pytest

from lib.utils.surface import SamplingError, area_samples


def test_area_samples_follow_the_areas_and_lie_on_their_faces():
    # two triangles: one in z = 0 with area 0.5, one in x = 2 with area 1.5 (3x larger)
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0],
                      [2, 0, 0], [2, 3, 0], [2, 0, 1]], dtype=np.float64)
    faces = np.array([[0, 1, 2], [3, 4, 5]])
    pts, nrm, face, bary = area_samples(verts, faces, 20000, np.random.default_rng(0))
    assert pts.shape == nrm.shape == bary.shape == (20000, 3) and face.shape == (20000,)
    assert abs((face == 1).mean() - 0.75) < 0.015  # 1.5 / (0.5 + 1.5)
    assert (bary >= 0).all() and np.allclose(bary.sum(1), 1.0)
    on0, on1 = face == 0, face == 1
    assert np.allclose(pts[on0, 2], 0) and (pts[on0, :2].sum(1) <= 1 + 1e-12).all()
    assert np.allclose(pts[on1, 0], 2)
    assert np.allclose(nrm[on0], [0, 0, 1]) and np.allclose(nrm[on1], [1, 0, 0])
    # uniform inside a triangle: the mean point is the centroid
    np.testing.assert_allclose(pts[on0].mean(0), [1 / 3, 1 / 3, 0], atol=0.01)
    # same generator state, same samples
    again = area_samples(verts, faces, 20000, np.random.default_rng(0))[0]
    assert np.array_equal(again, pts)


@pytest.mark.parametrize("verts, faces", [
    (np.zeros((3, 3)), np.zeros((0, 3), dtype=int)),            # no faces
    (np.zeros((3, 2)), np.array([[0, 1, 2]])),                  # 2-D vertices
    (np.zeros((3, 3)), np.array([[0, 1, 2]])),                  # zero area
])
def test_unsampleable_meshes_are_refused(verts, faces):
    with pytest.raises(SamplingError):
        area_samples(verts, faces, 10, np.random.default_rng(0))

"""Tests of lib/utils/extraction.py against analytic occupancies (spheres, an ellipsoid, a
tilted thin plate) and against marching cubes on the densely evaluated grid."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lib.utils.extraction import EmptyMeshError, dense_grid_values, extract_mesh, mesh_from_grid


def sphere_logit(center, radius, sharpness=10.0):
    c = torch.as_tensor(center, dtype=torch.float32)

    def fn(p):
        return sharpness * (radius - (p - c.to(p.device)).norm(dim=-1))
    return fn


def ellipsoid_logit(center, axes, sharpness=10.0):
    c = torch.as_tensor(center, dtype=torch.float32)
    a = torch.as_tensor(axes, dtype=torch.float32)

    def fn(p):
        return sharpness * (1.0 - ((p - c.to(p.device)) / a.to(p.device)).norm(dim=-1))
    return fn


def tilted_plate_logit(half_thickness, normal=(0.2, 0.1, 1.0), radius=0.8):
    n = torch.tensor(normal, dtype=torch.float32)
    n = n / n.norm()
    off = torch.tensor([0.0, 0.0, 0.013])

    def fn(p):
        slab = half_thickness - ((p - off.to(p.device)) @ n.to(p.device)).abs()
        return 50.0 * torch.minimum(slab, radius - p.norm(dim=-1))
    return fn


def mesh_stats(verts: torch.Tensor, faces: torch.Tensor):
    """Area, signed volume (float64) and watertightness (every undirected edge in exactly two
    faces, used once in each direction)."""
    v = verts.double()
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    area = 0.5 * torch.cross(b - a, c - a, dim=-1).norm(dim=-1).sum().item()
    volume = (a * torch.cross(b, c, dim=-1)).sum().item() / 6.0
    directed = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).numpy()
    n_v = int(verts.shape[0])
    keys = directed[:, 0] * n_v + directed[:, 1]
    rev = directed[:, 1] * n_v + directed[:, 0]
    unique_directed = np.unique(keys).shape[0] == keys.shape[0]
    closed = unique_directed and np.isin(rev, keys).all()
    return area, volume, bool(closed)


class CountingFn:
    """Wraps an occupancy, counting queried points and recording their range and device."""

    def __init__(self, fn):
        self.fn, self.count, self.lo, self.hi, self.devices = fn, 0, None, None, set()

    def __call__(self, p):
        assert p.dim() == 2 and p.shape[1] == 3 and p.dtype == torch.float32
        assert not torch.is_grad_enabled()
        self.count += p.shape[0]
        self.devices.add(p.device.type)
        lo, hi = p.min(0).values, p.max(0).values
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        return self.fn(p)


def test_sphere_geometry_in_non_cubic_box():
    center, r, res = (0.1, -0.05, 0.02), 0.6, 64
    fn = CountingFn(sphere_logit(center, r))
    bmin, bmax = torch.tensor([-0.6, -0.7, -0.65]), torch.tensor([0.75, 0.6, 0.7])
    m = extract_mesh(fn, bmin, bmax, res_init=16, res_final=res, chunk=5000)
    assert m.verts.dtype == torch.float32 and m.faces.dtype == torch.long
    assert m.verts.shape[1] == 3 and m.faces.shape[1] == 3
    # the grid: the cube centred on the box, side 1.1 x its longest extent (1.35 here), as
    # the original's generate_mesh
    centre = (bmin.double().numpy() + bmax.double().numpy()) / 2
    np.testing.assert_allclose(m.grid_min, centre - 0.55 * 1.35, atol=1e-7)
    np.testing.assert_allclose(m.grid_max, centre + 0.55 * 1.35, atol=1e-7)
    voxel = float(((m.grid_max - m.grid_min) / res).max())
    dist = (m.verts.double() - torch.tensor(center, dtype=torch.float64)).norm(dim=-1)
    assert (dist - r).abs().max().item() < voxel
    area, volume, closed = mesh_stats(m.verts, m.faces)
    assert closed
    assert abs(area / (4 * math.pi * r ** 2) - 1) < 0.01
    assert volume > 0  # outward normals
    assert abs(volume / (4 / 3 * math.pi * r ** 3) - 1) < 0.02
    # face normals point away from the centre
    v = m.verts.double()
    a, b, c = v[m.faces[:, 0]], v[m.faces[:, 1]], v[m.faces[:, 2]]
    nrm = torch.cross(b - a, c - a, dim=-1)
    out = ((a + b + c) / 3 - torch.tensor(center, dtype=torch.float64))
    assert ((nrm * out).sum(-1) > 0).float().mean() > 0.999
    # n_queries counts exactly the points given to occ_fn, all inside the grid box
    assert m.n_queries == fn.count
    assert fn.devices == {"cpu"}
    assert (fn.lo.double().numpy() >= m.grid_min - 1e-6).all()
    assert (fn.hi.double().numpy() <= m.grid_max + 1e-6).all()


def test_hierarchy_equals_dense_and_saves_queries():
    res = 128
    fn = CountingFn(ellipsoid_logit((0.05, 0.1, -0.08), (0.7, 0.5, 0.6)))
    m = extract_mesh(fn, [-1, -1, -1], [1, 1, 1], res_init=16, res_final=res)
    dense = dense_grid_values(fn.fn, m.grid_min, m.grid_max, res)
    assert dense.shape == (res + 1,) * 3
    ref = mesh_from_grid(dense, m.grid_min, m.grid_max)
    assert ref.verts.shape == m.verts.shape and ref.faces.shape == m.faces.shape
    assert (ref.verts - m.verts).abs().max().item() < 1e-5
    assert torch.equal(ref.faces, m.faces)
    assert m.n_queries == fn.count
    assert m.n_queries < 0.25 * (res + 1) ** 3


def test_dense_grid_values_layout():
    res = 8
    vals = dense_grid_values(lambda p: p[:, 0] + 10 * p[:, 1] + 100 * p[:, 2],
                             [0, -1, 2], [1, 1, 6], res, chunk=37)
    i, j, k = torch.meshgrid(*(torch.arange(res + 1, dtype=torch.float32),) * 3, indexing="ij")
    expect = (i / res) + 10 * (-1 + 2 * j / res) + 100 * (2 + 4 * k / res)
    assert torch.allclose(vals, expect, atol=1e-4)


def test_two_spheres_keep_the_one_nearest_the_origin():
    big_c, big_r, small_c, small_r = (-0.35, 0.0, 0.0), 0.45, (0.55, 0.1, 0.0), 0.25
    f_big, f_small = sphere_logit(big_c, big_r), sphere_logit(small_c, small_r)

    def both(p):
        return torch.maximum(f_big(p), f_small(p))
    m = extract_mesh(both, [-1, -1, -1], [1, 1, 1], res_final=64)
    dist = (m.verts - torch.tensor(big_c)).norm(dim=-1)
    voxel = float(((m.grid_max - m.grid_min) / 64).max())
    assert (dist - big_r).abs().max().item() < voxel
    _, volume, closed = mesh_stats(m.verts, m.faces)
    assert closed and abs(volume / (4 / 3 * math.pi * big_r ** 3) - 1) < 0.03
    everything = extract_mesh(both, [-1, -1, -1], [1, 1, 1], res_final=64,
                              keep_main_component=False)
    _, vol_all, _ = mesh_stats(everything.verts, everything.faces)
    expect = 4 / 3 * math.pi * (big_r ** 3 + small_r ** 3)
    assert abs(vol_all / expect - 1) < 0.03


def _component_test_mesh(big_c, big_r, small_c, small_r):
    f_big, f_small = sphere_logit(big_c, big_r), sphere_logit(small_c, small_r)
    return extract_mesh(lambda p: torch.maximum(f_big(p), f_small(p)), [-1, -1, -1], [1, 1, 1],
                        res_final=64)


def _sphere_of(m, centres):
    """Index of the centre the mesh's vertices sit around."""
    mean = m.verts.double().mean(0)
    return int(np.argmin([float((mean - torch.tensor(c, dtype=torch.float64)).norm())
                          for c in centres]))


def test_head_component_rule_of_the_original():
    # the component nearest the origin is kept when its area is at least half the largest's:
    # radius 0.3 (area 0.36 pi) at 0.1 from the origin vs 0.4 (0.64 pi) at 0.75: kept although
    # smaller; radius 0.25 (0.25 pi < 0.32 pi) at the same place: the largest is kept instead
    near, far = (0.0, 0.1, 0.0), (0.6, -0.45, 0.0)
    m = _component_test_mesh(far, 0.4, near, 0.3)
    assert _sphere_of(m, [far, near]) == 1
    m = _component_test_mesh(far, 0.4, near, 0.25)
    assert _sphere_of(m, [far, near]) == 0


def test_head_component_uses_area_weighted_centroids_and_edge_links():
    from lib.utils.extraction import edge_components, head_component

    # two triangles sharing only a vertex are two components (edge links, as trimesh's split)
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0]], float)
    n, label = edge_components(np.array([[0, 1, 2], [0, 3, 4]]))
    assert n == 2 and label[0] != label[1]
    n, _ = edge_components(np.array([[0, 1, 2], [0, 2, 3]]))
    assert n == 1
    # component A: a strip under y = x from x = 0.3 to 4, its vertices crowded near x = 0.3
    # (vertex mean at ~0.7 from the origin) but its area far out (area-weighted centroid at
    # ~3); component B: one triangle of area 4.9 >= half of A's (~8) with centroid at ~2.4
    xs = np.concatenate([np.linspace(0.3, 0.4, 11), [4.0]])
    strip = np.stack([np.stack([xs, 0 * xs, 0 * xs], 1), np.stack([xs, xs, 0 * xs], 1)],
                     1).reshape(-1, 3)                         # bottom 2i, top 2i + 1
    quads = [[[2 * i, 2 * i + 2, 2 * i + 1], [2 * i + 1, 2 * i + 2, 2 * i + 3]]
             for i in range(len(xs) - 1)]
    b = np.array([[-1.2, 0, 0], [-1.2, 3.5, 0], [-4, 0, 0]])
    verts = np.concatenate([strip, b])
    faces = np.concatenate([np.array(quads).reshape(-1, 3), [[len(strip), len(strip) + 1,
                                                              len(strip) + 2]]])
    tri = verts[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    cen = (area[:-1, None] * tri[:-1].mean(1)).sum(0) / area[:-1].sum()
    assert area[-1] >= 0.5 * area[:-1].sum()
    assert np.linalg.norm(cen) > np.linalg.norm(b.mean(0)) > np.linalg.norm(strip.mean(0))
    kept_v, kept_f = head_component(verts, faces)
    assert kept_f.shape == (1, 3) and np.allclose(kept_v, b)
    # without B, the strip alone is returned unchanged
    kept_v, kept_f = head_component(strip, np.array(quads).reshape(-1, 3))
    assert kept_f.shape == (2 * (len(xs) - 1), 3)


def test_thin_tilted_plate_survives_hierarchy():
    res = 128
    voxel = 2.2 / res  # box [-1, 1]^3 padded by 5% per side
    fn = tilted_plate_logit(half_thickness=voxel)  # the plate is 2 final voxels thick
    m = extract_mesh(fn, [-1, -1, -1], [1, 1, 1], res_final=res, keep_main_component=False)
    ref = mesh_from_grid(dense_grid_values(fn, m.grid_min, m.grid_max, res),
                         m.grid_min, m.grid_max, keep_main_component=False)
    area, _, _ = mesh_stats(m.verts, m.faces)
    area_ref, _, _ = mesh_stats(ref.verts, ref.faces)
    assert m.verts.shape == ref.verts.shape
    assert abs(area / area_ref - 1) < 1e-4
    # without the dilation the coarse grid misses parts of the plate: the test is sensitive
    m0 = extract_mesh(fn, [-1, -1, -1], [1, 1, 1], res_final=res, keep_main_component=False,
                      dilation=0)
    area0, _, _ = mesh_stats(m0.verts, m0.faces)
    assert area0 < 0.99 * area_ref


@pytest.mark.parametrize("value", [-3.0, 2.0])
def test_no_surface_raises(value):
    with pytest.raises(EmptyMeshError, match="no surface"):
        extract_mesh(lambda p: torch.full((p.shape[0],), value), [-1, -1, -1], [1, 1, 1],
                     res_init=8, res_final=32)


def test_invalid_arguments():
    fn = sphere_logit((0, 0, 0), 0.5)
    with pytest.raises(ValueError, match="power of two"):
        extract_mesh(fn, [-1, -1, -1], [1, 1, 1], res_init=16, res_final=48)
    with pytest.raises(ValueError, match="bbox_max > bbox_min"):
        extract_mesh(fn, [1, -1, -1], [-1, 1, 1])
    with pytest.raises(ValueError, match=r"\[N\] logits"):
        extract_mesh(lambda p: p, [-1, -1, -1], [1, 1, 1], res_init=8, res_final=16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    fn = CountingFn(ellipsoid_logit((0.05, 0.1, -0.08), (0.7, 0.5, 0.6)))
    cpu = extract_mesh(fn.fn, [-1, -1, -1], [1, 1, 1], res_final=64)
    gpu = extract_mesh(fn, torch.tensor([-1.0, -1, -1], device="cuda"),
                       torch.tensor([1.0, 1, 1], device="cuda"), res_final=64)
    assert fn.devices == {"cuda"}
    assert gpu.verts.device.type == "cuda" and gpu.faces.device.type == "cuda"
    assert gpu.n_queries == cpu.n_queries
    assert gpu.verts.shape == cpu.verts.shape
    assert (gpu.verts.cpu() - cpu.verts).abs().max().item() < 1e-4

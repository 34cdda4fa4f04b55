"""Tests of lib/render against analytic truths (sphere, planes, linear textures) and a
slow float64 per-face reference rasterizer."""
import math
import os

import numpy as np
import pytest
import torch
import trimesh

from lib.render import (
    add_label,
    interpolate,
    make_grid,
    pixel_centers,
    pixel_to_ndc,
    project,
    rasterize,
    render_depth,
    render_normals,
    render_shaded,
    render_texture,
    render_vertex_colors,
    sample_texture,
    save_png,
    save_video,
    to_uint8,
    vertex_normals,
)
from lib.render.rasterizer import rasterize_reference


def _sphere(sub=4, r=0.7, dtype=torch.float32):
    m = trimesh.creation.icosphere(subdivisions=sub, radius=r)
    return torch.tensor(m.vertices, dtype=dtype), torch.tensor(m.faces, dtype=torch.long)


def _sphere_bounds(v, f, r):
    """Inner radius of the inscribed polyhedron and max angular circumradius of its faces."""
    t = v.double()[f]                                              # [F, 3, 3]
    a = (t[:, 1] - t[:, 2]).norm(dim=1)
    b = (t[:, 2] - t[:, 0]).norm(dim=1)
    c = (t[:, 0] - t[:, 1]).norm(dim=1)
    area = 0.5 * torch.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0], dim=1).norm(dim=1)
    R = a * b * c / (4 * area)                                     # circumradius per face
    r_in = torch.sqrt(r * r - R * R).min().item()
    theta = torch.asin(R / r).max().item()
    return r_in, theta


# ---------------------------------------------------------------- camera
def test_camera_convention():
    res = 8
    pc = pixel_centers(res, dtype=torch.float64)
    assert pc.shape == (res, res, 2)
    i, j = 2, 5
    assert pc[i, j, 0].item() == pytest.approx(-1 + (j + 0.5) * 2 / res)
    assert pc[i, j, 1].item() == pytest.approx(1 - (i + 0.5) * 2 / res)
    pix = project(torch.cat([pc, torch.zeros(res, res, 1, dtype=pc.dtype)], -1), res)
    jj, ii = torch.meshgrid(torch.arange(res), torch.arange(res), indexing="xy")
    assert torch.allclose(pix[..., 0], jj.double()) and torch.allclose(pix[..., 1], ii.double())
    assert torch.allclose(pixel_to_ndc(pix, res), pc)
    # the top-left corner (-1, 1) is the outer corner of pixel (0, 0)
    assert torch.allclose(
        project(torch.tensor([[-1.0, 1.0, 0.0]]), res), torch.tensor([[-0.5, -0.5]])
    )


# ---------------------------------------------------------------- sphere
def test_sphere_depth_mask_normals():
    r, res = 0.7, 128
    v, f = _sphere(4, r)
    r_in, theta = _sphere_bounds(v, f, r)
    delta = r - r_in                                               # tessellation error
    assert delta * res / 2 < 0.1                                   # band well within 1 pixel
    frags = rasterize(v, f, res)
    pc = pixel_centers(res, dtype=torch.float64)
    rho = pc.norm(dim=-1)
    z = frags.zbuf[0].double()
    m = frags.mask[0]
    # mask: exactly the disk, except the band r_in <= rho <= r (< 0.1 px wide)
    assert m[rho < r_in].all() and not m[rho > r].any()
    assert ((rho >= r_in) & (rho <= r)).sum() < 4 * res
    # depth: the hit lies between the inscribed ball and the sphere:
    # sqrt(r_in^2 - rho^2) <= z <= sqrt(r^2 - rho^2)   (float32 slack 1e-5)
    inn = rho < r_in
    assert (z[inn] <= torch.sqrt(r * r - rho[inn] ** 2) + 1e-5).all()
    assert (z[inn] >= torch.sqrt(r_in ** 2 - rho[inn] ** 2) - 1e-5).all()
    assert (z[m] ** 2 + rho[m] ** 2 <= r * r + 1e-5).all()
    dep = render_depth(v, f, res, background=-5.0)[0]
    assert torch.equal(dep[m], frags.zbuf[0][m]) and (dep[~m] == -5.0).all()
    # normals: bound = max vertex-normal deviation + 2 * angular circumradius
    vn = vertex_normals(v, f)[0].double()
    eps_v = torch.acos((vn * v.double() / r).sum(-1).clamp(-1, 1)).max().item()
    bound = eps_v + 2 * theta
    assert math.degrees(bound) < 6.0
    img = render_normals(v, f, res)[0].double()
    n = 2 * img - 1
    hit = interpolate(frags, f, v.double())[0]
    ang = torch.acos((n[m] * torch.nn.functional.normalize(hit[m], dim=-1)).sum(-1).clamp(-1, 1))
    assert ang.max().item() <= bound + 1e-4
    assert math.degrees(ang.mean().item()) < 1.0
    assert (img[~m] == 1.0).all()


# ---------------------------------------------------------------- single triangle
@pytest.mark.parametrize("tri", [
    [[-0.8, -0.6, 0.1], [0.7, -0.5, 0.3], [0.1, 0.9, -0.2]],
    [[0.1, 0.9, -0.2], [0.7, -0.5, 0.3], [-0.8, -0.6, 0.1]],       # other winding
    [[-3.0, -0.5, 0.4], [0.5, 2.5, -0.1], [1.5, -2.0, 0.2]],       # clipped by the view
])
def test_single_triangle(tri):
    res = 64
    V = torch.tensor(tri, dtype=torch.float32)
    F = torch.tensor([[0, 1, 2]])
    frags = rasterize(V, F, res)
    p = pixel_centers(res, dtype=torch.float64).reshape(-1, 2)
    T = torch.tensor(tri, dtype=torch.float64)
    M = torch.stack([T[0, :2] - T[2, :2], T[1, :2] - T[2, :2]], 1)  # 2x2
    l01 = torch.linalg.solve(M, (p - T[2, :2]).T).T
    bary = torch.cat([l01, 1 - l01.sum(1, keepdim=True)], 1).reshape(res, res, 3)
    m = frags.mask[0]
    assert m[(bary > 1e-6).all(-1)].all()
    assert not m[(bary < -1e-6).any(-1)].any()
    assert (frags.face_idx[0][m] == 0).all() and (frags.face_idx[0][~m] == -1).all()
    assert torch.allclose(frags.bary[0][m].double(), bary[m], atol=1e-5)
    zp = (bary * T[:, 2]).sum(-1)
    assert torch.allclose(frags.zbuf[0][m].double(), zp[m], atol=1e-5)
    assert torch.isinf(frags.zbuf[0][~m]).all()
    hit = interpolate(frags, F, V)[0].double()                     # the hit point on the plane
    truth = torch.cat([p.reshape(res, res, 2), zp[..., None]], -1)
    assert torch.allclose(hit[m], truth[m], atol=1e-5)
    assert (hit[~m] == 0).all()


# ---------------------------------------------------------------- depth order
@pytest.mark.parametrize("swap", [False, True])
def test_nearer_triangle_wins(swap):
    res = 48
    far = [[-0.9, -0.9, 0.1], [0.9, -0.9, 0.1], [0.0, 0.9, 0.1]]
    # a tilted triangle crossing the far one: z = 0.3 * x + 0.1
    tilt = [[-0.9, 0.9, -0.17], [0.9, 0.9, 0.37], [0.0, -0.9, 0.1]]
    tris = [tilt, far] if swap else [far, tilt]
    V = torch.tensor(tris, dtype=torch.float32).reshape(6, 3)
    F = torch.tensor([[0, 1, 2], [5, 4, 3]])                       # different windings
    frags = rasterize(V, F, res)
    p = pixel_centers(res)
    itilt = 0 if swap else 1
    both = frags.mask[0] & (p[..., 0].abs() > 0.05)
    exp = torch.where(p[..., 0] > 0, itilt, 1 - itilt)
    # where both cover: tilted wins iff x > 0 (its z exceeds 0.1)
    tri = torch.tensor([[0, 1, 2]])
    cov = rasterize(V[3 * (1 - itilt):3 * (1 - itilt) + 3], tri, res).mask[0] \
        & rasterize(V[3 * itilt:3 * itilt + 3], tri, res).mask[0]
    sel = both & cov
    assert sel.sum() > 100
    assert torch.equal(frags.face_idx[0][sel], exp[sel])


# ---------------------------------------------------------------- vs reference
def _random_mesh(seed, nv=40, nf=60):
    g = torch.Generator().manual_seed(seed)
    V = torch.rand(2, nv, 3, generator=g, dtype=torch.float64) * 2.6 - 1.3
    F = torch.stack([torch.randperm(nv, generator=g)[:3] for _ in range(nf)])
    return V, F


def test_fast_matches_reference():
    V, F = _random_mesh(0)
    ref, z2 = rasterize_reference(V, F, 40, return_second=True)
    # identical arithmetic in float64: everything equal, chunking included
    for mc in (1 << 19, 97):
        fast = rasterize(V, F, 40, max_candidates=mc)
        assert torch.equal(fast.mask, ref.mask) and torch.equal(fast.face_idx, ref.face_idx)
        assert torch.equal(fast.bary, ref.bary) and torch.equal(fast.zbuf, ref.zbuf)
    # float32: same faces away from depth near-ties, bary within 1e-5
    f32 = rasterize(V.float(), F, 40)
    assert (f32.mask == ref.mask).float().mean() > 0.995
    sel = f32.mask & ref.mask & ((ref.zbuf - z2) > 1e-4)
    assert sel.sum() > 500
    assert torch.equal(f32.face_idx[sel], ref.face_idx[sel])
    assert (f32.bary[sel].double() - ref.bary[sel]).abs().max() < 1e-5


def test_watertight_shared_edges_drawn_once():
    """A grid whose edges pass exactly through pixel centres: every interior centre is
    covered by exactly one face (shared and duplicated vertices, mixed windings)."""
    res = 32
    xs = -1 + (torch.arange(6, 27, 4, dtype=torch.float64) + 0.5) * 2 / res
    n = xs.numel()
    gy, gx = torch.meshgrid(xs, xs, indexing="ij")
    Vg = torch.stack([gx, gy, torch.zeros_like(gx)], -1).reshape(-1, 3)
    faces = []
    for a in range(n - 1):
        for b in range(n - 1):
            i0, i1, i2, i3 = a * n + b, a * n + b + 1, (a + 1) * n + b, (a + 1) * n + b + 1
            faces += [[i0, i1, i3], [i0, i3, i2]] if (a + b) % 2 else [[i0, i1, i2], [i1, i3, i2]]
    F = torch.tensor(faces)
    F[::3] = F[::3].flip(1)                                        # mixed orientation
    Vd = Vg[F.reshape(-1)].clone()                                 # duplicated vertices
    Fd = torch.arange(Vd.shape[0]).reshape(-1, 3)
    p = pixel_centers(res, dtype=torch.float64)
    interior = (p.abs() < xs[-1] - 1e-9).all(-1)
    lo_edge = (p > xs[0] + 1e-9).all(-1)
    interior &= lo_edge
    for dt in (torch.float32, torch.float64):
        fr = rasterize(Vg.to(dt), F, res)
        assert fr.mask[0][interior].all()
        # per-face depth +k then -k: double coverage would change the winner
        zf = torch.arange(Fd.shape[0], dtype=dt).repeat_interleave(3)
        up, dn = Vd.to(dt).clone(), Vd.to(dt).clone()
        up[:, 2], dn[:, 2] = zf, -zf
        a, b = rasterize(up, Fd, res), rasterize(dn, Fd, res)
        assert a.mask[0][interior].all()
        assert torch.equal(a.face_idx, b.face_idx)


# ---------------------------------------------------------------- textures
def _ramp_texture(Ht, Wt):
    r = torch.arange(Ht, dtype=torch.float64)
    c = torch.arange(Wt, dtype=torch.float64)
    u = ((c + 0.5) / Wt)[None, :].expand(Ht, Wt)
    v = (1 - (r + 0.5) / Ht)[:, None].expand(Ht, Wt)
    return torch.stack([u, v, torch.full_like(u, 0.25)], -1)


def test_sample_texture_analytic():
    Ht, Wt = 20, 30
    tex = _ramp_texture(Ht, Wt)
    g = torch.Generator().manual_seed(1)
    uv = torch.rand(1000, 2, generator=g, dtype=torch.float64)
    uv[:, 0] = 0.5 / Wt + uv[:, 0] * (1 - 1 / Wt)                # between texel centres
    uv[:, 1] = 0.5 / Ht + uv[:, 1] * (1 - 1 / Ht)
    out = sample_texture(tex, uv)
    assert torch.allclose(out[:, :2], uv, atol=1e-12) and (out[:, 2] == 0.25).all()
    # v = 0 is the bottom row (the last row), u = 0 the first column; clamped outside
    marked = torch.zeros(Ht, Wt, 3)
    marked[-1, 0] = 1.0
    assert torch.allclose(
        sample_texture(marked, torch.tensor([[0.5 / Wt, 0.5 / Ht]])), torch.ones(1, 3)
    )
    assert torch.allclose(sample_texture(marked, torch.tensor([[-3.0, -2.0]])), torch.ones(1, 3))
    assert torch.allclose(sample_texture(tex, torch.tensor([[2.0, 2.0]])),
                          tex[0, -1][None])


def test_render_texture_and_white_background():
    res = 64
    V = torch.tensor([[-0.9, -0.9, 0.0], [0.9, -0.9, 0.0], [0.9, 0.9, 0.0], [-0.9, 0.9, 0.0]])
    F = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uvs = (V[:, :2] + 1) / 2
    tex = _ramp_texture(64, 64).float()
    img = render_texture(V, F, uvs, F.clone(), tex, res)[0]
    m = rasterize(V, F, res).mask[0]
    p = pixel_centers(res)
    assert torch.allclose(img[m][:, :2], ((p + 1) / 2)[m], atol=1e-5)
    assert (img[~m] == 1.0).all() and (~m).sum() > 0
    col = render_vertex_colors(V, F, (V + 1) / 2, res)[0]
    assert torch.allclose(col[m][:, :2], ((p + 1) / 2)[m], atol=1e-5) and (col[~m] == 1.0).all()
    sh = render_shaded(V, F, res)[0]
    assert (sh[~m] == 1.0).all() and (sh[m] < 1.0).all()


def test_vertex_normals_area_weighted():
    # vertex 0 shared by a big face in the z=0 plane and a small face in the x=0 plane
    V = torch.tensor([[0, 0, 0], [2, 0, 0], [0, 2, 0], [0, 0.5, 0], [0, 0, 0.5]],
                     dtype=torch.float64)
    F = torch.tensor([[0, 1, 2], [0, 3, 4]])
    n = vertex_normals(V, F)[0]
    # face normals (cross products, |.| = 2 area): (0, 0, 4) and (0.25, 0, 0)
    exp = torch.nn.functional.normalize(torch.tensor([0.25, 0, 4.0], dtype=torch.float64), dim=0)
    assert torch.allclose(n[0], exp, atol=1e-12)
    assert torch.allclose(n[1], torch.tensor([0, 0, 1.0], dtype=torch.float64))
    assert torch.allclose(n[4], torch.tensor([1.0, 0, 0], dtype=torch.float64))


def test_batched_matches_single():
    v, f = _sphere(3, 0.6)
    vb = torch.stack([v, v * 1.2 + 0.1])
    fb = rasterize(vb, f, 48)
    for k in range(2):
        fs = rasterize(vb[k], f, 48)
        assert torch.equal(fb.face_idx[k], fs.face_idx[0]) and torch.equal(fb.bary[k], fs.bary[0])


def test_degenerate_inputs():
    res = 16
    V = torch.tensor([[-0.9, -0.9, 0.0], [0.9, -0.9, 0.0], [0.0, 0.9, 0.0],
                      [float("nan"), 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5],
                      [40.0, -40.0, 0.1]])
    empty = rasterize(V, torch.zeros(0, 3, dtype=torch.long), res)
    assert not empty.mask.any() and (empty.face_idx == -1).all()
    F = torch.tensor([[0, 3, 1], [4, 5, 2], [0, 1, 6], [0, 1, 2]])  # NaN, zero-area, big, ok
    fr = rasterize(V, F, res)
    ref = rasterize_reference(V, F, res)
    assert torch.equal(fr.face_idx, ref.face_idx)
    assert set(fr.face_idx.unique().tolist()) == {-1, 2, 3}
    with pytest.raises(ValueError, match="rasterizer.py"):
        rasterize(V, torch.tensor([[0, 1, 9]]), res)
    with pytest.raises(ValueError, match="rasterizer.py"):
        rasterize(V, F.int(), res)


# ---------------------------------------------------------------- images
def test_image_helpers(tmp_path):
    from PIL import Image
    img = torch.rand(17, 23, 3)
    p = save_png(tmp_path / "a" / "x.png", img)
    assert np.array_equal(np.asarray(Image.open(p)), to_uint8(img))
    assert sorted(os.listdir(p.parent)) == ["x.png"]
    g = make_grid([img, img * 0, img], ncols=2, pad=3)
    assert g.shape == (3 + 2 * 20, 3 + 2 * 26, 3)
    assert np.allclose(g[23:40, 3:26], img.numpy()) and (g[23:40, 29:52] == 1.0).all()
    lab = add_label(np.zeros((40, 60, 3)), "k=3")
    assert lab[:8, :10].max() > 0 and (lab[30:] == 0).all()
    frames = [np.full((31, 33, 3), k / 6.0) for k in range(6)]
    out = save_video(tmp_path / "v.mp4", frames, fps=6)
    import imageio.v3 as iio
    vid = iio.imread(out)
    assert vid.shape[0] == 6 and vid.shape[1:3] == (32, 34)
    assert abs(int(vid[3, 10, 10, 0]) - round(255 * 3 / 6)) < 6


# ---------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_parity():
    v, f = _sphere(5, 0.7)
    v = v + 0.01 * torch.sin(7 * v)
    cpu = rasterize(v, f, 256)
    gpu = rasterize(v.cuda(), f.cuda(), 256)
    assert (cpu.mask != gpu.mask.cpu()).sum() <= 2
    assert (cpu.face_idx == gpu.face_idx.cpu()).float().mean() > 0.999
    same = cpu.face_idx == gpu.face_idx.cpu()
    assert torch.allclose(cpu.bary[same], gpu.bary.cpu()[same], atol=1e-5)
    img_c = render_normals(v, f, 64)
    img_g = render_normals(v.cuda(), f.cuda(), 64).cpu()
    assert (img_c - img_g).abs().max() < 1e-3

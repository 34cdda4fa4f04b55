"""The model's query API (lib/model/query.py): codes, occupancy at deformed points, surface
attributes. Truths: the embeddings themselves; the deformer's forward map (a found canonical
point maps back onto its deformed point); a known rigid transform (a global head rotation
moves the posed points and their normals rigidly and changes neither the canonical points
nor the occupancy; the colours follow the texture condition, the full pose as the original's).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_flame_params
from test_checkpoint_trust import _model

IDS = ["001_01", "002_01", "003_01"]


@pytest.fixture(scope="module")
def fine_model(head_model_path):
    torch.manual_seed(0)
    model = _model(head_model_path, IDS, seed=3).eval()
    model.hparams.stage = "fine"  # surface() is for stage-2 models; fresh networks suffice here
    return model


def _posed_points(model, params: torch.Tensor, n: int = 150, seed: int = 0) -> torch.Tensor:
    """[1, n, 3] points on and near the posed head-model surface of params [1, P]."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        verts = model.flame_server(params).verts[0]
    pick = torch.randperm(verts.shape[0], generator=gen)[:n]
    return (verts[pick] + 0.003 * torch.randn(n, 3, generator=gen))[None]


def _rigid(a: np.ndarray, b: np.ndarray):
    """Least-squares rotation R and translation t with b ~ a @ R.T + t (Kabsch, float64)."""
    ca, cb = a.mean(0), b.mean(0)
    u, _, vt = np.linalg.svd((a - ca).T @ (b - cb))
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return r, cb - ca @ r.T


def test_codes_are_the_embedding_rows(fine_model):
    rows = fine_model.subject_rows(["003_01", "001_01"])
    assert rows.tolist() == [2, 0]
    codes = fine_model.codes(rows)
    assert torch.equal(codes["z_shape"], fine_model.z_shapes.weight[[2, 0]])
    assert torch.equal(codes["z_detail"], fine_model.z_details.weight[[2, 0]])
    assert torch.equal(codes["z_color"], fine_model.z_colors.weight[[2, 0]])
    with pytest.raises(ValueError, match="out of range: the model has 3 subjects"):
        fine_model.codes(torch.tensor([3]))
    with pytest.raises(KeyError, match="777_01"):
        fine_model.subject_rows(["777_01"])


def test_occupancy_and_surface_correspondences(fine_model):
    params = torch.from_numpy(random_flame_params(np.random.default_rng(1), jaw=0.15))[None]
    xd = _posed_points(fine_model, params)
    codes = fine_model.codes(fine_model.subject_rows(["002_01"]))
    with torch.no_grad():
        logits = fine_model.occupancy(xd, params, codes)
        out = fine_model.surface(xd, params, codes)
        ref = fine_model.deformed_occupancy(xd, codes["z_shape"], fine_model.flame_server(params),
                                            eval_mode=True)
    assert logits.shape == (1, xd.shape[1])
    torch.testing.assert_close(logits, ref["occ"][..., 0], rtol=1e-5, atol=1e-5)
    valid = out["valid"][0]
    assert valid.float().mean() > 0.9  # points on the head model's surface are found
    # the found canonical points map back onto the queried points
    flame_out = fine_model.flame_server(params)
    with torch.no_grad():
        back = fine_model.deformer.forward_deform(
            out["xc"], {"z_shape": codes["z_shape"], "shape": flame_out.shape}, flame_out)
    assert (back[0, valid] - xd[0, valid]).norm(dim=-1).max() < 1e-3
    normals = out["normal"][0, valid]
    torch.testing.assert_close(normals.norm(dim=-1), torch.ones(len(normals)), atol=1e-4,
                               rtol=0)
    assert torch.all(out["normal"][0, ~valid] == 0) and torch.all(out["color"][0, ~valid] == 0)
    # the surface point kept is the valid root of highest occupancy: never below the max
    with torch.no_grad():
        at_xc = fine_model.canonical_occupancy(out["xc"], codes["z_shape"], flame_out.shape)
    torch.testing.assert_close(at_xc[0, valid, 0], logits[0, valid], rtol=1e-4, atol=1e-4)


def test_a_global_rotation_moves_everything_rigidly(fine_model):
    params = torch.from_numpy(random_flame_params(np.random.default_rng(2), jaw=0.1))[None]
    turned = params.clone()
    turned[0, 4:7] = torch.tensor([0.2, -0.5, 0.1])  # the global rotation (axis-angle)
    with torch.no_grad():
        v0 = fine_model.flame_server(params).verts[0].double().numpy()
        v1 = fine_model.flame_server(turned).verts[0].double().numpy()
    r, t = _rigid(v0, v1)
    assert np.abs(v0 @ r.T + t - v1).max() < 1e-5  # the head model moved rigidly
    xd = _posed_points(fine_model, params, seed=1)
    xd_t = torch.from_numpy(xd[0].double().numpy() @ r.T + t).float()[None]
    codes = fine_model.codes(torch.tensor([1]))
    with torch.no_grad():
        a, b = fine_model.surface(xd, params, codes), fine_model.surface(xd_t, turned, codes)
        occ_a = fine_model.occupancy(xd, params, codes)
        occ_b = fine_model.occupancy(xd_t, turned, codes)
    both = a["valid"][0] & b["valid"][0]
    assert both.float().mean() > 0.9
    torch.testing.assert_close(b["xc"][0, both], a["xc"][0, both], rtol=0, atol=2e-4)
    torch.testing.assert_close(occ_b[0, both], occ_a[0, both], rtol=1e-3, atol=1e-3)
    rot = torch.from_numpy(r).float()
    torch.testing.assert_close(b["normal"][0, both], a["normal"][0, both] @ rot.T, rtol=0,
                               atol=2e-3)
    # the colours at the same canonical points are the texture network's on the turned pose
    from lib.model.query import pose_exp_condition, query_fine

    with torch.no_grad():
        flame_b = fine_model.flame_server(turned)
        _, rgb = query_fine(fine_model, a["xc"], codes["z_shape"], flame_b.shape,
                            codes["z_detail"], codes["z_color"], pose_exp_condition(flame_b))
    torch.testing.assert_close(b["color"][0, both], rgb[0, both], rtol=0, atol=2e-3)


def test_skin_normals_is_the_inverse_transpose_of_the_target_blend():
    """n_d = normalize((sum_j w_j tfs[j][:3, :3])^-T n_c), against a float64 numpy computation,
    with general (sheared, scaled) linear parts where the inverse-transpose differs from the
    blend itself."""
    from lib.model.query import blend_transforms, skin_normals

    rng = np.random.default_rng(4)
    M, J = 50, 5
    w = rng.random((1, M, J))
    w /= w.sum(-1, keepdims=True)
    tfs = np.tile(np.eye(4), (1, J, 1, 1))
    tfs[0, :, :3, :] = rng.normal(size=(J, 3, 4)) * 0.4 + np.hstack([np.eye(3), np.zeros((3, 1))])
    n_c = rng.normal(size=(1, M, 3))
    ref, plain = [], []
    for m in range(M):
        A = sum(w[0, m, j] * tfs[0, j, :3, :3] for j in range(J))
        v = np.linalg.inv(A).T @ n_c[0, m]
        ref.append(v / np.linalg.norm(v))
        u = A @ n_c[0, m]
        plain.append(u / np.linalg.norm(u))
    ref, plain = np.stack(ref), np.stack(plain)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    got = skin_normals(blend_transforms(t(w), t(tfs)), t(n_c))[0].numpy()
    assert np.abs(got - ref).max() < 1e-12
    assert np.abs(ref - plain).max() > 0.1  # the inverse-transpose matters here


def test_surface_normals_skin_with_the_neutral_point_weights_and_target_transforms(fine_model):
    """surface()'s normal, recomputed by hand: weights of the LBS network at the shape-neutral
    point x_c + disp(x_c, betas), the normal network's canonical normal, then the inverse-
    transpose of the blended TARGET transforms (float64); the canonical transforms play no part."""
    from lib.model.query import pose_exp_condition, query_fine

    params = torch.from_numpy(random_flame_params(np.random.default_rng(5), jaw=0.2))[None]
    xd = _posed_points(fine_model, params, n=60, seed=2)
    codes = fine_model.codes(torch.tensor([0]))
    out_layer = fine_model.disp_net.layers[-1]
    saved = out_layer.weight.detach().clone()
    try:
        with torch.no_grad():  # a non-trivial warp (the fresh network's output is exactly 0)
            out_layer.weight.copy_(
                torch.randn(saved.shape, generator=torch.Generator().manual_seed(0)) * 0.01
            )
            out = fine_model.surface(xd, params, codes)
            flame_out = fine_model.flame_server(params)
            xc, valid = out["xc"], out["valid"][0]
            xn = xc + fine_model.disp_net(xc, flame_out.shape)
            assert (xn - xc)[0, valid].norm(dim=-1).mean() > 1e-3
            w = fine_model.deformer.lbs_net.lbs(xn)[0][0].double()                     # [N, J]
            normal_c, _ = query_fine(fine_model, xc, codes["z_shape"], flame_out.shape,
                                     codes["z_detail"], codes["z_color"],
                                     pose_exp_condition(flame_out))
    finally:
        with torch.no_grad():
            out_layer.weight.copy_(saved)
    A = torch.einsum("nj,jrc->nrc", w, flame_out.tfs[0, :, :3, :3].double())
    n = (torch.linalg.inv(A).transpose(-1, -2) @ normal_c[0].double()[..., None])[..., 0]
    n = n / n.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out["normal"][0, valid].double(), n[valid], rtol=0, atol=1e-5)


def test_surface_needs_a_stage2_model_and_batched_inputs(head_model_path, fine_model):
    coarse = _model(head_model_path, IDS)
    params = torch.from_numpy(random_flame_params(np.random.default_rng(3)))[None]
    xd = _posed_points(coarse, params, n=10)
    codes = coarse.codes(torch.tensor([0]))
    with pytest.raises(ValueError, match="needs a stage-2"):
        coarse.surface(xd, params, codes)
    with pytest.raises(ValueError, match=r"xd must be \[B, N, 3\]"):
        fine_model.occupancy(xd[0], params, codes)
    with pytest.raises(ValueError, match=r"codes lack \['z_detail', 'z_color'\]"):
        fine_model.surface(xd, params, {"z_shape": codes["z_shape"]})
    with pytest.raises(ValueError, match="params must be"):
        fine_model.occupancy(xd, params.expand(2, -1), codes)


def test_render_cache_of_neutral_points_matches_the_shaped_queries(fine_model):
    """The cache holds shape-neutral points x_n = x_c + disp(x_c, betas): rendering them gives,
    per pixel, the normal and colour that the shaped-point path (query_fine at x_c, weights of
    NeutralLBS at x_c) gives; and the surface samples (`extra`, shaped) agree likewise."""
    from lib.model.cache_render import render_cache
    from lib.model.query import blend_transforms, pose_exp_condition, query_fine, skin_normals

    params = torch.from_numpy(random_flame_params(np.random.default_rng(6), jaw=0.1))[None]
    server = fine_model.flame_server
    flame_out = server(params)
    flame_view = server(server.view_params(params, 2))
    codes = fine_model.codes(torch.tensor([1]))
    R = 6
    g = torch.Generator().manual_seed(4)
    xc = (torch.rand(1, R * R, 3, generator=g) - 0.5) * 0.6       # shaped canonical points
    extra = (torch.rand(1, 7, 3, generator=g) - 0.5) * 0.6
    mask = torch.rand(1, R, R, generator=g) > 0.3
    out_layer = fine_model.disp_net.layers[-1]
    saved = out_layer.weight.detach().clone()
    try:
        with torch.no_grad():  # a non-trivial warp
            out_layer.weight.copy_(torch.randn(saved.shape, generator=g) * 0.01)
            xn = xc + fine_model.disp_net(xc, flame_out.shape)
            assert (xn - xc).norm(dim=-1).mean() > 1e-3
            got = render_cache(
                fine_model, xn.reshape(1, R, R, 3), mask, flame_out, flame_view, codes, extra=extra
            )
            pts = torch.cat([xc, extra], dim=1)
            n_c, rgb = query_fine(fine_model, pts, codes["z_shape"], flame_out.shape,
                                  codes["z_detail"], codes["z_color"],
                                  pose_exp_condition(flame_out))
            w = fine_model.deformer.lbs_net(pts, flame_out.shape)[0]
    finally:
        with torch.no_grad():
            out_layer.weight.copy_(saved)
    L = R * R
    n_d = skin_normals(blend_transforms(w[:, :L], flame_view.tfs), n_c[:, :L])
    m = mask.reshape(-1)
    img_n = got["normal"][0].permute(1, 2, 0).reshape(-1, 3)
    img_c = got["rgb"][0].permute(1, 2, 0).reshape(-1, 3)
    torch.testing.assert_close(img_n[m], n_d[0, m], rtol=0, atol=1e-5)
    torch.testing.assert_close(img_c[m], rgb[0, :L][m], rtol=0, atol=1e-5)
    assert (img_c[~m] == 1.0).all()
    torch.testing.assert_close(got["extra_rgb"], rgb[:, L:], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["extra_w"], w[:, L:], rtol=0, atol=1e-6)

"""The training objectives against hand computations of the original's definitions: the
FLAME prior's support, bone bootstrapping, the stage-1 terms of a tiny model, the stage-2
photo / 3D / adversarial losses and the objective defaults of the configuration."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_flame_params
from pytorch_lightning.utilities.parsing import AttributeDict
from torch import nn

from lib.model import adversarial, fine_losses, losses

PARENTS = [-1, 0, 1, 1, 1]  # FLAME: root, neck, jaw, two eyes


# ---------------------------------------------------------------------------- FLAME prior
def _prior_inputs(xc):
    """Three FLAME vertices, two joints, 2 pose / 2 expression components; fields at xc."""
    g = torch.Generator().manual_seed(0)
    verts = torch.tensor([[[0.0, 0, 0], [2, 0, 0], [0, 2, 0]]])
    M = xc.shape[1]
    fields = dict(w=torch.rand(1, M, 2, generator=g), pose_dirs=torch.rand(1, M, 2, 3, generator=g),
                  expr_dirs=torch.rand(1, M, 3, 2, generator=g))
    flame = dict(flame_w=torch.rand(3, 2, generator=g),
                 flame_pose_dirs=torch.rand(3, 2, 3, generator=g),
                 flame_expr_dirs=torch.rand(3, 3, 2, generator=g))
    return verts, fields, flame


def test_prior_support_is_squared_distance_below_0_1():
    # nearest-vertex distances: 0.3 (in), 0.35 (out), sqrt(0.1) -/+ 1e-4 (in / out), and a
    # point at 0.1 that the mask excludes
    r = math.sqrt(0.1)
    xc = torch.tensor([[[0.3, 0, 0], [2, 0.35, 0], [0, 2 - r + 1e-4, 0], [0, -r - 1e-4, 0],
                        [0.1, 0, 0]]])
    mask = torch.tensor([[True, True, True, True, False]])
    verts, fields, flame = _prior_inputs(xc)
    out = losses.flame_prior_loss(xc, mask, fields["w"], fields["pose_dirs"],
                                  fields["expr_dirs"], verts, **flame)
    assert losses.PRIOR_RADIUS == pytest.approx(0.316227766, abs=1e-9)
    assert out["n"].item() == 2  # points 0 and 2, nearest vertices 0 and 2
    rows, nearest = [0, 2], [0, 2]
    w = sum(((fields["w"][0, i] - flame["flame_w"][v]) ** 2).sum() for i, v in zip(rows, nearest))
    p = sum(((fields["pose_dirs"][0, i] - flame["flame_pose_dirs"][v]) ** 2).sum()
            for i, v in zip(rows, nearest))
    e = sum(((fields["expr_dirs"][0, i] - flame["flame_expr_dirs"][v]) ** 2).sum()
            for i, v in zip(rows, nearest))
    torch.testing.assert_close(out["w"], w / 2)
    torch.testing.assert_close(out["pose"], p / 2)
    torch.testing.assert_close(out["exp"], e / 2)


def test_prior_with_no_point_in_support_is_zero():
    xc = torch.tensor([[[1.0, 1.0, 0.0]]])
    verts, fields, flame = _prior_inputs(xc)
    out = losses.flame_prior_loss(xc, torch.ones(1, 1, dtype=torch.bool), fields["w"],
                                  fields["pose_dirs"], fields["expr_dirs"], verts, **flame)
    assert out["w"].item() == out["pose"].item() == out["exp"].item() == 0.0


# ---------------------------------------------------------------------------- bones
def _joints(B=1):
    j = torch.tensor([[0.0, -0.5, 0.0], [0.0, 0.0, -0.1], [0.0, -0.2, 0.3], [0.3, 0.3, 0.3],
                      [-0.3, 0.3, 0.3]])
    return j[None].expand(B, -1, -1)


def test_bone_points_lie_on_the_bones_with_jitter_0_1():
    B = 4000
    joints = _joints(B)
    pts = losses.bone_points(joints, PARENTS, generator=torch.Generator().manual_seed(1))
    assert pts.shape == (B, 4 * 5, 3)  # 4 bones (the root has none), 5 points each
    bones = [(0, 1), (1, 2), (1, 3), (1, 4)]
    for k, (p, j) in enumerate(bones):
        a, b = joints[0, p].double(), joints[0, j].double()
        x = pts[:, 5 * k:5 * k + 5].double()                          # [B, 5, 3]
        d = b - a
        s = ((x - a) @ d) / (d @ d)                                     # fraction along the bone
        off_line = (x - a - s[..., None] * d).norm(dim=-1)
        assert off_line.max() < 1e-5 and s.min() >= -1e-6 and s.max() <= 1 + 1e-6
        resid = s - torch.linspace(0, 1, 5, dtype=torch.float64)      # the jitter
        mid = resid[:, 2]  # at 0.5 the clamp (5 sigma away) never acts
        assert abs(mid.mean().item()) < 0.005 and abs(mid.std().item() - 0.1) < 0.005
        # the ends are clamped: half of the first points sit exactly on the parent joint
        assert abs((s[:, 0] < 1e-6).double().mean().item() - 0.5) < 0.03
        assert abs((s[:, 4] > 1 - 1e-6).double().mean().item() - 0.5) < 0.03
    # fresh noise per batch item and per bone
    assert not torch.allclose(pts[0], pts[1])


def test_joint_weight_targets_are_the_nine_of_the_original():
    joints = _joints(2)
    pts, target = losses.joint_weight_targets(joints, PARENTS)
    # every joint on itself, then every child joint again on its parent
    idx, hot = [0, 1, 2, 3, 4, 1, 2, 3, 4], [0, 1, 2, 3, 4, 0, 1, 1, 1]
    assert torch.equal(pts, joints[:, idx])
    assert torch.equal(target, torch.eye(5)[hot])


# ---------------------------------------------------------------------------- stage 1 terms
def _coarse_model(flame, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from test_train import ROOT, TINY

    from lib.model.ganhead import GANHead

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config",
                      overrides=[*TINY, f"datamodule.flame_model={flame}"])
    return GANHead(n_subjects=2, output_dir=str(tmp_path),
                   **OmegaConf.to_container(cfg.model, resolve=True))


def test_stage1_terms_of_a_tiny_model(head_model_path, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = _coarse_model(head_model_path, tmp_path)
    assert model.flame_server.flame.parents == PARENTS
    # the codes start at zero, as the original's
    for emb in (model.z_shapes, model.z_details, model.z_colors):
        assert torch.count_nonzero(emb.weight) == 0
    with torch.no_grad():
        model.z_shapes.weight.normal_(0.0, 0.3)
    params = torch.from_numpy(np.stack([random_flame_params(np.random.default_rng(i), 0.1)
                                        for i in range(2)]))
    flame_out = model.flame_server(params)
    pts_d = flame_out.verts[:, ::20] + 0.02 * torch.randn(2, flame_out.verts[:, ::20].shape[1], 3)
    batch = {"index": torch.tensor([0, 1]), "params": params, "pts_d": pts_d,
             "occ_gt": (torch.rand(2, pts_d.shape[1], 1) > 0.5).float()}
    # bone points replaced by the joints themselves, to check where occupancy is evaluated
    monkeypatch.setattr(losses, "bone_points", lambda joints, parents: joints)
    terms = model.stage.losses(batch)
    assert {"occ", "prior_w", "prior_pose", "prior_exp", "disp", "reg_shape", "reg_lbs",
            "bone_occ", "bone_w"} <= set(terms)
    z = model.z_shapes.weight.detach()
    torch.testing.assert_close(terms["reg_shape"], 1e-3 * (z ** 2).mean())
    torch.testing.assert_close(terms["reg_lbs"], 1e-3 * (z ** 2).mean())  # twice in total

    # bootstrapping on the shape-NEUTRAL joints (shape 0), evaluated there directly
    neutral = model.flame_server.canonical(torch.zeros(1, 100)).joints_c.expand(2, -1, -1)
    shaped = flame_out.joints_c
    assert (neutral - shaped).abs().max() > 1e-3  # the test can tell them apart
    with torch.no_grad():
        occ = model.occupancy_fn(model.generator(z))(neutral)
        bone_occ = F.binary_cross_entropy_with_logits(occ, torch.ones_like(occ))
        w = model.deformer.lbs_net.lbs(neutral[:, [0, 1, 2, 3, 4, 1, 2, 3, 4]])[0]
        target = torch.eye(5)[[0, 1, 2, 3, 4, 0, 1, 1, 1]]
        bone_w = 10.0 * ((w - target) ** 2).mean()
    torch.testing.assert_close(terms["bone_occ"].detach(), bone_occ)
    torch.testing.assert_close(terms["bone_w"].detach(), bone_w)
    loss = sum(v for k, v in terms.items() if k != "valid_frac")
    loss.backward()
    assert model.z_shapes.weight.grad.abs().sum() > 0


def test_stage1_selected_correspondence_is_the_max_occupancy_init(head_model_path, tmp_path):
    torch.manual_seed(0)
    model = _coarse_model(head_model_path, tmp_path)
    params = torch.from_numpy(random_flame_params(np.random.default_rng(5), 0.1))[None]
    flame_out = model.flame_server(params)
    pts_d = flame_out.verts[:, ::40]
    z = model.z_shapes.weight[:1]
    with torch.no_grad():
        out = model.deformed_occupancy(pts_d, z, flame_out)
        xc = out["xc"]
        B, N, I, _ = xc.shape
        safe = torch.where(out["valid"][..., None], xc, torch.zeros_like(xc))
        occ = model.canonical_occupancy(safe.reshape(1, N * I, 3), z, flame_out.shape)
        occ = occ.reshape(1, N, I).masked_fill(~out["valid"], -1000.0)
    found = out["valid"].any(-1)
    assert found.float().mean() > 0.5
    torch.testing.assert_close(out["occ"][..., 0][found], occ.amax(-1)[found], rtol=1e-4,
                               atol=1e-4)
    picked = torch.gather(occ, 2, out["best"][..., None])[..., 0]
    torch.testing.assert_close(picked[found], occ.amax(-1)[found], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["xc_best"][found],
                               torch.gather(xc, 2, out["best"][..., None, None]
                                            .expand(1, N, 1, 3))[:, :, 0][found])


# ---------------------------------------------------------------------------- stage 2
def test_photo_loss_is_the_original_masked_mse_over_the_whole_image():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    real[0, :, :2] = 1.0        # white background rows
    real[1, 1, 3, 3] = 1.0      # a single white channel is left out on its own
    fake = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    ref = 0.0
    for idx in np.ndindex(*real.shape):
        if real[idx] != 1.0:
            ref += float(fake[idx] - real[idx]) ** 2
    ref /= real.numel()  # the mean runs over every entry, white ones included
    torch.testing.assert_close(fine_losses.photo_loss(fake, real), torch.tensor(ref))


def test_subsampled_photo_loss_is_unbiased_over_the_pool():
    torch.manual_seed(0)
    real = torch.rand(2, 3, 6, 6) * 2 - 1
    fake = torch.rand(2, 3, 6, 6) * 2 - 1
    pool = torch.rand(2, 6, 6) > 0.4
    full = fine_losses.photo_loss(fake, real, pool.float())  # every pool pixel once
    draws = []
    for _ in range(3000):
        kept = fine_losses.subsample_mask(pool, 5)
        n_pool, n_kept = pool.flatten(1).sum(1), kept.flatten(1).sum(1)
        weight = kept.float() * (n_pool / n_kept)[:, None, None]
        draws.append(fine_losses.photo_loss(fake, real, weight))
    assert abs(torch.stack(draws).mean().item() / full.item() - 1) < 0.03


def test_surface_losses():
    rgb = torch.tensor([[[0.1, 0.2, 0.3], [0.5, -0.5, 0.0], [9.0, 9.0, 9.0]]])
    gt = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    valid = torch.tensor([[True, True, False]])
    # summed over the channels: (0.01 + 0.04 + 0.09 + 0.25 + 0.25) / 2 samples
    torch.testing.assert_close(fine_losses.surface_color_loss(rgb, gt, valid),
                               torch.tensor(0.64 / 2))
    n = F.normalize(torch.tensor([[[1.0, 0, 0], [1.0, 1.0, 0], [0, 0, 1.0]]]), dim=-1)
    n_gt = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]]])
    torch.testing.assert_close(fine_losses.surface_normal_loss(n, n_gt, valid),
                               torch.tensor((0.0 + 1 - math.sqrt(0.5)) / 2))


class LinearCritic(nn.Module):
    """D(x) = <a, x>: the R1 gradient of every image is a, so R1 = |a|^2."""

    def __init__(self, n: int):
        super().__init__()
        self.a = nn.Parameter(torch.linspace(-0.2, 0.3, n))

    def forward(self, x):
        return (x.flatten(1) @ self.a)[:, None]


def _gan_model(lambda_gan=2.0, lambda_gan_color=0.5, shared=False):
    hp = AttributeDict(lambda_gan=lambda_gan, lambda_gan_color=lambda_gan_color,
                       lambda_grad=10.0, d_reg_every=16, gan_shared_mask=shared)
    n = 3 * 4 * 4
    return AttributeDict(hparams=hp, disc_normal=LinearCritic(n), disc_color=LinearCritic(n))


def _gan_out():
    g = torch.Generator().manual_seed(3)
    img = lambda: torch.rand(2, 3, 4, 4, generator=g) * 2 - 1  # noqa: E731
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1:3, 1:3] = True
    return {"real_normal": img(), "fake_normal": img(), "real_rgb": img(), "fake_rgb": img(),
            "mask": mask}


def test_generator_terms_weigh_each_critic_with_its_lambda():
    model, out = _gan_model(), _gan_out()
    terms = adversarial.generator_gan_terms(model, out)
    for name, key, lam, d in (("gan_normal", "normal", 2.0, model.disc_normal),
                              ("gan_color", "rgb", 0.5, model.disc_color)):
        ref = lam * F.softplus(-d(out[f"fake_{key}"])).mean()
        torch.testing.assert_close(terms[name], ref)
    # a critic of weight 0 adds nothing
    assert set(adversarial.generator_gan_terms(_gan_model(lambda_gan_color=0.0), out)) == {
        "gan_normal"}


def test_critic_loss_and_lazy_r1_by_hand():
    model, out = _gan_model(), _gan_out()
    ref_d, ref_r1 = 0.0, 0.0
    for key, lam, d in (("normal", 2.0, model.disc_normal), ("rgb", 0.5, model.disc_color)):
        real, fake = out[f"real_{key}"], out[f"fake_{key}"]  # as they are (the original)
        logistic = F.softplus(d(fake)).mean() + F.softplus(-d(real)).mean()
        r1 = 10.0 / 2 * 16 * (d.a ** 2).sum()
        ref_d, ref_r1 = ref_d + lam * logistic, ref_r1 + lam * r1
    loss, r1 = adversarial.discriminator_loss(model, out, step=32)
    torch.testing.assert_close(r1, ref_r1)
    torch.testing.assert_close(loss, ref_d + ref_r1)
    loss, r1 = adversarial.discriminator_loss(model, out, step=5)  # not a regularization step
    assert r1 is None
    torch.testing.assert_close(loss, ref_d)
    # opt-in: both images composited on white with the shared mask
    shared = _gan_model(shared=True)
    real, fake = adversarial.gan_images(shared, out, "rgb")
    m = out["mask"][:, None].expand_as(real)
    assert torch.equal(real[m], out["real_rgb"][m]) and (real[~m] == 1).all()
    assert torch.equal(fake[m], out["fake_rgb"][m]) and (fake[~m] == 1).all()


# ---------------------------------------------------------------------------- defaults
def test_objective_defaults_are_the_originals():
    from hydra import compose, initialize_config_dir
    from test_train import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        base = compose(config_name="config").model
        fine = compose(config_name="config", overrides=["+experiments=fine"]).model
    assert base.prior_radius ** 2 == pytest.approx(0.1, rel=1e-12)
    assert (base.lambda_prior_exp, base.lambda_prior_pose, base.lambda_prior_w) == (100, 100, 0.2)
    assert (base.lambda_bone_occ, base.lambda_bone_w, base.lambda_disp) == (1, 10, 10)
    assert (base.lambda_reg, base.lambda_reg_color, base.lambda_color) == (1e-3, 1e-3, 1)
    assert (base.lambda_gan, base.lambda_gan_color, base.optim.lr_disc) == (0, 0, 1e-3)
    assert (fine.lambda_gan, fine.lambda_gan_color, fine.optim.lr_disc) == (1, 1, 2e-3)
    assert (fine.lambda_grad, fine.d_reg_every, fine.optim.lr) == (10, 16, 2e-3)
    assert not (fine.use_gan or fine.use_gan_color or fine.gan_shared_mask)
    assert fine.photo_pixels is None and fine.optim.lr_latent is None
    assert base.nepochs_pretrain == 1 and base.gradient_clip_val == 0.1

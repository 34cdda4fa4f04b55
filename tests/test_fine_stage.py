"""Stage 2: the precompute cache of an analytic head, the GAN path with R1, and end to end
through the real entry points (train.py stage 1 -> precompute.py -> train.py stage 2):
only the allowed parameters change, the photo losses go down, pictures are written."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_flame_params
from test_train import ROOT, TINY, read_metric
from torch import nn

from lib.model.checkpoint import read_project_checkpoint

# test_train's tiny network sizes, without its stage-1 experiment (one experiment per run)
TINY_NETS = [o for o in TINY if not o.startswith("+experiments")]
RES = 32


# ---------------------------------------------------------------------------- analytic cache
class SphereHead(nn.Module):
    """Just what the cache writer reads from a GANHead: a sphere occupancy (radius r, centre
    c) in canonical space, skinning that follows the root bone only (searched by the real
    deformer) and a constant displacement `shift` from the shaped to the shape-neutral space."""

    def __init__(self, flame_path: Path, radius: float, center, shift=(0.0, 0.0, 0.0)):
        super().__init__()
        from lib.flame import FLAMEServer
        from lib.model.deformer import ForwardDeformer

        self.flame_server = FLAMEServer(str(flame_path))
        self.z_shapes = nn.Embedding(1, 4)
        self.register_buffer("bbox_min", torch.full((3,), -1.0))
        self.register_buffer("bbox_max", torch.full((3,), 1.0))
        self.radius, self.center = radius, torch.tensor(center)
        self.shift = torch.tensor(shift)
        self.deformer = ForwardDeformer(self._root_only, n_joints=5)

    def disp_net(self, xc, betas):  # [B, N, 3] -> [B, N, 3]
        return self.shift.to(xc).expand_as(xc)

    @staticmethod
    def _root_only(xc, z):  # [B, N, 3] -> w [B, N, 5], pose dirs [B, N, 36, 3], exp [B, N, 3, 50]
        B, N, _ = xc.shape
        w = torch.zeros(B, N, 5)
        w[..., 0] = 1.0
        return w, torch.zeros(B, N, 36, 3), torch.zeros(B, N, 3, 50)

    def generator(self, z):
        return None

    def codes(self, rows):  # the model's query API (lib/model/query.py), geometry only
        return {"z_shape": self.z_shapes(rows)}

    def canonical_occupancy(self, x, z_shape, shape, volume=None):
        return (self.radius - (x - self.center).norm(dim=-1))[..., None]


@pytest.mark.parametrize("method", ["search", "mesh"])
def test_cache_of_sphere_head_with_root_skinning(head_model_path, method):
    from lib.flame.lbs import batch_rodrigues
    from lib.model.correspondence import scan_correspondences

    r, c, shift = 0.5, np.array([0.1, 0.05, -0.05]), np.array([0.02, -0.01, 0.03])
    model = SphereHead(head_model_path, r, c, shift)
    params = torch.from_numpy(random_flame_params(np.random.default_rng(3), jaw=0.1))
    n_views = 9
    out = scan_correspondences(model, 0, params, n_views=n_views, res=RES, mesh_res=64,
                               method=method)
    cache = out["cache"].numpy()
    assert cache.shape == (n_views, RES, RES, 4) and cache.dtype == np.float32
    j0 = model.flame_server(params[None]).joints_c[0, 0].double().numpy()
    R_fit = batch_rodrigues(params[4:7].double()).numpy()
    px = -1 + (np.arange(RES) + 0.5) * 2 / RES
    X, Y = np.meshgrid(px, -px)  # row i has y = 1 - (i + 0.5) 2 / res
    for k in range(n_views):
        t = 2 * math.pi * k / n_views  # view k: the yaw t after the fitted head rotation
        R = np.array([[math.cos(t), 0, math.sin(t)], [0, 1, 0],
                      [-math.sin(t), 0, math.cos(t)]]) @ R_fit
        ck = R @ (c - j0) + j0
        d2 = (X - ck[0]) ** 2 + (Y - ck[1]) ** 2
        mask = cache[k, ..., 3] > 0.5
        inside, outside = d2 < (r - 0.04) ** 2, d2 > (r + 0.04) ** 2
        assert mask[inside].all() and not mask[outside].any(), f"view {k}: wrong mask"
        assert (cache[k, ~mask, :3] == 0).all()
        # the visible (largest z) point of the deformed sphere, taken back to canonical space
        # and then to the shape-neutral space by the displacement
        core = d2 < (r - 0.1) ** 2
        xd = np.stack([X, Y, ck[2] + np.sqrt(np.clip(r * r - d2, 0, None))], -1)[core]
        xn_true = (xd - j0) @ R + j0 + shift  # R^T (xd - j0) + j0, row vectors
        err = np.linalg.norm(cache[k, core, :3] - xn_true, axis=-1)
        assert err.max() < 0.02, f"view {k}: canonical points off by {err.max():.3f}"
        radial = np.linalg.norm(cache[k, mask, :3] - shift - c, axis=-1)
        assert np.abs(radial - r).max() < 0.02
    assert (out["n_valid"] <= out["n_hit"]).all() and out["n_valid"].sum() > 0


# ---------------------------------------------------------------------------- in process
def _tiny_model(flame: Path, out: Path, *extra: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lib.model.ganhead import GANHead

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "+experiments=fine_cpu", "datamodule=synthetic", *TINY_NETS,
            f"datamodule.flame_model={flame}", f"datamodule.load_res={RES}", *extra])
    return GANHead(n_subjects=2, output_dir=str(out),
                   **OmegaConf.to_container(cfg.model, resolve=True))


def _batch(model, data: dict, tmp_path: Path) -> dict:
    from lib.dataset.faceverse import read_data_list
    from lib.dataset.fine import ScanImageDataset
    from lib.model.correspondence import scan_correspondences
    from lib.utils.mesh_io import save_npz

    ids = read_data_list(data["data_list"])
    for i, sid in enumerate(ids):
        with np.load(data["processed"] / sid / "occupancy.npz") as occ:
            params = torch.from_numpy(occ["flame_params"])
        res = scan_correspondences(model, i, params, res=RES, mesh_res=32)
        save_npz(tmp_path / "cache" / f"{sid}.npz", cache=res["cache"].numpy(),
                 view_params=res["view_params"].numpy())
    ds = ScanImageDataset(data["processed"], data["data_list"], tmp_path / "cache",
                          load_res=RES, surface_points=200, seed=0)
    return torch.utils.data.default_collate([ds[0], ds[1]])


def test_masked_psnr_matches_definition():
    from lib.model.cache_render import masked_psnr

    g = torch.Generator().manual_seed(0)
    real = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    fake = real.clone()
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, 2:6, 2:6] = True
    mask[1, :, :4] = True
    fake[0] += 0.2                      # 0.1 in [0, 1] everywhere in the mask: 20 dB
    fake[1][:, mask[1]] += 0.02         # 0.01: 40 dB ...
    fake[1][:, ~mask[1]] += 1.0         # ... and what lies outside the mask does not count
    psnr = masked_psnr(fake, real, mask)
    assert psnr.shape == (2,)
    torch.testing.assert_close(psnr, torch.tensor([20.0, 40.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(masked_psnr(fake, real, mask[:, None]), psnr)


def test_subsample_mask_keeps_k_uniformly():
    from lib.model.fine_losses import subsample_mask

    torch.manual_seed(0)
    mask = torch.zeros(2, 10, 10, dtype=torch.bool)
    mask[0, 2:7, 2:7] = True          # 25 pixels
    mask[1, :2, :3] = True            # 6 pixels: fewer than k, all kept
    counts = torch.zeros(2, 10, 10)
    for _ in range(400):
        sub = subsample_mask(mask, 10)
        assert not (sub & ~mask).any()
        assert sub[0].sum() == 10 and torch.equal(sub[1], mask[1])
        counts += sub.float()
    freq = counts[0][mask[0]] / 400    # each of the 25 kept with probability 10 / 25
    assert (freq - 0.4).abs().max() < 0.1, freq
    assert torch.equal(subsample_mask(mask, 1000), mask)


def test_stage_objects_are_not_part_of_the_checkpoint(head_model_path, tmp_path):
    import copy

    from lib.model.coarse_stage import CoarseStage
    from lib.model.fine_stage import FineStage

    fine = _tiny_model(head_model_path, tmp_path)
    coarse = _tiny_model(head_model_path, tmp_path, "model.stage=coarse")
    assert type(fine.stage) is FineStage and type(coarse.stage) is CoarseStage
    assert fine.stage.model is fine and coarse.stage.model is coarse
    # the stage is no child module: the same state_dict keys in both stages, none under it
    assert "stage" not in dict(fine.named_children())
    assert set(fine.state_dict()) == set(coarse.state_dict())
    assert not [k for k in fine.state_dict() if k.startswith("stage.")]
    # only the stage's modules train (the stage-1 geometry prefixes, the stage-2 ones)
    for model, prefixes in ((coarse, {"z_shapes", "generator", "occ_network", "deformer",
                                      "disp_net"}), (fine, {n.rstrip(".") for n in ALLOWED})):
        assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == \
            prefixes
    # a copy's stage drives the copy, not the original
    clone = copy.deepcopy(fine)
    assert clone.stage.model is clone and clone.stage is not fine.stage
    with pytest.raises(ValueError, match="stage='middle'"):
        _tiny_model(head_model_path, tmp_path, "model.stage=middle")


def test_gan_path_forward_backward_with_r1(tiny_fine_dataset, tmp_path):
    from lib.model import adversarial

    torch.manual_seed(0)
    model = _tiny_model(tiny_fine_dataset["flame"], tmp_path, "model.use_gan=true",
                        "model.use_gan_color=true", "model.discriminator.channel_mul=8",
                        "model.discriminator.channel_max=16")
    assert [d.img_res for d in model.disc_modules()] == [RES, RES]
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"z_details", "z_colors", "norm_network", "tex_network", "disc_normal",
                         "disc_color"}
    main, disc = model.configure_optimizers()
    # the original's critic optimizer: Adam at lr_dis (2e-3 in fine), betas (0, 0.99)
    assert disc.param_groups[0]["betas"] == (0.0, 0.99) and disc.param_groups[0]["lr"] == 2e-3
    assert main.param_groups[0]["betas"] == (0.9, 0.999)
    batch = _batch(model, tiny_fine_dataset, tmp_path)
    terms, out = model.stage.render_and_losses(batch)
    assert out["fake_normal"].shape == (2, 3, RES, RES) and out["mask"].any()
    # outside the cache mask the rendered images are white
    assert (out["fake_rgb"].permute(0, 2, 3, 1)[~batch["cache_mask"]] == 1).all()
    g = adversarial.generator_gan_terms(model, out)
    assert set(g) == {"gan_normal", "gan_color"}
    sum(g.values()).backward()
    grad = model.tex_network.layers[0].parametrizations.weight.original1.grad
    assert grad is not None and grad.abs().sum() > 0  # the G loss reaches the texture network
    model.zero_grad(set_to_none=True)
    d, r1 = adversarial.discriminator_loss(model, out, step=1)
    assert r1 is None  # lazy: R1 only every d_reg_every steps
    d.backward()
    assert model.tex_network.layers[0].parametrizations.weight.original1.grad is None
    d_grads = [p.grad for dm in model.disc_modules() for p in dm.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in d_grads)
    model.zero_grad(set_to_none=True)
    d0, r1 = adversarial.discriminator_loss(model, out, step=0)
    assert r1.item() > 0
    torch.testing.assert_close(d0 - r1, d.detach(), rtol=1e-5, atol=1e-6)
    d0.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.disc_normal.parameters())


# ---------------------------------------------------------------------------- end to end
def _run(script: str, args: list[str], timeout: int = 300, code: int = 0) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == code, res.stdout[-3000:] + res.stderr[-5000:]
    return res.stdout + res.stderr


def _state(path: Path) -> dict:
    return read_project_checkpoint(path)["state_dict"]


ALLOWED = ("z_details.", "z_colors.", "norm_network.", "tex_network.")


@pytest.mark.slow
def test_precompute_and_stage2_end_to_end(tiny_fine_dataset, tmp_path):
    data = tiny_fine_dataset
    common = ["datamodule=synthetic", *TINY_NETS,
              f"datamodule.processed_dir={data['processed']}",
              f"datamodule.data_list={data['data_list']}",
              f"datamodule.flame_model={data['flame']}",
              f"output_dir_coarse={tmp_path / 'coarse'}"]
    fine = ["+experiments=fine_cpu", f"datamodule.load_res={RES}", "precompute.mesh_res=32",
            "datamodule.surface_points=200", "model.validation.n_pictures=1"]
    # stage 1: one step is enough (the geometric init already is a closed surface)
    _run("train.py", [*common, "+experiments=cpu", f"output_dir={tmp_path / 'coarse'}",
                      "trainer.max_epochs=1", "datamodule.repeat=1"])
    coarse = tmp_path / "coarse" / "checkpoints" / "last.ckpt"

    log = _run("precompute.py", [*common, *fine])
    cache_dir = tmp_path / "coarse" / f"cache_{RES}"
    files = sorted(cache_dir.glob("*.npz"))
    assert [f.stem for f in files] == ["001_01", "002_01"], log
    with np.load(files[0]) as z:
        assert z["cache"].shape == (9, RES, RES, 4) and z["view_params"].shape == (9, 169)
        assert 0.05 < (z["cache"][..., 3] > 0.5).mean() < 0.9
    assert "2 written" in log
    assert "0 written (0 of them stale), 2 already complete" in _run("precompute.py",
                                                                     [*common, *fine])
    with np.load(files[0]) as z:
        assert json.loads(str(z["source"]))["checkpoint"] == str(coarse)

    # caches made by another stage-1 model: precompute recomputes them (saying so), and stage 2
    # refuses to start from a checkpoint they were not made from
    other = read_project_checkpoint(coarse)
    other["state_dict"]["z_shapes.weight"] += 0.05
    torch.save(other, tmp_path / "other.ckpt")
    log = _run("precompute.py", [*common, *fine, f"ckpt={tmp_path / 'other.ckpt'}"])
    assert "2 written (2 of them stale)" in log and "made by another stage-1 model" in log
    log = _run("train.py", [*common, *fine, f"output_dir={tmp_path / 'refused'}",
                            f"starting_path={coarse}"], code=1)
    assert "train.py: error:" in log and "2 stale stage-2 cache file(s)" in log
    assert "2 written (2 of them stale)" in _run("precompute.py", [*common, *fine])

    # stage 2 without GAN: photo losses go down, only the allowed tensors change
    out = tmp_path / "fine"
    _run("train.py", [*common, *fine, f"output_dir={out}", f"starting_path={coarse}",
                      "datamodule.repeat=4", "trainer.max_epochs=8",
                      "trainer.check_val_every_n_epoch=8"])
    for key in ("train/normal", "train/rgb"):  # one random view per item: noisy, so averages
        vals = [v for _, v in read_metric(out, key)]
        assert len(vals) == 32, key
        assert np.mean(vals[-8:]) < 0.8 * np.mean(vals[:8]), f"{key} did not decrease: {vals}"
    assert read_metric(out, "train/normal_3d") and read_metric(out, "val/normal")
    assert read_metric(out, "val/psnr_rgb") and read_metric(out, "val/psnr_normal")
    pictures = list((out / "images").glob("*.png"))
    assert pictures, "no validation picture"
    # fine_cpu holds views 1 and 5 out of training: validation shows only those
    assert {p.stem.rsplit("_", 1)[1] for p in pictures} <= {"view1", "view5"}, pictures
    before, after = _state(coarse), _state(out / "checkpoints" / "last.ckpt")
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(ALLOWED) for k in changed), sorted(changed)
    assert any(k.startswith("norm_network.") for k in changed)
    assert any(k.startswith("tex_network.") for k in changed)
    assert {"z_details.weight", "z_colors.weight"} <= changed

    # stage 2 with both critics (R1 every 2nd step) in a 2-process DDP run (gloo, default
    # find_unused_parameters=False): trains, still touches nothing else
    gan = tmp_path / "fine_gan"
    _run("train.py", [*common, *fine, f"output_dir={gan}", f"starting_path={coarse}",
                      "model.use_gan=true", "model.use_gan_color=true", "model.d_reg_every=2",
                      "model.discriminator.channel_mul=8", "model.discriminator.channel_max=16",
                      "datamodule.repeat=4", "trainer.max_epochs=1", "trainer.devices=2",
                      "trainer.strategy=ddp", "trainer.accelerator=cpu",
                      "trainer.check_val_every_n_epoch=100"])
    after = _state(gan / "checkpoints" / "last.ckpt")
    assert int(after["gan_step"]) == 2  # 8 items, 2 ranks, batch 2
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert read_metric(gan, "train/r1") and read_metric(gan, "train/disc")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(ALLOWED) for k in changed), sorted(changed)

"""Stage 2 (fine) of GANHead: normal and texture networks trained from renders and surface
samples, optionally with adversarial losses (DESIGN §4, §6). Functions take the GANHead
module and a ScanImageDataset batch; lib/model/ganhead.py dispatches to them when
`hparams.stage == 'fine'`.

Shape legend: B batch, R image rows = columns (load_res), L most masked pixels of an item,
S surface samples per item, M = L + S points queried per item, I deformer inits, J joints,
F feature widths, H/W = R.

Pipeline of one item (geometry and skinning are frozen; only z_detail, z_color, the normal
and the texture networks receive gradients):
- pixels: the cache gives, per pixel of the item's view, the shaped canonical point x_c it
  shows (and a mask); the masked pixels are packed per item into [B, L, 3];
- surface: the scan's surface samples (posed by the scan's parameters) are mapped to x_c by
  the deformer (search without gradients); among valid inits the one with the highest
  occupancy is kept;
- both point sets are queried together at the shape-neutral point x_n = x_c + disp(x_c):
  geometry features (occupancy network, no gradient), normal network on cat(z_detail,
  geometry features), texture network on cat(z_color, pose (15, global rotation zeroed so
  that colour does not depend on the view) and expression (50), geometry features, normal
  features);
- canonical normals are skinned with the inverse-transpose of sum_j w_j(x_c) tfs[j][:3, :3]
  (target transforms only: tfs of the view for pixels, of the scan for surface samples; w the
  LBS network at the shape-neutral point) and renormalized (lib/model/query.skin_normals);
- images: the pixel values scattered into [B, 3, R, R], white (+1) outside the cache mask.

Losses (weights from hparams):
    normal     masked MSE of the normal image vs the preprocessed normal render      x 1
    rgb        masked MSE of the colour image vs the preprocessed colour render      x lambda_color
    normal_3d  mean (1 - cos(n, n_gt)) at valid surface samples                       x 1
    color_3d   mean squared colour error at valid surface samples                    x lambda_color
    reg_detail / reg_color  mean square of z_detail / z_color     x lambda_reg / lambda_reg_color
    gan_normal / gan_color  non-saturating logistic G loss         x lambda_gan (when enabled)
The photo mask is cache mask AND render foreground (pixels where both the learned geometry
and the scan are seen); the discriminators see real and rendered images composited on white
with that same mask, so a silhouette mismatch of the frozen geometry cannot be exploited.

Distributed training: every backward pass touches every trainable parameter (a zero-valued
term), so DDP with find_unused_parameters=False reduces the same buckets in the generator,
discriminator and R1 passes.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lib.model.discriminator import LazyR1, d_logistic_loss, g_nonsaturating_loss
from lib.model.losses import latent_reg
from lib.model.query import (blend_transforms, pose_exp_condition, query_fine, skin_normals,
                             surface_correspondences)

_WHERE = "lib/model/fine_stage.py"
_BATCH_KEYS = ("index", "params", "view_params", "normal_img", "rgb_img", "img_mask",
               "cache_pts", "cache_mask", "surface_points", "surface_normals", "surface_colors")


def _err(msg: str) -> ValueError:
    return ValueError(f"{_WHERE}: {msg}")


# ---------------------------------------------------------------------------- packing
def pack_points(points: torch.Tensor, mask: torch.Tensor):
    """Pack the masked points of each item to the front.

    points: [B, P, 3]; mask: [B, P] bool. Returns packed [B, L, 3] (L = max(1, most masked
    points of an item); padding rows are 0) and index (b [T], p [T], pos [T]) with
    packed[b, pos] = points[b, p] for the T masked entries.
    """
    B = points.shape[0]
    b, p = mask.nonzero(as_tuple=True)
    pos = (mask.long().cumsum(dim=1) - 1)[b, p]
    L = max(1, int(mask.sum(dim=1).max())) if mask.numel() else 1
    packed = points.new_zeros(B, L, 3).index_put((b, pos), points[b, p])
    return packed, (b, p, pos)


def scatter_image(values: torch.Tensor, index, res: int, background: float = 1.0
                  ) -> torch.Tensor:
    """Packed per-pixel values [B, L, 3] -> image [B, 3, res, res] (background elsewhere).

    index: (b, p, pos) from pack_points of a [B, res * res] mask (p = row * res + col)."""
    b, p, pos = index
    B = values.shape[0]
    img = values.new_full((B, res * res, 3), background).index_put((b, p), values[b, pos])
    return img.reshape(B, res, res, 3).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------- losses
def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred, target: [B, 3, H, W]; mask: [B, H, W] bool. Mean squared error over the masked
    pixels and channels (0 when the mask is empty)."""
    m = mask[:, None].to(pred.dtype)
    return ((pred - target) ** 2 * m).sum() / (m.sum() * pred.shape[1]).clamp_min(1.0)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values: [B, S]; mask: [B, S] bool -> mean over the masked entries (0 when none)."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def touch(params) -> torch.Tensor:
    """A zero scalar depending on every parameter of `params` that requires grad, so that a
    backward pass reaches all of them (keeps DDP's reducer consistent)."""
    zero = None
    for p in params:
        if p.requires_grad:
            term = p.reshape(-1)[:1].sum() * 0.0
            zero = term if zero is None else zero + term
    return zero if zero is not None else 0.0


def _check_batch(batch: dict) -> None:
    missing = [k for k in _BATCH_KEYS if k not in batch]
    if missing:
        raise _err(f"stage-2 batch lacks {missing} (has {sorted(batch)}); use "
                   "datamodule.stage=fine (lib/dataset/fine.py items)")


def subsample_mask(mask: torch.Tensor, k: int) -> torch.Tensor:
    """mask: [B, R, R] bool -> [B, R, R] bool keeping k of each item's True pixels, drawn
    uniformly without replacement (all of them where there are at most k)."""
    B = mask.shape[0]
    flat = mask.reshape(B, -1)
    if k >= flat.shape[1]:
        return mask
    score = torch.rand(flat.shape, device=mask.device).masked_fill(~flat, -1.0)
    kth = score.topk(k, dim=1).values[:, -1:]                                     # [B, 1]
    return (flat & (score >= kth)).reshape(mask.shape)


def render_and_losses(model, batch: dict, with_surface: bool = True,
                      pixels: int | None = None) -> tuple[dict, dict]:
    """Rendered images and the stage-2 reconstruction losses of a batch.

    batch: ScanImageDataset items collated (index [B], params / view_params [B, 169],
    normal_img / rgb_img [B, 3, R, R], img_mask [B, 1, R, R], cache_pts [B, R, R, 3],
    cache_mask [B, R, R], surface_* [B, S, 3]).
    Returns (terms, out): terms maps loss names to weighted scalars (normal, rgb,
    reg_detail, reg_color, and with_surface: normal_3d, color_3d) plus 'valid_3d' (a metric,
    not a loss); out holds fake_normal, fake_rgb, real_normal, real_rgb [B, 3, R, R] and
    mask [B, R, R] (cache mask AND render foreground).
    """
    _check_batch(batch)
    hp = model.hparams
    idx = batch["index"]
    server = model.flame_server
    smpl = server(batch["params"])
    smpl_view = server(batch["view_params"])
    z_shape = model.z_shapes(idx).detach()
    z_detail, z_color = model.z_details(idx), model.z_colors(idx)

    cache_pts, cache_mask = batch["cache_pts"], batch["cache_mask"].bool()
    B, R = cache_pts.shape[0], cache_pts.shape[1]
    if pixels is not None:  # only a random subset of the photo mask is rendered and scored
        cache_mask = subsample_mask(cache_mask & batch["img_mask"].reshape(B, R, R).bool(),
                                    int(pixels))
    if tuple(batch["normal_img"].shape[-2:]) != (R, R):
        raise _err(f"cache resolution {R} != image size {tuple(batch['normal_img'].shape[-2:])}")
    packed, index = pack_points(cache_pts.reshape(B, R * R, 3).to(z_shape.dtype),
                                cache_mask.reshape(B, R * R))
    L = packed.shape[1]
    pts = packed
    with torch.no_grad():
        volume = model.generator(z_shape)  # one feature volume per item, shared below
    if with_surface:
        xs, valid3d = surface_correspondences(model, batch["surface_points"], z_shape, smpl,
                                              volume=volume)
        pts = torch.cat([packed, xs], dim=1)

    normal_c, rgb = query_fine(model, pts, z_shape, smpl["shape"], z_detail, z_color,
                               pose_exp_condition(smpl), volume)
    with torch.no_grad():
        w = model.deformer.lbs_net(pts, smpl["shape"])[0]  # [B, M, J]
        rot_view = blend_transforms(w[:, :L], smpl_view["tfs"])
    fake_normal = scatter_image(skin_normals(rot_view, normal_c[:, :L]), index, R)
    fake_rgb = scatter_image(rgb[:, :L], index, R)
    real_normal, real_rgb = batch["normal_img"], batch["rgb_img"]
    mask = cache_mask & batch["img_mask"].reshape(B, R, R).bool()

    terms = {
        "normal": masked_mse(fake_normal, real_normal, mask),
        "rgb": hp.lambda_color * masked_mse(fake_rgb, real_rgb, mask),
        "reg_detail": hp.lambda_reg * latent_reg(z_detail),
        "reg_color": hp.lambda_reg_color * latent_reg(z_color),
    }
    if with_surface:
        with torch.no_grad():
            rot_scan = blend_transforms(w[:, L:], smpl["tfs"])
        n_scan = skin_normals(rot_scan, normal_c[:, L:])
        cos = (n_scan * F.normalize(batch["surface_normals"], dim=-1, eps=1e-6)).sum(-1)
        terms["normal_3d"] = masked_mean(1.0 - cos, valid3d)
        err = ((rgb[:, L:] - batch["surface_colors"]) ** 2).mean(dim=-1)
        terms["color_3d"] = hp.lambda_color * masked_mean(err, valid3d)
        terms["valid_3d"] = valid3d.float().mean()
    out = {"fake_normal": fake_normal, "fake_rgb": fake_rgb, "real_normal": real_normal,
           "real_rgb": real_rgb, "mask": mask}
    return terms, out


# ---------------------------------------------------------------------------- adversarial
def discriminators(model) -> list[tuple[str, torch.nn.Module, str]]:
    """The enabled critics as (name, module, image type): ('normal', disc_normal, 'normal')
    with use_gan, ('color', disc_color, 'rgb') with use_gan_color."""
    out = []
    if getattr(model, "disc_normal", None) is not None:
        out.append(("normal", model.disc_normal, "normal"))
    if getattr(model, "disc_color", None) is not None:
        out.append(("color", model.disc_color, "rgb"))
    return out


def gan_images(out: dict, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and rendered images of one type ('normal' or 'rgb') composited on white with the
    photo mask. Returns (real [B, 3, R, R], fake [B, 3, R, R]); fake keeps its graph."""
    m = out["mask"][:, None]
    real = torch.where(m, out[f"real_{key}"], torch.ones_like(out[f"real_{key}"]))
    fake = torch.where(m, out[f"fake_{key}"], torch.ones_like(out[f"fake_{key}"]))
    return real, fake


def generator_gan_terms(model, out: dict) -> dict:
    """lambda_gan * non-saturating G loss per enabled critic: {'gan_normal': .., ...}."""
    terms = {}
    for name, disc, key in discriminators(model):
        _, fake = gan_images(out, key)
        terms[f"gan_{name}"] = model.hparams.lambda_gan * g_nonsaturating_loss(disc(fake))
    return terms


def discriminator_loss(model, out: dict) -> torch.Tensor:
    """Sum over enabled critics of the logistic D loss on real vs detached fake images."""
    total = 0.0
    for _, disc, key in discriminators(model):
        real, fake = gan_images(out, key)
        total = total + d_logistic_loss(disc(real.detach()), disc(fake.detach()))
    return total


def r1_loss(model, out: dict, step: int):
    """Lazy R1 (weight lambda_grad, every d_reg_every steps) summed over the critics, or None
    when `step` is not a regularization step."""
    hp = model.hparams
    lazy = LazyR1(lambda_r1=hp.lambda_grad, d_reg_every=hp.d_reg_every)
    if not lazy.due(step):
        return None
    total = 0.0
    for _, disc, key in discriminators(model):
        real, _ = gan_images(out, key)
        total = total + lazy(disc, real, step)
    return total


# ---------------------------------------------------------------------------- steps
def _main_params(model):
    return [p for m in model.stage_modules() for p in m.parameters()]


def _disc_params(model):
    return [p for _, d, _ in discriminators(model) for p in d.parameters()]


def training_step(model, batch: dict) -> torch.Tensor:
    """One stage-2 step with Lightning manual optimization: the generator step (networks and
    codes), then, with GAN on, a discriminator step and every d_reg_every steps an R1 step."""
    hp = model.hparams
    critics = discriminators(model)
    opts = model.optimizers()
    opt = opts[0] if isinstance(opts, (list, tuple)) else opts
    # critics judge whole images, so pixel subsampling applies without them only
    terms, out = render_and_losses(model, batch,
                                   pixels=None if critics else hp.get("photo_pixels"))
    if critics:
        terms.update(generator_gan_terms(model, out))
    loss = sum(v for k, v in terms.items() if k != "valid_3d")
    opt.zero_grad(set_to_none=True)
    model.manual_backward(loss + touch(_main_params(model)) + touch(_disc_params(model)))
    model.clip_gradients(opt, gradient_clip_val=hp.gradient_clip_val,
                         gradient_clip_algorithm="norm")
    opt.step()

    bs = batch["params"].shape[0]
    if critics:
        opt_d = opts[1]
        d_loss = discriminator_loss(model, out)
        opt_d.zero_grad(set_to_none=True)
        model.manual_backward(d_loss + touch(_main_params(model)) + touch(_disc_params(model)))
        opt_d.step()
        terms["disc"] = d_loss.detach()
        step = int(model.gan_step)
        r1 = r1_loss(model, out, step)
        if r1 is not None:
            opt_d.zero_grad(set_to_none=True)
            model.manual_backward(r1 + touch(_main_params(model)) + touch(_disc_params(model)))
            opt_d.step()
            model.log("train/r1", r1.detach(), batch_size=bs)
        model.gan_step += 1

    model.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
    for k, v in terms.items():
        model.log(f"train/{k}", v.detach(), batch_size=bs)
    return loss.detach()


@torch.no_grad()
def validation_step(model, batch: dict, batch_idx: int) -> torch.Tensor:
    """Photo losses of a fixed view (no surface search) and, for the first n_pictures
    items, a real-vs-rendered picture (outputs/<expname>/images/ and the logger)."""
    terms, out = render_and_losses(model, batch, with_surface=False)
    bs = batch["params"].shape[0]
    for k in ("normal", "rgb"):
        model.log(f"val/{k}", terms[k], prog_bar=k == "normal", batch_size=bs, sync_dist=True)
        psnr = masked_psnr(out[f"fake_{k}"], out[f"real_{k}"], out["mask"]).mean()
        model.log(f"val/psnr_{k}", psnr, prog_bar=k == "rgb", batch_size=bs, sync_dist=True)
    vcfg = model.hparams.validation or {}
    if batch_idx < vcfg.get("n_pictures", 2) and model.trainer.is_global_zero:
        for i in range(bs):
            name = (f"epoch{model.current_epoch:04d}_{batch['scan_id'][i]}"
                    f"_view{int(batch['view'][i])}")
            img = comparison_picture(out, i)
            path = Path(model.hparams.output_dir) / "images" / f"{name}.png"
            from lib.render.images import save_png

            save_png(path, img)
            log_picture(model, f"val/images_{batch_idx}_{i}", img)
    return terms["normal"]


def masked_psnr(fake: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """fake, real: [B, 3, R, R] in [-1, 1]; mask: [B, R, R] or [B, 1, R, R] bool. Returns [B]:
    PSNR in dB of the [0, 1] images over each item's mask (mean square error of all its
    masked pixels and channels)."""
    m = mask.reshape(mask.shape[0], 1, *fake.shape[-2:]).to(fake.dtype)
    err = (((fake - real) * 0.5) ** 2 * m).sum(dim=(1, 2, 3))
    mse = err / (m.sum(dim=(1, 2, 3)) * fake.shape[1]).clamp_min(1.0)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))


def comparison_picture(out: dict, i: int):
    """Item i side by side: real normal | rendered normal | real rgb | rendered rgb, each
    [R, R, 3] in [0, 1]. Returns a float32 numpy grid [R', W', 3]."""
    from lib.render.images import add_label, make_grid

    tiles = []
    for key, label in (("real_normal", "real normal"), ("fake_normal", "normal"),
                       ("real_rgb", "real rgb"), ("fake_rgb", "rgb")):
        img = ((out[key][i].detach().float().cpu().permute(1, 2, 0) + 1.0) * 0.5).clamp(0, 1)
        tiles.append(add_label(img.numpy(), label) if img.shape[0] >= 64 else img.numpy())
    return make_grid(tiles, ncols=4)


def log_picture(model, key: str, img) -> None:
    """Send a picture [H, W, 3] in [0, 1] to the logger when it takes images (wandb's
    log_image, TensorBoard's add_image); other loggers (CSV) only get the PNG on disk."""
    logger = model.logger
    if logger is None:
        return
    try:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[img], step=model.global_step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):
            logger.experiment.add_image(key, img, model.global_step, dataformats="HWC")
    except Exception as err:  # a picture must never stop training
        print(f"[{_WHERE}] could not log {key}: {type(err).__name__}: {err}")

"""Stage 2 (fine) of GANHead: normal and texture networks trained from renders and surface
samples, optionally with adversarial losses (docs/design.md, Stage 2). Functions take the GANHead
module and a ScanImageDataset batch; lib/model/ganhead.py dispatches to them when
`hparams.stage == 'fine'`.

Shape legend: B batch, R image rows = columns (load_res), L most masked pixels of an item,
M surface samples per item, L + M points queried per item, I deformer inits, J joints,
Ch feature widths, H/W = R.

Pipeline of one item (geometry and skinning are frozen; only z_detail, z_color, the normal
and the texture networks receive gradients):
- pixels: the cache gives, per pixel of the item's view, the shape-neutral canonical point
  x_n it shows (and a mask); the masked pixels are packed per item into [B, L, 3];
- surface: the scan's surface samples (posed by the scan's parameters) are mapped to x_c by
  the deformer (search without gradients); among valid inits the one with the highest
  occupancy is kept;
- both point sets are queried together at their shape-neutral points (the surface samples'
  x_n = x_c + disp(x_c)):
  geometry features (occupancy network, no gradient), normal network on cat(z_detail,
  geometry features), texture network on cat(z_color, the scan's own pose (15, not the
  view's, so that colour does not depend on the view) and expression (50), geometry
  features, normal features);
- canonical normals are skinned with the inverse-transpose of sum_j w_j(x_n) tfs[j][:3, :3]
  (target transforms only: tfs of the view for pixels, of the scan for surface samples; w the
  LBS network at the shape-neutral point) and renormalized (lib/model/query.skin_normals);
- images: the pixel values scattered into [B, 3, R, R], white (+1) outside the cache mask.

Losses (weights from hparams), as the original's defaults (3D losses on):
    normal     photo loss of the normal image vs the preprocessed normal render       x 1
    rgb        photo loss of the colour image vs the preprocessed colour render       x 1
    normal_3d  mean (1 - cos(n, n_gt)) at surface samples with a valid correspondence  x 1
    color_3d   squared colour error summed over RGB, mean over those samples    x lambda_color
    reg_detail / reg_color  mean square of z_detail / z_color     x lambda_reg / lambda_reg_color
    gan_normal / gan_color  non-saturating logistic G loss   x lambda_gan / lambda_gan_color
The photo loss (`photo_loss`) is the original's: the squared error of every image entry
where the real render is not white, averaged over the whole image (B * 3 * H * W entries);
the rendered image is white outside the cache mask. The critics see both images as they are
(opt-in gan_shared_mask: both composited on white with cache mask AND render foreground).
The critics' loss (`discriminator_loss`): logistic, plus every d_reg_every steps the lazy R1
penalty, each critic weighted by its lambda; their Adam has betas (0, 0.99).

Distributed training: every backward pass touches every trainable parameter (a zero-valued
term), so DDP with find_unused_parameters=False reduces the same buckets in the generator
and discriminator passes.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lib.model.discriminator import (LazyR1, d_logistic_loss, g_nonsaturating_loss,
                                      r1_penalty)
from lib.model.losses import latent_reg
from lib.model.cache_render import masked_psnr, render_cache
from lib.model.query import blend_transforms, skin_normals, surface_correspondences
from lib.utils.errors import ModuleErrors

_BATCH_KEYS = ("index", "params", "view_params", "normal_img", "rgb_img", "img_mask",
               "cache_pts", "cache_mask", "surface_points", "surface_normals", "surface_colors")


_err = ModuleErrors(__name__)


# ---------------------------------------------------------------------------- losses
def photo_loss(fake: torch.Tensor, real: torch.Tensor,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """The original's 2D loss: squared error of every entry where the real image is not white
    (real != 1, channel by channel), averaged over all B * 3 * H * W entries of the image.

    fake, real: [B, 3, H, W] in [-1, 1] (fake is white, 1, where nothing was rendered: there the
    error of a foreground real pixel is a constant); weight: optional [B, H, W] factor per
    pixel (photo_pixels: 0 off the sampled pixels, n_pool / n_sampled on them)."""
    err = (fake - real) ** 2 * (real != 1.0).to(fake.dtype)
    if weight is not None:
        err = err * weight[:, None].to(err.dtype)
    return err.sum() / err.numel()


def surface_color_loss(rgb: torch.Tensor, rgb_gt: torch.Tensor, valid: torch.Tensor
                       ) -> torch.Tensor:
    """The original's 3D colour loss: squared error summed over the 3 channels, averaged over
    the surface samples (here those with a valid correspondence). rgb, rgb_gt: [B, M, 3];
    valid: [B, M] bool. Returns a scalar."""
    return masked_mean(((rgb - rgb_gt) ** 2).sum(dim=-1), valid)


def surface_normal_loss(normal: torch.Tensor, normal_gt: torch.Tensor, valid: torch.Tensor
                        ) -> torch.Tensor:
    """The original's 3D normal loss: mean of 1 - cos(n, n_gt) over the surface samples (here
    those with a valid correspondence). normal: [B, M, 3] unit; normal_gt: [B, M, 3];
    valid: [B, M] bool. Returns a scalar."""
    cos = (normal * F.normalize(normal_gt, dim=-1, eps=1e-6)).sum(-1)
    return masked_mean(1.0 - cos, valid)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values: [B, M]; mask: [B, M] bool -> mean over the masked entries (0 when none)."""
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
    cache_mask [B, R, R], surface_* [B, M, 3]).
    pixels: render only this many random pixels of each item's photo mask (opt-in
    photo_pixels); the photo losses then weight them by n_pool / n_sampled per item.
    Returns (terms, out): terms maps loss names to weighted scalars (normal, rgb,
    reg_detail, reg_color, and with_surface: normal_3d, color_3d) plus 'valid_3d' (a metric,
    not a loss); out holds fake_normal, fake_rgb, real_normal, real_rgb [B, 3, R, R] and
    mask [B, R, R] (cache mask AND render foreground).
    """
    _check_batch(batch)
    hp = model.hparams
    idx = batch["index"]
    server = model.flame_server
    flame_out = server(batch["params"])
    flame_view = server(batch["view_params"])
    z_shape = model.z_shapes(idx).detach()
    z_detail, z_color = model.z_details(idx), model.z_colors(idx)

    cache_pts, cache_mask = batch["cache_pts"], batch["cache_mask"].bool()
    B, R = cache_pts.shape[0], cache_pts.shape[1]
    img_mask = batch["img_mask"].reshape(B, R, R).bool()
    weight = None
    if pixels is not None:  # only a random subset of the photo mask is rendered and scored
        pool = cache_mask & img_mask
        cache_mask = subsample_mask(pool, int(pixels))
        n_pool = pool.reshape(B, -1).sum(1).to(cache_pts.dtype)
        n_kept = cache_mask.reshape(B, -1).sum(1).clamp_min(1).to(cache_pts.dtype)
        weight = cache_mask.to(cache_pts.dtype) * (n_pool / n_kept)[:, None, None]
    if tuple(batch["normal_img"].shape[-2:]) != (R, R):
        raise _err(f"cache resolution {R} != image size {tuple(batch['normal_img'].shape[-2:])}")
    codes = {"z_shape": z_shape, "z_detail": z_detail, "z_color": z_color}
    with torch.no_grad():
        volume = model.generator(z_shape)  # one feature volume per item, shared below
    xs = None
    if with_surface:  # the original searches these in evaluation mode
        xs, valid3d = surface_correspondences(model, batch["surface_points"], z_shape, flame_out,
                                              eval_mode=True, volume=volume)
    # pixels and surface samples in one network pass (lib/model/cache_render.py)
    rendered = render_cache(model, cache_pts, cache_mask, flame_out, flame_view, codes, volume, xs)
    fake_normal, fake_rgb = rendered["normal"], rendered["rgb"]
    real_normal, real_rgb = batch["normal_img"], batch["rgb_img"]

    terms = {
        "normal": photo_loss(fake_normal, real_normal, weight),
        "rgb": photo_loss(fake_rgb, real_rgb, weight),
        "reg_detail": hp.lambda_reg * latent_reg(z_detail),
        "reg_color": hp.lambda_reg_color * latent_reg(z_color),
    }
    if with_surface:
        with torch.no_grad():
            rot_scan = blend_transforms(rendered["extra_w"], flame_out.tfs)
        n_scan = skin_normals(rot_scan, rendered["extra_normal_c"])
        terms["normal_3d"] = surface_normal_loss(n_scan, batch["surface_normals"], valid3d)
        terms["color_3d"] = hp.lambda_color * surface_color_loss(
            rendered["extra_rgb"], batch["surface_colors"], valid3d)
        terms["valid_3d"] = valid3d.float().mean()
    out = {"fake_normal": fake_normal, "fake_rgb": fake_rgb, "real_normal": real_normal,
           "real_rgb": real_rgb, "mask": cache_mask & img_mask}
    return terms, out


# ---------------------------------------------------------------------------- adversarial
def discriminators(model) -> list[tuple[str, torch.nn.Module, str, float]]:
    """The enabled critics as (name, module, image type, weight): ('normal', disc_normal,
    'normal', lambda_gan) with use_gan, ('color', disc_color, 'rgb', lambda_gan_color) with
    use_gan_color."""
    hp = model.hparams
    out = []
    if getattr(model, "disc_normal", None) is not None:
        out.append(("normal", model.disc_normal, "normal", float(hp.lambda_gan)))
    if getattr(model, "disc_color", None) is not None:
        out.append(("color", model.disc_color, "rgb", float(hp.get("lambda_gan_color", 0.0))))
    return out


def gan_images(model, out: dict, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and rendered images of one type ('normal' or 'rgb') as the critics see them:
    as they are (the original: the real render on its own white background, the rendered
    image white outside the cache mask) or, with the opt-in gan_shared_mask, both composited
    on white with the photo mask. Returns (real [B, 3, R, R], fake [B, 3, R, R]); fake keeps
    its graph."""
    real, fake = out[f"real_{key}"], out[f"fake_{key}"]
    if model.hparams.get("gan_shared_mask", False):
        m = out["mask"][:, None]
        real = torch.where(m, real, torch.ones_like(real))
        fake = torch.where(m, fake, torch.ones_like(fake))
    return real, fake


def generator_gan_terms(model, out: dict) -> dict:
    """Weighted non-saturating G loss per enabled critic: {'gan_normal': lambda_gan * ..,
    'gan_color': lambda_gan_color * ..} (a critic of weight 0 adds nothing)."""
    terms = {}
    for name, disc, key, lam in discriminators(model):
        if lam > 0:
            _, fake = gan_images(model, out, key)
            terms[f"gan_{name}"] = lam * g_nonsaturating_loss(disc(fake))
    return terms


def discriminator_loss(model, out: dict, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The critics' loss: sum over enabled critics of weight * (logistic D loss on real vs
    detached fake images + on regularization steps (step % d_reg_every == 0) the lazy R1
    penalty lambda_grad / 2 * d_reg_every * R1 of the same real logits).
    Returns (loss, the R1 part or None when step is not a regularization step)."""
    hp = model.hparams
    lazy = LazyR1(lambda_r1=hp.lambda_grad, d_reg_every=hp.d_reg_every)
    reg = lazy.due(step) and hp.lambda_grad > 0
    total, r1_total = 0.0, 0.0
    for _, disc, key, lam in discriminators(model):
        real, fake = gan_images(model, out, key)
        real = real.detach().requires_grad_(reg)
        logits_real = disc(real)
        d = d_logistic_loss(logits_real, disc(fake.detach()))
        if reg:
            r1 = lazy.weight() * r1_penalty(logits_real, real) + 0.0 * logits_real.sum()
            r1_total = r1_total + lam * r1
            d = d + r1
        total = total + lam * d
    return total, (r1_total if reg else None)


# ---------------------------------------------------------------------------- steps
def _main_params(model):
    return [p for m in model.stage_modules() for p in m.parameters()]


def _disc_params(model):
    return [p for _, d, _, _ in discriminators(model) for p in d.parameters()]


def training_step(model, batch: dict) -> torch.Tensor:
    """One stage-2 step with Lightning manual optimization, in the order of the original's
    two-optimizer Lightning loop: the generator step (networks and codes), then with GAN on
    the critics' step on images rendered again by the updated networks (R1 added every
    d_reg_every steps). Both steps clip their gradients' norm at gradient_clip_val."""
    hp = model.hparams
    critics = discriminators(model)
    opts = model.optimizers()
    opt = opts[0] if isinstance(opts, (list, tuple)) else opts
    # critics judge whole images, so pixel subsampling applies without them only
    pixels = None if critics else hp.get("photo_pixels")
    terms, out = render_and_losses(model, batch, pixels=pixels)
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
        with torch.no_grad():
            _, out_d = render_and_losses(model, batch, with_surface=False)
        d_loss, r1 = discriminator_loss(model, out_d, int(model.gan_step))
        opt_d.zero_grad(set_to_none=True)
        model.manual_backward(d_loss + touch(_main_params(model)) + touch(_disc_params(model)))
        model.clip_gradients(opt_d, gradient_clip_val=hp.gradient_clip_val,
                             gradient_clip_algorithm="norm")
        opt_d.step()
        terms["disc"] = d_loss.detach()
        if r1 is not None:
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
        print(f"[{_err.where}] could not log {key}: {type(err).__name__}: {err}")

"""Stage 2 (fine) of GANHead: normal and texture networks trained from renders and surface
samples, optionally with adversarial losses (docs/design.md, Stage 2). `FineStage` is the
`TrainingStage` (lib/model/stage.py) GANHead delegates to when `hparams.stage == 'fine'`; its
losses are lib/model/fine_losses.py, its critics' terms lib/model/adversarial.py.

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
The photo loss (`photo_loss`, lib/model/fine_losses.py) is the original's: the squared error
of every image entry where the real render is not white, averaged over the whole image
(B * 3 * H * W entries); the rendered image is white outside the cache mask. The critics see
both images as they are (opt-in gan_shared_mask: both composited on white with cache mask AND
render foreground). The critics' loss (`discriminator_loss`, lib/model/adversarial.py):
logistic, plus every d_reg_every steps the lazy R1 penalty, each critic weighted by its
lambda; their Adam has betas (0, 0.99).

Distributed training: every backward pass touches every trainable parameter (a zero-valued
term), so DDP with find_unused_parameters=False reduces the same buckets in the generator
and discriminator passes.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from lib.model.adversarial import discriminator_loss, discriminators, generator_gan_terms
from lib.model.cache_render import masked_psnr, render_cache
from lib.model.fine_losses import (
    photo_loss,
    subsample_pixels,
    surface_color_loss,
    surface_normal_loss,
)
from lib.model.losses import latent_reg
from lib.model.query import blend_transforms, skin_normals, surface_correspondences
from lib.model.stage import TrainingStage, touch
from lib.utils.errors import ModuleErrors

_BATCH_KEYS = ("index", "params", "view_params", "normal_img", "rgb_img", "img_mask",
               "cache_pts", "cache_mask", "surface_points", "surface_normals", "surface_colors")


_err = ModuleErrors(__name__)


def _check_batch(batch: dict) -> None:
    missing = [k for k in _BATCH_KEYS if k not in batch]
    if missing:
        raise _err(f"stage-2 batch lacks {missing} (has {sorted(batch)}); use "
                   "datamodule.stage=fine (lib/dataset/fine.py items)")


class FineStage(TrainingStage):
    """Stage 2 of `model` (a GANHead). A batch: ScanImageDataset items collated (index [B],
    params / view_params [B, 169], normal_img / rgb_img [B, 3, R, R], img_mask [B, 1, R, R],
    cache_pts [B, R, R, 3], cache_mask [B, R, R], surface_* [B, M, 3]; validation batches also
    scan_id and view, B each)."""

    name = "fine"

    def stage_modules(self) -> list[nn.Module]:
        """Stage 2 trains only detail and colour (the critics have their own optimizer)."""
        m = self.model
        return [m.z_details, m.z_colors, m.norm_network, m.tex_network]

    def render_and_losses(self, batch: dict, with_surface: bool = True,
                          pixels: int | None = None) -> tuple[dict, dict]:
        """Rendered images and the stage-2 reconstruction losses of a batch (class docstring).

        pixels: render only this many random pixels of each item's photo mask (opt-in
        photo_pixels); the photo losses then weight them by n_pool / n_sampled per item.
        Returns (terms, out): terms maps loss names to weighted scalars (normal, rgb,
        reg_detail, reg_color, and with_surface: normal_3d, color_3d) plus 'valid_3d' (a
        metric, not a loss); out holds fake_normal, fake_rgb, real_normal, real_rgb
        [B, 3, R, R] and mask [B, R, R] (cache mask AND render foreground).
        """
        _check_batch(batch)
        model, hp = self.model, self.hparams
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
            cache_mask, weight = subsample_pixels(cache_mask & img_mask, pixels, cache_pts.dtype)
        if tuple(batch["normal_img"].shape[-2:]) != (R, R):
            raise _err(f"cache resolution {R} != image size "
                       f"{tuple(batch['normal_img'].shape[-2:])}")
        codes = {"z_shape": z_shape, "z_detail": z_detail, "z_color": z_color}
        with torch.no_grad():
            volume = model.generator(z_shape)  # one feature volume per item, shared below
        xs = None
        if with_surface:  # the original searches these in evaluation mode
            xs, valid3d = surface_correspondences(model, batch["surface_points"], z_shape,
                                                  flame_out, eval_mode=True, volume=volume)
        # pixels and surface samples in one network pass (lib/model/cache_render.py)
        rendered = render_cache(model, cache_pts, cache_mask, flame_out, flame_view, codes,
                                volume, xs)
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

    def _all_params_touched(self, loss: torch.Tensor) -> torch.Tensor:
        """loss plus a zero term reaching every trainable parameter (module docstring: DDP)."""
        critics = [p for _, d, _, _ in discriminators(self.model) for p in d.parameters()]
        return loss + touch(self.main_params()) + touch(critics)

    def training_step(self, batch: dict) -> torch.Tensor:
        """One stage-2 step with Lightning manual optimization, in the order of the original's
        two-optimizer Lightning loop: the generator step (networks and codes), then with GAN
        on the critics' step on images rendered again by the updated networks (R1 added every
        d_reg_every steps). Both steps clip their gradients' norm at gradient_clip_val."""
        model, hp = self.model, self.hparams
        critics = discriminators(model)
        opts = model.optimizers()
        opt = opts[0] if isinstance(opts, (list, tuple)) else opts
        # critics judge whole images, so pixel subsampling applies without them only
        pixels = None if critics else hp.get("photo_pixels")
        terms, out = self.render_and_losses(batch, pixels=pixels)
        if critics:
            terms.update(generator_gan_terms(model, out))
        loss = sum(v for k, v in terms.items() if k != "valid_3d")
        self.optimizer_step(opt, self._all_params_touched(loss))

        bs = batch["params"].shape[0]
        if critics:
            with torch.no_grad():
                _, out_d = self.render_and_losses(batch, with_surface=False)
            d_loss, r1 = discriminator_loss(model, out_d, int(model.gan_step))
            self.optimizer_step(opts[1], self._all_params_touched(d_loss))
            terms["disc"] = d_loss.detach()
            if r1 is not None:
                model.log("train/r1", r1.detach(), batch_size=bs)
            model.gan_step += 1

        self.log_train(loss, terms, bs)
        return loss.detach()

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Photo losses of a fixed view (no surface search) and, for the first n_pictures
        items, a real-vs-rendered picture (outputs/<expname>/images/ and the logger)."""
        model = self.model
        terms, out = self.render_and_losses(batch, with_surface=False)
        bs = batch["params"].shape[0]
        for k in ("normal", "rgb"):
            model.log(f"val/{k}", terms[k], prog_bar=k == "normal", batch_size=bs,
                      sync_dist=True)
            psnr = masked_psnr(out[f"fake_{k}"], out[f"real_{k}"], out["mask"]).mean()
            model.log(f"val/psnr_{k}", psnr, prog_bar=k == "rgb", batch_size=bs,
                      sync_dist=True)
        vcfg = self.hparams.validation or {}
        if batch_idx < vcfg.get("n_pictures", 2) and model.trainer.is_global_zero:
            from lib.render.images import save_png

            for i in range(bs):
                name = (f"epoch{model.current_epoch:04d}_{batch['scan_id'][i]}"
                        f"_view{int(batch['view'][i])}")
                img = comparison_picture(out, i)
                save_png(Path(self.hparams.output_dir) / "images" / f"{name}.png", img)
                log_picture(model, f"val/images_{batch_idx}_{i}", img)
        return terms["normal"]


def comparison_picture(out: dict, i: int):
    """Item i side by side: real normal | rendered normal | real rgb | rendered rgb, each
    [R, R, 3] in [0, 1]. Returns a float32 numpy grid [H', W', 3]."""
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

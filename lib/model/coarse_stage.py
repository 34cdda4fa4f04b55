"""Stage 1 (coarse) of GANHead: z_shape, the feature-volume generator, the occupancy,
displacement and LBS networks trained from 3D occupancy samples of the posed scans
(docs/design.md, Stage 1). `CoarseStage` is the `TrainingStage` (lib/model/stage.py) GANHead
delegates to when `hparams.stage == 'coarse'`; the geometry it trains through (deformed
occupancy, correspondences) stays on GANHead.

Shape legend: B batch, N points per scan, I initializations (5), J joints (5),
P FLAME parameters (169), Z z_shape width.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.model import losses
from lib.model.stage import TrainingStage


class CoarseStage(TrainingStage):
    """Stage 1 of `model` (a GANHead). A batch (lib/dataset/faceverse.py items collated):
    index [B] embedding rows, params [B, P], pts_d [B, N, 3] deformed samples, occ_gt [B, N, 1];
    validation batches also scan_id (B strings)."""

    name = "coarse"

    def stage_modules(self) -> list[nn.Module]:
        m = self.model
        return [m.z_shapes, m.generator, m.occ_network, m.deformer, m.disp_net]

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Stage-1 loss terms (scalars), each already weighted:
        occ          BCE with logits of the deformed samples (max over valid inits)
        prior_*      FLAME prior at each sample's selected correspondence          x 100/100/0.2
        disp         deshape MSE of the canonical FLAME vertices                    x lambda_disp
        reg_shape, reg_lbs  mean square of z_shape, twice (the original regularizes the
                     code once as the generator's input and once as the skinning code) x lambda_reg
        bone_occ     bootstrapping (epochs < nepochs_pretrain): jittered bone points inside
        bone_w       bootstrapping: skinning weights at the joints
        plus valid_frac (a metric, not a loss)."""
        model, hp = self.model, self.hparams
        flame_out = model.flame_server(batch["params"])
        z_shape = model.z_shapes(batch["index"])                               # [B, Z]
        volume = model.generator(z_shape)
        out = model.deformed_occupancy(batch["pts_d"], z_shape, flame_out, volume=volume)
        terms = {"occ": losses.occupancy_loss(out["occ"], batch["occ_gt"])}

        # FLAME prior at every sample's selected correspondence, mapped to the shape-neutral
        # space where the LBS fields live; targets: the nearest shape-neutral FLAME vertex.
        found = out["valid"].any(dim=-1)                                    # [B, N]
        xc = torch.where(found[..., None], out["xc_best"], torch.zeros_like(out["xc_best"]))
        xn = xc + model.disp_net(xc, flame_out.shape)
        w, pose_dirs, expr_dirs = model.deformer.lbs_net.lbs(xn)  # already neutral: no warp
        flame = model.flame_server.flame
        prior = losses.flame_prior_loss(
            xn, found, w, pose_dirs, expr_dirs, flame_out.verts_c_neutral, flame.weights,
            flame.posedirs_scaled, flame.expdirs_scaled, radius=hp.prior_radius)
        terms["prior_w"] = hp.lambda_prior_w * prior["w"]
        terms["prior_pose"] = hp.lambda_prior_pose * prior["pose"]
        terms["prior_exp"] = hp.lambda_prior_exp * prior["exp"]

        # Deshape: shaped canonical FLAME vertices -> shape-neutral ones.
        dx = model.disp_net(flame_out.verts_c, flame_out.shape)
        terms["disp"] = hp.lambda_disp * losses.deshape_loss(flame_out.verts_c, dx,
                                                             flame_out.verts_c_neutral)
        terms["reg_shape"] = hp.lambda_reg * losses.latent_reg(z_shape)
        terms["reg_lbs"] = hp.lambda_reg * losses.latent_reg(z_shape)

        if model.current_epoch < hp.nepochs_pretrain:
            parents = flame.parents
            B = z_shape.shape[0]
            joints = model.neutral_joints(z_shape).expand(B, -1, -1)       # [B, J, 3]
            if hp.lambda_bone_occ > 0:  # bone points are inside (shape-neutral space)
                occ_bone = model.occupancy_fn(volume)(losses.bone_points(joints, parents))
                terms["bone_occ"] = hp.lambda_bone_occ * losses.occupancy_loss(
                    occ_bone, torch.ones_like(occ_bone))
            if hp.lambda_bone_w > 0:
                pts, target = losses.joint_weight_targets(joints, parents)
                w_j = model.deformer.lbs_net.lbs(pts)[0]  # neutral joints: no warp
                terms["bone_w"] = hp.lambda_bone_w * F.mse_loss(w_j, target.expand_as(w_j))
        with torch.no_grad():
            terms["valid_frac"] = found.float().mean()
        return terms

    def training_step(self, batch: dict) -> torch.Tensor:
        """One Adam step on the sum of `losses` (valid_frac left out), gradients clipped."""
        terms = self.losses(batch)
        loss = sum(v for k, v in terms.items() if k != "valid_frac")
        self.optimizer_step(self.model.optimizers(), loss)
        self.log_train(loss, terms, bs=batch["params"].shape[0])
        return loss.detach()

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Volumetric IoU of the batch's samples (val/iou) and, for the first n_pictures
        batches, a picture of the extracted mesh (outputs/<expname>/medias/)."""
        from lib.model.validation import iou, save_validation_picture

        model, hp = self.model, self.hparams
        flame_out = model.flame_server(batch["params"])
        z_shape = model.z_shapes(batch["index"])
        with torch.no_grad():
            logits = model.occupancy(batch["pts_d"], batch["params"], {"z_shape": z_shape})
        value = iou(logits[..., None] > 0, batch["occ_gt"] > 0.5)
        model.log("val/iou", value, prog_bar=True, batch_size=1, sync_dist=True)
        vcfg = hp.validation or {}
        if batch_idx < vcfg.get("n_pictures", 2) and model.trainer.is_global_zero:
            path = (Path(hp.output_dir) / "medias"
                    / f"epoch{model.current_epoch:04d}_{batch['scan_id'][0]}.png")
            save_validation_picture(model, z_shape, flame_out, path,
                                    res_init=vcfg.get("mesh_res_init", 16),
                                    res_final=vcfg.get("mesh_res_final", 128))
        return value

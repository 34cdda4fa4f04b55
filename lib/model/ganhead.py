"""The GANHead LightningModule: auto-decoded latents, generator, implicit networks, learned
deformer and the stage-1 (coarse) training loop (docs/design.md, Stage 1).

Shape legend: B batch, N points per scan, I initializations (5), J joints (5),
V FLAME vertices, Z latent width.

Training uses Lightning 2 manual optimization (the original's PL 1.3 `optimizer_idx` is gone),
with gradient clipping done here by `clip_gradients`.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from lib.dataset.faceverse import validate_scan_id
from lib.flame import FLAMEServer, FlameFrames
from lib.model import losses
from lib.model import fine_stage
from lib.model import query
from lib.model.builders import build_deformer, build_network
from lib.model.discriminator import Discriminator
from lib.model.generator import Generator, sample_volume
from lib.model.neutral_lbs import NeutralLBS


def _plain(cfg):
    """DictConfig -> plain containers (so hparams pickle cleanly); dicts pass through."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class GANHead(pl.LightningModule):
    """scan_ids: the training scans' ids in embedding-row order (stored in the checkpoint, so
    subjects resolve by id: `subject_rows`); n_subjects: the row count, derived from scan_ids
    (given alone only by checkpoints written before ids were stored)."""

    def __init__(self, n_subjects: int | None = None, flame_model: str = "",
                 stage: str = "coarse", scan_ids: list[str] | None = None,
                 dim_shape: int = 256, dim_detail: int = 128, dim_color: int = 64,
                 n_shape: int = 100, n_exp: int = 50, nepochs_pretrain: int = 1,
                 gradient_clip_val: float = 0.1, bbox_min=(-1.0, -1.0, -1.0),
                 bbox_max=(1.0, 1.0, 1.0), prior_radius: float = losses.PRIOR_RADIUS,
                 lambda_prior_exp: float = 100.0, lambda_prior_pose: float = 100.0,
                 lambda_prior_w: float = 0.2, lambda_bone_occ: float = 1.0,
                 lambda_bone_w: float = 10.0, lambda_disp: float = 10.0,
                 lambda_reg: float = 1e-3, lambda_reg_color: float = 1e-3,
                 lambda_color: float = 1.0, lambda_gan: float = 0.0,
                 lambda_gan_color: float = 0.0, lambda_grad: float = 10.0,
                 d_reg_every: int = 16, use_gan: bool = False, use_gan_color: bool = False,
                 optim: dict | None = None, generator: dict | None = None,
                 deformer: dict | None = None, occ_network: dict | None = None,
                 norm_network: dict | None = None, tex_network: dict | None = None,
                 validation: dict | None = None, output_dir: str = "outputs/coarse",
                 discriminator: dict | None = None, photo_pixels: int | None = None,
                 gan_shared_mask: bool = False):
        super().__init__()
        if scan_ids is not None:
            scan_ids = [validate_scan_id(str(i), "GANHead scan_ids") for i in scan_ids]
            if len(set(scan_ids)) != len(scan_ids):
                raise ValueError("GANHead: scan_ids repeat an id")
            if n_subjects is not None and int(n_subjects) != len(scan_ids):
                raise ValueError(f"GANHead: n_subjects={n_subjects} but {len(scan_ids)} scan_ids")
            n_subjects = len(scan_ids)
        if n_subjects is None or int(n_subjects) < 1:
            raise ValueError("GANHead needs scan_ids (or n_subjects >= 1)")
        kwargs = {k: _plain(v) for k, v in locals().items() if k not in ("self", "__class__")}
        self.save_hyperparameters(kwargs)
        self.automatic_optimization = False

        self.flame_server = FLAMEServer(flame_model, n_shape=n_shape, n_exp=n_exp)
        n_joints = len(self.flame_server.flame.parents)
        pose_feature_dim = 9 * (n_joints - 1)

        # Auto-decoder latents, one row per training scan, starting at zero (as the original).
        self.z_shapes = nn.Embedding(n_subjects, dim_shape)
        self.z_details = nn.Embedding(n_subjects, dim_detail)
        self.z_colors = nn.Embedding(n_subjects, dim_color)
        for emb in (self.z_shapes, self.z_details, self.z_colors):
            nn.init.zeros_(emb.weight)

        gen = dict(generator or {})
        self.generator = Generator(z_dim=dim_shape, **gen)
        # networks from the allow-list of lib/model/builders.py (hyper-parameters are data)
        self.occ_network = build_network(occ_network, "model.occ_network",
                                         feature_dim=self.generator.out_channels)
        dcfg = dict(deformer or {})
        lbs = build_network(dcfg.pop("lbs_network"), "model.deformer.lbs_network",
                            n_joints=n_joints, pose_feature_dim=pose_feature_dim, n_exp=n_exp)
        self.disp_net = build_network(dcfg.pop("disp_network"), "model.deformer.disp_network",
                                      n_shape=n_shape)
        # the unconditioned LBS network read at x_c + disp(x_c, betas); disp_net stays owned
        # here (state_dict disp_net.*), the deformer only references it
        lbs_net = NeutralLBS(lbs, self.disp_net)
        # the rest of the entry is configs/deformer/<name>.yaml (exact, the original's, or fast)
        self.deformer = build_deformer(dcfg, "model.deformer", lbs_net=lbs_net,
                                       n_joints=n_joints, bbox_min=bbox_min, bbox_max=bbox_max)
        self.norm_network = build_network(norm_network, "model.norm_network",
                                          detail_dim=dim_detail,
                                          geometry_feature_dim=self.occ_network.feature_dim)
        self.tex_network = build_network(tex_network, "model.tex_network", color_dim=dim_color,
                                         pose_exp_dim=15 + n_exp,
                                         geometry_feature_dim=self.occ_network.feature_dim,
                                         normal_feature_dim=self.norm_network.feature_dim)
        # Stage-2 critics exist only with use_gan / use_gan_color, so stage-1 checkpoints and
        # runs without GAN keep exactly the same parameters (lib/model/fine_stage.py).
        self.disc_normal = Discriminator(**dict(discriminator or {})) if use_gan else None
        self.disc_color = Discriminator(**dict(discriminator or {})) if use_gan_color else None
        if use_gan or use_gan_color:
            self.register_buffer("gan_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("bbox_min", torch.tensor(bbox_min, dtype=torch.float32))
        self.register_buffer("bbox_max", torch.tensor(bbox_max, dtype=torch.float32))
        self._set_trainable()

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, **overrides):
        """Lightning's loader replaced by the safe one (lib/model/checkpoint.py): no code
        from the file runs. overrides: hyper-parameters to replace (e.g. flame_model)."""
        from lib.model.checkpoint import load_ganhead

        return load_ganhead(checkpoint_path, map_location=map_location, **overrides)

    @property
    def scan_ids(self) -> list[str] | None:
        """Training scan ids in embedding-row order (None for checkpoints that predate them)."""
        ids = self.hparams.get("scan_ids")
        return None if ids is None else list(ids)

    def subject_rows(self, ids: list[str]) -> torch.Tensor:
        """Embedding rows of training scans. ids: scan ids -> LongTensor [B] on the model's
        device; an id the checkpoint does not know raises KeyError naming it."""
        known = self.scan_ids
        if known is None:
            raise KeyError("this checkpoint stores no scan ids (written before they were "
                           "stored); name subjects by embedding row")
        index = {sid: i for i, sid in enumerate(known)}
        missing = [str(i) for i in ids if str(i) not in index]
        if missing:
            raise KeyError(f"scan id(s) {missing[:5]} are not among the checkpoint's "
                           f"{len(known)} training scans (first: {known[:5]})")
        return torch.tensor([index[str(i)] for i in ids], dtype=torch.long,
                            device=self.bbox_min.device)

    # ------------------------------------------------------------------ queries
    def codes(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """rows: LongTensor [B] -> {"z_shape": [B, Z], "z_detail": [B, D], "z_color": [B, C]}
        (lib/model/query.py)."""
        return query.codes(self, rows)

    def occupancy(self, xd: torch.Tensor, params: torch.Tensor, codes: dict) -> torch.Tensor:
        """Occupancy logits of deformed points xd [B, N, 3] posed by params [B, P] -> [B, N]
        (evaluation-mode search, max over inits; lib/model/query.py)."""
        return query.occupancy(self, xd, params, codes)

    def surface(self, xd: torch.Tensor, params: torch.Tensor, codes: dict) -> dict:
        """Stage 2: xc [B, N, 3], valid [B, N], normal [B, N, 3] (unit, deformed space) and
        color [B, N, 3] at deformed surface points (lib/model/query.py)."""
        return query.surface(self, xd, params, codes)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The FLAME arrays are not saved (lib/flame/flame.py); a fingerprint of the model file
        is, so that loading with another file fails clearly."""
        checkpoint["flame_fingerprint"] = self.flame_server.flame.fingerprint()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Check the FLAME file against the checkpoint's fingerprint, and drop the FLAME arrays
        that checkpoints written before they became non-persistent still carry."""
        flame = self.flame_server.flame
        state = checkpoint.get("state_dict", {})
        saved = checkpoint.get("flame_fingerprint")
        if saved is None and "flame_server.flame.v_template" in state:  # an older checkpoint
            old = state["flame_server.flame.v_template"]
            saved = {"n_vertices": int(old.shape[0]),
                     "v_template_sum": float(old.double().sum())}
        if saved is not None:
            now = flame.fingerprint()
            differs = [k for k, v in saved.items() if k in now and not math.isclose(
                float(v), float(now[k]), rel_tol=1e-7, abs_tol=1e-9)]
            if differs:
                from lib.utils.checkpoint_io import CheckpointError

                raise CheckpointError(
                    f"the head model {flame.model_path} is not the one this checkpoint was trained "
                    f"with ({', '.join(f'{k}: checkpoint {saved[k]}, file {now[k]}' for k in differs)});"
                    f" pass the training run's datamodule.flame_model / flame_model=PATH")
        for key in [k for k in state if k.startswith("flame_server.")]:
            del state[key]

    # ------------------------------------------------------------------ parameters
    def stage_modules(self) -> list[nn.Module]:
        """Modules trained in the current stage (stage 2 trains only detail and colour)."""
        if self.hparams.stage == "coarse":
            return [self.z_shapes, self.generator, self.occ_network, self.deformer, self.disp_net]
        return [self.z_details, self.z_colors, self.norm_network, self.tex_network]

    def _set_trainable(self) -> None:
        self.requires_grad_(False)
        for m in self.stage_modules():
            m.requires_grad_(True)
        for m in self.disc_modules():
            m.requires_grad_(True)

    def disc_modules(self) -> list[nn.Module]:
        """The stage-2 discriminators that exist (trained by their own optimizer)."""
        return [d for d in (self.disc_normal, self.disc_color) if d is not None]

    def configure_optimizers(self):
        """Adam (betas 0.9, 0.999) over the stage's modules at optim.lr; with critics a second
        Adam over them at optim.lr_disc with betas (0, 0.99), as the original.

        The latent codes may take their own learning rate (optim.lr_latent, opt-in): each code
        only gets a gradient when its scan is in the batch, so on short CPU runs with many scans
        they barely leave zero at the networks' rate (null: one rate for all, as the original).
        """
        lr = self.hparams.optim["lr"]
        lr_latent = self.hparams.optim.get("lr_latent") or lr
        embeds = (self.z_shapes, self.z_details, self.z_colors)
        latent = [p for m in self.stage_modules() if m in embeds for p in m.parameters()]
        nets = [p for m in self.stage_modules() if m not in embeds for p in m.parameters()]
        main = torch.optim.Adam([{"params": nets, "lr": lr},
                                 {"params": latent, "lr": lr_latent}], lr=lr,
                                betas=(0.9, 0.999))
        discs = self.disc_modules()
        if not discs:
            return main
        lr_d = self.hparams.optim.get("lr_disc", lr)
        disc = torch.optim.Adam([p for d in discs for p in d.parameters()], lr=lr_d,
                                betas=(0.0, 0.99))
        return [main, disc]

    # ------------------------------------------------------------------ geometry
    def occupancy_fn(self, volume: torch.Tensor):
        """Closure: shape-neutral canonical points [B, M, 3] -> occupancy logits [B, M, 1]."""
        def occ(xc_neutral: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
            feat = sample_volume(volume, xc_neutral, self.bbox_min, self.bbox_max)
            return self.occ_network(xc_neutral, feat)
        return occ

    def canonical_occupancy(self, xc: torch.Tensor, z_shape: torch.Tensor, shape: torch.Tensor,
                            volume: torch.Tensor | None = None) -> torch.Tensor:
        """Occupancy logits at shaped canonical points. xc: [B, M, 3] -> [B, M, 1]."""
        volume = self.generator(z_shape) if volume is None else volume
        xn = xc + self.disp_net(xc, shape)
        return self.occupancy_fn(volume)(xn)

    def deformed_occupancy(self, pts_d: torch.Tensor, z_shape: torch.Tensor, flame_out: FlameFrames,
                           eval_mode: bool = False, volume: torch.Tensor | None = None) -> dict:
        """Occupancy logits of deformed points (max over valid inits), with correspondences.

        pts_d: [B, N, 3]; volume: the generator's output for z_shape (computed when None).
        Returns dict occ [B, N, 1] (SKIPPED_LOGIT where no init is valid), xc [B, N, I, 3],
        valid [B, N, I], best [B, N] (the init giving the max; 0 where none is valid) and
        xc_best [B, N, 3] (its shaped canonical point, carrying the implicit-differentiation
        graph where valid).
        """
        volume = self.generator(z_shape) if volume is None else volume
        cond = {"z_shape": z_shape, "shape": flame_out.shape}
        xc, valid = self.deformer(pts_d, cond, flame_out, eval_mode=eval_mode)
        B, N, I, _ = xc.shape
        keep = valid
        if hasattr(self.deformer, "repeated_roots"):  # identical roots: evaluate one of them
            keep = valid & ~self.deformer.repeated_roots(xc, valid)
        # one init per row, so that the per-init logits come back: [B, N, I]
        occ_i = self.deformer.occupancy_of_valid(
            xc.reshape(B, N * I, 1, 3), keep.reshape(B, N * I, 1), cond,
            self.occupancy_fn(volume), self.disp_net).reshape(B, N, I)
        occ, best = occ_i.max(dim=2, keepdim=True)
        xc_best = torch.gather(xc, 2, best[..., None].expand(B, N, 1, 3))[:, :, 0]
        return {"occ": occ, "xc": xc, "valid": valid, "best": best[..., 0], "xc_best": xc_best}

    def neutral_joints(self, like: torch.Tensor) -> torch.Tensor:
        """Joints of the shape-neutral canonical FLAME (shape 0, jaw 0.2): [1, J, 3]."""
        server = self.flame_server
        return server.canonical(like.new_zeros(1, server.n_shape)).joints_c

    # ------------------------------------------------------------------ stage 1
    def coarse_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Stage-1 loss terms, each already weighted:
        occ          BCE with logits of the deformed samples (max over valid inits)
        prior_*      FLAME prior at each sample's selected correspondence          x 100/100/0.2
        disp         deshape MSE of the canonical FLAME vertices                    x lambda_disp
        reg_shape, reg_lbs  mean square of z_shape, twice (the original regularizes the
                     code once as the generator's input and once as the skinning code) x lambda_reg
        bone_occ     bootstrapping (epochs < nepochs_pretrain): jittered bone points inside
        bone_w       bootstrapping: skinning weights at the joints
        plus valid_frac (a metric, not a loss)."""
        hp = self.hparams
        flame_out = self.flame_server(batch["params"])
        z_shape = self.z_shapes(batch["index"])
        volume = self.generator(z_shape)
        out = self.deformed_occupancy(batch["pts_d"], z_shape, flame_out, volume=volume)
        terms = {"occ": losses.occupancy_loss(out["occ"], batch["occ_gt"])}

        # FLAME prior at every sample's selected correspondence, mapped to the shape-neutral
        # space where the LBS fields live; targets: the nearest shape-neutral FLAME vertex.
        found = out["valid"].any(dim=-1)                                    # [B, N]
        xc = torch.where(found[..., None], out["xc_best"], torch.zeros_like(out["xc_best"]))
        xn = xc + self.disp_net(xc, flame_out.shape)
        w, pose_dirs, expr_dirs = self.deformer.lbs_net.lbs(xn)  # already neutral: no warp
        flame = self.flame_server.flame
        prior = losses.flame_prior_loss(
            xn, found, w, pose_dirs, expr_dirs, flame_out.verts_c_neutral, flame.weights,
            flame.posedirs_scaled, flame.expdirs_scaled, radius=hp.prior_radius)
        terms["prior_w"] = hp.lambda_prior_w * prior["w"]
        terms["prior_pose"] = hp.lambda_prior_pose * prior["pose"]
        terms["prior_exp"] = hp.lambda_prior_exp * prior["exp"]

        # Deshape: shaped canonical FLAME vertices -> shape-neutral ones.
        dx = self.disp_net(flame_out.verts_c, flame_out.shape)
        terms["disp"] = hp.lambda_disp * losses.deshape_loss(flame_out.verts_c, dx,
                                                             flame_out.verts_c_neutral)
        terms["reg_shape"] = hp.lambda_reg * losses.latent_reg(z_shape)
        terms["reg_lbs"] = hp.lambda_reg * losses.latent_reg(z_shape)

        if self.current_epoch < hp.nepochs_pretrain:
            parents = self.flame_server.flame.parents
            B = z_shape.shape[0]
            joints = self.neutral_joints(z_shape).expand(B, -1, -1)        # [B, J, 3]
            if hp.lambda_bone_occ > 0:  # bone points are inside (shape-neutral space)
                occ_bone = self.occupancy_fn(volume)(losses.bone_points(joints, parents))
                terms["bone_occ"] = hp.lambda_bone_occ * losses.occupancy_loss(
                    occ_bone, torch.ones_like(occ_bone))
            if hp.lambda_bone_w > 0:
                pts, target = losses.joint_weight_targets(joints, parents)
                w_j = self.deformer.lbs_net.lbs(pts)[0]  # neutral joints: no warp
                terms["bone_w"] = hp.lambda_bone_w * F.mse_loss(w_j, target.expand_as(w_j))
        with torch.no_grad():
            terms["valid_frac"] = found.float().mean()
        return terms

    def training_step(self, batch: dict, batch_idx: int):
        if self.hparams.stage == "fine":
            return fine_stage.training_step(self, batch)
        opt = self.optimizers()
        terms = self.coarse_losses(batch)
        loss = sum(v for k, v in terms.items() if k != "valid_frac")
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=self.hparams.gradient_clip_val,
                            gradient_clip_algorithm="norm")
        opt.step()
        bs = batch["params"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        for k, v in terms.items():
            self.log(f"train/{k}", v.detach(), batch_size=bs)
        return loss.detach()

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict, batch_idx: int):
        if self.hparams.stage == "fine":
            return fine_stage.validation_step(self, batch, batch_idx)
        from lib.model.validation import iou, save_validation_picture

        flame_out = self.flame_server(batch["params"])
        z_shape = self.z_shapes(batch["index"])
        with torch.no_grad():
            logits = self.occupancy(batch["pts_d"], batch["params"], {"z_shape": z_shape})
        value = iou(logits[..., None] > 0, batch["occ_gt"] > 0.5)
        self.log("val/iou", value, prog_bar=True, batch_size=1, sync_dist=True)
        vcfg = self.hparams.validation or {}
        if batch_idx < vcfg.get("n_pictures", 2) and self.trainer.is_global_zero:
            path = (Path(self.hparams.output_dir) / "medias"
                    / f"epoch{self.current_epoch:04d}_{batch['scan_id'][0]}.png")
            save_validation_picture(self, z_shape, flame_out, path,
                                    res_init=vcfg.get("mesh_res_init", 16),
                                    res_final=vcfg.get("mesh_res_final", 128))
        return value

"""The GANHead LightningModule: auto-decoded latents, generator, implicit networks, learned
deformer and geometry queries (docs/design.md, Networks). Training is delegated to the stage
object of `hparams.stage` (lib/model/stage.py): CoarseStage (lib/model/coarse_stage.py,
stage 1) or FineStage (lib/model/fine_stage.py, stage 2).

Shape legend: B batch, N points per scan, M canonical points queried, I initializations (5),
J joints (5), V FLAME vertices, Z, D, C widths of z_shape, z_detail, z_color.

Training uses Lightning 2 manual optimization (the original's PL 1.3 `optimizer_idx` is gone),
with gradient clipping done by the stage (`TrainingStage.optimizer_step`, `clip_gradients`).
"""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from lib.dataset.faceverse import validate_scan_id
from lib.flame import FlameFrames, FLAMEServer
from lib.model import losses, query
from lib.model.builders import build_deformer, build_network
from lib.model.coarse_stage import CoarseStage
from lib.model.discriminator import Discriminator
from lib.model.fine_stage import FineStage
from lib.model.generator import Generator, sample_volume
from lib.model.neutral_lbs import NeutralLBS
from lib.model.stage import TrainingStage

# hparams.stage -> the stage object GANHead delegates training to
STAGES: dict[str, type[TrainingStage]] = {"coarse": CoarseStage, "fine": FineStage}


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
        if stage not in STAGES:
            raise ValueError(f"GANHead: stage={stage!r}, expected one of {sorted(STAGES)}")
        kwargs = {k: _plain(v) for k, v in locals().items() if k not in ("self", "__class__")}
        self.save_hyperparameters(kwargs)
        self.automatic_optimization = False
        # a plain attribute, not a child module: the state_dict keys do not depend on it
        self.stage: TrainingStage = STAGES[stage](self)

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
        # runs without GAN keep exactly the same parameters (lib/model/adversarial.py).
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

                found = ", ".join(f"{k}: checkpoint {saved[k]}, file {now[k]}" for k in differs)
                raise CheckpointError(
                    f"the head model {flame.model_path} is not the one this checkpoint was trained "
                    f"with ({found}); pass the training run's datamodule.flame_model / "
                    f"flame_model=PATH")
        for key in [k for k in state if k.startswith("flame_server.")]:
            del state[key]

    # ------------------------------------------------------------------ parameters
    def stage_modules(self) -> list[nn.Module]:
        """Modules trained in the current stage (stage 2 trains only detail and colour)."""
        return self.stage.stage_modules()

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
        """The stage's optimizers (TrainingStage.configure_optimizers, lib/model/stage.py)."""
        return self.stage.configure_optimizers()

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

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The stage's step (manual optimization); returns the detached loss."""
        return self.stage.training_step(batch)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The stage's validation logs and pictures; returns its main metric."""
        return self.stage.validation_step(batch, batch_idx)

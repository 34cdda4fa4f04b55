"""Train GANHead (Hydra 1.3 + Lightning 2).

    python train.py expname=coarse datamodule=faceverse                      # stage 1
    python train.py expname=fine datamodule=faceverse +experiments=fine \
        starting_path=./outputs/coarse/checkpoints/last.ckpt                   # stage 2
    python train.py expname=coarse datamodule=synthetic +experiments=cpu       # 2-core CPU
    ... trainer.devices=4 trainer.strategy=ddp [trainer.num_nodes=2]           # DDP

Runs land in outputs/<expname>/ (checkpoints/last.ckpt, medias/, logs); `resume=true`
continues a killed run from last.ckpt (optimizer state and epoch included).
"""
from __future__ import annotations

from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf


def load_weights(model: pl.LightningModule, path: str) -> None:
    """Initialize from a checkpoint's weights only (e.g. stage 1 for stage 2)."""
    ckpt_path = Path(path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"starting_path={path}: no such checkpoint")
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    own = model.state_dict()
    reshaped = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    if reshaped:
        raise SystemExit(
            f"starting_path={path}: {len(reshaped)} tensors have other shapes than this "
            f"configuration's networks (e.g. {reshaped[:3]}); start from a checkpoint made with "
            "the same model sizes (stage 1 with +experiments=cpu pairs with +experiments=fine_cpu)")
    usable = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(usable, strict=False)
    fresh = sorted(set(own) - set(usable))
    print(f"[train] loaded {len(usable)} tensors from {path}"
          + (f"; {len(fresh)} start fresh (e.g. {fresh[:3]})" if fresh else ""))


def build_trainer(cfg: DictConfig, output_dir: Path) -> pl.Trainer:
    from pytorch_lightning.callbacks import ModelCheckpoint

    from lib.utils.checkpoint_io import AtomicCheckpointIO

    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else False
    # one file, checkpoints/last.ckpt, rewritten (atomically) every every_n_epochs epochs. (With
    # save_top_k=0 and save_last=True Lightning 2 writes last.ckpt only when training ends.)
    checkpoint = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="last", save_top_k=1,
                                 save_last=False, enable_version_counter=False,
                                 every_n_epochs=cfg.checkpoint.every_n_epochs,
                                 save_on_train_epoch_end=True)
    return pl.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), logger=logger,
                      callbacks=[checkpoint], plugins=[AtomicCheckpointIO()],
                      default_root_dir=str(output_dir))


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from lib.model.ganhead import GANHead

    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    datamodule = hydra.utils.instantiate(cfg.datamodule)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = GANHead(n_subjects=datamodule.n_subjects, output_dir=str(output_dir), **model_cfg)
    if cfg.starting_path:
        load_weights(model, cfg.starting_path)

    ckpt_path = None
    last = output_dir / "checkpoints" / "last.ckpt"
    if cfg.resume:
        if not last.is_file():
            raise FileNotFoundError(f"resume=true but {last} does not exist")
        ckpt_path = str(last)
    trainer = build_trainer(cfg, output_dir)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)


if __name__ == "__main__":
    main()

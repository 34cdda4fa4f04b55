"""Train GANHead (Hydra 1.3 + Lightning 2).

    python train.py expname=coarse datamodule=faceverse                      # stage 1
    python train.py expname=fine datamodule=faceverse +experiments=fine \
        starting_path=./outputs/coarse/checkpoints/last.ckpt                   # stage 2
    python train.py expname=coarse datamodule=synthetic +experiments=cpu       # 2-core CPU
    ... trainer.devices=4 trainer.strategy=ddp [trainer.num_nodes=2]           # DDP

Runs land in outputs/<expname>/ (checkpoints/last.ckpt, medias/, logs, config.yaml written
once training starts); `resume=true` continues a killed run from last.ckpt (optimizer state
and epoch included). A folder that already holds a checkpoint is never trained into without
`resume=true` (or `overwrite=true`). Checkpoints are read without running code from them
(lib/utils/checkpoint_io.py) and carry the scan ids of their embedding rows. Problems found
before training (options, data, checkpoints) are one line `train.py: error: ...`, and such a
run leaves nothing behind.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf


class TrainError(ValueError):
    """train.py cannot start as asked; the message names the file or option and the fix."""


def load_weights(model: pl.LightningModule, path: str) -> None:
    """Initialize from a checkpoint's weights only (e.g. stage 1 for stage 2). The latent
    rows are matched by scan id (remapped when the orders differ; ids the checkpoint lacks
    stop the run, naming them)."""
    import torch

    from lib.model.checkpoint import checkpoint_scan_ids, read_project_checkpoint

    checkpoint = read_project_checkpoint(path)  # an original GANHead file: how to convert it
    model.on_load_checkpoint(checkpoint)  # the FLAME fingerprint; drops stored FLAME arrays
    state = dict(checkpoint["state_dict"])
    own = model.state_dict()
    theirs, ours = checkpoint_scan_ids(checkpoint), model.scan_ids
    embeds = [k for k in ("z_shapes.weight", "z_details.weight", "z_colors.weight") if k in state]
    if theirs is not None and ours is not None and theirs != ours:
        missing = [i for i in ours if i not in theirs]
        if missing:
            raise TrainError(
                f"starting_path={path}: scan ids {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                f" ({len(missing)} of {len(ours)}) of datamodule.data_list are not among the "
                f"checkpoint's {len(theirs)} scans; use the data list of the run that wrote it")
        rows = torch.tensor([theirs.index(i) for i in ours])
        for key in embeds:
            state[key] = state[key][rows]
        print(f"[train] latent rows of {path} remapped by scan id ({len(ours)} scans)")
    elif theirs is None and embeds:
        print(f"[train] {path} stores no scan ids (an older checkpoint): latent rows are "
              "taken in the data list's order")
    reshaped = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    if reshaped:
        raise TrainError(
            f"starting_path={path}: {len(reshaped)} tensors have other shapes than this "
            f"configuration's networks (e.g. {reshaped[:3]}); start from a checkpoint made with "
            "the same model sizes (stage 1 with +experiments=cpu pairs with +experiments=fine_cpu)")
    usable = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(usable, strict=False)
    fresh = sorted(set(own) - set(usable))
    print(f"[train] loaded {len(usable)} tensors from {path}"
          + (f"; {len(fresh)} start fresh (e.g. {fresh[:3]})" if fresh else ""))


def check_output_dir(cfg: DictConfig, output_dir: Path, ids: list[str]) -> str | None:
    """The checkpoint to resume from (None: a new run), or TrainError when the folder holds a
    checkpoint this run would overwrite, or resume=true has nothing (matching) to resume."""
    from lib.model.checkpoint import checkpoint_scan_ids, read_project_checkpoint
    from lib.utils.checkpoint_io import last_checkpoint

    last = last_checkpoint(output_dir)
    if cfg.resume:
        if not last.is_file():
            raise TrainError(f"resume=true but {last} does not exist; start a new run without "
                             "resume=true, or point output_dir= (expname=) at the run to continue")
        theirs = checkpoint_scan_ids(read_project_checkpoint(last))
        if theirs is not None and theirs != ids:
            gone = [i for i in theirs if i not in ids]
            new = [i for i in ids if i not in theirs]
            raise TrainError(
                f"resume=true: {last} was trained on another scan list than "
                f"datamodule.data_list={cfg.datamodule.data_list} (not in the list: {gone[:5]}; "
                f"new in the list: {new[:5]}{'; same ids, other order' if not gone + new else ''})"
                "; resume with the run's own data list")
        return str(last)
    existing = sorted(output_dir.glob("checkpoints/*.ckpt"))
    if existing and not cfg.get("overwrite", False):
        raise TrainError(
            f"{output_dir} already holds a trained run ({existing[0]}); continue it with "
            "resume=true, write elsewhere with expname=NAME (or output_dir=DIR), or replace it "
            "with overwrite=true")
    return None


class SaveConfig(pl.Callback):
    """Writes the resolved config.yaml (atomically) once training starts, so a run that fails
    at once leaves the folder's earlier config.yaml as it was."""

    def __init__(self, cfg: DictConfig, path: Path):
        self.text, self.path = OmegaConf.to_yaml(cfg, resolve=True), path

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lib.utils.atomic import atomic_path

        if trainer.is_global_zero:
            with atomic_path(self.path) as tmp:
                tmp.write_text(self.text)


def build_trainer(cfg: DictConfig, output_dir: Path) -> pl.Trainer:
    from pytorch_lightning.callbacks import ModelCheckpoint

    from lib.model.checkpoint import PROJECT_TARGETS
    from lib.utils.checkpoint_io import AtomicCheckpointIO, last_checkpoint

    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else False
    # one file, checkpoints/last.ckpt, rewritten (atomically) every every_n_epochs epochs. (With
    # save_top_k=0 and save_last=True Lightning 2 writes last.ckpt only when training ends.)
    last = last_checkpoint(output_dir)
    checkpoint = ModelCheckpoint(dirpath=last.parent, filename=last.stem, save_top_k=1,
                                 save_last=False, enable_version_counter=False,
                                 every_n_epochs=cfg.checkpoint.every_n_epochs,
                                 save_on_train_epoch_end=True)
    return pl.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        logger=logger,
        callbacks=[checkpoint, SaveConfig(cfg, output_dir / "config.yaml")],
        plugins=[AtomicCheckpointIO(PROJECT_TARGETS)],
        default_root_dir=str(output_dir),
    )


def prepare(cfg: DictConfig):
    """Everything checked and built before anything is written: (model, datamodule,
    checkpoint to resume or None)."""
    from lib.model.ganhead import GANHead

    output_dir = Path(cfg.output_dir)
    datamodule = hydra.utils.instantiate(cfg.datamodule)
    ids = datamodule.check()  # data list, ids and every scan's files, up front
    ckpt_path = check_output_dir(cfg, output_dir, ids)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = GANHead(scan_ids=ids, output_dir=str(output_dir), **model_cfg)
    if cfg.starting_path:
        load_weights(model, cfg.starting_path)
    if datamodule.stage == "fine":  # caches made from these weights and parameters
        from lib.model.checkpoint import (
            geometry_digest,
            geometry_digest_of_state,
            read_project_checkpoint,
        )

        if ckpt_path is not None:
            state = read_project_checkpoint(ckpt_path)["state_dict"]
            geometry = geometry_digest_of_state(ids, state)
        else:
            geometry = geometry_digest(model) if cfg.starting_path else None
        datamodule.check_cache(geometry, ckpt_path or cfg.starting_path)
    return model, datamodule, ckpt_path


def discard_hydra_run_dir(output_dir: Path) -> None:
    """Remove the log folder Hydra made for this run under <output_dir>/hydra/ (and the
    folders above it that are left empty), so a refused run leaves nothing behind."""
    from hydra.core.hydra_config import HydraConfig

    try:
        run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    except ValueError:  # not started by @hydra.main
        return
    root = (output_dir / "hydra").resolve()
    if root in run_dir.parents:
        shutil.rmtree(run_dir, ignore_errors=True)
        for folder in (root, output_dir.resolve()):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from lib.dataset.faceverse import DataListError
    from lib.dataset.fine import FineDataError
    from lib.flame.loader import FlameModelError
    from lib.model.builders import NetworkConfigError
    from lib.utils.checkpoint_io import CheckpointError

    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.output_dir)
    try:
        model, datamodule, ckpt_path = prepare(cfg)
    except (TrainError, DataListError, FineDataError, FlameModelError, NetworkConfigError,
            CheckpointError) as err:
        discard_hydra_run_dir(output_dir)
        raise SystemExit(f"train.py: error: {' '.join(str(err).split())}") from None
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(cfg, output_dir)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)


if __name__ == "__main__":
    main()

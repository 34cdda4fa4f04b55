"""Lightning data module over preprocessed scans (stage 1 occupancy; stage 2 adds images).

`check()` and `check_cache()` let train.py find bad options, missing scan files and stale
stage-2 caches before anything is written or trained (README, "Files you can trust").
"""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from lib.dataset.faceverse import (
    DataListError,
    ScanOccupancyDataset,
    ScanUniformDataset,
    read_data_list,
)


class ScanDataModule(pl.LightningDataModule):
    """Explicit arguments only; the Hydra `datamodule` group fills them.

    stage: 'coarse' (occupancy items) or 'fine' (images, cache and surface samples).
    """

    def __init__(self, processed_dir: str, data_list: str, batch_size: int = 32,
                 num_workers: int = 4, points_per_frame: int = 2000, repeat: int = 10,
                 val_subjects: int = 4, val_points: int = 20000, subset: int | None = None,
                 stage: str = "coarse", cache_dir: str | None = None, load_res: int = 256,
                 n_views: int = 9, surface_points: int = 2000, flame_model: str | None = None,
                 holdout_views: list[int] | None = None):
        super().__init__()
        self.processed_dir = processed_dir
        self.data_list = data_list
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.points_per_frame = points_per_frame
        self.repeat = repeat
        self.val_subjects = val_subjects
        self.val_points = val_points
        self.subset = subset
        self.stage = stage
        self.cache_dir = cache_dir
        self.load_res = load_res
        self.n_views = n_views
        self.surface_points = surface_points
        self.flame_model = flame_model
        # stage 2: views never shown in training; validation scores them (all views if empty)
        self.holdout_views = sorted(set(int(k) for k in (holdout_views or [])))

    def check(self) -> list[str]:
        """Options and files, up front: returns the data list's scan ids (embedding-row order).
        Raises DataListError naming the option or the first missing files."""
        for name in ("batch_size", "repeat", "n_views", "load_res", "points_per_frame"):
            if int(getattr(self, name)) < 1:
                raise DataListError(f"datamodule.{name}={getattr(self, name)} must be >= 1")
        if int(self.num_workers) < 0:
            raise DataListError(f"datamodule.num_workers={self.num_workers} must be >= 0")
        ids = read_data_list(self.data_list)
        needed = ["occupancy.npz"] + (["surface.npz"] if self.stage == "fine" else [])
        root = Path(self.processed_dir)
        missing = [f"{sid}/{name}" for sid in ids for name in needed
                   if not (root / sid / name).is_file()]
        if missing:
            raise DataListError(
                f"{self.data_list}: {len(missing)} file(s) of its scans are missing under "
                f"datamodule.processed_dir={root} (e.g. {missing[:3]}); run preprocess.py or "
                "pass the data list and processed folder that belong together")
        from lib.dataset.processed_layout import LayoutError, detect_layout

        for sid in ids:  # either layout, this project's or the original GANHead's (headers only)
            try:
                detect_layout(root / sid)
            except LayoutError as err:
                raise DataListError(str(err)) from None
        return ids

    def check_cache(self, geometry: str | None, source: str | None) -> None:
        """Stage 2: every scan's cache exists and was made from this run's stage-1 model and
        the scan's current FLAME parameters. geometry: lib/model/checkpoint.geometry_digest of
        the weights the run starts or resumes from (None: nothing to compare with); source:
        that checkpoint's path (for the message)."""
        from lib.dataset.cache_file import (
            CACHE_CONTENT,
            RECORD_KEYS,
            find_cache,
            params_digest,
            read_source,
        )
        from lib.dataset.processed_layout import LayoutError, read_flame_params

        if self.cache_dir is None:
            raise DataListError("datamodule.cache_dir is not set; run precompute.py on the "
                                "stage-1 checkpoint and pass its cache folder")
        cache_dir, stale, unrecorded, original = Path(self.cache_dir), [], 0, 0
        for sid in read_data_list(self.data_list):
            found = find_cache(cache_dir, sid)
            if found is None:
                raise DataListError(f"{cache_dir / (sid + '.npz')}: stage-2 cache not found (nor "
                                    f"the original's {sid}.npy with {sid}_pose.npy); run "
                                    "precompute.py with the stage-1 checkpoint and this run's "
                                    "datamodule options")
            if found[0] == "original":
                original += 1
                continue
            record = read_source(found[1])
            if record is None:
                unrecorded += 1
                continue
            try:
                params = params_digest(read_flame_params(Path(self.processed_dir) / sid))
            except LayoutError as err:
                raise DataListError(str(err)) from None
            if record.get("params") != params:
                stale.append(f"{sid} (FLAME parameters changed since)")
            elif record.get("content") != CACHE_CONTENT:
                stale.append(f"{sid} ({RECORD_KEYS['content']})")
            elif geometry is not None and record.get("geometry") != geometry:
                stale.append(f"{sid} (made by another stage-1 model: {record.get('checkpoint')})")
        if stale:
            raise DataListError(
                f"{cache_dir}: {len(stale)} stale stage-2 cache file(s), e.g. {stale[:3]}; rerun "
                f"precompute.py with ckpt={source} (it recomputes them)")
        if unrecorded:
            print(f"[train] {unrecorded} cache file(s) in {cache_dir} record no sources (written "
                  "before caches did); used as they are")
        if original:
            print(f"[train] {original} cache file(s) in {cache_dir} are the original GANHead's "
                  "(<id>.npy, <id>_pose.npy); used as they are")

    @property
    def n_subjects(self) -> int:
        """Rows of the latent embeddings: every scan of the data list."""
        return len(read_data_list(self.data_list))

    def setup(self, stage: str | None = None) -> None:
        if self.stage == "fine":
            from lib.dataset.fine import ScanImageDataset

            held = self.holdout_views
            train_views = [k for k in range(self.n_views) if k not in held]
            if not train_views:
                raise ValueError(f"datamodule.holdout_views={held} leaves no training view "
                                 f"of n_views={self.n_views}")
            self.train_set = ScanImageDataset(
                self.processed_dir, self.data_list, self.cache_dir, n_views=self.n_views,
                load_res=self.load_res, surface_points=self.surface_points,
                repeat=self.repeat, subset=self.subset, views=train_views)
            # validation: every held-out view of each validation scan (one fixed view each
            # when nothing is held out)
            self.val_set = ScanImageDataset(
                self.processed_dir, self.data_list, self.cache_dir, n_views=self.n_views,
                load_res=self.load_res, surface_points=self.surface_points,
                repeat=max(1, len(held)),
                subset=min(self.val_subjects, self.subset or self.val_subjects),
                fixed_view=True, views=held or None)
        else:
            self.train_set = ScanOccupancyDataset(
                self.processed_dir, self.data_list, points_per_frame=self.points_per_frame,
                repeat=self.repeat, subset=self.subset)
            self.val_set = ScanUniformDataset(
                self.processed_dir, self.data_list, n_points=self.val_points,
                subset=min(self.val_subjects, self.subset or self.val_subjects))

    def _loader(self, dataset, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, drop_last=False,
                          persistent_workers=self.num_workers > 0, pin_memory=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False, 1)

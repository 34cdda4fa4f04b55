"""Training data: preprocessed FaceVerse-layout scans (docs/design.md, Processed scan
folder) as torch datasets.

Shape legend: N sampled points per scan, M surface samples, H/W image size, P = 169
FLAME parameter vector (scale 1, transl 3, pose 15, shape 100, exp 50).

Each scan is one subject of the auto-decoder: its row in the data list is its index into the
latent embeddings, so the order of the data list (sorted ids) must stay fixed between
stage 1, precompute and stage 2.

Processed scan folders are read in either layout, this project's or the original GANHead's
(lib/dataset/processed_layout.py tells them apart by their files).

Scan ids name folders (`<processed>/<id>/`), so every id is checked by `validate_scan_id`
(also used by preprocess.py for the scan folder names): a single safe path part, i.e. not
empty, not `.` or `..`, no leading dot, no `/` or `\\`, no whitespace or control characters.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lib.dataset.processed_layout import LayoutError, read_occupancy


class DataListError(ValueError):
    """The data list CSV is missing or malformed."""


def scan_id_problem(scan_id: str) -> str | None:
    """What makes `scan_id` unsafe as a folder name (module docstring), or None if it is safe."""
    if not scan_id:
        return "is empty"
    if scan_id in (".", ".."):
        return "is a relative folder reference"
    if "/" in scan_id or "\\" in scan_id:
        return "contains a path separator"
    if scan_id.startswith("."):
        return "starts with a dot (a hidden name)"
    bad = next((c for c in scan_id if c.isspace() or not c.isprintable()), None)
    if bad is not None:
        return f"contains whitespace or a control character ({bad!r})"
    return None


def validate_scan_id(scan_id: str, where, error: type[Exception] = ValueError) -> str:
    """Return `scan_id` if it is a safe folder name, else raise `error` with one line naming
    `where` (a file or folder), the id and what is wrong."""
    problem = scan_id_problem(scan_id)
    if problem is not None:
        raise error(f"{where}: scan id {scan_id!r} {problem}; scan ids must be plain folder "
                    "names (rename the scan or fix the row)")
    return scan_id


def read_data_list(path: str | os.PathLike) -> list[str]:
    """Scan ids of a data list CSV (`id,dataset` header), sorted; every id must pass
    `validate_scan_id` (else DataListError naming the file, the id and the problem).

    Returns: list of ids, sorted so every stage assigns the same embedding index.
    """
    path = Path(path)
    if not path.is_file():
        raise DataListError(
            f"{path}: data list not found; run preprocess.py first (it writes the list of "
            "complete scans)")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and "id" not in rows[0]:
        raise DataListError(f"{path}: expected a header with an 'id' column")
    ids = sorted({row["id"].strip() for row in rows if (row.get("id") or "").strip()})
    for i in ids:
        validate_scan_id(i, path, DataListError)
    if not ids:
        raise DataListError(f"{path}: the data list names no scans")
    return ids


class ScanOccupancyDataset(Dataset):
    """Stage-1 items: occupancy samples of each scan, repeated `repeat` times per epoch.

    Item:
        index: int, the scan's embedding row
        params: [P] float32 FLAME parameter vector
        pts_d: [N_surface + N_uniform, 3] deformed-space points (near-surface, then uniform)
        occ_gt: [N_surface + N_uniform, 1] 1 inside, 0 outside
    """

    def __init__(self, processed_dir: str | os.PathLike, data_list: str | os.PathLike,
                 points_per_frame: int = 2000, n_uniform: int | None = None, repeat: int = 10,
                 subset: int | None = None, deterministic: bool = False):
        self.processed_dir = Path(processed_dir)
        self.ids = read_data_list(data_list)
        self.n_subjects = len(self.ids)
        self.items = self.ids if subset is None else self.ids[:subset]
        self.points_per_frame = int(points_per_frame)
        # The original pairs every 2,000 near-surface points with 250 uniform ones (1/8).
        self.n_uniform = self.points_per_frame // 8 if n_uniform is None else int(n_uniform)
        self.repeat = max(1, int(repeat))
        self.deterministic = deterministic

    def __len__(self) -> int:
        return len(self.items) * self.repeat

    def index_of(self, scan_id: str) -> int:
        return self.ids.index(scan_id)

    def _load(self, scan_id: str) -> dict[str, np.ndarray]:
        """-> flame_params [P] float32, pts_d [N, 3], occ_gt [N, 1] of either layout."""
        try:
            return read_occupancy(self.processed_dir / scan_id)
        except LayoutError as err:
            raise DataListError(str(err)) from None

    def __getitem__(self, i: int) -> dict:
        scan_id = self.items[i % len(self.items)]
        occ = self._load(scan_id)
        pts, lab = occ["pts_d"], occ["occ_gt"]
        n_half = pts.shape[0] // 2  # first half near-surface, second half uniform
        # torch's generator: seeded by `seed` (pl.seed_everything, workers too), so runs repeat
        gen = torch.Generator().manual_seed(i) if self.deterministic else None
        surf = torch.randint(0, n_half, (self.points_per_frame,), generator=gen)
        unif = torch.randint(n_half, pts.shape[0], (self.n_uniform,), generator=gen)
        sel = torch.cat([surf, unif]).numpy()
        return {
            "index": self.index_of(scan_id),
            "scan_id": scan_id,
            "params": torch.from_numpy(occ["flame_params"]),
            "pts_d": torch.from_numpy(pts[sel].astype(np.float32)),
            "occ_gt": torch.from_numpy(lab[sel].astype(np.float32).reshape(-1, 1)),
        }


class ScanUniformDataset(ScanOccupancyDataset):
    """Validation items: a fixed set of the uniform points of each scan (for volumetric IoU)."""

    def __init__(self, processed_dir, data_list, n_points: int = 20000, subset: int | None = 4):
        super().__init__(processed_dir, data_list, points_per_frame=0, n_uniform=n_points,
                         repeat=1, subset=subset, deterministic=True)

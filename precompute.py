"""Precompute the stage-2 correspondence cache from a trained stage-1 model.

    python precompute.py expname=coarse datamodule=faceverse agent_tot=1 agent_id=0
    python precompute.py datamodule=synthetic +experiments=fine_cpu     # 128 x 128 cache

For each training scan of this agent's share of one sorted list, and each of the 9 views, the
canonical point shown by every pixel and a mask: `<datamodule.cache_dir>/<id>.npz` with
`cache (9, R, R, 4)` float32 (R = datamodule.load_res, 256 by default) and `view_params
(9, 169)`. Stage 2 reads the same `datamodule.cache_dir` and needs the same load_res, so run
this with the overrides (experiment) of the stage-2 run. The stage-1 checkpoint is `ckpt`, by
default `<output_dir_coarse>/checkpoints/last.ckpt` (outputs/coarse). Written atomically;
finished scans are skipped, so a killed run resumes; the run ends with a summary and a
non-zero exit status when a scan failed.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm


def cache_complete(path: Path, n_views: int, res: int) -> bool:
    """True when `path` holds a readable cache of the expected shapes."""
    try:
        with np.load(path) as data:
            return (data["cache"].shape == (n_views, res, res, 4)
                    and data["view_params"].shape[0] == n_views)
    except (OSError, KeyError, ValueError):
        return False


def load_model(cfg: DictConfig, device: torch.device):
    from lib.model.ganhead import GANHead

    ckpt = (Path(cfg.ckpt) if cfg.get("ckpt")
            else Path(cfg.output_dir_coarse) / "checkpoints" / "last.ckpt")
    if not ckpt.is_file():
        raise SystemExit(f"precompute: stage-1 checkpoint {ckpt} not found; train stage 1 "
                         f"first (python train.py expname=coarse ...), or pass "
                         f"output_dir_coarse=RUN_DIR or ckpt=PATH")
    model = GANHead.load_from_checkpoint(ckpt, map_location=device,
                                         flame_model=cfg.datamodule.flame_model)
    return model.eval().to(device)


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from lib.dataset.faceverse import read_data_list
    from lib.model.correspondence import scan_correspondences
    from lib.utils.mesh_io import save_npz

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dm = cfg.datamodule
    ids = read_data_list(dm.data_list)
    tot, rank = int(cfg.agent_tot), int(cfg.agent_id)
    if not 0 <= rank < tot:
        raise SystemExit(f"precompute: agent_id={rank} must be in [0, agent_tot={tot})")
    mine = ids[rank::tot]
    cache_dir = Path(dm.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg, device)
    if model.z_shapes.num_embeddings != len(ids):
        raise SystemExit(f"precompute: {dm.data_list} lists {len(ids)} scans but the checkpoint "
                         f"has {model.z_shapes.num_embeddings} latent codes; use the data list "
                         "of the stage-1 run")
    print(f"precompute: {len(mine)} scans (agent {rank}/{tot}), {dm.n_views} views at "
          f"{dm.load_res}x{dm.load_res}, mesh_res {cfg.precompute.mesh_res}, on {device} "
          f"-> {cache_dir}")

    done = skipped = 0
    failed: list[str] = []
    t0 = time.time()
    for scan_id in tqdm(mine, desc=f"precompute {rank + 1}/{tot}", unit="scan"):
        out = cache_dir / f"{scan_id}.npz"
        if cache_complete(out, dm.n_views, dm.load_res):
            skipped += 1
            continue
        try:
            with np.load(Path(dm.processed_dir) / scan_id / "occupancy.npz") as occ:
                params = torch.as_tensor(occ["flame_params"], dtype=torch.float32)
            res = scan_correspondences(model, ids.index(scan_id), params, n_views=dm.n_views,
                                       res=dm.load_res, mesh_res=cfg.precompute.mesh_res)
            save_npz(out, cache=res["cache"].cpu().numpy().astype(np.float32),
                     view_params=res["view_params"].cpu().numpy().astype(np.float32))
            done += 1
        except Exception as err:  # one line per bad scan; the others go on
            tqdm.write(f"precompute: {scan_id}: {type(err).__name__}: {err}")
            failed.append(scan_id)
    print(f"precompute: {done} written, {skipped} already complete, {len(failed)} failed "
          f"of {len(mine)} in {time.time() - t0:.1f} s -> {cache_dir}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()

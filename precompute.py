"""Precompute the stage-2 correspondence cache from a trained stage-1 model.

    python precompute.py expname=coarse datamodule=faceverse agent_tot=1 agent_id=0
    python precompute.py datamodule=synthetic +experiments=fine_cpu     # 128 x 128 cache

For each training scan of this agent's share of one sorted list, and each of the 9 views, the
shape-neutral canonical point shown by every pixel and a mask (the original's cache content;
`precompute.method`: search, the original's, or mesh; lib/model/correspondence.py):
`<datamodule.cache_dir>/<id>.npz` with `cache (9, R, R, 4)` float32 (R = datamodule.load_res,
256 by default) and `view_params (9, 169)`. Stage 2 also reads the original's cache files
(`cache_img_dvr_pyrender/<id>.npy` and `<id>_pose.npy`: point `datamodule.cache_dir` there).
Stage 2 reads the same `datamodule.cache_dir` and needs the same load_res, so run this with
the overrides (experiment) of the stage-2 run. The stage-1 checkpoint is `ckpt`, by
default `<output_dir_coarse>/checkpoints/last.ckpt` (outputs/coarse), loaded without running
code from it. Each file records what it was made from (lib/dataset/cache_file.py: the stage-1
model's digest, the scan's FLAME parameters, mesh_res): finished scans with the same sources
are skipped, so a killed run resumes, and files made from other sources are recomputed (a line
says which source changed). Written atomically; the run ends with a summary and a non-zero
exit status when a scan failed; a bad option, data list or checkpoint is one line
`precompute.py: error: ...`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm


class PrecomputeError(ValueError):
    """precompute.py cannot run as asked; the message names the file or option."""


def load_model(cfg: DictConfig, device: torch.device):
    """The stage-1 (or stage-2) checkpoint `ckpt`, loaded safely (lib/model/checkpoint.py)."""
    from lib.model.checkpoint import load_ganhead
    from lib.utils.checkpoint_io import last_checkpoint

    ckpt = Path(cfg.ckpt) if cfg.get("ckpt") else last_checkpoint(cfg.output_dir_coarse)
    if not ckpt.is_file():
        raise PrecomputeError(f"stage-1 checkpoint {ckpt} not found; train stage 1 first "
                              "(python train.py expname=coarse ...), or pass "
                              "output_dir_coarse=RUN_DIR or ckpt=PATH")
    model = load_ganhead(ckpt, map_location=device, flame_model=cfg.datamodule.flame_model)
    return model.eval().to(device), ckpt


def subject_rows(model, ids: list[str], data_list) -> dict[str, int]:
    """Embedding row of every scan id, through the ids the checkpoint stores (checkpoints
    written before they were stored: the data list's order, when its length matches)."""
    if model.scan_ids is not None:
        try:
            rows = model.subject_rows(ids)
        except KeyError as err:
            raise PrecomputeError(f"{data_list}: {err.args[0]}; use the data list of the "
                                  "stage-1 run") from None
        return dict(zip(ids, rows.tolist()))
    if model.z_shapes.num_embeddings != len(ids):
        raise PrecomputeError(f"{data_list} lists {len(ids)} scans but the checkpoint has "
                              f"{model.z_shapes.num_embeddings} latent codes; use the data "
                              "list of the stage-1 run")
    return {sid: i for i, sid in enumerate(ids)}


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from lib.dataset.faceverse import DataListError
    from lib.flame.loader import FlameModelError
    from lib.utils.checkpoint_io import CheckpointError

    try:
        failed = run(cfg)
    except (PrecomputeError, DataListError, CheckpointError, FlameModelError) as err:
        raise SystemExit(f"precompute.py: error: {err}") from None
    if failed:
        sys.exit(1)


def run(cfg: DictConfig) -> list[str]:
    """Write this agent's share of the cache; returns the ids that failed."""
    from lib.dataset.cache_file import cache_record, cache_status, find_cache, write_cache
    from lib.dataset.faceverse import read_data_list
    from lib.dataset.processed_layout import read_flame_params
    from lib.model.checkpoint import geometry_digest
    from lib.model.correspondence import METHODS, scan_correspondences

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dm = cfg.datamodule
    ids = read_data_list(dm.data_list)
    tot, rank = int(cfg.agent_tot), int(cfg.agent_id)
    if not 0 <= rank < tot:
        raise PrecomputeError(f"agent_id={rank} must be in [0, agent_tot={tot})")
    mine = ids[rank::tot]
    cache_dir = Path(dm.cache_dir)
    model, ckpt = load_model(cfg, device)
    rows = subject_rows(model, ids, dm.data_list)
    geometry = geometry_digest(model)
    mesh_res = int(cfg.precompute.mesh_res)
    method = str(cfg.precompute.get("method", "search"))
    if method not in METHODS:
        raise PrecomputeError(f"precompute.method={method} must be one of {list(METHODS)}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"precompute: {len(mine)} scans (agent {rank}/{tot}), {dm.n_views} views at "
          f"{dm.load_res}x{dm.load_res}, mesh_res {mesh_res}, method {method}, on {device} -> "
          f"{cache_dir}")

    done = skipped = unrecorded = original = redone = lost = hits = 0
    failed: list[str] = []
    t0 = time.time()
    for scan_id in tqdm(mine, desc=f"precompute {rank + 1}/{tot}", unit="scan"):
        out = cache_dir / f"{scan_id}.npz"
        found = find_cache(cache_dir, scan_id)  # this project's <id>.npz first
        if found is not None and found[0] == "original":
            original += 1  # the original GANHead's cache of this scan: read as it is, kept
            continue
        try:
            params = torch.as_tensor(read_flame_params(Path(dm.processed_dir) / scan_id))
            record = cache_record(geometry, params.numpy(), mesh_res, str(ckpt), method)
            status, why = cache_status(out, dm.n_views, dm.load_res, record)
            if status == "ok":
                skipped += 1
                continue
            if status == "unrecorded":  # made before caches recorded their sources: kept
                unrecorded += 1
                continue
            if status == "stale":
                tqdm.write(f"precompute: {scan_id}: {out} was {why}; recomputing")
            res = scan_correspondences(model, rows[scan_id], params, n_views=dm.n_views,
                                       res=dm.load_res, mesh_res=mesh_res, method=method)
            n_hit, n_valid = int(res["n_hit"].sum()), int(res["n_valid"].sum())
            lost += n_hit - n_valid
            hits += n_hit
            write_cache(out, res["cache"].cpu().numpy(), res["view_params"].cpu().numpy(),
                        record)
            done += 1
            redone += status == "stale"
        except Exception as err:  # one line per bad scan; the others go on
            tqdm.write(f"precompute: {scan_id}: {type(err).__name__}: {err}")
            failed.append(scan_id)
    kept = (f", {unrecorded} kept without a provenance record (delete them to recompute)"
            if unrecorded else "")
    if original:
        kept += f", {original} kept as the original GANHead's cache files"
    searched = (f"; the search found no valid root for {lost} of {hits} surface pixels "
                f"({100.0 * lost / hits:.2f}%, left out of the masks)" if hits else "")
    print(f"precompute: {done} written ({redone} of them stale), {skipped} already complete"
          f"{kept}, {len(failed)} failed of {len(mine)} in {time.time() - t0:.1f} s "
          f"-> {cache_dir}{searched}")
    return failed


if __name__ == "__main__":
    main()

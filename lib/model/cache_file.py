"""The stage-2 correspondence cache file `<cache_dir>/<id>.npz` and what it was made from.

Shape legend: K views, R cache resolution, P parameter-vector length (169).

Arrays: `cache [K, R, R, 4]` float32 (canonical xyz, mask) and `view_params [K, P]` float32,
as lib/model/correspondence.py computes them, plus `source`: a JSON string recording what the
file was made from (README, "Files you can trust"):

    geometry   lib/model/checkpoint.geometry_digest of the stage-1 model (its scan ids and
               geometry/deformation weights)
    params     sha256 of the scan's FLAME parameter vector (float32) read from occupancy.npz
    mesh_res   canonical mesh resolution;  checkpoint: the file it was loaded from (for people)

`cache_status` compares a file with the record a run would write now: precompute.py
recomputes a stale file (saying which source changed) and train.py refuses to start stage 2
on caches made by another stage-1 model. Files written before records existed report
'unrecorded' and are kept.
"""
from __future__ import annotations

import hashlib
import json
import numpy as np

from lib.utils.mesh_io import save_npz
from lib.utils.npz import npz_headers

__all__ = ["params_digest", "cache_record", "write_cache", "read_source", "cache_status",
           "RECORD_KEYS"]

# record keys compared by cache_status, with what a change means
RECORD_KEYS = {"geometry": "made by another stage-1 model",
               "params": "the scan's FLAME parameters changed since",
               "mesh_res": "made with another precompute.mesh_res"}


def params_digest(params) -> str:
    """Hex sha256 of a FLAME parameter vector [P] (as float32)."""
    arr = np.ascontiguousarray(np.asarray(params, dtype=np.float32).reshape(-1))
    return hashlib.sha256(arr.tobytes()).hexdigest()


def cache_record(geometry: str, params, mesh_res: int, checkpoint: str = "") -> dict:
    """The `source` record of one cache file (module docstring)."""
    return {"geometry": geometry, "params": params_digest(params), "mesh_res": int(mesh_res),
            "checkpoint": str(checkpoint)}


def write_cache(path, cache: np.ndarray, view_params: np.ndarray, record: dict) -> None:
    """Write one cache file atomically. cache: [K, R, R, 4]; view_params: [K, P]."""
    save_npz(path, cache=np.asarray(cache, np.float32),
             view_params=np.asarray(view_params, np.float32),
             source=np.str_(json.dumps(record, sort_keys=True)))


def read_source(path) -> dict | None:
    """The `source` record of a cache file; None when it has none (or cannot be read)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "source" not in data.files:
                return None
            record = json.loads(str(data["source"]))
    except (OSError, ValueError, KeyError):
        return None
    return record if isinstance(record, dict) else None


def cache_status(path, n_views: int, res: int, expected: dict | None) -> tuple[str, str]:
    """Whether a cache file can be reused.

    expected: the record a run would write now, or the part of it to compare (its keys among
    RECORD_KEYS; None: do not compare). Returns (status,
    reason): 'missing' (absent, unreadable or other shapes), 'unrecorded' (readable, no
    record), 'stale' (a recorded source differs; reason says which), 'ok'.
    """
    headers = npz_headers(path)
    if headers is None or "cache" not in headers or "view_params" not in headers:
        return "missing", "absent or unreadable"
    if (headers["cache"][0] != (n_views, res, res, 4)
            or headers["view_params"][0][:1] != (n_views,)):
        return "missing", f"not {n_views} views at {res}x{res}"
    record = read_source(path)
    if record is None:
        return "unrecorded", "written before caches recorded their sources"
    if expected is not None:
        changed = [why for key, why in RECORD_KEYS.items()
                   if key in expected and record.get(key) != expected[key]]
        if changed:
            return "stale", "; ".join(changed)
    return "ok", ""

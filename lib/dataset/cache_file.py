"""The stage-2 correspondence cache file `<cache_dir>/<id>.npz` and what it was made from.

Shape legend: K views, R cache resolution, P parameter-vector length (169).

Arrays: `cache [K, R, R, 4]` float32 (shape-neutral canonical xyz, mask) and `view_params
[K, P]` float32, as lib/model/correspondence.py computes them, plus `source`: a JSON string
recording what the file was made from (README, "Files you can trust"):

    geometry   lib/model/checkpoint.geometry_digest of the stage-1 model (its scan ids and
               geometry/deformation weights)
    params     sha256 of the scan's FLAME parameter vector (float32) read from occupancy.npz
    mesh_res   canonical mesh resolution;  method: "search" or "mesh" (precompute.method)
    content    CACHE_CONTENT: what the points and views are (files of an earlier precompute
               held shaped canonical points of yaw-only views: stale)
    checkpoint the file it was loaded from (for people)

The original GANHead's precompute writes `<dir>/<id>.npy` (the same [K, R, R, 4] content:
shape-neutral points, 1 outside the mask, mask) and `<id>_pose.npy` (the views' parameters
[K, P]); `find_cache` / `read_cache` read either, told by the files present (this project's
.npz first), and precompute.py never writes beside the original's files of a scan.

`cache_status` compares a file with the record a run would write now: precompute.py
recomputes a stale file (saying which source changed) and train.py refuses to start stage 2
on caches made by another stage-1 model. Files written before records existed report
'unrecorded' and are kept.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from lib.utils.mesh_io import save_npz
from lib.utils.npz import npz_headers

__all__ = ["params_digest", "cache_record", "write_cache", "read_source", "cache_status",
           "RECORD_KEYS", "CACHE_CONTENT", "CacheFileError", "find_cache", "read_cache"]

CACHE_CONTENT = "neutral points; views yaw after the fitted rotation"

# record keys compared by cache_status, with what a change means
RECORD_KEYS = {"geometry": "made by another stage-1 model",
               "params": "the scan's FLAME parameters changed since",
               "mesh_res": "made with another precompute.mesh_res",
               "method": "made with another precompute.method",
               "content": "made by an earlier precompute (shaped points, yaw-only views)"}


def params_digest(params) -> str:
    """Hex sha256 of a FLAME parameter vector [P] (as float32)."""
    arr = np.ascontiguousarray(np.asarray(params, dtype=np.float32).reshape(-1))
    return hashlib.sha256(arr.tobytes()).hexdigest()


def cache_record(geometry: str, params, mesh_res: int, checkpoint: str = "",
                 method: str = "search") -> dict:
    """The `source` record of one cache file (module docstring)."""
    return {"geometry": geometry, "params": params_digest(params), "mesh_res": int(mesh_res),
            "method": str(method), "content": CACHE_CONTENT, "checkpoint": str(checkpoint)}


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


class CacheFileError(ValueError):
    """A scan's cache is missing or unreadable; the message names the files."""


def find_cache(cache_dir, scan_id: str):
    """-> ("project", <id>.npz) or ("original", (<id>.npy, <id>_pose.npy)) by the files
    present in cache_dir (this project's first); None when neither is there."""
    d = Path(cache_dir)
    ours = d / f"{scan_id}.npz"
    if ours.is_file():
        return "project", ours
    pts, pose = d / f"{scan_id}.npy", d / f"{scan_id}_pose.npy"
    if pts.is_file() and pose.is_file():
        return "original", (pts, pose)
    return None


def read_cache(cache_dir, scan_id: str, hint: str = "run precompute.py"):
    """A scan's cache in either layout -> (cache [K, R, R, 4] float32 as stored (outside the
    mask: 0 in ours, 1 in the original's), view_params [K, P] float32, path for messages).
    Raises CacheFileError naming the files."""
    found = find_cache(cache_dir, scan_id)
    d = Path(cache_dir)
    if found is None:
        raise CacheFileError(f"{d / (scan_id + '.npz')}: not found (nor the original's "
                             f"{scan_id}.npy with {scan_id}_pose.npy in {d}); {hint}")
    kind, where = found
    try:
        if kind == "project":
            with np.load(where, allow_pickle=False) as z:
                missing = [k for k in ("cache", "view_params") if k not in z.files]
                if missing:
                    raise CacheFileError(f"{where}: lacks {missing}; {hint}")
                cache, vp = z["cache"], z["view_params"]
            path = str(where)
        else:
            cache = np.load(where[0], allow_pickle=False)
            vp = np.load(where[1], allow_pickle=False)
            path = f"{where[0]} (with {where[1].name})"
    except CacheFileError:
        raise
    except Exception as err:  # noqa: BLE001 - unreadable: one line naming the file
        raise CacheFileError(f"{where if kind == 'project' else where[0]}: unreadable "
                             f"({type(err).__name__}: {err}); {hint}") from None
    if cache.dtype.kind != "f" or vp.dtype.kind != "f":
        raise CacheFileError(f"{path}: expected float arrays, got {cache.dtype} / {vp.dtype}")
    return np.asarray(cache, dtype=np.float32), np.asarray(vp, dtype=np.float32), path

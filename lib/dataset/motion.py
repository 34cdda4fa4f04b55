"""Motion sequence files: reading and writing (docs/design.md, Motion sequences).

A motion is a dict of numpy float32 arrays

    expression (T, 50)   FLAME expression coefficients per frame
    pose       (T, 15)   global 3, neck 3, jaw 3, left eye 3, right eye 3 (axis-angle)
    shape      (100,)    identity coefficients (constant over the sequence)
    fps        float     frames per second (optional in files, default 30)

Files: the IMavatar ``flame_params.json`` form (``shape_params`` at the top level, ``frames``:
list of {``expression``, ``pose``, ``frame_id``}; a frame's pose may also be 6 values, global
and jaw) and a plain ``.npz`` with the same arrays. Synthetic motions are made by
lib/synthetic/motion.py.

Shape legend: T frames.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lib.utils.atomic import atomic_path
from lib.utils.errors import finite_vector

__all__ = ["MotionFormatError", "save_motion_json", "save_motion_npz", "load_motion",
           "N_EXP", "N_POSE", "N_SHAPE"]

N_EXP = 50
N_POSE = 15
N_SHAPE = 100


class MotionFormatError(ValueError):
    """A motion file is missing, unreadable or has a malformed field (the message names both)."""


def _checked(motion: dict, where: str) -> dict:
    fields = {k: motion.get(k) for k in ("expression", "pose", "shape")}
    return _validate({**fields, "fps": motion.get("fps", 30.0)}, where)


def save_motion_json(path, motion: dict) -> None:
    """Write the IMavatar ``flame_params.json`` form atomically.

    motion: dict(expression (T, 50), pose (T, 15), shape (100,), optional fps).
    """
    path = Path(path)
    m = _checked(motion, str(path))
    doc = {
        "shape_params": [float(x) for x in m["shape"]],
        "fps": float(m["fps"]),
        "frames": [
            {"frame_id": i, "expression": [float(x) for x in e], "pose": [float(x) for x in p]}
            for i, (e, p) in enumerate(zip(m["expression"], m["pose"]))
        ],
    }

    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(doc, fh)


def save_motion_npz(path, motion: dict) -> None:
    """Write ``expression (T,50)``, ``pose (T,15)``, ``shape (100,)``, ``fps`` to an .npz
    atomically."""
    path = Path(path)
    m = _checked(motion, str(path))

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, expression=m["expression"], pose=m["pose"], shape=m["shape"],
                     fps=np.float32(m["fps"]))


def _vector(value, name: str, size: int, where: str) -> np.ndarray:
    """A 1-D field of `size` finite numbers of the motion file `where` -> float64 [size]."""
    return finite_vector(value, name, size, lambda msg: MotionFormatError(f"{where}: {msg}"))


def _validate(m: dict, where: str) -> dict:
    """Check and normalise a motion dict; pose (T, 6) = global + jaw is expanded to 15."""
    for key in ("expression", "pose"):
        if m.get(key) is None:
            raise MotionFormatError(f"{where}: missing field '{key}'")
    try:
        exp = np.asarray(m["expression"], dtype=np.float64)
        pose = np.asarray(m["pose"], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MotionFormatError(f"{where}: expression/pose are not numeric arrays ({exc})") from exc
    if exp.ndim != 2 or exp.shape[1] != N_EXP:
        raise MotionFormatError(f"{where}: expression has shape {exp.shape}, expected (T, {N_EXP})")
    if pose.ndim != 2 or pose.shape[1] not in (N_POSE, 6):
        raise MotionFormatError(f"{where}: pose has shape {pose.shape}, expected (T, {N_POSE})")
    if len(exp) != len(pose) or len(exp) == 0:
        raise MotionFormatError(
            f"{where}: expression has {len(exp)} frames but pose has {len(pose)} (need equal, > 0)")
    if pose.shape[1] == 6:
        full = np.zeros((len(pose), N_POSE))
        full[:, 0:3], full[:, 6:9] = pose[:, 0:3], pose[:, 3:6]
        pose = full
    for key, arr in (("expression", exp), ("pose", pose)):
        if not np.all(np.isfinite(arr)):
            bad = int(np.nonzero(~np.all(np.isfinite(arr), axis=1))[0][0])
            raise MotionFormatError(f"{where}: {key}[{bad}] contains NaN or infinite values")
    shape = m.get("shape")
    shape = np.zeros(N_SHAPE) if shape is None else _vector(shape, "shape", N_SHAPE, where)
    fps = float(np.asarray(m.get("fps", 30.0)).reshape(-1)[0])
    if not fps > 0:
        raise MotionFormatError(f"{where}: fps must be positive, found {fps}")
    return {"expression": exp.astype(np.float32), "pose": pose.astype(np.float32),
            "shape": shape.astype(np.float32), "fps": fps}


def _load_json(path: Path) -> dict:
    where = str(path)
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MotionFormatError(f"{where}: not a readable JSON file ({exc})") from exc
    if not isinstance(doc, dict):
        raise MotionFormatError(f"{where}: top level must be an object")
    if "shape_params" not in doc:
        raise MotionFormatError(f"{where}: missing field 'shape_params'")
    shape = _vector(doc["shape_params"], "shape_params", N_SHAPE, where)
    frames = doc.get("frames")
    if not isinstance(frames, list) or not frames:
        raise MotionFormatError(f"{where}: missing or empty field 'frames' (a list of frames)")
    exps, poses = [], []
    for i, fr in enumerate(frames):
        if not isinstance(fr, dict):
            raise MotionFormatError(f"{where}: frames[{i}] is not an object")
        for key in ("expression", "pose"):
            if key not in fr:
                raise MotionFormatError(f"{where}: frames[{i}] is missing field '{key}'")
        exps.append(_vector(fr["expression"], f"frames[{i}].expression", N_EXP, where))
        size = 6 if isinstance(fr["pose"], list) and len(fr["pose"]) == 6 else N_POSE
        poses.append(_vector(fr["pose"], f"frames[{i}].pose", size, where))
    if len({p.size for p in poses}) != 1:
        raise MotionFormatError(f"{where}: frames mix 6- and 15-value poses")
    return _validate({"expression": np.stack(exps), "pose": np.stack(poses), "shape": shape,
                      "fps": doc.get("fps", 30.0)}, where)


def _load_npz(path: Path) -> dict:
    where = str(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile/format errors of many kinds
        raise MotionFormatError(f"{where}: not a readable .npz file ({exc})") from exc
    return _validate({"expression": data.get("expression"), "pose": data.get("pose"),
                      "shape": data.get("shape"), "fps": data.get("fps", 30.0)}, where)


def load_motion(path) -> dict:
    """Read a motion from IMavatar ``.json`` or ``.npz``.

    Returns dict(expression (T, 50), pose (T, 15), shape (100,), fps) float32; raises
    MotionFormatError naming the file and the missing or malformed field.
    """
    path = Path(path)
    if not path.is_file():
        raise MotionFormatError(f"{path}: motion file not found")
    if path.suffix.lower() == ".json":
        return _load_json(path)
    if path.suffix.lower() == ".npz":
        return _load_npz(path)
    raise MotionFormatError(f"{path}: unknown motion format (expected .json or .npz)")

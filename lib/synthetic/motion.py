"""Synthetic talking-like FLAME motion sequences and their file formats (docs/design.md,
Motion sequences).

A motion is a dict of numpy float32 arrays

    expression (T, 50)   FLAME expression coefficients per frame
    pose       (T, 15)   global 3, neck 3, jaw 3, left eye 3, right eye 3 (axis-angle)
    shape      (100,)    identity coefficients (constant over the sequence)
    fps        float     frames per second (optional in files, default 30)

Files: the IMavatar ``flame_params.json`` form (``shape_params`` at the top level, ``frames``:
list of {``expression``, ``pose``, ``frame_id``}) and a plain ``.npz`` with the same arrays.

Shape legend: T frames.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter1d

from lib.utils.atomic import atomic_path

__all__ = ["MotionFormatError", "make_motion", "save_motion_json", "save_motion_npz", "load_motion"]

N_EXP = 50
N_POSE = 15
N_SHAPE = 100
JAW_X = 6  # pose index of the jaw's opening rotation (x axis of joint 2)


class MotionFormatError(ValueError):
    """A motion file is missing, unreadable or has a malformed field (the message names both)."""


def _smooth_noise(rng, n: int, dims: int, sigma_frames: float) -> np.ndarray:
    """Unit-std smooth noise: (n, dims), Gaussian-filtered white noise."""
    pad = int(4 * sigma_frames) + 1
    x = gaussian_filter1d(rng.normal(size=(n + 2 * pad, dims)), sigma_frames, axis=0)[pad:pad + n]
    return x / (x.std(axis=0, keepdims=True) + 1e-8)


def _bump(t: np.ndarray, start: float, duration: float) -> np.ndarray:
    """Raised cosine of height 1 over [start, start + duration]: (len(t),)."""
    s = np.clip((t - start) / duration, 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * s)


def _speech_jaw(rng, t: np.ndarray) -> np.ndarray:
    """Jaw opening (radians) per frame: syllables at 3-5 Hz in phrases separated by pauses."""
    jaw = np.zeros_like(t)
    now = rng.uniform(0.0, 0.2)
    end = t[-1] + 0.5
    while now < end:
        phrase_end = now + rng.uniform(1.0, 2.5)
        while now < phrase_end:
            dur = 1.0 / rng.uniform(3.0, 5.0)
            jaw = np.maximum(jaw, rng.uniform(0.04, 0.25) * _bump(t, now, dur))
            now += dur
        now += rng.uniform(0.25, 0.6)  # pause between phrases
    return jaw


def make_motion(n_frames: int = 150, fps: float = 30.0, seed: int = 0) -> dict:
    """A smooth talking-like sequence.

    Jaw: syllable-rate (3-5 Hz) openings of varying amplitude in phrases with pauses.
    Expression: slow smooth drift of the low-order components plus a few smooth expression
    events (e.g. smile/brow-raise-like bumps of random low-order directions), with a small
    jaw-correlated part (mouth shapes follow speech).
    Head: global and neck rotations of a few degrees; eyes: saccades between fixations
    (both eyes together, smooth 60 ms transitions) plus short blink-like expression bumps.

    Returns dict(expression (T, 50), pose (T, 15), shape (100,), fps) float32.
    """
    if n_frames < 1:
        raise ValueError(f"make_motion: n_frames must be >= 1, got {n_frames}")
    rng = np.random.default_rng(seed)
    T = int(n_frames)
    t = np.arange(T) / float(fps)
    fps = float(fps)

    shape = np.zeros(N_SHAPE)
    shape[:20] = rng.normal(0.0, 1.0, 20) * np.linspace(1.0, 0.3, 20)

    jaw = _speech_jaw(rng, t)

    decay = 1.0 / (1.0 + np.arange(N_EXP) / 4.0)
    expression = 0.4 * _smooth_noise(rng, T, N_EXP, sigma_frames=0.6 * fps) * decay
    mouth_dir = rng.normal(0.0, 1.0, N_EXP) * decay
    expression += np.outer(jaw / 0.25, 0.5 * mouth_dir / np.linalg.norm(mouth_dir))
    for _ in range(max(1, int(round(t[-1] / 2.0 + 1)))):  # roughly one event per 2 s
        direction = np.zeros(N_EXP)
        direction[:10] = rng.normal(0.0, 1.0, 10)
        direction *= rng.uniform(1.0, 2.5) / np.linalg.norm(direction)
        start = rng.uniform(-0.5, max(t[-1], 0.1))
        expression += np.outer(_bump(t, start, rng.uniform(0.8, 2.0)), direction)
    blink_dir = np.zeros(N_EXP)
    blink_dir[:10] = rng.normal(0.0, 1.0, 10)
    blink_dir *= 0.6 / np.linalg.norm(blink_dir)
    now = rng.uniform(0.5, 2.0)
    while now < t[-1] + 0.2:
        expression += np.outer(_bump(t, now, 0.2), blink_dir)
        now += rng.uniform(2.0, 4.5)

    pose = np.zeros((T, N_POSE))
    head = _smooth_noise(rng, T, 6, sigma_frames=0.8 * fps)
    pose[:, 0:3] = head[:, 0:3] * np.deg2rad([1.5, 2.5, 1.0])  # global: pitch, yaw, roll
    pose[:, 3:6] = head[:, 3:6] * np.deg2rad([1.0, 1.5, 0.7])  # neck
    pose[:, JAW_X] = jaw
    gaze = np.zeros((T, 2))
    target = rng.normal(0.0, 1.0, 2) * np.deg2rad([5.0, 8.0])
    now = rng.uniform(0.3, 1.5)
    gaze[:] = target
    while now < t[-1]:
        new = rng.normal(0.0, 1.0, 2) * np.deg2rad([5.0, 8.0])
        s = np.clip((t - now) / 0.06, 0.0, 1.0)
        s = s * s * (3.0 - 2.0 * s)
        gaze = gaze + np.outer(s, new - target)
        target = new
        now += rng.uniform(0.4, 1.8)
    for eye in (9, 12):  # left eye, right eye: pitch about x, yaw about y
        pose[:, eye] = gaze[:, 0]
        pose[:, eye + 1] = gaze[:, 1]

    return {"expression": expression.astype(np.float32), "pose": pose.astype(np.float32),
            "shape": shape.astype(np.float32), "fps": fps}


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
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MotionFormatError(f"{where}: {name} is not numeric ({exc})") from exc
    if arr.ndim != 1:
        raise MotionFormatError(f"{where}: {name} has shape {arr.shape}, expected ({size},)")
    if arr.size != size:
        raise MotionFormatError(f"{where}: {name} has {arr.size} values, expected {size}")
    if not np.all(np.isfinite(arr)):
        raise MotionFormatError(f"{where}: {name} contains NaN or infinite values")
    return arr


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

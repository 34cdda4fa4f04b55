"""FaceVerse FLAME-fit parameter files and the scan <-> FLAME-space transform (docs/design.md,
Scans in FLAME space).

A FaceVerse parameter pickle ``<id>_flame.pkl`` holds float32 numpy arrays

    pose   (15,)    global 3, neck 3, jaw 3, left eye 3, right eye 3 (axis-angle)
    betas  (150,)   100 identity + 50 expression coefficients
    scale  (1, 1)   registration scale of the scan
    transl (1, 3)   registration translation of the scan

Scan to FLAME space (FLAME space = FLAME meters x 6, shifted in z by ``z_shift``):
flip y and z, subtract the mid z ((zmin + zmax) / 2 of the flipped scan), then
``v = 6 / scale * (v - transl) + (0, 0, z_shift)``.

Shape legend: N points.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from lib.utils.atomic import atomic_pickle
from lib.utils.errors import finite_vector

__all__ = [
    "FlameParamsError",
    "load_flame_params",
    "save_flame_params",
    "params_to_vector",
    "scan_space_params",
    "scan_to_flame_space",
    "flame_to_scan_space",
    "N_POSE",
    "N_SHAPE",
    "N_EXP",
    "PARAM_DIM",
]

N_POSE = 15
N_SHAPE = 100
N_EXP = 50
PARAM_DIM = 1 + 3 + N_POSE + N_SHAPE + N_EXP  # 169
FLAME_SCALE = 6.0
_FLIP = np.array([1.0, -1.0, -1.0])

# key -> (number of values, layout written by save_flame_params)
_LAYOUT = {"pose": (N_POSE, (N_POSE,)), "betas": (N_SHAPE + N_EXP, (N_SHAPE + N_EXP,)),
           "scale": (1, (1, 1)), "transl": (3, (1, 3))}


class FlameParamsError(ValueError):
    """A FaceVerse FLAME parameter file is missing or malformed (the message names both)."""


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only numpy array reconstruction; a parameter file holds nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
        ("builtins", "object"), ("__builtin__", "object"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED or (module.startswith("numpy") and name == "dtype"):
            return super().find_class(module, name)
        if module.startswith("numpy.dtypes"):  # numpy >= 1.25 dtype classes
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")


def _field(value, key: str, size: int, path) -> np.ndarray:
    """A field of the parameter file `path`: `size` finite numbers (any shape) -> float64 [size]."""
    return finite_vector(value, f"'{key}'", size, lambda msg: FlameParamsError(f"{path}: {msg}"),
                         flatten=True)


def load_flame_params(path) -> dict:
    """Read and validate a FaceVerse ``<id>_flame.pkl``.

    Returns dict(pose (15,), betas (150,), scale float, transl (3,)), float32 arrays.
    Raises FlameParamsError (a ValueError) naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FlameParamsError(f"{path}: FLAME parameter file not found")
    try:
        with open(path, "rb") as fh:
            data = _ArrayUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # any unpickling failure means "not a parameter pickle"
        raise FlameParamsError(f"{path}: not a readable FLAME parameter pickle ({exc})") from exc
    if not isinstance(data, dict):
        raise FlameParamsError(f"{path}: expected a dict, found {type(data).__name__}")
    out = {}
    for key, (size, _) in _LAYOUT.items():
        if key not in data:
            raise FlameParamsError(f"{path}: missing key '{key}' (found {sorted(map(str, data))})")
        out[key] = _field(data[key], key, size, path).astype(np.float32)
    if out["scale"][0] <= 0:
        raise FlameParamsError(f"{path}: 'scale' must be positive, found {out['scale'][0]}")
    out["scale"] = float(out["scale"][0])
    return out


def save_flame_params(path, pose, betas, scale, transl) -> None:
    """Write a FaceVerse parameter pickle atomically (float32, FaceVerse's shapes).

    pose: (15,), betas: (150,) = 100 shape + 50 expression, scale: scalar, transl: (3,).
    """
    path = Path(path)
    values = {"pose": pose, "betas": betas, "scale": scale, "transl": transl}
    data = {}
    for key, (size, shape) in _LAYOUT.items():
        data[key] = _field(np.asarray(values[key], dtype=np.float32), key, size, path) \
            .astype(np.float32).reshape(shape)
    atomic_pickle(path, data, protocol=2)


def params_to_vector(d: dict) -> np.ndarray:
    """dict from load_flame_params -> (169,) float32: scale 1, transl 3, pose 15, shape 100,
    exp 50, with scale 1 and translation 0: the scan is brought into FLAME space by the
    file's scale and translation (scan_to_flame_space), so its FLAME needs neither; the
    original's preprocessing writes the same 1, 0, 0, 0."""
    vec = np.concatenate([
        np.ones(1, dtype=np.float32),
        np.zeros(3, dtype=np.float32),
        np.asarray(d["pose"], dtype=np.float32).reshape(N_POSE),
        np.asarray(d["betas"], dtype=np.float32).reshape(N_SHAPE + N_EXP),
    ])
    return vec.astype(np.float32)


def scan_space_params(vec) -> np.ndarray:
    """A processed scan's (169,) parameter vector with scale 1 and translation 0: processed
    scans live in FLAME space (params_to_vector); outputs written before that rule carried
    FaceVerse's scale and translation here, which must not move the FLAME mesh."""
    vec = np.array(vec, dtype=np.float32).reshape(-1)
    vec[0], vec[1:4] = 1.0, 0.0
    return vec


def _mid_z(v: np.ndarray) -> float:
    return 0.5 * (float(v[:, 2].min()) + float(v[:, 2].max()))


def scan_to_flame_space(v, scale, transl, z_shift) -> np.ndarray:
    """FaceVerse scan vertices -> FLAME space (docs/design.md, Scans in FLAME space).

    v: (N, 3) scan vertices; scale: scalar; transl: (3,); z_shift: the model's z shift.
    Returns (N, 3) in v's float dtype (float64 for non-float input).
    """
    v = np.asarray(v)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise ValueError(f"scan_to_flame_space: expected vertices (N, 3), got {v.shape}")
    dtype = v.dtype if np.issubdtype(v.dtype, np.floating) else np.float64
    w = v.astype(np.float64) * _FLIP
    w[:, 2] -= _mid_z(w)
    transl = np.asarray(transl, dtype=np.float64).reshape(3)
    w = FLAME_SCALE / float(np.asarray(scale).reshape(-1)[0]) * (w - transl)
    w[:, 2] += float(z_shift)
    return w.astype(dtype)


def flame_to_scan_space(v_flame, scale, transl_xy, z_shift, z_offset=0.0):
    """Inverse of scan_to_flame_space, used to write synthetic scans.

    v_flame: (N, 3) vertices in FLAME space; scale: scalar; transl_xy: (2,); z_shift: the
    model's z shift; z_offset: arbitrary z placement of the scan (removed again by the
    forward transform's mid-z subtraction).
    Returns (v_scan (N, 3) float64, transl (3,) float64), transl_z chosen so that the
    registered scan (before the forward transform's mid-z subtraction) has mid z 0.
    """
    v = np.asarray(v_flame, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise ValueError(f"flame_to_scan_space: expected vertices (N, 3), got {v.shape}")
    scale = float(scale)
    if not scale > 0:
        raise ValueError(f"flame_to_scan_space: scale must be positive, got {scale}")
    u = v.copy()
    u[:, 2] -= float(z_shift)
    u *= scale / FLAME_SCALE
    transl = np.zeros(3)
    transl[:2] = np.asarray(transl_xy, dtype=np.float64).reshape(2)
    transl[2] = -_mid_z(u)
    w = u + transl
    w[:, 2] += float(z_offset)
    return w * _FLIP, transl

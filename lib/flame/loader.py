"""Read a FLAME 2020 ``generic_model.pkl`` without chumpy and without trusting the pickle.

The official file is a Python-2 pickle in which several arrays are chumpy ``Ch`` objects.
We load it with a restricted :class:`pickle.Unpickler` whose ``find_class`` admits only:

* numpy reconstruction globals (``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``,
  ``_frombuffer``) under both ``numpy.core`` and ``numpy._core``;
* scipy.sparse matrix classes (csc/csr/coo, old module paths such as
  ``scipy.sparse.csc.csc_matrix`` map to the current classes);
* ``copy_reg``/``copyreg._reconstructor``, builtins ``object``/``set``, and
  ``_codecs.encode`` restricted to latin-1 (how protocol-2 pickles spell bytes);
* any ``chumpy.*`` class, mapped to a stand-in that merely stores its pickled state.

Every other global (``os.system``, ``builtins.eval``, ...) raises :class:`FlameModelError`
before anything is called. After loading, each chumpy stand-in becomes a numpy array.

Shape legend: V vertices, F faces, J joints (5 for FLAME), Sf shape-blendshape columns
(identity, then expression), Q = 9 (J - 1) pose-corrective feature.
Returned dict (float64 / int64 numpy arrays; ``J_regressor`` may stay scipy sparse):
    v_template  [V, 3]        f            [F, 3] int64
    shapedirs   [V, 3, Sf]    posedirs     [V, 3, Q]
    J_regressor [J, V]        weights      [V, J]
    kintree_table [2, J] int64 (root parent 2**32-1)   parents list[int] (root -1)
plus any other keys of the file that convert cleanly.
"""
from __future__ import annotations

import importlib
import os
import pickle

import numpy as np
import scipy.sparse as sp

__all__ = ["FlameModelError", "load_flame_model", "EXPR_OFFSET", "N_JOINTS"]

EXPR_OFFSET = 300  # FLAME shapedirs: 300 identity components, then expression components
N_JOINTS = 5  # root, neck, jaw, left eye, right eye
ROOT_PARENT = 2**32 - 1

_MISSING_HELP = (
    "download FLAME 2020 from https://flame.is.tue.mpg.de (generic_model.pkl) and give its "
    "path, or generate the synthetic head model with "
    "`python tools/make_synthetic.py --out data/synthetic` and use "
    "data/synthetic/flame/generic_model.pkl"
)


class FlameModelError(Exception):
    """A FLAME model file is missing, unsafe, or malformed."""


class _ChumpyStandIn:
    """Placeholder for any chumpy class: keeps the pickled state, runs no chumpy code."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self._state = state


def _numpy_multiarray():
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("numpy multiarray module not found")


def _numpy_frombuffer():
    for name in ("numpy._core.numeric", "numpy.core.numeric"):
        try:
            return importlib.import_module(name)._frombuffer
        except (ImportError, AttributeError):
            continue
    return None


def _latin1_encode(obj, encoding="latin1", errors="strict"):
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not admitted")
    return obj.encode("latin1", errors)


def _allowed_globals():
    ma = _numpy_multiarray()
    table = {}
    for prefix in ("numpy.core", "numpy._core"):
        table[(f"{prefix}.multiarray", "_reconstruct")] = ma._reconstruct
        table[(f"{prefix}.multiarray", "scalar")] = ma.scalar
        fb = _numpy_frombuffer()
        if fb is not None:
            table[(f"{prefix}.numeric", "_frombuffer")] = fb
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    for kind in ("csc", "csr", "coo"):
        for suffix in ("matrix", "array"):
            cls = getattr(sp, f"{kind}_{suffix}", None)
            if cls is None:
                continue
            for module in ("scipy.sparse", f"scipy.sparse.{kind}", f"scipy.sparse._{kind}"):
                table[(module, f"{kind}_{suffix}")] = cls
    import copyreg

    for module in ("copy_reg", "copyreg"):
        table[(module, "_reconstructor")] = copyreg._reconstructor
    for module in ("__builtin__", "builtins"):
        table[(module, "object")] = object
        table[(module, "set")] = set
    table[("_codecs", "encode")] = _latin1_encode
    return table


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals listed in the module docstring."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")
        self._source = source
        self._table = _allowed_globals()

    def find_class(self, module, name):
        if module == "chumpy" or module.startswith("chumpy."):
            return _ChumpyStandIn
        obj = self._table.get((module, name))
        if obj is None:
            raise FlameModelError(
                f"{self._source}: refusing to load global '{module}.{name}' from the pickle "
                "(only numpy, scipy.sparse and chumpy array classes are admitted)"
            )
        return obj


def _to_array(value, key: str, source: str):
    """Convert chumpy stand-ins (possibly nested in lists/tuples) to numpy arrays."""
    if isinstance(value, _ChumpyStandIn):
        state = getattr(value, "_state", None)
        if isinstance(state, tuple) and state and isinstance(state[0], dict):
            state = state[0]
        if isinstance(state, dict):
            if "x" in state:
                return np.asarray(_to_array(state["x"], key, source))
            arrays = [v for v in state.values() if isinstance(v, np.ndarray)]
            if len(arrays) == 1:
                return arrays[0]
        raise FlameModelError(
            f"{source}: key '{key}' is a chumpy expression without a stored array value; "
            "cannot convert it without chumpy"
        )
    if isinstance(value, list):
        return [_to_array(v, key, source) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_array(v, key, source) for v in value)
    return value


def _shape_error(source, key, expected, got):
    return FlameModelError(f"{source}: key '{key}' has shape {got}, expected {expected}")


def _validate(model: dict, source: str, n_shape: int, n_exp: int) -> dict:
    required = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights",
                "kintree_table")
    missing = [k for k in required if k not in model]
    if missing:
        raise FlameModelError(f"{source}: missing required key(s) {missing}")
    out = dict(model)
    for key in ("v_template", "shapedirs", "posedirs", "weights"):
        out[key] = np.asarray(model[key], dtype=np.float64)
    out["f"] = np.asarray(model["f"]).astype(np.int64)
    out["kintree_table"] = np.asarray(model["kintree_table"]).astype(np.int64)
    jr = model["J_regressor"]
    out["J_regressor"] = jr.astype(np.float64) if sp.issparse(jr) else np.asarray(jr, np.float64)

    vt = out["v_template"]
    if vt.ndim != 2 or vt.shape[1] != 3 or vt.shape[0] < 1:
        raise _shape_error(source, "v_template", "(V, 3)", vt.shape)
    V = vt.shape[0]
    J = N_JOINTS
    f = out["f"]
    if f.ndim != 2 or f.shape[1] != 3:
        raise _shape_error(source, "f", "(F, 3)", f.shape)
    if f.size and (f.min() < 0 or f.max() >= V):
        raise FlameModelError(f"{source}: key 'f' indexes vertices outside [0, {V})")
    sd = out["shapedirs"]
    k_min = max(EXPR_OFFSET + n_exp, n_shape)
    if sd.ndim != 3 or sd.shape[:2] != (V, 3) or sd.shape[2] < k_min:
        raise _shape_error(source, "shapedirs", f"({V}, 3, >={k_min}) (300 identity + expression)",
                           sd.shape)
    if n_shape > EXPR_OFFSET:
        raise FlameModelError(f"{source}: n_shape={n_shape} exceeds the {EXPR_OFFSET} identity "
                              "components of shapedirs")
    pd = out["posedirs"]
    if pd.shape != (V, 3, (J - 1) * 9):
        raise _shape_error(source, "posedirs", f"({V}, 3, {(J - 1) * 9})", pd.shape)
    if out["J_regressor"].shape != (J, V):
        raise _shape_error(source, "J_regressor", f"({J}, {V})", out["J_regressor"].shape)
    if out["weights"].shape != (V, J):
        raise _shape_error(source, "weights", f"({V}, {J})", out["weights"].shape)
    kt = out["kintree_table"]
    if kt.shape != (2, J):
        raise _shape_error(source, "kintree_table", f"(2, {J})", kt.shape)
    out["parents"] = _parents_from_kintree(kt, source)
    return out


def _parents_from_kintree(kt: np.ndarray, source: str) -> list[int]:
    """kintree_table [2, J] -> parents list[int] with the root's parent -1 (topological order)."""
    ids = [int(i) for i in kt[1]]
    col = {jid: c for c, jid in enumerate(ids)}
    parents = []
    for c, p in enumerate(kt[0]):
        p = int(p)
        if p in (ROOT_PARENT, -1):
            parents.append(-1)
        elif p in col and col[p] < c:
            parents.append(col[p])
        else:
            raise FlameModelError(f"{source}: key 'kintree_table' has an invalid parent {p} "
                                  f"for joint column {c} (parents must precede children)")
    if parents[0] != -1 or parents.count(-1) != 1:
        raise FlameModelError(f"{source}: key 'kintree_table' must have exactly one root "
                              f"(parent {ROOT_PARENT}) in column 0, got {kt[0].tolist()}")
    return parents


def load_flame_model(path, n_shape: int = 100, n_exp: int = 50) -> dict:
    """Load and validate a FLAME-format pickle.

    path: file path of ``generic_model.pkl`` (real FLAME 2020 or the synthetic head model).
    n_shape / n_exp: component counts the caller will use (validated against shapedirs).
    Returns the dict described in the module docstring. Raises FlameModelError.
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise FlameModelError(f"FLAME model file not found: {source}; {_MISSING_HELP}")
    try:
        with open(source, "rb") as fh:
            raw = _RestrictedUnpickler(fh, source).load()
    except FlameModelError:
        raise
    except Exception as exc:  # corrupt or non-pickle file
        raise FlameModelError(f"{source}: cannot read the FLAME pickle ({type(exc).__name__}: "
                              f"{exc})") from exc
    if not isinstance(raw, dict):
        raise FlameModelError(f"{source}: expected a dict at the top of the pickle, got "
                              f"{type(raw).__name__}")
    required = {"v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights",
                "kintree_table"}
    model = {}
    for key, value in raw.items():
        try:
            model[key] = _to_array(value, key, source)
        except FlameModelError:
            if key in required:
                raise
            # optional entries (e.g. chumpy expressions we do not need) are dropped
    return _validate(model, source, n_shape, n_exp)

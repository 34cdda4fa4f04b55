"""Per-scan preprocessing (DESIGN §3): occupancy samples, surface samples, multi-view renders.

Shape legend: V vertices, F faces, N points, K views, H/W image rows/columns (res).

Per scan `<id>` the outputs in `<out_dir>` (= `<processed>/<id>/`) are
    occupancy.npz   flame_params (169,) f32, scan_name str, pts_d (Nn+Nu, 3) f32, occ_gt (.., 1) f32
    surface.npz     surface_points / surface_normals / surface_colors (Ns, 3) f32
    multi_view_<res>/{k:04d}_normal.png, {k:04d}_rgb.png   k = 0..K-1, res x res RGB
Every file is written under a temporary name and renamed, and each of the three parts is
validated and skipped when already valid, so a killed run is finished by a rerun. The
sampling is seeded from the scan name (`scan_seed`), one stream per part, so a rerun (or a
resumed run) writes byte-identical arrays.
"""
from __future__ import annotations

import hashlib
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lib.dataset.faceverse_io import (FlameParamsError, PARAM_DIM, load_flame_params,
                                      params_to_vector, scan_to_flame_space)
from lib.dataset.scan_sampling import (SamplingError, occupancy_samples, surface_samples,
                                       texture_float)
from lib.dataset.scan_render import render_views, save_views, views_valid
from lib.utils.mesh_io import MeshLoadError, load_obj, save_npz

__all__ = ["SampleSizes", "ScanResult", "ScanError", "process_scan", "is_complete",
           "scan_seed", "scan_paths", "render_views"]

SURFACE_KEYS = ("surface_points", "surface_normals", "surface_colors")


class ScanError(ValueError):
    """A scan is unusable for a reason other than its files' format (e.g. NaN geometry)."""


@dataclass(frozen=True)
class SampleSizes:
    """Numbers of samples per scan (DESIGN §3 defaults; smaller ones for tests)."""

    n_face: int = 70000      # near-surface points from the face region z > max_z / 2
    n_rest: int = 30000      # near-surface points elsewhere
    n_uniform: int = 100000  # uniform points in [-1, 1]^3
    n_surface: int = 100000  # coloured surface samples
    sigma: float = 0.01      # jitter of the near-surface points

    @property
    def n_occ(self) -> int:
        return self.n_face + self.n_rest + self.n_uniform


@dataclass
class ScanResult:
    """status: 'done' (outputs written), 'skipped' (already complete) or 'failed'."""

    name: str
    status: str
    message: str = ""
    timings: dict = field(default_factory=dict)


def scan_seed(name: str) -> int:
    """A stable 63-bit seed from the scan name (independent of Python's hash salt)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little") >> 1


def scan_paths(scan_folder, flame_folder, name: str):
    """-> (scan dir, OBJ path, FLAME pickle path) of scan `name` in FaceVerse layout."""
    d = Path(scan_folder) / name
    return d, d / f"{name}.obj", Path(flame_folder) / f"{name}_flame.pkl"


# ----------------------------------------------------------------------------- validation
def _npz_shapes(path: Path, deep: bool) -> dict | None:
    """{key: (shape, dtype)} of an .npz (header only unless deep), None if unreadable."""
    try:
        if deep:
            with np.load(path, allow_pickle=False) as z:
                out = {}
                for k in z.files:
                    a = z[k]
                    if a.dtype.kind == "f" and not np.isfinite(a).all():
                        return None
                    out[k] = (a.shape, a.dtype)
                return out
        out = {}
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                with zf.open(info) as fh:
                    major, _ = np.lib.format.read_magic(fh)
                    read = (np.lib.format.read_array_header_1_0 if major == 1
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(fh)
                out[info.filename.removesuffix(".npy")] = (shape, dtype)
        return out
    except Exception:  # noqa: BLE001 - any unreadable file just means "not valid"
        return None


def _occupancy_valid(out_dir: Path, sizes: SampleSizes, deep: bool) -> bool:
    s = _npz_shapes(out_dir / "occupancy.npz", deep)
    n = sizes.n_occ
    return (s is not None and s.get("flame_params", ((),))[0] == (PARAM_DIM,)
            and "scan_name" in s and s.get("pts_d", ((),))[0] == (n, 3)
            and s.get("occ_gt", ((),))[0] == (n, 1)
            and all(s[k][1] == np.float32 for k in ("flame_params", "pts_d", "occ_gt")))


def _surface_valid(out_dir: Path, sizes: SampleSizes, deep: bool) -> bool:
    s = _npz_shapes(out_dir / "surface.npz", deep)
    return s is not None and all(
        k in s and s[k][0] == (sizes.n_surface, 3) and s[k][1] == np.float32
        for k in SURFACE_KEYS)


def is_complete(out_dir, n_views: int = 9, res: int = 256, sizes: SampleSizes = SampleSizes(),
                deep: bool = True) -> bool:
    """True when all outputs of a scan exist and are valid: npz keys, shapes and dtypes
    (deep: also finite values, fully decodable PNGs), PNGs of size res x res.
    deep=False reads headers only (fast, for listing thousands of scans)."""
    out_dir = Path(out_dir)
    return (_occupancy_valid(out_dir, sizes, deep) and _surface_valid(out_dir, sizes, deep)
            and views_valid(out_dir, n_views, res, deep))


def remove_stray_temps(out_dir: Path) -> None:
    """Delete the temporary files a killed run left behind: every hidden (dot) file in a
    scan's output folder and its subfolders (our writers name temporaries `.<name>...`)."""
    if not out_dir.is_dir():
        return
    for d in (out_dir, *[p for p in out_dir.iterdir() if p.is_dir()]):
        for p in d.glob(".*"):
            if p.is_file():
                p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the work
def load_scan(obj_path, flame_pkl, z_shift: float):
    """Load a textured scan and its FLAME fit; move the scan to FLAME space.
    -> (mesh (TexturedMesh, verts replaced by FLAME-space [V, 3] float64),
        params (169,) float32)."""
    p = load_flame_params(flame_pkl)
    params = params_to_vector(p)
    mesh = load_obj(obj_path, require_texture=True)
    mesh.verts = scan_to_flame_space(mesh.verts, p["scale"], p["transl"], z_shift)
    if not np.isfinite(mesh.verts).all():
        raise ScanError(f"{obj_path}: non-finite vertices after the FLAME-space transform")
    return mesh, params


def process_scan(scan_dir, flame_pkl, flame_server, out_dir, n_views: int = 9, res: int = 256,
                 seed: int | None = None, sizes: SampleSizes = SampleSizes(),
                 device=None) -> ScanResult:
    """Preprocess one scan in FaceVerse layout (`<scan_dir>/<id>.obj` + mtl + texture).

    flame_pkl: `<id>_flame.pkl`; flame_server: lib.flame.FLAMEServer (z shift, view
    transforms); out_dir: `<processed>/<id>`; seed: default `scan_seed(id)`; device: torch
    device of the renders (default: the server's). Known problems with the inputs are
    returned as status 'failed' with a one-line message naming the file; unexpected
    exceptions propagate. Returns ScanResult (timings: seconds per phase).
    """
    scan_dir, out_dir = Path(scan_dir), Path(out_dir)
    name = scan_dir.name
    result = ScanResult(name, "skipped")
    t = result.timings
    tic = time.perf_counter()
    occ_ok = _occupancy_valid(out_dir, sizes, deep=True)
    surf_ok = _surface_valid(out_dir, sizes, deep=True)
    views_ok = views_valid(out_dir, n_views, res, deep=True)
    t["check"] = time.perf_counter() - tic
    if occ_ok and surf_ok and views_ok:
        return result
    remove_stray_temps(out_dir)
    seed = scan_seed(name) if seed is None else int(seed)
    try:
        tic = time.perf_counter()
        mesh, params = load_scan(scan_dir / f"{name}.obj", flame_pkl, flame_server.flame.z_shift)
        mesh.texture = texture_float(mesh.texture).numpy()  # once, for samples and renders
        t["load"] = time.perf_counter() - tic
        if not occ_ok:
            tic = time.perf_counter()
            pts, occ = occupancy_samples(mesh.verts, mesh.faces, np.random.default_rng([seed, 0]),
                                         sizes.n_face, sizes.n_rest, sizes.n_uniform, sizes.sigma)
            save_npz(out_dir / "occupancy.npz", flame_params=params, scan_name=np.str_(name),
                     pts_d=pts, occ_gt=occ)
            t["labels"] = time.perf_counter() - tic
        if not surf_ok:
            tic = time.perf_counter()
            surf = surface_samples(mesh.verts, mesh.faces, mesh.uvs, mesh.face_uvs, mesh.texture,
                                   np.random.default_rng([seed, 1]), sizes.n_surface)
            save_npz(out_dir / "surface.npz", **surf)
            t["surface"] = time.perf_counter() - tic
        if not views_ok:
            tic = time.perf_counter()
            normal, rgb = render_views(mesh, params, flame_server, n_views, res, device=device)
            save_views(out_dir, normal, rgb)
            t["render"] = time.perf_counter() - tic
    except (MeshLoadError, FlameParamsError, SamplingError, ScanError) as e:
        msg = " ".join(str(e).split())  # one line
        return ScanResult(name, "failed", msg, t)
    result.status = "done"
    return result

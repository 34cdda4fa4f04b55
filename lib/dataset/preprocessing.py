"""Per-scan preprocessing: occupancy samples, surface samples, multi-view renders
(docs/design.md, Processed scan folder).

Shape legend: V vertices, F faces, N points, K views, H/W image rows/columns (res).

Per scan `<id>` the outputs in `<out_dir>` (= `<processed>/<id>/`) are
    occupancy.npz   the original GANHead's arrays: flame_params (169,) f64 (scale 1,
                    translation 0), scan_name str, pts_d (Nn+Nu, 3) f32, occ_gt (.., 1) f32,
                    scan_verts (V, 3) f32 (the scan in FLAME space), scan_faces (F, 3) int64,
                    scan_colors (V, 3) f32 (vertex colours in [0, 1]); and layout =
                    'project' (lib/dataset/processed_layout.py)
    surface.npz     surface_points / surface_normals / surface_colors (Ns, 3) f32
    multi_view_<res>/{k:04d}_normal.png, {k:04d}_rgb.png   k = 0..K-1, res x res RGB
    provenance.json what the outputs were made from (written last, see below)
Method (`Method`; preprocess.py flags; lib/dataset/scan_sampling.py, scan_render.py):
    occ_sampling    'vertices' (default, the original's): near-surface points are jittered
                    scan vertices; 'area': area-weighted surface points, jittered
    colour_source   'vertices' (default, the original's): surface-sample colours and RGB
                    renders from per-vertex colours; 'texture': from the texture at the uv
    views           the view convention of the renders, 'yaw_after_fit' (fixed; the yaw
                    composed with the fitted head rotation, as the original's)
Outputs earlier than these settings (a record without them: yaw-only views, area samples,
texture colours) count as made with other settings and are redone (see Provenance).
Every file is written under a temporary name and renamed, and each of the three parts is
validated and skipped when already valid, so a killed run is finished by a rerun. The
sampling is seeded from the scan name (`scan_seed`), one stream per part, so a rerun (or a
resumed run) writes byte-identical arrays.

Input checks (a failure is status 'failed' with one line naming the file): `load_obj`
refuses truncated OBJ files (lib/utils/mesh_io.py), and `check_scan_fit` compares the scan,
moved to FLAME space, with its fitted FLAME mesh (`FIT_LIMITS`):
- per axis, the bounding-box extent of the scan's surface (the vertices faces use) must be
  0.5-2.5 x the FLAME mesh's (hair and the neck cut change it by less than 25% on the
  synthetic scans; a wrong scale, or a scan that is not the fitted head, by far more), and
  the box centres may differ by at most 0.35 x the FLAME extent on that axis (the synthetic
  scans: at most 0.11);
- the surface must not fall apart into more than 50 + F / 200 edge-connected pieces
  (`surface_pieces`): a scan is one piece plus some debris, while a face list with every
  other triangle gone (a cut that leaves all vertices in use) gives hundreds.

Provenance: `provenance.json` holds the sha256 of every source file (the OBJ, its .mtl files
and the texture image that load_obj reads, the FLAME parameter pickle; `source_record`) and
the settings (n_views, res, sample sizes, seed, the colour scale of the surface samples:
`COLOUR_SCALE`, lib/dataset/scan_sampling.py, and the method: occ_sampling, colour_source,
views). On a rerun `process_scan` hashes the sources again (streamed; milliseconds per scan,
against seconds of processing) and compares:
- sources or settings changed: the scan's outputs are removed and all of its parts redone;
  the result's message says what changed (e.g. `sources changed (flame params
  003_01_flame.pkl)`). The old record stays until the new one replaces it, so a run killed
  in between redoes the scan again. A setting the old record lacks counts as changed
  (`(not recorded)` in the message): records written before the colour scale was recorded
  (surface colours stretched per scan to [-1, 1]) or before the method was (yaw-only views,
  area samples, texture colours) are redone, e.g. `settings changed (colour_source (not
  recorded) -> vertices, occ_sampling (not recorded) -> vertices, views (not recorded) ->
  yaw_after_fit)`.
- no record but complete outputs (made before records existed, or by other code): kept as
  they are, not overwritten, status 'kept'. (Such outputs may hold surface colours stretched per
  scan, yaw-only views or area/texture samples; delete the folder to have it redone.)
- no record and incomplete outputs (a new scan, or a run killed before the record was
  written): the missing parts are made (the valid ones kept) and then the record.

Outputs of the original GANHead's preprocessing (lib/dataset/processed_layout.py tells them
by their files) are never touched, whatever the settings: complete ones count as complete
(status 'original'); an incomplete one is status 'failed' naming the first missing file
(remove the folder to have it made by this project).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lib.dataset.faceverse_io import (
    PARAM_DIM,
    FlameParamsError,
    load_flame_params,
    params_to_vector,
    scan_to_flame_space,
)
from lib.dataset.processed_layout import LAYOUT_KEY, ORIGINAL, PROJECT, layout_of, original_problem
from lib.dataset.scan_render import VIEWS, render_views, save_views, view_paths, views_valid
from lib.dataset.scan_sampling import (
    COLOUR_SCALE,
    COLOUR_SOURCES,
    OCC_SAMPLING,
    SamplingError,
    occupancy_samples,
    surface_pieces,
    surface_samples,
    texture_float,
    vertex_colors,
)
from lib.utils.atomic import atomic_path
from lib.utils.mesh_io import MeshLoadError, load_obj, obj_source_files, save_npz
from lib.utils.npz import npz_headers

__all__ = ["SampleSizes", "Method", "ScanResult", "ScanError", "process_scan", "is_complete",
           "scan_seed", "scan_paths", "render_views", "check_scan_fit", "source_record",
           "read_provenance", "provenance_changes", "PROVENANCE_NAME", "FIT_LIMITS"]

SURFACE_KEYS = ("surface_points", "surface_normals", "surface_colors")
PROVENANCE_NAME = "provenance.json"
PROVENANCE_FORMAT = 1

# Tolerances of check_scan_fit (module docstring): extent ratio range per axis, centre
# offset per axis as a fraction of the FLAME extent, pieces allowed = base + faces / per.
FIT_LIMITS = {"extent_ratio": (0.5, 2.5), "centre_offset": 0.35, "pieces_base": 50,
              "faces_per_piece": 200}


class ScanError(ValueError):
    """A scan is unusable for a reason other than its files' format (e.g. NaN geometry)."""


@dataclass(frozen=True)
class SampleSizes:
    """Numbers of samples per scan (the original's defaults; smaller ones for tests)."""

    n_face: int = 70000      # near-surface points from the face region z > max_z / 2
    n_rest: int = 30000      # near-surface points elsewhere
    n_uniform: int = 100000  # uniform points in [-1, 1]^3
    n_surface: int = 100000  # coloured surface samples
    sigma: float = 0.01      # jitter of the near-surface points

    @property
    def n_occ(self) -> int:
        return self.n_face + self.n_rest + self.n_uniform


@dataclass(frozen=True)
class Method:
    """How the samples and renders are made (module docstring; the defaults are the original
    GANHead's). occ_sampling: one of scan_sampling.OCC_SAMPLING; colour_source: one of
    scan_sampling.COLOUR_SOURCES."""

    occ_sampling: str = "vertices"
    colour_source: str = "vertices"

    def __post_init__(self):
        for name, choices in (("occ_sampling", OCC_SAMPLING), ("colour_source", COLOUR_SOURCES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got "
                                 f"{getattr(self, name)!r}")


@dataclass
class ScanResult:
    """status: 'done' (outputs written; message says why when the sources or settings
    changed), 'skipped' (complete and made from the current sources), 'kept' (complete,
    no provenance record; left as it is), 'original' (the original GANHead's complete
    outputs; left as they are) or 'failed' (message: one line naming the file)."""

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
        return npz_headers(path)
    except Exception:  # noqa: BLE001 - any unreadable file just means "not valid"
        return None


def _occupancy_valid(out_dir: Path, sizes: SampleSizes, deep: bool) -> bool:
    """The occupancy.npz of this project's layout, current (the scan_* arrays, flame_params
    float64) or earlier (without them, flame_params float32), with the sizes' shapes."""
    s = _npz_shapes(out_dir / "occupancy.npz", deep)
    n = sizes.n_occ
    if not (s is not None and s.get("flame_params", ((),))[0] == (PARAM_DIM,)
            and "scan_name" in s and s.get("pts_d", ((),))[0] == (n, 3)
            and s.get("occ_gt", ((),))[0] == (n, 1)
            and s["flame_params"][1] in (np.float32, np.float64)
            and all(s[k][1] == np.float32 for k in ("pts_d", "occ_gt"))):
        return False
    if LAYOUT_KEY not in s:  # an earlier output: the four arrays only
        return layout_of(out_dir) == PROJECT
    v, f, c = (s.get(k, ((), None)) for k in ("scan_verts", "scan_faces", "scan_colors"))
    return (len(v[0]) == 2 and v[0][1] == 3 and v[1] == np.float32 and c == v
            and len(f[0]) == 2 and f[0][1] == 3 and f[1] == np.int64
            and layout_of(out_dir) == PROJECT)


def _surface_valid(out_dir: Path, sizes: SampleSizes, deep: bool) -> bool:
    s = _npz_shapes(out_dir / "surface.npz", deep)
    return s is not None and all(
        k in s and s[k][0] == (sizes.n_surface, 3) and s[k][1] == np.float32
        for k in SURFACE_KEYS)


def is_complete(out_dir, n_views: int = 9, res: int = 256, sizes: SampleSizes = SampleSizes(),
                deep: bool = True) -> bool:
    """True when all outputs of a scan exist and are valid: npz keys, shapes and dtypes
    (deep: also finite values, fully decodable PNGs), PNGs of size res x res.
    deep=False reads headers only (fast, for listing thousands of scans).
    A folder holding the original GANHead's outputs is complete when those are (its own 9
    views at 256 x 256, whatever n_views, res and sizes; lib/dataset/processed_layout.py)."""
    out_dir = Path(out_dir)
    if layout_of(out_dir) == ORIGINAL:
        return original_problem(out_dir, deep) is None
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


# ----------------------------------------------------------------------------- provenance
def file_sha256(path, chunk: int = 1 << 20) -> str | None:
    """sha256 hex digest of a file, read in 1 MiB chunks; None when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def run_settings(n_views: int, res: int, sizes: SampleSizes, seed: int,
                 method: Method = Method()) -> dict:
    """The settings a scan's outputs depend on, as recorded in its provenance record."""
    return {"n_views": int(n_views), "res": int(res), "seed": int(seed), **asdict(sizes),
            "colour_scale": COLOUR_SCALE, **asdict(method), "views": VIEWS}


def source_record(obj_path, flame_pkl, settings: dict) -> dict:
    """The provenance record of a scan: its source files (role, file name, sha256; the
    files load_obj reads, then the FLAME pickle) and the settings."""
    obj_path = Path(obj_path)
    files = obj_source_files(obj_path) if obj_path.is_file() else [("scan mesh", obj_path)]
    files.append(("flame params", Path(flame_pkl)))
    return {"format": PROVENANCE_FORMAT,
            "sources": [{"role": role, "file": p.name, "sha256": file_sha256(p)}
                        for role, p in files],
            "settings": dict(settings)}


def read_provenance(out_dir) -> dict | None:
    """The record in `<out_dir>/provenance.json`; None when there is none; {} when it exists
    but is unreadable (treated as changed: the scan is redone)."""
    path = Path(out_dir) / PROVENANCE_NAME
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = (isinstance(rec, dict) and isinstance(rec.get("sources"), list)
          and isinstance(rec.get("settings"), dict)
          and all(isinstance(e, dict) and {"role", "file", "sha256"} <= set(e)
                  for e in rec["sources"]))
    return rec if ok else {}


def write_provenance(out_dir, record: dict) -> None:
    """Write the record to `<out_dir>/provenance.json` atomically."""
    with atomic_path(Path(out_dir) / PROVENANCE_NAME) as tmp:
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def provenance_changes(old: dict, new: dict) -> str:
    """'' when the records agree, else what changed, e.g. 'sources changed (flame params
    003_01_flame.pkl)' or 'settings changed (n_views 9 -> 4)'."""
    if not old:
        return "provenance record unreadable"
    parts = []
    before = {(e["role"], e["file"]): e["sha256"] for e in old["sources"]}
    after = {(e["role"], e["file"]): e["sha256"] for e in new["sources"]}
    changed = [f"{r} {f}" for (r, f), d in after.items() if (r, f) in before
               and (d is None or d != before[(r, f)])]
    changed += [f"{r} {f} is new" for (r, f) in after if (r, f) not in before]
    changed += [f"{r} {f} no longer used" for (r, f) in before if (r, f) not in after]
    if changed:
        parts.append(f"sources changed ({', '.join(changed)})")
    s_old, s_new = old["settings"], new["settings"]

    def show(s, k):
        return s[k] if k in s else "(not recorded)"

    diff = [f"{k} {show(s_old, k)} -> {show(s_new, k)}" for k in sorted(set(s_old) | set(s_new))
            if s_old.get(k) != s_new.get(k) or (k in s_old) != (k in s_new)]
    if diff:
        parts.append(f"settings changed ({', '.join(diff)})")
    return "; ".join(parts)


def remove_outputs(out_dir: Path, n_views: int, res: int) -> None:
    """Delete a scan's outputs (not its provenance record): they no longer match it."""
    for p in [out_dir / "occupancy.npz", out_dir / "surface.npz",
              *[q for pair in view_paths(out_dir, n_views, res) for q in pair]]:
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


def check_scan_fit(mesh, params, flame_server, obj_path, flame_pkl=None) -> None:
    """Compare a scan in FLAME space with its fitted FLAME mesh (module docstring,
    FIT_LIMITS). mesh: TexturedMesh in FLAME space; params: (169,). Raises ScanError
    naming the scan file."""
    import torch

    ref = flame_server.flame.v_template
    with torch.no_grad():
        p = flame_server.split_params(torch.as_tensor(np.asarray(params), dtype=ref.dtype,
                                                      device=ref.device)[None])
        fv = flame_server.flame(p["shape"], p["exp"], p["pose"]).vertices[0]
    fv = fv.double().cpu().numpy()
    v = np.asarray(mesh.verts, dtype=np.float64)
    used = v[np.unique(mesh.faces)]  # a stray vertex is not part of the surface
    lo, hi, flo, fhi = used.min(0), used.max(0), fv.min(0), fv.max(0)
    f_ext = np.maximum(fhi - flo, 1e-9)
    ratio = (hi - lo) / f_ext
    offset = np.abs((lo + hi) / 2 - (flo + fhi) / 2) / f_ext
    r_lo, r_hi = FIT_LIMITS["extent_ratio"]
    pkl = Path(flame_pkl).name if flame_pkl is not None else "its FLAME fit"
    fmt = lambda a: "(" + ", ".join(f"{x:.2f}" for x in a) + ")"  # noqa: E731
    if (ratio < r_lo).any() or (ratio > r_hi).any():
        raise ScanError(f"{obj_path}: in FLAME space the scan's extent (x, y, z) is "
                        f"{fmt(ratio)} x the fitted FLAME head's (allowed {r_lo}-{r_hi}): the "
                        f"scan and {pkl} do not match (wrong scale or registration?); check "
                        "the FLAME fit")
    if (offset > FIT_LIMITS["centre_offset"]).any():
        raise ScanError(f"{obj_path}: in FLAME space the scan's centre is off the fitted FLAME "
                        f"head's by {fmt(offset)} of its extent (x, y, z; allowed "
                        f"{FIT_LIMITS['centre_offset']}): the scan and {pkl} do not match; "
                        "check the FLAME fit")
    n_faces = len(mesh.faces)
    limit = FIT_LIMITS["pieces_base"] + n_faces // FIT_LIMITS["faces_per_piece"]
    pieces = surface_pieces(v, mesh.faces)
    if pieces > limit:
        raise ScanError(f"{obj_path}: the surface falls apart into {pieces} pieces (more than "
                        f"{limit} for {n_faces} faces): faces look missing (damaged file?); "
                        "re-copy or re-export the scan")


def process_scan(scan_dir, flame_pkl, flame_server, out_dir, n_views: int = 9, res: int = 256,
                 seed: int | None = None, sizes: SampleSizes = SampleSizes(),
                 device=None, method: Method = Method()) -> ScanResult:
    """Preprocess one scan in FaceVerse layout (`<scan_dir>/<id>.obj` + mtl + texture).

    flame_pkl: `<id>_flame.pkl`; flame_server: lib.flame.FLAMEServer (z shift, fitted mesh,
    view transforms); out_dir: `<processed>/<id>`; seed: default `scan_seed(id)`; device:
    torch device of the renders (default: the server's); method: the sampling and colour
    choices (`Method`, module docstring). Known problems with the inputs are
    returned as status 'failed' with a one-line message naming the file; unexpected
    exceptions propagate. Outputs made from other sources or settings than the recorded
    ones are redone (module docstring: Provenance). Returns ScanResult (timings: seconds
    per phase).
    """
    scan_dir, out_dir = Path(scan_dir), Path(out_dir)
    name = scan_dir.name
    obj_path = scan_dir / f"{name}.obj"
    result = ScanResult(name, "skipped")
    t = result.timings
    seed = scan_seed(name) if seed is None else int(seed)
    tic = time.perf_counter()
    if layout_of(out_dir) == ORIGINAL:  # the original GANHead's outputs: never touched
        bad = original_problem(out_dir, deep=True)
        t["check"] = time.perf_counter() - tic
        if bad is None:
            return ScanResult(name, "original", "kept as the original GANHead's output "
                              "(not reprocessed, not overwritten)", t)
        return ScanResult(name, "failed", f"{bad}: missing or malformed in the original "
                          f"GANHead's output in {out_dir}; not overwritten (remove the folder "
                          "to have preprocess.py make this project's outputs)", t)
    old = read_provenance(out_dir)
    occ_ok = _occupancy_valid(out_dir, sizes, deep=True)
    surf_ok = _surface_valid(out_dir, sizes, deep=True)
    views_ok = views_valid(out_dir, n_views, res, deep=True)
    t["check"] = time.perf_counter() - tic
    if old is None and occ_ok and surf_ok and views_ok:
        result.status = "kept"
        result.message = ("complete outputs without a provenance record (made before records "
                          "existed, or by other code); kept as they are")
        return result
    tic = time.perf_counter()
    record = source_record(obj_path, flame_pkl, run_settings(n_views, res, sizes, seed, method))
    t["hash"] = time.perf_counter() - tic
    note = provenance_changes(old, record) if old is not None else ""
    if note:  # the outputs no longer match their sources: redo every part
        remove_outputs(out_dir, n_views, res)
        occ_ok = surf_ok = views_ok = False
    elif occ_ok and surf_ok and views_ok:
        return result
    remove_stray_temps(out_dir)
    try:
        tic = time.perf_counter()
        mesh, params = load_scan(obj_path, flame_pkl, flame_server.flame.z_shift)
        check_scan_fit(mesh, params, flame_server, obj_path, flame_pkl)
        mesh.texture = texture_float(mesh.texture).numpy()  # once, for samples and renders
        vcol = vertex_colors(len(mesh.verts), mesh.faces, mesh.uvs, mesh.face_uvs, mesh.texture)
        t["load"] = time.perf_counter() - tic
        if not occ_ok:
            tic = time.perf_counter()
            pts, occ = occupancy_samples(mesh.verts, mesh.faces, np.random.default_rng([seed, 0]),
                                         sizes.n_face, sizes.n_rest, sizes.n_uniform, sizes.sigma,
                                         sampling=method.occ_sampling)
            save_npz(out_dir / "occupancy.npz", flame_params=params.astype(np.float64),
                     scan_name=np.str_(name), pts_d=pts, occ_gt=occ,
                     scan_verts=mesh.verts.astype(np.float32),
                     scan_faces=np.asarray(mesh.faces, dtype=np.int64),
                     scan_colors=vcol.astype(np.float32), **{LAYOUT_KEY: np.str_(PROJECT)})
            t["labels"] = time.perf_counter() - tic
        if not surf_ok:
            tic = time.perf_counter()
            surf = surface_samples(mesh.verts, mesh.faces, mesh.uvs, mesh.face_uvs, mesh.texture,
                                   np.random.default_rng([seed, 1]), sizes.n_surface,
                                   colour_source=method.colour_source, vertex_colours=vcol)
            save_npz(out_dir / "surface.npz", **surf)
            t["surface"] = time.perf_counter() - tic
        if not views_ok:
            tic = time.perf_counter()
            normal, rgb = render_views(mesh, params, flame_server, n_views, res, device=device,
                                       colour_source=method.colour_source, vertex_colours=vcol)
            save_views(out_dir, normal, rgb)
            t["render"] = time.perf_counter() - tic
    except (MeshLoadError, FlameParamsError, SamplingError, ScanError) as e:
        msg = " ".join(str(e).split())  # one line
        return ScanResult(name, "failed", f"{note}; {msg}" if note else msg, t)
    write_provenance(out_dir, record)  # last: the record vouches for complete outputs
    result.status = "done"
    result.message = note
    return result

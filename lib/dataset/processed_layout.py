"""Processed scan folders in either layout: this project's or the original GANHead's.

Shape legend: P = 169 FLAME parameter vector, N occupancy samples (near-surface half, then
uniform half), M surface samples, V/F/U scan vertices/faces/texture coordinates, H/W image
rows/columns.

A processed scan folder `<processed>/<id>/` is read as it is, whichever code wrote it; the
layout is told by the files, never by an option:

- 'project' (preprocess.py here; the only layout this project writes):
      occupancy.npz   flame_params (P,) f64, scan_name, pts_d (N, 3) f32, occ_gt (N, 1) f32,
                      the original's extra keys scan_verts (V, 3) f32 (the scan in FLAME
                      space), scan_faces (F, 3) int64, scan_colors (V, 3) f32 (one colour in
                      [0, 1] per vertex), and `layout` = 'project' (0-d unicode; the one key
                      the original never writes, which tells the two layouts apart).
                      Written before those were added (still read): exactly flame_params
                      (P,) f32, scan_name, pts_d, occ_gt.
      surface.npz     surface_points / surface_normals / surface_colors (M, 3) f32
      multi_view_<res>/{k:04d}_normal.png, {k:04d}_rgb.png   RGB on a pure white background
      provenance.json
- 'original' (the original GANHead's preprocess.py, `np.savez`, uncompressed):
      occupancy.npz   flame_params (P,) f64 (entries 0:4 = 1, 0, 0, 0), scan_name, pts_d
                      (200000, 3) f32, occ_gt (200000, 1) f32, and the extra keys scan_verts
                      (V, 3) f32, scan_faces (F, 3) int64, scan_colors (U, 3) f32 (one
                      colour per texture coordinate); scan_name a 0-d unicode array
      surface.npz     the same three keys as ours, (100000, 3) f32, colours stretched per
                      scan by their min and max to [-1, 1] (ours: c * 2 - 1, unstretched)
      multi_view_256/{k:04d}_normal.png, {k:04d}_rgb.png   k = 0..8, 256 x 256 RGBA (the
                      renderer's RGBA output: RGB background (1, 1, 1) = white, alpha 255 on
                      the mesh and 0 off it); no provenance record
  Detection: occupancy.npz holds scan_verts, scan_faces and scan_colors and no `layout`
  key. A folder whose occupancy.npz is neither layout raises LayoutError naming the file
  and its keys.

Both layouts carry the same surface.npz, so stage 2 reads it unchanged; nothing is derived
from scan_verts / scan_colors / scan_faces (a folder without surface.npz is incomplete and
the stage-2 reader names the missing file).

Images (`read_view`), the same rule for both layouts, applied per PNG:
- RGB values: the PNG's RGB channels as stored. This is what the original's data module
  reads: PIL's `convert('RGB')` of an RGBA image drops the alpha channel without
  compositing it onto any colour (a transparent pixel keeps its stored RGB, white in the
  original's renders), so the original's background is white like ours.
- foreground: alpha > 127 where the PNG has an alpha channel (the original: 0 or 255
  exactly, no anti-aliasing); else not pure white (255, 255, 255) (ours: a unit normal never
  encodes to pure white). The image mask of a view is the union over its normal and RGB PNGs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lib.dataset.faceverse_io import PARAM_DIM, scan_space_params
from lib.utils.npz import npz_headers

__all__ = ["PROJECT", "ORIGINAL", "LAYOUT_KEY", "OCC_KEYS", "ORIGINAL_EXTRA_KEYS", "LayoutError",
           "layout_of", "detect_layout", "load_npz_keys", "read_flame_params", "read_occupancy",
           "read_png", "read_view", "original_problem", "original_complete", "ORIGINAL_VIEWS",
           "ORIGINAL_RES"]

PROJECT, ORIGINAL = "project", "original"
OCC_KEYS = ("flame_params", "scan_name", "pts_d", "occ_gt")
ORIGINAL_EXTRA_KEYS = ("scan_verts", "scan_faces", "scan_colors")
LAYOUT_KEY = "layout"  # in this project's occupancy.npz only, holding PROJECT
SURFACE_KEYS = ("surface_points", "surface_normals", "surface_colors")
ORIGINAL_VIEWS, ORIGINAL_RES = 9, 256  # the original always renders 9 views at 256 x 256


class LayoutError(ValueError):
    """A processed scan folder is in neither layout, or a file of it is missing or unreadable
    (the message names the file)."""


def _classify(keys) -> str | None:
    keys, full = set(keys), set(OCC_KEYS) | set(ORIGINAL_EXTRA_KEYS)
    if keys == set(OCC_KEYS) or keys == full | {LAYOUT_KEY}:
        return PROJECT
    if full <= keys and LAYOUT_KEY not in keys:
        return ORIGINAL
    return None


def layout_of(scan_dir) -> str | None:
    """'project', 'original', or None (no readable occupancy.npz, or other keys). Reads the
    npz headers only; never raises."""
    try:
        heads = npz_headers(Path(scan_dir) / "occupancy.npz")
    except Exception:  # noqa: BLE001 - unreadable: no layout
        return None
    return None if heads is None else _classify(heads)


def detect_layout(scan_dir) -> str:
    """'project' or 'original' (module docstring). Raises LayoutError naming occupancy.npz
    when it is missing, unreadable or holds the keys of neither layout."""
    path = Path(scan_dir) / "occupancy.npz"
    if not path.is_file():
        raise LayoutError(f"{path}: not found; this folder is not a processed scan of "
                          "preprocess.py (or of the original GANHead); run preprocess.py")
    heads = npz_headers(path)
    if heads is None:
        raise LayoutError(f"{path}: cannot read it as an .npz; rerun preprocess.py")
    layout = _classify(heads)
    if layout is None:
        raise LayoutError(
            f"{path}: keys {sorted(heads)} match neither this project's layout "
            f"({sorted(OCC_KEYS)}, optionally with {[*ORIGINAL_EXTRA_KEYS, LAYOUT_KEY]}) nor "
            f"the original GANHead's (those plus {list(ORIGINAL_EXTRA_KEYS)}); rerun "
            "preprocess.py")
    return layout


def load_npz_keys(path: Path, keys, hint: str = "rerun preprocess.py",
                  error: type[Exception] = LayoutError) -> dict[str, np.ndarray]:
    """Read `keys` from an .npz (only those members are decompressed). Raises `error` naming
    the file (and `hint`) when it is missing, unreadable or lacks a key."""
    if not path.is_file():
        raise error(f"{path}: not found; {hint}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise error(f"{path}: missing arrays {missing}; {hint}")
            return {k: data[k] for k in keys}
    except (OSError, ValueError) as err:
        if isinstance(err, error):
            raise
        raise error(f"{path}: cannot read ({err}); {hint}") from err


def read_flame_params(scan_dir) -> np.ndarray:
    """-> (P,) float32 FLAME parameter vector of a processed scan (either layout), with
    scale 1 and translation 0 (faceverse_io.scan_space_params). Raises LayoutError."""
    path = Path(scan_dir) / "occupancy.npz"
    detect_layout(scan_dir)  # flame_params alone would not tell a stray file apart
    p = load_npz_keys(path, ("flame_params",))["flame_params"]
    if p.size != PARAM_DIM:
        raise LayoutError(f"{path}: flame_params has {p.size} values, expected {PARAM_DIM}; "
                          "rerun preprocess.py")
    return scan_space_params(p)


def read_occupancy(scan_dir) -> dict[str, np.ndarray]:
    """The stage-1 arrays of a processed scan (either layout): flame_params (P,) float32
    (read_flame_params), pts_d (N, 3) float32, occ_gt (N, 1) float32. Only these arrays are
    decompressed (the original's scan_verts etc. are not read). Raises LayoutError."""
    # the layout is checked once up front (datamodule.check)
    path = Path(scan_dir) / "occupancy.npz"
    d = load_npz_keys(path, ("flame_params", "pts_d", "occ_gt"))
    n = d["pts_d"].shape[0]
    if d["pts_d"].shape != (n, 3) or d["occ_gt"].size != n or d["flame_params"].size != PARAM_DIM:
        raise LayoutError(f"{path}: pts_d {d['pts_d'].shape}, occ_gt {d['occ_gt'].shape}, "
                          f"flame_params {d['flame_params'].shape}; expected (N, 3), (N, 1), "
                          f"({PARAM_DIM},); rerun preprocess.py")
    return {"flame_params": scan_space_params(d["flame_params"]),
            "pts_d": d["pts_d"].astype(np.float32, copy=False),
            "occ_gt": d["occ_gt"].astype(np.float32, copy=False).reshape(n, 1)}


def read_png(path) -> tuple[np.ndarray, np.ndarray]:
    """One render -> (RGB uint8 [H, W, 3], foreground bool [H, W]) by the module docstring's
    rule (alpha > 127 if the PNG has alpha, else not pure white). Raises LayoutError naming
    the file when it is missing or unreadable."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"{path}: render not found; rerun preprocess.py for this scan")
    try:
        with Image.open(path) as im:
            if "A" in im.getbands() or "transparency" in im.info:
                rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
                return rgba[..., :3].copy(), rgba[..., 3] > 127
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except OSError as err:
        raise LayoutError(f"{path}: cannot read image ({err}); rerun preprocess.py") from err
    return rgb, (rgb != 255).any(axis=-1)


def read_view(view_dir, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """View k of `<scan>/multi_view_<res>/` (either layout) -> (normal uint8 [H, W, 3],
    rgb uint8 [H, W, 3], mask bool [H, W] = union of the two images' foregrounds)."""
    view_dir = Path(view_dir)
    normal, fg_n = read_png(view_dir / f"{k:04d}_normal.png")
    rgb, fg_c = read_png(view_dir / f"{k:04d}_rgb.png")
    if normal.shape != rgb.shape:
        raise LayoutError(f"{view_dir}: view {k} normal {normal.shape} and rgb {rgb.shape} "
                          "renders differ in size; rerun preprocess.py")
    return normal, rgb, fg_n | fg_c


def _original_views_valid(scan_dir: Path, deep: bool) -> str | None:
    """None when the original's 9 RGB(A) 256 x 256 PNG pairs are there, else the first
    missing or bad file."""
    from PIL import Image

    d = scan_dir / f"multi_view_{ORIGINAL_RES}"
    for k in range(ORIGINAL_VIEWS):
        for kind in ("normal", "rgb"):
            p = d / f"{k:04d}_{kind}.png"
            try:
                with Image.open(p) as im:
                    if (im.format != "PNG" or im.size != (ORIGINAL_RES, ORIGINAL_RES)
                            or im.mode not in ("RGB", "RGBA")):
                        return str(p)
                    if deep:
                        im.load()
            except Exception:  # noqa: BLE001 - missing or broken
                return str(p)
    return None


def original_problem(scan_dir, deep: bool = True) -> str | None:
    """For an original-layout folder: None when its outputs are complete (occupancy.npz,
    surface.npz with consistent shapes, the 9 view pairs), else the first file missing or
    malformed. deep: also decode every array and image (finite values)."""
    scan_dir = Path(scan_dir)
    occ, surf = scan_dir / "occupancy.npz", scan_dir / "surface.npz"
    for path, keys in ((occ, OCC_KEYS), (surf, SURFACE_KEYS)):
        heads = npz_headers(path) if path.is_file() else None
        if heads is None or not set(keys) <= set(heads):
            return str(path)
        if path == occ:
            n = heads["pts_d"][0][0] if len(heads["pts_d"][0]) == 2 else -1
            ok = (heads["flame_params"][0] in ((PARAM_DIM,), (1, PARAM_DIM))
                  and heads["pts_d"][0] == (n, 3) and heads["occ_gt"][0] == (n, 1) and n > 0)
        else:
            m = heads["surface_points"][0][0] if heads["surface_points"][0] else -1
            ok = m > 0 and all(heads[k][0] == (m, 3) for k in SURFACE_KEYS)
        if not ok:
            return str(path)
        if deep:
            try:
                with np.load(path, allow_pickle=False) as z:
                    if not all(np.isfinite(z[k]).all() for k in keys if k != "scan_name"):
                        return str(path)
            except Exception:  # noqa: BLE001 - unreadable
                return str(path)
    return _original_views_valid(scan_dir, deep)


def original_complete(scan_dir, deep: bool = True) -> bool:
    """True when `scan_dir` holds the original GANHead's complete outputs."""
    return layout_of(scan_dir) == ORIGINAL and original_problem(scan_dir, deep) is None

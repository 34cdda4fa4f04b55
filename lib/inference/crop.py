"""The head region of a raw scan, as the fitted FLAME head defines it (eval_mode=fit).

Shape legend: V scan vertices, F faces (of the mesh at hand), Vf FLAME vertices, N FLAME
surface samples.

Real scans come with a neck, shoulders and part of a torso, loose pieces and spikes; the model
only knows heads cut at the neck (the training scans). Before the codes are fitted and before
anything is scored, a scan in FLAME space keeps only the faces that pass four rules:
1. above the neck plane: its normal is FLAME's up axis (the root joint's y axis, so a tilted
   head is cut across its own neck), through FLAME's lowest vertex along it plus `neck_cut`
   times FLAME's height along it (0.03: about where the training scans end);
2. centroid within `margin` times FLAME's height of FLAME's surface (hair stays; shoulders, a
   torso, a background and the tips of spikes go);
3. longest edge at most `spike_edge` times the median longest edge (a spike's thin faces);
4. in an edge-connected piece of at least `min_piece` of the kept area (loose fragments go).
What each rule removed is counted (faces and area fraction) for metrics.json.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from lib.inference.metrics import sample_surface
from lib.utils.errors import ModuleErrors
from lib.utils.extraction import edge_components
from lib.utils.knn import NearestTree
from lib.utils.surface import face_areas_normals

__all__ = ["CropResult", "crop_head", "apply_crop"]

_err = ModuleErrors(__name__)
_FLAME_SAMPLES = 20000  # N: FLAME surface samples the distance rule measures against


@dataclass
class CropResult:
    """keep: [F] bool face mask; plane_point [3], plane_normal [3]: the neck plane (the kept
    side: (x - plane_point) . plane_normal > 0); stats: per rule the faces and the area
    fraction it removed, what is kept, the settings and the plane (JSON-ready)."""

    keep: np.ndarray
    plane_point: np.ndarray
    plane_normal: np.ndarray
    stats: dict = field(default_factory=dict)


def _numpy64(x) -> np.ndarray:
    """Array or tensor (any device) -> float64 numpy array."""
    if torch.is_tensor(x):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def crop_head(verts: np.ndarray, faces: np.ndarray, flame_verts, flame_faces, root_rotation,
              neck_cut: float = 0.03, margin: float = 0.15, spike_edge: float = 10.0,
              min_piece: float = 0.02, seed: int = 0) -> CropResult:
    """The head region (module docstring) of a scan in FLAME space.

    verts: [V, 3], faces: [F, 3] (the scan in FLAME space); flame_verts: [Vf, 3] and
    flame_faces: [F, 3] (the fitted, posed FLAME mesh; arrays or tensors); root_rotation:
    [3, 3] (FLAME's global rotation, e.g. FlameFrames.tfs[0, 0, :3, :3]: its second column
    is FLAME's up axis); seed: of the FLAME surface samples. Returns a CropResult."""
    for name, value in (("neck_cut", neck_cut), ("margin", margin), ("spike_edge", spike_edge),
                        ("min_piece", min_piece)):
        if not (np.isfinite(value) and value >= 0):
            raise _err(f"crop_head: {name} must be a finite number >= 0, got {value!r}")
    v = _numpy64(verts)
    f = np.asarray(faces, dtype=np.int64)
    fv = _numpy64(flame_verts)
    up = _numpy64(root_rotation)[:, 1]
    up = up / np.linalg.norm(up)
    along = fv @ up
    height = float(along.max() - along.min())
    level = float(along.min() + neck_cut * height)
    point = up * level

    tri = v[f]                                               # [F, 3, 3]
    centre = tri.mean(1)
    area = face_areas_normals(v, f)[0]
    edge = np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=2).max(1)
    total = float(area.sum())

    below = centre @ up <= level
    flame_pts = sample_surface(fv, flame_faces, _FLAME_SAMPLES, seed)[0]
    far = NearestTree(flame_pts).query(centre)[0] > margin * height
    spike = edge > spike_edge * (float(np.median(edge)) if len(edge) else 0.0)
    keep = ~(below | far | spike)
    loose = np.zeros_like(keep)
    if keep.any():
        _, label = edge_components(f[keep])
        piece_area = np.bincount(label, weights=area[keep])
        small = piece_area < min_piece * piece_area.sum()
        loose[np.nonzero(keep)[0][small[label]]] = True
        keep &= ~loose

    def removed(mask: np.ndarray) -> dict:
        return {"faces": int(mask.sum()),
                "area_fraction": float(area[mask].sum() / total) if total > 0 else 0.0}

    stats = {"faces": int(len(f)), "area": total, "flame_height": height,
             "below_neck": removed(below), "far_from_flame": removed(far & ~below),
             "spikes": removed(spike & ~below & ~far), "loose_pieces": removed(loose),
             "kept": removed(keep), "neck_cut": neck_cut, "margin": margin,
             "spike_edge": spike_edge, "min_piece": min_piece, "plane_point": point.tolist(),
             "plane_normal": up.tolist()}
    return CropResult(keep=keep, plane_point=point, plane_normal=up, stats=stats)


def apply_crop(scan, keep: np.ndarray):
    """A copy of a ScanData (lib/inference/scan.py) with only the faces keep [F] (bool) and the
    vertices they use; vertex colours and per-face texture coordinates follow."""
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (len(scan.faces),):
        raise _err(f"apply_crop: keep must be a mask of the scan's {len(scan.faces)} faces, "
                   f"got shape {keep.shape}")
    f = scan.faces[keep]
    used = np.unique(f)
    remap = np.full(len(scan.verts), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return replace(scan, verts=scan.verts[used], faces=remap[f],
                   vertex_colors=None if scan.vertex_colors is None else scan.vertex_colors[used],
                   face_uvs=None if scan.face_uvs is None else scan.face_uvs[keep])

"""Raw scans for fitting: loading, oriented coloured surface samples, similarity transforms
into FLAME space (eval_mode=fit).

Shape legend: V scan vertices, F faces, T texture coordinates, N samples, Ht/Wt texture.

A scan is an `.obj` (texture from its material or a same-named image; `lib/utils/mesh_io.py`)
or a `.ply`/`.off`/`.stl`/`.glb` mesh (trimesh; per-vertex colours when the file has them),
in any units and position. Colours, when present, come from the texture or the vertex colours;
a scan without either is fitted for geometry only. Face orientation is checked: when the faces
point inward (a point pushed along the normal lands inside by winding number), the samples'
normals are flipped so they point outward.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lib.inference.loading import InferenceError

__all__ = ["ScanData", "Similarity", "load_scan", "scan_samples", "ORIENTATIONS",
           "axis_rotations"]

# Candidate orientations of a scan relative to FLAME space (row-vector convention x @ R.T).
ORIENTATIONS = {
    "identity": np.eye(3),
    "flip_yz": np.diag([1.0, -1.0, -1.0]),   # FaceVerse scans: y down, z backward
    "turn_y": np.diag([-1.0, 1.0, -1.0]),    # facing away from +z
    "flip_xy": np.diag([-1.0, -1.0, 1.0]),   # upside down, facing +z
}


def axis_rotations() -> dict[str, np.ndarray]:
    """The 24 rotations [3, 3] that map coordinate axes onto coordinate axes (signed
    permutation matrices of determinant +1): those of ORIENTATIONS under their names first,
    the others as `axes_<k>`."""
    import itertools

    out = dict(ORIENTATIONS)
    k = 0
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            R = np.zeros((3, 3))
            R[np.arange(3), perm] = signs
            if np.linalg.det(R) > 0 and not any(np.array_equal(R, Q) for Q in out.values()):
                out[f"axes_{k}"] = R
                k += 1
    return out


@dataclass
class ScanData:
    """verts [V, 3] float64 and faces [F, 3] int64 in the file's units; vertex_colors [V, 3]
    in [0, 1] or None; uvs [T, 2], face_uvs [F, 3], texture [Ht, Wt, 3] uint8 or None;
    path: where it came from."""

    verts: np.ndarray
    faces: np.ndarray
    path: str
    vertex_colors: np.ndarray | None = None
    uvs: np.ndarray | None = None
    face_uvs: np.ndarray | None = None
    texture: np.ndarray | None = None

    @property
    def has_color(self) -> bool:
        return self.vertex_colors is not None or self.texture is not None


@dataclass
class Similarity:
    """x -> scale * x @ rotation.T + translation. scale: float > 0; rotation: [3, 3] proper or
    improper orthogonal; translation: [3]. Normals map by n @ rotation.T (det > 0 assumed)."""

    scale: float
    rotation: np.ndarray
    translation: np.ndarray

    def apply(self, x):
        """x: [N, 3] numpy or torch -> transformed [N, 3] of the same kind."""
        if torch.is_tensor(x):
            R = torch.as_tensor(self.rotation, dtype=x.dtype, device=x.device)
            t = torch.as_tensor(self.translation, dtype=x.dtype, device=x.device)
            return self.scale * x @ R.T + t
        return self.scale * np.asarray(x) @ self.rotation.T + self.translation

    def apply_normals(self, n):
        """n: [N, 3] unit normals -> rotated [N, 3]."""
        if torch.is_tensor(n):
            return n @ torch.as_tensor(self.rotation, dtype=n.dtype, device=n.device).T
        return np.asarray(n) @ self.rotation.T

    def to_dict(self) -> dict:
        return {"scale": float(self.scale), "rotation": np.asarray(self.rotation).tolist(),
                "translation": np.asarray(self.translation).tolist()}


def load_scan(path) -> ScanData:
    """Load a raw scan (module docstring). Raises InferenceError naming the file and the
    problem when it does not load or has no faces."""
    from lib.utils.mesh_io import MeshLoadError, load_obj

    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"scan={path}: file not found")
    if path.suffix.lower() == ".obj":
        try:
            mesh = load_obj(path, load_texture=True)
        except MeshLoadError as err:
            raise InferenceError(f"scan={path} does not load: {err.problem}") from err
        textured = mesh.texture is not None and mesh.face_uvs is not None
        return ScanData(verts=mesh.verts, faces=mesh.faces, path=str(path),
                        uvs=mesh.uvs if textured else None,
                        face_uvs=mesh.face_uvs if textured else None,
                        texture=mesh.texture if textured else None)
    import trimesh

    try:
        mesh = trimesh.load(str(path), process=False, force="mesh")
    except Exception as err:  # trimesh raises many kinds for broken or unknown files
        raise InferenceError(f"scan={path} does not load ({type(err).__name__}: {err})") from err
    verts = np.asarray(getattr(mesh, "vertices", np.zeros((0, 3))), dtype=np.float64)
    faces = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))), dtype=np.int64)
    if verts.ndim != 2 or len(verts) == 0 or faces.ndim != 2 or len(faces) == 0:
        raise InferenceError(f"scan={path} does not load: no triangle faces")
    if not np.isfinite(verts).all():
        raise InferenceError(f"scan={path} does not load: non-finite vertex coordinates")
    colors = None
    if getattr(mesh.visual, "kind", None) == "vertex":
        colors = np.asarray(mesh.visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0
    return ScanData(verts=verts, faces=faces, path=str(path), vertex_colors=colors)


def _inward(verts: np.ndarray, faces: np.ndarray, pts: np.ndarray, normals: np.ndarray) -> bool:
    """True when the faces point inward: points pushed a little along the normals are mostly
    inside (winding number)."""
    from lib.dataset.winding import inside_mask

    size = float(np.linalg.norm(verts.max(0) - verts.min(0)))
    k = min(len(pts), 2000)
    probe = pts[:k] + 0.005 * size * normals[:k]
    return bool(inside_mask(verts, faces, probe).mean() > 0.5)


def scan_samples(scan: ScanData, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n area-weighted samples of the scan: points [n, 3] (file units), unit outward normals
    [n, 3], and colors [n, 3] in [0, 1] (None without colour), float64."""
    from lib.dataset.scan_sampling import texture_colors
    from lib.utils.surface import SamplingError, area_samples

    try:
        pts, nrm, face, bary = area_samples(scan.verts, scan.faces, n, np.random.default_rng(seed))
    except SamplingError as e:
        raise InferenceError(f"scan={scan.path}: {e}") from None
    if _inward(scan.verts, scan.faces, pts, nrm):
        nrm = -nrm
    colors = None
    if scan.texture is not None:
        uv = np.einsum("nk,nkc->nc", bary, scan.uvs[scan.face_uvs[face]])
        colors = texture_colors(scan.texture, uv)[:, :3]
    elif scan.vertex_colors is not None:
        colors = np.einsum("nk,nkc->nc", bary, scan.vertex_colors[scan.faces[face]])
    return {"points": pts.astype(np.float64), "normals": nrm.astype(np.float64),
            "colors": None if colors is None else np.clip(colors, 0.0, 1.0)}

"""Real-scan conditions for a synthetic head scan: a neck, shoulders and torso, holes, spikes,
other units and orientation (the scan-fitting tests and bench/fit_real.py).

Shape legend: V vertices, F faces.

The head is given in FLAME space (y up, z forward, the neck cut open at the bottom, as
`lib.synthetic.scans.make_scan` returns it). `add_torso` puts a neck tube under the neck cut and
a box for the shoulders and chest under that (separate pieces overlapping the head a little, as
a raw scanner's output may have them); `punch_holes` removes the faces within a radius of random
surface points; `add_spikes` pushes single vertices far out along their normals; `rigid_units`
applies a scale (units), a rotation and a translation.
"""
from __future__ import annotations

import numpy as np
import torch

from lib.render.shading import vertex_normals

__all__ = ["add_torso", "punch_holes", "add_spikes", "rigid_units", "random_rotation"]


def _merge(parts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One mesh of parts [(verts [V, 3], faces [F, 3], colour [3] or [V, 3])]."""
    verts, faces, colors, offset = [], [], [], 0
    for v, f, c in parts:
        verts.append(v)
        faces.append(f + offset)
        colors.append(np.broadcast_to(c, v.shape).copy())
        offset += len(v)
    return np.concatenate(verts), np.concatenate(faces), np.concatenate(colors)


def add_torso(verts: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None,
              shirt=(0.2, 0.3, 0.5)) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Head verts [V, 3], faces [F, 3] (FLAME space, y up), colours [V, 3] in [0, 1] or None
    (grey) -> verts, faces, colours with a neck tube and a shoulder/chest box (colour `shirt`)
    added, and the number of the head's faces (the first ones of the result)."""
    import trimesh

    v = np.asarray(verts, dtype=np.float64)
    height = float(np.ptp(v[:, 1]))
    width = float(np.ptp(v[:, 0]))
    bottom = float(v[:, 1].min())
    ring = v[v[:, 1] < bottom + 0.04 * height]
    centre = ring.mean(0)
    radius = float(np.median(np.linalg.norm((ring - centre)[:, [0, 2]], axis=1)))
    tube_len = 0.3 * height
    tube = trimesh.creation.cylinder(radius=0.98 * radius, height=tube_len, sections=48)
    tube.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [1, 0, 0]))
    tube.apply_translation([centre[0], bottom - 0.5 * tube_len + 0.02 * height, centre[2]])
    box = trimesh.creation.box(extents=[2.4 * width, 0.7 * height, 1.1 * width])
    box = box.subdivide().subdivide()
    box.apply_translation([centre[0], bottom - tube_len - 0.32 * height, centre[2] - 0.1 * width])
    head_c = np.full(3, 0.6) if colors is None else np.asarray(colors, dtype=np.float64)
    vv, ff, cc = _merge([(v, np.asarray(faces, dtype=np.int64), head_c),
                         (np.asarray(tube.vertices), np.asarray(tube.faces), np.asarray(shirt)),
                         (np.asarray(box.vertices), np.asarray(box.faces), np.asarray(shirt))])
    return vv, ff, cc, len(faces)


def punch_holes(verts: np.ndarray, faces: np.ndarray, n_holes: int, radius: float,
                rng: np.random.Generator, among: np.ndarray | None = None) -> np.ndarray:
    """A face mask [F] (True = kept) without the faces whose centroid lies within radius of
    n_holes random vertices (drawn among the vertex ids `among`, default all)."""
    v = np.asarray(verts, dtype=np.float64)
    centre = v[np.asarray(faces)].mean(1)
    pool = np.arange(len(v)) if among is None else np.asarray(among)
    keep = np.ones(len(centre), dtype=bool)
    for c in v[rng.choice(pool, n_holes, replace=False)]:
        keep &= np.linalg.norm(centre - c, axis=1) > radius
    return keep


def add_spikes(verts: np.ndarray, faces: np.ndarray, n: int, length: float,
               rng: np.random.Generator) -> np.ndarray:
    """verts [V, 3] with n random vertices of faces [F, 3] pushed `length` out along their
    area-weighted vertex normals; returns the new [V, 3] (float64)."""
    v = np.asarray(verts, dtype=np.float64).copy()
    f = np.asarray(faces, dtype=np.int64)
    normals = vertex_normals(torch.from_numpy(v), torch.from_numpy(f))[0].numpy()
    ids = rng.choice(np.unique(f), n, replace=False)
    v[ids] += length * normals[ids]
    return v


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation [3, 3] (det +1)."""
    from scipy.spatial.transform import Rotation

    return Rotation.random(random_state=rng).as_matrix()


def rigid_units(verts: np.ndarray, scale: float, rotation: np.ndarray, translation
                ) -> np.ndarray:
    """scale * verts @ rotation.T + translation: [V, 3] float64."""
    return scale * np.asarray(verts, dtype=np.float64) @ np.asarray(rotation).T \
        + np.asarray(translation, dtype=np.float64)

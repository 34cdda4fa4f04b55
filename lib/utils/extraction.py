"""Hierarchical iso-surface extraction of an occupancy network (replaces libmise and
`marching_cubes_lewiner`; docs/design.md, Differences from the original).

Shape legend: N query points, R grid resolution (cells per axis; R + 1 grid points per
axis), V vertices, F faces.

The occupancy is given as a function `occ_fn(points [N, 3]) -> logits [N]`; the surface is
`logit == level` and the inside is where the logit is larger than `level` (probability
above sigmoid(level)).

The grid of `extract_mesh` is the original's: a cube centred on the given box's centre whose
side is (1 + 2 * padding) times the box's longest extent (padding 0.05: 1.1 times). Callers
pass the subject's shaped canonical FLAME vertices' bounding box (lib/model/validation.py).

Algorithm of `extract_mesh` (coarse-to-fine, all in torch):
1. evaluate the (res_init + 1)^3 grid points of the cube;
2. repeat until res_final, doubling the resolution each time:
   - a cell is *active* when its 8 corner values straddle the level (min <= level <= max);
     the active set is dilated by `dilation` cells (26-neighbourhood) so that thin features
     which only show up next to a detected crossing are not lost;
   - the finer grid is filled by trilinear interpolation of the coarser one (exact at the
     shared points); then only the new points lying in active cells are evaluated;
3. marching cubes (scikit-image, Lewiner) on the final dense value grid, vertices mapped to
   world coordinates, faces oriented outward, then the head component kept (`head_component`,
   the original's rule): among the components (faces connected through shared edges) the one
   whose area-weighted centroid is nearest the origin, unless its area is below half the
   largest component's area, in which case the largest by area.

Where the surface is resolved by the hierarchy, the final grid equals the dense grid at
every corner of every cell the surface crosses, so the mesh equals the one of marching
cubes on `dense_grid_values` (tested).

An occupancy with no crossing of `level` inside the box raises `EmptyMeshError`
(a `ValueError`): callers that may see untrained networks catch it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lib.utils.errors import ModuleErrors

_err = ModuleErrors(__name__)

OccFn = Callable[[torch.Tensor], torch.Tensor]


class EmptyMeshError(ValueError):
    """The occupancy never crosses the level inside the box: there is no surface."""


@dataclass
class ExtractedMesh:
    """Result of `extract_mesh` / `mesh_from_grid`.

    verts: [V, 3] float32 world coordinates; faces: [F, 3] long, counter-clockwise seen from
    outside (normals point outward); n_queries: number of points passed to occ_fn;
    grid_min / grid_max: [3] float64 numpy corners of the grid; res: cells per axis.
    """

    verts: torch.Tensor
    faces: torch.Tensor
    n_queries: int
    grid_min: np.ndarray
    grid_max: np.ndarray
    res: int


def padded_box(bbox_min, bbox_max, padding: float) -> tuple[np.ndarray, np.ndarray]:
    """bbox_min, bbox_max: [3] array-likes or tensors. Returns the float64 [3] corners grown by
    `padding * max extent` on every side."""
    lo = torch.as_tensor(bbox_min).detach().to("cpu", torch.float64).numpy().reshape(-1)
    hi = torch.as_tensor(bbox_max).detach().to("cpu", torch.float64).numpy().reshape(-1)
    if lo.shape != (3,) or hi.shape != (3,):
        raise _err(f"bbox_min/bbox_max must have 3 entries, got {lo.shape}, "
                   f"{hi.shape}")
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(hi > lo)):
        raise _err(f"need finite bbox_max > bbox_min per axis, got {lo}, {hi}")
    if padding < 0:
        raise _err(f"padding must be >= 0, got {padding}")
    pad = float(padding) * float((hi - lo).max())
    return lo - pad, hi + pad


def cube_box(bbox_min, bbox_max, padding: float) -> tuple[np.ndarray, np.ndarray]:
    """The cube centred on the box [bbox_min, bbox_max] with side (1 + 2 * padding) times the
    box's longest extent. bbox_min, bbox_max: [3]. Returns float64 [3] corners."""
    lo, hi = padded_box(bbox_min, bbox_max, 0.0)
    if padding < 0:
        raise _err(f"padding must be >= 0, got {padding}")
    center = 0.5 * (lo + hi)
    half = 0.5 * (1.0 + 2.0 * float(padding)) * float((hi - lo).max())
    return center - half, center + half


def _resolve_device(device, bbox_min) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(bbox_min, torch.Tensor):
        return bbox_min.device
    return torch.device("cpu")


def _flat_to_points(flat: torch.Tensor, n: int, stride: int, lo: torch.Tensor,
                    step: torch.Tensor) -> torch.Tensor:
    """flat: [N] long indices into an n^3 grid (C order, x slowest) whose point i sits at
    final-grid index i * stride. lo, step: [3] float32. Returns points [N, 3] float32.

    Points are always computed from the final-grid index, so the same location gets the same
    float32 coordinates at every level and in `dense_grid_values`."""
    i = flat // (n * n)
    j = (flat // n) % n
    k = flat % n
    ijk = torch.stack([i, j, k], dim=-1) * stride
    return lo + ijk.to(torch.float32) * step


def _query(occ_fn: OccFn, flat: torch.Tensor, n: int, stride: int, lo: torch.Tensor,
           step: torch.Tensor, chunk: int) -> torch.Tensor:
    """Evaluate occ_fn at the grid points `flat` ([N] long), in chunks without gradients.
    Returns logits [N] float32 on flat's device."""
    out = []
    with torch.no_grad():
        for start in range(0, flat.shape[0], chunk):
            part = flat[start:start + chunk]
            pts = _flat_to_points(part, n, stride, lo, step)
            val = occ_fn(pts)
            if not isinstance(val, torch.Tensor) or val.numel() != part.shape[0]:
                got = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val)
                raise _err(f"occ_fn must return [N] logits for [N, 3] points "
                           f"(N={part.shape[0]}), got {got}")
            out.append(val.reshape(-1).to(flat.device, torch.float32))
    if not out:
        return torch.zeros(0, dtype=torch.float32, device=flat.device)
    return torch.cat(out)


def _check_chunk(chunk: int) -> int:
    if int(chunk) < 1:
        raise _err(f"chunk must be >= 1, got {chunk}")
    return int(chunk)


def dense_grid_values(occ_fn: OccFn, bbox_min, bbox_max, res: int, chunk: int = 100_000,
                      device=None) -> torch.Tensor:
    """Evaluate occ_fn at every point of the (res + 1)^3 grid spanning [bbox_min, bbox_max]
    (no padding). bbox_min, bbox_max: [3]. Returns values [res+1, res+1, res+1] float32 with
    index order (x, y, z); point (i, j, k) = bbox_min + (i, j, k) * (bbox_max - bbox_min) / res.
    """
    if int(res) < 1:
        raise _err(f"res must be >= 1, got {res}")
    res, chunk = int(res), _check_chunk(chunk)
    dev = _resolve_device(device, bbox_min)
    lo, hi = padded_box(bbox_min, bbox_max, 0.0)
    lo_t = torch.as_tensor(lo, dtype=torch.float32, device=dev)
    step_t = torch.as_tensor((hi - lo) / res, dtype=torch.float32, device=dev)
    n = res + 1
    values = torch.empty(n ** 3, dtype=torch.float32, device=dev)
    for start in range(0, n ** 3, chunk):
        flat = torch.arange(start, min(start + chunk, n ** 3), device=dev)
        values[start:start + flat.shape[0]] = _query(occ_fn, flat, n, 1, lo_t, step_t, chunk)
    return values.view(n, n, n)


def _active_cells(values: torch.Tensor, level: float, dilation: int) -> torch.Tensor:
    """values: [R+1, R+1, R+1]. Returns bool [R, R, R]: cells whose corners straddle `level`,
    dilated by `dilation` cells."""
    v = values[None, None]
    cmax = F.max_pool3d(v, kernel_size=2, stride=1)
    cmin = -F.max_pool3d(-v, kernel_size=2, stride=1)
    active = ((cmin <= level) & (cmax >= level)).to(values.dtype)
    if dilation > 0:
        active = F.max_pool3d(active, kernel_size=2 * dilation + 1, stride=1, padding=dilation)
    return active[0, 0] > 0


def _points_of_cells(cells: torch.Tensor) -> torch.Tensor:
    """cells: bool [R, R, R]. Returns bool [R+1, R+1, R+1]: grid points that are a corner of
    at least one selected cell."""
    c = F.pad(cells.to(torch.float32)[None, None], (1, 1, 1, 1, 1, 1))
    return F.max_pool3d(c, kernel_size=2, stride=1)[0, 0] > 0


def hierarchical_grid_values(occ_fn: OccFn, grid_min: np.ndarray, grid_max: np.ndarray,
                             res_init: int, res_final: int, level: float, chunk: int,
                             device: torch.device, dilation: int = 1
                             ) -> tuple[torch.Tensor, int]:
    """Coarse-to-fine evaluation (module docstring). grid_min, grid_max: [3] float64.
    Returns values [res_final+1]^3 float32 on `device` (exact near the surface, trilinear
    elsewhere) and the number of occ_fn queries."""
    ratio = res_final // res_init
    if res_init < 1 or res_final % res_init != 0 or ratio & (ratio - 1) != 0:
        raise _err(f"res_final / res_init must be a power of two, got "
                   f"res_init={res_init}, res_final={res_final}")
    if dilation < 0:
        raise _err(f"dilation must be >= 0, got {dilation}")
    lo_t = torch.as_tensor(grid_min, dtype=torch.float32, device=device)
    step_t = torch.as_tensor((grid_max - grid_min) / res_final, dtype=torch.float32,
                             device=device)
    res, stride = res_init, ratio
    n = res + 1
    flat = torch.arange(n ** 3, device=device)
    values = _query(occ_fn, flat, n, stride, lo_t, step_t, chunk).view(n, n, n)
    n_queries = n ** 3
    while res < res_final:
        active = _active_cells(values, level, dilation)
        res, stride, n = 2 * res, stride // 2, 2 * res + 1
        fine = F.interpolate(values[None, None], size=(n, n, n), mode="trilinear",
                             align_corners=True)[0, 0].contiguous()
        fine[::2, ::2, ::2] = values  # shared points keep their (exact) values
        cells = active.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
        todo = _points_of_cells(cells)
        todo[::2, ::2, ::2] = False  # already known from the coarser level
        flat = torch.nonzero(todo.view(-1)).squeeze(1)
        if flat.numel() > 0:
            fine.view(-1)[flat] = _query(occ_fn, flat, n, stride, lo_t, step_t, chunk)
        n_queries += int(flat.numel())
        values = fine
    return values, n_queries


def edge_components(faces: np.ndarray) -> tuple[int, np.ndarray]:
    """Connected components of a triangle mesh whose faces are linked through shared edges.
    faces: [F, 3] int. Returns (count, label per face [F])."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    F_ = faces.shape[0]
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), 1)
    _, edge_id = np.unique(edges, axis=0, return_inverse=True)
    edge_id = edge_id.reshape(-1)
    n_e = int(edge_id.max()) + 1 if edge_id.size else 0
    face_id = np.tile(np.arange(F_), 3)
    # bipartite graph faces -- edges: faces sharing an edge meet in its node
    graph = coo_matrix((np.ones(face_id.shape[0], dtype=np.int8), (face_id, F_ + edge_id)),
                       shape=(F_ + n_e, F_ + n_e))
    _, labels = connected_components(graph, directed=False)
    _, face_label = np.unique(labels[:F_], return_inverse=True)
    face_label = face_label.reshape(-1)
    return int(face_label.max()) + 1 if F_ else 0, face_label


def head_component(verts: np.ndarray, faces: np.ndarray, center=(0.0, 0.0, 0.0)
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The original's choice of the head among the connected components (edge-linked faces):
    the component whose centroid (mean of its triangle centroids weighted by their areas) is
    nearest `center`, unless its area is below half that of the largest-area component, which
    is then kept instead. verts: [V, 3]; faces: [F, 3] int. Returns (verts [V', 3],
    faces [F', 3]) reindexed."""
    n_comp, label = edge_components(faces)
    if n_comp <= 1:
        return verts, faces
    tri = verts[faces]                                                      # [F, 3, 3]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    comp_area = np.bincount(label, weights=area, minlength=n_comp)
    moment = np.stack([np.bincount(label, weights=area * tri.mean(1)[:, k], minlength=n_comp)
                       for k in range(3)], axis=1)
    centroid = moment / np.maximum(comp_area, 1e-300)[:, None]
    nearest = int(np.argmin(((centroid - np.asarray(center, dtype=np.float64)) ** 2).sum(1)))
    largest = int(np.argmax(comp_area))
    keep = largest if comp_area[nearest] < 0.5 * comp_area[largest] else nearest
    faces = faces[label == keep]
    used = np.unique(faces)
    remap = np.full(verts.shape[0], -1, dtype=np.int64)
    remap[used] = np.arange(used.shape[0])
    return verts[used], remap[faces]


def mesh_from_grid(values: torch.Tensor, grid_min, grid_max, level: float = 0.0,
                   keep_main_component: bool = True, n_queries: int = 0) -> ExtractedMesh:
    """Marching cubes on a value grid. values: [R+1, R+1, R+1] (x, y, z index order, inside =
    values above `level`); grid_min, grid_max: [3] corners of the grid; keep_main_component:
    keep only the head component (`head_component`). Returns an ExtractedMesh on values'
    device, faces oriented outward. Raises EmptyMeshError when `level` is not crossed."""
    from skimage.measure import marching_cubes

    if values.dim() != 3 or len(set(values.shape)) != 1 or values.shape[0] < 2:
        raise _err(f"values must be a cubic [R+1]^3 grid with R >= 1, got "
                   f"{tuple(values.shape)}")
    lo, hi = padded_box(grid_min, grid_max, 0.0)
    res = values.shape[0] - 1
    vol = values.detach().to("cpu", torch.float32).numpy()
    if not np.all(np.isfinite(vol)):
        raise _err("occupancy values contain NaN or inf")
    if not (vol.min() < level < vol.max()):
        raise _err(f"no surface: occupancy range [{vol.min():.4g}, {vol.max():.4g}] does not cross "
                   f"level {level}", EmptyMeshError)
    v_idx, faces, _, _ = marching_cubes(vol, level=level, allow_degenerate=False)
    # scikit-image winds triangles clockwise seen from the high-value side (its 'descent'
    # convention); inside is high here, so reverse the winding for outward normals.
    faces = np.ascontiguousarray(faces[:, ::-1]).astype(np.int64)
    verts = lo + v_idx.astype(np.float64) * ((hi - lo) / res)
    if keep_main_component and faces.shape[0] > 0:
        verts, faces = head_component(verts, faces)
    if faces.shape[0] == 0:
        raise _err(f"marching cubes produced no faces at level {level}", EmptyMeshError)
    return ExtractedMesh(
        verts=torch.as_tensor(verts, dtype=torch.float32).to(values.device),
        faces=torch.as_tensor(faces, dtype=torch.long).to(values.device),
        n_queries=int(n_queries), grid_min=lo, grid_max=hi, res=res)


def extract_mesh(occ_fn: OccFn, bbox_min, bbox_max, res_init: int = 16, res_final: int = 256,
                 level: float = 0.0, chunk: int = 100_000, padding: float = 0.05,
                 keep_main_component: bool = True, device=None, dilation: int = 1
                 ) -> ExtractedMesh:
    """Extract the surface `occ_fn == level` inside a box.

    occ_fn: points [N, 3] float32 (on `device`) -> logits [N]; called under no_grad in
        chunks of at most `chunk` points.
    bbox_min, bbox_max: [3] corners of the region (the subject's canonical FLAME bounding
        box); the grid is the cube centred on it with side (1 + 2 * padding) times its
        longest extent (padding 0.05: 1.1 times, as the original).
    res_init, res_final: cells per axis of the first and the final grid (ratio a power of 2).
    keep_main_component: keep only the head component (`head_component`).
    device: where points are made and values kept; default bbox_min's device or CPU.
    dilation: cells added around the straddling cells at every level (0 disables).
    Returns ExtractedMesh(verts [V, 3] float32 world, faces [F, 3] long outward, n_queries).
    Raises EmptyMeshError (a ValueError) when the occupancy does not cross `level`.
    """
    chunk = _check_chunk(chunk)
    dev = _resolve_device(device, bbox_min)
    lo, hi = cube_box(bbox_min, bbox_max, padding)
    values, n_queries = hierarchical_grid_values(occ_fn, lo, hi, int(res_init), int(res_final),
                                                 float(level), chunk, dev, int(dilation))
    return mesh_from_grid(values, lo, hi, level=level, keep_main_component=keep_main_component,
                          n_queries=n_queries)

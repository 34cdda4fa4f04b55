"""Surface-to-surface metrics of a reconstruction against a scan (eval_mode=fit).

Shape legend: V vertices, F faces, N points sampled on the prediction, M on the reference.

Both meshes are sampled uniformly by area (`sample_surface`, with face normals); with
d(x, Y) the distance from x to the nearest sample of Y:
    chamfer_l1           (mean_x d(x, gt) + mean_y d(y, pred)) / 2
    chamfer_l2           the same with squared distances
    normal_consistency   (mean |n_x . n_nearest(gt)| + mean |n_y . n_nearest(pred)|) / 2
                         (absolute: scans may be oriented either way)
    fscore_<p>           2 P R / (P + R) with precision P = fraction of prediction samples
                         within tau of the reference, recall R = fraction of reference samples
                         within tau of the prediction, tau = p% of the head size
The head size is the diagonal of the reference's bounding box (`head_size`).
"""
from __future__ import annotations

import numpy as np
import torch

from lib.utils.knn import nearest_exact
from lib.utils.surface import area_samples

__all__ = ["sample_surface", "head_size", "point_metrics", "mesh_metrics", "THRESHOLDS"]

THRESHOLDS = (0.01, 0.02)  # fractions of the head size for the F-scores


def sample_surface(verts, faces, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n area-weighted samples of a triangle mesh (lib/utils/surface.area_samples, drawn with
    numpy's generator seeded by `seed`). verts: [V, 3]; faces: [F, 3] (tensors or arrays).
    Returns points [n, 3] and unit face normals [n, 3] (float32 torch, on verts' device for
    tensors)."""
    device = verts.device if torch.is_tensor(verts) else None
    v = verts.detach().cpu().double().numpy() if torch.is_tensor(verts) else np.asarray(verts)
    f = faces.detach().cpu().numpy() if torch.is_tensor(faces) else np.asarray(faces)
    pts, normals, _, _ = area_samples(v, f, n, np.random.default_rng(int(seed)))
    return (torch.as_tensor(pts, dtype=torch.float32, device=device),
            torch.as_tensor(normals, dtype=torch.float32, device=device))


def head_size(points) -> float:
    """Diagonal of the bounding box of points [N, 3]."""
    p = torch.as_tensor(points).float()
    return float((p.amax(0) - p.amin(0)).norm())


def point_metrics(pred_pts: torch.Tensor, pred_nrm: torch.Tensor, gt_pts: torch.Tensor,
                  gt_nrm: torch.Tensor, size: float, thresholds=THRESHOLDS) -> dict[str, float]:
    """Metrics (module docstring) between oriented samples: pred_pts, pred_nrm [N, 3];
    gt_pts, gt_nrm [M, 3]; size: the head size. Returns a dict of floats."""
    d_pg, i_pg = nearest_exact(pred_pts, gt_pts)
    d_gp, i_gp = nearest_exact(gt_pts, pred_pts)
    gt_nrm = gt_nrm.to(pred_nrm)
    nc_p = (pred_nrm * gt_nrm[i_pg]).sum(-1).abs().mean()
    nc_g = (gt_nrm * pred_nrm[i_gp]).sum(-1).abs().mean()
    out = {
        "chamfer_l1": float(0.5 * (d_pg.mean() + d_gp.mean())),
        "chamfer_l2": float(0.5 * ((d_pg ** 2).mean() + (d_gp ** 2).mean())),
        "normal_consistency": float(0.5 * (nc_p + nc_g)),
    }
    for frac in thresholds:
        tau = frac * size
        precision = float((d_pg < tau).float().mean())
        recall = float((d_gp < tau).float().mean())
        f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
        out[f"fscore_{round(frac * 100):d}pct"] = f
    return out


def mesh_metrics(pred_verts, pred_faces, gt_verts, gt_faces, n: int = 20000, seed: int = 0,
                 size: float | None = None) -> dict[str, float]:
    """Metrics of a predicted mesh against a reference mesh (verts [V, 3], faces [F, 3]);
    n samples on each; size: head size (default `head_size(gt_verts)`)."""
    p, pn = sample_surface(pred_verts, pred_faces, n, seed)
    g, gn = sample_surface(gt_verts, gt_faces, n, seed + 1)
    size = head_size(np.asarray(torch.as_tensor(gt_verts).cpu())) if size is None else size
    out = point_metrics(p, pn, g.to(p), gn.to(p), size)
    out["head_size"] = float(size)
    return out

"""Float64 numpy reference of FLAME in the project's scaled space (for tests only).

Written independently of lib/flame: one sample at a time, plain loops over joints,
scipy's Rotation for axis-angle, explicit 4x4 matrices.

Shape legend: V vertices, J joints (5), Sf shapedirs columns, S shape and X expression
components used, Q = 9 (J - 1) pose-corrective feature.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.spatial.transform import Rotation

EXPR_START = 300


def parents_from_kintree(kintree: np.ndarray) -> list[int]:
    """kintree [2, J] -> parents (root -1)."""
    col = {int(j): c for c, j in enumerate(kintree[1])}
    return [-1 if int(p) in (2**32 - 1, -1) else col[int(p)] for p in kintree[0]]


def reference_flame(model: dict, shape: np.ndarray, exp: np.ndarray, pose: np.ndarray,
                    scale: float = 6.0) -> dict:
    """One FLAME evaluation.

    model: dict with the FLAME pickle keys (numpy / scipy.sparse); shape [S]; exp [X];
    pose [15] or [6] axis-angle. Returns dict (scaled space):
    vertices [V,3], joints [J,3], T [J,4,4], pose_feature [Q], z_shift float.
    """
    vt = np.asarray(model["v_template"], np.float64)
    sd = np.asarray(model["shapedirs"], np.float64)
    pd = np.asarray(model["posedirs"], np.float64)
    jr = model["J_regressor"]
    jr = jr.toarray() if sp.issparse(jr) else np.asarray(jr, np.float64)
    w = np.asarray(model["weights"], np.float64)
    parents = parents_from_kintree(np.asarray(model["kintree_table"]))
    n_j = len(parents)

    pose = np.asarray(pose, np.float64)
    if pose.shape[0] == 6:
        full = np.zeros(15)
        full[0:3] = pose[0:3]
        full[6:9] = pose[3:6]
        pose = full
    S, X = len(shape), len(exp)

    v_shaped = vt.copy()
    for k in range(S):
        v_shaped += sd[:, :, k] * shape[k]
    for k in range(X):
        v_shaped += sd[:, :, EXPR_START + k] * exp[k]
    joints = jr @ v_shaped  # [J, 3]

    rots = [Rotation.from_rotvec(pose[3 * j:3 * j + 3]).as_matrix() for j in range(n_j)]
    feat = np.concatenate([(rots[j] - np.eye(3)).reshape(-1) for j in range(1, n_j)])
    v_posed = v_shaped + np.einsum("vcp,p->vc", pd, feat)

    G = [None] * n_j
    for j in range(n_j):
        local = np.eye(4)
        local[:3, :3] = rots[j]
        if parents[j] < 0:
            local[:3, 3] = joints[j]
            G[j] = local
        else:
            local[:3, 3] = joints[j] - joints[parents[j]]
            G[j] = G[parents[j]] @ local
    A = []
    for j in range(n_j):
        a = G[j].copy()
        a[:3, 3] = G[j][:3, 3] - G[j][:3, :3] @ joints[j]
        A.append(a)
    posed_joints = np.stack([G[j][:3, 3] for j in range(n_j)])

    homo = np.concatenate([v_posed, np.ones((len(v_posed), 1))], axis=1)  # [V, 4]
    verts = np.zeros((len(v_posed), 3))
    for j in range(n_j):
        verts += w[:, j:j + 1] * (homo @ A[j].T)[:, :3]

    z = vt[:, 2] * scale
    z_shift = -(z.min() + z.max()) / 2.0
    M = np.eye(4)
    M[:3, :3] *= scale
    M[2, 3] = z_shift
    Minv = np.linalg.inv(M)
    T = np.stack([M @ A[j] @ Minv for j in range(n_j)])
    offset = np.array([0.0, 0.0, z_shift])
    return {
        "vertices": verts * scale + offset,
        "joints": posed_joints * scale + offset,
        "T": T,
        "pose_feature": feat,
        "z_shift": z_shift,
    }

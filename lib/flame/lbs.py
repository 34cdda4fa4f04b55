"""Linear blend skinning primitives (pure torch, batched, device/dtype follow the inputs).

Shape legend:
    B batch, N points (or V vertices), J joints (5 for FLAME), X expression components,
    Q pose-feature size ((J-1)*9 = 36 for FLAME).

Conventions:
    * A transform ``tfs[b, j]`` is a 4x4 matrix mapping a *rest* point to its posed position
      under bone j alone (global bone transform with the rest joint location removed).
    * Pose correctives: ``offset[n, c] = sum_p pose_feature[p] * pose_dirs[n, p, c]`` with
      per-point ``pose_dirs [N, Q, 3]`` (FLAME's ``posedirs [V, 3, Q]`` transposed).
    * Expression offsets: ``offset[n, c] = sum_k E[n, c, k] * coeffs[k]``, ``E [N, 3, X]``.
"""
from __future__ import annotations

import torch

__all__ = [
    "batch_rodrigues",
    "matrix_to_axis_angle",
    "pose_to_feature",
    "rigid_chain",
    "skin_points",
    "blend_offsets",
    "pose_offsets",
    "inv3",
    "adjugate3",
    "skin_offset",
    "deform_canonical",
    "rigid_inverse",
]

_SMALL_ANGLE = 1e-4


def batch_rodrigues(rvec: torch.Tensor) -> torch.Tensor:
    """Axis-angle to rotation matrix, exact and differentiable at zero angle.

    rvec: [..., 3] axis * angle (radians). Returns R: [..., 3, 3].
    Uses R = I + a K + b K^2 with K = skew(rvec), a = sin t / t, b = (1 - cos t) / t^2,
    switching to their Taylor series below a small angle so gradients stay finite.
    """
    theta2 = (rvec * rvec).sum(-1, keepdim=True)  # [..., 1]
    small = theta2 < _SMALL_ANGLE**2
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = torch.sqrt(theta2_safe)
    a_big = torch.sin(theta) / theta
    b_big = (1.0 - torch.cos(theta)) / theta2_safe
    a_small = 1.0 - theta2 / 6.0 + theta2 * theta2 / 120.0
    b_small = 0.5 - theta2 / 24.0 + theta2 * theta2 / 720.0
    a = torch.where(small, a_small, a_big)[..., None]  # [..., 1, 1]
    b = torch.where(small, b_small, b_big)[..., None]
    x, y, z = rvec.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1)
    K = K.reshape(*rvec.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=rvec.dtype, device=rvec.device).expand_as(K)
    return eye + a * K + b * (K @ K)


def matrix_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrix to axis-angle (the inverse of batch_rodrigues for angles in [0, pi]).

    R: [..., 3, 3] rotation matrices. Returns rvec [..., 3] with |rvec| in [0, pi].
    Goes through the unit quaternion (w, v) taken from the largest of the four
    candidate pivots (stable for every angle), with w >= 0, and rvec = 2 atan2(|v|, w) v / |v|
    (2 v / w near zero angle).
    """
    m = R.reshape(-1, 3, 3)
    tr = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    d = torch.stack([tr, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], dim=-1)  # pivot candidates
    pivot = d.argmax(dim=-1)
    q = torch.empty(m.shape[0], 4, dtype=R.dtype, device=R.device)
    for i in range(4):
        sel = pivot == i
        if not sel.any():
            continue
        a = m[sel]
        if i == 0:
            s = torch.sqrt((1.0 + tr[sel]).clamp_min(1e-12)) * 2.0
            qi = torch.stack([0.25 * s, (a[:, 2, 1] - a[:, 1, 2]) / s,
                              (a[:, 0, 2] - a[:, 2, 0]) / s, (a[:, 1, 0] - a[:, 0, 1]) / s], -1)
        else:
            j, k = i % 3, (i + 1) % 3  # the cyclic successors of axis i - 1
            ii = i - 1
            s = torch.sqrt((1.0 + 2.0 * a[:, ii, ii] - tr[sel]).clamp_min(1e-12)) * 2.0
            qi = torch.empty(a.shape[0], 4, dtype=R.dtype, device=R.device)
            qi[:, 0] = (a[:, k, j] - a[:, j, k]) / s
            qi[:, 1 + ii] = 0.25 * s
            qi[:, 1 + j] = (a[:, j, ii] + a[:, ii, j]) / s
            qi[:, 1 + k] = (a[:, k, ii] + a[:, ii, k]) / s
        q[sel] = qi
    q = q * torch.where(q[:, :1] < 0, -1.0, 1.0)  # w >= 0: angle in [0, pi]
    w, v = q[:, 0], q[:, 1:]
    n = v.norm(dim=-1)
    small = n < 1e-7
    scale = torch.where(small, 2.0 / w.clamp_min(1e-12),
                        2.0 * torch.atan2(n, w) / torch.where(small, torch.ones_like(n), n))
    return (v * scale[:, None]).reshape(*R.shape[:-2], 3)


def pose_to_feature(rotmats: torch.Tensor) -> torch.Tensor:
    """Pose-corrective feature: (R_j - I) flattened (row-major) for joints 1..J-1.

    rotmats: [B, J, 3, 3]. Returns [B, (J-1)*9] (36 for FLAME).
    """
    eye = torch.eye(3, dtype=rotmats.dtype, device=rotmats.device)
    return (rotmats[:, 1:] - eye).reshape(rotmats.shape[0], -1)


def _homogeneous(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """R [..., 3, 3], t [..., 3] -> [..., 4, 4]."""
    top = torch.cat([R, t[..., None]], dim=-1)
    bottom = torch.zeros(*R.shape[:-2], 1, 4, dtype=R.dtype, device=R.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def rigid_inverse(T: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid (rotation + translation) 4x4 transforms. T: [..., 4, 4] -> [..., 4, 4]."""
    Rt = T[..., :3, :3].transpose(-1, -2)
    t = -(Rt @ T[..., :3, 3:])[..., 0]
    return _homogeneous(Rt, t)


def rigid_chain(rotmats: torch.Tensor, joints: torch.Tensor, parents):
    """Forward kinematics of a joint tree.

    rotmats: [B, J, 3, 3] local rotations; joints: [B, J, 3] rest joint locations;
    parents: sequence of J ints, parents[0] == -1 and parents[j] < j.
    Returns posed_joints [B, J, 3] and A [B, J, 4, 4] with A_j = G_j @ [I, -joint_j]
    (maps rest points to posed points for bone j).
    """
    parents = [int(p) for p in parents]
    J = len(parents)
    rel = joints.clone()
    rel[:, 1:] = joints[:, 1:] - joints[:, parents[1:]]
    local = _homogeneous(rotmats, rel)  # [B, J, 4, 4]
    chain = [local[:, 0]]
    for j in range(1, J):
        chain.append(chain[parents[j]] @ local[:, j])
    G = torch.stack(chain, dim=1)  # [B, J, 4, 4]
    posed_joints = G[..., :3, 3]
    shift = (G[..., :3, :3] @ joints[..., None])[..., 0]
    A = _homogeneous(G[..., :3, :3], posed_joints - shift)
    return posed_joints, A


def _blend_matrices(w: torch.Tensor, tfs: torch.Tensor) -> torch.Tensor:
    """w [B, N, J], tfs [B, J, 4, 4] -> per-point blended [B, N, 3, 4] (top 3 rows)."""
    return torch.einsum("bnj,bjrc->bnrc", w, tfs[:, :, :3, :])


def skin_points(x: torch.Tensor, w: torch.Tensor, tfs: torch.Tensor) -> torch.Tensor:
    """Linear blend skinning: sum_j w_j (tfs_j [x; 1]).

    x: [B, N, 3], w: [B, N, J], tfs: [B, J, 4, 4]. Returns [B, N, 3].
    """
    M = _blend_matrices(w, tfs)
    return (M[..., :3] @ x[..., None])[..., 0] + M[..., 3]


def blend_offsets(E: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Linear blendshape offsets sum_k E[..., c, k] * coeffs[b, k].

    E: [B, N, 3, X] or shared [N, 3, X]; coeffs: [B, X] (X expression or S shape components).
    Returns [B, N, 3].
    """
    if E.dim() == 3:
        return torch.einsum("nck,bk->bnc", E, coeffs)
    return torch.einsum("bnck,bk->bnc", E, coeffs)


def pose_offsets(pose_dirs: torch.Tensor, pose_feature: torch.Tensor) -> torch.Tensor:
    """Pose correctives pose_feature @ pose_dirs per point.

    pose_dirs: [B, N, Q, 3] or shared [N, Q, 3]; pose_feature: [B, Q]. Returns [B, N, 3].
    """
    if pose_dirs.dim() == 3:
        return torch.einsum("npc,bp->bnc", pose_dirs, pose_feature)
    return torch.einsum("bnpc,bp->bnc", pose_dirs, pose_feature)


def _adjugate_rows(r0: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, dim: int):
    """The rows r0, r1, r2 of 3x3 matrices (their 3 entries along `dim`) -> adjugate columns
    (c0, c1, c2) = (r1 x r2, r2 x r0, r0 x r1) (m^-1 = [c0 c1 c2] / det), det, and ok: False
    where the matrix is numerically singular (|det| <= 1e-10 * product of row norms). Shared by
    inv3 (entries last) and adjugate3 (entries first)."""
    c = (torch.linalg.cross(r1, r2, dim=dim), torch.linalg.cross(r2, r0, dim=dim),
         torch.linalg.cross(r0, r1, dim=dim))
    det = (r0 * c[0]).sum(dim)
    scale = ((r0 * r0).sum(dim) * (r1 * r1).sum(dim) * (r2 * r2).sum(dim)).sqrt()
    return c, det, torch.isfinite(det) & (det.abs() > 1e-10 * scale)


def inv3(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form inverse of 3x3 matrices (adjugate / determinant), differentiable.

    m: [..., 3, 3]. Returns (inverse [..., 3, 3], ok [...] bool); ok is False where the matrix is
    numerically singular (|det| <= 1e-10 * product of row norms); the inverse is 0 there.
    """
    (c0, c1, c2), det, ok = _adjugate_rows(m[..., 0, :], m[..., 1, :], m[..., 2, :], dim=-1)
    safe = torch.where(ok, det, torch.ones_like(det))
    inv = torch.stack([c0, c1, c2], dim=-1) / safe[..., None, None]
    return torch.where(ok[..., None, None], inv, torch.zeros_like(inv)), ok


def adjugate3(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channels-first 3x3 matrices m [3, 3, A] (m[r, c, a]) -> adjugate columns adj [3, 3, A]
    (m^-1 v = sum_k adj[k] v[k] / det for v [3, A]), det [A] and ok [A] (inv3's criterion).
    The layout of the fast search's per-point arrays."""
    c, det, ok = _adjugate_rows(m[0], m[1], m[2], dim=0)
    return torch.stack(c), det, ok


def _matvec(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """m [..., 3, 3] @ v [..., 3] -> [..., 3] (broadcast)."""
    return (m * v[..., None, :]).sum(-1)


def skin_offset(xc: torch.Tensor, w: torch.Tensor, offset: torch.Tensor, tfs: torch.Tensor,
                tfs_c: torch.Tensor) -> torch.Tensor:
    """The skinning of deform_canonical with the blendshape offset already summed (leading dims
    '...' broadcast): xc [..., 3], w [..., J], offset [..., 3], tfs / tfs_c [..., J, 4, 4] ->
    x_d [..., 3]:
        x_d = (sum_j w_j tfs[j]) ((sum_j w_j tfs_c[j])^-1 x_c + offset).
    Where the canonical blend is singular its inverse is taken as 0 (inv3's rule)."""
    wj = w[..., :, None, None]
    # [..., 3, 4] blended; elementwise sums beat tiny bmm on CPU
    A_c = (wj * tfs_c[..., :3, :]).sum(-3)
    A_d = (wj * tfs[..., :3, :]).sum(-3)
    Ac_inv, _ = inv3(A_c[..., :3])
    x_r = _matvec(Ac_inv, xc - A_c[..., 3]) + offset
    return _matvec(A_d[..., :3], x_r) + A_d[..., 3]


def deform_canonical(xc, w, expr_dirs, pose_dirs, exp, pose_feature, tfs,
                     exp_c, pose_feature_c, tfs_c) -> torch.Tensor:
    """Map canonical points to a target pose/expression (docs/design.md, Forward skinning): the
    one forward-skinning function of the project (the learned deformer, the explicit mesh
    deformation and the fast search's reference all call it).

    Leading dims '...' broadcast (per-item values of a batch [B] of N points carry a point axis
    of 1: exp [B, 1, X], tfs [B, 1, J, 4, 4]):
    xc: [..., 3] canonical points (scaled FLAME space); w: [..., J] skinning weights;
    expr_dirs: [..., 3, X] expression bases; pose_dirs: [..., Q, 3] pose-corrective bases, both
    already in the scaled space (FLAME x6); exp / exp_c: [..., X] target / canonical expression;
    pose_feature / pose_feature_c: [..., Q]; tfs / tfs_c: [..., J, 4, 4] target / canonical
    joint transforms (scaled space). Returns xd: [..., 3]:

        x_r = (sum_j w_j tfs_c[j])^-1 x_c - Pd^T pose_feature_c - E exp_c
              + E exp + Pd^T pose_feature
        x_d = (sum_j w_j tfs[j]) x_r
    """
    offset = (expr_dirs * (exp - exp_c)[..., None, :]).sum(-1) \
        + (pose_dirs * (pose_feature - pose_feature_c)[..., :, None]).sum(-2)
    return skin_offset(xc, w, offset, tfs, tfs_c)

"""Exact, vectorized triangle rasterizer for the orthographic camera of `camera.py`.

Shape legend: B batch, V vertices, F faces, H/W image rows/columns (H = W = res),
Ch attribute channels, A candidate (face, pixel) pairs of one chunk.

Method.  Vertices are projected to continuous pixel coordinates (pixel centres on
integers).  For every face, the pixel centres inside its clipped bounding box become
candidates (a ragged enumeration, so a face covering 0 pixels costs nothing and a
full-screen face costs exactly its box); candidates are processed in chunks of at most
`max_candidates` to bound memory.  A centre p is inside a face when its three edge
functions are >= 0 after orienting the face to positive area (both facings are drawn:
no back-face culling).  Tie rule, making shared edges watertight and drawn once: an edge
function is evaluated with its endpoints in a canonical order (lexicographic on the
projected position, so two faces sharing an edge, even through duplicated vertices,
compute bit-identical values of opposite sign), and a centre exactly on an edge
(value 0) belongs to the face for which that edge, oriented with the face, points
down the image (+row) or, if horizontal, to +col.  Barycentrics are the normalized
edge functions (orthographic: no perspective correction); depth is interpolated with
them.  The visible face at a pixel has the largest z; equal depths go to the smallest
face index.  Pixels outside the image are simply not enumerated (exact clipping); no
near/far clipping.  Faces with a non-finite vertex or zero projected area are skipped.
Coordinates far outside the view are fine as long as the edge-function products stay
finite (|x|, |y| below about 1e15 in float32).

The result is not differentiable w.r.t. vertex positions; `interpolate` is
differentiable w.r.t. the attribute.

`rasterize_reference` is a slow per-face numpy loop with the same rules, for tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lib.render.camera import check_res, project
from lib.utils.errors import ModuleErrors

__all__ = ["Fragments", "rasterize", "interpolate", "interpolate_face_attr",
           "rasterize_reference", "vertex_attr"]

_err = ModuleErrors(__name__)


@dataclass
class Fragments:
    """Per-pixel result of `rasterize`.

    face_idx: [B, H, W] long, index into faces of the visible face, -1 on background.
    bary:     [B, H, W, 3] barycentric weights of the face's 3 vertices (0 on background).
    zbuf:     [B, H, W] z of the visible hit (largest z), -inf on background.
    mask:     [B, H, W] bool, True where a face is visible.
    """

    face_idx: torch.Tensor
    bary: torch.Tensor
    zbuf: torch.Tensor
    mask: torch.Tensor

    @property
    def res(self) -> int:
        return self.face_idx.shape[-1]


def _check_mesh(verts: torch.Tensor, faces: torch.Tensor):
    """verts [V,3] or [B,V,3] -> [B,V,3]; faces [F,3] long, validated."""
    if not torch.is_tensor(verts) or not verts.is_floating_point():
        raise _err("verts must be a floating tensor [V,3] or [B,V,3]")
    if verts.dim() == 2:
        verts = verts.unsqueeze(0)
    if verts.dim() != 3 or verts.shape[-1] != 3:
        raise _err(f"verts must be [V,3] or [B,V,3], got {tuple(verts.shape)}")
    if not torch.is_tensor(faces) or faces.dtype != torch.long or faces.dim() != 2 \
            or faces.shape[1] != 3:
        raise _err(f"faces must be a long tensor [F,3], got "
                   f"{getattr(faces, 'dtype', type(faces))} {tuple(getattr(faces, 'shape', ()))}")
    if faces.device != verts.device:
        raise _err(f"faces on {faces.device} but verts on {verts.device}")
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= verts.shape[1]):
        raise _err(f"faces index out of range for {verts.shape[1]} vertices")
    return verts, faces


def _edge_setup(tri: torch.Tensor, orient: torch.Tensor):
    """Canonical edge data of faces.

    tri: [F, 3, 2] projected (col, row) vertices; orient: [F] +-1 sign of the area.
    Edge k is the one opposite vertex k: (v_{k+1}, v_{k+2}).
    Returns A [F,3,2] canonical edge start and D [F,3,2] canonical direction times the
    sign that makes w_k(p) = D_col (p_row - A_row) - D_row (p_col - A_col) positive
    inside (negation is exact, so shared edges stay bit-antisymmetric), and OWN [F,3]
    bool: the face owns centres lying exactly on edge k.
    """
    a = torch.cat([tri[:, 1:], tri[:, :1]], 1)
    b = torch.cat([tri[:, 2:], tri[:, :2]], 1)
    swap = (a[..., 0] > b[..., 0]) | ((a[..., 0] == b[..., 0]) & (a[..., 1] > b[..., 1]))
    A = torch.where(swap[..., None], b, a)
    S = orient[:, None] * (1.0 - 2.0 * swap.to(tri.dtype))
    D = (torch.where(swap[..., None], a, b) - A) * S[..., None]
    own = (D[..., 1] > 0) | ((D[..., 1] == 0) & (D[..., 0] > 0))
    return A, D, own


def _merge(pix, z, f, bary, zbuf, fbuf, bbuf, big):
    """Merge candidate hits into the running per-pixel buffers (in place).

    pix [A] long flat pixel index, z [A], f [A] long face index, bary [A,3];
    zbuf [B*H*W], fbuf [B*H*W] long (big = unset), bbuf [B*H*W,3].
    """
    old = zbuf.clone()
    zbuf.scatter_reduce_(0, pix, z, reduce="amax", include_self=True)
    fbuf[zbuf != old] = big
    sel = z == zbuf[pix]
    pix, f, bary = pix[sel], f[sel], bary[sel]
    fbuf.scatter_reduce_(0, pix, f, reduce="amin", include_self=True)
    win = f == fbuf[pix]
    bbuf[pix[win]] = bary[win]


def rasterize(verts: torch.Tensor, faces: torch.Tensor, res: int,
              max_candidates: int = 1 << 19) -> Fragments:
    """Rasterize triangle meshes with the project's orthographic camera.

    verts: [V, 3] or [B, V, 3] world positions; faces: [F, 3] long (shared by the batch).
    res: output size; max_candidates: chunk size bounding the memory (about 200 bytes each).
    Returns Fragments with [B, H, W] tensors (B = 1 for unbatched verts).
    """
    res = check_res(res)
    verts, faces = _check_mesh(verts, faces)
    verts = verts.detach()                                         # not differentiable
    B, _, _ = verts.shape
    F = faces.shape[0]
    dev, dt = verts.device, verts.dtype
    n_pix = B * res * res
    zbuf = torch.full((n_pix,), float("-inf"), device=dev, dtype=dt)
    big = torch.iinfo(torch.long).max
    fbuf = torch.full((n_pix,), big, device=dev, dtype=torch.long)
    bbuf = torch.zeros((n_pix, 3), device=dev, dtype=dt)

    if F > 0:
        scr = project(verts, res)                                  # [B, V, 2]
        fl = faces.reshape(-1)
        tri = scr.index_select(1, fl).reshape(B * F, 3, 2)
        zf = verts[..., 2].index_select(1, fl).reshape(B * F, 3)
        finite = torch.isfinite(tri).all(2).all(1) & torch.isfinite(zf).all(1)
        tri = torch.where(finite[:, None, None], tri, torch.zeros((), device=dev, dtype=dt))
        e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
        orient = torch.sign(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
        t0, t1, t2 = tri.unbind(1)
        lo = torch.minimum(torch.minimum(t0, t1), t2).clamp(-1.0, res + 1.0)
        hi = torch.maximum(torch.maximum(t0, t1), t2).clamp(-1.0, res + 1.0)
        c0 = torch.ceil(lo).long().clamp(min=0)
        n_cr = (torch.floor(hi).long().clamp(max=res - 1) - c0 + 1).clamp(min=0)  # cols, rows
        count = n_cr[:, 0] * n_cr[:, 1] * (finite & (orient != 0))
        keep = torch.nonzero(count > 0).squeeze(1)
        if keep.numel():
            tri = tri.index_select(0, keep)
            A, D, own = _edge_setup(tri, orient.index_select(0, keep))
            count = count.index_select(0, keep)
            zf = zf.index_select(0, keep)
            # one packed per-face table, gathered once per candidate:
            # A_col(3) A_row(3) D_col(3) D_row(3) own(3) | ints: col0 row0 ncols face batch
            table = torch.cat([A[..., 0], A[..., 1], D[..., 0], D[..., 1], own.to(dt)], 1)
            itab = torch.stack([c0[:, 0].index_select(0, keep), c0[:, 1].index_select(0, keep),
                                n_cr[:, 0].index_select(0, keep), keep % F, keep // F], 1)
            cum = torch.cumsum(count, 0)
            before = cum - count
            cum_c, before_c = cum.cpu(), before.cpu()
            start, n = 0, keep.numel()
            while start < n:
                stop = int(torch.searchsorted(cum_c, before_c[start] + max_candidates,
                                              right=True))
                stop = min(max(stop, start + 1), n)
                total = int(cum_c[stop - 1] - before_c[start])
                rep = torch.repeat_interleave(
                    torch.arange(start, stop, device=dev), count[start:stop],
                    output_size=total)
                it = itab.index_select(0, rep)
                local = torch.arange(total, device=dev) + before_c[start].item() \
                    - before.index_select(0, rep)
                dr = torch.div(local, it[:, 2], rounding_mode="floor")
                col = it[:, 0] + local - dr * it[:, 2]
                row = it[:, 1] + dr
                g = table.index_select(0, rep)
                px, py = col.to(dt)[:, None], row.to(dt)[:, None]
                w = g[:, 6:9] * (py - g[:, 3:6]) - g[:, 9:12] * (px - g[:, 0:3])
                inside = ((w > 0) | ((w == 0) & (g[:, 12:15] > 0))).all(1)
                idx = torch.nonzero(inside).squeeze(1)
                w = w.index_select(0, idx)
                ws = w[:, 0] + w[:, 1] + w[:, 2]
                ok = torch.nonzero(ws > 0).squeeze(1)
                idx, w, ws = idx.index_select(0, ok), w.index_select(0, ok), ws.index_select(0, ok)
                bary = w / ws[:, None]
                zz = zf.index_select(0, rep.index_select(0, idx))
                z = bary[:, 0] * zz[:, 0] + bary[:, 1] * zz[:, 1] + bary[:, 2] * zz[:, 2]
                it = it.index_select(0, idx)
                pix = it[:, 4] * (res * res) + row.index_select(0, idx) * res \
                    + col.index_select(0, idx)
                _merge(pix, z, it[:, 3], bary, zbuf, fbuf, bbuf, big)
                start = stop

    mask = fbuf != big
    fbuf = torch.where(mask, fbuf, torch.full_like(fbuf, -1))
    shp = (B, res, res)
    return Fragments(face_idx=fbuf.view(shp), bary=bbuf.view(*shp, 3),
                     zbuf=zbuf.view(shp), mask=mask.view(shp))


def _blend(frags: Fragments, flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """flat [n_rows, Ch] values (per vertex or per face corner), idx [B, H*W, 3] rows of flat
    per pixel corner.

    Returns [B, H, W, Ch]: bary-weighted sum, zeros on background.
    """
    B, H, W = frags.face_idx.shape
    Ch = flat.shape[-1]
    vals = flat.index_select(0, idx.reshape(-1)).view(B, H, W, 3, Ch)
    w = frags.bary.to(flat.dtype).unsqueeze(-1)                    # [B, H, W, 3, 1]
    out = vals[..., 0, :] * w[..., 0, :] + vals[..., 1, :] * w[..., 1, :] \
        + vals[..., 2, :] * w[..., 2, :]
    return torch.where(frags.mask.unsqueeze(-1), out, torch.zeros((), device=out.device,
                                                                  dtype=out.dtype))


def interpolate_face_attr(frags: Fragments, face_attr: torch.Tensor) -> torch.Tensor:
    """Interpolate per-face-corner attributes (e.g. OBJ uvs) at every pixel.

    face_attr: [F, 3, Ch] or [B, F, 3, Ch] (B may be 1 to broadcast).
    Returns [B, H, W, Ch], zeros on background.
    """
    B = frags.face_idx.shape[0]
    if face_attr.dim() == 3:
        face_attr = face_attr.unsqueeze(0)
    if face_attr.dim() != 4 or face_attr.shape[2] != 3 or face_attr.shape[0] not in (1, B):
        raise _err(f"face_attr must be [F,3,Ch] or [B,F,3,Ch] with B={B}, "
                   f"got {tuple(face_attr.shape)}")
    Ba, F = face_attr.shape[:2]
    fi = frags.face_idx.clamp(min=0).reshape(B, -1, 1) * 3
    idx = fi + torch.arange(3, device=fi.device)                   # [B, H*W, 3]
    if Ba > 1:
        idx = idx + (torch.arange(B, device=fi.device) * (3 * F)).view(B, 1, 1)
    return _blend(frags, face_attr.reshape(Ba * F * 3, -1), idx)


def vertex_attr(x: torch.Tensor, B: int, name: str) -> torch.Tensor:
    """Per-vertex attributes checked for a batch of B: x [V, Ch] or [1 | B, V, Ch] ->
    [1 | B, V, Ch] (a [V, Ch] gets a leading 1); an error naming `name` otherwise."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[0] not in (1, B):
        raise _err(f"{name} must be [V,Ch] or [B,V,Ch] with B={B}, got {tuple(x.shape)}")
    return x


def interpolate(frags: Fragments, faces: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
    """Interpolate per-vertex attributes at every pixel (hit point = interpolate(verts)).

    faces: [F, 3] long; attr: [V, Ch] or [B, V, Ch] (B may be 1 to broadcast).
    Returns [B, H, W, Ch], zeros on background.
    """
    B = frags.face_idx.shape[0]
    attr = vertex_attr(attr, B, "attr")
    Ba, V = attr.shape[:2]
    fi = frags.face_idx.clamp(min=0).reshape(-1)
    idx = faces.index_select(0, fi).view(B, -1, 3)                 # [B, H*W, 3]
    if Ba > 1:
        idx = idx + (torch.arange(B, device=fi.device) * V).view(B, 1, 1)
    return _blend(frags, attr.reshape(Ba * V, -1), idx)


def rasterize_reference(verts, faces, res: int, return_second: bool = False):
    """Slow per-face numpy rasterizer with the same rules, for tests only.

    verts: [V,3] or [B,V,3] (tensor or array), computed in float64; faces: [F,3].
    Returns Fragments (float64 tensors on CPU); with return_second also z2 [B,H,W],
    the second largest covering depth per pixel (-inf where fewer than two faces).
    """
    res = check_res(res)
    v = np.asarray(torch.as_tensor(verts).detach().cpu(), dtype=np.float64)
    f = np.asarray(torch.as_tensor(faces).cpu(), dtype=np.int64)
    if v.ndim == 2:
        v = v[None]
    B = v.shape[0]
    fidx = -np.ones((B, res, res), np.int64)
    bary = np.zeros((B, res, res, 3))
    zb = np.full((B, res, res), -np.inf)
    z2 = np.full((B, res, res), -np.inf)
    half = 0.5 * res
    for b in range(B):
        col = (v[b, :, 0] + 1.0) * half - 0.5
        row = (1.0 - v[b, :, 1]) * half - 0.5
        for fi, (i0, i1, i2) in enumerate(f):
            t = np.array([[col[i], row[i]] for i in (i0, i1, i2)])
            zt = v[b, [i0, i1, i2], 2]
            if not (np.isfinite(t).all() and np.isfinite(zt).all()):
                continue
            e1, e2 = t[1] - t[0], t[2] - t[0]
            o = np.sign(e1[0] * e2[1] - e1[1] * e2[0])
            if o == 0:
                continue
            lo = np.clip(t.min(0), -1.0, res + 1.0)
            hi = np.clip(t.max(0), -1.0, res + 1.0)
            cs = np.arange(max(int(np.ceil(lo[0])), 0), min(int(np.floor(hi[0])), res - 1) + 1)
            rs = np.arange(max(int(np.ceil(lo[1])), 0), min(int(np.floor(hi[1])), res - 1) + 1)
            if cs.size == 0 or rs.size == 0:
                continue
            pr, pc = np.meshgrid(rs, cs, indexing="ij")
            px, py = pc.astype(np.float64), pr.astype(np.float64)
            w, inside = [], np.ones(px.shape, bool)
            for k in range(3):
                a, c = t[(k + 1) % 3], t[(k + 2) % 3]
                swap = a[0] > c[0] or (a[0] == c[0] and a[1] > c[1])
                A, Bp = (c, a) if swap else (a, c)
                s = -o if swap else o
                dx, dy = (Bp[0] - A[0]) * s, (Bp[1] - A[1]) * s
                wk = dx * (py - A[1]) - dy * (px - A[0])
                own = dy > 0 or (dy == 0 and dx > 0)
                inside &= (wk > 0) | ((wk == 0) & own)
                w.append(wk)
            ws = w[0] + w[1] + w[2]
            inside &= ws > 0
            for r, c in zip(pr[inside], pc[inside]):
                wl = np.array([w[0][r - rs[0], c - cs[0]], w[1][r - rs[0], c - cs[0]],
                               w[2][r - rs[0], c - cs[0]]])
                bc = wl / (wl[0] + wl[1] + wl[2])
                z = bc[0] * zt[0] + bc[1] * zt[1] + bc[2] * zt[2]
                if z > zb[b, r, c]:
                    z2[b, r, c] = zb[b, r, c]
                    zb[b, r, c], fidx[b, r, c], bary[b, r, c] = z, fi, bc
                else:
                    z2[b, r, c] = max(z2[b, r, c], z)
    out = Fragments(face_idx=torch.from_numpy(fidx), bary=torch.from_numpy(bary),
                    zbuf=torch.from_numpy(zb), mask=torch.from_numpy(fidx >= 0))
    return (out, torch.from_numpy(z2)) if return_second else out

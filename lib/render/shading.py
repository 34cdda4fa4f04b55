"""Images from rasterized meshes: normals, vertex colours, textures, shading, depth.

Shape legend: B batch, V vertices, F faces, U texture-coordinate vertices, N points,
H/W image rows/columns (H = W = res), Ht/Wt texture rows/columns, Ch channels.

Every `render_*` function takes verts [V,3] or [B,V,3] and faces [F,3] long, rasterizes
with `rasterizer.rasterize` (or reuses `frags=` from an earlier call on the same mesh
and resolution, e.g. to render the normal and RGB image of one view with one
rasterization) and returns [B, H, W, 3] float images in [0, 1] with an exactly white
(1, 1, 1) background (depth: [B, H, W] with `background` outside the mesh).

Texture convention (OBJ): u runs left to right over the image columns, v runs bottom
to top, so v = 0 is the bottom edge of the LAST row and v = 1 the top edge of row 0.
Texel (row r, col c) has its centre at (u, v) = ((c + .5) / Wt, 1 - (r + .5) / Ht).
Sampling is bilinear between texel centres, clamped to the edge texels outside them
(u, v outside [0, 1] are clamped, not wrapped).
"""
from __future__ import annotations

import torch
import torch.nn.functional as nnf

from lib.render.rasterizer import (
    Fragments,
    _check_mesh,
    interpolate,
    interpolate_face_attr,
    rasterize,
    vertex_attr,
)
from lib.utils.errors import ModuleErrors

__all__ = ["vertex_normals", "sample_texture", "render_normals", "render_vertex_colors",
           "render_texture", "render_shaded", "render_depth", "DEFAULT_LIGHT"]

_err = ModuleErrors(__name__)
DEFAULT_LIGHT = (0.3, 0.4, 1.0)


def _batched(x: torch.Tensor, B: int, name: str) -> torch.Tensor:
    """[V,Ch] or [1|B,V,Ch] -> [B,V,Ch] (checked by lib/render/rasterizer.py vertex_attr)."""
    return vertex_attr(x, B, name).expand(B, -1, -1)


def _frags(verts, faces, res, frags):
    verts, faces = _check_mesh(verts, faces)
    if frags is None:
        frags = rasterize(verts, faces, res)
    elif frags.face_idx.shape[0] != verts.shape[0] or frags.res != res:
        raise _err(f"frags do not match batch {verts.shape[0]} / res {res}")
    return verts, faces, frags


def _on_white(img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """img [B,H,W,3], mask [B,H,W] -> img with exactly 1.0 where mask is False."""
    return torch.where(mask.unsqueeze(-1), img, torch.ones_like(img))


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals (orientation from the face winding).

    verts: [V,3] or [B,V,3]; faces: [F,3] long. Returns [B,V,3] (zero for unused vertices).
    """
    verts, faces = _check_mesh(verts, faces)
    B, V, _ = verts.shape
    v0, v1, v2 = (verts.index_select(1, faces[:, k]) for k in range(3))
    fn = torch.cross(v1 - v0, v2 - v0, dim=-1)                     # [B, F, 3], |fn| = 2 area
    idx = faces.t().reshape(1, -1) + (torch.arange(B, device=faces.device) * V)[:, None]
    n = torch.zeros(B * V, 3, device=verts.device, dtype=verts.dtype)
    n.index_add_(0, idx.reshape(-1), fn.repeat(1, 3, 1).reshape(-1, 3))
    n = n.view(B, V, 3)
    return nnf.normalize(n, dim=-1, eps=1e-12)


def sample_texture(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear texture lookup with the OBJ uv convention (module docstring).

    texture: [Ht, Wt, Ch] float; uv: [..., 2]. Returns [..., Ch] in texture's dtype.
    """
    if texture.dim() != 3:
        raise _err(f"texture must be [Ht, Wt, Ch], got {tuple(texture.shape)}")
    if uv.shape[-1] != 2:
        raise _err(f"uv must be [..., 2], got {tuple(uv.shape)}")
    Ht, Wt, Ch = texture.shape
    shp = uv.shape[:-1]
    uv = uv.reshape(-1, 2).to(texture.dtype)
    x = (uv[:, 0] * Wt - 0.5).clamp(0, Wt - 1)                    # column, texel centres on ints
    y = ((1.0 - uv[:, 1]) * Ht - 0.5).clamp(0, Ht - 1)            # row
    x0 = torch.floor(x).long().clamp(max=max(Wt - 2, 0))
    y0 = torch.floor(y).long().clamp(max=max(Ht - 2, 0))
    fx, fy = (x - x0).unsqueeze(1), (y - y0).unsqueeze(1)
    x1, y1 = (x0 + 1).clamp(max=Wt - 1), (y0 + 1).clamp(max=Ht - 1)
    flat = texture.reshape(-1, Ch)
    t00 = flat.index_select(0, y0 * Wt + x0)
    t01 = flat.index_select(0, y0 * Wt + x1)
    t10 = flat.index_select(0, y1 * Wt + x0)
    t11 = flat.index_select(0, y1 * Wt + x1)
    top = t00 + (t01 - t00) * fx
    bot = t10 + (t11 - t10) * fx
    return (top + (bot - top) * fy).reshape(*shp, Ch)


def _pixel_normals(verts, faces, frags, normals, face_camera):
    """Interpolated, re-normalized normals [B,H,W,3] (zero on background)."""
    B = verts.shape[0]
    normals = vertex_normals(verts, faces) if normals is None else _batched(normals, B, "normals")
    n = nnf.normalize(interpolate(frags, faces, normals), dim=-1, eps=1e-12)
    if face_camera:
        n = torch.where(n[..., 2:3] < 0, -n, n)
    return n


def render_normals(verts, faces, res: int, normals=None, frags: Fragments | None = None,
                   face_camera: bool = False) -> torch.Tensor:
    """Normal image (n + 1) / 2 of world-space, interpolated and re-normalized normals.

    normals: optional per-vertex normals [V,3] or [B,V,3] (default `vertex_normals`).
    face_camera: flip interpolated normals with n_z < 0 toward the camera (off by
    default: the stored normal is the mesh's own).  Returns [B,H,W,3], white background.
    """
    verts, faces, frags = _frags(verts, faces, res, frags)
    n = _pixel_normals(verts, faces, frags, normals, face_camera)
    return _on_white(0.5 * (n + 1.0), frags.mask)


def render_vertex_colors(verts, faces, colors, res: int,
                         frags: Fragments | None = None) -> torch.Tensor:
    """Interpolated per-vertex colours. colors: [V,3] or [B,V,3] in [0,1].

    Returns [B,H,W,3], white background.
    """
    verts, faces, frags = _frags(verts, faces, res, frags)
    c = interpolate(frags, faces, _batched(colors, verts.shape[0], "colors"))
    return _on_white(c, frags.mask)


def render_texture(verts, faces, uvs, face_uvs, texture, res: int,
                   frags: Fragments | None = None) -> torch.Tensor:
    """Textured render with bilinear sampling (OBJ uv convention, module docstring).

    uvs: [U,2]; face_uvs: [F,3] long indices into uvs; texture: [Ht,Wt,3] float in [0,1].
    Returns [B,H,W,3], white background.
    """
    verts, faces, frags = _frags(verts, faces, res, frags)
    if face_uvs.shape != faces.shape:
        raise _err(f"face_uvs {tuple(face_uvs.shape)} must match faces "
                   f"{tuple(faces.shape)}")
    corner_uv = uvs.to(texture.dtype)[face_uvs]                    # [F, 3, 2]
    uv = interpolate_face_attr(frags, corner_uv)                   # [B, H, W, 2]
    m = frags.mask
    out = torch.ones(*m.shape, texture.shape[-1], device=texture.device, dtype=texture.dtype)
    out[m] = sample_texture(texture, uv[m])
    return out


def render_shaded(verts, faces, res: int, colors=None, light_dir=DEFAULT_LIGHT,
                  ambient: float = 0.35, diffuse: float = 0.65, two_sided: bool = True,
                  frags: Fragments | None = None) -> torch.Tensor:
    """Lambertian + ambient shading for pictures: albedo * (ambient + diffuse * n.l).

    colors: optional per-vertex albedo [V,3] or [B,V,3] in [0,1] (default light grey 0.8).
    light_dir: direction toward the light (world space, normalized here).
    two_sided: use |n.l| so faces of either orientation are lit (scans and extracted
    meshes may be inconsistently oriented); else max(n.l, 0).
    Returns [B,H,W,3] clamped to [0,1], white background.
    """
    verts, faces, frags = _frags(verts, faces, res, frags)
    n = _pixel_normals(verts, faces, frags, None, False)
    light = nnf.normalize(torch.as_tensor(light_dir, device=verts.device, dtype=verts.dtype),
                          dim=0)
    ndl = (n * light).sum(-1, keepdim=True)
    ndl = ndl.abs() if two_sided else ndl.clamp(min=0)
    if colors is None:
        albedo = torch.full_like(n, 0.8)
    else:
        albedo = interpolate(frags, faces, _batched(colors, verts.shape[0], "colors"))
    img = (albedo * (ambient + diffuse * ndl)).clamp(0.0, 1.0)
    return _on_white(img, frags.mask)


def render_depth(verts, faces, res: int, background: float = float("-inf"),
                 frags: Fragments | None = None) -> torch.Tensor:
    """Depth image: z of the visible hit (larger = nearer). Returns [B,H,W]."""
    verts, faces, frags = _frags(verts, faces, res, frags)
    return torch.where(frags.mask, frags.zbuf, torch.full_like(frags.zbuf, background))

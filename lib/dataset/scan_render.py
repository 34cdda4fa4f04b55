"""Multi-view normal and colour renders of a textured scan (docs/design.md, Camera and
views), with the project's one renderer (lib/render) and camera.

Shape legend: V vertices, F faces, K views, H/W image rows/columns (res), U uv coordinates,
Ht/Wt texture rows/columns.

View k of K: the scan (in FLAME space, posed by its parameters) is moved by
`FLAMEServer.scan_view_transform(params, k, K)` = T_view[root] @ inverse(T_scan[root]), i.e.
it is turned by the yaw 2*pi*k/K about its root joint, keeping its fitted head rotation (the
view's global rotation is the yaw composed with the fitted one, as the original's views;
`VIEWS` names this convention in the provenance records);
the orthographic camera looks from +z.
Normal images store (n + 1) / 2 of the rotated (world = view) unit normals. Colour images
store a colour c in [0, 1] as it is, unlit (8-bit v = 255 c, read back as v / 127.5 - 1 =
c * 2 - 1: the scale of the surface samples' colours, `colour_targets` in
lib/dataset/scan_sampling.py), from `colour_source`:
  'vertices' (default, the original's): the per-vertex colours (scan_sampling.vertex_colors)
      interpolated over each triangle. The original renders its vertex-coloured mesh with
      pytorch3d's HardPhongShader under a light with ambient 1, diffuse 0 and specular 0,
      i.e. unlit vertex colours, as here;
  'texture': the texture sampled bilinearly at each pixel's interpolated uv.
The background is white. Files: `multi_view_<res>/{k:04d}_normal.png` and `{k:04d}_rgb.png`,
8-bit RGB (the original writes RGBA with alpha 0 off the mesh; lib/dataset/processed_layout.py
reads both).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lib.dataset.scan_sampling import COLOUR_SOURCES, texture_float, vertex_colors
from lib.render.images import save_png, to_uint8
from lib.render.rasterizer import rasterize
from lib.render.shading import render_normals, render_texture, render_vertex_colors

__all__ = ["view_dir", "view_paths", "views_valid", "view_transforms", "render_views",
           "save_views", "VIEWS"]

# The view convention of the renders (module docstring), recorded in each scan's provenance:
# renders made with another one (e.g. a bare yaw, replacing the fitted head rotation) are redone.
VIEWS = "yaw_after_fit"


def view_dir(out_dir, res: int) -> Path:
    """The renders' folder of a scan: `<out_dir>/multi_view_<res>`."""
    return Path(out_dir) / f"multi_view_{int(res)}"


def view_paths(out_dir, n_views: int, res: int) -> list[tuple[Path, Path]]:
    """[(normal png, rgb png)] for k = 0..n_views-1."""
    d = view_dir(out_dir, res)
    return [(d / f"{k:04d}_normal.png", d / f"{k:04d}_rgb.png") for k in range(n_views)]


def views_valid(out_dir, n_views: int, res: int, deep: bool = True) -> bool:
    """All 2 * n_views PNGs exist, are res x res RGB (deep: and decode completely)."""
    from PIL import Image

    for pair in view_paths(out_dir, n_views, res):
        for p in pair:
            try:
                with Image.open(p) as im:
                    if im.format != "PNG" or im.size != (res, res) or im.mode != "RGB":
                        return False
                    if deep:
                        im.load()
            except Exception:  # noqa: BLE001 - missing or broken: not valid
                return False
    return True


def view_transforms(params, flame_server, n_views: int) -> torch.Tensor:
    """params: (169,) scan FLAME parameters -> [K, 4, 4] rigid transforms of the K views
    (float32 on the server's device)."""
    ref = flame_server.flame.v_template
    p = torch.as_tensor(np.asarray(params), dtype=ref.dtype, device=ref.device)
    p = p.reshape(1, -1).expand(n_views, -1)
    k = torch.arange(n_views, device=ref.device)
    with torch.no_grad():
        return flame_server.scan_view_transform(p, k, n_views)


def view_vertices(verts: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """verts [V, 3] moved by each view's rigid transform T [K, 4, 4] -> [K, V, 3]."""
    return verts @ T[:, :3, :3].transpose(1, 2) + T[:, None, :3, 3]


@torch.no_grad()
def render_views(mesh, params, flame_server, n_views: int = 9, res: int = 256, device=None,
                 colour_source: str = "vertices", vertex_colours=None):
    """Render the K views of a textured scan already in FLAME space.

    mesh: TexturedMesh (verts [V,3], faces [F,3], uvs [U,2], face_uvs [F,3],
    texture [Ht,Wt,3] uint8 or float in [0,1]); params: (169,); colour_source: one of
    COLOUR_SOURCES (module docstring); vertex_colours: optional [V,3] in [0,1] (computed
    from the texture when None) -> (normal [K,H,W,3] uint8, rgb [K,H,W,3] uint8).
    """
    if colour_source not in COLOUR_SOURCES:
        raise ValueError(f"colour_source must be one of {list(COLOUR_SOURCES)}, got "
                         f"{colour_source!r}")
    T = view_transforms(params, flame_server, n_views)
    dev = T.device if device is None else torch.device(device)
    T = T.to(dev, torch.float32)
    v = torch.as_tensor(mesh.verts, dtype=torch.float32, device=dev)
    faces = torch.as_tensor(mesh.faces, dtype=torch.long, device=dev)
    vk = view_vertices(v, T)                                          # [K, V, 3]
    frags = rasterize(vk, faces, res)
    normal = render_normals(vk, faces, res, frags=frags)              # [K, H, W, 3] in [0,1]
    if colour_source == "vertices":
        if vertex_colours is None:
            vertex_colours = vertex_colors(len(mesh.verts), mesh.faces, mesh.uvs,
                                           mesh.face_uvs, mesh.texture)
        vc = torch.as_tensor(np.asarray(vertex_colours), dtype=torch.float32, device=dev)
        rgb = render_vertex_colors(vk, faces, vc, res, frags=frags)   # [K, H, W, 3] in [0,1]
    else:
        uv = torch.as_tensor(mesh.uvs, dtype=torch.float32, device=dev)
        fuv = torch.as_tensor(mesh.face_uvs, dtype=torch.long, device=dev)
        tex = texture_float(mesh.texture).to(dev)
        rgb = render_texture(vk, faces, uv, fuv, tex, res, frags=frags)
    return (np.stack([to_uint8(x) for x in normal]), np.stack([to_uint8(x) for x in rgb]))


def save_views(out_dir, normal, rgb) -> None:
    """normal, rgb: [K, H, W, 3] uint8 -> the K pairs of PNGs, each written atomically."""
    res = normal.shape[1]
    for k, (pn, pr) in enumerate(view_paths(out_dir, normal.shape[0], res)):
        save_png(pn, normal[k])  # atomic (temporary name, then os.replace)
        save_png(pr, rgb[k])

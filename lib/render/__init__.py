"""The project's one renderer: orthographic camera from +z onto [-1,1]^2 (camera.py),
exact vectorized rasterizer (rasterizer.py), normal/colour/texture/shaded images
(shading.py) and image/video saving helpers (images.py)."""
from lib.render.camera import pixel_centers, pixel_to_ndc, project
from lib.render.images import add_label, make_grid, save_png, save_video, to_float, to_uint8
from lib.render.rasterizer import Fragments, interpolate, interpolate_face_attr, rasterize
from lib.render.shading import (
                                render_depth,
                                render_normals,
                                render_shaded,
                                render_texture,
                                render_vertex_colors,
                                sample_texture,
                                vertex_normals,
)

__all__ = [
    "pixel_centers", "pixel_to_ndc", "project",
    "Fragments", "rasterize", "interpolate", "interpolate_face_attr",
    "vertex_normals", "sample_texture", "render_normals", "render_vertex_colors",
    "render_texture", "render_shaded", "render_depth",
    "to_uint8", "to_float", "save_png", "make_grid", "add_label", "save_video",
]

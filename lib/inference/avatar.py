"""An avatar of a trained GANHead: its canonical mesh, extracted once, and everything needed to
pose and render it explicitly (docs/design.md, Inference: extract once, deform per
frame).

Shape legend: B frames (batch), V mesh vertices, F faces, J joints, Z/D/C widths of z_shape,
z_detail and z_color, S FLAME shape components (100), X expression components (50),
P parameter-vector length (169), H/W image rows/columns (H = W = res).

An `Avatar` holds the latent codes (z_shape [1, Z], z_detail [1, D], z_color [1, C]) and the
FLAME shape (betas [1, S]). Lazily, and only once each:
- `mesh`: the canonical mesh (jaw open 0.2, expression 0) of the occupancy network;
- `fields`: the learned skinning weights and blendshape bases at its vertices;
- `surface`: per-vertex canonical normals of the normal network (z_detail) and colours of the
  texture network (z_color, neutral pose/expression condition) at the vertices.
The geometry (`mesh`, `fields`) depends only on z_shape and betas: `with_codes` makes an
avatar with other detail/colour codes that shares it, so changing z_color cannot move a vertex.
Posing a frame is one explicit LBS pass (`lib/model/explicit.py`) plus skinning the normals with
the inverse-transpose of the blended target bone transforms (lib/model/query.skin_normals);
images come from the project's one rasterizer. A stage-1 checkpoint has untrained
normal/texture networks: then the normals are the mesh's own and the RGB image is shaded grey
(`has_color` False).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lib.inference.loading import InferenceError, is_stage2
from lib.model.explicit import deform_mesh, mesh_fields
from lib.model.query import blend_transforms, query_fine, skin_normals
from lib.model.validation import extract_canonical_mesh
from lib.render.rasterizer import rasterize
from lib.render.shading import render_normals, render_shaded, render_vertex_colors, vertex_normals
from lib.utils.extraction import EmptyMeshError

__all__ = ["Avatar", "make_params", "yaw_pose", "side_by_side"]


def make_params(betas: torch.Tensor, pose: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """Parameter vectors [B, P] (scale 1, translation 0) from betas [1 or B, S], pose [B, 15]
    and exp [B, X]."""
    B = pose.shape[0]
    head = pose.new_zeros(B, 4)
    head[:, 0] = 1.0
    return torch.cat([head, pose, betas.to(pose).expand(B, -1), exp.to(pose)], dim=-1)


def yaw_pose(angles, like: torch.Tensor) -> torch.Tensor:
    """Poses [B, 15] that only turn the head about the vertical axis by `angles` (radians,
    sequence of B floats or a tensor [B]); like: a tensor giving device and dtype."""
    a = torch.as_tensor(angles, dtype=like.dtype, device=like.device).reshape(-1)
    pose = like.new_zeros(a.shape[0], 15)
    pose[:, 1] = a
    return pose


def side_by_side(*images: torch.Tensor) -> np.ndarray:
    """Images [H, W, 3] (torch or numpy, [0, 1]) -> one float32 numpy image [H, W * n, 3]."""
    return np.concatenate([i.detach().cpu().numpy() if torch.is_tensor(i) else np.asarray(i)
                           for i in images], axis=1).astype(np.float32)


class Avatar:
    """One head of a trained GANHead (module docstring).

    model: a GANHead in eval mode; z_shape [1, Z], z_detail [1, D], z_color [1, C],
    betas [1, S]; mesh_res: final marching-cubes resolution (cells per axis) of the canonical
    mesh, mesh_res_init its first level (the ratio must be a power of 2); chunk: points per
    network call.
    """

    def __init__(self, model, z_shape: torch.Tensor, z_detail: torch.Tensor,
                 z_color: torch.Tensor, betas: torch.Tensor, mesh_res: int = 128,
                 mesh_res_init: int = 16, chunk: int = 20000):
        ref = model.bbox_min
        self.model = model
        self.z_shape = z_shape.detach().to(ref).reshape(1, -1)
        self.z_detail = z_detail.detach().to(ref).reshape(1, -1)
        self.z_color = z_color.detach().to(ref).reshape(1, -1)
        self.betas = betas.detach().to(ref).reshape(1, -1)
        self.mesh_res, self.mesh_res_init = int(mesh_res), int(mesh_res_init)
        self.chunk = int(chunk)
        self._mesh = self._fields = self._surface = None

    @classmethod
    def from_codes(cls, model, codes: dict, **kwargs) -> Avatar:
        """codes: dict with z_shape, z_detail, z_color, betas (each [1, ...])."""
        return cls(model, codes["z_shape"], codes["z_detail"], codes["z_color"], codes["betas"],
                   **kwargs)

    @property
    def has_color(self) -> bool:
        """True when the normal/texture networks are trained (stage-2 checkpoint)."""
        return is_stage2(self.model)

    def with_codes(self, z_detail: torch.Tensor | None = None,
                   z_color: torch.Tensor | None = None) -> Avatar:
        """A copy with other detail/colour codes that shares this avatar's mesh and fields."""
        other = Avatar(self.model, self.z_shape, self.z_detail if z_detail is None else z_detail,
                       self.z_color if z_color is None else z_color, self.betas, self.mesh_res,
                       self.mesh_res_init, self.chunk)
        other._mesh, other._fields = self._mesh, self._fields
        return other

    # ------------------------------------------------------------------ canonical
    @property
    def mesh(self):
        """Canonical mesh (lib.utils.extraction.ExtractedMesh: verts [V, 3], faces [F, 3])."""
        if self._mesh is None:
            try:
                self._mesh = extract_canonical_mesh(self.model, self.z_shape, self.betas,
                                                    res_init=self.mesh_res_init,
                                                    res_final=self.mesh_res)
            except EmptyMeshError as err:
                raise InferenceError(f"this avatar's occupancy has no surface in the box "
                                     f"(z_shape far from the learned codes? lower "
                                     f"test.std_scale): {err}") from err
        return self._mesh

    @property
    def verts_c(self) -> torch.Tensor:
        return self.mesh.verts

    @property
    def faces(self) -> torch.Tensor:
        return self.mesh.faces

    @property
    def fields(self):
        """Learned fields at the vertices: (w [V, J], pose_dirs [V, 36, 3], expr_dirs [V, 3, X])."""
        if self._fields is None:
            self._fields = mesh_fields(self.verts_c, self.model.deformer.lbs_net, self.betas)
        return self._fields

    @torch.no_grad()
    def surface(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Canonical unit normals [V, 3] and colours [V, 3] in [0, 1] (None without stage 2),
        from the normal and texture networks at the canonical vertices."""
        if self._surface is None:
            verts = self.verts_c
            if not self.has_color:
                self._surface = (vertex_normals(verts, self.faces)[0], None)
            else:
                model, n_pe = self.model, 15 + self.model.flame_server.n_exp
                volume = model.generator(self.z_shape)
                pose_exp = verts.new_zeros(1, n_pe)
                normals, colors = [], []
                for s in range(0, verts.shape[0], self.chunk):
                    n, c = query_fine(model, verts[None, s:s + self.chunk], self.z_shape,
                                      self.betas, self.z_detail, self.z_color, pose_exp, volume)
                    normals.append(n[0])
                    colors.append(((c[0] + 1.0) * 0.5).clamp(0.0, 1.0))
                self._surface = (torch.cat(normals), torch.cat(colors))
        return self._surface

    # ------------------------------------------------------------------ posing
    def params(self, pose: torch.Tensor, exp: torch.Tensor | None = None) -> torch.Tensor:
        """Parameter vectors [B, P] of this avatar's shape for poses [B, 15] and expressions
        [B, X] (zeros when None)."""
        pose = pose.to(self.betas)
        if exp is None:
            exp = pose.new_zeros(pose.shape[0], self.model.flame_server.n_exp)
        return make_params(self.betas, pose, exp)

    @torch.no_grad()
    def pose(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Deform the canonical mesh to every frame. params: [B, P] (the avatar's betas are
        used whatever shape they hold). Returns verts [B, V, 3] and unit normals [B, V, 3]
        (network normals skinned by the blended bone transforms; the mesh's own without
        stage 2)."""
        params = params.to(self.betas).clone()
        server = self.model.flame_server
        shape_slice = slice(params.shape[-1] - server.n_exp - server.n_shape,
                            params.shape[-1] - server.n_exp)
        params[:, shape_slice] = self.betas
        flame_out = server(params)
        verts = deform_mesh(self.verts_c, self.fields, flame_out)
        if not self.has_color:
            return verts, vertex_normals(verts, self.faces)
        normals_c = self.surface()[0]
        B = verts.shape[0]
        blend = blend_transforms(self.fields[0][None].expand(B, -1, -1), flame_out.tfs)
        return verts, skin_normals(blend, normals_c[None].expand(B, -1, -1))

    # ------------------------------------------------------------------ pictures
    @torch.no_grad()
    def render(self, verts: torch.Tensor, normals: torch.Tensor, res: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """verts, normals: [B, V, 3] (from `pose`). Returns rgb and normal images
        [B, H, W, 3] in [0, 1], white background: the texture network's colours (shaded grey
        geometry without stage 2) and (n + 1) / 2 of the normals, from one rasterization."""
        frags = rasterize(verts, self.faces, res)
        colors = self.surface()[1]
        if colors is None:
            rgb = render_shaded(verts, self.faces, res, frags=frags)
        else:
            rgb = render_vertex_colors(verts, self.faces, colors, res, frags=frags)
        return rgb, render_normals(verts, self.faces, res, normals=normals, frags=frags)

    def render_params(self, params: torch.Tensor, res: int, batch: int = 8
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Pose and render every frame of params [B, P], `batch` frames at a time.
        Returns rgb and normal images as float32 numpy arrays [B, H, W, 3]."""
        rgbs, nrms = [], []
        for s in range(0, params.shape[0], batch):
            rgb, nrm = self.render(*self.pose(params[s:s + batch]), res)
            rgbs.append(rgb.cpu().numpy())
            nrms.append(nrm.cpu().numpy())
        return np.concatenate(rgbs).astype(np.float32), np.concatenate(nrms).astype(np.float32)

    def save_mesh(self, path, verts: torch.Tensor, normals: torch.Tensor) -> Path:
        """Write one mesh (verts [V, 3], normals [V, 3], the avatar's faces and colours) as
        a binary PLY atomically. Returns the path."""
        colors = self.surface()[1]
        from lib.utils.mesh_io import save_ply

        save_ply(path, verts.detach().cpu().numpy(), self.faces.cpu().numpy(),
                 colors=None if colors is None else colors.cpu().numpy(),
                 normals=normals.detach().cpu().numpy())
        return Path(path)

    def save_canonical(self, path) -> Path:
        """The canonical mesh with network normals and colours (PLY)."""
        return self.save_mesh(path, self.verts_c, self.surface()[0])

"""Stage-2 images rendered from the precompute cache: each pixel's shape-neutral canonical
point (from precompute.py, or the original's `cache_img_dvr_pyrender` files) is queried by
the normal and texture networks, its normal skinned to the view, and the results scattered
back into images. Stage-2 training (lib/model/fine_stage.py) and the reconstruction scores of
inference (lib/inference/reconstruction.py) render with `render_cache`, so what is scored is
what was trained.

Shape legend: B batch, R image size, L most cached pixels of an item, M extra canonical
points, J joints, P the FLAME parameter vector (169).
"""
from __future__ import annotations

import torch

from lib.flame.frames import FlameFrames
from lib.model.query import blend_transforms, pose_exp_condition, query_fine, skin_normals

__all__ = ["pack_points", "scatter_image", "render_cache", "masked_psnr"]


def pack_points(points: torch.Tensor, mask: torch.Tensor):
    """Pack the masked points of each item to the front.

    points: [B, N, 3]; mask: [B, N] bool. Returns packed [B, L, 3] (L = max(1, most masked
    points of an item); padding rows are 0) and index (b [A], p [A], pos [A]) with
    packed[b, pos] = points[b, p] for the A masked entries.
    """
    B = points.shape[0]
    b, p = mask.nonzero(as_tuple=True)
    pos = (mask.long().cumsum(dim=1) - 1)[b, p]
    L = max(1, int(mask.sum(dim=1).max())) if mask.numel() else 1
    packed = points.new_zeros(B, L, 3).index_put((b, pos), points[b, p])
    return packed, (b, p, pos)


def scatter_image(values: torch.Tensor, index, res: int, background: float = 1.0
                  ) -> torch.Tensor:
    """Packed per-pixel values [B, L, 3] -> image [B, 3, res, res] (background elsewhere).

    index: (b, p, pos) from pack_points of a [B, res * res] mask (p = row * res + col)."""
    b, p, pos = index
    B = values.shape[0]
    img = values.new_full((B, res * res, 3), background).index_put((b, p), values[b, pos])
    return img.reshape(B, res, res, 3).permute(0, 3, 1, 2)


def render_cache(model, cache_pts: torch.Tensor, cache_mask: torch.Tensor, flame_out: FlameFrames,
                 flame_view: FlameFrames, codes: dict, volume: torch.Tensor | None = None,
                 extra: torch.Tensor | None = None) -> dict:
    """Normal and colour images of cached canonical points.

    cache_pts: [B, R, R, 3] shape-neutral canonical point per pixel (the cache's content, as
    the original's); cache_mask: [B, R, R] bool (pixels to render); flame_out: the FLAME server's
    outputs of the scan's own parameters (shape, texture condition); flame_view: of the view's
    parameters (normals are skinned with its target transforms); codes: z_shape [B, Z] (no
    gradient), z_detail, z_color; volume: the generator's volume for z_shape (computed when
    None); extra: [B, M, 3] SHAPED canonical points (stage 2's surface samples, from the
    deformer's search) queried in the same network pass after their move to the neutral space.
    Returns {"normal", "rgb": [B, 3, R, R], white outside the mask; with extra also
    "extra_normal_c", "extra_rgb": [B, M, 3] canonical normal and colour, "extra_w": [B, M, J]
    skinning weights (no gradient)}. Normals and colours keep their gradients to z_detail,
    z_color and the normal / texture networks.
    """
    B, R = cache_pts.shape[0], cache_pts.shape[1]
    z_shape = codes["z_shape"]
    packed, index = pack_points(cache_pts.reshape(B, R * R, 3).to(z_shape.dtype),
                                cache_mask.reshape(B, R * R))
    L = packed.shape[1]
    if extra is None:
        pts = packed
    else:
        with torch.no_grad():
            extra = extra.to(packed.dtype)
            pts = torch.cat([packed, extra + model.disp_net(extra, flame_out.shape)], dim=1)
    if volume is None:
        with torch.no_grad():
            volume = model.generator(z_shape)
    normal_c, rgb = query_fine(model, pts, z_shape, flame_out.shape, codes["z_detail"],
                               codes["z_color"], pose_exp_condition(flame_out), volume,
                               neutral=True)
    with torch.no_grad():
        w = model.deformer.lbs_net.lbs(pts)[0]  # [B, L + M, J]: neutral points, no warp
        rot_view = blend_transforms(w[:, :L], flame_view.tfs)
    out = {"normal": scatter_image(skin_normals(rot_view, normal_c[:, :L]), index, R),
           "rgb": scatter_image(rgb[:, :L], index, R)}
    if extra is not None:
        out.update(extra_normal_c=normal_c[:, L:], extra_rgb=rgb[:, L:], extra_w=w[:, L:])
    return out


def masked_psnr(fake: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """fake, real: [B, 3, R, R] in [-1, 1]; mask: [B, R, R] or [B, 1, R, R] bool. Returns [B]:
    PSNR in dB of the [0, 1] images over each item's mask (mean square error of all its
    masked pixels and channels)."""
    m = mask.reshape(mask.shape[0], 1, *fake.shape[-2:]).to(fake.dtype)
    err = (((fake - real) * 0.5) ** 2 * m).sum(dim=(1, 2, 3))
    mse = err / (m.sum(dim=(1, 2, 3)) * fake.shape[1]).clamp_min(1.0)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))

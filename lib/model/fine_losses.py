"""Stage-2 reconstruction losses (docs/design.md, Stage-2 losses): the original's photo loss
of rendered vs preprocessed images, the 3D normal and colour losses at surface samples, and the
opt-in pixel subsampling (`photo_pixels`) that keeps the photo loss unbiased.

Shape legend: B batch, R image rows = columns, H/W = R, M surface samples per item.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def photo_loss(fake: torch.Tensor, real: torch.Tensor,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """The original's 2D loss: squared error of every entry where the real image is not white
    (real != 1, channel by channel), averaged over all B * 3 * H * W entries of the image.

    fake, real: [B, 3, H, W] in [-1, 1] (fake is white, 1, where nothing was rendered: there the
    error of a foreground real pixel is a constant); weight: optional [B, H, W] factor per
    pixel (photo_pixels: 0 off the sampled pixels, n_pool / n_sampled on them)."""
    err = (fake - real) ** 2 * (real != 1.0).to(fake.dtype)
    if weight is not None:
        err = err * weight[:, None].to(err.dtype)
    return err.sum() / err.numel()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values: [B, M]; mask: [B, M] bool -> mean over the masked entries (0 when none)."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def surface_color_loss(rgb: torch.Tensor, rgb_gt: torch.Tensor, valid: torch.Tensor
                       ) -> torch.Tensor:
    """The original's 3D colour loss: squared error summed over the 3 channels, averaged over
    the surface samples (here those with a valid correspondence). rgb, rgb_gt: [B, M, 3];
    valid: [B, M] bool. Returns a scalar."""
    return masked_mean(((rgb - rgb_gt) ** 2).sum(dim=-1), valid)


def surface_normal_loss(normal: torch.Tensor, normal_gt: torch.Tensor, valid: torch.Tensor
                        ) -> torch.Tensor:
    """The original's 3D normal loss: mean of 1 - cos(n, n_gt) over the surface samples (here
    those with a valid correspondence). normal: [B, M, 3] unit; normal_gt: [B, M, 3];
    valid: [B, M] bool. Returns a scalar."""
    cos = (normal * F.normalize(normal_gt, dim=-1, eps=1e-6)).sum(-1)
    return masked_mean(1.0 - cos, valid)


def subsample_mask(mask: torch.Tensor, k: int) -> torch.Tensor:
    """mask: [B, R, R] bool -> [B, R, R] bool keeping k of each item's True pixels, drawn
    uniformly without replacement (all of them where there are at most k)."""
    B = mask.shape[0]
    flat = mask.reshape(B, -1)
    if k >= flat.shape[1]:
        return mask
    score = torch.rand(flat.shape, device=mask.device).masked_fill(~flat, -1.0)
    kth = score.topk(k, dim=1).values[:, -1:]                                     # [B, 1]
    return (flat & (score >= kth)).reshape(mask.shape)


def subsample_pixels(pool: torch.Tensor, k: int, dtype: torch.dtype = torch.float32
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The opt-in photo_pixels: k random pixels of each item's pool and the photo-loss weights
    that make the loss over them an unbiased estimate of the loss over the whole pool.

    pool: [B, R, R] bool (cache mask AND photo mask). Returns (kept [B, R, R] bool,
    weight [B, R, R] of dtype: n_pool / n_kept on the kept pixels, 0 elsewhere)."""
    B = pool.shape[0]
    kept = subsample_mask(pool, int(k))
    n_pool = pool.reshape(B, -1).sum(1).to(dtype)
    n_kept = kept.reshape(B, -1).sum(1).clamp_min(1).to(dtype)
    return kept, kept.to(dtype) * (n_pool / n_kept)[:, None, None]

"""Saving rendered images: uint8 conversion, PNG, grids, captions, videos.

Shape legend: H/W image rows/columns, Ch channels; images are [H, W, 3] (or [H, W] /
[H, W, 1] grey, or [H, W, 4] RGBA) floats in [0, 1] (numpy or torch, any device) or uint8
arrays.

All files are written atomically (temporary name in the same folder, then os.replace).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from lib.utils.atomic import atomic_path
from lib.utils.errors import ModuleErrors

__all__ = ["to_uint8", "to_float", "save_png", "make_grid", "add_label", "save_video"]

_err = ModuleErrors(__name__)


def _to_numpy(img) -> np.ndarray:
    if hasattr(img, "detach"):                                     # torch tensor
        img = img.detach().cpu().numpy()
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise _err(f"expected an image [H,W,3|1|4] or [H,W], "
                   f"got {img.shape}")
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return img


def to_uint8(img) -> np.ndarray:
    """img: [H,W,3] float in [0,1] (clipped; NaN -> 0) or uint8. Returns uint8 [H,W,Ch]."""
    img = _to_numpy(img)
    if img.dtype == np.uint8:
        return img
    img = np.nan_to_num(img.astype(np.float64), nan=0.0)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def to_float(img) -> np.ndarray:
    """img: uint8 or float image. Returns float32 [H,W,Ch] in [0,1]."""
    img = _to_numpy(img)
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    return img.astype(np.float32)


def save_png(path, img) -> Path:
    """Write img ([H,W,3] float 0..1 or uint8) as PNG atomically. Returns the path."""
    from PIL import Image

    data = to_uint8(img)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(data).save(tmp, format="PNG")
    return path


def make_grid(images, ncols: int | None = None, pad: int = 2, pad_value: float = 1.0):
    """Tile images (same size) row-major into one float32 image [H', W', 3].

    images: list of [H,W,3] images; ncols: columns (default all in one row);
    pad: pixels between and around tiles filled with pad_value.
    """
    imgs = [to_float(i) for i in images]
    if not imgs:
        raise _err("make_grid needs at least one image")
    H, W, Ch = imgs[0].shape
    if any(i.shape != (H, W, Ch) for i in imgs):
        raise _err(f"make_grid images differ in size: "
                   f"{sorted({i.shape for i in imgs})}")
    ncols = len(imgs) if ncols is None else max(1, min(int(ncols), len(imgs)))
    nrows = (len(imgs) + ncols - 1) // ncols
    grid = np.full((pad + nrows * (H + pad), pad + ncols * (W + pad), Ch), pad_value,
                   np.float32)
    for k, im in enumerate(imgs):
        r, c = divmod(k, ncols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[y:y + H, x:x + W] = im
    return grid


def add_label(img, text: str, color=(0, 0, 0), box=(255, 255, 255)) -> np.ndarray:
    """Draw a small caption at the top-left on a light box. Returns float32 [H,W,3]."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(to_uint8(img)[..., :3])
    draw = ImageDraw.Draw(pil)
    left, top, right, bottom = draw.textbbox((3, 2), str(text))
    draw.rectangle((0, 0, right + 3, bottom + 2), fill=tuple(box))
    draw.text((3, 2), str(text), fill=tuple(color))
    return np.asarray(pil).astype(np.float32) / 255.0


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad a uint8 frame with white to even height/width (needed by yuv420p)."""
    H, W = frame.shape[:2]
    return np.pad(frame, ((0, H % 2), (0, W % 2), (0, 0)), constant_values=255)


def save_video(path, frames, fps: int = 25) -> Path:
    """Write frames ([H,W,3] float 0..1 or uint8, same size) as mp4 (libx264).

    Falls back to a GIF next to `path` (suffix .gif) with a warning when ffmpeg is not
    available. Returns the path actually written.
    """
    import imageio.v2 as imageio

    frames = [_even(to_uint8(f)[..., :3]) for f in frames]
    if not frames:
        raise _err("save_video needs at least one frame")
    path = Path(path)
    try:
        import imageio_ffmpeg  # noqa: F401

        imageio_ffmpeg.get_ffmpeg_exe()
        use_mp4 = path.suffix.lower() != ".gif"
    except Exception as err:                                       # no ffmpeg: GIF
        warnings.warn(f"{_err.where}: ffmpeg unavailable ({err}); writing a GIF instead")
        use_mp4 = False
    if not use_mp4:
        path = path.with_suffix(".gif")
    with atomic_path(path) as tmp:
        if use_mp4:
            writer = imageio.get_writer(str(tmp), format="FFMPEG", mode="I", fps=fps,
                                        codec="libx264", pixelformat="yuv420p",
                                        macro_block_size=1, quality=8)
        else:
            writer = imageio.get_writer(str(tmp), format="GIF", mode="I",
                                        duration=1000.0 / fps, loop=0)
        with writer:
            for f in frames:
                writer.append_data(f)
    return path

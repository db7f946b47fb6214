"""Decode arbitrary image bytes into uint8 arrays of one resolution and channel count.

Every way an input can be bad ends in `SkipImage(reason)`, never a crash: the prepare stage records the
reason and goes on. Decompression bombs are refused from the header, before any pixel is decoded.
"""
from __future__ import annotations

import io
import warnings
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ResizeMode = Literal["pad", "resize", "center_crop"]


class SkipImage(Exception):
    """This input cannot be used; the message is the reason written to the skip report."""


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Open and fully decode image bytes; refuse empty, non-image, truncated and over-large inputs."""
    if not data:
        raise SkipImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            # Header says how big the decoded image would be: check before decoding anything.
            if w * h > max_pixels:
                raise SkipImage(f"too many pixels ({w}x{h} > max_pixels={max_pixels}; decompression bomb guard)")
            im.load()
    except SkipImage:
        raise
    except UnidentifiedImageError:
        raise SkipImage("not a readable image (unknown format)") from None
    except Image.DecompressionBombError as exc:
        raise SkipImage(f"decompression bomb refused ({exc})") from None
    except Image.DecompressionBombWarning as exc:
        raise SkipImage(f"decompression bomb refused ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise SkipImage(f"corrupt or truncated image ({exc})") from None
    return im


GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def is_colour(im: Image.Image) -> bool:
    """Whether any pixel's red, green and blue differ: an RGB image whose channels are all equal is grey, so
    making it grey loses nothing (one rule for `prepare`'s report and `pipeline tokenize`'s refusal)."""
    if im.mode in GREY_MODES:
        return False
    try:
        rgb = np.asarray(im.convert("RGB"))
    except (ValueError, OSError):  # a mode Pillow cannot convert: conform skips such an image anyway
        return False
    return bool((rgb != rgb[..., :1]).any())


def to_mode(im: Image.Image, channels: int, background: int) -> tuple[Image.Image, str | None]:
    """Convert any PIL mode to 'L' or 'RGB'. Returns the image and a note when a conversion changed data."""
    note = None
    # An animated GIF/PNG/WebP or a multi-page TIFF is decoded at its first frame; say so (read before
    # exif_transpose, whose copy no longer knows the frame count).
    frames = getattr(im, "n_frames", 1)
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # broken EXIF is not worth losing the image over
        pass
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        im, note = _int_grey_to_8_bit(np.asarray(im, dtype=np.int64), mode)
    elif mode == "F":
        im, note = _float_grey_to_8_bit(np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0))
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        note = note or "converted palette image"
    if im.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (background, background, background, 255))
        im = Image.alpha_composite(base, rgba).convert("RGB")
        note = note or f"composited {mode} alpha on background {background}"
    if im.mode not in ("L", "RGB"):
        note = note or f"converted {im.mode}"
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, 1-bit
    target = "L" if channels == 1 else "RGB"
    if im.mode != target:
        im = im.convert(target)
    if isinstance(frames, int) and frames > 1:  # the frames left out matter more than how the first was converted
        note = f"first frame of a multi-frame image ({frames} frames; the others are not used)"
    return im, note


def _int_grey_to_8_bit(arr: np.ndarray, mode: str) -> tuple[Image.Image, str]:
    """16-bit grey keeps its top 8 bits. Mode I is a 32-bit container: 16-bit PGMs open as I (scaled to 0..65535),
    but a 32-bit TIFF written from 8-bit data holds 0..255, which the 16-bit reading would turn black."""
    note = f"converted {mode} to 8-bit"
    top = int(arr.max()) if arr.size else 0
    if mode == "I" and arr.size and arr.min() >= 0 and 0 < top <= 255:
        return Image.fromarray(arr.astype(np.uint8), "L"), "converted I with values in 0..255 (read as 8-bit)"
    if arr.size and (arr.min() < 0 or top > 65535):
        note += f", values outside 0..65535 clipped ({int(arr.min())}..{top})"
    elif 0 < top < 4096:  # 12 bits or fewer in a 16-bit file: read faithfully, but dark; the report says so
        note += f", dark: every value under 4096 of 65535 (max {top})"
    return Image.fromarray(np.clip((arr + 128) // 257, 0, 255).astype(np.uint8), "L"), note


def _float_grey_to_8_bit(arr: np.ndarray) -> tuple[Image.Image, str]:
    """0..255 unless every value lies in 0..1 (scaled by 255) or in -1..1 (the [-1, 1] convention of many
    pipelines, mapped to 0..255); either of those read as 0..255 would be a black image."""
    note = "converted float image"
    if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        arr, note = arr * 255.0, "converted float image in 0..1 (scaled to 0..255)"
    elif arr.size and arr.min() >= -1.0 and arr.max() <= 1.0:
        arr, note = (arr + 1.0) * 127.5, "converted float image in -1..1 (mapped to 0..255)"
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L"), note


def fit(im: Image.Image, resolution: int, mode: ResizeMode, background: int) -> Image.Image:
    """Bring an image to resolution x resolution."""
    w, h = im.size
    if mode == "resize":
        return im.resize((resolution, resolution), Image.Resampling.BICUBIC) if (w, h) != (resolution,) * 2 else im
    if mode == "center_crop":
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        return im.crop((left, top, left + resolution, top + resolution))
    # pad: keep the aspect ratio; shrink only when the image is larger than the target.
    if max(w, h) > resolution:
        scale = resolution / max(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
        w, h = im.size
    if (w, h) == (resolution, resolution):
        return im
    fill = background if im.mode == "L" else (background,) * 3
    canvas = Image.new(im.mode, (resolution, resolution), fill)
    canvas.paste(im, ((resolution - w) // 2, (resolution - h) // 2))
    return canvas


def conform(im: Image.Image, *, resolution: int, channels: int, resize: ResizeMode, background: int,
            min_side: int) -> tuple[np.ndarray, str | None]:
    """Decoded image -> uint8 array (H, W, C). Raises SkipImage with the reason when unusable."""
    if min(im.size) < min_side:
        raise SkipImage(f"too small ({im.size[0]}x{im.size[1]} < min_side={min_side})")
    try:
        im, note = to_mode(im, channels, background)
    except (ValueError, OSError) as exc:  # a mode Pillow cannot convert (premultiplied "La" has no conversions)
        raise SkipImage(f"cannot convert image mode {im.mode} ({exc})") from None
    im = fit(im, resolution, resize, background)
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr, note


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 (H, W, C) -> PNG bytes, deterministic (fixed compression level, no metadata)."""
    im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, "L" if arr.shape[2] == 1 else "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes written by `encode_png` -> uint8 (H, W, C)."""
    arr = np.asarray(Image.open(io.BytesIO(data)), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr

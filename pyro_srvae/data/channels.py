"""Fitting a read image to a model: its channels (luma, an opaque alpha dropped), its size, and back to 8-bit for display."""

from __future__ import annotations
from typing import Optional, Tuple
import numpy as np

from .images import ImageError, RawImage, TIFF_FORMATS, read_image


# ITU-R BT.601 luma, the weights Pillow's convert("L") uses.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _luma(rgb: np.ndarray) -> np.ndarray:
    if np.array_equal(rgb[0], rgb[1]) and np.array_equal(rgb[0], rgb[2]):
        return rgb[:1].copy()  # a grey image stored as RGB: exact
    weights = np.asarray(LUMA_WEIGHTS, dtype=np.float64)[:, None, None]
    luma = (rgb.astype(np.float64) * weights).sum(axis=0, keepdims=True)
    if np.issubdtype(rgb.dtype, np.integer):
        # Stored integers stay integers: the nearest level (the weights sum to 1, so no overflow).
        return np.clip(np.rint(luma), 0, np.iinfo(rgb.dtype).max).astype(rgb.dtype)
    return luma.astype(np.float32)


def _model_description(channels: int) -> str:
    return {1: "grey", 3: "RGB"}.get(channels, f"{channels}-band")


def match_channels(image: RawImage, channels: int) -> Tuple[np.ndarray, Optional[str]]:
    """Fit ``image`` to a model with ``channels`` channels.

    Returns ``(pixels (channels, H, W), note)``; ``note`` is a one-line description of
    the conversion done, or ``None`` when the image was used as it is. Float pixels come back
    float32; integer pixels (:func:`read_integer_image`) keep their dtype.
    """
    pixels, kind, path = image.pixels, image.kind, image.path
    model = f"{channels} ({_model_description(channels)})"
    notes = []
    if kind in ("grey+alpha", "rgba"):
        if kind == "rgba" and channels == 4 and image.format in TIFF_FORMATS:
            return pixels, None  # a 4-band TIFF that Pillow labels RGBA: four bands, used as they are
        if pixels.shape[0] == channels:
            raise ImageError(
                f"{path}: the image is {image.describe()}: its last channel is transparency, not a band "
                f"of the {model}-channel model; save the bands as a TIFF or a (C, H, W) .npy array"
            )
        if not image.opaque:
            raise ImageError(
                f"{path}: the image has transparent pixels (an alpha channel); "
                f"the model takes {model} channel(s) and no alpha"
            )
        pixels, kind = pixels[:-1], "grey" if kind == "grey+alpha" else "rgb"
        notes.append("opaque alpha channel dropped")
    if pixels.shape[0] == channels:
        pass
    elif kind == "grey" and channels == 3:
        pixels = np.repeat(pixels, 3, axis=0)
        notes.append("grey image replicated to RGB")
    elif kind == "rgb" and channels == 1:
        exact = np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[0], pixels[2])
        pixels = _luma(pixels)
        notes.append("RGB image with equal channels read as grey" if exact else "RGB converted to grey (ITU-R 601 luma)")
    else:
        raise ImageError(
            f"{path}: the image has {image.describe()} but the model takes {model}; "
            "only grey <-> RGB conversions are automatic"
        )
    dtype = pixels.dtype if np.issubdtype(pixels.dtype, np.integer) else np.float32
    return np.ascontiguousarray(pixels, dtype=dtype), (", ".join(notes) or None)


def check_image_size(pixels: np.ndarray, min_size: int, path) -> None:
    """Refuse an image smaller than ``min_size`` pixels (the model's factor) on a side."""
    _, height, width = pixels.shape
    if height < min_size or width < min_size:
        raise ImageError(
            f"{path}: the image is {height}x{width} pixels, smaller than one {min_size}x{min_size} "
            f"low-resolution pixel block; inputs need at least {min_size} pixels on each side"
        )


def load_image(path, channels: int, min_size: int = 1) -> Tuple[np.ndarray, Optional[str]]:
    """:func:`read_image`, :func:`match_channels` and the size check in one call."""
    image = read_image(path)
    pixels, note = match_channels(image, channels)
    check_image_size(pixels, min_size, path)
    return pixels, note


def to_uint8_image(pixels: np.ndarray):
    """A float ``(C, H, W)`` image in [0, 1] as an 8-bit Pillow image.

    Inverse of the reading convention: ``floor(256 x)`` (clipped to 0..255), so an
    8-bit input pixel ``k`` read as ``(k + 0.5) / 256`` is written back as ``k``.
    One channel gives a grey PNG, three an RGB one; from other counts channel 0
    (two channels) or channels 0-2 (four or more) are written, as in :mod:`pyro_srvae.plots`.
    """
    from PIL import Image

    values = np.nan_to_num(np.asarray(pixels, dtype=np.float64), nan=0.0)
    quantized = np.clip(np.floor(values * 256.0), 0, 255).astype(np.uint8)
    channels = quantized.shape[0]
    if channels >= 3:
        return Image.fromarray(np.ascontiguousarray(quantized[:3].transpose(1, 2, 0)))
    return Image.fromarray(np.ascontiguousarray(quantized[0]))

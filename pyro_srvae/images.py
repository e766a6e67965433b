"""Reading a user's images for super-resolution, and writing 8-bit previews.

:func:`read_image` reads a PNG / JPEG / TIFF (anything Pillow opens) or a ``.npy``
array ``(H, W)`` or ``(C, H, W)`` into a float32 ``(C, H, W)`` array in ``[0, 1]``:

* 8-bit pixels ``k`` become ``(k + 0.5) / 256``: the centre of the bin ``[k/256, (k+1)/256)``
  that training's dequantization ``(k + u) / 256`` draws from, so the model sees its
  training distribution's mean value for that pixel; 16-bit pixels become
  ``(k + 0.5) / 65536``, the same convention at 16 bits;
* float arrays (``.npy``, 32-bit float TIFFs) are taken as they are and must lie in ``[0, 1]``;
* other integer arrays are refused: their scale would be a guess.

:func:`match_channels` then fits the image to the model's channel count where that is
unambiguous -- grey to RGB (replicated), RGB to grey (ITU-R 601 luma, or channel 0
exactly when the three channels are equal), an alpha channel dropped when it is fully
opaque -- and refuses anything else with one line naming both counts.

Every problem raises :class:`ImageError` with a one-line message that starts with the
file name, for command-line tools to print as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

__all__ = ["ImageError", "RawImage", "check_image_size", "load_image", "match_channels", "read_image", "to_uint8_image"]

# ITU-R BT.601 luma, the weights Pillow's convert("L") uses.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
NPY_SUFFIXES = (".npy",)
TIFF_FORMATS = ("TIFF",)


class ImageError(ValueError):
    """An input that cannot be super-resolved; the message is one line."""


@dataclass
class RawImage:
    """An image as read, before any channel conversion.

    ``pixels`` is float32 ``(C, H, W)`` in ``[0, 1]``. ``kind`` is ``"grey"``, ``"rgb"``,
    ``"grey+alpha"``, ``"rgba"`` (colour images, the alpha last) or ``"bands"``
    (a multi-band array without colour meaning: a ``.npy`` with C > 1 or a multi-page
    TIFF). ``opaque`` says whether the alpha channel, if any, is fully opaque.
    """

    path: Path
    pixels: np.ndarray
    kind: str
    opaque: bool = True
    format: str = ""

    @property
    def channels(self) -> int:
        return self.pixels.shape[0]

    def describe(self) -> str:
        c = self.channels
        names = {"grey": "grey", "rgb": "RGB", "grey+alpha": "grey + alpha", "rgba": "RGBA"}
        what = names.get(self.kind, f"{c}-band")
        return f"{c} channel{'s' if c != 1 else ''} ({what})"


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _scale_integers(values: np.ndarray, bits: int) -> np.ndarray:
    # The bin centre (k + 0.5) / 2^bits, computed in float64, then stored as float32.
    return ((values.astype(np.float64) + 0.5) / float(2**bits)).astype(np.float32)


def _check_float(values: np.ndarray, path: Path) -> np.ndarray:
    values = values.astype(np.float32)
    if values.size and not np.isfinite(values).all():
        raise ImageError(f"{path}: the array contains NaN or infinite values")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0.0 or high > 1.0:
        raise ImageError(
            f"{path}: float pixel values must lie in [0, 1], found [{low:.4g}, {high:.4g}] "
            "(save 8-bit data as uint8, or divide by the white level)"
        )
    return values


def _to_unit(values: np.ndarray, path: Path) -> np.ndarray:
    """uint8 / uint16 / bool / float array -> float32 in [0, 1]; anything else is refused."""
    if values.dtype == np.bool_:
        return _scale_integers(values.astype(np.uint8) * 255, 8)
    if values.dtype == np.uint8:
        return _scale_integers(values, 8)
    if values.dtype == np.uint16:
        return _scale_integers(values, 16)
    if np.issubdtype(values.dtype, np.floating):
        return _check_float(values, path)
    raise ImageError(
        f"{path}: pixel type {values.dtype} is not supported; use uint8 (0-255), uint16 (0-65535) "
        "or floats in [0, 1]"
    )


def _read_npy(path: Path) -> RawImage:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises ValueError, OSError, EOFError, ... for garbage
        raise ImageError(f"{path}: not a readable .npy array ({_one_line(error)})") from None
    if not isinstance(array, np.ndarray) or array.dtype.fields is not None:
        raise ImageError(f"{path}: not a plain numeric array")
    if array.ndim == 2:
        array = array[None]
    elif array.ndim != 3:
        raise ImageError(f"{path}: arrays must have shape (H, W) or (C, H, W), got {array.shape}")
    if array.size == 0:
        raise ImageError(f"{path}: empty array of shape {array.shape}")
    pixels = _to_unit(array, path)
    return RawImage(path, np.ascontiguousarray(pixels), "grey" if pixels.shape[0] == 1 else "bands", format="NPY")


def _frame_array(image, path: Path) -> Tuple[np.ndarray, str, bool]:
    """One Pillow frame -> ((C, H, W) float32, kind, alpha opaque)."""
    mode = image.mode
    if mode == "1":
        image, mode = image.convert("L"), "L"
    elif mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        image, mode = image.convert("RGB"), "RGB"
    elif mode == "RGBa":
        image, mode = image.convert("RGBA"), "RGBA"
    elif mode == "La":
        image, mode = image.convert("LA"), "LA"

    if mode in ("L", "LA", "RGB", "RGBA"):
        values = np.asarray(image, dtype=np.uint8)
        if values.ndim == 2:
            values = values[..., None]
        kind = {"L": "grey", "LA": "grey+alpha", "RGB": "rgb", "RGBA": "rgba"}[mode]
        opaque = bool((values[..., -1] == 255).all()) if kind.endswith("alpha") or kind == "rgba" else True
        return _scale_integers(values.transpose(2, 0, 1), 8), kind, opaque
    if mode.startswith("I;16"):
        values = np.asarray(image).astype(np.uint16)
        return _scale_integers(values[None], 16), "grey", True
    if mode == "I":
        # Pillow reads 16-bit PNGs as 32-bit "I" in some versions; PNG has at most 16 bits.
        values = np.asarray(image)
        if image.format == "PNG" and values.size and values.min() >= 0 and values.max() < 2**16:
            return _scale_integers(values[None], 16), "grey", True
        raise ImageError(
            f"{path}: 32-bit integer images are not supported; use 8 or 16 bits, "
            "or a float .npy array in [0, 1]"
        )
    if mode == "F":
        return _check_float(np.asarray(image)[None], path), "grey", True
    raise ImageError(f"{path}: unsupported image mode {mode!r}")


def _read_pillow(path: Path) -> RawImage:
    from PIL import Image

    try:
        with Image.open(path) as image:
            fmt = image.format or ""
            frames = getattr(image, "n_frames", 1)
            if frames == 1:
                image.load()
                pixels, kind, opaque = _frame_array(image, path)
            elif fmt in TIFF_FORMATS:
                # A multi-page TIFF: one band per page, as some tools store satellite bands.
                bands = []
                for index in range(frames):
                    image.seek(index)
                    image.load()
                    band, kind, _ = _frame_array(image, path)
                    if kind != "grey":
                        raise ImageError(
                            f"{path}: multi-page TIFF whose page {index + 1} is not single-band; "
                            "save the bands as a (C, H, W) .npy array"
                        )
                    if bands and band.shape != bands[0].shape:
                        raise ImageError(f"{path}: the pages of this multi-page TIFF differ in size")
                    bands.append(band)
                pixels, kind, opaque = np.concatenate(bands), "bands", True
            else:
                raise ImageError(f"{path}: {fmt or 'image'} file with {frames} frames; give one still image")
    except ImageError:
        raise
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ... for bad files
        raise ImageError(f"{path}: not a readable image ({_one_line(error)})") from None
    if pixels.size == 0:
        raise ImageError(f"{path}: empty image")
    return RawImage(path, np.ascontiguousarray(pixels), kind, opaque, fmt)


def read_image(path) -> RawImage:
    """Read an image file or a ``.npy`` array; raises :class:`ImageError` with one line."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    try:
        if path.suffix.lower() in NPY_SUFFIXES:
            return _read_npy(path)
        return _read_pillow(path)
    except MemoryError:
        raise ImageError(f"{path}: too large to load into memory") from None


def _luma(rgb: np.ndarray) -> np.ndarray:
    if np.array_equal(rgb[0], rgb[1]) and np.array_equal(rgb[0], rgb[2]):
        return rgb[:1].copy()  # a grey image stored as RGB: exact
    weights = np.asarray(LUMA_WEIGHTS, dtype=np.float64)[:, None, None]
    return (rgb.astype(np.float64) * weights).sum(axis=0, keepdims=True).astype(np.float32)


def _model_description(channels: int) -> str:
    return {1: "grey", 3: "RGB"}.get(channels, f"{channels}-band")


def match_channels(image: RawImage, channels: int) -> Tuple[np.ndarray, Optional[str]]:
    """Fit ``image`` to a model with ``channels`` channels.

    Returns ``(pixels (channels, H, W), note)``; ``note`` is a one-line description of
    the conversion done, or ``None`` when the image was used as it is.
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
    return np.ascontiguousarray(pixels, dtype=np.float32), (", ".join(notes) or None)


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

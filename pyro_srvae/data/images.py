"""Reading a user's images for super-resolution, and writing 8-bit previews.

:func:`read_image` reads a PNG / JPEG / TIFF or a ``.npy`` array ``(H, W)`` or ``(C, H, W)``
into a float32 ``(C, H, W)`` array in ``[0, 1]``:

* 8-bit pixels ``k`` become ``(k + 0.5) / 256``: the centre of the bin ``[k/256, (k+1)/256)``
  that training's dequantization ``(k + u) / 256`` draws from, so the model sees its
  training distribution's mean value for that pixel; 16-bit pixels become
  ``(k + 0.5) / 65536``, the same convention at 16 bits;
* float arrays (``.npy``, 32-bit float TIFFs) are taken as they are and must lie in ``[0, 1]``;
* other integer arrays are refused: their scale would be a guess.

TIFFs are read with ``tifffile`` (multi-page and multi-band, 8 or 16 bits): ``(H, W)``, samples
per pixel ``(H, W, C)`` or planes / pages ``(C, H, W)``, told apart by tifffile's axes of the image
series, not by guessing from the sizes. Pillow reads what tifffile does not decode here (palette and
CMYK TIFFs, compressions that need the optional ``imagecodecs``) and every other format.

For training, :func:`read_integer_image` gives the stored integers instead (uint8 or uint16, with
their bit depth; floats refused) and :func:`read_image_header` the shape, kind and bit depth from
the file's header alone, without decoding the pixels.

:func:`match_channels` then fits the image to the model's channel count where that is
unambiguous -- grey to RGB (replicated), RGB to grey (ITU-R 601 luma, or channel 0
exactly when the three channels are equal), an alpha channel dropped when it is fully
opaque -- and refuses anything else with one line naming both counts. On integer pixels it
stays integer: grey is replicated exactly and the luma is rounded to the nearest level.

Every problem raises :class:`ImageError` with a one-line message that starts with the
file name, for command-line tools to print as is.
"""

from __future__ import annotations
import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple
import numpy as np


NPY_SUFFIXES = (".npy",)

TIFF_FORMATS = ("TIFF",)

# Classic and BigTIFF, both byte orders: a TIFF is recognised by its content, not its name.
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class ImageError(ValueError):
    """An input that cannot be super-resolved; the message is one line."""


@dataclass
class RawImage:
    """An image as read, before any channel conversion.

    ``pixels`` is ``(C, H, W)``: float32 in ``[0, 1]`` from :func:`read_image`, the stored
    uint8 / uint16 integers from :func:`read_integer_image`. ``kind`` is ``"grey"``, ``"rgb"``,
    ``"grey+alpha"``, ``"rgba"`` (colour images, the alpha last) or ``"bands"``
    (a multi-band array without colour meaning: a ``.npy`` with C > 1, a multi-page
    TIFF or a TIFF with extra samples). ``opaque`` says whether the alpha channel, if any,
    is fully opaque. ``bits`` is the stored bit depth: 8 or 16, ``None`` for float data
    (1-bit images count as 8-bit, 0 and 255).
    """

    path: Path
    pixels: np.ndarray
    kind: str
    opaque: bool = True
    format: str = ""
    bits: Optional[int] = None

    @property
    def channels(self) -> int:
        return self.pixels.shape[0]

    def describe(self) -> str:
        return _describe(self.channels, self.kind)


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


def _bits_of(dtype) -> Optional[int]:
    """The bit depth of stored integers (bool counts as 8: it is stored as 0 / 255); None otherwise."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8 or dtype == np.bool_:
        return 8
    if dtype == np.uint16:
        return 16
    return None


def _check_pixel_type(dtype, path: Path) -> None:
    dtype = np.dtype(dtype)
    if _bits_of(dtype) is None and not np.issubdtype(dtype, np.floating):
        raise ImageError(
            f"{path}: pixel type {dtype} is not supported; use uint8 (0-255), uint16 (0-65535) "
            "or floats in [0, 1]"
        )


def _require_integers(values: np.ndarray, path: Path) -> np.ndarray:
    """The stored integers of a training image, uint8 or uint16; floats and other types refused."""
    if values.dtype == np.uint8 or values.dtype == np.uint16:
        return values
    if np.issubdtype(values.dtype, np.floating):
        raise ImageError(
            f"{path}: float pixels ({values.dtype}); training needs the stored integers: "
            "save the images as uint8 (0-255) or uint16 (0-65535)"
        )
    raise ImageError(f"{path}: pixel type {values.dtype} is not supported; use uint8 (0-255) or uint16 (0-65535)")


def _describe(channels: int, kind: str) -> str:
    names = {"grey": "grey", "rgb": "RGB", "grey+alpha": "grey + alpha", "rgba": "RGBA"}
    what = names.get(kind, f"{channels}-band")
    return f"{channels} channel{'s' if channels != 1 else ''} ({what})"


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, read without decoding the pixels (:func:`read_image_header`).

    ``channels``, ``kind`` and ``bits`` are those :func:`read_integer_image` gives for the
    file (``bits`` None: float pixels); the alpha's opacity needs the pixels and is not known.
    """

    path: Path
    channels: int
    height: int
    width: int
    kind: str
    bits: Optional[int]
    format: str = ""

    def describe(self) -> str:
        return _describe(self.channels, self.kind)


def _finish(path: Path, values: np.ndarray, kind: str, opaque: bool = True, fmt: str = "") -> RawImage:
    """A RawImage of the stored values: native byte order, bool as 0 / 255 (as Pillow's mode "1")."""
    if values.size == 0:
        raise ImageError(f"{path}: empty image of shape {values.shape}")
    if not values.dtype.isnative:
        values = values.astype(values.dtype.newbyteorder("="))
    if values.dtype == np.bool_:
        values = values.astype(np.uint8) * np.uint8(255)
    return RawImage(path, np.ascontiguousarray(values), kind, opaque, fmt, _bits_of(values.dtype))


def _alpha_opaque(values: np.ndarray) -> bool:
    """Whether the last channel (an alpha) is everywhere at its maximum."""
    alpha = values[-1]
    if alpha.dtype == np.bool_:
        return bool(alpha.all())
    top = np.iinfo(alpha.dtype).max if np.issubdtype(alpha.dtype, np.integer) else 1.0
    return bool((alpha == top).all())


# --- .npy -----------------------------------------------------------------------


def _npy_kind(array: np.ndarray, path: Path) -> str:
    if array.dtype.fields is not None or array.dtype.hasobject:
        raise ImageError(f"{path}: not a plain numeric array")
    if array.ndim not in (2, 3):
        raise ImageError(f"{path}: arrays must have shape (H, W) or (C, H, W), got {array.shape}")
    if array.size == 0:
        raise ImageError(f"{path}: empty array of shape {array.shape}")
    return "grey" if array.ndim == 2 or array.shape[0] == 1 else "bands"


def _read_npy(path: Path) -> RawImage:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises ValueError, OSError, EOFError, ... for garbage
        raise ImageError(f"{path}: not a readable .npy array ({_one_line(error)})") from None
    if not isinstance(array, np.ndarray):
        raise ImageError(f"{path}: not a plain numeric array")
    kind = _npy_kind(array, path)
    return _finish(path, array if array.ndim == 3 else array[None], kind, fmt="NPY")


def _npy_header(path: Path) -> ImageHeader:
    try:
        # A memory map reads the header only, and refuses a file shorter than the header says.
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:
        raise ImageError(f"{path}: not a readable .npy array ({_one_line(error)})") from None
    kind = _npy_kind(array, path)
    shape = array.shape if array.ndim == 3 else (1,) + array.shape
    dtype = array.dtype if array.dtype.isnative else array.dtype.newbyteorder("=")  # as _finish reads it
    _check_pixel_type(dtype, path)
    return ImageHeader(path, shape[0], shape[1], shape[2], kind, _bits_of(dtype), "NPY")


# --- Pillow -----------------------------------------------------------------------

_PILLOW_RGB_MODES = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX")


def _mode_layout(image, path: Path) -> Tuple[str, int, Optional[int]]:
    """(kind, channels, bits) that :func:`_frame_values` gives for a Pillow image, from its mode."""
    mode = image.mode
    if mode in ("1", "L"):
        return "grey", 1, 8
    if mode in ("LA", "La"):
        return "grey+alpha", 2, 8
    if mode == "RGB" or mode in _PILLOW_RGB_MODES:
        return "rgb", 3, 8
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in image.info):
        return "rgba", 4, 8
    if mode == "P":
        return "rgb", 3, 8
    if mode.startswith("I;16") or (mode == "I" and image.format == "PNG"):
        return "grey", 1, 16
    if mode == "I":
        raise ImageError(
            f"{path}: 32-bit integer images are not supported; use 8 or 16 bits, "
            "or a float .npy array in [0, 1]"
        )
    if mode == "F":
        return "grey", 1, None
    raise ImageError(f"{path}: unsupported image mode {mode!r}")


def _png_colour_16bit(image) -> bool:
    """A 16-bit colour PNG, which Pillow decodes to its high 8 bits (known before ``load()`` only)."""
    if image.format != "PNG" or image.mode not in ("RGB", "RGBA", "LA"):
        return False
    return any("16" in str(tile[3]) for tile in (image.tile or ()))


def _frame_values(image, path: Path) -> Tuple[np.ndarray, str, bool]:
    """One Pillow frame -> ((C, H, W) stored values, kind, alpha opaque)."""
    mode = image.mode
    if mode == "1":
        image, mode = image.convert("L"), "L"
    elif mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
    elif mode in _PILLOW_RGB_MODES:
        image, mode = image.convert("RGB"), "RGB"
    elif mode == "RGBa":
        image, mode = image.convert("RGBA"), "RGBA"
    elif mode == "La":
        image, mode = image.convert("LA"), "LA"

    if mode in ("L", "LA", "RGB", "RGBA"):
        values = np.asarray(image, dtype=np.uint8)
        if values.ndim == 2:
            values = values[..., None]
        values = values.transpose(2, 0, 1)
        kind = {"L": "grey", "LA": "grey+alpha", "RGB": "rgb", "RGBA": "rgba"}[mode]
        return values, kind, _alpha_opaque(values) if mode in ("LA", "RGBA") else True
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)[None], "grey", True
    if mode == "I":
        # Pillow reads 16-bit PNGs as 32-bit "I" in some versions; PNG has at most 16 bits.
        values = np.asarray(image)
        if image.format == "PNG" and values.size and values.min() >= 0 and values.max() < 2**16:
            return values.astype(np.uint16)[None], "grey", True
        _mode_layout(image, path)  # raises the 32-bit message
        raise ImageError(f"{path}: 16-bit PNG with values outside 0..65535")
    if mode == "F":
        return np.asarray(image, dtype=np.float32)[None], "grey", True
    raise ImageError(f"{path}: unsupported image mode {mode!r}")


def _read_pillow(path: Path, exact: bool = False) -> RawImage:
    """Any image Pillow opens; ``exact``: refuse what Pillow would decode at a lower bit depth."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            fmt = image.format or ""
            if exact and _png_colour_16bit(image):
                raise ImageError(
                    f"{path}: 16-bit colour PNG, which Pillow reads as 8 bits; "
                    "save it as a 16-bit TIFF to train on all 16"
                )
            frames = getattr(image, "n_frames", 1)
            if frames == 1:
                image.load()
                values, kind, opaque = _frame_values(image, path)
            elif fmt in TIFF_FORMATS:
                # A multi-page TIFF: one band per page, as some tools store satellite bands.
                bands = []
                for index in range(frames):
                    image.seek(index)
                    image.load()
                    band, kind, _ = _frame_values(image, path)
                    if kind != "grey":
                        raise ImageError(
                            f"{path}: multi-page TIFF whose page {index + 1} is not single-band; "
                            "save the bands as a (C, H, W) .npy array"
                        )
                    if bands and band.shape != bands[0].shape:
                        raise ImageError(f"{path}: the pages of this multi-page TIFF differ in size")
                    bands.append(band)
                values, kind, opaque = np.concatenate(bands), "bands", True
            else:
                raise ImageError(f"{path}: {fmt or 'image'} file with {frames} frames; give one still image")
    except ImageError:
        raise
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ... for bad files
        raise ImageError(f"{path}: not a readable image ({_one_line(error)})") from None
    return _finish(path, values, kind, opaque, fmt)


def _pillow_header(path: Path) -> ImageHeader:
    from PIL import Image

    try:
        with Image.open(path) as image:  # reads the header; the pixels are decoded on load()
            fmt = image.format or ""
            width, height = image.size
            if _png_colour_16bit(image):
                raise ImageError(
                    f"{path}: 16-bit colour PNG, which Pillow reads as 8 bits; "
                    "save it as a 16-bit TIFF to train on all 16"
                )
            kind, channels, bits = _mode_layout(image, path)
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                if fmt not in TIFF_FORMATS:
                    raise ImageError(f"{path}: {fmt or 'image'} file with {frames} frames; give one still image")
                if kind != "grey":
                    raise ImageError(
                        f"{path}: multi-page TIFF whose page 1 is not single-band; "
                        "save the bands as a (C, H, W) .npy array"
                    )
                kind, channels = "bands", frames
    except ImageError:
        raise
    except Exception as error:
        raise ImageError(f"{path}: not a readable image ({_one_line(error)})") from None
    if width == 0 or height == 0:
        raise ImageError(f"{path}: empty image of size {width}x{height}")
    return ImageHeader(path, channels, height, width, kind, bits, fmt)


# --- TIFF (tifffile) ------------------------------------------------------------

# Photometric interpretations read natively: MINISWHITE, MINISBLACK, RGB. Palette, CMYK,
# YCbCr, CIELab, ... are left to Pillow, which converts them to RGB.
_TIFF_NATIVE_PHOTOMETRIC = (0, 1, 2)

# ExtraSamples values that mean an alpha channel (associated, unassociated).
_TIFF_ALPHA = (1, 2)


@dataclass(frozen=True)
class _TiffLayout:
    shape: Tuple[int, ...]  # the series' shape, length-1 axes dropped (Y and X kept)
    channel_axis: Optional[int]  # None (grey), 0 (planes or pages) or 2 (samples per pixel)
    kind: str
    invert: bool  # MINISWHITE: 0 is white
    dtype: np.dtype

    @property
    def chw(self) -> Tuple[int, int, int]:
        if self.channel_axis is None:
            return (1,) + self.shape
        if self.channel_axis == 0:
            return self.shape
        return (self.shape[2], self.shape[0], self.shape[1])


def _tiff_layout(tif, path: Path) -> Optional[_TiffLayout]:
    """How the first image series of a TIFF maps to (C, H, W); None where Pillow must read it.

    Whether channels come first or last is read from tifffile's axes codes (``S``: samples
    per pixel, ``I``/``Q``/``C``/``Z``/...: pages or planes), not guessed from the sizes, so a
    4x5 RGBA image and a four-band 5x4 stack are told apart.
    """
    series = tif.series
    if not series:
        raise ImageError(f"{path}: TIFF without an image")
    if len(series) > 1:
        raise ImageError(
            f"{path}: TIFF holding {len(series)} images of different shapes or types; "
            "give one image (pages of one size are read as bands)"
        )
    image = series[0]
    page = image.keyframe
    if int(page.photometric) not in _TIFF_NATIVE_PHOTOMETRIC:
        return None
    get_axes, get_shape = getattr(image, "get_axes", None), getattr(image, "get_shape", None)
    axes, shape = (get_axes(False), get_shape(False)) if get_axes and get_shape else (image.axes, image.shape)
    # Drop length-1 axes except Y and X, so a one-row image keeps both.
    kept = [(axis, size) for axis, size in zip(axes, shape) if size != 1 or axis in "YX"]
    axes, shape = "".join(a for a, _ in kept), tuple(int(n) for _, n in kept)
    other = axes.replace("Y", "").replace("X", "")
    if len(other) > 1:
        raise ImageError(
            f"{path}: TIFF of shape {shape} (tifffile axes {axes}), more than one image; "
            "give one image: (H, W), (H, W, C) samples or (C, H, W) pages"
        )
    if axes == "YX":
        channel_axis = None
    elif axes == other + "YX":
        channel_axis = 0
    elif axes == "YX" + other:
        channel_axis = 2
    else:
        return None
    photometric = int(page.photometric)
    kind = "grey" if channel_axis is None else "bands"
    if other == "S":
        count = shape[channel_axis]
        extra = tuple(int(e) for e in (page.extrasamples or ()))
        alpha = len(extra) == 1 and extra[0] in _TIFF_ALPHA
        if photometric == 2 and count == 3:
            kind = "rgb"
        elif photometric == 2 and count == 4 and alpha:
            kind = "rgba"
        elif photometric != 2 and count == 2 and alpha:
            kind = "grey+alpha"
    return _TiffLayout(shape, channel_axis, kind, photometric == 0, np.dtype(image.dtype))


@contextlib.contextmanager
def _quiet_readers():
    """Silence tifffile's log records and Pillow's warnings while a file is read.

    A damaged file is reported by the one-line ImageError raised here; the readers' own
    messages about it (tifffile logs, Pillow warns "Corrupt EXIF data") would only add lines.
    """
    logger = logging.getLogger("tifffile")
    drop = lambda record: False  # noqa: E731
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.removeFilter(drop)


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) in _TIFF_MAGIC
    except OSError as error:
        raise ImageError(f"{path}: not readable ({_one_line(error)})") from None


def _read_tiff(path: Path, exact: bool = False) -> RawImage:
    try:
        import tifffile
    except ImportError:  # an install without the requirement: Pillow reads what it can
        return _read_pillow(path, exact)

    failure: Optional[BaseException] = None
    try:
        with _quiet_readers(), tifffile.TiffFile(path) as tif:
            layout = _tiff_layout(tif, path)
            if layout is not None:
                values = tif.series[0].asarray().reshape(layout.shape)
                if layout.channel_axis == 2:
                    values = values.transpose(2, 0, 1)
                elif layout.channel_axis is None:
                    values = values[None]
                if layout.invert and values.dtype == np.bool_:
                    values = ~values
                elif layout.invert and np.issubdtype(values.dtype, np.unsignedinteger):
                    values = np.iinfo(values.dtype).max - values
                opaque = _alpha_opaque(values) if layout.kind in ("grey+alpha", "rgba") else True
                return _finish(path, values, layout.kind, opaque, "TIFF")
    except ImageError:
        raise
    except MemoryError:
        raise
    except Exception as error:  # TiffFileError, a short read, a codec that needs imagecodecs, ...
        failure = error
    try:
        with _quiet_readers():
            return _read_pillow(path, exact)
    except ImageError:
        if failure is None:
            raise
        raise ImageError(f"{path}: not a readable image ({_one_line(failure)})") from None


def _tiff_header(path: Path) -> ImageHeader:
    try:
        import tifffile
    except ImportError:
        return _pillow_header(path)

    failure: Optional[BaseException] = None
    try:
        with _quiet_readers(), tifffile.TiffFile(path) as tif:
            layout = _tiff_layout(tif, path)
    except ImageError:
        raise
    except Exception as error:
        failure, layout = error, None
    if layout is None:
        try:
            with _quiet_readers():
                return _pillow_header(path)
        except ImageError:
            if failure is None:
                raise
            raise ImageError(f"{path}: not a readable image ({_one_line(failure)})") from None
    channels, height, width = layout.chw
    if channels * height * width == 0:
        raise ImageError(f"{path}: empty image of shape {layout.shape}")
    _check_pixel_type(layout.dtype, path)
    return ImageHeader(path, channels, height, width, layout.kind, _bits_of(layout.dtype), "TIFF")


# --- the public readers -----------------------------------------------------------


def _checked_path(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    return path


def _read_stored(path, exact: bool = False) -> RawImage:
    path = _checked_path(path)
    try:
        if path.suffix.lower() in NPY_SUFFIXES:
            return _read_npy(path)
        if _is_tiff(path):
            return _read_tiff(path, exact)
        return _read_pillow(path, exact)
    except MemoryError:
        raise ImageError(f"{path}: too large to load into memory") from None


def read_image(path) -> RawImage:
    """Read an image file or a ``.npy`` array; raises :class:`ImageError` with one line.

    ``pixels`` are float32 in ``[0, 1]`` (integers ``k`` at their bin centre
    ``(k + 0.5) / 2**bits``); ``bits`` says what was stored.
    """
    image = _read_stored(path)
    image.pixels = np.ascontiguousarray(_to_unit(image.pixels, image.path))
    return image


def read_integer_image(path) -> RawImage:
    """Read the stored integers of an image for training: ``pixels`` uint8 or uint16 ``(C, H, W)``.

    ``bits`` is 8 or 16 (1-bit images give 0 / 255 at 8 bits). Float pixels are refused with a
    line saying to store uint8 / uint16, as is a 16-bit colour PNG (Pillow would give 8 bits).
    """
    image = _read_stored(path, exact=True)
    image.pixels = _require_integers(image.pixels, image.path)
    return image


def read_image_header(path) -> ImageHeader:
    """Shape, kind and bit depth of an image from its header, without decoding the pixels.

    It agrees with :func:`read_integer_image` on the same file; a file whose header is fine
    but whose pixels are truncated or corrupt is found only when it is decoded.
    """
    path = _checked_path(path)
    if path.suffix.lower() in NPY_SUFFIXES:
        return _npy_header(path)
    if _is_tiff(path):
        return _tiff_header(path)
    return _pillow_header(path)

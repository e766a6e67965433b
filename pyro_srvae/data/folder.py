"""The ``folder`` dataset: a user's own images, whole or cut into patches, split by image.

``load_folder(DIR, split, ...)`` (also ``load_dataset("folder", split, DIR, ...)``) reads every
PNG, JPEG, TIFF and ``.npy`` file under ``DIR``, recursively (suffixes matched in any case;
files and folders whose name starts with ``.`` are skipped), in the order of their relative
paths. Conventions:

Split (by image, never by patch)
    If ``DIR/train`` and ``DIR/test`` both exist, they are the two splits (other files under
    ``DIR`` are ignored). Otherwise each image goes to the test split when its score
    ``sha256(f"{seed}:{relative posix path}")`` (first 8 bytes, big-endian, divided by
    ``2**64``: uniform on ``[0, 1)``) is below ``test_fraction``. A file's split depends on
    its own path only, so adding or removing files never moves another one -- except in
    the fallback that keeps both splits non-empty: when no score is below
    ``test_fraction`` the image with the smallest score is the test split, and when every
    score is, the image with the largest score is the train split.
Pixels
    Integers only: uint8 or uint16 (1-bit images count as 8-bit 0 / 255), one bit depth for
    the whole set; float data is refused. The set is held at its bit depth and
    :func:`pyro_srvae.data.batching.dequantize` maps a level ``k`` to ``(k + U) / 2**bits``.
Channels
    One count for the whole set (both splits): where grey and RGB images mix, grey is
    replicated to RGB; an opaque alpha channel is dropped (a TIFF with four samples, the
    last flagged alpha, counts as four bands, as :func:`pyro_srvae.data.channels.match_channels`
    reads it); ``channels=N`` forces a count through the same conversions (RGB to grey:
    the rounded ITU-R 601 luma). Any other mix is refused.
Patches
    ``patch_size=P`` (a multiple of ``factor``) cuts ``P x P`` patches at the positions of
    :func:`patch_positions` along each axis: ``0, s, 2s, ...`` up to ``L - P``, plus
    ``L - P`` itself, flush with the far edge, when the grid does not reach it (``s`` =
    ``patch_stride``, default ``P // 2``), so every pixel is in some patch. Images smaller
    than ``P`` on a side give no patches (logged). ``patch_size=None``: whole images, which
    must then all have one size, a multiple of ``factor``.
Cache
    With ``cache_dir``, the patches of a split are written once to
    ``cache_dir/folder-<split>-<digest>.npy`` (a temporary file renamed when complete, so a
    failed or interrupted build leaves nothing) and memory-mapped from then on: a second
    call with the same files (relative path, size, mtime) and options decodes nothing,
    and a set larger than memory is read batch by batch. ``cache_dir=None`` builds it in
    memory.

Bad input raises :class:`FolderDatasetError` (a ``ValueError``), or
:class:`pyro_srvae.data.image_dataset.DatasetNotFoundError` for a missing or empty folder, with a one-line
message that starts with the path concerned.
"""

from __future__ import annotations
import errno
import hashlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union
import numpy as np
import torch
from tqdm import tqdm  # a dependency of pyro

from ..utils.io import atomic_path
from .batching import mapped_tensor
from .channels import match_channels
from .image_dataset import DatasetNotFoundError, ImageDataset, SPLITS
from .images import ImageError, ImageHeader, RawImage, read_image_header, read_integer_image


PathLike = Union[str, Path]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy")

#: Bumped whenever the cache's content for the same inputs would change.
FORMAT_VERSION = 1

_CACHE_NAME = re.compile(r"^folder-(train|test)-[0-9a-f]{32}\.npy$")

logger = logging.getLogger(__name__)


class FolderDatasetError(ValueError):
    """A folder of images that cannot be made into a training set; the message is one line."""


@dataclass(frozen=True, eq=False)
class FolderSource:
    """Where the patches of a folder split came from (``ImageDataset.source``).

    Attributes:
        root: the folder given.
        split: ``"train"`` or ``"test"``.
        layout: ``"folders"`` (``root/train`` and ``root/test``) or ``"hash"`` (the seeded split).
        files: the split's images, relative POSIX paths under ``root``, sorted.
        patches_per_file: how many patches each file gave (0: smaller than one patch).
        origins: ``int64 (N, 3)``: for each patch the index into ``files``, its top row and
            its left column in that image.
        patch_size, patch_stride: as used (``None``: whole images).
        channels, bits: of the set.
        skipped: the files smaller than one patch.
        cache_file: the memory-mapped cache, or ``None`` (built in memory).
        from_cache: whether the cache existed already (nothing was decoded).
        notes: one line per conversion applied, with how many files it concerned.
    """

    root: Path
    split: str
    layout: str
    files: Tuple[str, ...]
    patches_per_file: Tuple[int, ...]
    origins: torch.Tensor
    patch_size: Optional[int]
    patch_stride: Optional[int]
    channels: int
    bits: int
    skipped: Tuple[str, ...] = ()
    cache_file: Optional[Path] = None
    from_cache: bool = False
    notes: Tuple[str, ...] = ()


# ----------------------------------------------------------------------------
# Patches and split
# ----------------------------------------------------------------------------


def patch_positions(length: int, patch: int, stride: int) -> List[int]:
    """Start positions of the patches along an axis of ``length`` pixels.

    ``0, stride, 2 stride, ...`` while the patch fits (``<= length - patch``), then
    ``length - patch`` when the grid stops short of it, so the last patch is flush with
    the edge and every pixel is covered. No position when ``length < patch``. The count
    is ``floor((L - P) / s) + 1``, plus one when ``(L - P) % s != 0``.
    """
    if patch < 1 or stride < 1:
        raise ValueError(f"patch and stride must be >= 1, got {patch} and {stride}")
    if length < patch:
        return []
    positions = list(range(0, length - patch + 1, stride))
    if positions[-1] != length - patch:
        positions.append(length - patch)
    return positions


def split_score(relative_path: str, seed: int = 0) -> float:
    """The seeded score in ``[0, 1)`` of a file: below ``test_fraction`` puts it in the test split."""
    digest = hashlib.sha256(f"{int(seed)}:{relative_path}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _is_cache_file(path: Path, cache_dir: Optional[Path]) -> bool:
    return cache_dir is not None and _CACHE_NAME.match(path.name) is not None and path.parent.resolve() == cache_dir


def find_images(folder: PathLike, cache_dir: Optional[PathLike] = None) -> List[Path]:
    """Every image file under ``folder``, recursively, sorted by relative POSIX path.

    Suffixes :data:`IMAGE_SUFFIXES` in any case; hidden files and folders (a name starting
    with ``.``) skipped, as are this module's cache files in ``cache_dir``, which may lie
    inside ``folder``.
    """
    folder = Path(folder)
    cache = Path(cache_dir).expanduser().resolve() if cache_dir is not None else None
    found = []
    for directory, subdirectories, names in os.walk(folder):
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
        for name in names:
            path = Path(directory) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue
            if not _is_cache_file(path, cache):
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _no_images(folder: Path) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} files, recursively; "
        "hidden ones skipped)"
    )


def split_files(
    root: PathLike, test_fraction: float = 0.1, seed: int = 0, cache_dir: Optional[PathLike] = None
) -> Tuple[Dict[str, List[Path]], str]:
    """The image files of each split and the layout used (``"folders"`` or ``"hash"``).

    See the module docstring for the rule. Raises :class:`DatasetNotFoundError` when a
    split would have no image, :class:`FolderDatasetError` for a single image.
    """
    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        splits = {split: find_images(root / split, cache_dir) for split in SPLITS}
        for split, files in splits.items():
            if not files:
                raise _no_images(root / split)
        return splits, "folders"
    files = find_images(root, cache_dir)
    if not files:
        raise _no_images(root)
    if len(files) == 1:
        raise FolderDatasetError(
            f"{files[0]}: the only image under {root}; a train/test split needs two or more, "
            f"or {root}/train and {root}/test folders"
        )
    scores = [split_score(f.relative_to(root).as_posix(), seed) for f in files]
    test = [score < test_fraction for score in scores]
    if not any(test):
        test[int(np.argmin(scores))] = True
    if all(test):
        test[int(np.argmax(scores))] = False
    return {"train": [f for f, t in zip(files, test) if not t], "test": [f for f, t in zip(files, test) if t]}, "hash"


# ----------------------------------------------------------------------------
# The set's bit depth and channels, from the headers
# ----------------------------------------------------------------------------


def _natural_channels(header: ImageHeader) -> int:
    """The channels a file has once an alpha channel is set aside (dropped when opaque)."""
    if header.kind == "grey+alpha":
        return 1
    if header.kind == "rgba" and header.format != "TIFF":
        return 3
    return header.channels


def _converts_to(header: ImageHeader, channels: int) -> bool:
    """Whether match_channels takes the file to ``channels`` (given an opaque alpha)."""
    dummy = RawImage(header.path, np.zeros((header.channels, 1, 1), np.uint8), header.kind, True, header.format)
    try:
        match_channels(dummy, channels)
    except ImageError:
        return False
    return True


def _set_bits(headers: Sequence[ImageHeader]) -> int:
    first = None
    for header in headers:
        if header.bits is None:
            raise FolderDatasetError(
                f"{header.path}: float pixels; training needs the stored integers: save the images "
                "as uint8 (0-255) or uint16 (0-65535)"
            )
        if first is None:
            first = header
        elif header.bits != first.bits:
            raise FolderDatasetError(
                f"{header.path}: {header.bits}-bit pixels, but {first.path} has {first.bits}-bit ones; "
                "the images of a folder set need one bit depth"
            )
    return first.bits


def _set_channels(headers: Sequence[ImageHeader], channels: Optional[int]) -> int:
    counts = [_natural_channels(h) for h in headers]
    if channels is None:
        if set(counts) <= {1, 3} or len(set(counts)) == 1:
            channels = max(counts)
        else:
            first = headers[0]
            for header, count in zip(headers, counts):
                if count != counts[0] and {count, counts[0]} != {1, 3}:
                    raise FolderDatasetError(
                        f"{header.path}: {header.describe()}, but {first.path} has {first.describe()}; "
                        "the images of a folder set need one channel count (grey and RGB mix: "
                        "grey is replicated; or force one with channels=N, --channels N)"
                    )
    for header in headers:
        if not _converts_to(header, channels):
            raise FolderDatasetError(
                f"{header.path}: {header.describe()}, which does not convert to the set's "
                f"{channels} channel(s); only grey <-> RGB and dropping an opaque alpha are automatic"
            )
    return channels


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------


def _check_options(root, split, patch_size, patch_stride, test_fraction, factor, channels) -> None:
    def positive_int(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid choices: {', '.join(SPLITS)}")
    if not positive_int(factor):
        raise FolderDatasetError(f"{root}: the factor must be an integer >= 1, got {factor!r}")
    if patch_size is not None:
        if not positive_int(patch_size):
            raise FolderDatasetError(f"{root}: the patch size must be an integer >= 1, got {patch_size!r}")
        if patch_size % factor:
            raise FolderDatasetError(
                f"{root}: patch size {patch_size} is not a multiple of the factor {factor}; "
                f"use a multiple such as {max(factor, patch_size // factor * factor)}"
            )
    if patch_stride is not None:
        if patch_size is None:
            raise FolderDatasetError(f"{root}: a patch stride needs a patch size (--patch-size)")
        if not positive_int(patch_stride):
            raise FolderDatasetError(f"{root}: the patch stride must be an integer >= 1, got {patch_stride!r}")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise FolderDatasetError(f"{root}: the test fraction must lie in [0, 1), got {test_fraction}")
    if channels is not None and not positive_int(channels):
        raise FolderDatasetError(f"{root}: channels must be an integer >= 1, got {channels!r}")


def _progress(iterable, total: int, description: str, enabled: bool):
    return tqdm(
        iterable, total=total, desc=description, unit="image", file=sys.stderr, disable=not enabled, dynamic_ncols=True
    )


def _headers(files: Sequence[Path], progress: bool) -> List[ImageHeader]:
    headers = []
    for path in _progress(files, len(files), "scanning images", progress):
        try:
            headers.append(read_image_header(path))
        except ImageError as error:
            raise FolderDatasetError(str(error)) from None
    return headers


def _grids(headers: Sequence[ImageHeader], patch_size: Optional[int], stride: int):
    """(rows, columns) of the patches of each image; whole images: one patch at (0, 0)."""
    if patch_size is None:
        return [([0], [0]) for _ in headers]
    return [
        (patch_positions(h.height, patch_size, stride), patch_positions(h.width, patch_size, stride)) for h in headers
    ]


def _check_whole_images(headers: Sequence[ImageHeader], factor: int) -> None:
    first = headers[0]
    for header in headers:
        if (header.height, header.width) != (first.height, first.width):
            raise FolderDatasetError(
                f"{header.path}: {header.height}x{header.width} pixels, but {first.path} is "
                f"{first.height}x{first.width}; whole images must all have one size: cut patches "
                "with --patch-size P (patch_size=P)"
            )
    if first.height % factor or first.width % factor:
        raise FolderDatasetError(
            f"{first.path}: {first.height}x{first.width} pixels, not a multiple of the factor {factor}; "
            "crop the images or cut patches with --patch-size P (patch_size=P)"
        )


def _check_patches(root: Path, split: str, headers, grids, patch_size: int) -> None:
    if any(rows and columns for rows, columns in grids):
        return
    largest = max(headers, key=lambda h: (min(h.height, h.width), h.height * h.width))
    raise FolderDatasetError(
        f"{root}: no {split} image is at least {patch_size}x{patch_size} pixels (the largest is "
        f"{largest.height}x{largest.width}, {largest.path}); use a smaller --patch-size"
    )


def _origins(grids) -> torch.Tensor:
    """(file index, top, left) of every patch, in the order _fill writes them (rows, then columns)."""
    parts = [np.zeros((0, 3), np.int64)]
    for index, (rows, columns) in enumerate(grids):
        if rows and columns:
            tops, lefts = np.meshgrid(np.asarray(rows, np.int64), np.asarray(columns, np.int64), indexing="ij")
            parts.append(np.stack([np.full(tops.size, index, np.int64), tops.ravel(), lefts.ravel()], axis=1))
    return torch.from_numpy(np.concatenate(parts))


def _digest(root: Path, split: str, layout: str, files: Sequence[Path], **options) -> str:
    entries = []
    for path in files:
        try:
            status = path.stat()
        except OSError as error:
            raise FolderDatasetError(f"{path}: cannot be read ({error.strerror or error})") from None
        entries.append([path.relative_to(root).as_posix(), status.st_size, status.st_mtime_ns])
    payload = {
        "format": FORMAT_VERSION, "root": str(root.resolve()), "split": split, "layout": layout, "files": entries,
        **options,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def _decode(path: Path, header: ImageHeader, channels: int, notes: Dict[str, int]) -> np.ndarray:
    try:
        image = read_integer_image(path)
        pixels, note = match_channels(image, channels)
    except ImageError as error:
        raise FolderDatasetError(str(error)) from None
    if pixels.shape != (channels, header.height, header.width) or image.bits != header.bits:
        raise FolderDatasetError(
            f"{path}: decoded as {image.bits}-bit {tuple(image.pixels.shape)}, but its header said "
            f"{header.bits}-bit {(header.channels, header.height, header.width)}; "
            "was it changed while being read?"
        )
    if note:
        notes[note] = notes.get(note, 0) + 1
    return pixels


def _fill(out: np.ndarray, files, headers, grids, patch, channels: int, split: str, progress: bool) -> Dict[str, int]:
    """Decode image by image (peak memory: one image) and write its patches into ``out``."""
    notes: Dict[str, int] = {}
    index = 0
    bar = _progress(zip(files, headers, grids), len(files), f"reading {split} images", progress)
    for path, header, (rows, columns) in bar:
        if not rows or not columns:
            continue  # smaller than a patch: never decoded
        pixels = _decode(path, header, channels, notes)
        if patch is None:
            out[index] = pixels
            index += 1
            continue
        windows = np.lib.stride_tricks.sliding_window_view(pixels, (patch, patch), axis=(1, 2))
        for top in rows:
            block = windows[:, top, columns]  # (C, len(columns), P, P)
            out[index : index + len(columns)] = block.transpose(1, 0, 2, 3)
            index += len(columns)
    assert index == len(out), (index, len(out))
    return notes


def _reserve(path: str, size: int, cache_dir: Path) -> None:
    """Allocate the file's blocks now, so a full disk is an error here, not a SIGBUS later."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise FolderDatasetError(
                    f"{cache_dir}: not enough disk space for the patch cache ({size / 2**20:.1f} MiB)"
                ) from None
            if error.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise


def _write_cache(final: Path, shape, dtype, fill) -> None:
    """``fill(memmap)`` into a temporary file in the same folder, renamed to ``final`` when
    complete (:func:`~pyro_srvae.utils.io.atomic_path`: a normal file's mode, so a colleague
    sharing the cache can read it)."""
    created = not final.parent.exists()
    try:
        with atomic_path(final) as temporary:
            array = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=tuple(shape))
            _reserve(temporary, os.path.getsize(temporary), final.parent)
            fill(array)
            array.flush()
            del array
    except BaseException:  # KeyboardInterrupt too: nothing half written stays behind
        if created:
            try:
                final.parent.rmdir()
            except OSError:
                pass
        raise


def _open_cache(path: Path, shape, dtype) -> Optional[torch.Tensor]:
    """The cached patches as a tensor on a private map of the file; None if absent or unusable."""
    try:
        # "c": copy-on-write. The file is opened read-only and nothing written through the
        # tensor can reach it, while torch gets a writable buffer (a read-only one makes
        # from_numpy warn, and a write through it would crash the process).
        mapped = np.load(path, mmap_mode="c", allow_pickle=False)
    except FileNotFoundError:
        return None
    except Exception as error:  # a damaged cache is rebuilt, not fatal
        logger.warning("%s: unreadable patch cache, rebuilding it (%s)", path, error)
        return None
    if mapped.shape != tuple(shape) or mapped.dtype != np.dtype(dtype) or not mapped.flags.c_contiguous:
        logger.warning(
            "%s: patch cache of shape %s %s, expected %s %s; rebuilding it",
            path, mapped.shape, mapped.dtype, tuple(shape), np.dtype(dtype),
        )  # fmt: skip
        return None
    return mapped_tensor(mapped)


def load_folder(
    root: PathLike,
    split: str = "train",
    *,
    patch_size: Optional[int] = None,
    patch_stride: Optional[int] = None,
    test_fraction: float = 0.1,
    seed: int = 0,
    factor: int = 2,
    channels: Optional[int] = None,
    cache_dir: Optional[PathLike] = None,
    progress: bool = False,
) -> ImageDataset:
    """One split of the images under ``root`` as patches (see the module docstring).

    Args:
        root: the folder of images.
        split: ``"train"`` or ``"test"``.
        patch_size: side ``P`` of the square patches, a multiple of ``factor``; ``None``:
            whole images (all of one size).
        patch_stride: step of the patch grid (default ``P // 2``, at least 1).
        test_fraction: share of the images in the test split, when ``root`` has no
            ``train`` and ``test`` folders (at least one image either way).
        seed: seeds the split's hash.
        factor: the super-resolution factor patches and whole images must be multiples of.
        channels: force this channel count (default: the set's, grey and RGB mixing to RGB).
        cache_dir: where the patch cache lives (``None``: in memory, no file).
        progress: show progress bars on stderr while scanning and reading.

    Returns:
        ``ImageDataset(name="folder", split, images (N, C, P, P) uint8 or uint16, labels all 0,
        classes=("patch",), source=FolderSource(...))``; memory-mapped from the cache file
        when ``cache_dir`` is given.

    Raises:
        FolderDatasetError: bad options or images (one line, starting with the path concerned).
        DatasetNotFoundError: ``root`` missing, not a folder, or without images.
    """
    root = Path(root).expanduser()
    _check_options(root, split, patch_size, patch_stride, test_fraction, factor, channels)
    if not root.exists():
        raise DatasetNotFoundError(f"{root}: no such folder (the folder dataset reads the images under --data-dir)")
    if not root.is_dir():
        raise DatasetNotFoundError(f"{root}: not a folder (the folder dataset reads the images under --data-dir)")
    stride = None if patch_size is None else (patch_stride or max(1, patch_size // 2))
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None

    splits, layout = split_files(root, test_fraction, seed, cache)
    header_of, bits, channels, grids_of = _scan(root, splits, patch_size, stride, factor, channels, progress)
    files, grids = splits[split], grids_of[split]
    headers = [header_of[f] for f in files]
    counts = [len(rows) * len(columns) for rows, columns in grids]
    skipped = tuple(f.relative_to(root).as_posix() for f, n in zip(files, counts) if n == 0)
    if skipped:
        logger.warning(
            "%s: %d of %d %s images are smaller than %dx%d pixels and give no patches (%s%s)",
            root, len(skipped), len(files), split, patch_size, patch_size,
            skipped[0], ", ..." if len(skipped) > 1 else "",
        )
    if patch_size is None:
        shape = (len(files), channels, headers[0].height, headers[0].width)
    else:
        shape = (sum(counts), channels, patch_size, patch_size)
    dtype = np.uint8 if bits == 8 else np.uint16

    def fill(out):
        return _fill(out, files, headers, grids, patch_size, channels, split, progress)

    cache_file = None
    if cache is not None:
        options = dict(patch_size=patch_size, patch_stride=stride, channels=channels, bits=bits, factor=factor)
        cache_file = cache / f"folder-{split}-{_digest(root, split, layout, files, **options)}.npy"
    images, notes, from_cache = _patches(fill, shape, dtype, cache_file)
    if from_cache:
        logger.info("%s: %d %s patches from the cache %s", root, shape[0], split, cache_file)
    note_lines = tuple(f"{note}: {count} file{'s' if count != 1 else ''}" for note, count in sorted(notes.items()))
    for line in note_lines:
        logger.info("%s (%s): %s", root, split, line)

    source = FolderSource(
        root=root,
        split=split,
        layout=layout,
        files=tuple(f.relative_to(root).as_posix() for f in files),
        patches_per_file=tuple(counts),
        origins=_origins(grids),
        patch_size=patch_size,
        patch_stride=stride,
        channels=channels,
        bits=bits,
        skipped=skipped,
        cache_file=cache_file,
        from_cache=from_cache,
        notes=note_lines,
    )
    return ImageDataset(
        name="folder",
        split=split,
        images=images,
        labels=torch.zeros(shape[0], dtype=torch.int64),
        classes=("patch",),
        source=source,
    )


def _scan(root, splits, patch_size, stride, factor, channels, progress):
    """Every file's header; the set's bit depth and channels; each split's patch grids (checked)."""
    # Bit depth and channels are decided on both splits together, so train and test agree.
    every_file = sorted(splits["train"] + splits["test"], key=lambda p: p.relative_to(root).as_posix())
    header_of = dict(zip(every_file, _headers(every_file, progress)))
    every_header = [header_of[f] for f in every_file]
    bits = _set_bits(every_header)
    channels = _set_channels(every_header, channels)
    if patch_size is None:
        _check_whole_images(every_header, factor)
    grids_of = {}
    for name in SPLITS:
        headers = [header_of[f] for f in splits[name]]
        grids_of[name] = _grids(headers, patch_size, stride)
        if patch_size is not None:
            _check_patches(root, name, headers, grids_of[name], patch_size)
    return header_of, bits, channels, grids_of


def _patches(fill, shape, dtype, cache_file):
    """(images, notes, from_cache): filled in memory, or memory-mapped from the cache (written first if new)."""
    if cache_file is None:
        array = np.empty(shape, dtype)
        notes = fill(array)
        return torch.from_numpy(array), notes, False
    images = _open_cache(cache_file, shape, dtype)
    if images is not None:
        return images, {}, True
    written = {}
    try:
        _write_cache(cache_file, shape, dtype, lambda out: written.update(fill(out)))
    except OSError as error:  # the images' own errors arrive as FolderDatasetError
        raise FolderDatasetError(f"{cache_file.parent}: cannot write the patch cache ({error.strerror or error})") from None
    images = _open_cache(cache_file, shape, dtype)
    if images is None:
        raise FolderDatasetError(f"{cache_file}: the patch cache just written cannot be read back")
    return images, written, False

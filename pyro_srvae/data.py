"""Image datasets, dequantization and deterministic batching for srVAE training.

Datasets
--------
``fashion-mnist-mini``
    A class-balanced subset of Fashion-MNIST (1,000 train / 200 test images per
    class) shipped inside the package, so that examples and tests run offline.
    See ``pyro_srvae/datasets/README.md`` and ``scripts/build_fashion_mnist_mini.py``.
``fashion-mnist``, ``mnist``
    The original IDX files, read by a small reader in this module.  They are
    looked up both in torchvision's layout (``<data_dir>/FashionMNIST/raw/``,
    ``<data_dir>/MNIST/raw/``) and directly in ``data_dir``, gzipped or not.
``cifar10``
    The "python version" pickles (``data_batch_1`` .. ``data_batch_5``,
    ``test_batch``) in ``<data_dir>/cifar-10-batches-py/`` or in ``data_dir``
    itself.
``folder`` (:data:`FOLDER`)
    A user's own images (PNG, JPEG, TIFF, ``.npy``) under ``data_dir``, whole or cut
    into patches, split by image; see :mod:`pyro_srvae.folder`. It is not one of
    :data:`DATASETS` (the named sets); :data:`DATASET_NAMES` holds both.

Images are kept as integer tensors of shape ``(N, C, H, W)``: ``uint8`` (the named
sets) or ``uint16`` (16-bit folder images), the bit depth given by the dtype
(:func:`bit_depth`). Models see them through :func:`dequantize`, ``x = (k + u) / 2**bits``,
which is used for training *and* evaluation so that likelihoods (bits per dimension)
are those of a continuous density on ``[0, 1)`` and comparable with the literature.

Batching
--------
:func:`iterate_batches` yields index tensors for one epoch from a permutation
that depends only on ``(seed, epoch)``.  A run resumed from a checkpoint taken
after ``b`` batches of an epoch therefore continues with exactly the batches it
would have seen, and with ``world_size > 1`` every rank takes a disjoint slice of
the same global batches.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import math
import pickle
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "FOLDER",
    "IMAGE_SHAPES",
    "SPLITS",
    "DatasetNotFoundError",
    "ImageDataset",
    "load_dataset",
    "augment_dihedral",
    "dequantize",
    "band_statistics",
    "DeviceImages",
    "epoch_permutation",
    "iterate_batches",
    "num_batches",
    "validate_images",
    "bit_depth",
    "mapped_tensor",
    "read_idx",
]

PathLike = Union[str, Path]

#: The named datasets, with a fixed image shape and classes.
DATASETS = ("fashion-mnist-mini", "fashion-mnist", "mnist", "cifar10")
#: A folder of the user's own images (``data_dir``), read by :mod:`pyro_srvae.folder`.
FOLDER = "folder"
#: Every name :func:`load_dataset` accepts.
DATASET_NAMES = DATASETS + (FOLDER,)
SPLITS = ("train", "test")
#: Integer pixel types a dataset may hold, and their bit depths.
_PIXEL_BITS = {torch.uint8: 8, torch.uint16: 16}

#: Used when ``data_dir`` is None for the datasets that are not embedded.
DEFAULT_DATA_DIR = Path("data")

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Same class names as torchvision.datasets.MNIST.classes.
MNIST_CLASSES = (
    "0 - zero",
    "1 - one",
    "2 - two",
    "3 - three",
    "4 - four",
    "5 - five",
    "6 - six",
    "7 - seven",
    "8 - eight",
    "9 - nine",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# The embedded subset lives in a plain data folder of the package (not a
# subpackage), declared as package data in setup.cfg.
_EMBEDDED_DIR = "datasets"
_EMBEDDED_FILE = "fashion_mnist_mini.npz"

# IDX file names of one split; the same names are used by MNIST and Fashion-MNIST.
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Folder name under <data_dir> used by torchvision for each IDX dataset.
_TORCHVISION_FOLDER = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}

_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}

#: The (C, H, W) of each named dataset's images.
IMAGE_SHAPES = {
    "fashion-mnist-mini": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}
_CLASSES = {
    "fashion-mnist-mini": FASHION_MNIST_CLASSES,
    "fashion-mnist": FASHION_MNIST_CLASSES,
    "mnist": MNIST_CLASSES,
    "cifar10": CIFAR10_CLASSES,
}


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where they were looked for.

    The message is a single line naming the folders searched, the files
    expected and how to obtain them, so command-line tools can print it as is.
    """


# eq=False: a generated __eq__ would compare tensors with ``==`` and fail; datasets
# compare (and hash) by identity instead.
@dataclass(frozen=True, eq=False)
class ImageDataset:
    """One split of an image dataset.

    Attributes:
        name: canonical dataset name, one of :data:`DATASET_NAMES`.
        split: ``"train"`` or ``"test"``.
        images: ``uint8`` or ``uint16`` tensor of shape ``(N, C, H, W)``, in memory or (a
            cached folder set) memory-mapped, copy-on-write, from the cache file.
        labels: ``int64`` tensor of shape ``(N,)`` with values in ``[0, len(classes))``.
        classes: class names, indexed by label.
        source: for the ``folder`` set, a :class:`pyro_srvae.folder.FolderSource` (the
            files, the patches cut from each, the cache file); ``None`` for the named sets.
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple
    source: Optional[object] = None

    def __post_init__(self) -> None:
        validate_images(self.images, name=f"{self.name} ({self.split})")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"{self.name} ({self.split}): labels must be an int64 tensor of shape "
                f"({self.images.shape[0]},), got {self.labels.dtype} {tuple(self.labels.shape)}"
            )

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    @property
    def bits(self) -> int:
        """Bit depth of the pixels: 8 (``uint8``) or 16 (``uint16``)."""
        return bit_depth(self.images)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:  # the default repr would print whole tensors
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, size={len(self)}, "
            f"image_shape={self.image_shape}, classes={len(self.classes)})"
        )


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------


def bit_depth(images) -> int:
    """Bit depth of integer pixels from their dtype: 8 for uint8, 16 for uint16.

    Accepts a tensor, a numpy array or a dtype; anything else raises ``ValueError``.
    """
    dtype = getattr(images, "dtype", images)
    if isinstance(dtype, torch.dtype) and dtype in _PIXEL_BITS:
        return _PIXEL_BITS[dtype]
    try:
        numpy_dtype = np.dtype(dtype)
    except (TypeError, ValueError):
        numpy_dtype = None
    if numpy_dtype == np.uint8:
        return 8
    if numpy_dtype == np.uint16:
        return 16
    raise ValueError(f"pixels must be uint8 (8 bits) or uint16 (16 bits), got {dtype}")


def validate_images(
    images_uint8: torch.Tensor,
    expected_shape: Optional[Sequence[Optional[int]]] = None,
    name: str = "dataset",
) -> torch.Tensor:
    """Check that ``images_uint8`` is a ``uint8`` or ``uint16`` tensor of shape ``(N, C, H, W)``.

    Args:
        images_uint8: the tensor to check.
        expected_shape: optional ``(C, H, W)`` the images must have, or a full
            ``(N, C, H, W)`` shape; ``None`` entries match any size.
        name: what the images are, used in error messages.

    Returns:
        ``images_uint8`` unchanged, so the call can be used inline.

    Raises:
        ValueError: with a message saying what was expected and what was found.
    """
    if not isinstance(images_uint8, torch.Tensor):
        raise ValueError(
            f"{name}: images must be a torch.Tensor, got {type(images_uint8).__name__}"
        )
    if images_uint8.dtype not in _PIXEL_BITS:
        raise ValueError(
            f"{name}: images must have dtype torch.uint8 or torch.uint16 (raw pixel values "
            f"0..255 or 0..65535), got {images_uint8.dtype}"
        )
    if images_uint8.ndim != 4:
        raise ValueError(
            f"{name}: images must have 4 dimensions (N, C, H, W), "
            f"got {images_uint8.ndim} with shape {tuple(images_uint8.shape)}"
        )
    if expected_shape is not None:
        expected = tuple(expected_shape)
        if len(expected) not in (3, 4):
            raise ValueError(
                f"expected_shape must be (C, H, W) or (N, C, H, W), got {expected}"
            )
        actual = tuple(images_uint8.shape[-len(expected):])
        if any(e is not None and e != a for e, a in zip(expected, actual)):
            what = "(C, H, W)" if len(expected) == 3 else "(N, C, H, W)"
            raise ValueError(
                f"{name}: expected images of shape {what} = {expected}, "
                f"got {tuple(images_uint8.shape)}"
            )
    return images_uint8


def _check_choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(choices)}")
    return value


def _check_labels(labels: np.ndarray, num_images: int, num_classes: int, source: str) -> None:
    if labels.ndim != 1 or labels.shape[0] != num_images:
        raise ValueError(
            f"{source}: {num_images} images but labels of shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{source}: labels must lie in [0, {num_classes}), "
            f"found range [{labels.min()}, {labels.max()}]"
        )


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: Optional[PathLike] = None,
    download: bool = False,
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
    """Load one split of a dataset.

    Args:
        name: one of :data:`DATASET_NAMES`: a named set (:data:`DATASETS`) or ``"folder"``.
        split: ``"train"`` or ``"test"``.
        data_dir: where the files of non-embedded datasets are (default
            ``./data``); ignored for ``fashion-mnist-mini``; the folder of images
            (required) for ``"folder"``.
        download: if the files are missing, fetch them with torchvision into
            ``data_dir`` (needs internet).  Never used for the embedded set or a folder.
        patch_size, patch_stride, test_fraction, seed, factor, channels, cache_dir, progress:
            options of the ``"folder"`` set, passed to :func:`pyro_srvae.folder.load_folder`
            (see there); the named sets ignore them.

    Raises:
        ValueError: unknown name or split, or files that are not valid
            (:class:`pyro_srvae.folder.FolderDatasetError` for a folder).
        DatasetNotFoundError: the files are missing and ``download`` is False; a missing
            or empty folder.
    """
    _check_choice(name, DATASET_NAMES, "dataset")
    _check_choice(split, SPLITS, "split")

    if name == FOLDER:
        from .folder import load_folder  # lazy: folder imports this module

        if data_dir is None:
            raise DatasetNotFoundError(
                "the folder dataset needs data_dir (--data-dir DIR): the folder holding the images"
            )
        return load_folder(
            data_dir,
            split,
            patch_size=patch_size,
            patch_stride=patch_stride,
            test_fraction=test_fraction,
            seed=seed,
            factor=factor,
            channels=channels,
            cache_dir=cache_dir,
            progress=progress,
        )

    if name == "fashion-mnist-mini":
        images, labels = _load_embedded_mini(split)
    else:
        root = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR).expanduser()
        if name == "cifar10":
            images, labels = _load_cifar10(root, split, download)
        else:
            images, labels = _load_idx_dataset(name, root, split, download)

    source = f"{name} ({split})"
    validate_images(images, expected_shape=IMAGE_SHAPES[name], name=source)
    _check_labels(labels.numpy(), images.shape[0], len(_CLASSES[name]), source)
    return ImageDataset(
        name=name,
        split=split,
        images=images,
        labels=labels,
        classes=_CLASSES[name],
    )


def _load_embedded_mini(split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read the packaged ``fashion_mnist_mini.npz`` (no network, no data_dir)."""
    package_files = importlib.resources.files(__package__)
    resource = package_files.joinpath(_EMBEDDED_DIR).joinpath(_EMBEDDED_FILE)
    try:
        with resource.open("rb") as handle, np.load(handle, allow_pickle=False) as archive:
            images = archive[f"{split}_images"]
            labels = archive[f"{split}_labels"]
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(
            f"the embedded dataset file {_EMBEDDED_DIR}/{_EMBEDDED_FILE} is missing from the "
            f"pyro_srvae package; rebuild it with scripts/build_fashion_mnist_mini.py"
        ) from exc
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"{_EMBEDDED_FILE}: {split}_images must be uint8 of shape (N, 28, 28), "
            f"got {images.dtype} {images.shape}"
        )
    return (
        torch.from_numpy(images).unsqueeze(1).contiguous(),
        torch.from_numpy(labels.astype(np.int64)),
    )


# --- IDX (MNIST / Fashion-MNIST) --------------------------------------------

# Type codes of the IDX format (third byte of the magic number).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (as used by MNIST), gzipped or not.

    The format is a 4-byte magic number ``0x00 0x00 <type code> <ndim>``,
    ``ndim`` big-endian ``uint32`` dimension sizes, then the values in C order
    (big-endian for multi-byte types).  Whether the file is gzipped is decided
    from its first bytes, not its name.

    Returns:
        An array in native byte order with the shape given by the header.

    Raises:
        ValueError: naming the file, if it is not a valid, complete IDX file.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, ValueError) as exc:  # BadGzipFile is an OSError
            raise ValueError(f"{path}: corrupt or truncated gzip file ({exc})") from None

    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: not an IDX file (bad magic number 0x{raw[:4].hex()})"
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} of {header_size} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected_bytes = math.prod(shape) * dtype.itemsize
    actual_bytes = len(raw) - header_size
    if actual_bytes != expected_bytes:
        problem = "truncated" if actual_bytes < expected_bytes else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX file {problem}: header says shape {shape} "
            f"({expected_bytes} data bytes), file holds {actual_bytes}"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    # Copy into native byte order: the buffer is read-only and torch needs native order.
    return values.astype(dtype.newbyteorder("="), copy=True)


def _find_files(
    folders: Sequence[Path], file_names: Sequence[str], suffixes: Sequence[str]
) -> Tuple[dict, list]:
    """Locate each file in the first folder holding it (under any of ``suffixes``).

    Returns ``(found, missing)``: a dict file name -> path, and the names not found.
    """
    found, missing = {}, []
    for file_name in file_names:
        candidates = (folder / (file_name + suffix) for folder in folders for suffix in suffixes)
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            missing.append(file_name)
        else:
            found[file_name] = path
    return found, missing


def _not_found_message(
    name: str, split: str, folders: Sequence[Path], expected: Sequence[str], missing: Sequence[str]
) -> str:
    searched = " and ".join(str(f) for f in dict.fromkeys(folders))
    # Name the missing files only when some were found: otherwise it repeats the list.
    partial = f" (missing {', '.join(missing)})" if 0 < len(missing) < len(expected) else ""
    return (
        f"{name} ({split} split) not found: searched {searched} for "
        f"{', '.join(expected)}{partial}. Pass --download "
        f"(download=True) where internet is available, or --data-dir pointing at a folder "
        f"holding these files."
    )


def _torchvision_download(name: str, root: Path, split: str) -> None:
    """Fetch a dataset with torchvision; turn its failures into a one-line error."""
    import torchvision.datasets  # imported lazily: only needed for downloads

    dataset_class = {
        "fashion-mnist": torchvision.datasets.FashionMNIST,
        "mnist": torchvision.datasets.MNIST,
        "cifar10": torchvision.datasets.CIFAR10,
    }[name]
    try:
        dataset_class(root=str(root), train=(split == "train"), download=True)
    except Exception as exc:  # network errors come in many types (URLError, RuntimeError, ...)
        raise DatasetNotFoundError(
            f"downloading {name} into {root} with torchvision failed: "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _load_idx_dataset(
    name: str, root: Path, split: str, download: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    images_file, labels_file = _IDX_FILES[split]
    folders = [root / _TORCHVISION_FOLDER[name] / "raw", root]
    expected = [f"{images_file}[.gz]", f"{labels_file}[.gz]"]
    # Prefer the uncompressed file (torchvision keeps both after extracting).
    suffixes = ("", ".gz")

    found, missing = _find_files(folders, (images_file, labels_file), suffixes)
    if missing and download:
        _torchvision_download(name, root, split)
        found, missing = _find_files(folders, (images_file, labels_file), suffixes)
    if missing:
        raise DatasetNotFoundError(_not_found_message(name, split, folders, expected, missing))

    images = read_idx(found[images_file])
    labels = read_idx(found[labels_file])
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"{found[images_file]}: expected uint8 images of shape (N, H, W), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{found[labels_file]}: expected {images.shape[0]} labels to match "
            f"{found[images_file]}, got shape {labels.shape}"
        )
    return (
        torch.from_numpy(images).unsqueeze(1).contiguous(),
        torch.from_numpy(labels.astype(np.int64)),
    )


# --- CIFAR-10 -----------------------------------------------------------------

# Globals a CIFAR-10 batch pickle may refer to: numpy arrays and dtypes (also as
# written by newer pickle protocols).  Anything else is refused, since unpickling
# can otherwise run arbitrary code.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 batch pickle into ``(N, 3, 32, 32)`` uint8 images and labels.

    Each row of ``data`` holds 3072 bytes: the 1024 red values, then green, then
    blue, each a 32x32 image in row-major order, so a plain reshape gives CHW.
    """
    try:
        with open(path, "rb") as handle:
            # The original pickles come from Python 2; "bytes" keeps their str keys as bytes.
            batch = _CifarUnpickler(handle, encoding="bytes").load()
    except Exception as exc:
        raise ValueError(
            f"{path}: not a readable CIFAR-10 batch ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR-10 batch (a {type(batch).__name__}, not a dict)")

    def field(key: str):
        for candidate in (key.encode(), key):  # accept str keys too
            if candidate in batch:
                return batch[candidate]
        raise ValueError(f"{path}: CIFAR-10 batch has no {key!r} entry")

    data = np.asarray(field("data"))
    labels = np.asarray(field("labels"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(
            f"{path}: {data.shape[0]} images but {labels.shape} labels"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _load_cifar10(root: Path, split: str, download: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    file_names = _CIFAR10_FILES[split]
    # torchvision's layout first, then data_dir being the batches folder itself.
    folders = [root / _CIFAR10_FOLDER, root]

    def locate():
        # All batches of a split must come from the same folder.
        for folder in folders:
            if all((folder / f).is_file() for f in file_names):
                return folder
        return None

    folder = locate()
    if folder is None and download:
        _torchvision_download("cifar10", root, split)
        folder = locate()
    if folder is None:
        _, missing = _find_files(folders, file_names, ("",))
        raise DatasetNotFoundError(
            _not_found_message("cifar10", split, folders, file_names, missing)
        )

    batches = [_read_cifar_batch(folder / f) for f in file_names]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return torch.from_numpy(images), torch.from_numpy(labels)


# ----------------------------------------------------------------------------
# Dequantization
# ----------------------------------------------------------------------------


# Memory maps wrapped by mapped_tensor(), as weak references: torch.from_numpy keeps the
# array alive as long as any tensor on it lives, so a live entry is never a stale address.
_FILE_MAPS: List["weakref.ref[np.ndarray]"] = []


def mapped_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor on a memory-mapped numpy array, known to :class:`DeviceImages` as file-backed.

    The array should be writable, e.g. ``np.load(path, mmap_mode="c")`` (a private,
    copy-on-write map: torch needs no warning, and nothing written through the tensor
    reaches the file); :class:`DeviceImages` then indexes it in place instead of copying
    the whole set into (pinned) RAM.
    """
    tensor = torch.from_numpy(array)
    _FILE_MAPS[:] = [ref for ref in _FILE_MAPS if ref() is not None]
    _FILE_MAPS.append(weakref.ref(array))
    return tensor


def _file_backed(images: torch.Tensor) -> bool:
    """Whether ``images`` lies in a memory-mapped file rather than in RAM."""
    try:
        storage = images.untyped_storage()
        if getattr(storage, "filename", None) is not None:  # torch.from_file(shared=True)
            return True
        pointer = storage.data_ptr()
    except (AttributeError, RuntimeError):
        return False
    for ref in _FILE_MAPS:
        array = ref()
        if array is not None and array.ctypes.data <= pointer < array.ctypes.data + max(array.nbytes, 1):
            return True
    return False


class DeviceImages:
    """uint8 / uint16 images served batch by batch on ``device``, with as little copying as possible.

    * Resident (the CPU, or a set that fits in ``max_fraction`` of the GPU's free memory,
      e.g. all of Fashion-MNIST or CIFAR-10 at ~47 / ~150 MB): the whole set is copied to
      the device once, as integers (4x or 2x smaller than floats), and a batch is an index
      on the device -- no host-to-device transfer per step. On the CPU nothing is copied:
      a memory-mapped folder cache is indexed where it lies, so a set larger than RAM
      is read batch by batch through the page cache.
    * Streamed (a set too large for the GPU): the set stays in page-locked (pinned) host
      memory -- or, memory-mapped from a file, where it is (pinning would read it all into
      RAM); each batch is gathered into one of two pinned staging buffers and copied
      with ``non_blocking=True``, so the copy overlaps the GPU's work on the step before.
      A CUDA event recorded after each copy guards its buffer from being overwritten
      before the copy has finished.

    ``resident`` forces one mode (``None``: decide from the size).
    """

    def __init__(self, images: torch.Tensor, device, max_fraction: float = 0.5, resident: Optional[bool] = None):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        if resident is None:
            resident = not cuda or images.nbytes <= max_fraction * torch.cuda.mem_get_info(self.device)[0]
        self.resident = bool(resident)
        self._pinned = cuda and not self.resident  # the staging buffers are pinned
        if self.resident:
            self.images = images.to(self.device)
        else:
            self.images = images.pin_memory() if self._pinned and not _file_backed(images) else images
        self._staging: List[Optional[torch.Tensor]] = [None, None]
        self._copied: List[Optional[object]] = [None, None]
        self._slot = 0

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """``images[indices]`` on the device (``indices``: a 1-D integer tensor)."""
        if self.resident:
            return self.images[indices.to(self.device, non_blocking=True)]
        slot, self._slot = self._slot, 1 - self._slot
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()  # the copy that last read this buffer is done
        shape = (len(indices),) + tuple(self.images.shape[1:])
        buffer = self._staging[slot]
        if buffer is None or tuple(buffer.shape) != shape:
            buffer = torch.empty(shape, dtype=self.images.dtype, pin_memory=self._pinned)
            self._staging[slot] = buffer
        torch.index_select(self.images, 0, indices.cpu(), out=buffer)
        if not self._pinned:
            return buffer.to(self.device, copy=True)
        batch = buffer.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._copied[slot] = event
        return batch


def augment_dihedral(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Each image of ``x`` ``(B, C, H, W)`` under its own random symmetry of the square (``--augment``).

    Three fair coins per image -- flip left-right, flip up-down, transpose -- compose to each of
    the 8 flips and quarter turns with probability 1/8. Non-square images get the two flips only
    (a quarter turn would change their shape). The downscaling A commutes with all of them
    (a block of a flipped image is the flipped block), so y = A x stays the low-resolution copy
    of the augmented x. Draws from ``generator`` or torch's RNG on ``x``'s device.
    """
    batch = x.shape[0]
    device = generator.device if generator is not None else x.device

    def coin():
        return (torch.rand(batch, generator=generator, device=device) < 0.5).to(x.device).view(batch, 1, 1, 1)

    x = torch.where(coin(), x.flip(-1), x)
    x = torch.where(coin(), x.flip(-2), x)
    if x.shape[-1] == x.shape[-2]:
        x = torch.where(coin(), x.transpose(-1, -2), x)
    return x


def dequantize(
    images_uint8: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Uniform dequantization: ``x = (k + u) / 2**bits`` with ``u ~ Uniform[0, 1)``.

    The bit depth follows the dtype: ``uint8`` pixels ``k`` in ``0..255`` become
    ``(k + u) / 256``, ``uint16`` pixels in ``0..65535`` become ``(k + u) / 65536``:
    ``float32`` values in ``[k / 2**bits, (k + 1) / 2**bits)``, so a continuous density
    on ``[0, 1)`` lower-bounds the discrete likelihood.  Used for training and
    evaluation alike.

    Args:
        images_uint8: ``uint8`` or ``uint16`` tensor of any shape.
        generator: optional source of the noise; it may live on another device
            than the images (the noise is then moved).

    Returns:
        A ``float32`` tensor of the same shape on the images' device.
        ``floor(2**bits x)`` always gives back ``k`` (and ``x < 1``). At 16 bits the
        noise is resolved to 1/256 of a level for ``k >= 32768`` (float32 has 24
        significant bits), still uniform on that grid.
    """
    if not isinstance(images_uint8, torch.Tensor) or images_uint8.dtype not in _PIXEL_BITS:
        found = images_uint8.dtype if isinstance(images_uint8, torch.Tensor) else type(images_uint8)
        raise ValueError(f"dequantize expects a uint8 or uint16 tensor of raw pixel values, got {found}")
    levels = float(2 ** _PIXEL_BITS[images_uint8.dtype])
    noise_device = generator.device if generator is not None else images_uint8.device
    noise = torch.rand(
        images_uint8.shape, generator=generator, dtype=torch.float32, device=noise_device
    ).to(images_uint8.device)
    pixels = images_uint8.to(torch.float32)
    # k + u is rounded to float32; for u within half an ulp of 1 it becomes k + 1,
    # which would leave the bin (and reach 1.0 for the top level).  Keep it below k + 1.
    summed = torch.minimum(pixels + noise, torch.nextafter(pixels + 1, pixels))
    return summed / levels  # exact: division by a power of two


#: Pixels per chunk of :func:`band_statistics` (a float64 copy of one chunk: 128 MiB).
STATISTICS_CHUNK_PIXELS = 1 << 24


def band_statistics(
    images: torch.Tensor, chunk_pixels: int = STATISTICS_CHUNK_PIXELS
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-band mean and standard deviation of the dequantized images ``x = (k + U) / 2**bits``.

    ``images``: ``uint8`` or ``uint16`` ``(N, C, H, W)``, in memory or memory-mapped. Exact in the
    dequantization noise rather than estimated from one draw of it: with U ~ U[0, 1) independent
    of k, ``E[x] = (E[k] + 1/2) / L`` and ``Var[x] = (Var[k] + 1/12) / L^2`` (``L = 2**bits``; E and
    Var over every pixel of the band in the set), so no random number is drawn. The images are
    read a chunk at a time (a folder's cache is never copied whole), and the chunks' means and
    sums of squared deviations are merged in float64 (Chan, Golub & LeVeque 1979).

    Returns ``(mean, std)``, two float64 tensors of shape ``(C,)``, in x's units on [0, 1].
    """
    levels = float(2 ** bit_depth(images))
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"band_statistics needs a non-empty (N, C, H, W) set, got shape {tuple(images.shape)}")
    per_image = images[0].numel()
    step = max(1, chunk_pixels // per_image)
    bands = images.shape[1]
    count, mean, squares = 0, torch.zeros(bands, dtype=torch.float64), torch.zeros(bands, dtype=torch.float64)
    for start in range(0, images.shape[0], step):
        chunk = images[start : start + step].to(torch.float64).transpose(0, 1).reshape(bands, -1)
        chunk_count, chunk_mean = chunk.shape[1], chunk.mean(dim=1)
        chunk_squares = (chunk - chunk_mean[:, None]).square().sum(dim=1)
        total = count + chunk_count
        delta = chunk_mean - mean
        squares = squares + chunk_squares + delta.square() * (count * chunk_count / total)
        mean = mean + delta * (chunk_count / total)
        count = total
    variance = squares / count  # of k, over the set
    return (mean + 0.5) / levels, torch.sqrt(variance + 1.0 / 12.0) / levels


# ----------------------------------------------------------------------------
# Deterministic batching
# ----------------------------------------------------------------------------


def _epoch_generator_seed(seed: int, epoch: int) -> int:
    """Mix ``(seed, epoch)`` into one generator seed.

    torch's CPU generator only uses the low 32 bits of its seed, so simple
    arithmetic such as ``seed * 2**32 + epoch`` would lose the seed; hashing
    makes every bit of both numbers count.
    """
    digest = hashlib.blake2b(f"{int(seed)}:{int(epoch)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``range(num_items)`` used in ``epoch`` of a run seeded ``seed``.

    It uses a private :class:`torch.Generator`, so it neither depends on nor
    changes the global RNG state.  Returns an ``int64`` CPU tensor.
    """
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(_epoch_generator_seed(seed, epoch))
    return torch.randperm(num_items, generator=generator, dtype=torch.int64)


def num_batches(
    num_items: int, batch_size: int, drop_last: bool = False, world_size: int = 1
) -> int:
    """Number of batches per epoch on each rank (the same on every rank).

    A global batch holds ``batch_size * world_size`` items; with ``drop_last``
    an incomplete last global batch is dropped, otherwise it is kept.
    """
    _check_batching_args(num_items, batch_size, world_size)
    global_batch = batch_size * world_size
    if drop_last:
        return num_items // global_batch
    return -(-num_items // global_batch)  # ceiling division


def iterate_batches(
    num_items: int,
    batch_size: int,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """Yield the ``int64`` index tensors of one epoch, from batch ``start_batch`` on.

    Global batch ``b`` is ``order[b*G:(b+1)*G]`` with ``G = batch_size * world_size``
    and ``order`` = :func:`epoch_permutation` (or ``arange`` without ``shuffle``);
    rank ``r`` takes items ``[r*batch_size, (r+1)*batch_size)`` of it, so the ranks'
    batches are disjoint and together make up the global batch.  An incomplete
    last global batch (kept unless ``drop_last``) is split as evenly as possible
    over the ranks, so some may get an empty tensor when fewer items than ranks
    remain.  Every rank gets :func:`num_batches` batches in all.

    ``start_batch`` skips the first batches, so a run resumed after ``b`` batches
    of an epoch passes ``start_batch=b`` and sees exactly the rest of the epoch.
    Arguments are checked when this is called, not on the first ``next()``.
    """
    total = num_batches(num_items, batch_size, drop_last=drop_last, world_size=world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    if not 0 <= start_batch <= total:
        raise ValueError(
            f"start_batch must lie in [0, {total}] for {num_items} items in batches of "
            f"{batch_size} x {world_size} rank(s), got {start_batch}"
        )
    if shuffle:
        order = epoch_permutation(num_items, seed, epoch)
    else:
        order = torch.arange(num_items, dtype=torch.int64)
    return _batches(order, batch_size, world_size, rank, start_batch, total)


def _batches(
    order: torch.Tensor, batch_size: int, world_size: int, rank: int, start: int, stop: int
) -> Iterator[torch.Tensor]:
    global_batch = batch_size * world_size
    for index in range(start, stop):
        chunk = order[index * global_batch:(index + 1) * global_batch]
        if len(chunk) == global_batch:
            yield chunk[rank * batch_size:(rank + 1) * batch_size].clone()
        else:
            yield torch.tensor_split(chunk, world_size)[rank].clone()


def _check_batching_args(num_items: int, batch_size: int, world_size: int) -> None:
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")

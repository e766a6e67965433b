"""Image datasets, dequantization and deterministic batching for srVAE training.

Datasets
--------
``fashion-mnist-mini``
    A class-balanced subset of Fashion-MNIST (1,000 train / 200 test images per
    class) shipped inside the package, so that examples and tests run offline.
    See ``pyro_srvae/data/embedded/README.md`` and ``scripts/build_fashion_mnist_mini.py``.
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
    into patches, split by image; see :mod:`pyro_srvae.data.folder`. It is not one of
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
import inspect
import importlib.resources
import math
import pickle
from pathlib import Path
from typing import Optional, Sequence, Tuple
import numpy as np
import torch

from .folder import load_folder
from .image_dataset import (
    DatasetNotFoundError,
    ImageDataset,
    PathLike,
    SPLITS,
    check_choice,
    check_labels,
    validate_images,
)


#: The named datasets, with a fixed image shape and classes.
DATASETS = ("fashion-mnist-mini", "fashion-mnist", "mnist", "cifar10")

#: A folder of the user's own images (``data_dir``), read by :mod:`pyro_srvae.data.folder`.
FOLDER = "folder"

#: Every name :func:`load_dataset` accepts.
DATASET_NAMES = DATASETS + (FOLDER,)

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
_EMBEDDED_DIR = "embedded"

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


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: Optional[PathLike] = None,
    download: bool = False,
    **folder_options,
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
        folder_options: keyword options of the ``"folder"`` set (``patch_size``, ``patch_stride``,
            ``test_fraction``, ``seed``, ``factor``, ``channels``, ``cache_dir``, ``progress``), passed to
            :func:`pyro_srvae.data.folder.load_folder` (see there); the named sets ignore them.

    Raises:
        ValueError: unknown name or split, or files that are not valid
            (:class:`pyro_srvae.data.folder.FolderDatasetError` for a folder).
        DatasetNotFoundError: the files are missing and ``download`` is False; a missing
            or empty folder.
    """
    check_choice(name, DATASET_NAMES, "dataset")
    check_choice(split, SPLITS, "split")
    inspect.signature(load_folder).bind(data_dir, split, **folder_options)  # a TypeError names an unknown option
    if name == FOLDER:
        if data_dir is None:
            raise DatasetNotFoundError(
                "the folder dataset needs data_dir (--data-dir DIR): the folder holding the images"
            )
        return load_folder(data_dir, split, **folder_options)

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
    check_labels(labels.numpy(), images.shape[0], len(_CLASSES[name]), source)
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
            f"the embedded dataset file data/{_EMBEDDED_DIR}/{_EMBEDDED_FILE} is missing from the "
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

"""``ImageDataset``: integer images with their bit depth and labels, and the checks every source passes."""

from __future__ import annotations
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union
import numpy as np
import torch


PathLike = Union[str, Path]

SPLITS = ("train", "test")

#: Integer pixel types a dataset may hold, and their bit depths.
PIXEL_BITS = {torch.uint8: 8, torch.uint16: 16}


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
        source: for the ``folder`` set, a :class:`pyro_srvae.data.folder.FolderSource` (the
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
    if isinstance(dtype, torch.dtype) and dtype in PIXEL_BITS:
        return PIXEL_BITS[dtype]
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
    if images_uint8.dtype not in PIXEL_BITS:
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


def check_choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(choices)}")
    return value


def check_labels(labels: np.ndarray, num_images: int, num_classes: int, source: str) -> None:
    if labels.ndim != 1 or labels.shape[0] != num_images:
        raise ValueError(
            f"{source}: {num_images} images but labels of shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{source}: labels must lie in [0, {num_classes}), "
            f"found range [{labels.min()}, {labels.max()}]"
        )

"""Batching: images on a device, dihedral augmentation, dequantization, per-band statistics and epoch permutations."""

from __future__ import annotations
import hashlib
import weakref
from typing import Iterator, List, Optional, Tuple
import numpy as np
import torch

from .image_dataset import PIXEL_BITS, bit_depth


# ----------------------------------------------------------------------------
# Images on a device (or memory-mapped), their symmetries, and dequantization
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


def dihedral_view(image: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the square's 8 symmetries (k quarter turns, then a left-right flip for k >= 4)."""
    turned = torch.rot90(image, k % 4, dims=(-2, -1))
    return torch.flip(turned, dims=(-1,)) if k >= 4 else turned


def undo_dihedral_view(image: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of :func:`dihedral_view` with the same ``k``."""
    unflipped = torch.flip(image, dims=(-1,)) if k >= 4 else image
    return torch.rot90(unflipped, -(k % 4), dims=(-2, -1))


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
    if not isinstance(images_uint8, torch.Tensor) or images_uint8.dtype not in PIXEL_BITS:
        found = images_uint8.dtype if isinstance(images_uint8, torch.Tensor) else type(images_uint8)
        raise ValueError(f"dequantize expects a uint8 or uint16 tensor of raw pixel values, got {found}")
    levels = float(2 ** PIXEL_BITS[images_uint8.dtype])
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

"""Super-resolving one image in overlapping tiles, over dihedral views, with draws from the SR predictive."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyro
import torch

from ..data.batching import dihedral_view, undo_dihedral_view
from ..model.image_model import SuperResolution
from ..utils.devices import model_device, resolve_device
from ..utils.seeds import derive_seed

DEFAULT_SAMPLES = 16


class SuperResolveError(ValueError):
    """Inputs that cannot be super-resolved: one one-line message per problem in ``messages``."""

    def __init__(self, messages):
        self.messages = [messages] if isinstance(messages, str) else list(messages)
        if len(self.messages) == 1:
            text = self.messages[0]
        else:
            text = f"{len(self.messages)} inputs cannot be used: " + "; ".join(self.messages)
        super().__init__(text)


@dataclass
class SuperResolvedImage:
    """The result for one input file.

    ``mean``, ``std`` (the total predictive std), ``std_latent`` and ``std_noise`` (its
    parts, ``std^2 ~= std_latent^2 + std_noise^2``) are float32 ``(C, f*H, f*W)``
    (``mean`` on the [0, 1] scale of the input but unclipped: it may leave [0, 1] slightly),
    ``samples`` ``(S, C, f*H, f*W)`` (all ``None`` with ``return_arrays=False``);
    ``files`` maps the keys of :data:`OUTPUT_SUFFIXES` to the written paths (empty when
    nothing was written); ``note`` says how the image's channels were converted, if they were;
    ``bits`` is the input's stored bit depth (8 or 16; ``None`` for float input);
    ``lower`` and ``upper`` the certified RCPS interval ``mean -+ lambda_hat * std`` (``None``
    when the checkpoint holds none that applies, or with ``return_arrays=False``).
    """

    input: Path
    mean: Optional[np.ndarray]
    std: Optional[np.ndarray]
    samples: Optional[np.ndarray]
    files: Dict[str, Path] = field(default_factory=dict)
    note: Optional[str] = None
    std_latent: Optional[np.ndarray] = None
    std_noise: Optional[np.ndarray] = None
    bits: Optional[int] = None
    lower: Optional[np.ndarray] = None
    upper: Optional[np.ndarray] = None


# --------------------------------------------------------------------------- #
# Tiling and blending
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class AxisPlan:
    """Tiles along one axis, in low-resolution pixels of the padded image."""

    length: int  # of the image
    tile: int
    stride: int
    pad_before: int
    padded: int  # length after padding
    starts: Tuple[int, ...]

    @property
    def pad_after(self):
        return self.padded - self.length - self.pad_before


def plan_axis(length: int, tile: int, overlap: int) -> AxisPlan:
    """A regular grid of ``tile``-long windows overlapping by ``overlap``, covering ``length`` pixels.

    The image is padded by ``overlap // 2`` on both sides, then (evenly) up to the
    smallest grid that covers it; with ``overlap=0`` and a multiple of ``tile``
    there is no padding at all.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, {tile - 1}] for tiles of {tile} pixels, got {overlap}")
    stride = tile - overlap
    span = length + 2 * (overlap // 2)
    count = 1 if span <= tile else math.ceil((span - tile) / stride) + 1
    padded = (count - 1) * stride + tile
    return AxisPlan(length, tile, stride, (padded - length) // 2, padded, tuple(k * stride for k in range(count)))


def tile_window(size: int) -> torch.Tensor:
    """The raised-cosine blending weights ``sin^2(pi (i + 1/2) / size)``: positive, peaked mid-tile."""
    i = torch.arange(size, dtype=torch.float64)
    return torch.sin(math.pi * (i + 0.5) / size) ** 2


def _blend_weights(plan: AxisPlan, factor: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per tile, ``(w, v)`` along one high-resolution axis, constant over each ``factor`` block.

    ``w`` is the tile's low-resolution window divided by the sum of all windows at that
    pixel (``sum_i w_i = 1``); ``v = w / sqrt(sum_j w_j^2)`` (``sum_i v_i^2 = 1``). Both are
    computed on the low-resolution grid and repeated ``factor`` times, so that every
    ``factor x factor`` block of the output gets one weight per tile. A pixel covered by
    one tile gets ``w = v = 1`` exactly. The 2-D weights are the outer products of the
    two axes' (sums and sums of squares over a grid of tiles factorise by axis).
    """
    window = tile_window(plan.tile)
    total = torch.zeros(plan.padded, dtype=torch.float64)
    for start in plan.starts:
        total[start : start + plan.tile] += window
    normalised = [window / total[s : s + plan.tile] for s in plan.starts]
    squares = torch.zeros(plan.padded, dtype=torch.float64)
    for start, w in zip(plan.starts, normalised):
        squares[start : start + plan.tile] += w.square()
    pairs = []
    for start, w in zip(plan.starts, normalised):
        v = w / squares[start : start + plan.tile].sqrt()
        pairs.append((w.repeat_interleave(factor).float(), v.repeat_interleave(factor).float()))
    return pairs


def _reflect_indices(length: int, before: int, after: int) -> torch.Tensor:
    """Indices that pad ``length`` pixels by reflection (any width; edge copy for one pixel)."""
    index = torch.arange(-before, length + after)
    if length == 1:
        return torch.zeros_like(index)
    period = 2 * (length - 1)
    index = index.remainder(period)
    return torch.where(index < length, index, period - index)


def _as_image_tensor(y, channels):
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(y)
    if not torch.is_tensor(y):
        raise TypeError(f"y must be a tensor or array (C, H, W) or (H, W), got {type(y).__name__}")
    if y.dim() == 2:
        y = y.unsqueeze(0)
    if y.dim() != 3:
        raise ValueError(f"y must have shape (C, H, W) or (H, W), got {tuple(y.shape)}")
    if not y.is_floating_point():
        raise ValueError(f"y must hold floats in [0, 1], got dtype {y.dtype}")
    if y.shape[0] != channels:
        raise ValueError(f"y has {y.shape[0]} channel(s), the model takes {channels}")
    if y.numel():
        low, high = (v.item() for v in torch.aminmax(y.detach()))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("y contains NaN or infinite values")
        if low < 0.0 or high > 1.0:
            raise ValueError(f"y must have values in [0, 1], got [{low:.4g}, {high:.4g}]")
    return y.detach().float()


def _sample_statistics(samples: torch.Tensor):
    """Mean and unbiased std (``correction=1``) over dim 0, computed around the first draw.

    Shifting by draw 0 makes both exact when all draws are equal: the mean is the draw
    and the std is 0, not a rounding residue. One draw at a time bounds the memory. A
    single draw has std 0 (as :meth:`pyro_srvae.SRVAE.super_resolve`).
    """
    first = samples[0]
    shift = torch.zeros_like(first)
    for draw in samples:
        shift += draw - first
    shift /= samples.shape[0]
    var = torch.zeros_like(first)
    if samples.shape[0] > 1:
        for draw in samples:
            var += (draw - first - shift) ** 2
        var /= samples.shape[0] - 1
    return first + shift, var.sqrt()


#: The dihedral views of an image, in the order ``views=V`` takes the first V: quarter turns,
#: then the same after a left-right flip.
MAX_VIEWS = 8


def default_views(model) -> int:
    """8 for a model trained on flipped and turned images (``--augment``), else 1."""
    return int(getattr(model, "default_views", 1))


@torch.no_grad()
def superresolve_image(
    model,
    y,
    num_samples=DEFAULT_SAMPLES,
    *,
    overlap=None,
    seed=0,
    tile_batch=None,
    device=None,
    observation_noise=True,
    views=None,
):
    """Super-resolve one low-resolution image ``y`` of any size with an :class:`~pyro_srvae.SRVAE`.

    With ``views=V > 1`` the predictive is the equal mixture of the model's predictives for
    V flipped and turned copies of y (each turned back): draw s comes from view ``s mod V``,
    the mean is the average of all draws' decoder means (the mixture's mean: the
    "self-ensemble" of Lim et al., CVPR workshops 2017), and ``std_latent`` then also holds
    the spread between views. Each view is a valid predictive only for a model trained on
    flipped and turned images, so the default is :func:`default_views` (8 after
    ``--augment``, else 1). Every view of a consistent model keeps the block means y. The draw
    count per view differs by one at most (``num_samples`` not a multiple of V weighs the
    views by their draws); ``V`` is capped at ``num_samples`` and at 8.
    
    Args:
        model: a trained SRVAE (any object with ``lr_shape``, ``factor`` and
            ``super_resolve(y, num_samples, observation_noise=...)`` returning a
            :class:`~pyro_srvae.SuperResolution`).
        y: float tensor or array ``(C, H, W)`` (or ``(H, W)``) with values in [0, 1],
            ``C`` the model's channels and ``H, W >= model.factor``.
        num_samples: draws of x per tile (all blended per draw).
        overlap: overlap of neighbouring tiles in low-resolution pixels, an int or an
            ``(h, w)`` pair; default half a tile. ``0``: plain non-overlapping tiles.
        seed: seeds the latent draws (inside ``fork_rng``); ``None`` draws from the
            global RNG as it stands.
        tile_batch: tiles per network call (each with ``num_samples`` draws); default
            ``256 // num_samples`` on a CPU, ``8192 // num_samples`` on a GPU (at least 1).
        device: where to compute (default: the model's device); the model is moved there.
        observation_noise: passed to ``model.super_resolve``: ``True`` (default) draws
            the full predictive, the likelihood's noise included; ``False`` takes the
            decoder means as the draws (then ``std == std_latent`` and ``std_noise == 0``).
        views: how many dihedral views of y to mix (above), 1 to 8; default
            :func:`default_views`.

    Returns a :class:`~pyro_srvae.SuperResolution` of CPU tensors: ``mean``, ``std``,
    ``std_latent``, ``std_noise`` ``(C, f*H, f*W)``, ``samples`` and ``means``
    ``(S, C, f*H, f*W)``; blended as described in the module docstring, so that each
    draw has at every pixel the variance of one tile's draw.
    """
    model = check_sr_model(model)
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    num_samples = int(num_samples)
    views = default_views(model) if views is None else views
    if isinstance(views, bool) or int(views) != views or not 1 <= views <= MAX_VIEWS:
        raise ValueError(f"views must be an integer from 1 to {MAX_VIEWS}, got {views!r}")
    views = min(int(views), num_samples)
    options = dict(overlap=overlap, tile_batch=tile_batch, device=device, observation_noise=observation_noise)
    if views == 1:
        return _superresolve_view(model, y, num_samples, seed=seed, **options)
    y = _as_image_tensor(y, model.lr_shape[0])
    parts = []
    for k in range(views):
        count = len(range(k, num_samples, views))
        view_seed = None if seed is None else derive_seed(seed, "view", k) if k else seed
        sr = _superresolve_view(model, dihedral_view(y, k), count, seed=view_seed, **options)
        parts.append((count, SuperResolution(*(undo_dihedral_view(t, k) for t in sr))))
    samples = torch.cat([sr.samples for _, sr in parts])
    means = torch.cat([sr.means for _, sr in parts])
    mean, std_latent = _sample_statistics(means)
    _, std = _sample_statistics(samples)
    noise_variance = sum(count * sr.std_noise.square() for count, sr in parts) / num_samples
    return SuperResolution(mean=mean, std=std, samples=samples, std_latent=std_latent,
                           std_noise=noise_variance.sqrt(), means=means)  # fmt: skip


def _superresolve_view(model, y, num_samples, *, overlap, seed, tile_batch, device, observation_noise):
    """:func:`superresolve_image` of one view: the tiled predictive itself."""
    channels, tile_h, tile_w = model.lr_shape
    factor = model.factor
    y, plan_h, plan_w = _tile_plans(model, y, overlap)
    _, height, width = y.shape
    device = resolve_device(device) or model_device(model)
    if tile_batch is None:
        # About 256 tile draws per network call on a CPU (larger batches fall out of the
        # caches), 8192 on a GPU.
        tile_batch = max(1, (8192 if device.type == "cuda" else 256) // num_samples)
    if int(tile_batch) < 1:
        raise ValueError(f"tile_batch must be a positive integer, got {tile_batch!r}")
    if hasattr(model, "to"):
        model.to(device)
    rows = _reflect_indices(height, plan_h.pad_before, plan_h.pad_after).to(device)
    cols = _reflect_indices(width, plan_w.pad_before, plan_w.pad_after).to(device)
    padded = y.to(device)[:, rows][:, :, cols]
    weights_h = [(w.to(device), v.to(device)) for w, v in _blend_weights(plan_h, factor)]
    weights_w = [(w.to(device), v.to(device)) for w, v in _blend_weights(plan_w, factor)]
    hr_h, hr_w = tile_h * factor, tile_w * factor
    canvas_shape = (channels, plan_h.padded * factor, plan_w.padded * factor)
    # out_s = sum_i v_i X_{i,s} + sum_i (w_i - v_i) m_i  (= M + sum_i v_i (X_{i,s} - m_i)),
    # for the draws (X = samples) and for the decoder means (X = means); base holds the
    # second sum, shared by both. Written this way a pixel covered by one tile
    # (w = v = 1) is that tile's draw exactly, and equal draws give equal blends.
    samples_canvas = torch.zeros((num_samples, *canvas_shape), device=device)
    means_canvas = torch.zeros((num_samples, *canvas_shape), device=device)
    base = torch.zeros(canvas_shape, device=device)
    noise_variance = torch.zeros(canvas_shape, device=device)
    tiles = [(a, b) for a in range(len(plan_h.starts)) for b in range(len(plan_w.starts))]  # row-major

    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    was_training = getattr(model, "training", None)
    if hasattr(model, "eval"):
        model.eval()
    try:
        # A private param store: pyro.module inside super_resolve must not meet (or leave)
        # another model's parameters under the same name in the caller's store.
        with pyro.get_param_store().scope(), torch.random.fork_rng(devices=cuda, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for first in range(0, len(tiles), int(tile_batch)):
                chunk = tiles[first : first + int(tile_batch)]
                batch = torch.stack(
                    [
                        padded[:, plan_h.starts[a] : plan_h.starts[a] + tile_h, plan_w.starts[b] : plan_w.starts[b] + tile_w]
                        for a, b in chunk
                    ]
                )
                sr = model.super_resolve(batch, num_samples=num_samples, observation_noise=observation_noise)
                for k, (a, b) in enumerate(chunk):
                    top, left = plan_h.starts[a] * factor, plan_w.starts[b] * factor
                    where = (slice(None), slice(top, top + hr_h), slice(left, left + hr_w))
                    (w_h, v_h), (w_w, v_w) = weights_h[a], weights_w[b]
                    w, v = w_h[:, None] * w_w[None, :], v_h[:, None] * v_w[None, :]
                    samples_canvas[(slice(None), *where)] += sr.samples[:, k] * v
                    means_canvas[(slice(None), *where)] += sr.means[:, k] * v
                    base[where] += sr.mean[k] * (w - v)
                    noise_variance[where] += sr.std_noise[k].square() * v.square()
    finally:
        if was_training is not None and hasattr(model, "train"):
            model.train(was_training)

    top, left = plan_h.pad_before * factor, plan_w.pad_before * factor
    crop = (slice(None), slice(top, top + height * factor), slice(left, left + width * factor))
    samples = samples_canvas[(slice(None), *crop)] + base[crop]
    means = means_canvas[(slice(None), *crop)] + base[crop]
    mean, std_latent = _sample_statistics(means)
    _, std = _sample_statistics(samples)
    return SuperResolution(
        mean=mean.cpu(),
        std=std.cpu(),
        samples=samples.cpu().contiguous(),
        std_latent=std_latent.cpu(),
        std_noise=noise_variance[crop].sqrt().cpu(),
        means=means.cpu().contiguous(),
    )



def _tile_plans(model, y, overlap):
    """``y`` as a (C, h, w) tensor and the tiles' plans along its height and width."""
    channels, tile_h, tile_w = model.lr_shape
    factor = model.factor
    y = _as_image_tensor(y, channels)
    _, height, width = y.shape
    if height < factor or width < factor:
        raise ValueError(
            f"y is {height}x{width} pixels, smaller than one {factor}x{factor} low-resolution pixel block"
        )
    if overlap is None:
        overlap = (tile_h // 2, tile_w // 2)
    overlap_h, overlap_w = (overlap, overlap) if isinstance(overlap, int) else tuple(overlap)
    return y, plan_axis(height, tile_h, int(overlap_h)), plan_axis(width, tile_w, int(overlap_w))


def check_sr_model(model):
    if not (hasattr(model, "super_resolve") and hasattr(model, "lr_shape") and hasattr(model, "factor")):
        raise TypeError(f"super-resolution needs an SRVAE, got {type(model).__name__}")
    return model

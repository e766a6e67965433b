"""Using a trained srVAE on a user's own images: tiled super-resolution with uncertainty.

:func:`superresolve_image` super-resolves one low-resolution image tensor of any size;
:func:`superresolve` does the same for image files (PNG / JPEG / TIFF) and ``.npy``
arrays, from a checkpoint or a model, and writes the results; ``pyro-srvae
superresolve`` is its command line. :func:`load_model` rebuilds a model from a
training checkpoint and :func:`evaluate_checkpoint` re-runs the end-of-training
evaluation (:func:`pyro_srvae.training.evaluate_images`) on it (``pyro-srvae evaluate``).

Tiling
------
The model takes low-resolution tiles of its training size ``model.lr_shape[1:]``
(14x14 for 28x28 Fashion-MNIST and factor 2). An image of another size is cut into
tiles that overlap by ``overlap`` low-resolution pixels (default: half a tile) and
that lie on a regular grid of stride ``tile - overlap``. The image is first padded by
reflection (``overlap // 2`` pixels on each side, so border pixels also get context
from the padding rather than sitting on a tile edge), then further, evenly on both
sides, up to the smallest grid that covers it; tiles that reach outside the image see
the reflection. Each tile gets a separable raised-cosine window
``w(i) = sin^2(pi (i + 1/2) / T)`` over its ``T = tile`` low-resolution pixels, positive
everywhere and smallest at the tile's edges, where convolutions see their zero padding;
the windows of each pixel are normalised to sum to one, ``sum_i w_i = 1``, then repeated
over each ``factor x factor`` block of the high-resolution grid. After the blend (below)
the padding is cropped: the result is exactly ``factor * H x factor * W``.

* With ``overlap=0`` and an image a multiple of the tile size, no padding is needed,
  every output pixel comes from exactly one tile with weight exactly 1, and the result
  is the model's output on each tile (to float rounding of the network itself).
* Where tiles overlap, the blend's weights vary smoothly and vanish towards each tile's
  edge: no seams. For a model whose output is local (each output pixel depends only on
  nearby input pixels) the blended mean is the output on the whole image.

Blending draws, not only means
------------------------------
Draw s of tile i is a draw of the full predictive
q(u|y) p(z|y,u) p(x|y,z[,u]) (:meth:`pyro_srvae.SRVAE.super_resolve`), likelihood noise
included; u and z are drawn for each tile on its own, so the draws of overlapping tiles
are independent. With ``m_i`` the tile's predictive mean (its ``mean``) and
``r_{i,s} = X_{i,s} - m_i`` the residual of draw s, draw s of the image is

    out_s = M + sum_i v_i r_{i,s},   M = sum_i w_i m_i,   v_i = w_i / sqrt(sum_j w_j^2).

* The means get the convex weights ``w``: the predictive mean is an expectation, and a
  convex blend of the tiles' means (each the same quantity seen from another context)
  keeps its scale: a constant stays that constant.
* The residuals get ``v``, normalised in squares (``sum_i v_i^2 = 1``): the residuals of
  different tiles are independent with zero mean, so the variance of ``sum_i v_i r_{i,s}``
  is ``sum_i v_i^2 var_i``, a convex combination of the tiles' variances, and equals the
  variance of one tile's draw where the tiles agree. Blending the draws with ``w`` would
  give ``sum_i w_i^2 var_i``: half the variance where two tiles overlap equally, a
  quarter at a corner of four, an uncertainty map that draws the tile grid and
  intervals that cover too little. (The mean of a v-blend of draws would, in turn, be
  off by the factor ``sum_i v_i >= 1``; hence the split.)
* The weights are constant over each ``factor x factor`` block, so the blend commutes
  with the block average A: ``A out_s = sum_i w_i A m_i + sum_i v_i A r_{i,s}``. Under
  ``x_given_y="consistent"`` every tile's draws and means have block means y, so
  ``A m_i = y`` and ``A r_{i,s} = 0``, and every blended draw and the blended mean have
  block means exactly y (to float rounding). Weights varying within a block, as a
  high-resolution window would, would break that.

The decoder means ``means`` (the latent part) are blended the same way, with the same
``M``, so the output keeps their spread ``std_latent``. The likelihood's variance adds as
the residuals do: ``std_noise = sqrt(sum_i v_i^2 std_noise_i^2)``, so that
``std^2 = std_latent^2 + std_noise^2`` holds for the blend as for one tile, up to
sampling error. ``mean`` is the average of the blended ``means`` (that is ``M``); ``std``
and ``std_latent`` are the unbiased spreads (``correction=1``) of the blended ``samples``
and ``means``, as :meth:`~pyro_srvae.SRVAE.super_resolve` reports them. The blend is
computed as ``sum_i v_i X_{i,s} + sum_i (w_i - v_i) m_i`` (the same value): a pixel that
one tile covers is that tile's draw exactly, and a decoder that ignores the latents gives
equal blended means, ``std_latent`` exactly 0. ``observation_noise=False`` blends decoder
means only (``std == std_latent``, ``std_noise == 0``).

What the blend keeps is per pixel: the mean, the variance and its two parts, and the
block means. Where tiles overlap, one blended draw is a weighted sum of independent
tile draws: right in mean and variance, but its texture (the joint law of neighbouring
pixels) is a mix of two draws rather than one draw.

Latents are drawn from torch's RNG seeded with ``seed`` inside ``torch.random.fork_rng``:
the same call gives the same result, each input of :func:`superresolve` is seeded alike,
and the caller's RNG state is left as it was.
"""

from __future__ import annotations

import json
import math
import os
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import pyro

from .checkpoint import CheckpointError, StagedFiles, atomic_write_text, derive_seed, load_checkpoint
from .data import IMAGE_SHAPES
from .evaluation import evaluate_model, evaluation_batch_size, fit_baseline_scale, model_device
from .images import ImageError, check_image_size, match_channels, read_image, to_uint8_image
from .models import DataScalingError, SuperResolution
from .training import ConfigError, TrainConfig, build_model, load_split, resolve_device

__all__ = [
    "DEFAULT_OUT_DIR",
    "INTERVAL_SUFFIXES",
    "OUTPUT_SUFFIXES",
    "SuperResolveError",
    "SuperResolvedImage",
    "evaluate_checkpoint",
    "load_model",
    "superresolve",
    "superresolve_image",
]

DEFAULT_SAMPLES = 16
DEFAULT_OUT_DIR = "superresolved"
# What superresolve writes for an input <name>, keyed as in SuperResolvedImage.files.
OUTPUT_SUFFIXES = {
    "mean_png": "_sr_mean.png",
    "mean_npy": "_sr_mean.npy",
    "mean_tif": "_sr_mean.tif",
    "std_npy": "_sr_std.npy",
    "std_latent_npy": "_sr_std_latent.npy",
    "std_noise_npy": "_sr_std_noise.npy",
    "uncertainty_png": "_uncertainty.png",
    "samples_npy": "_sr_samples.npy",
    "samples_png": "_sr_samples.png",
}
# Written besides when the checkpoint holds an RCPS interval (pyro-srvae calibrate --method rcps)
# that applies to the draws (pyro_srvae.calibration.interval_mismatch): its lower and upper ends,
# and the calibration record (lambda_hat, alpha, delta, n, the guarantee) they come from.
INTERVAL_SUFFIXES = {
    "lower_npy": "_sr_lower.npy",
    "upper_npy": "_sr_upper.npy",
    "interval_json": "_sr_interval.json",
}
STRIP_MAX_SAMPLES = 16


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
# Models from checkpoints
# --------------------------------------------------------------------------- #
def _image_shape(config, state, data_info=None):
    """(C, H, W) of the training images: as the checkpoint records it, else from the
    dataset's name, else from the weights (checkpoints written before the record)."""
    if data_info and data_info.get("image_shape"):
        return tuple(int(n) for n in data_info["image_shape"])
    if config.dataset in IMAGE_SHAPES:
        return tuple(IMAGE_SHAPES[config.dataset])
    # An srVAE's tensors give C and the low-resolution area; assume square images.
    try:
        channels = int(state["encoder_u.features.net.0.weight"].shape[1])
        cells = int(state["decoder_x.project.0.weight"].shape[0]) // 8
    except (KeyError, AttributeError, IndexError, TypeError):
        return None
    side = math.isqrt(cells)
    return (channels, side * config.factor, side * config.factor) if side * side == cells else None


def _load(checkpoint, device=None, require_super_resolution=True, x_given_y=None):
    """(model, config, payload) from a training checkpoint; CheckpointError with one line.

    ``x_given_y`` rebuilds an srVAE with another p(x|y,.) around the same weights: the
    consistent density is normalized for any parameters, so a checkpoint trained on the
    spec's joint can be re-scored as a density of x."""
    path = Path(checkpoint)
    if path.is_file() and not zipfile.is_zipfile(path):
        # torch.save writes zip archives; say so rather than relay torch.load's advice.
        raise CheckpointError(f"{path} is not a pyro-srvae checkpoint (not a file written by torch.save)")
    payload = load_checkpoint(path)
    try:
        config = TrainConfig.from_dict(dict(payload["config"]))
    except (TypeError, ValueError, ConfigError) as error:
        raise CheckpointError(f"{path} has an unusable configuration: {error}") from None
    if x_given_y is not None and x_given_y != config.x_given_y:
        if config.model != "srvae":
            raise CheckpointError(f"{path} is a plain VAE's checkpoint: --x-given-y applies to an srVAE only")
        config.x_given_y = x_given_y
    if require_super_resolution and config.model != "srvae":
        raise CheckpointError(
            f"{path} is a checkpoint of a plain VAE (--model {config.model}), which cannot super-resolve; "
            "give a checkpoint trained with --model srvae"
        )
    state = payload["model_state"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no model weights")
    data_info = payload.get("data") if isinstance(payload.get("data"), dict) else {}
    shape = _image_shape(config, state, data_info)
    if shape is None:
        raise CheckpointError(f"{path}: cannot tell the image size of dataset {config.dataset!r}")
    try:
        model = build_model(config, shape)
        model.load_state_dict(state, strict=True)
    except DataScalingError as error:  # e.g. --x-given-y quantized on a standardized checkpoint
        raise CheckpointError(f"{path}: {error}") from None
    except (ConfigError, RuntimeError, ValueError, KeyError, TypeError) as error:
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else type(error).__name__
        raise CheckpointError(f"{path} does not match its own configuration: {first_line}") from None
    bits = data_info.get("bits", 8)
    if bits not in (8, 16):
        raise CheckpointError(f"{path} records {bits!r}-bit data; expected 8 or 16")
    model.bits = bits
    model.default_views = MAX_VIEWS if config.augment else 1  # trained on every flip and turn: each view is valid
    model.spread_calibration = None
    if payload.get("spread_calibration") is not None and config.model == "srvae":
        from .calibration import SpreadCalibration

        calibration = SpreadCalibration.from_dict(dict(payload["spread_calibration"]))
        if len(calibration.scale) != shape[0]:
            raise CheckpointError(f"{path}: spread_calibration has {len(calibration.scale)} factors for {shape[0]} channels")
        model.spread_calibration, model.spread_scale = calibration, list(calibration.scale)
    model.interval_calibration = None
    if payload.get("interval_calibration") is not None and config.model == "srvae":
        from .calibration import IntervalCalibration

        interval = IntervalCalibration.from_dict(dict(payload["interval_calibration"]))
        if interval.spread_scale is not None and len(interval.spread_scale) != shape[0]:
            raise CheckpointError(f"{path}: interval_calibration was fitted with {len(interval.spread_scale)} noise factors for {shape[0]} channels")
        model.interval_calibration = interval
    device = resolve_device(device if device is not None else "auto")
    model = model.to(device).eval()
    return model, config, payload


def load_model(checkpoint, *, device="auto", require_super_resolution=True):
    """The trained VAE/SRVAE of a ``checkpoint.pt``, in eval mode on ``device``.

    The architecture comes from the checkpoint's configuration (``build_model``) and the
    weights must load strictly. Raises :class:`pyro_srvae.checkpoint.CheckpointError`
    (one line) for a missing, corrupt or foreign file, and, unless
    ``require_super_resolution=False``, for the checkpoint of a plain VAE.
    """
    return _load(checkpoint, device, require_super_resolution)[0]


def _check_sr_model(model):
    if not (hasattr(model, "super_resolve") and hasattr(model, "lr_shape") and hasattr(model, "factor")):
        raise TypeError(f"super-resolution needs an SRVAE, got {type(model).__name__}")
    return model


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


def _view(image: torch.Tensor, k: int) -> torch.Tensor:
    turned = torch.rot90(image, k % 4, dims=(-2, -1))
    return torch.flip(turned, dims=(-1,)) if k >= 4 else turned


def _unview(image: torch.Tensor, k: int) -> torch.Tensor:
    unflipped = torch.flip(image, dims=(-1,)) if k >= 4 else image
    return torch.rot90(unflipped, -(k % 4), dims=(-2, -1))


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
    model = _check_sr_model(model)
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
        sr = _superresolve_view(model, _view(y, k), count, seed=view_seed, **options)
        parts.append((count, SuperResolution(*(_unview(t, k) for t in sr))))
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
    y = _as_image_tensor(y, channels)
    _, height, width = y.shape
    if height < factor or width < factor:
        raise ValueError(
            f"y is {height}x{width} pixels, smaller than one {factor}x{factor} low-resolution pixel block"
        )
    if overlap is None:
        overlap = (tile_h // 2, tile_w // 2)
    overlap_h, overlap_w = (overlap, overlap) if isinstance(overlap, int) else tuple(overlap)
    plan_h, plan_w = plan_axis(height, tile_h, int(overlap_h)), plan_axis(width, tile_w, int(overlap_w))
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


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #
def _output_names(paths: Sequence[Path]) -> List[str]:
    """File-name stems for the outputs; inputs sharing a stem get their extension, then a number."""
    stems = Counter(p.stem for p in paths)
    names, used = [], set()
    for path in paths:
        name = path.stem
        if stems[name] > 1 and path.suffix:
            name = f"{name}_{path.suffix.lstrip('.').lower()}"
        candidate, number = name, 2
        while candidate in used:
            candidate, number = f"{name}_{number}", number + 1
        used.add(candidate)
        names.append(candidate)
    return names


def output_paths(out_dir, name, interval=False) -> Dict[str, Path]:
    """The files of input ``name``: :data:`OUTPUT_SUFFIXES`, and :data:`INTERVAL_SUFFIXES` with ``interval``."""
    suffixes = {**OUTPUT_SUFFIXES, **(INTERVAL_SUFFIXES if interval else {})}
    return {key: Path(out_dir) / f"{name}{suffix}" for key, suffix in suffixes.items()}


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def read_input(path, channels: int, factor: int, bits: int):
    """``(pixels (channels, H, W) float32 in [0, 1], note, stored bits)`` of one input file.

    Integer inputs must have the bit depth of the model's training data (``bits``): an
    8-bit image given to a model of 16-bit data (or the reverse) is refused with one line,
    because what its values mean on the other grid (full scale? the sensor's 12 bits?) would
    be a guess, and the output could not be written in the input's own units. Float inputs
    in [0, 1] carry no bit depth and are taken as they are.
    """
    image = read_image(path)
    pixels, note = match_channels(image, channels)
    check_image_size(pixels, factor, path)
    if image.bits is not None and image.bits != bits:
        raise ImageError(
            f"{path}: a {image.bits}-bit image, but the model was trained on {bits}-bit data; "
            f"convert it to uint{bits} (or to floats in [0, 1]) first: its units on the other grid would be a guess"
        )
    return pixels, note, image.bits


def native_pixels(pixels: np.ndarray, bits: Optional[int]) -> np.ndarray:
    """An image in [0, 1] in the input's own units: ``floor(2**bits x)`` as uint8 / uint16
    (the inverse of reading ``k`` as ``(k + 0.5) / 2**bits``), or float32 for float input.

    A value outside [0, 1] is clipped: to 0 or ``2**bits - 1`` (to 0.0 or 1.0 for float
    input); NaN becomes 0. With the consistent model each block of the mean averages to
    ``(k + 0.5) / 2**bits``, so the written block averages to ``k`` within half a level --
    except where the mean leaves [0, 1] and is clipped, which moves that block's average
    (near black or white only; ``NAME_sr_mean.npy`` keeps the unclipped values)."""
    values = np.nan_to_num(np.asarray(pixels, dtype=np.float64), nan=0.0)
    if bits is None:
        return np.clip(values, 0.0, 1.0).astype(np.float32)
    levels = 2**bits
    return np.clip(np.floor(values * levels), 0, levels - 1).astype(np.uint8 if bits == 8 else np.uint16)


def _save_tiff(array: np.ndarray):
    """A writer of ``(C, H, W)`` as a TIFF of C planes (tifffile takes a path, not a handle)."""
    import tifffile

    planar = {"planarconfig": "separate"} if array.shape[0] > 1 else {}
    data = array if array.shape[0] > 1 else array[0]
    return lambda path: tifffile.imwrite(path, data, photometric="minisblack", **planar)


def _save_npy(array):
    return lambda handle: np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def _write_outputs(out_dir: Path, files: Dict[str, Path], result: SuperResolution, label: str, bits=None, interval=None):
    """The files of one input (:data:`OUTPUT_SUFFIXES`, and with ``interval``, ``(lower, upper,
    IntervalCalibration)``, :data:`INTERVAL_SUFFIXES`), all renamed into place at the end or none at all."""
    from . import plots

    mean, std, samples = result.mean, result.std, result.samples
    shown = min(samples.shape[0], STRIP_MAX_SAMPLES)
    with StagedFiles(out_dir) as staged:
        staged.write(files["mean_png"], lambda h: to_uint8_image(mean.numpy()).save(h, format="PNG"))
        staged.write(files["mean_npy"], _save_npy(mean.numpy()))
        staged.write_via_path(files["mean_tif"], _save_tiff(native_pixels(mean.numpy(), bits)))
        staged.write(files["std_npy"], _save_npy(std.numpy()))
        staged.write(files["std_latent_npy"], _save_npy(result.std_latent.numpy()))
        staged.write(files["std_noise_npy"], _save_npy(result.std_noise.numpy()))
        staged.write(files["samples_npy"], _save_npy(samples.numpy()))
        if interval is not None:
            lower, upper, calibration = interval
            staged.write(files["lower_npy"], _save_npy(lower.numpy()))
            staged.write(files["upper_npy"], _save_npy(upper.numpy()))
            record = json.dumps(calibration.to_dict(), indent=2) + "\n"
            staged.write(files["interval_json"], lambda handle: handle.write(record.encode("utf-8")))
        staged.write_via_path(
            files["uncertainty_png"],
            lambda tmp: plots.plot_uncertainty_parts(
                std, result.std_latent, result.std_noise, tmp,
                title=f"{label}: per-pixel std of the SR predictive, {samples.shape[0]} samples",
            ),
        )
        count = f"{shown} of {samples.shape[0]}" if shown < samples.shape[0] else f"{shown}"
        staged.write_via_path(
            files["samples_png"],
            lambda tmp: plots.plot_sample_strip(
                samples, tmp, max_images=STRIP_MAX_SAMPLES, means=result.means,
                title=f"{label}: {count} SR draws: decoder means (what z proposes) over full samples",
            ),
        )


def _certified_interval(model, num_samples, views, overlap, log):
    """The model's RCPS interval calibration when it applies to these draws, else None; says which in ``log``."""
    from .calibration import interval_mismatch

    calibration = getattr(model, "interval_calibration", None)
    if calibration is None:
        return None
    reason = interval_mismatch(calibration, model, num_samples, views, overlap)
    if reason is not None:
        log(f"note: the checkpoint's RCPS interval is not written: {reason}")
        return None
    log(
        f"interval: NAME_sr_lower.npy, NAME_sr_upper.npy = mean -+ {calibration.lambda_hat:.4g} x NAME_sr_std.npy "
        f"(RCPS, alpha {calibration.alpha:g}, delta {calibration.delta:g}, n = {calibration.num_images}; "
        f"the record in NAME_sr_interval.json): "
        f"{calibration.guarantee}"
    )
    return calibration


def superresolve(
    model,
    inputs,
    num_samples=DEFAULT_SAMPLES,
    out_dir=None,
    *,
    overlap=None,
    seed=0,
    device=None,
    tile_batch=None,
    progress=False,
    log=None,
    return_arrays=True,
    observation_noise=True,
    views=None,
) -> List[SuperResolvedImage]:
    """Super-resolve image files with a trained srVAE and, with ``out_dir``, write the results.

    Args:
        model: a ``checkpoint.pt`` path (see :func:`load_model`) or an SRVAE.
        inputs: a path or a list of paths: PNG / JPEG / TIFF images or ``.npy`` arrays
            ``(H, W)`` or ``(C, H, W)`` (uint8, uint16 or floats in [0, 1]), of any size
            of at least ``factor`` pixels a side. Grey and RGB images are converted to the
            model's channels where that is unambiguous (:func:`pyro_srvae.images.match_channels`).
            Integer inputs must have the bit depth of the model's data (:func:`read_input`).
        num_samples: SR draws per image.
        out_dir: where to write, for an input ``name.ext``: ``name_sr_mean.png`` (an 8-bit
            preview) and ``.npy`` (float32, on the [0, 1] scale of the input as read, *not*
            clipped: the Gaussian likelihoods' means are unbounded, and on photographs they
            reach about -0.09 and 1.15 near black and white) of the predictive mean,
            ``name_sr_mean.tif`` (the mean in the input's own units, every band: uint16 for a
            16-bit input, uint8 for an 8-bit one, float32 for float input); the PNG and the
            TIFF clip a mean outside [0, 1] to the nearest end of their range
            (:func:`native_pixels`, :func:`pyro_srvae.images.to_uint8_image`), the .npy keeps
            it, so its block means stay those of the input. ``name_sr_std.npy`` (the total per-pixel
            predictive std), ``name_sr_std_latent.npy`` and ``name_sr_std_noise.npy`` (its
            parts: the spread of the decoder means over the latents, the likelihood's
            noise), ``name_uncertainty.png`` (the three maps side by side, one shared colour
            bar), ``name_sr_samples.npy`` and ``.png`` (the draws); with a checkpoint
            calibrated by ``pyro-srvae calibrate --method rcps`` whose interval applies to
            these draws (:func:`pyro_srvae.calibration.interval_mismatch`), also
            ``name_sr_lower.npy`` and ``name_sr_upper.npy``: the certified interval
            ``mean -+ lambda_hat * std`` (float32, the units of ``name_sr_mean.npy``), and
            ``name_sr_interval.json``: the calibration record (lambda_hat, alpha, delta, n, guarantee).
            ``None``: write nothing, only return the arrays.
        overlap, seed, tile_batch, device, observation_noise, views: as in :func:`superresolve_image`.
        progress: a progress bar over the inputs.
        log: called with one-line notes (channel conversions, which interval is written, files written).
        return_arrays: ``False`` returns results without the arrays (``None``), so that
            memory does not grow with the number of inputs.

    Every input is read and checked, and the output names are checked against the
    inputs, before anything is computed or written: a bad input raises
    :class:`SuperResolveError` (one line per problem) and leaves no file. Each input's
    files are written under temporary names and renamed together at the end; an input
    file is never overwritten. Raises :class:`~pyro_srvae.checkpoint.CheckpointError`
    for a bad checkpoint.

    Returns one :class:`SuperResolvedImage` per input, in order (duplicates removed).
    """
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model, device=device if device is not None else "auto")
    try:
        _check_sr_model(model)
    except TypeError as error:
        raise SuperResolveError(str(error)) from None
    log = log or (lambda *_: None)

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths, seen = [], set()
    for item in inputs:
        path = Path(item)
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            paths.append(path)
    if not paths:
        raise SuperResolveError("no input given")

    channels, factor, bits = model.lr_shape[0], model.factor, int(getattr(model, "bits", 8))
    # Check every input first (each is read again when its turn comes: memory stays
    # bounded by one image however many there are).
    notes, errors = [], []
    for path in paths:
        try:
            notes.append(read_input(path, channels, factor, bits)[1])
        except ImageError as error:
            errors.append(str(error))
    if errors:
        raise SuperResolveError(errors)

    interval = _certified_interval(model, num_samples, views, overlap, log)
    planned: List[Dict[str, Path]] = [{} for _ in paths]
    names = [path.stem for path in paths]
    if out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise SuperResolveError(f"{out_dir}: the output folder is an existing file")
        names = _output_names(paths)
        planned = [output_paths(out_dir, name, interval=interval is not None) for name in names]
        clashes = [
            f"{source}: the output {target} would overwrite an input; choose another output folder"
            for files in planned
            for target in files.values()
            for source in paths
            if _same_file(target, source)
        ]
        if clashes:
            raise SuperResolveError(clashes)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SuperResolveError(f"{out_dir}: cannot create the output folder ({error.strerror or error})") from None

    for path, note in zip(paths, notes):
        if note:
            log(f"note: {path}: {note}")

    from tqdm.auto import tqdm

    bar = tqdm(total=len(paths), disable=not progress, unit="image", dynamic_ncols=True, file=sys.stderr)
    results = []
    try:
        for path, name, note, files in zip(paths, names, notes, planned):
            try:
                pixels, _, input_bits = read_input(path, channels, factor, bits)
            except ImageError as error:  # changed since it was checked
                raise SuperResolveError(str(error)) from None
            sr = superresolve_image(
                model,
                torch.from_numpy(pixels),
                num_samples,
                overlap=overlap,
                seed=seed,
                tile_batch=tile_batch,
                device=device,
                observation_noise=observation_noise,
                views=views,
            )
            bounds = None
            if interval is not None:
                spread = interval.lambda_hat * sr.std
                bounds = (sr.mean - spread, sr.mean + spread, interval)
            if files:
                try:
                    _write_outputs(out_dir, files, sr, path.name, input_bits, bounds)
                except OSError as error:
                    raise SuperResolveError(
                        f"{path}: cannot write the outputs to {out_dir} ({error.strerror or error})"
                    ) from None
                (bar.write if progress else log)(
                    f"{path}: {pixels.shape[1]}x{pixels.shape[2]} -> {sr.mean.shape[1]}x{sr.mean.shape[2]}, "
                    f"{num_samples} samples, mean std {sr.std.mean().item():.4g} "
                    f"(latent {sr.std_latent.mean().item():.4g}, noise {sr.std_noise.mean().item():.4g}) "
                    f"-> {out_dir / name}_*"
                )
            if return_arrays:
                arrays = (sr.mean.numpy(), sr.std.numpy(), sr.samples.numpy())
                parts = dict(std_latent=sr.std_latent.numpy(), std_noise=sr.std_noise.numpy())
                if bounds is not None:
                    parts.update(lower=bounds[0].numpy(), upper=bounds[1].numpy())
            else:
                arrays, parts = (None, None, None), {}
            results.append(SuperResolvedImage(path, *arrays, files=files, note=note, bits=input_bits, **parts))
            bar.update(1)
    finally:
        bar.close()
    return results


# --------------------------------------------------------------------------- #
# Evaluation of a checkpoint
# --------------------------------------------------------------------------- #
ALL = "all"


def evaluate_checkpoint(
    checkpoint,
    *,
    eval_samples=None,
    sr_samples=None,
    eval_limit=None,
    data_dir=None,
    device="auto",
    seed=None,
    out_dir=None,
    progress=False,
    x_given_y=None,
):
    """The end-of-training test-set evaluation (:func:`pyro_srvae.training.evaluate_images`),
    run on a saved checkpoint.

    Defaults come from the checkpoint's configuration (``eval_samples``, ``sr_samples``,
    ``eval_limit``, ``data_dir``, ``seed``), and the images per batch follow the same rule
    (:func:`~pyro_srvae.evaluation.evaluation_batch_size`), so the numbers reproduce the run's
    ``metrics.json`` ``test`` section on the same device; ``eval_limit="all"`` lifts the
    run's limit. Writes ``evaluation.json`` into ``out_dir`` (default: the checkpoint's
    folder), atomically, and returns its content: ``checkpoint``, ``step``, ``epoch``,
    ``config`` (with ``x_given_y`` as evaluated: pass ``x_given_y="consistent"`` to re-score a
    checkpoint of the spec's joint as a normalized density of x), ``evaluation``, ``test``;
    ``evaluation`` (the settings used), ``test`` (the metrics of
    :func:`pyro_srvae.evaluate_model`, ``sr_coverage90`` included for an srVAE) and
    ``spread_calibration`` (the checkpoint's :class:`~pyro_srvae.calibration.SpreadCalibration`
    as a dict, which the SR draws used, or None: the model's own spread).

    Raises ``CheckpointError`` and ``DatasetNotFoundError`` with one-line messages.
    """
    model, config, payload = _load(checkpoint, device, require_super_resolution=False, x_given_y=x_given_y)
    eval_samples = config.eval_samples if eval_samples is None else int(eval_samples)
    sr_samples = config.sr_samples if sr_samples is None else int(sr_samples)
    seed = config.seed if seed is None else int(seed)
    limit = config.eval_limit if eval_limit is None else (None if eval_limit == ALL else int(eval_limit))
    for name, value in (("eval_samples", eval_samples), ("sr_samples", sr_samples), ("eval_limit", limit)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if data_dir is not None:
        config.data_dir = str(data_dir)
    test_set = load_split(config, "test")
    images = test_set.images[:limit] if limit is not None else test_set.images
    device = model_device(model)
    baseline_scale = None
    if config.model == "srvae":  # the SR baseline's scale, fitted on the run's training images
        train_images = load_split(config, "train").images
        baseline_scale = fit_baseline_scale(train_images[: config.train_limit], config.factor, config.seed)
    with pyro.get_param_store().scope():
        test = evaluate_model(
            model,
            images,
            elbo_samples=eval_samples,
            iw_samples=eval_samples,
            sr_samples=sr_samples,
            batch_size=evaluation_batch_size(eval_samples, device),
            device=device,
            seed=seed,
            progress=progress,
            baseline_scale=baseline_scale,
        )
    report = {
        "checkpoint": str(checkpoint),
        "step": payload.get("step"),
        "epoch": payload.get("epoch"),
        "config": config.to_dict(),
        "evaluation": {
            "dataset": config.dataset,
            "num_images": int(images.shape[0]),
            "eval_samples": eval_samples,
            "sr_samples": sr_samples,
            "eval_limit": limit,
            "seed": seed,
            "device": str(device),
        },
        "test": test,
        # The SR draws (coverage, CRPS) come from the calibrated spread when the checkpoint holds one.
        "spread_calibration": None if model.spread_calibration is None else model.spread_calibration.to_dict(),
    }
    out_dir = Path(out_dir) if out_dir is not None else Path(checkpoint).parent
    report["path"] = str(atomic_write_text(out_dir / "evaluation.json", json.dumps(report, indent=2) + "\n"))
    return report

"""Fitting a calibration on calibration images: the spread's scale or an RCPS interval (``pyro-srvae calibrate``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from ..data.folder import find_images
from ..data.images import ImageError
from ..metrics.sr_scores import detail_mask, edge_mask, expected_interval_coverage, order_statistic_ranks
from ..training.checkpoint import load_checkpoint, save_checkpoint
from ..utils.devices import model_device
from ..utils.seeds import derive_seed
from .calibration import (
    CALIBRATION_METHODS,
    CALIBRATION_PIXELS,
    DEFAULT_ALPHA,
    DEFAULT_DELTA,
    DEFAULT_LEVEL,
    LAMBDA_GRID,
    CalibrationError,
    IntervalCalibration,
    SpreadCalibration,
    check_risk_level,
    choose_lambda,
    hoeffding_bentkus_upper_bound,
    interval_losses,
    model_spread,
    require_images,
)
from .files import read_input
from .loading import load_model
from .tiling import DEFAULT_SAMPLES, default_views, superresolve_image

#: At most this many calibration pixels (per channel) are kept, drawn at random: the fit
#: sorts S draws at each of ~40 bisection steps.
MAX_PIXELS = 2**21

#: The bisection's range of t and its number of halvings (the bracket ends 2^-12 wide in log t).
LOG_SCALE_RANGE = (math.log(1 / 256), math.log(256))

BISECTION_STEPS = 40


def _pixel_mask(pixels, x, y, factor):
    if pixels == "all":
        return torch.ones_like(x, dtype=torch.bool)
    if pixels == "detail":
        return detail_mask(x[None], factor)[0]
    return edge_mask(y[None], factor)[0]


def _coverage(means, noise, target, scale, lo, hi):
    ordered = (means + scale * noise).sort(dim=0).values
    return ((target >= ordered[lo]) & (target <= ordered[hi])).double().mean().item()


def _bisect(means, noise, target, goal, lo, hi):
    """log t where the coverage crosses ``goal`` (coverage grows with t: each draw's noise widens)."""
    low, high = LOG_SCALE_RANGE
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        if _coverage(means, noise, target, math.exp(middle), lo, hi) < goal:
            low = middle
        else:
            high = middle
    return math.exp((low + high) / 2)


def _check_options(pixels, num_samples):
    if pixels not in CALIBRATION_PIXELS:
        raise CalibrationError(f"pixels must be one of {', '.join(CALIBRATION_PIXELS)}, got {pixels!r}")
    if int(num_samples) != num_samples or num_samples < 2:
        raise CalibrationError(f"num_samples must be an integer of at least 2, got {num_samples!r}")


def _named_images(images, names):
    images = list(images)
    names = [f"image {i}" for i in range(len(images))] if names is None else [str(n) for n in names]
    if not images:
        raise CalibrationError("no calibration images given")
    return images, names


def _draws(model, name, x, num_samples, seed, views):
    """``(x, y, SuperResolution)``: the image checked, downscaled as in training and super-resolved whole."""

    channels, factor = model.lr_shape[0], model.factor
    x = torch.as_tensor(x, dtype=torch.float32)
    if x.dim() != 3 or x.shape[0] != channels or x.shape[1] % factor or x.shape[2] % factor:
        raise CalibrationError(
            f"{name}: expected a ({channels}, H, W) image with H and W multiples of {factor}, got {tuple(x.shape)}"
        )
    y = model.downscale(x[None].to(model_device(model)))[0].cpu()
    return x, y, superresolve_image(model, y, num_samples, seed=seed, views=views)


def _kept_pixels(model, images, names, pixels, num_samples, seed, views, per_image):
    """Per channel ``(means, noise, target)`` of at most ``per_image`` chosen pixels of each image."""
    channels = model.lr_shape[0]
    generator = torch.Generator().manual_seed(seed)
    kept = [[] for _ in range(channels)]
    for index, (name, x) in enumerate(zip(names, images)):
        # Each image its own draws, as new images get: one seed for all would give images of one size
        # the same noise, and the fit would see one image's worth of independent intervals.
        x, y, sr = _draws(model, name, x, num_samples, derive_seed(seed, "spread", index), views)
        mask = _pixel_mask(pixels, x, y, model.factor)
        for c in range(channels):
            where = mask[c].flatten().nonzero().squeeze(1)
            if where.numel() > per_image:
                where = where[torch.randperm(where.numel(), generator=generator)[:per_image]]
            means = sr.means[:, c].flatten(1)[:, where]
            noise = sr.samples[:, c].flatten(1)[:, where] - means
            kept[c].append((means, noise, x[c].flatten()[where]))
    return [tuple(torch.cat(parts, dim=-1) for parts in zip(*channel)) for channel in kept]


@torch.no_grad()
def fit_spread_scale(
    model,
    images: Iterable[torch.Tensor],
    *,
    names: Optional[Sequence[str]] = None,
    level: float = DEFAULT_LEVEL,
    pixels: str = "detail",
    num_samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    max_pixels: int = MAX_PIXELS,
    views: Optional[int] = None,
) -> SpreadCalibration:
    """Fit one spread factor per channel on calibration high-resolution ``images`` (module docstring).

    ``images``: float tensors ``(C, H, W)`` in [0, 1] (H and W multiples of ``model.factor``),
    which should be images the model was not trained on (nothing here can tell). Each is
    downscaled as in training (``model.downscale``) and super-resolved whole, as
    :func:`pyro_srvae.superresolve_image` does (with ``views``, default the model's), from the
    model's own predictive. After the fit, new draws (seed ``derive_seed(seed, "fresh")``) of the
    calibrated predictive on the same images give ``coverage_fresh``. Raises
    :class:`CalibrationError` for a model whose draws cannot be scaled, no images, or no pixels
    of the chosen set.
    """

    _check_options(pixels, num_samples)
    if not 0 < level < 1:
        raise CalibrationError(f"level must lie strictly between 0 and 1, got {level!r}")
    if getattr(model.likelihood, "name", None) == "dlogistic-mix":
        raise CalibrationError(
            "the dlogistic-mix likelihood draws on the 8-bit grid: a scaled residual would leave it, so its "
            "spread cannot be calibrated by a factor"
        )
    images, names = _named_images(images, names)
    lo, hi = order_statistic_ranks(num_samples, level)
    goal = expected_interval_coverage(num_samples, level)
    views = min(default_views(model) if views is None else int(views), int(num_samples))
    per_image = max(1, max_pixels // len(images))
    fresh_seed = derive_seed(seed, "fresh")
    with model_spread(model):
        kept = _kept_pixels(model, images, names, pixels, num_samples, seed, views, per_image)
        for c, (_, noise, target) in enumerate(kept):
            if target.numel() == 0:
                raise CalibrationError(f"the calibration images have no {pixels} pixels (channel {c})")
            if not noise.abs().max() > 0:
                raise CalibrationError("the model's draws carry no likelihood noise to scale")
        scale = [_bisect(means, noise, target, goal, lo, hi) for means, noise, target in kept]
        fresh = _kept_pixels(model, images, names, pixels, num_samples, fresh_seed, views, per_image)
    return SpreadCalibration(
        scale=scale, level=float(level), pixels=pixels, num_samples=int(num_samples), target_coverage=goal,
        coverage_before=[_coverage(*part, 1.0, lo, hi) for part in kept],
        coverage_after=[_coverage(*part, t, lo, hi) for part, t in zip(kept, scale)],
        num_pixels=min(target.numel() for _, _, target in kept), images=names, views=views,
        coverage_fresh=[_coverage(*part, t, lo, hi) for part, t in zip(fresh, scale)], fresh_seed=fresh_seed,
    )  # fmt: skip


@torch.no_grad()
def fit_interval_scale(
    model,
    images: Iterable[torch.Tensor],
    *,
    names: Optional[Sequence[str]] = None,
    alpha: float = DEFAULT_ALPHA,
    delta: float = DEFAULT_DELTA,
    pixels: str = "detail",
    num_samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    views: Optional[int] = None,
) -> IntervalCalibration:
    """Fit the RCPS interval ``mean +- lambda_hat * std`` on calibration ``images`` (module docstring).

    ``images`` as for :func:`fit_spread_scale`; each is super-resolved whole with ``num_samples``
    draws (``views``, default the model's) of the predictive superresolve draws from (the
    checkpoint's spread calibration applied, if any), with its own seed
    ``derive_seed(seed, "rcps", i)``. Raises :class:`CalibrationError` (one line) for bad
    options, too few images to certify ``alpha`` at ``delta``, or no certified lambda.
    """

    _check_options(pixels, num_samples)
    check_risk_level("alpha", alpha)
    check_risk_level("delta", delta)
    images, names = _named_images(images, names)
    require_images(len(images), alpha, delta)  # said before any drawing
    views = min(default_views(model) if views is None else int(views), int(num_samples))
    losses, empty = [], 0
    for i, (name, x) in enumerate(zip(names, images)):
        x, y, sr = _draws(model, name, x, num_samples, derive_seed(seed, "rcps", i), views)
        mask = _pixel_mask(pixels, x, y, model.factor)
        empty += int(not mask.any())
        losses.append(interval_losses(sr.mean, sr.std, x, mask))
    if empty == len(images):
        raise CalibrationError(f"the calibration images have no {pixels} pixels")
    losses = torch.stack(losses)
    index = choose_lambda(losses, alpha, delta)
    risk = losses[:, index].mean().item()
    spread = getattr(model, "spread_scale", None)
    return IntervalCalibration(
        alpha=float(alpha), delta=float(delta), num_images=len(images), pixels=pixels,
        lambda_hat=LAMBDA_GRID[index].item(), risk=risk,
        risk_bound=hoeffding_bentkus_upper_bound(risk, len(images), delta), num_samples=int(num_samples),
        views=views, spread_scale=None if spread is None else [float(t) for t in spread], images=names,
        empty_images=empty,
    )  # fmt: skip


# --------------------------------------------------------------------------- #
# Images and checkpoints
# --------------------------------------------------------------------------- #
def read_calibration_images(model, inputs) -> tuple:
    """``(images, names)`` from image files and folders (recursively), as the model reads them.

    Each is read as ``superresolve`` reads an input (channels converted, bit depth checked)
    and cropped to multiples of the factor. Raises :class:`CalibrationError` (one line).
    """

    channels, factor, bits = model.lr_shape[0], model.factor, int(getattr(model, "bits", 8))
    paths = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = find_images(item)
            if not found:
                raise CalibrationError(f"{item}: no images found")
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise CalibrationError(f"{item}: no such file or folder")
    if not paths:
        raise CalibrationError("no calibration images given")
    images = []
    for path in paths:
        try:
            pixels, _, _ = read_input(path, channels, factor, bits)
        except ImageError as error:
            raise CalibrationError(str(error)) from None
        height, width = (pixels.shape[1] // factor) * factor, (pixels.shape[2] // factor) * factor
        images.append(torch.from_numpy(pixels[:, :height, :width].copy()))
    return images, [str(path) for path in paths]


def calibrate_checkpoint(checkpoint, images, *, names=None, out=None, model=None, method="spread", **options):
    """Calibrate the SR predictive of ``checkpoint``'s model on ``images`` and write it into the checkpoint.

    ``method="spread"``: :func:`fit_spread_scale`, stored as ``spread_calibration``;
    ``method="rcps"``: :func:`fit_interval_scale`, stored as ``interval_calibration``. The
    checkpoint's content is kept as it was (weights, optimizer, configuration, the other
    method's record) with that record added or replaced; written atomically to ``out``
    (default: over ``checkpoint`` itself), so a failure leaves the file as it was.
    ``options`` go to the fit; ``model``: the checkpoint's model, if already loaded. Returns
    the :class:`SpreadCalibration` or :class:`IntervalCalibration`.
    """

    if method not in CALIBRATION_METHODS:
        raise CalibrationError(f"method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    model = load_model(checkpoint, device="auto") if model is None else model
    spread = method == "spread"
    fit, key = (fit_spread_scale, "spread_calibration") if spread else (fit_interval_scale, "interval_calibration")
    calibration = fit(model, images, names=names, **options)
    payload = load_checkpoint(checkpoint)
    payload[key] = calibration.to_dict()
    save_checkpoint(Path(out) if out is not None else Path(checkpoint), payload)
    return calibration

"""Calibrating the spread of the SR predictive on held-out images (beyond the spec).

A model fitted to its training images is, on new images, usually more wrong than its own
likelihood says: its intervals cover too little (docs/results.md, the photograph runs). The
standard repair is to measure that on images it was not trained on and widen the spread by
one factor per channel, "sigma scaling" (Kuleshov et al., ICML 2018; Laves et al., MIDL 2020).
Here the factor ``t`` scales the likelihood's noise around each draw's decoder mean:

    x_s = m_s + t (X_s - m_s),    m_s = E[x | y, z_s, u_s],  X_s ~ p(x | y, z_s, u_s),

which is a draw of the same model with the likelihood's scale multiplied by ``t`` (gamma_x,
or every per-pixel sigma): still a proper predictive, with the same mean, and under
``x_given_y="consistent"`` still exactly on the x whose block means are y (the noise is
scaled per channel, so its block means stay 0). ``t`` is fitted so that the central
``level`` interval of ``num_samples`` draws holds the truth as often, on the calibration
images' chosen pixels, as it would for a predictive the truth is exchangeable with
(:func:`pyro_srvae.evaluation.expected_interval_coverage`: 15/17 for the 90% interval of 16
draws), by bisection on ``log t`` with the draws held fixed.

Which pixels (``pixels``): ``"detail"`` (the default) are those that differ from their
block's mean by more than one grey level (:func:`~pyro_srvae.evaluation.detail_mask`): the
pixels where super-resolution has something to add, and the set the photograph benchmark
scores. They are chosen by the truth, so a predictive calibrated on them is wider than one
calibrated on all pixels, and covers more than ``level`` of the flat ones. ``"all"`` is
plain sigma scaling; ``"edges"`` (:func:`~pyro_srvae.evaluation.edge_mask`) is chosen from y.

The densities (ELBO, bits/dim) stay those of the trained model (t = 1): the factor is a
property of the predictive that :func:`pyro_srvae.superresolve` draws from, recorded in the
checkpoint (``spread_calibration``) and reported wherever it is used.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import torch

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__all__ = [
    "CALIBRATION_PIXELS",
    "CalibrationError",
    "SpreadCalibration",
    "calibrate_checkpoint",
    "fit_spread_scale",
    "model_spread",
    "read_calibration_images",
]

#: The pixel sets a spread can be calibrated on (see the module docstring).
CALIBRATION_PIXELS = ("detail", "all", "edges")
DEFAULT_LEVEL = 0.9
DEFAULT_SAMPLES = 16
#: At most this many calibration pixels (per channel) are kept, drawn at random: the fit
#: sorts S draws at each of ~40 bisection steps.
MAX_PIXELS = 2**21
#: The bisection's range of t and its number of halvings (the bracket ends 2^-12 wide in log t).
LOG_SCALE_RANGE = (math.log(1 / 256), math.log(256))
BISECTION_STEPS = 40


class CalibrationError(ValueError):
    """Calibration images or a model that cannot be calibrated (one line)."""


@dataclass
class SpreadCalibration:
    """The fitted factors and how they were fitted; stored in a checkpoint as a dict."""

    scale: List[float]  # one factor per channel
    level: float
    pixels: str
    num_samples: int
    target_coverage: float  # what an exchangeable predictive covers: the fit's aim
    coverage_before: List[float]  # the calibration pixels' coverage at t = 1, per channel
    coverage_after: List[float]
    num_pixels: int  # calibration pixels per channel used in the fit
    images: List[str]
    views: int = 1  # the dihedral views the predictive mixed (superresolve_image's views)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        try:
            calibration = cls(**values)
            scale = [float(t) for t in calibration.scale]
        except (TypeError, ValueError):
            raise CheckpointError(f"unusable spread_calibration record: {values!r}") from None
        if not scale or not all(math.isfinite(t) and t > 0 for t in scale):
            raise CheckpointError(f"spread_calibration holds a non-positive or non-finite factor: {scale}")
        calibration.scale = scale
        return calibration

    def describe(self):
        """One line: the factor(s) and what they were fitted on."""
        factors = ", ".join(f"{t:.3g}" for t in self.scale)
        return (
            f"calibrated: likelihood noise x{factors}, fitted on {len(self.images)} held-out image(s) so that "
            f"{self.level:.0%} intervals of {self.num_samples} draws ({self.views} view{'s' if self.views > 1 else ''}) "
            f"cover {self.target_coverage:.3f} of their "
            f"{self.pixels} pixels (before: {', '.join(f'{c:.3f}' for c in self.coverage_before)})"
        )


@contextmanager
def model_spread(model):
    """Within the block ``model`` draws its own predictive (``spread_scale`` None)."""
    saved = getattr(model, "spread_scale", None)
    model.spread_scale = None
    try:
        yield model
    finally:
        model.spread_scale = saved


def _pixel_mask(pixels, x, y, factor):
    from .evaluation import detail_mask, edge_mask

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
    """Fit one spread factor per channel on held-out high-resolution ``images`` (module docstring).

    ``images``: float tensors ``(C, H, W)`` in [0, 1] (H and W multiples of ``model.factor``),
    never seen in training. Each is downscaled as in training (``model.downscale``) and
    super-resolved whole, as :func:`pyro_srvae.superresolve_image` does (with ``views``, default
    the model's), from the model's own predictive. Raises :class:`CalibrationError` for a model whose draws cannot be scaled,
    no images, or no pixels of the chosen set.
    """
    from .evaluation import _order_statistic_ranks, expected_interval_coverage
    from .superresolve import _model_device, default_views, superresolve_image

    if pixels not in CALIBRATION_PIXELS:
        raise CalibrationError(f"pixels must be one of {', '.join(CALIBRATION_PIXELS)}, got {pixels!r}")
    if not 0 < level < 1:
        raise CalibrationError(f"level must lie strictly between 0 and 1, got {level!r}")
    if int(num_samples) != num_samples or num_samples < 2:
        raise CalibrationError(f"num_samples must be an integer of at least 2, got {num_samples!r}")
    if getattr(model.likelihood, "name", None) == "dlogistic-mix":
        raise CalibrationError(
            "the dlogistic-mix likelihood draws on the 8-bit grid: a scaled residual would leave it, so its "
            "spread cannot be calibrated by a factor"
        )
    images = list(images)
    names = [f"image {i}" for i in range(len(images))] if names is None else [str(n) for n in names]
    if not images:
        raise CalibrationError("no calibration images given")
    channels, factor = model.lr_shape[0], model.factor
    lo, hi = _order_statistic_ranks(num_samples, level)
    goal = expected_interval_coverage(num_samples, level)
    views = min(default_views(model) if views is None else int(views), int(num_samples))
    generator = torch.Generator().manual_seed(seed)
    per_image = max(1, max_pixels // len(images))
    kept = [[] for _ in range(channels)]  # per channel: (means, noise, target) of the kept pixels
    with model_spread(model):
        for name, x in zip(names, images):
            x = torch.as_tensor(x, dtype=torch.float32)
            if x.dim() != 3 or x.shape[0] != channels or x.shape[1] % factor or x.shape[2] % factor:
                raise CalibrationError(
                    f"{name}: expected a ({channels}, H, W) image with H and W multiples of {factor}, got {tuple(x.shape)}"
                )
            y = model.downscale(x[None].to(_model_device(model)))[0].cpu()
            sr = superresolve_image(model, y, num_samples, seed=seed, views=views)
            mask = _pixel_mask(pixels, x, y, factor)
            for c in range(channels):
                where = mask[c].flatten().nonzero().squeeze(1)
                if where.numel() > per_image:
                    where = where[torch.randperm(where.numel(), generator=generator)[:per_image]]
                means = sr.means[:, c].flatten(1)[:, where]
                noise = sr.samples[:, c].flatten(1)[:, where] - means
                kept[c].append((means, noise, x[c].flatten()[where]))
    scale, before, after, counts = [], [], [], []
    for c in range(channels):
        means, noise, target = (torch.cat(parts, dim=-1) for parts in zip(*kept[c]))
        if target.numel() == 0:
            raise CalibrationError(f"the calibration images have no {pixels} pixels (channel {c})")
        if not noise.abs().max() > 0:
            raise CalibrationError("the model's draws carry no likelihood noise to scale")
        t = _bisect(means, noise, target, goal, lo, hi)
        scale.append(t)
        before.append(_coverage(means, noise, target, 1.0, lo, hi))
        after.append(_coverage(means, noise, target, t, lo, hi))
        counts.append(target.numel())
    return SpreadCalibration(
        scale=scale, level=float(level), pixels=pixels, num_samples=int(num_samples), target_coverage=goal,
        coverage_before=before, coverage_after=after, num_pixels=min(counts), images=names, views=views,
    )  # fmt: skip


def read_calibration_images(model, inputs) -> tuple:
    """``(images, names)`` from image files and folders (recursively), as the model reads them.

    Each is read as ``superresolve`` reads an input (channels converted, bit depth checked)
    and cropped to multiples of the factor. Raises :class:`CalibrationError` (one line).
    """
    from .folder import find_images
    from .images import ImageError
    from .superresolve import read_input

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


def calibrate_checkpoint(checkpoint, images, *, names=None, out=None, model=None, **options) -> SpreadCalibration:
    """Fit the spread of ``checkpoint``'s model on ``images`` and write it into the checkpoint.

    The checkpoint's content is kept as it was (weights, optimizer, configuration) with
    ``spread_calibration`` added or replaced; written atomically to ``out`` (default: over
    ``checkpoint`` itself), so a failure leaves the file as it was. ``options`` go to
    :func:`fit_spread_scale`; ``model``: the checkpoint's model, if already loaded.
    """
    from .superresolve import load_model

    model = load_model(checkpoint, device="auto") if model is None else model
    calibration = fit_spread_scale(model, images, names=names, **options)
    payload = load_checkpoint(checkpoint)
    payload["spread_calibration"] = calibration.to_dict()
    save_checkpoint(Path(out) if out is not None else Path(checkpoint), payload)
    return calibration

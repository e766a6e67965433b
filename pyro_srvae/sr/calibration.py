"""Calibrating the SR predictive on calibration images (beyond the spec): two methods.

* ``method="spread"`` (the default, :func:`fit_spread_scale`): sigma scaling, below.
* ``method="rcps"`` (:func:`fit_interval_scale`): a distribution-free interval with a
  guarantee, risk-controlling prediction sets; see "Risk-controlling intervals" below.

docs/calibration.md describes both for users.

Sigma scaling
-------------

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
(:func:`pyro_srvae.metrics.sr_scores.expected_interval_coverage`: 15/17 for the 90% interval of 16
draws), by bisection on ``log t`` with the draws held fixed.

Which pixels (``pixels``): ``"detail"`` (the default) are those that differ from their
block's mean by more than one grey level (:func:`~pyro_srvae.metrics.sr_scores.detail_mask`): the
pixels where super-resolution has something to add, and the set the photograph benchmark
scores. They are chosen by the truth, so a predictive calibrated on them is wider than one
calibrated on all pixels, and covers more than ``level`` of the flat ones. ``"all"`` is
plain sigma scaling; ``"edges"`` (:func:`~pyro_srvae.metrics.sr_scores.edge_mask`) is chosen from y.

The densities (ELBO, bits/dim) stay those of the trained model (t = 1): the factor is a
property of the predictive that :func:`pyro_srvae.sr.superresolve` draws from, recorded in the
checkpoint (``spread_calibration``) and reported wherever it is used. Its in-sample
coverage (``coverage_after``: the draws ``t`` was fitted to) equals the target by
construction; ``coverage_fresh`` is that of new draws (another seed) on the same
calibration images: a check of the fit, not a test set.

Risk-controlling intervals (RCPS)
---------------------------------
Bates, Angelopoulos, Lei, Malik, Jordan, "Distribution-free, risk-controlling prediction
sets", JACM 2021 (arXiv:2101.02703), applied to image-to-image regression as in
Angelopoulos et al., "Image-to-image regression with distribution-free uncertainty
quantification and applications in imaging", ICML 2022 (code: github.com/aangelopoulos/im2im-uq,
``core/calibration/bounds.py`` and ``calibrate_model.py``). The intervals are nested in one
parameter lambda, built from the draws' mean ``m`` and total spread ``s`` (the std that
superresolve writes):

    T_lambda(y) = [m - lambda s, m + lambda s]    (im2im-uq: [m - lambda lo, m + lambda hi]).

The loss of an image is the fraction of its chosen pixels (``pixels``, as above; an image
without any counts 0) outside ``T_lambda``: in [0, 1] and non-increasing in lambda. Over
``LAMBDA_GRID`` (fixed before any data is seen, from the widest down), lambda_hat is the
smallest lambda such that at every lambda' >= lambda the Hoeffding-Bentkus test rejects
"risk(lambda') > alpha" at level delta (:func:`hoeffding_bentkus_p_value`; equivalently its
upper confidence bound is below alpha: Bates et al.'s UCB calibration, Sec. 3, with their
Hoeffding-Bentkus bound; the scan is im2im-uq's). Then, if the n calibration images and a
new image are i.i.d. (pairs (x, y) drawn independently from one distribution: Hoeffding's and
Bentkus's bounds need independence, which is more than exchangeability), with probability at
least 1 - delta over the calibration images, the expected fraction of the new image's chosen
pixels outside ``T_lambda_hat`` is at most alpha. Each calibration image
is drawn with its own seed (:func:`~pyro_srvae.utils.seeds.derive_seed`), so the draws
are independent of each other as the test image's are of theirs; the guarantee is for the
predictive drawn with the same number of draws, views, tile overlap and spread
(:func:`interval_mismatch`), which ``superresolve`` checks before it writes the interval.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch

from ..training.checkpoint import CheckpointError
from .tiling import default_views

#: ``spread``: sigma scaling (the default: it works from a few images); ``rcps``: an
#: interval with a distribution-free guarantee (needs more images: :func:`minimum_images`).
CALIBRATION_METHODS = ("spread", "rcps")

#: The pixel sets a spread can be calibrated on (see the module docstring).
CALIBRATION_PIXELS = ("detail", "all", "edges")

#: How the printed lines name each pixel set.
PIXEL_WORDS = {"detail": "detail pixels", "all": "pixels", "edges": "edge pixels"}

DEFAULT_LEVEL = 0.9

DEFAULT_ALPHA = 0.1

DEFAULT_DELTA = 0.1

#: The lambdas RCPS scans, in units of the predictive std: 0, then 10^-2 to 10^2, 0.77%
#: apart. Fixed before any data is seen, as the fixed-sequence argument behind the
#: guarantee needs (a grid placed by the calibration data would void it).
LAMBDA_GRID = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-2, 2, 1201, dtype=torch.float64)])


class CalibrationError(ValueError):
    """Calibration images or a model that cannot be calibrated (one line)."""


def _read_record(cls, values, name, numbers):
    """``cls(**values)`` and ``numbers`` of it, or one :class:`CheckpointError` line for a record that is not one."""
    try:
        record = cls(**values)
        return record, numbers(record)
    except (TypeError, ValueError):
        raise CheckpointError(f"unusable {name} record: {values!r}") from None


@dataclass
class SpreadCalibration:
    """The fitted factors and how they were fitted; stored in a checkpoint as a dict."""

    scale: List[float]  # one factor per channel
    level: float
    pixels: str
    num_samples: int
    target_coverage: float  # what an exchangeable predictive covers: the fit's aim
    coverage_before: List[float]  # the calibration pixels' coverage at t = 1, per channel
    coverage_after: List[float]  # in-sample: the draws t was fitted to (= the target by construction)
    num_pixels: int  # calibration pixels per channel used in the fit
    images: List[str]
    views: int = 1  # the dihedral views the predictive mixed (superresolve_image's views)
    # New draws (seed fresh_seed) times t on the same calibration images: a check of the fit, not
    # a test set. None in records written before it existed.
    coverage_fresh: Optional[List[float]] = None
    fresh_seed: Optional[int] = None

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        calibration, scale = _read_record(cls, values, "spread_calibration", lambda c: [float(t) for t in c.scale])
        if not scale or not all(math.isfinite(t) and t > 0 for t in scale):
            raise CheckpointError(f"spread_calibration holds a non-positive or non-finite factor: {scale}")
        calibration.scale = scale
        return calibration

    def describe(self):
        """One line: the factor(s) and what they were fitted on."""
        factors = ", ".join(f"{t:.3g}" for t in self.scale)
        return (
            f"calibrated: likelihood noise x{factors}, fitted on {len(self.images)} calibration image(s) so that "
            f"{self.level:.0%} intervals of {self.num_samples} draws ({self.views} view{'s' if self.views > 1 else ''}) "
            f"cover {self.target_coverage:.3f} of their "
            f"{PIXEL_WORDS.get(self.pixels, self.pixels)} (before: {', '.join(f'{c:.3f}' for c in self.coverage_before)})"
        )

    def coverage_lines(self):
        """What the fit covers, each number named for the draws it comes from."""
        lines = [
            f"in-sample coverage (the draws the factor was fitted to; the target by construction): "
            f"{', '.join(f'{c:.3f}' for c in self.coverage_after)} of {self.num_pixels} pixels per channel"
        ]
        if self.coverage_fresh is not None:
            lines.append(
                f"fresh draws (seed {self.fresh_seed}) on the same calibration images, not a test set: "
                f"coverage {', '.join(f'{c:.3f}' for c in self.coverage_fresh)}"
            )
        return lines


@dataclass
class IntervalCalibration:
    """An RCPS interval ``mean +- lambda_hat * std`` and its guarantee; stored in a checkpoint as a dict."""
    alpha: float
    delta: float
    num_images: int  # n, the calibration images
    pixels: str
    lambda_hat: float
    risk: float  # the empirical risk at lambda_hat: mean over the calibration images (in-sample)
    risk_bound: float  # its Hoeffding-Bentkus upper confidence bound at level 1 - delta (< alpha)
    num_samples: int
    views: int
    spread_scale: Optional[List[float]]  # the draws' likelihood-noise factors (None: the model's own)
    images: List[str]
    empty_images: int = 0  # calibration images without any chosen pixel (loss 0)
    method: str = "rcps"
    interval: str = "mean - lambda_hat * std, mean + lambda_hat * std (std: the draws' total predictive std)"
    guarantee: str = field(default="")

    def __post_init__(self):
        if not self.guarantee:
            self.guarantee = self.statement()

    def statement(self):
        """The guarantee, in one line."""
        return (
            f"with probability at least {1 - self.delta:.4g} over the {self.num_images} calibration images, the "
            f"expected fraction of a new image's {PIXEL_WORDS[self.pixels]} outside mean +- {self.lambda_hat:.4g} std is "
            f"at most {self.alpha:.4g}, if the calibration images and the new one are drawn independently from "
            f"one distribution, and for {self.num_samples} draws, {self.views} view(s)"
        )

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        calibration, (alpha, delta, lambda_hat) = _read_record(
            cls, values, "interval_calibration", lambda c: [float(c.alpha), float(c.delta), float(c.lambda_hat)]
        )
        known = calibration.method == "rcps" and calibration.pixels in PIXEL_WORDS
        if not (known and 0 < alpha < 1 and 0 < delta < 1):
            raise CheckpointError(
                f"interval_calibration: not an RCPS record of a known pixel set with alpha and delta in (0, 1): {values!r}"
            )
        if not (math.isfinite(lambda_hat) and lambda_hat >= 0):
            raise CheckpointError(f"interval_calibration holds a negative or non-finite lambda_hat: {lambda_hat}")
        return calibration

    def describe(self):
        """One line: the interval and what it was fitted on."""
        return (
            f"RCPS interval: mean +- {self.lambda_hat:.4g} x std of {self.num_samples} draws "
            f"({self.views} view{'s' if self.views > 1 else ''}), alpha {self.alpha:g}, delta {self.delta:g}, "
            f"fitted on the {PIXEL_WORDS[self.pixels]} of n = {self.num_images} calibration images"
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


# --------------------------------------------------------------------------- #
# Risk-controlling intervals (RCPS): the Hoeffding-Bentkus test and the lambda scan
# --------------------------------------------------------------------------- #
def check_risk_level(name, value):
    try:
        valid = not isinstance(value, bool) and 0 < float(value) < 1
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise CalibrationError(f"{name} must lie strictly between 0 and 1, got {value!r}")


def _binomial_cdf(k, n, p):
    """P(Binomial(n, p) <= k) for a tensor of integers ``k`` in [0, n], summed in log space (float64)."""
    j = torch.arange(n + 1, dtype=torch.float64)
    log_pmf = (
        math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)
        + j * math.log(p) + (n - j) * math.log1p(-p)
    )  # fmt: skip
    return torch.logcumsumexp(log_pmf, 0).exp().clamp(max=1.0)[k.long()]


def hoeffding_bentkus_p_value(risk, n: int, alpha: float) -> torch.Tensor:
    """The Hoeffding-Bentkus p-value of "the mean loss exceeds ``alpha``" from ``n`` losses in [0, 1].

    With ``risk`` their empirical mean R (a number or a tensor of them):

        p = min( exp(-n h1(min(R, alpha), alpha)),  e P(Binomial(n, alpha) <= ceil(n R)) ),
        h1(a, b) = a log(a/b) + (1 - a) log((1 - a)/(1 - b)),

    Hoeffding's tail (1963) and Bentkus's (2004), each valid for i.i.d. losses bounded in
    [0, 1] (Bates et al. 2021, Sec. 3, "Hoeffding-Bentkus"; written as a p-value as in
    Angelopoulos, Bates, Candes, Jordan, Lei, "Learn then Test", 2021). ``ceil(n R)`` is taken
    with a 1e-9 allowance, so that a mean of k/n read back from floats stays k. float64.
    """
    risk = torch.as_tensor(risk, dtype=torch.float64)
    a = risk.clamp(min=0.0, max=alpha)
    h1 = torch.xlogy(a, a / alpha) + torch.xlogy(1 - a, (1 - a) / (1 - alpha))
    hoeffding = torch.exp(-n * h1)
    count = torch.ceil(n * risk - 1e-9).clamp(0, n)
    bentkus = math.e * _binomial_cdf(count, n, alpha)
    return torch.minimum(hoeffding, bentkus)


def hoeffding_bentkus_upper_bound(risk: float, n: int, delta: float, steps: int = 60) -> float:
    """The Hoeffding-Bentkus upper confidence bound (level 1 - delta) of the mean loss.

    The p-value falls as the tested mean ``mu`` grows, so the bound is the ``mu`` where it
    crosses ``delta`` (found by bisection; 1 if it never does): the UCB of im2im-uq's
    ``HB_mu_plus``. It lies below alpha exactly when :func:`hoeffding_bentkus_p_value` at
    alpha is below delta.
    """
    low, high = float(risk), 1.0
    if hoeffding_bentkus_p_value(risk, n, 1 - 1e-12).item() >= delta:
        return 1.0
    for _ in range(steps):
        middle = (low + high) / 2
        if hoeffding_bentkus_p_value(risk, n, middle).item() >= delta:
            low = middle
        else:
            high = middle
    return high


def minimum_images(alpha: float, delta: float) -> int:
    """The fewest calibration images that can certify ``alpha`` at ``delta``: even with no pixel
    missed (R = 0) the p-value is (1 - alpha)^n, which must fall below delta."""
    n = max(1, math.ceil(math.log(delta) / math.log1p(-alpha)))
    while (1 - alpha) ** n >= delta:  # the logarithms' rounding, either way
        n += 1
    while n > 1 and (1 - alpha) ** (n - 1) < delta:
        n -= 1
    return n


def require_images(n, alpha, delta):
    if n < minimum_images(alpha, delta):
        raise CalibrationError(
            f"RCPS cannot certify alpha={alpha:g} at delta={delta:g} with {n} calibration image(s): it needs at least "
            f"{minimum_images(alpha, delta)} even if no pixel were missed (give more images, or raise alpha or delta)"
        )


def interval_losses(mean, std, target, mask=None, grid=LAMBDA_GRID) -> torch.Tensor:
    """One image's loss at each lambda of ``grid``: the fraction of its ``mask`` pixels outside
    ``[mean - lambda std, mean + lambda std]`` (0 for an image without such pixels).

    Returns float64 ``(K,)``, non-increasing along the grid (:func:`batch_interval_losses`).
    """
    mask = torch.ones_like(target, dtype=torch.bool) if mask is None else mask
    if not mask.any():
        return torch.zeros_like(grid)
    return batch_interval_losses(mean[mask][None], std[mask][None], target[mask][None], grid)[0]


def batch_interval_losses(mean, std, target, grid=LAMBDA_GRID) -> torch.Tensor:
    """The losses of B images of P chosen pixels each, ``(B, P)`` arrays, at each lambda: ``(B, K)``.

    A pixel is inside exactly when ``|target - mean| <= lambda std``; where ``std`` is 0 it is
    inside at every lambda if ``target == mean`` and at none otherwise.
    """
    distance, spread = (target - mean).abs().double(), std.double()
    ratio = torch.where(spread > 0, distance / spread.clamp(min=1e-300), torch.where(distance > 0, math.inf, 0.0))
    # A pixel is inside from the first grid lambda >= its ratio on (index K: never); counting
    # the pixels by that index and summing up gives the inside count at every lambda at once.
    first = torch.searchsorted(grid, ratio.contiguous(), right=False)
    counts = torch.zeros(ratio.shape[0], grid.numel() + 1, dtype=torch.float64)
    counts.scatter_add_(1, first, torch.ones_like(ratio))
    return 1.0 - counts.cumsum(dim=1)[:, :-1] / ratio.shape[-1]


def choose_lambda(losses: torch.Tensor, alpha: float, delta: float, grid=LAMBDA_GRID) -> int:
    """The index of lambda_hat in ``grid``, from losses ``(n, K)`` of n images at each lambda.

    Scans from the largest lambda down and stops at the first whose test does not reject
    "risk > alpha" at level delta (Bates et al. 2021's UCB calibration; im2im-uq's
    ``calibrate_model``): lambda_hat is the smallest lambda all of whose larger grid points
    were certified. Raises :class:`CalibrationError` (one line) when n is too small for any
    lambda, or the widest interval is not certified.
    """
    n = losses.shape[0]
    require_images(n, alpha, delta)
    risks = losses.mean(dim=0)
    certified = hoeffding_bentkus_p_value(risks, n, alpha) < delta
    if not certified[-1]:
        raise CalibrationError(
            f"RCPS cannot certify alpha={alpha:g} at delta={delta:g} on these {n} images: even the widest interval "
            f"(mean +- {grid[-1].item():g} std) misses {risks[-1].item():.3g} of their pixels on average"
        )
    failed = (~certified).nonzero()
    return int(failed.max().item()) + 1 if failed.numel() else 0


def interval_mismatch(calibration: IntervalCalibration, model, num_samples, views=None, overlap=None) -> Optional[str]:
    """Why the certified interval does not apply to these draws (one line), or None when it does.

    The guarantee holds for draws from the predictive it was fitted on: as many draws, the
    same views, the default tile overlap, and the same spread (the likelihood-noise factors
    of the spread calibration, or none).
    """

    views = min(default_views(model) if views is None else int(views), int(num_samples))
    tile = tuple(int(n) // 2 for n in model.lr_shape[1:])
    spread = getattr(model, "spread_scale", None)
    spread = None if spread is None else [float(t) for t in spread]
    if int(num_samples) != calibration.num_samples:
        return f"it is certified for {calibration.num_samples} draws, these are {num_samples} (use --samples {calibration.num_samples})"
    if views != calibration.views:
        return f"it is certified for {calibration.views} view(s), these draws mix {views}"
    if overlap is not None and tuple(overlap if isinstance(overlap, (tuple, list)) else (overlap, overlap)) != tile:
        return f"it is certified for the default tile overlap ({tile[0]}), these tiles overlap by {overlap}"
    if spread != calibration.spread_scale:
        fitted, drawn = (
            "the model's own spread" if factors is None else "likelihood noise x" + ", ".join(f"{t:.4g}" for t in factors)
            for factors in (calibration.spread_scale, spread)
        )
        return f"it was fitted on draws with {fitted}, these use {drawn} (calibrate --method rcps again)"
    return None

"""Super-resolution scores: PSNR, SSIM, CRPS, interval coverage, and the bicubic baselines they are compared with."""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..data.batching import dequantize
from ..model.distributions import ConsistentGaussian, block_mean, nearest_upsample
from .latents import latent_share

# ---------------------------------------------------------------------------
# Image-quality metrics
# ---------------------------------------------------------------------------


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, ``10 log10(data_range^2 / MSE)`` (shape ``(B,)``).

    The MSE is taken over all of ``C*H*W`` for each image separately (the
    per-image average is what SR papers report; a PSNR of the pooled MSE is
    a different, smaller-variance number).  ``pred`` is used as given: clamp
    it to ``[0, data_range]`` first if predictions can leave the valid range
    (:func:`super_resolution_metrics` clamps the SR mean, and
    :func:`bicubic_upsample` clamps its output).  Identical images give
    ``+inf`` (the MSE is 0); no epsilon is added so that a perfect
    reconstruction is recognisable, but averaging over such images gives inf.
    """
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(pred.shape)} vs {tuple(target.shape)}")
    mse = (pred - target).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def ssim_kernel_size(height: int, width: int) -> int:
    """Gaussian window size used by :func:`ssim` for an image of this size.

    The standard SSIM window is 11x11 with ``sigma = 1.5`` (Wang et al.,
    2004).  torchmetrics reflect-pads by half a window and averages the SSIM
    map over the whole image, so on small images an 11x11 window covers most
    of the image (on 14x14 it reaches 5 pixels into reflected padding on
    each side) and SSIM degenerates towards a global statistic.  We keep 11
    whenever the window is at most half the image (e.g. 28x28 MNIST) and
    otherwise use the largest odd size ``<= min(H, W) // 2`` (14x14 -> 7,
    8x8 -> 3), never below 3.
    """
    side = min(height, width)
    if side < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {height}x{width}")
    k = min(11, side // 2)
    if k % 2 == 0:
        k -= 1
    return max(k, 3)


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    """The normalized 1-D Gaussian window of ``size`` taps (centred; SSIM's window is its outer product)."""
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    window = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return window / window.sum()


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    kernel_size: Optional[int] = None,
) -> torch.Tensor:
    """Structural similarity per image (shape ``(B,)``): Wang et al. (2004) as torchmetrics computes it.

    ``structural_similarity_index_measure(pred, target, gaussian_kernel=True, sigma=1.5 * k / 11,
    kernel_size=k, data_range=data_range, reduction="none")``: the images reflect-padded by half a
    window, local means, variances and covariance under a ``k x k`` Gaussian window of ``sigma = 1.5 k
    / 11`` (the standard 11x11, 1.5 for ``k = 11``; torchmetrics derives the window from ``sigma`` as
    ``2 int(3.5 sigma + 0.5) + 1``, which is ``k`` again), the SSIM map averaged over channels and
    pixels, with an explicit ``data_range`` (torchmetrics would otherwise infer it from the data,
    which makes the constants ``C1, C2`` depend on image content). Written here, with the window's
    two 1-D passes instead of torchmetrics' 2-D one, because the main job scores five estimates of
    every test image: it is about 2.2x faster (``benchmarks/ssim_time.py``) and saves importing
    torchmetrics (2 s); a test keeps it equal to torchmetrics' to 1e-6. ``kernel_size`` defaults to :func:`ssim_kernel_size` of the image (11 for
    28x28, 7 for 14x14). Identical images give exactly 1.
    """
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if kernel_size is None:
        kernel_size = ssim_kernel_size(pred.shape[-2], pred.shape[-1])
    if kernel_size % 2 == 0 or kernel_size < 3:
        raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
    batch, channels = pred.shape[:2]
    pad = kernel_size // 2
    window = _gaussian_window(kernel_size, 1.5 * kernel_size / 11.0, pred.dtype, pred.device)
    stack = torch.cat([pred, target, pred * pred, target * target, pred * target])
    stack = F.pad(stack, (pad, pad, pad, pad), mode="reflect")  # (5B, C, H + 2 pad, W + 2 pad)
    stack = F.conv2d(stack, window.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    mu_p, mu_t, pp, tt, pt = F.conv2d(stack, window.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels).split(batch)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_pp, mu_tt, mu_pt = mu_p.pow(2), mu_t.pow(2), mu_p * mu_t
    var_p, var_t = torch.clamp(pp - mu_pp, min=0.0), torch.clamp(tt - mu_tt, min=0.0)
    covariance = pt - mu_pt
    similarity = ((2 * mu_pt + c1) * (2 * covariance + c2)) / ((mu_pp + mu_tt + c1) * (var_p + var_t + c2))
    return similarity.reshape(batch, -1).mean(-1)


def bicubic_upsample(y: torch.Tensor, factor: int) -> torch.Tensor:
    """Bicubic upsampling of ``y`` by ``factor``, clamped to ``[0, 1]``: the SR baseline.

    Bicubic interpolation overshoots near edges, hence the clamp (the
    targets live in ``[0, 1]``).
    """
    return F.interpolate(y, scale_factor=factor, mode="bicubic", align_corners=False).clamp(0.0, 1.0)


def order_statistic_ranks(num_samples: int, level: float):
    """0-based ranks of the order statistics bounding the central ``level`` interval.

    The ``alpha = (1 - level) / 2`` and ``1 - alpha`` quantiles sit at
    positions ``alpha (S - 1)`` and ``(1 - alpha)(S - 1)`` of the sorted
    samples; rounding outwards (``floor`` / ``ceil``, torch.quantile's
    ``"lower"`` / ``"higher"`` interpolation) picks the order statistics that
    enclose the nominal interval.
    """
    alpha = (1.0 - level) / 2.0
    lo = math.floor(alpha * (num_samples - 1) + 1e-9)
    hi = math.ceil((1.0 - alpha) * (num_samples - 1) - 1e-9)
    return lo, hi


def interval_coverage(samples: torch.Tensor, target: torch.Tensor, level: float = 0.9) -> torch.Tensor:
    """Fraction of pixels of each target image inside the central ``level`` interval.

    ``samples``: ``(S, B, ...)`` draws from the predictive distribution;
    ``target``: ``(B, ...)``.  Per pixel, the interval runs from the
    empirical ``(1 - level)/2`` quantile to the ``(1 + level)/2`` quantile of
    the ``S`` samples, endpoints included.  Returns ``(B,)``.

    This measures calibration: a target drawn from the predictive
    distribution should land inside about ``level`` of the time.  With few
    samples the *interpolated* empirical quantiles give an interval that is
    too narrow (linear interpolation: ~0.80 instead of 0.9 for ``S = 16``,
    and the shortfall depends on the distribution).  We therefore round the
    quantile positions outwards to the enclosing order statistics (what
    ``torch.quantile`` calls ``interpolation="lower"`` / ``"higher"``).  Then,
    for continuous distributions and a target exchangeable with the samples,
    a new draw falls below the ``i``-th smallest of ``S`` samples with
    probability ``i / (S + 1)`` whatever the distribution, so the expected coverage is
    exactly :func:`expected_interval_coverage` ``(S, level)`` (0.882 for
    ``S = 16``, 0.901 for ``S = 100``), which tends to ``level``.  Ties
    (e.g. samples clamped at 0 or 1) make the closed interval cover more.
    """
    if samples.shape[1:] != target.shape:
        raise ValueError(f"samples {tuple(samples.shape)} do not match target {tuple(target.shape)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    s = samples if samples.dtype in (torch.float32, torch.float64) else samples.float()
    # Sorting instead of torch.quantile: same order statistics, and no limit
    # on the input size (torch.quantile refuses tensors above 2**24 elements).
    i, j = order_statistic_ranks(s.shape[0], level)
    ordered = s.sort(dim=0).values
    lo, hi = ordered[i], ordered[j]
    t = target.to(s.dtype)
    inside = (t >= lo) & (t <= hi)
    return inside.flatten(1).to(s.dtype).mean(1)


def expected_interval_coverage(num_samples: int, level: float = 0.9) -> float:
    """Coverage of :func:`interval_coverage` expected from a perfectly calibrated model.

    With ``S`` exchangeable continuous samples plus the target, the target's
    rank is uniform on ``1..S+1``; the interval between the ``(i+1)``-th and
    ``(j+1)``-th order statistics (0-based ranks ``i, j`` from outward
    rounding of the quantile positions) therefore contains it with
    probability ``(j - i) / (S + 1)``.  Distribution-free; use it to read
    ``sr_coverage90`` computed from a handful of samples.
    """
    lo, hi = order_statistic_ranks(num_samples, level)
    return (hi - lo) / (num_samples + 1)


#: The SR point estimates scored by PSNR and SSIM: the model's mean and the four baselines.
POINT_ESTIMATES = ("sr", "bicubic", "bilinear", "consistent_bicubic", "consistent_bilinear")

#: The central intervals whose coverage the SR evaluation reports.
COVERAGE_LEVELS = (0.5, 0.8, 0.9, 0.95)

#: An HR pixel is a "detail" pixel when it differs from its low-resolution block's mean by
#: more than one grey level: the pixels where super-resolution has something to add.
DETAIL_THRESHOLD = 1.0 / 256

#: The pixel sets of the SR coverage: all, "detail" (:func:`detail_mask`), "edges" (:func:`edge_mask`).
COVERAGE_SUBSETS = ("all", "detail", "edges")


def bilinear_upsample(y: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear upsampling of ``y`` by ``factor`` (no clamp needed: no overshoot)."""
    return F.interpolate(y, scale_factor=factor, mode="bilinear", align_corners=False)


def make_consistent(upsampled: torch.Tensor, y: torch.Tensor, factor: int) -> torch.Tensor:
    """``up + nearest_upsample(y - A up)``: an upsampling moved so its block means are ``y``."""

    return upsampled + nearest_upsample(y - block_mean(upsampled, factor), factor)


def detail_mask(x: torch.Tensor, factor: int) -> torch.Tensor:
    """True where an HR pixel differs from its block's mean by more than one grey level.

    It selects on the truth x, so it is no calibration test: among the pixels a calibrated
    predictive gives one interval, it keeps those the truth left further from the block mean,
    which fall outside more often (:func:`edge_mask` selects on y instead)."""

    return (x - nearest_upsample(block_mean(x, factor), factor)).abs() > DETAIL_THRESHOLD


def edge_mask(y: torch.Tensor, factor: int) -> torch.Tensor:
    """True where the bicubic upsampling of the low-resolution ``y`` differs from y's own pixel
    by more than one grey level: the HR pixels where y itself shows detail (edges, texture).

    A function of y alone, so a predictive p(x | y) that is calibrated covers these pixels as
    often as its level says, unlike the truth-selected :func:`detail_mask`."""

    return (bicubic_upsample(y, factor) - nearest_upsample(y, factor)).abs() > DETAIL_THRESHOLD


def crps_samples(samples: torch.Tensor, target: torch.Tensor, ordered: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-pixel CRPS of the predictive behind ``samples`` (S, ...) at ``target`` (...), S >= 2.

    The unbiased ("fair") sample estimator, mean |X - x| - sum_{s != t} |X_s - X_t| / (2 S (S - 1)),
    with the pair sum from the sorted draws: sum_{s<t} |X_s - X_t| = sum_i (2i - S - 1) X_(i).
    For a point forecast (S = 1) the CRPS is the absolute error. ``ordered``: the draws already
    sorted over dim 0, if the caller has them.
    """
    n = samples.shape[0]
    absolute = (samples - target).abs().mean(0)
    if n == 1:
        return absolute
    ordered = samples.sort(dim=0).values if ordered is None else ordered
    ranks = torch.arange(1, n + 1, dtype=samples.dtype, device=samples.device)
    pair_sum = ((2 * ranks - n - 1).reshape((n,) + (1,) * target.dim()) * ordered).sum(0)
    return absolute - pair_sum / (n * (n - 1))


def coverage_levels(num_samples: int) -> Dict[str, float]:
    """``{"0.5": expected, ...}``: the coverage a calibrated predictive gets from ``num_samples`` draws."""
    return {str(level): expected_interval_coverage(num_samples, level) for level in COVERAGE_LEVELS}


def interval_coverages(samples: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                       levels=COVERAGE_LEVELS) -> Dict[str, float]:
    """``{"0.5": fraction, ...}``: how often ``target`` lies inside the central interval of each level.

    Over all pixels, or the pixels where ``mask`` is True. The intervals are those of
    :func:`interval_coverage` (enclosing order statistics of the ``S`` draws), so a target
    exchangeable with the draws is covered :func:`expected_interval_coverage` of the time.
    """
    counts = _coverage_counts(samples.sort(dim=0).values, target, {"set": mask}, levels)["set"]
    total = counts.pop("pixels")
    return {level: count / max(total, 1) for level, count in counts.items()}


def _coverage_counts(ordered, target, masks, levels=COVERAGE_LEVELS) -> Dict[str, Dict[str, float]]:
    """Per pixel set (``masks``: name -> bool mask or None for all pixels), its pixel count and how
    many targets fall inside each level's interval; ``ordered`` are the draws sorted over dim 0."""
    if ordered.shape[1:] != target.shape:
        raise ValueError(f"samples {tuple(ordered.shape)} do not match target {tuple(target.shape)}")
    masks = {name: torch.ones_like(target, dtype=torch.bool) if m is None else m for name, m in masks.items()}
    counts = {name: {"pixels": m.sum().item()} for name, m in masks.items()}
    for level in levels:
        i, j = order_statistic_ranks(ordered.shape[0], level)
        inside = (target >= ordered[i]) & (target <= ordered[j])
        for name, m in masks.items():
            counts[name][str(level)] = (inside & m).sum().item()
    return counts


def sr_metric_sums(model, x: torch.Tensor, num_samples: int) -> Dict[str, float]:
    """Sums over one batch of every SR metric (PSNR/SSIM per image; coverage and CRPS per pixel)."""
    factor = model.factor
    y = model.downscale(x)
    sr = model.super_resolve(y, num_samples)
    sr_mean = sr.mean.clamp(0.0, 1.0)
    bicubic = bicubic_upsample(y, factor)
    if bicubic.shape != x.shape:
        raise ValueError(f"bicubic upsampling gave {tuple(bicubic.shape)}, expected {tuple(x.shape)}")
    bilinear = bilinear_upsample(y, factor)
    points = {
        "sr": sr_mean,
        "bicubic": bicubic,
        "bilinear": bilinear,
        "consistent_bicubic": make_consistent(bicubic, y, factor),
        "consistent_bilinear": make_consistent(bilinear, y, factor),
    }
    sums: Dict[str, float] = {"num_images": float(x.shape[0]), "num_pixels": float(x.numel())}
    for name, estimate in points.items():
        sums[f"{name}_psnr"] = psnr(estimate, x).sum().item()
        sums[f"{name}_ssim"] = ssim(estimate, x).sum().item()
    ordered = sr.samples.sort(dim=0).values  # once, for the coverage of every pixel set and the CRPS
    masks = {"all": None, "detail": detail_mask(x, factor), "edges": edge_mask(y, factor)}
    counts = _coverage_counts(ordered, x, masks)
    sums["num_detail_pixels"] = counts["detail"]["pixels"]
    sums["num_edge_pixels"] = counts["edges"]["pixels"]
    for subset in COVERAGE_SUBSETS:
        for level in COVERAGE_LEVELS:
            sums[f"coverage_{subset}_{level}"] = counts[subset][str(level)]
    sums["sr_crps"] = crps_samples(sr.samples, x, ordered).sum().item()
    sums["bicubic_mae"] = (bicubic - x).abs().sum().item()
    sums["sr_std_ms"] = sr.std.square().sum().item()
    sums["sr_std_latent_ms"] = sr.std_latent.square().sum().item()
    sums["sr_std_noise_ms"] = sr.std_noise.square().sum().item()
    sums["sr_std_latent_detail_ms"] = sr.std_latent.square()[masks["detail"]].sum().item()
    sums["sr_std_noise_detail_ms"] = sr.std_noise.square()[masks["detail"]].sum().item()
    # What z proposes: how close the best of the S decoder means comes to the truth, per image.
    per_draw = torch.stack([psnr(m, x) for m in sr.means.clamp(0.0, 1.0)])  # (S, B)
    sums["sr_best_of_psnr"] = per_draw.max(0).values.sum().item()
    sums["sr_draw_psnr"] = torch.stack([psnr(d, x) for d in sr.samples.clamp(0.0, 1.0)]).mean(0).sum().item()
    return sums


def sr_metrics_from_sums(sums: Dict[str, float], num_samples: int) -> Dict[str, object]:
    images, pixels, details = sums["num_images"], sums["num_pixels"], max(sums["num_detail_pixels"], 1.0)
    edges = max(sums["num_edge_pixels"], 1.0)
    result: Dict[str, object] = {}
    for name in POINT_ESTIMATES:
        result[f"{name}_psnr"] = sums[f"{name}_psnr"] / images
        result[f"{name}_ssim"] = sums[f"{name}_ssim"] / images
    coverage = {
        "all": {str(level): sums[f"coverage_all_{level}"] / pixels for level in COVERAGE_LEVELS},
        "detail": {str(level): sums[f"coverage_detail_{level}"] / details for level in COVERAGE_LEVELS},
        "edges": {str(level): sums[f"coverage_edges_{level}"] / edges for level in COVERAGE_LEVELS},
        "expected": coverage_levels(num_samples),
        "detail_fraction": sums["num_detail_pixels"] / pixels,
        "edge_fraction": sums["num_edge_pixels"] / pixels,
        "num_samples": int(num_samples),
    }
    result["sr_coverage"] = coverage
    result["sr_coverage90"] = coverage["all"]["0.9"]
    result["sr_coverage90_expected"] = coverage["expected"]["0.9"]
    result["sr_crps"] = sums["sr_crps"] / pixels
    result["bicubic_mae"] = sums["bicubic_mae"] / pixels
    for part in ("std", "std_latent", "std_noise"):
        result[f"sr_{part}_rms"] = math.sqrt(sums[f"sr_{part}_ms"] / pixels)
    result["sr_latent_share"] = latent_share(sums["sr_std_latent_ms"], sums["sr_std_noise_ms"])
    result["sr_latent_share_detail"] = latent_share(sums["sr_std_latent_detail_ms"], sums["sr_std_noise_detail_ms"])
    result["sr_best_of_psnr"] = sums["sr_best_of_psnr"] / images
    result["sr_best_of_gain"] = result["sr_best_of_psnr"] - result["sr_psnr"]
    result["sr_draw_psnr"] = sums["sr_draw_psnr"] / images
    return result


SR_SUM_KEYS = (
    ["num_images", "num_pixels", "num_detail_pixels", "num_edge_pixels", "sr_crps", "bicubic_mae", "sr_std_ms", "sr_std_latent_ms", "sr_std_noise_ms"]
    + ["sr_std_latent_detail_ms", "sr_std_noise_detail_ms", "sr_best_of_psnr", "sr_draw_psnr"]
    + [f"{name}_{metric}" for name in POINT_ESTIMATES for metric in ("psnr", "ssim")]
    + [f"coverage_{subset}_{level}" for subset in COVERAGE_SUBSETS for level in COVERAGE_LEVELS]
)  # fmt: skip


def super_resolution_metrics(model, x: torch.Tensor, num_samples: int = 16) -> Dict[str, object]:
    """Super-resolution quality and calibration of an SRVAE on one batch of HR images ``x``.

    ``y = model.downscale(x)`` is super-resolved by the model (``model.super_resolve(y,
    num_samples)``: draws of the full predictive, the likelihood's noise included) and by the
    baselines bicubic and bilinear upsampling, each also made consistent with y
    (:func:`make_consistent`). The SR point estimate is the predictive mean ``sr.mean``,
    clamped to ``[0, 1]`` (it minimises the expected MSE, hence maximises expected PSNR).

    Calibration is measured **on the draws a user gets**, the same ``sr.samples``: the fraction
    of HR pixels inside their per-pixel central 50/80/90/95% intervals (order statistics,
    :func:`interval_coverage`), over all pixels, over the "detail" pixels
    (:func:`detail_mask`: flat background, which any interval covers, left out; chosen by the
    truth, so even a calibrated predictive covers them less) and over the "edges"
    (:func:`edge_mask`: where y itself shows detail; chosen from y, a calibration test), beside the
    coverage a calibrated predictive gets from ``num_samples`` draws (``expected``, not the
    nominal level). ``sr_crps`` is the CRPS of the predictive (:func:`crps_samples`), to read
    beside ``bicubic_mae``, the CRPS of the bicubic point forecast.

    Returns batch means: ``{sr,bicubic,bilinear,consistent_bicubic,consistent_bilinear}_{psnr,ssim}``,
    ``sr_coverage`` (``{"all": {"0.5": ...}, "detail": {...}, "edges": {...}, "expected": {...},
    "detail_fraction", "edge_fraction", "num_samples"}``), ``sr_coverage90`` and ``sr_coverage90_expected``
    (the all-pixel 90% entry), ``sr_crps``, ``bicubic_mae``, and the root mean squares of the
    three std maps, ``sr_std_rms``, ``sr_std_latent_rms``, ``sr_std_noise_rms``.

    What the latents carry (:mod:`pyro_srvae.metrics.latents`): ``sr_latent_share`` and
    ``sr_latent_share_detail``, the latents' share of the predictive variance
    (``std_latent^2 / (std_latent^2 + std_noise^2)`` pooled over all or the detail pixels: 0
    when z and u change nothing in the decoder mean); ``sr_best_of_psnr``, per image the PSNR
    of the best of the S decoder means (each clamped), and ``sr_best_of_gain``, its excess over
    the mean's PSNR (0 when every draw proposes the mean); ``sr_draw_psnr``, the PSNR of
    the full draws a user gets, noise included. Runs under ``torch.no_grad()``.
    """
    with torch.no_grad():
        sums = sr_metric_sums(model, x, num_samples)
    result = sr_metrics_from_sums(sums, num_samples)
    result["num_images"] = int(x.shape[0])
    return result


def fit_baseline_scale(images: torch.Tensor, factor: int, seed: int = 0) -> float:
    """The one scale of the SR baseline, fitted on (training) images ``images`` (uint8 or uint16).

    The baseline is the Gaussian around the bicubic upsampling made consistent with y,
    conditioned on the block means (:class:`~pyro_srvae.model.distributions.ConsistentGaussian`). Its
    maximum-likelihood variance is the mean squared residual per dimension not fixed by y,
    ``sum ||x - loc||^2 / (N (D - D_y))`` (the residual has zero block means).
    """

    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, images.shape[0], 1000):
        x = dequantize(images[start : start + 1000], generator=generator).double()
        y = block_mean(x, factor)
        loc = make_consistent(bicubic_upsample(y, factor), y, factor)
        total += (x - loc).square().sum().item()
        count += x.shape[0] * (x[0].numel() - y[0].numel())
    return math.sqrt(total / count)


def baseline_log_likelihood(x: torch.Tensor, factor: int, scale: float) -> torch.Tensor:
    """log p(x | y) per image under the consistent-bicubic Gaussian baseline of one ``scale``."""

    y = block_mean(x, factor)
    loc = make_consistent(bicubic_upsample(y, factor), y, factor)
    return ConsistentGaussian(loc, torch.tensor(scale, dtype=x.dtype, device=x.device), y, factor).log_prob(x)

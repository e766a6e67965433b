"""Evaluation of (super-resolution) VAEs written as Pyro model/guide pairs.

This module turns a Pyro ``model``/``guide`` pair into the numbers reported
in the srVAE paper (Gatopoulos, Stol & Tomczak, 2020) and in the VAE
literature in general:

* per-image importance-weighted log-likelihood estimates
  (:func:`iw_log_likelihood`, Burda et al. 2016) and the ELBO estimated from
  the same samples (:func:`iw_and_elbo`);
* bits per dimension for 8- or 16-bit images that were dequantized to ``[0, 1]``
  (:func:`bits_per_dim`);
* image-quality metrics for super-resolution (:func:`psnr`, :func:`ssim`,
  :func:`interval_coverage`) and the bicubic baseline
  (:func:`bicubic_upsample`), bundled in :func:`super_resolution_metrics`;
* :func:`evaluate_model`, which runs all of the above over a uint8 or uint16 test set
  reproducibly.

Everything here is generic over model/guide pairs that follow the package's
conventions: every sample site sits inside ``pyro.plate("data", B, dim=-1)``
(or, more generally, a vectorized plate named ``"data"`` whose size is the
number of images), event dimensions are declared with ``.to_event(...)``,
and networks broadcast over extra leading batch dimensions so that the whole
model can be run under an outer, vectorized "particle" plate.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

import pyro
import pyro.poutine as poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_factor, site_is_subsample

from .latents import latent_metrics_from_sums, latent_share, latent_sum_keys, latent_sums

__all__ = [
    "DATA_PLATE",
    "PARTICLE_PLATE",
    "DEFAULT_PARTICLE_BUDGET",
    "GPU_PARTICLE_BUDGET",
    "particle_budget",
    "evaluation_batch_size",
    "LikelihoodEstimates",
    "log_importance_weights",
    "iw_log_likelihood",
    "iw_and_elbo",
    "elbo_terms",
    "bits_per_dim",
    "psnr",
    "ssim",
    "ssim_kernel_size",
    "bicubic_upsample",
    "interval_coverage",
    "expected_interval_coverage",
    "super_resolution_metrics",
    "crps_samples",
    "interval_coverages",
    "iw_conditional_log_likelihood",
    "make_consistent",
    "bilinear_upsample",
    "detail_mask",
    "edge_mask",
    "fit_baseline_scale",
    "baseline_log_likelihood",
    "evaluate_model",
    "model_device",
    "order_statistic_ranks",
]

#: Name of the plate over images that every model/guide in the package uses.
#: Log-weights are reported per element of this plate.
DATA_PLATE = "data"

#: Name of the vectorized plate over importance samples that this module
#: wraps around model and guide.  Models must not use this name themselves.
PARTICLE_PLATE = "iw_particles"

#: Default bound on ``chunk_size * batch_size``: the number of
#: (particle, image) pairs pushed through the networks at once when
#: ``chunk_size`` is not given.  Activations of the decoder scale with this
#: number, so it is what bounds memory; 1024 keeps a 28x28 conv decoder with
#: a few dozen channels at a few hundred MB per layer.
DEFAULT_PARTICLE_BUDGET = 1024

#: The same bound on a GPU, where a pass of 1024 small images leaves most of the
#: device idle. 4096 keeps the densenet at CIFAR-10 size (~200 channels of 32x32
#: per dense layer) near 3 GB per activation. Chosen, not yet tuned on a GPU.
GPU_PARTICLE_BUDGET = 4096


def particle_budget(device) -> int:
    """(particle, image) pairs per vectorized pass on ``device``."""
    return GPU_PARTICLE_BUDGET if torch.device(device).type == "cuda" else DEFAULT_PARTICLE_BUDGET


def evaluation_batch_size(eval_samples: int, device) -> int:
    """Images per batch of the test-set evaluation, at the end of training and in
    ``pyro-srvae evaluate``: ``2 * particle_budget(device) // eval_samples`` (at least 1).

    The one rule for both: :func:`evaluate_model` derives one seed per batch, so the two
    reproduce each other's numbers only when their batches are the same.
    """
    return max(1, 2 * particle_budget(device) // int(eval_samples))


class LikelihoodEstimates(NamedTuple):
    """Per-image estimates computed from one set of importance samples.

    ``iw``: importance-weighted bound ``log (1/K sum_k w_k)`` (shape ``(B,)``);
    ``elbo``: ``1/K sum_k log w_k`` (shape ``(B,)``).  ``elbo <= iw`` holds
    exactly for every image because both use the same ``K`` weights
    (Jensen's inequality).
    """

    iw: torch.Tensor
    elbo: torch.Tensor


# ---------------------------------------------------------------------------
# Importance weights
# ---------------------------------------------------------------------------


def _default_chunk_size(num_samples: int, batch_size: int, device="cpu") -> int:
    return max(1, min(num_samples, particle_budget(device) // max(batch_size, 1)))


def _vectorize(fn: Callable, size: int, dim: int) -> Callable:
    def vectorized(*args, **kwargs):
        with pyro.plate(PARTICLE_PLATE, size, dim=dim):
            return fn(*args, **kwargs)

    return vectorized


def _site_log_prob(site, num_particles: int, batch_size: int, max_plate_nesting: int) -> torch.Tensor:
    """Unscaled (but masked) ``log_prob`` of one site, reduced to ``(k, B)``.

    ``site["scale"]`` is deliberately ignored: training code may wrap the
    model in ``poutine.scale`` for KL annealing or mini-batch rescaling, and
    an evaluation of ``log p(x)`` must not inherit that.  Masks (from
    ``poutine.mask``) are respected because they encode which terms are part
    of the model at all; masks built into the distribution via
    ``Distribution.mask`` are applied by ``log_prob`` itself.
    """
    name = site["name"]
    log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    log_p = scale_and_mask(log_p, 1.0, site["mask"])
    if not torch.is_tensor(log_p):  # e.g. the number 0 from a fully masked site
        log_p = torch.as_tensor(log_p, dtype=torch.get_default_dtype())
    nesting = max_plate_nesting + 1
    if log_p.dim() > nesting:
        raise ValueError(
            f"log_prob at site '{name}' has shape {tuple(log_p.shape)}, i.e. more than "
            f"max_plate_nesting + 1 = {nesting} batch dimensions. Declare event dimensions "
            f"with .to_event(...) or increase max_plate_nesting."
        )
    data_frames = [f for f in site["cond_indep_stack"] if f.name == DATA_PLATE]
    if not data_frames:
        raise ValueError(
            f"Site '{name}' is not inside a plate named '{DATA_PLATE}'. Per-image importance "
            f"weights are only defined when every sample site is conditionally independent "
            f"across images (global latent variables couple the images)."
        )
    frame = data_frames[0]
    if frame.dim is None or not frame.vectorized:
        raise ValueError(f"The '{DATA_PLATE}' plate at site '{name}' must be vectorized (have a dim).")
    if frame.size != batch_size:
        raise ValueError(
            f"The '{DATA_PLATE}' plate at site '{name}' has size {frame.size}, expected the "
            f"batch size {batch_size} of x."
        )
    particle_dim = -nesting
    data_dim = frame.dim
    if not particle_dim < data_dim < 0:
        raise ValueError(
            f"The '{DATA_PLATE}' plate has dim {data_dim}; with max_plate_nesting="
            f"{max_plate_nesting} it must lie in [{particle_dim + 1}, -1]."
        )
    log_p = log_p.reshape((1,) * (nesting - log_p.dim()) + tuple(log_p.shape))
    other = [d for d in range(-nesting, 0) if d not in (particle_dim, data_dim)]
    if other:
        # remaining plates (e.g. a plate over pixels) are part of one image
        log_p = log_p.sum(other, keepdim=True)
    log_p = log_p.reshape(log_p.shape[particle_dim], log_p.shape[data_dim])
    return log_p.expand(num_particles, batch_size)


def _chunk_log_weights(model, guide, x, num_particles: int, max_plate_nesting: int) -> torch.Tensor:
    """``log p(x, z_k) - log q(z_k | x)`` for ``num_particles`` vectorized draws."""
    return sum(_chunk_log_terms(model, guide, x, num_particles, max_plate_nesting).values())


def _chunk_log_terms(model, guide, x, num_particles: int, max_plate_nesting: int) -> Dict[str, torch.Tensor]:
    """The terms of the log-weights, each ``(num_particles, B)``, signed so that they sum
    to ``log w``: ``"log p(NAME)"`` for model sites, ``"-log q(NAME)"`` for guide sites."""
    batch_size = x.shape[0]
    dim = -(max_plate_nesting + 1)
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(_vectorize(guide, num_particles, dim)).get_trace(x)
        model_trace = poutine.trace(
            poutine.replay(_vectorize(model, num_particles, dim), trace=guide_trace)
        ).get_trace(x)

        terms: Dict[str, torch.Tensor] = {}
        model_latents = set()
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if site["is_observed"]:
                if name in guide_trace.nodes and not site_is_subsample(guide_trace.nodes[name]):
                    raise ValueError(f"Site '{name}' is observed in the model but also appears in the guide.")
                terms[f"log p({name})"] = _site_log_prob(site, num_particles, batch_size, max_plate_nesting)
            elif name in guide_trace.nodes:
                model_latents.add(name)
                terms[f"log p({name})"] = _site_log_prob(site, num_particles, batch_size, max_plate_nesting)
            # else: a latent the guide does not sample.  The model then drew it
            # from its own (conditional) prior, i.e. the proposal *is* the
            # prior for that site and the p/q terms cancel exactly: skip it.

        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if name in model_latents:
                pass
            elif site_is_factor(site):
                pass  # pyro.factor in the guide adjusts log q (Pyro's ELBO convention)
            elif site["is_observed"]:
                raise ValueError(f"Guide site '{name}' is observed; guides must not observe data.")
            elif site["infer"].get("is_auxiliary", False):
                # Pyro convention (e.g. AutoContinuous): the guide samples an
                # auxiliary variable and maps it *bijectively* to the model's
                # latents with Delta sites whose log_density carries the
                # Jacobian, so log q of the auxiliary plus the Delta terms is
                # the density of the latents.  A non-bijective auxiliary would
                # need a reverse model r(aux | z) and is not supported.
                pass
            elif name in model_trace.nodes:
                raise ValueError(f"Site '{name}' is latent in the guide but not a latent sample site in the model.")
            else:
                raise ValueError(
                    f"Guide site '{name}' does not appear in the model. Importance weights need "
                    f"q(latents | x) of the model's latents only; mark deliberate auxiliary "
                    f"variables with infer={{'is_auxiliary': True}} (only valid when they are a "
                    f"bijective reparametrisation of model latents) or remove them."
                )
            terms[f"-log q({name})"] = -_site_log_prob(site, num_particles, batch_size, max_plate_nesting)
    if not terms:
        terms["none"] = x.new_zeros(num_particles, batch_size)
    return terms


def elbo_terms(model, guide, x: torch.Tensor, num_samples: int = 1, max_plate_nesting: int = 1) -> Dict[str, torch.Tensor]:
    """Where the ELBO's nats go: every term, per image, averaged over ``num_samples`` draws.

    Returns ``{"log p(u)": (B,), "log p(y)": ..., "-log q(u)": ..., ...}`` in the order of
    the sites (model first, then guide); the values sum to the per-image ELBO (the
    ``elbo`` of :func:`iw_and_elbo`). For the srVAE, ``log p(y)`` and ``log p(x)`` are
    the data terms of p(y|u) and p(x|y,z[,u]) and ``log p(u) - log q(u)`` and
    ``log p(z) - log q(z)`` the single-sample KL estimates, as in eq. (17) and (20)-(21);
    divided by ``D ln 2`` they say how many bits per dimension each part costs.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    terms = _chunk_log_terms(model, guide, x, num_samples, max_plate_nesting)
    return {name: value.double().mean(0).to(value.dtype) for name, value in terms.items()}


def _iter_log_weight_chunks(
    model, guide, x, num_samples: int, chunk_size: Optional[int], max_plate_nesting: int
) -> Iterator[torch.Tensor]:
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if chunk_size is None:
        chunk_size = _default_chunk_size(num_samples, x.shape[0], x.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    done = 0
    while done < num_samples:
        k = min(chunk_size, num_samples - done)
        yield _chunk_log_weights(model, guide, x, k, max_plate_nesting)
        done += k


def log_importance_weights(
    model,
    guide,
    x: torch.Tensor,
    num_samples: int,
    chunk_size: Optional[int] = None,
    max_plate_nesting: int = 1,
) -> torch.Tensor:
    """Per-image log importance weights ``log p(x, z_k) - log q(z_k | x)``.

    Works for any model/guide pair called as ``model(x)``/``guide(x)`` whose
    sample sites all live in a vectorized plate named ``"data"`` over the
    ``B = x.shape[0]`` images.  The ``k`` samples of a chunk are drawn at
    once by wrapping both programs in ``pyro.plate("iw_particles", k,
    dim=-(max_plate_nesting + 1))``: the guide is traced, the model is
    replayed against the guide trace, and each site's ``fn.log_prob(value)``
    is summed over all dimensions except the particle and data dimensions.

    Accounting, site by site:

    * observed model sites (e.g. ``x`` and, for the SRVAE, ``y``) count in
      ``log p``;
    * latent model sites sampled by the guide count in ``log p`` and ``log q``;
    * latent model sites *not* in the guide are drawn from the model's prior,
      which is then their proposal, so their ``p`` and ``q`` terms cancel and
      are skipped;
    * guide-only sites must be marked ``infer={"is_auxiliary": True}`` (a
      bijective reparametrisation of model latents, as in Pyro's
      ``AutoContinuous``) and then count in ``log q``; anything else raises
      ``ValueError`` rather than silently biasing the estimate.

    Scales from ``poutine.scale`` (KL annealing, mini-batch rescaling) are
    ignored on purpose: evaluation must measure the actual model.  Masks are
    respected.  Everything runs under ``torch.no_grad()``.

    Args:
        model, guide: Pyro callables taking the batch ``x``.
        x: batch of images ``(B, ...)`` (already dequantized to ``[0, 1]``).
        num_samples: ``K``, number of importance samples per image.
        chunk_size: particles per vectorized forward pass.  Default:
            ``particle_budget(x.device) // B`` (at least 1), so that the number
            of decoded images per pass, hence memory, stays bounded
            independently of ``K`` (``K = 1000`` is fine).
        max_plate_nesting: number of plate dims the model uses (1 for the
            package's models); the particle plate goes one dim further left.

    Returns:
        Tensor ``(K, B)``.  Holding it is cheap (``K * B`` numbers); the
        expensive part, the decoder outputs, is freed chunk by chunk.
    """
    return torch.cat(list(_iter_log_weight_chunks(model, guide, x, num_samples, chunk_size, max_plate_nesting)))


def iw_and_elbo(
    model,
    guide,
    x: torch.Tensor,
    num_samples: int,
    chunk_size: Optional[int] = None,
    max_plate_nesting: int = 1,
) -> LikelihoodEstimates:
    """IW log-likelihood and ELBO per image from the same ``K`` samples.

    ``iw = log(1/K sum_k w_k)`` (streaming logsumexp over chunks) and
    ``elbo = 1/K sum_k log w_k``.  Sharing the samples halves the cost and
    guarantees ``elbo <= iw`` image by image.  Accumulation is done in
    float64 (sums of ~1000 terms of size ~1e3 nats lose precision in
    float32) and the result is returned in the dtype of the weights.

    See :func:`log_importance_weights` for the arguments and
    :func:`iw_log_likelihood` for why the reduction is per image.
    """
    running_lse = None
    running_sum = None
    dtype = None
    for log_w in _iter_log_weight_chunks(model, guide, x, num_samples, chunk_size, max_plate_nesting):
        dtype = log_w.dtype
        lw = log_w.double()
        lse = torch.logsumexp(lw, dim=0)
        s = lw.sum(dim=0)
        if running_lse is None:
            running_lse, running_sum = lse, s
        else:
            running_lse = torch.logaddexp(running_lse, lse)
            running_sum = running_sum + s
    iw = running_lse - math.log(num_samples)
    elbo = running_sum / num_samples
    return LikelihoodEstimates(iw=iw.to(dtype), elbo=elbo.to(dtype))


def iw_log_likelihood(
    model,
    guide,
    x: torch.Tensor,
    num_samples: int,
    chunk_size: Optional[int] = None,
    max_plate_nesting: int = 1,
) -> torch.Tensor:
    """Importance-weighted estimate of ``log p(x_i)`` for every image (shape ``(B,)``).

    ``log p(x_i) ~= logsumexp_k(log w_{k,i}) - log K`` (Burda et al., 2016):
    a lower bound in expectation that tightens as ``K`` grows and equals
    ``log p(x_i)`` for every ``K`` when the guide is the exact posterior.

    The reduction is done *per image*.  The original srVAE code averaged the
    log-weights over the batch first and then took the logsumexp over
    samples, i.e. ``logsumexp_k(mean_i log w_{k,i}) - log K``.  That is not
    an estimate of ``mean_i log p(x_i)``: the images are independent, so the
    weight of the whole batch is the *product* of per-image weights, and
    averaging log-weights across images before the logsumexp mixes samples
    of different images (and, for large batches, collapses towards the ELBO).
    Average the per-image values returned here instead.

    For the SRVAE, ``x`` is the high-resolution image and the model also
    observes ``y = downscale(x)``, so the quantity is ``log p(x, y = f(x))``:
    a density of x under the default ``x_given_y="consistent"``, the spec's
    joint under ``"spec"`` (see :func:`evaluate_model`).
    """
    return iw_and_elbo(model, guide, x, num_samples, chunk_size, max_plate_nesting).iw


def iw_conditional_log_likelihood(model, guide, lr_model, lr_guide, x: torch.Tensor, num_samples: int,
                                  chunk_size: Optional[int] = None) -> torch.Tensor:
    """Per-image estimate of log p(x | y) = log p(x, y) - log p(y), each importance-weighted.

    ``model``/``guide`` score (x, y); ``lr_model``/``lr_guide`` the low-resolution half alone
    (for the srVAE: :meth:`~pyro_srvae.SRVAE.lr_model`, :meth:`~pyro_srvae.SRVAE.lr_guide`,
    p(u) p(y|u) and q(u|y)). Exact for any ``K`` when both guides are exact posteriors;
    :func:`evaluate_model` computes the same from the weights it already has.
    """
    joint = iw_log_likelihood(model, guide, x, num_samples, chunk_size)
    return joint - iw_log_likelihood(lr_model, lr_guide, x, num_samples, chunk_size)


# ---------------------------------------------------------------------------
# Bits per dimension
# ---------------------------------------------------------------------------


def bits_per_dim(log_likelihood, num_dims: int, bits: int = 8):
    """Convert a log-likelihood (nats) of dequantized ``bits``-bit data to bits/dim.

    ``bpd = -log p(x) / (D ln 2) + bits`` (8 for 8-bit data, 16 for 16-bit).

    Why the ``+ 8``: the models are densities over ``x = (k + u) / 256`` in
    ``[0, 1)^D`` (``k`` the 8-bit value, ``u ~ U(0, 1)``), while bits/dim is
    conventionally reported for the density over ``k + u`` in ``[0, 256)^D``,
    whose log-likelihood is a discrete-data lower bound.  The change of
    variables ``x = v / 256`` gives ``log p_v(v) = log p_x(x) - D log 256``,
    i.e. ``log2(256) = 8`` extra bits per dimension.  Sanity check: the
    uniform density on ``[0, 1]^D`` (``log p = 0``) gives exactly 8 bits/dim,
    the cost of storing 8-bit pixels with no model.

    16-bit data are dequantized as ``x = (k + u) / 65536`` and the same change of
    variables, ``x = v / 65536``, gives ``+ 16``: the uniform density costs 16 bits/dim,
    the size of a raw 16-bit pixel, so 8- and 16-bit figures each read against their
    own raw size (they are not comparable with each other: the 16-bit number includes
    the 8 low bits that 8-bit data never stored).

    Works elementwise on tensors and on Python floats (returns the same kind).
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits!r}")
    return -log_likelihood / (num_dims * math.log(2.0)) + float(bits)


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
    from .likelihoods import block_mean, nearest_upsample

    return upsampled + nearest_upsample(y - block_mean(upsampled, factor), factor)


def detail_mask(x: torch.Tensor, factor: int) -> torch.Tensor:
    """True where an HR pixel differs from its block's mean by more than one grey level.

    It selects on the truth x, so it is no calibration test: among the pixels a calibrated
    predictive gives one interval, it keeps those the truth left further from the block mean,
    which fall outside more often (:func:`edge_mask` selects on y instead)."""
    from .likelihoods import block_mean, nearest_upsample

    return (x - nearest_upsample(block_mean(x, factor), factor)).abs() > DETAIL_THRESHOLD


def edge_mask(y: torch.Tensor, factor: int) -> torch.Tensor:
    """True where the bicubic upsampling of the low-resolution ``y`` differs from y's own pixel
    by more than one grey level: the HR pixels where y itself shows detail (edges, texture).

    A function of y alone, so a predictive p(x | y) that is calibrated covers these pixels as
    often as its level says, unlike the truth-selected :func:`detail_mask`."""
    from .likelihoods import nearest_upsample

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


def _sr_sums(model, x: torch.Tensor, num_samples: int) -> Dict[str, float]:
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


def _sr_metrics_from_sums(sums: Dict[str, float], num_samples: int) -> Dict[str, object]:
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


_SR_SUM_KEYS = (
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

    What the latents carry (:mod:`pyro_srvae.latents`): ``sr_latent_share`` and
    ``sr_latent_share_detail``, the latents' share of the predictive variance
    (``std_latent^2 / (std_latent^2 + std_noise^2)`` pooled over all or the detail pixels: 0
    when z and u change nothing in the decoder mean); ``sr_best_of_psnr``, per image the PSNR
    of the best of the S decoder means (each clamped), and ``sr_best_of_gain``, its excess over
    the mean's PSNR (0 when every draw proposes the mean); ``sr_draw_psnr``, the PSNR of
    the full draws a user gets, noise included. Runs under ``torch.no_grad()``.
    """
    with torch.no_grad():
        sums = _sr_sums(model, x, num_samples)
    result = _sr_metrics_from_sums(sums, num_samples)
    result["num_images"] = int(x.shape[0])
    return result


def fit_baseline_scale(images: torch.Tensor, factor: int, seed: int = 0) -> float:
    """The one scale of the SR baseline, fitted on (training) images ``images`` (uint8 or uint16).

    The baseline is the Gaussian around the bicubic upsampling made consistent with y,
    conditioned on the block means (:class:`~pyro_srvae.likelihoods.ConsistentGaussian`). Its
    maximum-likelihood variance is the mean squared residual per dimension not fixed by y,
    ``sum ||x - loc||^2 / (N (D - D_y))`` (the residual has zero block means).
    """
    from .data import dequantize
    from .likelihoods import block_mean

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
    from .likelihoods import ConsistentGaussian, block_mean

    y = block_mean(x, factor)
    loc = make_consistent(bicubic_upsample(y, factor), y, factor)
    return ConsistentGaussian(loc, torch.tensor(scale, dtype=x.dtype, device=x.device), y, factor).log_prob(x)


def conditional_bits_per_dim(log_likelihood, num_dims: int, bits: int = 8):
    """-log p(x | y) in bits per dimension of x not fixed by y (``num_dims = D - D_y``), dequantized:
    ``sr_bpd``.

    Convention: a density per detail dimension, on the x whose block means are y, with y the
    block *mean* of x (``models.downscale``). The number depends on how y is parametrised:
    with ``y' = a y`` (block sums: ``a = f^2``; orthonormal Haar coefficients: ``a = f``),
    ``log p(x | y') = log p(x | y) + D_y log a``, so it moves by ``D_y log2(a) / (D - D_y)``
    bits/dim; compare it only with scores in the same convention (``sr_bpd_baseline`` is).

    Not a bound: ``log p(x | y) = log p(x, y) - log p(y)`` is the difference of two
    importance-weighted estimates (:func:`iw_conditional_log_likelihood`), each a lower bound
    in expectation, so their difference errs either way; it converges as ``K`` grows and is
    exact for exact posteriors.

    The ``+ 8`` (``+ bits``) is the same change of variables as in :func:`bits_per_dim`: scaling
    x by 256 scales y by 256 too, so the conditional density gains ``(D - D_y) log 256``.
    """
    return bits_per_dim(log_likelihood, num_dims, bits)


# ---------------------------------------------------------------------------
# Full test-set evaluation
# ---------------------------------------------------------------------------


def model_device(model) -> torch.device:
    """The device of ``model``'s first parameter (else buffer); the CPU for a model without tensors."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return torch.device("cpu")


def evaluate_model(
    model,
    images: torch.Tensor,
    *,
    elbo_samples: int,
    iw_samples: int,
    batch_size: int = 64,
    sr_samples: int = 16,
    device: Optional[Union[str, torch.device]] = None,
    seed: int = 0,
    progress: bool = False,
    chunk_size: Optional[int] = None,
    super_resolution: bool = True,
    rank: int = 0,
    world_size: int = 1,
    baseline_scale: Optional[float] = None,
    latents: bool = True,
) -> Dict[str, float]:
    """Evaluate a VAE or SRVAE on a uint8 (or uint16) test set ``images`` ``(N, C, H, W)``.

    Each batch is dequantized as ``x = (k + u) / 256`` (``/ 65536`` for uint16, whose bits/dim
    then carry ``+ 16``: :func:`bits_per_dim`; the result's ``bits`` says which)
    (:func:`pyro_srvae.data.dequantize`, the same map as in training) with
    ``u`` drawn from a private CPU ``torch.Generator`` seeded with ``seed``, then
    ``max(elbo_samples, iw_samples)`` log-weights are drawn per image; the
    ELBO uses the first ``elbo_samples`` (mean of log-weights) and the IW
    estimate the first ``iw_samples`` (logmeanexp).  With equal counts,
    ``iw_bpd <= elbo_bpd`` holds exactly.  Both are converted with
    :func:`bits_per_dim` using ``D = C*H*W`` of ``x``.

    For the SRVAE the model observes both ``x`` and ``y = downscale(x)``; what
    the estimate of ``log p(x, y = f(x))`` is as a function of x is the model's
    ``x_density``, returned under that key: ``"exact"`` (the default
    ``x_given_y="consistent"``: a normalized density of x, comparable with a
    VAE's), ``"bound"`` (y on the 8-bit grid: a lower bound on one) or
    ``"joint"`` (``x_given_y="spec"``: y scored twice, not a density of x).

    For an SRVAE (detected by ``hasattr(model, "super_resolve")``) also
    reports the metrics of :func:`super_resolution_metrics` (PSNR/SSIM of the SR mean
    and of four baselines, coverage of the central intervals on the SR draws over all
    and over detail pixels, CRPS), computed on the same dequantized ``x``, and, for a
    model whose ``x_density`` is ``"exact"``, ``sr_bpd``: the conditional likelihood of
    super-resolution, ``-log p(x | y)`` in bits per dimension of x not fixed by y
    (``sr_bpd_dims = D - D_y``), from ``log p(x, y) - log p(y)``, each importance-weighted
    with ``iw_samples`` (log p(y) with the model's ``lr_model``/``lr_guide``: p(u) p(y|u)
    and q(u|y) alone). With ``baseline_scale`` (:func:`fit_baseline_scale` on the training
    set), ``sr_bpd_baseline`` is the same score of the consistent-bicubic Gaussian
    baseline (:func:`baseline_log_likelihood`). ``sr_bpd`` is None for a bound or joint.
    Its convention (:func:`conditional_bits_per_dim`): a density per detail dimension with y
    the block *mean*, and a difference of two importance-weighted estimates, not a bound.

    Reproducibility: latent samples are drawn through Pyro, i.e. torch's
    global RNG.  It is seeded for every batch from ``(seed, batch index)``
    inside ``torch.random.fork_rng``, so the caller's RNG state (CPU and the
    CUDA device used) is restored on exit and evaluating in the middle of
    training does not change the training run.  An ``nn.Module`` model is
    put in ``eval()`` mode for the duration (batch-norm/dropout must not use
    batch statistics) and its previous mode is restored.

    Sharding: with ``world_size > 1`` (an initialised ``torch.distributed``
    process group; every rank must call this with the same arguments) rank
    ``r`` evaluates batches ``r, r + world_size, ...`` and the sums are
    all-reduced, so every rank returns the numbers one process would have
    computed, up to the order of floating-point additions: each batch gets
    the same dequantization and latent noise whichever rank evaluates it.

    Args:
        model: a VAE/SRVAE-like object with ``.model(x)`` and ``.guide(x)``.
        images: uint8 or uint16 tensor ``(N, C, H, W)`` of raw pixel values (8- or
            16-bit data; the bit depth follows the dtype).
        elbo_samples, iw_samples: ``K`` for the ELBO and the IW estimate.
        batch_size: images per batch; memory is bounded independently of
            ``K`` by chunking the particles (see ``chunk_size``).
        sr_samples: draws per image for the SR metrics (SRVAE only).
        device: where to evaluate; default: the model's parameters' device.
        seed: seeds both the dequantization noise and the latent samples.
        progress: show a tqdm bar over batches (if tqdm is installed).
        super_resolution: set False to skip the SR metrics (e.g. a quick per-epoch ELBO).
        latents: set False to skip what the latents carry (:mod:`pyro_srvae.latents`: ``kl_u_bits``,
            ``kl_z_bits``, ``active_u``, ``active_z`` of ``u_dim``, ``z_dim``), reported by default.
        chunk_size: particles per vectorized pass, passed on to
            :func:`log_importance_weights` (default chosen from the batch size).
        rank, world_size: this process's share of a sharded evaluation.

    Returns a dict of Python floats averaged over all images: ``elbo_bpd``,
    ``iw_bpd``, ``elbo``, ``iw_log_likelihood`` (nats per image) and the SR
    metrics, plus the ints ``iw_samples``, ``elbo_samples`` and
    ``num_images``.
    """
    if elbo_samples < 1 or iw_samples < 1:
        raise ValueError("elbo_samples and iw_samples must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank {rank} of {world_size}")
    if world_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(f"world_size {world_size} needs an initialised torch.distributed process group")
    images = torch.as_tensor(images)
    if images.dtype not in (torch.uint8, torch.uint16):
        raise TypeError(f"images must be uint8 or uint16 (N, C, H, W), got dtype {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("images is empty")
    device = torch.device(device) if device is not None else model_device(model)
    is_sr = super_resolution and hasattr(model, "super_resolve")
    num_dims = images[0].numel()
    k_total = max(elbo_samples, iw_samples)

    from .data import bit_depth, dequantize  # lazy: keeps this module importable on its own

    bits = bit_depth(images)

    gen = torch.Generator().manual_seed(seed)
    batch_indices = range(math.ceil(n / batch_size))
    if progress:
        try:
            from tqdm.auto import tqdm

            batch_indices = tqdm(batch_indices, desc="evaluate", leave=False)
        except ImportError:  # pragma: no cover - tqdm is optional
            pass

    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    was_training = model.training if isinstance(model, torch.nn.Module) else None
    sums: Dict[str, float] = {"elbo": 0.0, "iw": 0.0, "log_p_x_given_y": 0.0, "baseline_log_p_x_given_y": 0.0}
    conditional = is_sr and getattr(model, "x_density", None) == "exact" and hasattr(model, "lr_model")
    sr_sums: Dict[str, float] = {}
    carried: Dict[str, float] = {}  # what the latents carry (pyro_srvae.latents)
    try:
        if was_training is not None:
            model.eval()
        with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
            for index in batch_indices:
                batch = images[index * batch_size : (index + 1) * batch_size]
                # Every rank draws the dequantization noise of every batch (cheap next to
                # the model), so each batch's noise is the one a single process would draw.
                x = dequantize(batch, generator=gen)
                if index % world_size != rank:
                    continue  # another rank's batch
                x = x.to(device)
                batch_seed = _batch_seed(seed, index)
                torch.default_generator.manual_seed(batch_seed)
                if cuda_devices:
                    with torch.cuda.device(cuda_devices[0]):
                        torch.cuda.manual_seed(batch_seed)
                log_w = log_importance_weights(model.model, model.guide, x, k_total, chunk_size=chunk_size)
                lw = log_w.double()
                iw = torch.logsumexp(lw[:iw_samples], 0) - math.log(iw_samples)
                sums["elbo"] += lw[:elbo_samples].mean(0).sum().item()
                sums["iw"] += iw.sum().item()
                if conditional:  # log p(x | y) = log p(x, y) - log p(y), both importance-weighted
                    lw_y = log_importance_weights(model.lr_model, model.lr_guide, x, iw_samples, chunk_size=chunk_size)
                    iw_y = torch.logsumexp(lw_y.double(), 0) - math.log(iw_samples)
                    sums["log_p_x_given_y"] += (iw - iw_y).sum().item()
                    if baseline_scale is not None:
                        baseline = baseline_log_likelihood(x.double(), model.factor, baseline_scale)
                        sums["baseline_log_p_x_given_y"] += baseline.sum().item()
                if latents:
                    for key, value in latent_sums(model, x).items():
                        carried[key] = carried.get(key, 0.0) + value
                if is_sr:
                    for key, value in _sr_sums(model, x, sr_samples).items():
                        sr_sums[key] = sr_sums.get(key, 0.0) + value
    finally:
        if was_training is not None:
            model.train(was_training)
    if is_sr:
        sums.update({f"sr.{key}": value for key, value in sr_sums.items()})
    sums.update({f"latent.{key}": value for key, value in carried.items()})
    if world_size > 1:
        # One all-reduce of every sum, on the evaluation device (nccl reduces GPU tensors).
        # A rank may have evaluated no batch: every rank's dict must have the same keys.
        if is_sr and not sr_sums:
            sums.update({f"sr.{key}": 0.0 for key in _SR_SUM_KEYS})
        if latents and not carried:
            sums.update({f"latent.{key}": 0.0 for key in latent_sum_keys(model)})
        names = sorted(sums)
        totals = torch.tensor([sums[name] for name in names], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(totals, op=torch.distributed.ReduceOp.SUM)
        sums = dict(zip(names, totals.tolist()))

    elbo = sums["elbo"] / n
    iw = sums["iw"] / n
    result: Dict[str, float] = {
        "elbo_bpd": float(bits_per_dim(elbo, num_dims, bits)),
        "iw_bpd": float(bits_per_dim(iw, num_dims, bits)),
        "bits": bits,
        "elbo": elbo,
        "iw_log_likelihood": iw,
        "iw_samples": int(iw_samples),
        "elbo_samples": int(elbo_samples),
        "num_images": int(n),
    }
    if getattr(model, "x_density", None) is not None:
        result["x_density"] = model.x_density
    result.update(latent_metrics_from_sums({k[7:]: v for k, v in sums.items() if k.startswith("latent.")}, n))
    if is_sr:
        result.update(_sr_metrics_from_sums({k[3:]: v for k, v in sums.items() if k.startswith("sr.")}, sr_samples))
        fixed = model.lr_shape[0] * model.lr_shape[1] * model.lr_shape[2]
        result["sr_bpd_dims"] = num_dims - fixed
        result["sr_bpd"] = float(conditional_bits_per_dim(sums["log_p_x_given_y"] / n, num_dims - fixed, bits)) if conditional else None
        result["sr_bpd_baseline"] = None
        if conditional and baseline_scale is not None:
            result["sr_bpd_baseline"] = float(conditional_bits_per_dim(sums["baseline_log_p_x_given_y"] / n, num_dims - fixed, bits))
            result["sr_baseline_scale"] = float(baseline_scale)
    return result


def _batch_seed(seed: int, batch_index: int) -> int:
    """The seed of one evaluation batch: a hash, so that nearby seeds share no stream."""
    from .checkpoint import derive_seed  # lazy: keeps this module importable on its own

    return derive_seed(seed, "evaluation batch", batch_index)

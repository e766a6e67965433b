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
from typing import Callable, Dict, Iterator, NamedTuple, Optional

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_factor, site_is_subsample

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

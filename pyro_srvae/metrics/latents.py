"""What the latents carry: KL per image, active units, and the latents' share of the SR predictive.

Section 3 of the spec rests on y -> x being one-to-many ("plusieurs x pour un y donné"): the
latent z of p(z|y,u) (eq. 16) and q(z|x,y,u) (eq. 19) is what is meant to carry the many. An srVAE
whose z carries nothing ("posterior collapse") is a regression net with a noise model, and its
ELBO can still look fine. These numbers say how much the latents carry:

* ``kl_{site}_bits``: KL(q || p) of each latent site, in bits per image, as in the ELBO (eq. 17,
  21): KL(q(u|y) || p(u)) and E_{q(u|y)} KL(q(z|.) || p(z|y,u)), closed form where torch has one
  (log q - log p at the guide's draw otherwise, an unbiased estimate). The rate: what the
  encoder tells the decoder about x beyond what the prior already knows.
* ``active_{site}``: active units (Burda et al. 2016): dimensions whose posterior mean
  E_q[z_d | x] varies across images, Cov_x > :data:`ACTIVE_UNIT_THRESHOLD`, measured in the
  units of the (conditional) prior: :func:`posterior_means`.
* the latents' share of the SR predictive's variance, ``sr_latent_share`` (all pixels) and
  ``sr_latent_share_detail``, and the best of S decoder-mean draws against the mean,
  ``sr_best_of_gain`` (dB), computed with the SR metrics
  (:func:`pyro_srvae.metrics.sr_scores.super_resolution_metrics`, :func:`latent_share`).

Sums per batch (:func:`latent_sums`) and the totals' metrics (:func:`latent_metrics_from_sums`)
are apart so that a sharded evaluation can all-reduce the sums.
"""

import contextlib
import math
from typing import Dict

import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent, LowRankMultivariateNormal, Normal, kl_divergence

#: Burda et al.'s threshold on Cov_x(E_q[z_d | x]) for an active unit.
ACTIVE_UNIT_THRESHOLD = 0.01


def _latent_sites(trace):
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }


class _AtPosteriorMeans(Messenger):
    """Every latent site takes its distribution's mean instead of a draw."""

    def _pyro_sample(self, msg):
        if not msg["is_observed"] and not site_is_subsample(msg):
            msg["value"] = msg["fn"].mean
            msg["done"] = True


def _traces(model, x, at_means=False):
    """The guide traced (at its posterior means with ``at_means``), the model replayed on it."""
    with _AtPosteriorMeans() if at_means else contextlib.nullcontext():
        guide_trace = poutine.trace(model.guide).get_trace(x)
    return guide_trace, poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)


def kl_per_image(model, x) -> Dict[str, torch.Tensor]:
    """``{site: KL(q || p) per image}`` (nats, shape ``(B,)``) of each latent site of ``model``.

    One draw of the guide, the model replayed on it: the KL of z is at the drawn u, so its
    average over images estimates E_{q(u|y)} KL(q(z|.) || p(z|y,u)) without bias.
    """
    guide_trace, model_trace = _traces(model, x)
    result = {}
    for name, guide_site in _latent_sites(guide_trace).items():
        q, p = guide_site["fn"], model_trace.nodes[name]["fn"]
        try:
            result[name] = kl_divergence(q, p)
        except NotImplementedError:  # a mixture prior: log q - log p at the guide's draw
            value = guide_site["value"]
            result[name] = q.log_prob(value) - p.log_prob(value)
    return result


def _is_gaussian(d):
    """A diagonal normal, or the low-rank one of ``SRVAE(z_prior_rank=R)`` (standardized by its marginals)."""
    diagonal = isinstance(d, Independent) and d.reinterpreted_batch_ndims == 1 and isinstance(d.base_dist, Normal)
    return diagonal or isinstance(d, LowRankMultivariateNormal)


def posterior_means(model, x) -> Dict[str, torch.Tensor]:
    """``{site: posterior mean}``, ``(B, D)``, in the prior's own units where it has them.

    Each site's E_q[site | x] is taken with the latents it depends on at their own posterior
    means. Against a Gaussian prior it is standardized by that prior's marginals,
    (E_q - E_p) / sd_p: for p(u) = N(0, I) this is the posterior mean itself (Burda et al.'s
    active units); for z it removes what the conditional prior p(z|y,u) already says from y,
    so that a z whose posterior only follows its prior (nothing learnt from x) counts as
    inactive however much its mean moves with y. Other priors (a mixture) keep the raw mean.
    """
    guide_trace, model_trace = _traces(model, x, at_means=True)
    result = {}
    for name, site in _latent_sites(guide_trace).items():
        mean, prior = site["value"], model_trace.nodes[name]["fn"]
        result[name] = (mean - prior.mean) / prior.stddev if _is_gaussian(prior) else mean
    return result


def latent_sums(model, x) -> Dict[str, float]:
    """The sums over one batch behind :func:`latent_metrics_from_sums`: the KLs, and per
    dimension the posterior means and their squares (for Cov_x of the active units)."""
    sums = {}
    for name, kl in kl_per_image(model, x).items():
        sums[f"kl_{name}"] = kl.double().sum().item()
    for name, means in posterior_means(model, x).items():
        means = means.double().reshape(means.shape[0], -1)
        for d, (total, square) in enumerate(zip(means.sum(0).tolist(), means.square().sum(0).tolist())):
            sums[f"mean_{name}_{d}"] = total
            sums[f"square_{name}_{d}"] = square
    return sums


def latent_sum_keys(model) -> list:
    """The keys :func:`latent_sums` returns for ``model`` (for a rank that saw no batch)."""
    dims = {"u": getattr(model, "u_dim", None), "z": model.z_dim}
    keys = []
    for name, dim in dims.items():
        if dim is None:
            continue
        keys.append(f"kl_{name}")
        keys += [f"{kind}_{name}_{d}" for kind in ("mean", "square") for d in range(dim)]
    return keys


def latent_metrics_from_sums(sums: Dict[str, float], num_images: int) -> Dict[str, object]:
    """``kl_{site}_bits`` (bits per image), ``active_{site}`` and ``{site}_dim`` for each latent site."""
    result: Dict[str, object] = {}
    for key in sorted(k for k in sums if k.startswith("kl_")):
        name = key[3:]
        result[f"kl_{name}_bits"] = sums[key] / num_images / math.log(2)
        dim = sum(1 for k in sums if k.startswith(f"mean_{name}_"))
        variances = [
            sums[f"square_{name}_{d}"] / num_images - (sums[f"mean_{name}_{d}"] / num_images) ** 2 for d in range(dim)
        ]
        result[f"active_{name}"] = sum(v > ACTIVE_UNIT_THRESHOLD for v in variances)
        result[f"{name}_dim"] = dim
    return result


def latent_share(latent_ms: float, noise_ms: float) -> float:
    """The latents' share of the predictive variance, Var_latent / (Var_latent + E Var_noise),
    from the law of total variance (pooled over pixels); 0 when both are 0."""
    total = latent_ms + noise_ms
    return latent_ms / total if total > 0 else 0.0

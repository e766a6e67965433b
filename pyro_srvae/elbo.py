"""ELBO estimators, swappable by name: Pyro builds every objective.

========================  ===================================================================
name                      estimator
========================  ===================================================================
``trace``                 ``Trace_ELBO``: all terms of eq. (2)/(11)/(20) by sampling
``meanfield``             ``TraceMeanField_ELBO``: the KL terms of eq. (4), (17), (21) in
                          closed form where one is registered (Gaussian-Gaussian), sampled
                          otherwise (the mixture prior of sec. 5)
``meanfield-mog-bound``   :class:`MixtureKLBound_ELBO`: as ``meanfield``, with KL(q || sum_i
                          w_i p_i) replaced by its upper bound sum_i w_i KL(q || p_i), eq. (23)
``renyi``                 ``RenyiELBO`` (option ``alpha``, default 0: the IWAE bound)
``graph``                 ``TraceGraph_ELBO``
========================  ===================================================================
"""

import torch
from torch.distributions import kl_divergence

import pyro.distributions as dist
from pyro.distributions.util import scale_and_mask
from pyro.infer import RenyiELBO, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled, torch_item

ELBO_NAMES = ("trace", "meanfield", "meanfield-mog-bound", "renyi", "graph")


def mixture_kl_upper_bound(q, p):
    """sum_i w_i KL(q || p_i) >= KL(q || sum_i w_i p_i), eq. (23) (Hershey & Olsen 2007).

    ``q`` is a diagonal Gaussian ``Independent(Normal, 1)``; ``p`` a
    ``MixtureSameFamily`` of diagonal Gaussians over the same event. The inequality
    is the convexity of KL in its second argument; it is an equality for one
    component. Returns a tensor of the broadcast batch shape of ``q`` and ``p``.
    """
    weights = p.mixture_distribution.probs  # (..., K)
    components = p.component_distribution.base_dist  # Normal with (..., K, D) parameters
    q_loc = q.base_dist.loc.unsqueeze(-2)  # (..., 1, D): broadcast against the K components
    q_scale = q.base_dist.scale.unsqueeze(-2)
    kl_per_component = kl_divergence(dist.Normal(q_loc, q_scale), components).sum(-1)  # (..., K)
    return (weights * kl_per_component).sum(-1)


def _is_diagonal_gaussian(d):
    return isinstance(d, dist.Independent) and d.reinterpreted_batch_ndims == 1 and isinstance(d.base_dist, dist.Normal)


def _is_gaussian_mixture(d):
    return isinstance(d, torch.distributions.MixtureSameFamily) and _is_diagonal_gaussian(d.component_distribution)


class MixtureKLBound_ELBO(TraceMeanField_ELBO):
    """The mean-field ELBO with the mixture KL bounded by eq. (23).

    For every latent site whose prior is a mixture of diagonal Gaussians and whose
    guide is a diagonal Gaussian, the sampled term log q - log p of
    ``TraceMeanField_ELBO`` is replaced by sum_i w_i KL(q || p_i): a deterministic
    (zero-variance) upper bound on the KL, hence a valid, looser lower bound on log p(x).
    Every other site is handled exactly as by ``TraceMeanField_ELBO``.
    """

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        # The loop of TraceMeanField_ELBO, with one more closed form for the KL term.
        elbo_particle = 0
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample":
                continue
            if model_site["is_observed"]:
                elbo_particle = elbo_particle + model_site["log_prob_sum"]
                continue
            guide_site = guide_trace.nodes[name]
            if is_validation_enabled():
                check_fully_reparametrized(guide_site)
            q, p = guide_site["fn"], model_site["fn"]
            if _is_gaussian_mixture(p) and _is_diagonal_gaussian(q):
                kl_qp = mixture_kl_upper_bound(q, p)  # eq. (23)
            else:
                try:
                    kl_qp = kl_divergence(q, p)
                except NotImplementedError:
                    entropy_term = guide_site["score_parts"].entropy_term
                    elbo_particle = elbo_particle + model_site["log_prob_sum"] - entropy_term.sum()
                    continue
            kl_qp = scale_and_mask(kl_qp, scale=guide_site["scale"], mask=guide_site["mask"])
            elbo_particle = elbo_particle - kl_qp.sum()

        for name, guide_site in guide_trace.nodes.items():
            if guide_site["type"] == "sample" and name not in model_trace.nodes:
                raise ValueError(
                    f"guide site {name!r} has no counterpart in the model; "
                    "the eq. (23) bound ELBO supports no auxiliary guide sites"
                )

        loss = -(elbo_particle.detach() if torch._C._get_tracing_state() else torch_item(elbo_particle))
        return loss, -elbo_particle


def make_elbo(name, num_particles=1, vectorize_particles=False, **options):
    """The Pyro ELBO called ``name``; see the module docstring for the names.

    ``options`` go to the Pyro class (``alpha`` for ``renyi``, ``max_plate_nesting``,
    ...). ``max_plate_nesting`` defaults to 1 -- the models' single ``"data"`` plate --
    which spares Pyro a guessing run of the model when particles are vectorized.
    """
    options.setdefault("max_plate_nesting", 1)
    common = dict(num_particles=num_particles, vectorize_particles=vectorize_particles, **options)
    if name == "trace":
        return Trace_ELBO(**common)
    if name == "meanfield":
        return TraceMeanField_ELBO(**common)
    if name == "meanfield-mog-bound":
        return MixtureKLBound_ELBO(**common)
    if name == "renyi":
        common.setdefault("alpha", 0.0)
        return RenyiELBO(**common)
    if name == "graph":
        return TraceGraph_ELBO(**common)
    raise ValueError(f"unknown ELBO {name!r}; expected one of {', '.join(ELBO_NAMES)}")

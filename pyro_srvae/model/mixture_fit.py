"""What training on the eq. (23) bound does to a mixture prior's weights: the toy fit.

A 4-component mixture prior p(u) = sum_i w_i N(mu_i, diag sigma_i^2)
(:class:`~pyro_srvae.model.priors.MixtureOfGaussiansPrior`) is fitted to a fixed aggregate posterior:
200 diagonal Gaussians q_n(u) in two clusters around (-2, 0) and (+2, 0)
(:func:`posterior_clusters`). Two objectives, the same optimiser and start
(:func:`fit_mixture_prior`):

* ``"bound"``: mean_n sum_i w_i KL(q_n || p_i), the upper bound of eq. (23) (what
  ``--elbo meanfield-mog-bound`` minimises);
* ``"sampled"``: mean_n E_q[log q_n(u) - log p(u)], the KL itself, by reparameterized sampling
  (what ``--elbo meanfield`` does for a mixture prior).

The bound is linear in w, so its minimiser puts all the weight on the component with the
smallest sum_n KL(q_n || p_i): one Gaussian stretched over both clusters. The measured effect
(2,000 steps) is in docs/derivation.md, "the bound of eq. (23)"; ``scripts/mixture_bound_collapse.py``
prints it and the tutorial notebook runs it at its own budget. Living in the package, the fit runs
from any working directory.
"""

import math

import pyro.distributions as dist
import torch

from .elbo import mixture_kl_upper_bound
from .priors import MixtureOfGaussiansPrior

OBJECTIVES = ("bound", "sampled")


def posterior_clusters(num=200, dim=2, separation=2.0, scale=0.3, seed=0):
    """The fixed q_n: half around (-separation, 0, ...), half around (+separation, 0, ...)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(num, dim)
    centres[: num // 2, 0], centres[num // 2 :, 0] = -separation, separation
    loc = centres + 0.3 * torch.randn(num, dim, generator=g)
    q_scale = scale * (1 + 0.2 * torch.rand(num, dim, generator=g))
    return dist.Normal(loc, q_scale).to_event(1)


def mean_kl(q, prior, num_samples=4096, seed=1):
    """mean_n KL(q_n || p) by Monte Carlo (the exact objective, up to sampling error)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        u = q.sample((num_samples,))
        return (q.log_prob(u) - prior().log_prob(u)).mean().item()


def effective_components(weights):
    """exp(H(w)): 1 for a single component, K for K equal weights."""
    weights = weights.double()
    return math.exp(-(weights * torch.log(weights.clamp_min(1e-300))).sum().item())


def fit_mixture_prior(objective, q, components=4, steps=600, lr=0.05, particles=16, seed=0):
    """Fit a mixture prior to ``q`` under ``objective`` ("bound" or "sampled"); returns a summary."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected 'bound' or 'sampled'")
    torch.manual_seed(seed)
    prior = MixtureOfGaussiansPrior(q.event_shape[0], components)
    optimizer = torch.optim.Adam(prior.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        if objective == "bound":
            loss = mixture_kl_upper_bound(q, prior()).mean()  # eq. (23)
        else:
            u = q.rsample((particles,))
            loss = (q.log_prob(u) - prior().log_prob(u)).mean()
        loss.backward()
        optimizer.step()
    weights = prior.weights.detach()
    return {
        "objective": objective,
        "weights": [round(w, 4) for w in weights.tolist()],
        "effective_components": effective_components(weights),
        "mean_kl": mean_kl(q, prior),
        "bound": mixture_kl_upper_bound(q, prior()).mean().item(),
    }

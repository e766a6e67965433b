"""Priors on the top latent: p(z) of the VAE (sec. 2) and p(u) of the srVAE (sec. 3-5).

Both are ``torch.nn`` modules whose ``forward()`` returns a Pyro distribution with
``event_shape == (dim,)`` and empty batch shape; ``pyro.plate("data", B)`` broadcasts
it over the batch. The conditional prior p(z|y,u) of eq. (16) is a network
(:class:`~pyro_srvae.model.networks.GaussianEncoder`), not one of these; the closed-form KL of a
diagonal q(z|.) from its low-rank variant (``SRVAE(z_prior_rank=R)``) is here:
:func:`kl_diagonal_lowrank`.
"""

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Independent, LowRankMultivariateNormal, Normal, register_kl

PRIORS = ("gaussian", "mog")


class StandardNormalPrior(nn.Module):
    """p(u) = N(0, I), the prior of sections 2.3.3 and 3.5.1."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        # Buffers, so the prior follows the model to the GPU with ``.to(device)``.
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self):
        return dist.Normal(self.loc, self.scale).to_event(1)


class MixtureOfGaussiansPrior(nn.Module):
    """p(u) = sum_i w_i N(mu_i, diag sigma_i^2), eq. (22), with learnable w, mu, sigma.

    Built as Pyro's ``MixtureSameFamily(Categorical, Independent(Normal))`` so that
    ``Trace_ELBO`` scores it exactly and ``TraceMeanField_ELBO`` falls back to a
    sampled KL term (no closed form exists). The upper bound of eq. (23) is in
    :mod:`pyro_srvae.model.elbo`.
    """

    def __init__(self, dim, num_components=10, init_spread=1.0):
        super().__init__()
        if int(num_components) != num_components or num_components < 1:
            raise ValueError(f"mog_components must be a positive integer, got {num_components!r}")
        self.dim = dim
        self.num_components = int(num_components)
        # Spread the component means so the mixture does not start as one Gaussian
        # counted K times (identical components get identical gradients forever).
        self.logits = nn.Parameter(torch.zeros(self.num_components))
        self.means = nn.Parameter(init_spread * torch.randn(self.num_components, dim))
        self.raw_scales = nn.Parameter(torch.zeros(self.num_components, dim))

    @property
    def weights(self):
        return F.softmax(self.logits, dim=-1)

    @property
    def scales(self):
        # softplus(0) + 0.3 ~= 1: components start with unit scale, and never collapse
        # to a point, which would make the sampled KL term blow up.
        return F.softplus(self.raw_scales) + 0.3069

    def forward(self):
        components = dist.Normal(self.means, self.scales).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)


def make_prior(name, dim, num_components=10):
    """The prior called ``name`` ('gaussian' or 'mog') over a ``dim``-vector."""
    if name == "gaussian":
        return StandardNormalPrior(dim)
    if name == "mog":
        return MixtureOfGaussiansPrior(dim, num_components)
    raise ValueError(f"unknown prior {name!r}; expected one of {', '.join(PRIORS)}")


@register_kl(Independent, LowRankMultivariateNormal)
def kl_diagonal_lowrank(q, p):
    """KL(N(m, diag(s^2)) || N(mu, W W^T + diag(d))) in closed form, per batch element.

    Eq. (21)'s KL of z when p(z|y,u) has a low-rank covariance (``SRVAE(z_prior_rank=R)``):
    0.5 [tr(S^-1_p S_q) + delta^T S^-1_p delta - D + log|S_p| - log|S_q|], with the Woodbury
    identity and the determinant lemma through the R x R capacitance C = I + W^T D^-1 W, so
    the cost is linear in D. Registered with torch, so ``TraceMeanField_ELBO`` and
    :mod:`pyro_srvae.metrics.latents` use it; a q that is not a diagonal normal raises
    ``NotImplementedError``, and Pyro then falls back to the sampled log q - log p.
    """
    if not (isinstance(q.base_dist, Normal) and q.reinterpreted_batch_ndims == 1):
        raise NotImplementedError
    q_scale, delta = q.base_dist.scale, q.base_dist.loc - p.loc
    factor, diag = p.cov_factor, p.cov_diag
    scaled = factor / diag.unsqueeze(-1)  # D^-1 W, (..., D, R): p's batch shape; q's broadcasts below
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    capacitance_tril = torch.linalg.cholesky(eye + factor.transpose(-1, -2) @ scaled)  # once per p, not per q

    def woodbury_term(rows):  # ||L^-1 rows||_F^2 = tr(C^-1 rows rows^T), rows (..., R, k)
        return torch.linalg.solve_triangular(capacitance_tril, rows, upper=False).square().sum((-1, -2))

    # tr(S_p^-1 S_q) and delta^T S_p^-1 delta: the diagonal's part less Woodbury's correction
    trace = (q_scale.square() / diag).sum(-1) - woodbury_term((scaled * q_scale.unsqueeze(-1)).transpose(-1, -2))
    mahalanobis = (delta.square() / diag).sum(-1) - woodbury_term(scaled.transpose(-1, -2) @ delta.unsqueeze(-1))
    log_det_p = 2 * capacitance_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1) + diag.log().sum(-1)
    log_det_q = 2 * q_scale.log().sum(-1)
    return 0.5 * (trace + mahalanobis - delta.shape[-1] + log_det_p - log_det_q)

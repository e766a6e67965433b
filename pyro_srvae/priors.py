"""Priors on the top latent: p(z) of the VAE (sec. 2) and p(u) of the srVAE (sec. 3-5).

Both are ``torch.nn`` modules whose ``forward()`` returns a Pyro distribution with
``event_shape == (dim,)`` and empty batch shape; ``pyro.plate("data", B)`` broadcasts
it over the batch. The conditional prior p(z|y,u) of eq. (16) is a network
(:class:`~pyro_srvae.networks.GaussianEncoder`), not one of these.
"""

import torch
import torch.nn.functional as F
from torch import nn

import pyro.distributions as dist

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
    :mod:`pyro_srvae.elbo`.
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

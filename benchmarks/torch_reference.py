"""The negative ELBOs of the library's models, written by hand in plain PyTorch.

No Pyro here: the same networks, the same draws in the same order as the Pyro guides
(u, then z, each by ``Normal.rsample``), so with the same RNG state the two losses
agree to float precision. The benchmark uses this twice: as the baseline a Pyro step
is timed against, and as a cross-check that Pyro builds the ELBO the spec derives.

    eq. (4):  VAE   -ELBO = -log p(x|z) + KL(q(z|x) || p(z))
    eq. (17): simple -ELBO = -log p(y|u) - log p(x|y,z) + KL(q(z|x) || p(z|y,u)) + KL(q(u|y) || p(u))
    eq. (21): full   -ELBO = the same with q(z|x,y,u) and p(x|y,z,u)

For the srVAE's default ``x_given_y="consistent"``, log p(x|y,.) is the Gaussian given its
block means, log N(x; mu, gamma^2 I) - log N(A x; A mu, gamma^2 / f^2 I), written out here
(the spec's literal form, ``x_given_y="spec"``, is the first term alone).
"""

import torch
from torch.distributions import Normal, kl_divergence


def _kl_or_sample(q, p, value, analytic):
    """KL(q || p) in closed form (mean-field ELBO) or its one-sample estimate (Trace_ELBO)."""
    if analytic:
        try:
            return kl_divergence(q, p)
        except NotImplementedError:  # the mixture prior: sampled, as TraceMeanField_ELBO does
            pass
    return q.log_prob(value) - p.log_prob(value)


def _diagonal(loc, scale):
    return torch.distributions.Independent(Normal(loc, scale), 1)


def _image_log_density(image, loc, gamma):
    return Normal(loc, gamma).log_prob(image).flatten(1).sum(-1)


def vae_loss(model, x, analytic_kl=True):
    """-ELBO of eq. (4), summed over the batch."""
    q_z = _diagonal(*model.encoder_z(x))
    z = q_z.rsample()
    log_px = _image_log_density(x, model.decoder_x(z), model.gamma_x)
    return (-log_px + _kl_or_sample(q_z, model.prior_z(), z, analytic_kl)).sum()


def srvae_loss(model, x, analytic_kl=True):
    """-ELBO of eq. (17) (simple guide) or eq. (20)-(21) (full guide), summed over the batch."""
    y = model.downscale(x)
    q_u = _diagonal(*model.encoder_u(y))
    u = q_u.rsample()
    q_z = _diagonal(*model.encode_z(x, y, u))
    z = q_z.rsample()
    if model.x_density not in ("exact", "joint"):
        raise ValueError("no hand-written reference for the srVAE's quantized y")
    log_py = _image_log_density(y, model.decoder_y(u), model.gamma_y)
    x_loc = model.decoder_x(y, z, u if model.full else None)  # upsample(y) + residual, before conditioning
    log_px = _image_log_density(x, x_loc, model.gamma_x)
    if model.x_density == "exact":  # minus the density of the block means, which y already scored
        log_px = log_px - _image_log_density(y, torch.nn.functional.avg_pool2d(x_loc, model.factor),
                                             model.gamma_x / model.factor)  # fmt: skip
    kl_u = _kl_or_sample(q_u, model.prior_u(), u, analytic_kl)
    kl_z = _kl_or_sample(q_z, _diagonal(*model.prior_z(y, u)), z, analytic_kl)
    return (-log_py - log_px + kl_u + kl_z).sum()


def reference_loss(model, x, elbo_name):
    """The hand-written counterpart of ``make_elbo(elbo_name)`` for ``model``."""
    if elbo_name not in ("trace", "meanfield"):
        raise ValueError(f"no hand-written reference for ELBO {elbo_name!r}")
    analytic = elbo_name == "meanfield"
    if hasattr(model, "super_resolve"):
        return srvae_loss(model, x, analytic)
    return vae_loss(model, x, analytic)

"""The full guide's q(z|x,y,u) as a residual normal around p(z|y,u) (``z_posterior="residual"``,
NVAE's parametrization): its KL is a closed form of the encoder's outputs alone, so a prior whose
scale shrinks cannot blow it up (the photographs' divergence, docs/training-faults.md)."""

import pytest
import torch
from pyro import poutine
from torch.distributions import kl_divergence

from pyro_srvae.model.srvae import SRVAE
from pyro_srvae.training.config import ConfigError, TrainConfig


def z_sites(model, x):
    """q(z|x,y,u) and p(z|y,u) at the same draw of u, as the ELBO's KL(z) term sees them."""
    guide_trace = poutine.trace(model.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    return guide_trace, guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"]


def shrink_prior_scale(model, factor):
    forward = model.prior_z.forward
    model.prior_z.forward = lambda *args: (lambda loc, scale: (loc, scale * factor))(*forward(*args))


@pytest.mark.parametrize("z_channels", [0, 1])
def test_the_residual_posterior_s_kl_is_the_closed_form_of_the_encoder_s_outputs(z_channels):
    torch.manual_seed(0)
    model = SRVAE((1, 8, 8), guide="full", u_dim=2, z_dim=3, hidden=4, z_channels=z_channels, z_posterior="residual")
    x = torch.rand(5, 1, 8, 8)
    guide_trace, q, p = z_sites(model, x)
    y, u = model.downscale(x), guide_trace.nodes["u"]["value"]
    dloc, dscale = model.encoder_z(torch.cat([x, model.decoder_x.upsample(y)], dim=-3), u)
    # q = N(mu_p + sigma_p dmu, sigma_p dsigma): KL per dimension (dmu^2 + dsigma^2 - 1)/2 - log dsigma
    closed_form = (0.5 * (dloc.square() + dscale.square() - 1) - dscale.log()).flatten(1).sum(-1)
    assert torch.allclose(kl_divergence(q, p), closed_form, rtol=1e-4, atol=1e-4)
    assert torch.allclose(q.base_dist.loc, p.base_dist.loc + p.base_dist.scale * dloc.flatten(1), atol=1e-6)


@pytest.mark.parametrize("z_posterior, most_growth", [("residual", 1.001), ("direct", None)])
def test_a_prior_scale_shrunk_1000x_leaves_the_residual_kl_as_it_was(z_posterior, most_growth):
    torch.manual_seed(1)
    model = SRVAE((1, 8, 8), guide="full", u_dim=2, z_dim=3, hidden=4, z_posterior=z_posterior)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        torch.manual_seed(2)  # the same draw of u both times
        before = kl_divergence(*z_sites(model, x)[1:])
        shrink_prior_scale(model, 1e-3)  # what one Adam step did to some photographs' p(z|y,u): 0.18 -> 0.004
        torch.manual_seed(2)
        after = kl_divergence(*z_sites(model, x)[1:])
    growth = (after / before).max().item()
    if most_growth is not None:
        assert growth < most_growth
    else:  # the direct parametrization: the KL scales as 1/sigma_p^2
        assert growth > 1e4


@pytest.mark.parametrize("guide", ["simple", "full"])
def test_the_floor_holds_p_z_s_scale_up_where_its_network_drifts_to_zero(guide):
    torch.manual_seed(3)
    model = SRVAE((1, 8, 8), guide=guide, u_dim=2, z_dim=3, hidden=4, z_scale_floor=0.01)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        torch.manual_seed(4)
        _, _, before = z_sites(model, x)
        shrink_prior_scale(model, 1e-6)
        torch.manual_seed(4)
        _, _, after = z_sites(model, x)
    # the network's scale shrunk a million times: what is left of p(z|y,u)'s is the floor's 0.01
    assert torch.allclose(after.base_dist.scale, 0.01 + 1e-6 * (before.base_dist.scale - 0.01), rtol=1e-5)


def test_the_residual_posterior_needs_the_full_guide():
    with pytest.raises(ValueError, match="needs the full guide"):
        SRVAE((1, 8, 8), guide="simple", z_posterior="residual")
    with pytest.raises(ConfigError, match="--z-posterior residual .* needs --model srvae --guide full"):
        TrainConfig(guide="simple", z_posterior="residual").validate()
    with pytest.raises(ConfigError, match="--z-scale-floor"):
        TrainConfig(model="vae", z_scale_floor=0.1).validate()

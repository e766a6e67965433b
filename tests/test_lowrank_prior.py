"""p(z|y,u) over a z map with a low-rank covariance (``SRVAE(z_prior_rank=R)``): N(mu, W W^T +
diag(sigma^2)), whose draws vary together over the map in R directions, and eq. (21)'s KL of a
diagonal q(z|x,y,u) from it in closed form (:func:`pyro_srvae.model.priors.kl_diagonal_lowrank`)."""

import pytest
import torch
from pyro import poutine
from torch.distributions import Independent, Laplace, MultivariateNormal, kl_divergence

import pyro
import pyro.distributions as dist
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_srvae.cli import main as cli_main
from pyro_srvae.metrics.latents import kl_per_image, posterior_means
from pyro_srvae.model.srvae import SRVAE
from pyro_srvae.model.priors import kl_diagonal_lowrank
from pyro_srvae.training.config import ConfigError, TrainConfig


def dense_kl(q, p):
    """The same KL between full-covariance normals, torch's closed form."""
    q_dense = MultivariateNormal(q.base_dist.loc, torch.diag_embed(q.base_dist.scale.square()))
    return kl_divergence(q_dense, MultivariateNormal(p.loc, p.covariance_matrix))


@pytest.mark.parametrize("q_batch, p_batch", [((5,), (5,)), ((4, 5), (5,)), ((5,), (4, 5))])
def test_the_kl_from_a_low_rank_normal_is_the_dense_closed_form(q_batch, p_batch):
    generator = torch.Generator().manual_seed(0)
    dims, rank = 9, 3

    def draw(*shape, low=0.0):
        return torch.rand(*shape, generator=generator, dtype=torch.float64) + low

    q = dist.Normal(draw(*q_batch, dims) - 0.5, draw(*q_batch, dims, low=0.2)).to_event(1)
    p = dist.LowRankMultivariateNormal(draw(*p_batch, dims) - 0.5, 2 * draw(*p_batch, dims, rank) - 1,
                                       draw(*p_batch, dims, low=0.1))
    kl = kl_divergence(q, p)
    assert kl.shape == torch.broadcast_shapes(q_batch, p_batch)
    assert torch.allclose(kl, dense_kl(q, p), rtol=1e-10, atol=1e-10)


def test_a_q_that_is_not_a_diagonal_normal_falls_back_to_sampling():
    p = dist.LowRankMultivariateNormal(torch.zeros(3), torch.ones(3, 1), torch.ones(3))
    with pytest.raises(NotImplementedError):  # Pyro's mean-field ELBO then uses log q - log p at a draw
        kl_diagonal_lowrank(dist.Laplace(torch.zeros(3), torch.ones(3)).to_event(1), p)
    with pytest.raises(NotImplementedError):  # through torch's dispatch, as the ELBO calls it
        kl_divergence(Independent(Laplace(torch.zeros(3), torch.ones(3)), 1), p)


def tiny_model(rank, seed=0):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    return SRVAE((1, 8, 8), guide="full", u_dim=2, hidden=4, z_channels=1, z_prior_rank=rank)


def test_the_model_s_p_z_has_the_networks_low_rank_covariance_and_the_latents_use_its_kl():
    model, x = tiny_model(rank=2), torch.rand(5, 1, 8, 8)
    guide_trace = poutine.trace(model.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    q, p = guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"]
    loc, scale, factor = model.prior_z(model.downscale(x), guide_trace.nodes["u"]["value"])
    assert isinstance(p, dist.LowRankMultivariateNormal) and factor.shape == (5, 16, 2)
    assert torch.allclose(p.covariance_matrix, factor @ factor.transpose(-1, -2) + torch.diag_embed(scale.square()))
    torch.manual_seed(1)
    kl = kl_per_image(model, x)["z"]
    torch.manual_seed(1)  # the same draw of u, so the same p(z|y,u)
    guide_trace = poutine.trace(model.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    assert torch.allclose(kl, dense_kl(guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"]), rtol=1e-4)
    means = posterior_means(model, x)["z"]  # standardized by p(z|y,u)'s marginal standard deviations
    assert means.shape == (5, 16) and means.abs().max() < 1e3


def test_the_mean_field_elbo_takes_eq_21_s_kl_of_z_in_closed_form():
    model, x = tiny_model(rank=3, seed=2), torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.manual_seed(3)
        loss = TraceMeanField_ELBO().loss(model.model, model.guide, x)
        torch.manual_seed(3)  # the same draws of u and z
        guide_trace = poutine.trace(model.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    observed = sum(site["log_prob_sum"] for site in model_trace.nodes.values()
                   if site["type"] == "sample" and site["is_observed"])
    kl_u = kl_divergence(guide_trace.nodes["u"]["fn"], model_trace.nodes["u"]["fn"]).sum()
    kl_z = dense_kl(guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"]).sum()
    # -ELBO (eq. 21) = -log p(y|u) - log p(x|y,z,u) + KL(u) + KL(z), every KL exact, not log q - log p at the draw
    assert loss == pytest.approx((kl_u + kl_z - observed).item(), rel=1e-5)


def test_a_rank_0_prior_is_the_diagonal_one_of_eq_16():
    model, x = tiny_model(rank=0), torch.rand(3, 1, 8, 8)
    model_trace = poutine.trace(model.model).get_trace(x)
    p = model_trace.nodes["z"]["fn"]
    assert isinstance(p, dist.Independent) and isinstance(p.base_dist, dist.Normal)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(z_channels=0), "z_channels > 0"),
        (dict(z_channels=1, z_posterior="residual"), "z_posterior='direct'"),
        (dict(z_channels=1, z_prior_rank=-1), "z_prior_rank must be an integer >= 0"),
    ],
)
def test_the_model_refuses_a_low_rank_prior_where_it_has_no_meaning(options, message):
    options = {"z_prior_rank": 2, **options}
    with pytest.raises(ValueError, match=message):
        SRVAE((1, 8, 8), guide="full", **options)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(z_channels=0), "--z-prior-rank is a covariance over the srVAE's z map"),
        (dict(model="vae", guide="simple"), "--z-prior-rank is a covariance over the srVAE's z map"),
        (dict(z_posterior="residual"), "--z-prior-rank is a covariance over the srVAE's z map"),
        (dict(free_bits=0.5), "--free-bits counts the KL per dimension"),
        (dict(z_prior_rank=-2), "--z-prior-rank must be an integer >= 0"),
    ],
)
def test_the_configuration_refuses_impossible_low_rank_settings(options, message):
    options = {"guide": "full", "z_prior_rank": 2, **options}
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options).validate()


def test_the_command_line_refuses_a_low_rank_prior_on_a_vector_z(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--guide", "full", "--z-channels", "0", "--z-prior-rank", "2", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert "--z-prior-rank is a covariance over the srVAE's z map" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()

"""The spec's equations, checked numerically against the models' Pyro code.

Each test names the equation of ``../shared/seeds/000_73dd18991a948ff9.txt`` it checks;
docs/derivation.md links back here.
"""

import math

import pytest
import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_srvae import SRVAE, VAE, make_elbo, mixture_kl_upper_bound
from pyro_srvae.model.likelihoods import GaussianLikelihood
from conftest import tiny_images

SMALL = dict(hidden=8)


def gaussian_log_density_by_hand(x, x_hat, gamma):
    """eq. (3)/(13) with the constant kept: -||x - x_hat||^2/(2 gamma^2) - k log gamma - (k/2) log 2 pi."""
    k = x[0].numel()
    squared_error = ((x - x_hat) ** 2).flatten(1).sum(-1)
    return -squared_error / (2 * gamma**2) - k * math.log(gamma) - k / 2 * math.log(2 * math.pi)


def gaussian_data_term_mse_form(x, x_hat, gamma):
    """eq. (14): -N [MSE/(2 gamma^2) + log gamma], plus the -(N/2) log 2 pi the spec drops."""
    n = x[0].numel()
    mse = ((x - x_hat) ** 2).flatten(1).mean(-1)
    return -n * (mse / (2 * gamma**2) + torch.log(gamma)) - n / 2 * math.log(2 * math.pi)


def diagonal_gaussian_kl_by_hand(q_loc, q_scale, p_loc, p_scale):
    """KL(N(q_loc, q_scale^2) || N(p_loc, p_scale^2)) summed over the last dim."""
    return (
        torch.log(p_scale / q_scale) + (q_scale**2 + (q_loc - p_loc) ** 2) / (2 * p_scale**2) - 0.5
    ).sum(-1)


@pytest.mark.parametrize("gamma", [0.05, 0.3, 1.7])
def test_eq3_gaussian_decoder_log_density(gamma):
    """eq. (3)/(13)-(14): the package's Gaussian likelihood, with its locations a residual over an
    offset (the SR decoder's upsampled y, section 3.1), scores an image by the spec's data term
    plus its constant, with x_hat = offset + residual and the scale gamma given."""
    x = tiny_images(3, (2, 5, 6))
    residual, offset = torch.rand(3, 2, 5, 6) - 0.5, torch.rand(3, 2, 5, 6)
    likelihood = GaussianLikelihood()
    value = likelihood.distribution(residual, offset, scale=torch.tensor(gamma)).log_prob(x)
    x_hat = offset + residual
    assert value.shape == (3,)  # one number per image: the pixels are summed
    assert torch.allclose(value, gaussian_log_density_by_hand(x, x_hat, gamma), rtol=1e-5)
    assert torch.allclose(value, gaussian_data_term_mse_form(x, x_hat, torch.tensor(gamma)), rtol=1e-5)
    torch.testing.assert_close(likelihood.mean(residual, offset), x_hat)


def test_eq3_model_x_site_uses_learned_gamma():
    """The VAE's x site is N(mu_theta(z), gamma_x^2 I) with the model's own gamma_x."""
    model = VAE((1, 8, 8), **SMALL)
    with torch.no_grad():
        model.log_gamma_x.fill_(math.log(0.37))
    x = tiny_images()
    guide_trace = poutine.trace(model.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    z = guide_trace.nodes["z"]["value"]
    expected = gaussian_log_density_by_hand(x, model.decoder_x(z), 0.37)
    assert torch.allclose(model_trace.nodes["x"]["fn"].log_prob(x), expected, rtol=1e-5)


def test_eq4_vae_meanfield_loss_is_hand_assembled_negative_elbo():
    """eq. (4): -ELBO = data term + KL(q(z|x) || N(0, I)), per image, summed over the batch."""
    model = VAE((1, 8, 8), **SMALL)
    x = tiny_images()
    guide_trace = poutine.trace(model.guide).get_trace(x)
    loss = TraceMeanField_ELBO().loss(
        poutine.replay(model.model, trace=guide_trace), poutine.replay(model.guide, trace=guide_trace), x
    )
    z = guide_trace.nodes["z"]["value"]
    with torch.no_grad():
        q_loc, q_scale = model.encoder_z(x)
        data = gaussian_data_term_mse_form(x, model.decoder_x(z), model.gamma_x)
        kl = diagonal_gaussian_kl_by_hand(q_loc, q_scale, torch.zeros_like(q_loc), torch.ones_like(q_scale))
    assert loss == pytest.approx((-data + kl).sum().item(), rel=1e-5)


def srvae_negative_elbo_by_hand(model, x, u, z):
    """eq. (17) (simple guide) or eq. (20)-(21) (full guide), from the networks' outputs.

    N_y[MSE(y, y_hat)/(2 gamma_y^2) + log gamma_y] + N_x[MSE(x, x_hat)/(2 gamma_x^2) + log gamma_x]
      + KL(q(z|.) || p(z|y,u)) + KL(q(u|y) || p(u)), with the log 2 pi constants kept.
    """
    with torch.no_grad():
        y = model.downscale(x)
        y_term = gaussian_data_term_mse_form(y, model.decoder_y(u), model.gamma_y)
        if model.full:  # p(x|y,z,u) and q(z|x,y,u): sec. 4
            x_hat = model.decoder_x(y, z, u)
            q_z = model.encoder_z(torch.cat([x, model.decoder_x.upsample(y)], dim=1), u)
        else:  # p(x|y,z) and q(z|x): sec. 3
            x_hat = model.decoder_x(y, z)
            q_z = model.encoder_z(x)
        x_term = gaussian_data_term_mse_form(x, x_hat, model.gamma_x)
        kl_z = diagonal_gaussian_kl_by_hand(*q_z, *model.prior_z(y, u))  # eq. (16) / (21)
        u_loc, u_scale = model.encoder_u(y)
        kl_u = diagonal_gaussian_kl_by_hand(u_loc, u_scale, torch.zeros_like(u_loc), torch.ones_like(u_scale))
    return (-y_term - x_term + kl_z + kl_u).sum().item()


@pytest.mark.parametrize("guide", ["simple", "full"])
def test_eq17_eq20_21_srvae_meanfield_loss_is_hand_assembled(guide):
    """eq. (17) for the simple guide, eq. (20)-(21) for the full guide, same u and z."""
    model = SRVAE((1, 8, 8), guide=guide, x_given_y="spec", **SMALL)
    x = tiny_images()
    guide_trace = poutine.trace(model.guide).get_trace(x)
    u, z = guide_trace.nodes["u"]["value"], guide_trace.nodes["z"]["value"]
    loss = TraceMeanField_ELBO().loss(
        poutine.replay(model.model, trace=guide_trace), poutine.replay(model.guide, trace=guide_trace), x
    )
    assert loss == pytest.approx(srvae_negative_elbo_by_hand(model, x, u, z), rel=1e-5)


def test_eq23_bound_is_exact_for_one_component():
    q = dist.Normal(torch.randn(5, 3), torch.rand(5, 3) + 0.2).to_event(1)
    loc, scale = torch.randn(1, 3), torch.rand(1, 3) + 0.5
    p = dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(1)), dist.Normal(loc, scale).to_event(1))
    exact = diagonal_gaussian_kl_by_hand(q.base_dist.loc, q.base_dist.scale, loc, scale)
    assert torch.allclose(mixture_kl_upper_bound(q, p), exact, rtol=1e-5)


def test_eq23_bound_is_at_least_the_sampled_kl():
    """sum_i w_i KL(q || p_i) >= KL(q || sum_i w_i p_i), the latter by Monte Carlo."""
    torch.manual_seed(1)
    q = dist.Normal(torch.randn(6, 2), torch.rand(6, 2) + 0.3).to_event(1)
    p = dist.MixtureSameFamily(
        dist.Categorical(logits=torch.randn(4)),
        dist.Normal(2 * torch.randn(4, 2), torch.rand(4, 2) + 0.5).to_event(1),
    )
    samples = q.sample((200_000,))
    log_ratio = q.log_prob(samples) - p.log_prob(samples)
    sampled_kl = log_ratio.mean(0)
    standard_error = log_ratio.std(0) / math.sqrt(samples.shape[0])
    bound = mixture_kl_upper_bound(q, p)
    assert (bound >= sampled_kl - 4 * standard_error).all()
    # and it is a strict bound for well-separated components, not a restatement of the KL
    assert (bound - sampled_kl > 4 * standard_error).any()


def test_eq23_bound_elbo_uses_the_bound_for_the_mixture_prior():
    """meanfield-mog-bound = the eq. (17) terms with KL(q(u|y)||p(u)) replaced by eq. (23)."""
    model = SRVAE((1, 8, 8), prior="mog", mog_components=3, x_given_y="spec", **SMALL)
    x = tiny_images()
    guide_trace = poutine.trace(model.guide).get_trace(x)
    replayed = [poutine.replay(f, trace=guide_trace) for f in (model.model, model.guide)]
    bound_loss = make_elbo("meanfield-mog-bound").loss(*replayed, x)
    meanfield_loss = TraceMeanField_ELBO().loss(*replayed, x)  # samples the u term instead
    u = guide_trace.nodes["u"]["value"]
    with torch.no_grad():
        q_u = dist.Normal(*model.encoder_u(model.downscale(x))).to_event(1)
        p_u = model.prior_u()
        sampled_u_term = (q_u.log_prob(u) - p_u.log_prob(u)).sum()
        bound_u_term = mixture_kl_upper_bound(q_u, p_u).sum()
    assert bound_loss == pytest.approx(meanfield_loss - sampled_u_term.item() + bound_u_term.item(), rel=1e-5)


@pytest.mark.parametrize("model_class", [VAE, SRVAE])
def test_eq23_bound_elbo_equals_meanfield_without_a_mixture(model_class):
    model = model_class((1, 8, 8), **SMALL)
    x = tiny_images()
    guide_trace = poutine.trace(model.guide).get_trace(x)
    replayed = [poutine.replay(f, trace=guide_trace) for f in (model.model, model.guide)]
    assert make_elbo("meanfield-mog-bound").loss(*replayed, x) == pytest.approx(
        make_elbo("meanfield").loss(*replayed, x), rel=1e-6
    )


@pytest.mark.parametrize("guide", ["simple", "full"])
def test_trace_elbo_agrees_with_meanfield_within_standard_error(guide):
    """Sampled KL terms (Trace_ELBO) and analytic ones (TraceMeanField_ELBO) estimate the same ELBO."""
    model = SRVAE((1, 8, 8), guide=guide, x_given_y="spec", **SMALL)
    x = tiny_images(2)
    num = 400
    trace_losses = torch.tensor([Trace_ELBO().loss(model.model, model.guide, x) for _ in range(num)])
    meanfield_losses = torch.tensor([TraceMeanField_ELBO().loss(model.model, model.guide, x) for _ in range(num)])
    difference = trace_losses.mean() - meanfield_losses.mean()
    standard_error = math.sqrt(trace_losses.var() / num + meanfield_losses.var() / num)
    assert abs(difference) < 4 * standard_error
    # the analytic KL removes variance, which is why meanfield exists at all
    assert meanfield_losses.var() < trace_losses.var()


def _z_site_loc(model, x, u):
    trace = poutine.trace(poutine.condition(model.guide, data={"u": u})).get_trace(x)
    return trace.nodes["z"]["fn"].base_dist.loc


def _x_site_loc(model, x, u, z):
    trace = poutine.trace(poutine.condition(model.model, data={"u": u, "z": z})).get_trace(x)
    return trace.nodes["x"]["fn"].base_dist.loc


@pytest.mark.parametrize("guide", ["simple", "full"])
def test_dependency_structure(guide):
    """simple: q(z|x) and p(x|y,z) ignore u (eq. 8, 10); full: q(z|x,y,u), p(x|y,z,u) (eq. 7, 19)."""
    model = SRVAE((1, 8, 8), guide=guide, x_given_y="spec", **SMALL)
    x = tiny_images()
    u1, u2 = torch.randn(4, model.u_dim), torch.randn(4, model.u_dim)
    z = torch.randn(4, model.z_dim)
    q_z_moves = not torch.allclose(_z_site_loc(model, x, u1), _z_site_loc(model, x, u2))
    p_x_moves = not torch.allclose(_x_site_loc(model, x, u1, z), _x_site_loc(model, x, u2, z))
    assert q_z_moves == (guide == "full")
    assert p_x_moves == (guide == "full")
    # p(z|y,u) depends on u in both variants (eq. 16)
    y = model.downscale(x)
    assert not torch.allclose(model.prior_z(y, u1)[0], model.prior_z(y, u2)[0])


def _script(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eq23_objective_concentrates_the_mixture_weights():
    """eq. (23) is linear in w: fitted on it, a 4-component prior of two clusters drifts to one
    component and a worse KL; fitted on the sampled KL it keeps both clusters."""
    collapse = _script("mixture_bound_collapse")
    q = collapse.posterior_clusters()
    bound = collapse.fit("bound", q, steps=600)
    sampled = collapse.fit("sampled", q, steps=600)
    assert bound["effective_components"] < 1.6 < 1.9 < sampled["effective_components"]
    assert bound["mean_kl"] > sampled["mean_kl"] + 0.5
    assert bound["bound"] >= bound["mean_kl"] - 0.01  # still an upper bound on the fit it produced

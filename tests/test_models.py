"""The public API of the models: training with every estimator, generation, bad input."""

import math

import pytest
import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer import SVI
from pyro.optim import Adam
from pyro.poutine.util import site_is_subsample

from pyro_srvae import ELBO_NAMES, SRVAE, VAE, downscale, make_elbo
from conftest import tiny_images

SMALL = dict(hidden=8)
VARIANTS = [
    pytest.param(VAE, {}, id="vae"),
    pytest.param(SRVAE, {"guide": "simple"}, id="srvae-simple"),
    pytest.param(SRVAE, {"guide": "full"}, id="srvae-full"),
]


def _average_loss(model, x, repeats=20):
    elbo = make_elbo("meanfield", num_particles=repeats, vectorize_particles=True)
    pyro.set_rng_seed(123)
    return elbo.loss(model.model, model.guide, x)


@pytest.mark.parametrize("elbo_name", ELBO_NAMES)
@pytest.mark.parametrize("prior", ["gaussian", "mog"])
@pytest.mark.parametrize("model_class, kwargs", VARIANTS)
def test_every_combination_lowers_its_loss(model_class, kwargs, prior, elbo_name):
    x = tiny_images(16, (1, 8, 8))
    model = model_class((1, 8, 8), prior=prior, mog_components=3, **kwargs, **SMALL)
    before = _average_loss(model, x)
    # The MoG ELBOs also run with vectorized particles: the networks take (P, B, ...) inputs.
    elbo = make_elbo(elbo_name, num_particles=2, vectorize_particles=prior == "mog")
    svi = SVI(model.model, model.guide, Adam({"lr": 1e-2}), elbo)
    for _ in range(40):
        loss = svi.step(x)
        assert math.isfinite(loss)
    after = _average_loss(model, x)
    assert after < before - 0.1 * abs(before)


def test_mog_prior_is_a_learnable_mixture_same_family():
    model = SRVAE((1, 8, 8), prior="mog", mog_components=5, **SMALL)
    prior = model.prior_u()
    assert isinstance(prior, dist.MixtureSameFamily)
    assert prior.mixture_distribution.logits.shape == (5,)
    assert prior.component_distribution.event_shape == (model.u_dim,)
    model_trace = poutine.trace(model.model).get_trace(tiny_images())
    assert model_trace.nodes["u"]["fn"].batch_shape == (4,)  # broadcast by the "data" plate
    x = tiny_images()
    make_elbo("trace").differentiable_loss(model.model, model.guide, x).backward()
    for parameter in (model.prior_u.logits, model.prior_u.means, model.prior_u.raw_scales):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_vae_mog_prior_is_on_z():
    model = VAE((1, 8, 8), prior="mog", mog_components=4, **SMALL)
    assert isinstance(model.prior_z(), dist.MixtureSameFamily)


def _sample_sites(trace):
    return [name for name, site in trace.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)]


@pytest.mark.parametrize("guide", ["simple", "full"])
def test_sites_in_order_and_shapes(guide):
    model = SRVAE((1, 8, 8), guide=guide, **SMALL)
    x = tiny_images()
    model_trace = poutine.trace(model.model).get_trace(x)
    assert _sample_sites(model_trace) == ["u", "y", "z", "x"]
    assert model_trace.nodes["y"]["is_observed"] and model_trace.nodes["x"]["is_observed"]
    assert torch.equal(model_trace.nodes["y"]["value"], downscale(x, 2))
    for name, event_shape in [("u", (16,)), ("y", (1, 4, 4)), ("z", (32,)), ("x", (1, 8, 8))]:
        assert model_trace.nodes[name]["fn"].batch_shape == (4,)
        assert model_trace.nodes[name]["fn"].event_shape == event_shape
    guide_trace = poutine.trace(model.guide).get_trace(x)
    assert _sample_sites(guide_trace) == ["u", "z"]


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("factor", [2, 4])
def test_any_channel_count_and_factor(channels, factor):
    model = SRVAE((channels, 16, 12), guide="full", factor=factor, **SMALL)
    x = tiny_images(3, (channels, 16, 12))
    loss = make_elbo("meanfield").differentiable_loss(model.model, model.guide, x)
    loss.backward()
    assert torch.isfinite(loss)
    sr = model.super_resolve(model.downscale(x), num_samples=5)
    assert sr.mean.shape == x.shape and sr.std.shape == x.shape
    assert sr.samples.shape == (5,) + x.shape


def test_downscale_area_is_the_block_average():
    x = torch.arange(16.0).reshape(1, 1, 4, 4) / 16
    expected = torch.tensor([[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]]) / 4 / 16
    assert torch.allclose(downscale(x, 2, "area")[0, 0], expected)
    assert torch.allclose(downscale(x, 4, "area"), x.mean().reshape(1, 1, 1, 1))
    # the bilinear mode is antialiased: constant images stay constant, shapes are halved
    constant = torch.full((2, 3, 8, 8), 0.25)
    assert torch.allclose(downscale(constant, 2, "bilinear"), torch.full((2, 3, 4, 4), 0.25))


def test_generation_helpers():
    model = SRVAE((1, 8, 8), guide="full", **SMALL)
    sample = model.sample(6)
    assert sample.x.shape == (6, 1, 8, 8) and sample.y.shape == (6, 1, 4, 4)
    x = tiny_images()
    assert model.reconstruct(x).shape == x.shape
    single = model.super_resolve(model.downscale(x), num_samples=1)
    assert torch.equal(single.std, torch.zeros_like(single.std))
    pyro.set_rng_seed(1)
    many = model.super_resolve(model.downscale(x), num_samples=400)
    assert (many.std > 0).all()
    # the mean estimates E[decoder mean] over u ~ q(u|y), z ~ p(z|y,u), drawn here from the networks
    reference, spread = _predictive_mean_by_hand(model, model.downscale(x), draws=4000)
    z_scores = (many.mean - reference) / (spread * math.sqrt(1 / 400 + 1 / 4000))
    assert z_scores.abs().max() < 5, z_scores.abs().max()
    # without the noise: the same latent draws (same seed), each one's decoder mean, nothing added
    pyro.set_rng_seed(1)
    means_only = model.super_resolve(model.downscale(x), num_samples=400, observation_noise=False)
    torch.testing.assert_close(means_only.samples, many.means)
    assert (many.std.mean() - means_only.std.mean()) > 0.5 * model.gamma_x.item()  # the likelihood's noise
    vae = VAE((1, 8, 8), **SMALL)
    assert vae.sample(5).shape == (5, 1, 8, 8)
    assert vae.reconstruct(x).shape == x.shape


def _predictive_mean_by_hand(model, y, draws):
    """Monte Carlo E[mean of p(x|y,z,u)] over u ~ q(u|y), z ~ p(z|y,u), and the spread of the means."""
    with torch.no_grad():
        u = dist.Normal(*model.encoder_u(y)).sample((draws,))
        z = dist.Normal(*model.prior_z(y, u)).sample()
        means = model.decode_x(y, z, u)
    return means.mean(0), means.std(0)


def _guide_means_and_decoder_mean(model, x):
    """The guide's location parameters, read off its sites (u first, at its mean), and the mean of
    the model's x site at them: what reconstruct must return."""
    latents = {}
    for name in ("u", "z"):
        trace = poutine.trace(poutine.condition(model.guide, data=latents)).get_trace(x)
        if name in trace.nodes:
            latents[name] = trace.nodes[name]["fn"].base_dist.loc.detach()
    model_trace = poutine.trace(poutine.condition(model.model, data=latents)).get_trace(x)
    return latents, trace, model_trace.nodes["x"]["fn"].mean.detach()


@pytest.mark.parametrize("model_class, kwargs", VARIANTS)
def test_reconstruction_is_the_decoder_mean_at_the_guide_s_means_not_a_draw(model_class, kwargs):
    model = model_class((1, 8, 8), **kwargs, **SMALL)
    x = tiny_images()
    latents, guide_trace, expected = _guide_means_and_decoder_mean(model, x)
    reconstruction = model.reconstruct(x)
    torch.testing.assert_close(reconstruction, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.reconstruct(x), reconstruction, rtol=0, atol=0)  # no draw: the same twice
    # decoding a draw of z instead lands elsewhere: the guide's spread is not negligible here
    drawn = dict(latents, z=guide_trace.nodes["z"]["value"].detach())
    at_draw = poutine.trace(poutine.condition(model.model, data=drawn)).get_trace(x).nodes["x"]["fn"].mean
    assert (at_draw - expected).abs().max() > 1e-3


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(4, 3, 8, 8), "1 channel"),
        (torch.rand(4, 1, 8, 6), r"\(B, 1, 8, 8\)"),
        (torch.rand(1, 8, 8), r"\(B, 1, 8, 8\)"),
        (torch.full((2, 1, 8, 8), float("nan")), "NaN"),
        (torch.full((2, 1, 8, 8), float("inf")), "infinite"),
        (torch.full((2, 1, 8, 8), 1.5), r"\[0, 1\]"),
        (torch.full((2, 1, 8, 8), -0.1), r"\[0, 1\]"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "float"),
        ([[0.5]], "torch.Tensor"),
    ],
)
@pytest.mark.parametrize("model_class", [VAE, SRVAE])
def test_bad_input_gives_a_clear_value_error(model_class, bad, message):
    model = model_class((1, 8, 8), **SMALL)
    with pytest.raises(ValueError, match=message):
        model.model(bad)
    with pytest.raises(ValueError, match=message):
        model.guide(bad)


def test_bad_low_resolution_input_to_super_resolve():
    model = SRVAE((1, 8, 8), **SMALL)
    with pytest.raises(ValueError, match=r"y must have shape \(B, 1, 4, 4\)"):
        model.super_resolve(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="num_samples"):
        model.super_resolve(torch.rand(2, 1, 4, 4), num_samples=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_shape=(1, 9, 8)), "divisible by the downscale factor 2"),
        (dict(image_shape=(1, 8, 8), factor=4, guide="full"), None),
        (dict(image_shape=(1, 12, 12), factor=8), "downscale factor"),
        (dict(guide="fancy"), "unknown guide 'fancy'; expected one of simple, full"),
        (dict(prior="laplace"), "unknown prior 'laplace'"),
        (dict(downscale_mode="nearest"), "unknown downscale mode"),
        (dict(prior="mog", mog_components=0), "mog_components"),
        (dict(image_shape=(28, 28)), r"image_shape must be \(C, H, W\)"),
    ],
)
def test_bad_construction_gives_a_clear_value_error(kwargs, message):
    if message is None:
        SRVAE(**kwargs)  # legal: 8 is divisible by 4
        return
    with pytest.raises(ValueError, match=message):
        SRVAE(**kwargs)


def test_unknown_elbo_name():
    with pytest.raises(ValueError, match="unknown ELBO 'iwae'; expected one of trace, meanfield"):
        make_elbo("iwae")


def test_renyi_defaults_to_the_iwae_bound():
    assert make_elbo("renyi", num_particles=5).alpha == 0.0
    assert make_elbo("renyi", alpha=0.5).alpha == 0.5


def test_two_models_under_one_name_are_refused():
    first = SRVAE((1, 8, 8), **SMALL)
    first.model(tiny_images())
    second = SRVAE((1, 8, 8), **SMALL)
    with pytest.raises(ValueError, match="clear_param_store"):
        second.model(tiny_images())
    SRVAE((1, 8, 8), name="another", **SMALL).model(tiny_images())  # a distinct name is fine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_networks_follow_the_input_to_the_gpu():
    model = SRVAE((1, 8, 8), guide="full", prior="mog", **SMALL)
    x = tiny_images().cuda()
    svi = SVI(model.model, model.guide, Adam({"lr": 1e-3}), make_elbo("meanfield"))
    assert math.isfinite(svi.step(x))
    assert model.device.type == "cuda"
    assert model.super_resolve(model.downscale(x), 4).mean.is_cuda
    assert model.sample(3).x.is_cuda

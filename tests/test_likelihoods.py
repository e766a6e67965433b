"""Observation likelihoods beyond the spec: gaussian-pixel and the discretized logistic mixture.

The spec's Gaussian (eq. 3, 12, 15) is checked in test_derivation.py; here: the
discretized logistic mixture against brute force, its exact bits/dim identity, its
shapes under Pyro, and the wiring of all three likelihoods into VAE and SRVAE.
"""

import math

import pytest
import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer import SVI
from pyro.optim import Adam

from pyro_srvae import SRVAE, VAE, make_elbo
from pyro_srvae.data.batching import dequantize
from pyro_srvae.metrics.likelihood import bits_per_dim, iw_and_elbo
from pyro_srvae.model.distributions import (
    block_mean,
    nearest_upsample,
    DiscretizedLogisticMixture,
    ConsistentGaussian,
)
from pyro_srvae.model.likelihoods import (
    LIKELIHOODS,
    FaithfulGaussianPixelLikelihood,
    GaussianPixelLikelihood,
    make_likelihood,
)
from conftest import tiny_images

SMALL = dict(hidden=8)


def brute_force_bin_probs(logits, locs, scales):
    """P(k) for the 256 bins in float64, from CDF differences taken on the accurate side."""
    logits, locs, scales = (t.double() for t in (logits, locs, scales))
    k = torch.arange(256, dtype=torch.float64)
    lower = torch.where(k == 0, -math.inf, k / 256)
    upper = torch.where(k == 255, math.inf, (k + 1) / 256)
    a = (lower - locs.unsqueeze(-1)) / scales.unsqueeze(-1)  # (..., K, 256)
    b = (upper - locs.unsqueeze(-1)) / scales.unsqueeze(-1)
    mass = torch.where(a > 0, torch.sigmoid(-a) - torch.sigmoid(-b), torch.sigmoid(b) - torch.sigmoid(a))
    return (torch.softmax(logits, -1).unsqueeze(-1) * mass).sum(-2)  # (..., 256)


def random_parameters(n=500, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, k, generator=g)
    locs = torch.rand(n, k, generator=g) * 1.6 - 0.3
    scales = 10 ** (torch.rand(n, k, generator=g) * 5 - 4)  # 1e-4 .. 10: narrower and wider than a bin
    return logits, locs, scales


def test_bin_probabilities_sum_to_one_and_match_brute_force():
    logits, locs, scales = random_parameters()
    d = DiscretizedLogisticMixture(logits, locs, scales)
    log_probs = d.bin_log_probs()
    assert log_probs.shape == (500, 256)
    assert torch.allclose(log_probs.double().exp().sum(-1), torch.ones(500, dtype=torch.float64), atol=1e-5)
    expected = brute_force_bin_probs(logits, locs, scales)
    resolvable = expected > 1e-30  # float64 brute force is exact there
    assert torch.allclose(log_probs.double()[resolvable], expected[resolvable].log(), atol=2e-4, rtol=1e-5)


def test_log_prob_is_bin_log_mass_plus_log_256_for_every_point_in_the_bin():
    logits, locs, scales = random_parameters(seed=1)
    d = DiscretizedLogisticMixture(logits, locs, scales)
    k = torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(2))
    k[:3] = torch.tensor([0, 255, 128])  # both edge bins
    expected = brute_force_bin_probs(logits, locs, scales).gather(-1, k[:, None]).squeeze(-1).log() + math.log(256)
    resolvable = expected > -600  # float64 brute force underflows beyond
    assert resolvable.float().mean() > 0.9
    for offset in (0.0, 0.5, 0.999):  # piecewise constant: anywhere in the bin
        log_p = d.log_prob(((k.double() + offset) / 256).float())
        assert torch.isfinite(log_p).all()
        assert torch.allclose(log_p.double()[resolvable], expected[resolvable], atol=2e-4, rtol=1e-5)
    assert torch.allclose(d.log_prob(torch.ones(500)), d.log_prob(torch.full((500,), 255.5 / 256)))  # x = 1: last bin


def test_exact_discrete_bits_per_dim_identity():
    """bits_per_dim(log p(x), D) with the +8 is -log2 P(k) / D for any dequantization of k."""
    torch.manual_seed(0)
    shape = (2, 3, 4, 5)  # batch of 2 images (3, 4, 5)
    raw = torch.randn(shape[0], 3 * 4 * shape[1], *shape[2:])
    likelihood = make_likelihood("dlogistic-mix", num_components=4)
    distribution = likelihood.distribution(raw)
    assert distribution.batch_shape == (2,) and distribution.event_shape == shape[1:]
    k = torch.randint(0, 256, shape, dtype=torch.uint8)
    num_dims = 3 * 4 * 5
    logits, locs, scales = likelihood.parameters(raw)
    bin_probs = brute_force_bin_probs(logits, locs, scales)  # (2, 3, 4, 5, 256)
    discrete_log_p = bin_probs.gather(-1, k.long().unsqueeze(-1)).log().sum((-1, -2, -3, -4))
    discrete_bpd = -discrete_log_p / (num_dims * math.log(2))
    for seed in range(3):
        x = dequantize(k, torch.Generator().manual_seed(seed))
        bpd = bits_per_dim(distribution.log_prob(x).double(), num_dims)
        assert torch.allclose(bpd, discrete_bpd, atol=1e-5)


@pytest.mark.parametrize("extreme", [1e4, 1e2])
def test_log_prob_and_mean_have_finite_gradients_at_extreme_parameters(extreme):
    n = 64
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(n, 2, generator=g) * extreme).requires_grad_()
    locs = (torch.randn(n, 2, generator=g) * extreme).requires_grad_()
    # scales from the floor (1e-4) to huge, through the likelihood's parameterisation
    likelihood = make_likelihood("dlogistic-mix", num_components=2)
    raw_scales = (torch.randn(n, 2, generator=g) * extreme).requires_grad_()
    scales = torch.nn.functional.softplus(raw_scales + likelihood.shift) + likelihood.min_scale
    d = DiscretizedLogisticMixture(logits, locs, scales)
    value = torch.cat([torch.zeros(8), torch.ones(8), torch.rand(n - 16, generator=g)])
    log_p = d.log_prob(value)
    assert torch.isfinite(log_p).all()
    (log_p.sum() + d.mean.sum()).backward()
    for tensor in (logits, locs, raw_scales):
        assert torch.isfinite(tensor.grad).all()


def test_mean_is_the_exact_mean_of_the_piecewise_constant_density():
    logits, locs, scales = random_parameters(n=2000, seed=4)
    d = DiscretizedLogisticMixture(logits, locs, scales)
    centres = (torch.arange(256, dtype=torch.float64) + 0.5) / 256
    expected = (brute_force_bin_probs(logits, locs, scales) * centres).sum(-1)
    assert torch.allclose(d.mean.double(), expected, atol=2e-6)


def test_sampling_frequencies_match_bin_probabilities():
    """A chi-square goodness-of-fit test with a fixed seed, on three differently shaped pixels."""
    torch.manual_seed(5)
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0], [0.0, 0.0]])
    locs = torch.tensor([[0.3, 0.7], [0.01, 0.5], [0.5, 0.5005]])
    scales = torch.tensor([[0.05, 0.02], [0.01, 0.2], [0.002, 0.0005]])
    d = DiscretizedLogisticMixture(logits, locs, scales)
    num = 100_000
    samples = d.sample((num,))
    assert samples.shape == (num, 3) and (samples >= 0).all() and (samples < 1).all()
    probs = d.bin_log_probs().double().exp()
    for pixel in range(3):
        counts = torch.bincount(DiscretizedLogisticMixture.bin_index(samples[:, pixel]).long(), minlength=256).double()
        expected = num * probs[pixel]
        big = expected >= 5  # pool the sparse bins into one cell
        observed = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
        expected = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
        chi2 = ((observed - expected) ** 2 / expected.clamp(min=1e-12)).sum().item()
        dof = int(big.sum())  # cells - 1
        assert chi2 < dof + 5 * math.sqrt(2 * dof), (pixel, chi2, dof)
        # samples are uniform within their bin: the fractional parts average 1/2
        fractional = samples[:, pixel] * 256 - DiscretizedLogisticMixture.bin_index(samples[:, pixel])
        assert abs(fractional.mean().item() - 0.5) < 0.01


def test_expand_and_broadcasting_for_plates_and_particles():
    likelihood = make_likelihood("dlogistic-mix", num_components=3)
    raw = torch.randn(4, 9, 2, 3)  # B=4, C=1, 2x3 image
    d = likelihood.distribution(raw)
    expanded = d.expand((5, 4))
    assert expanded.batch_shape == (5, 4) and expanded.event_shape == (1, 2, 3)
    x = torch.rand(4, 1, 2, 3)
    assert torch.allclose(expanded.log_prob(x), d.log_prob(x).expand(5, 4))
    assert expanded.sample().shape == (5, 4, 1, 2, 3)
    assert expanded.mean.shape == (5, 4, 1, 2, 3)
    # parameters with particle dims (P, B) against data (B,): as under vectorize_particles
    wide = likelihood.distribution(torch.randn(6, 4, 9, 2, 3))
    assert wide.log_prob(x).shape == (6, 4)
    # inside a Pyro plate the site gets the plate's batch shape
    def model():
        with pyro.plate("particles", 5, dim=-2), pyro.plate("data", 4, dim=-1):
            pyro.sample("x", likelihood.distribution(raw), obs=x)

    site = poutine.trace(model).get_trace().nodes["x"]
    assert site["fn"].batch_shape == (5, 4)
    assert site["fn"].log_prob(x).shape == (5, 4)


def test_gaussian_pixel_is_a_normal_with_softplus_scale():
    likelihood = GaussianPixelLikelihood(scale_init=0.1)
    raw = torch.randn(3, 2 * 2, 4, 4)
    offset = torch.rand(3, 2, 4, 4)
    d = likelihood.distribution(raw, offset)
    loc = offset + raw[:, :2]
    scale = torch.nn.functional.softplus(raw[:, 2:] + likelihood.shift) + 1e-3
    x = torch.rand(3, 2, 4, 4)
    assert torch.allclose(d.log_prob(x), dist.Normal(loc, scale).log_prob(x).sum((-1, -2, -3)))
    assert torch.allclose(likelihood.mean(raw, offset), loc)
    # raw = 0 starts at the requested standard deviation
    _, initial = likelihood.loc_and_scale(torch.zeros(1, 2, 1, 1))
    assert initial.item() == pytest.approx(0.1, rel=1e-5)


# ---------------------------------------------------------------------------
# gaussian-pixel-faithful: gaussian-pixel's density, the faithful gradient
# ---------------------------------------------------------------------------


def _faithful_inputs(seed=0):
    torch.manual_seed(seed)
    raw = torch.randn(3, 2, 4, 4).requires_grad_()
    offset, x = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    return raw, offset, x, block_mean(x, 2)


def test_the_faithful_likelihood_reports_gaussian_pixel_s_density_draws_and_mean():
    raw, offset, x, y = _faithful_inputs()
    faithful, plain = FaithfulGaussianPixelLikelihood(), GaussianPixelLikelihood()
    loc, sigma = plain.loc_and_scale(raw, offset)
    onto_y = loc + nearest_upsample(y - block_mean(loc, 2), 2)  # the consistent form's locations, A loc = y
    pairs = [
        (faithful.distribution(raw, offset), plain.distribution(raw, offset)),
        (faithful.consistent_distribution(raw, offset, None, y, 2), ConsistentGaussian(onto_y, sigma, y, 2)),
    ]
    for ours, theirs in pairs:
        assert ours.batch_shape == theirs.batch_shape == (3,) and ours.event_shape == theirs.event_shape == (1, 4, 4)
        assert torch.equal(ours.log_prob(x), theirs.log_prob(x))
        with torch.no_grad():
            assert torch.equal(ours.log_prob(x), theirs.log_prob(x))
        assert torch.equal(ours.mean, theirs.mean) and torch.equal(ours.variance, theirs.variance)
        assert ours.has_rsample == theirs.has_rsample
        torch.manual_seed(1)
        draw = ours.sample()
        torch.manual_seed(1)
        assert torch.equal(draw, theirs.sample())
        assert ours.expand((2, 3)).log_prob(x).shape == (2, 3)
    assert not faithful.pmf_distribution(raw, offset).has_rsample  # a pmf over bins: no reparametrized draws
    discrete = faithful.pmf_distribution(raw, offset).log_prob(y.repeat(1, 1, 2, 2))
    assert torch.equal(discrete, plain.pmf_distribution(raw, offset).log_prob(y.repeat(1, 1, 2, 2)))


def test_the_faithful_consistent_mean_has_the_block_means_of_y_and_does_not_move_with_the_sigmas():
    """Its locations are moved onto A loc = y, so the conditional mean is the locations whatever
    the sigmas: the squared-error fit of the locations is a fit of the predictive mean."""
    raw, offset, x, y = _faithful_inputs()
    likelihood = FaithfulGaussianPixelLikelihood()
    other_sigmas = raw.detach().clone()
    other_sigmas[:, 1:] = 3 * torch.randn(3, 1, 4, 4)
    mean = likelihood.consistent_distribution(raw, offset, None, y, 2).mean
    torch.testing.assert_close(block_mean(mean, 2), y)
    torch.testing.assert_close(likelihood.consistent_distribution(other_sigmas, offset, None, y, 2).mean, mean)
    # the plain per-pixel likelihood's conditional mean moves with its sigmas
    plain = GaussianPixelLikelihood()
    moved = plain.consistent_distribution(other_sigmas, offset, None, y, 2).mean
    assert (moved - plain.consistent_distribution(raw, offset, None, y, 2).mean).abs().max() > 0.01


def test_the_faithful_gradient_fits_locations_under_one_scale_and_scales_given_the_locations():
    """Closed forms: d/d loc = (x - loc) / s^2 with s^2 the mean predicted variance (one scale for
    every pixel), and d/d sigma = -1/sigma + (x - loc)^2 / sigma^3 (the per-pixel Gaussian's),
    times the damping weight of the sigmas' gradient."""
    raw, offset, x, _ = _faithful_inputs()
    likelihood = FaithfulGaussianPixelLikelihood()
    likelihood.distribution(raw, offset).log_prob(x).sum().backward()
    with torch.no_grad():
        loc, sigma = likelihood.loc_and_scale(raw, offset)
        residual = x - loc
        d_loc = residual / sigma.square().mean()
        d_sigma = -1 / sigma + residual.square() / sigma**3
        d_raw_scale = d_sigma * torch.sigmoid(raw[:, 1:] + likelihood.shift)  # sigma = softplus(raw + b) + floor
        d_raw_scale = likelihood.scale_gradient_weight * d_raw_scale  # damped: same optimum
    assert torch.allclose(raw.grad[:, :1], d_loc, rtol=1e-5, atol=1e-6)
    assert torch.allclose(raw.grad[:, 1:], d_raw_scale, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, expected_location", [("gaussian-pixel", 0.0064), ("gaussian-pixel-faithful", 0.1)])
def test_a_shared_location_is_the_least_squares_fit_only_under_the_faithful_gradient(name, expected_location):
    """One location shared by two pixels whose data are N(0, 0.05^2) and N(0.2, 0.2^2), each pixel with
    its own free scale. The plain likelihood's maximum (the one minimum of log(0.05^2 + m^2) +
    log(0.2^2 + (0.2 - m)^2), at m = 0.0064) weighs the pixels by 1/sigma^2 and puts the location at
    the quiet pixel's mean; the faithful fit is the least-squares one, the average 0.1. Both fit
    each pixel's scale to its root mean squared residual."""
    torch.manual_seed(0)
    n = 4096
    data = torch.stack([0.05 * torch.randn(n), 0.2 + 0.2 * torch.randn(n)], dim=-1).reshape(n, 1, 1, 2)
    data = data - data.mean(0) + torch.tensor([0.0, 0.2]).reshape(1, 1, 2)  # exact sample means
    likelihood = make_likelihood(name)
    location = torch.zeros(1, requires_grad=True)
    raw_scales = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.Adam([location, raw_scales], lr=0.02)
    for _ in range(1500):
        optimizer.zero_grad()
        raw = torch.cat([location.expand(2), raw_scales]).reshape(1, 2, 1, 2)
        loss = -likelihood.distribution(raw).log_prob(data).mean()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        _, sigma = likelihood.loc_and_scale(torch.cat([location.expand(2), raw_scales]).reshape(1, 2, 1, 2))
        rms = (data - location).square().mean(0).sqrt()
    assert location.item() == pytest.approx(expected_location, abs=0.005)
    assert torch.allclose(sigma.flatten(), rms.flatten(), rtol=0.05)


def test_unknown_likelihood_and_bad_components():
    with pytest.raises(ValueError, match="unknown likelihood 'laplace'; expected one of gaussian, gaussian-pixel"):
        VAE((1, 8, 8), likelihood="laplace")
    with pytest.raises(ValueError, match="likelihood_components"):
        SRVAE((1, 8, 8), likelihood="dlogistic-mix", likelihood_components=0)


# ---------------------------------------------------------------------------
# Wiring into the models
# ---------------------------------------------------------------------------

VARIANTS = [
    pytest.param(VAE, {}, id="vae"),
    pytest.param(SRVAE, {"guide": "simple"}, id="srvae-simple"),
    pytest.param(SRVAE, {"guide": "full"}, id="srvae-full"),
]


def _loss(model, x):
    pyro.set_rng_seed(123)
    return make_elbo("meanfield", num_particles=10, vectorize_particles=True).loss(model.model, model.guide, x)


@pytest.mark.parametrize("likelihood", ["gaussian-pixel", "gaussian-pixel-faithful", "dlogistic-mix"])
@pytest.mark.parametrize("model_class, kwargs", VARIANTS)
def test_models_train_with_every_likelihood(model_class, kwargs, likelihood):
    x = tiny_images(8, (1, 8, 8))
    model = model_class((1, 8, 8), likelihood=likelihood, likelihood_components=3, **kwargs, **SMALL)
    assert model.gamma_x is None and model.log_gamma_x is None
    before = _loss(model, x)
    elbo = make_elbo("meanfield", num_particles=2, vectorize_particles=True)
    svi = SVI(model.model, model.guide, Adam({"lr": 1e-2}), elbo)
    for _ in range(30):
        assert math.isfinite(svi.step(x))
    after = _loss(model, x)
    assert after < before - 0.1 * abs(before)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_srvae_sites_generation_and_super_resolution(likelihood):
    model = SRVAE((1, 8, 8), guide="full", likelihood=likelihood, likelihood_components=2, **SMALL)
    x = tiny_images()
    trace = poutine.trace(model.model).get_trace(x)
    assert trace.nodes["x"]["fn"].event_shape == (1, 8, 8) and trace.nodes["x"]["fn"].batch_shape == (4,)
    assert trace.nodes["y"]["fn"].event_shape == (1, 4, 4)
    per_channel = {"gaussian": 1, "gaussian-pixel": 2, "gaussian-pixel-faithful": 2, "dlogistic-mix": 6}[likelihood]
    raw = model.decoder_x.residual(model.downscale(x), torch.zeros(4, model.z_dim), torch.zeros(4, model.u_dim))
    assert raw.shape == (4, per_channel, 8, 8)
    assert (model.gamma_y is None) == (likelihood != "gaussian")
    sample = model.sample(5)
    assert sample.x.shape == (5, 1, 8, 8) and sample.y.shape == (5, 1, 4, 4)
    y = model.downscale(x)
    means = model.super_resolve(y, num_samples=6, observation_noise=False)
    noisy = model.super_resolve(y, num_samples=6)
    assert means.samples.shape == noisy.samples.shape == (6, 4, 1, 8, 8)
    assert noisy.std.mean() > means.std.mean()  # observation noise adds spread
    assert model.reconstruct(x).shape == x.shape
    if likelihood == "dlogistic-mix":  # means and draws of a distribution on [0, 1]
        for images in (sample.x, sample.y, means.samples, noisy.samples):
            assert images.min() >= 0 and images.max() <= 1
    # the x locations are a residual over upsample(y): with a zero raw output they equal it
    raw, up = torch.zeros(4, per_channel, 8, 8), model.decoder_x.upsample(y)
    distribution = model.likelihood.distribution(raw, up, scale=model.gamma_x)
    distribution = getattr(distribution, "value", distribution).base_dist  # faithful: the density it reports
    locs = distribution.locs if likelihood == "dlogistic-mix" else distribution.loc.unsqueeze(-1)
    assert torch.equal(locs, up.unsqueeze(-1).expand_as(locs))


def test_iw_estimate_of_the_dlogistic_vae_is_a_discrete_bound():
    """The IW machinery needs no change: the per-image ELBO <= IW <= log P(k) + D log 256 <= D log 256."""
    model = VAE((1, 8, 8), likelihood="dlogistic-mix", likelihood_components=2, **SMALL)
    x = tiny_images(3)
    estimates = iw_and_elbo(model.model, model.guide, x, num_samples=8)
    assert estimates.iw.shape == (3,) and torch.isfinite(estimates.iw).all()
    assert (estimates.elbo <= estimates.iw + 1e-4).all()
    assert (bits_per_dim(estimates.iw, 64) > 0).all()  # a discrete model cannot beat 0 bits/dim


def test_faithful_scale_weight_from_the_configuration_scales_the_sigmas_gradient_only():
    from pyro_srvae.model.likelihoods import FaithfulGaussianPixelLikelihood
    from pyro_srvae.training.config import ConfigError, TrainConfig
    from pyro_srvae.training.factory import build_model

    config = TrainConfig(likelihood="gaussian-pixel-faithful", faithful_scale_weight=0.01, hidden=4).validate()
    damped = build_model(config, (1, 8, 8)).likelihood
    assert damped.scale_gradient_weight == 0.01
    assert FaithfulGaussianPixelLikelihood.scale_gradient_weight == 1.0  # the class keeps the published fit
    plain = build_model(TrainConfig(likelihood="gaussian-pixel-faithful", hidden=4), (1, 8, 8)).likelihood
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    raw = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    grads = []
    for likelihood in (plain, damped):
        leaf = raw.clone().requires_grad_()
        likelihood.distribution(leaf).log_prob(x).sum().backward()
        grads.append(leaf.grad)
        assert likelihood.distribution(leaf).log_prob(x).detach().equal(plain.distribution(raw).log_prob(x))
    torch.testing.assert_close(grads[1][:, 0], grads[0][:, 0])  # the locations' gradient is unchanged
    torch.testing.assert_close(grads[1][:, 1], 0.01 * grads[0][:, 1])
    with pytest.raises(ConfigError, match="faithful-scale-weight"):
        TrainConfig(likelihood="gaussian", faithful_scale_weight=0.5).validate()
    with pytest.raises(ConfigError, match="positive number"):
        TrainConfig(likelihood="gaussian-pixel-faithful", faithful_scale_weight=0.0).validate()

"""The srVAE's likelihood as a density of x (docs/derivation.md, "A density of x").

The spec's literal p(y|u) p(x|y,z) with y = f(x) scores the block means of x twice; the
default ``x_given_y="consistent"`` restricts p(x|y,.) to the x whose block means are y, and
where no closed form exists puts y on the 8-bit grid (a pmf). These tests integrate the
densities, check the closed form against the networks' outputs and the bookkeeping of old
checkpoints.
"""

import math

import pytest
import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine

from pyro_srvae import SRVAE, VAE
from pyro_srvae.training.checkpoint import load_checkpoint, save_checkpoint
from pyro_srvae.cli import console_main
from pyro_srvae.model.distributions import (
    ConsistentGaussian,
    DiscretizedGaussian,
    DiscretizedLogisticMixture,
    block_mean,
    nearest_upsample,
)
from pyro_srvae.model.image_model import downscale, quantized_downscale
from pyro_srvae.sr.evaluate import evaluate_checkpoint
from pyro_srvae.training.config import TrainConfig
from pyro_srvae.training.loop import train
from pyro_srvae.training.report import summary_table
from conftest import tiny_images

SMALL = dict(hidden=4, u_dim=3, z_dim=3)


def _tiny_srvae(x_given_y, gamma_x=0.3, gamma_y=0.15):
    # gamma_y = gamma_x / f: the block means then spread like the details in orthonormal
    # (Haar) coordinates, and the proposal below is wider than the target in every direction.
    model = SRVAE((1, 4, 4), guide="full", x_given_y=x_given_y, **SMALL).double()
    with torch.no_grad():
        model.log_gamma_x.fill_(math.log(gamma_x))
        model.log_gamma_y.fill_(math.log(gamma_y))
    return model


def _monte_carlo_integral(model, num_samples=200_000, spread=0.4, seed=0):
    """int exp(log p(y = f(x) | u) + log p(x | y, z, u)) dx with u, z fixed, by importance sampling.

    Proposal: N(m, spread^2 I) around the model's mean at y = mean of p(y|u). Returns the
    estimate and its standard error.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(1, model.u_dim, generator=g, dtype=torch.float64)
    z = torch.randn(1, model.z_dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y0 = model.decode_y(u)
        centre = model.decode_x(y0, z, u)
        proposal = dist.Normal(centre, spread).to_event(3)
        x = proposal.sample((num_samples,)).squeeze(1)  # (N, 1, 4, 4)
        y = model.downscale(x)
        log_target = model.y_distribution(u).log_prob(y) + model.x_distribution(y, z, u).log_prob(x)
        log_w = log_target - proposal.log_prob(x.unsqueeze(1)).squeeze(1)
        w = torch.exp(log_w - log_w.max())
        scale = log_w.max().exp()
        estimate = (w.mean() * scale).item()
        stderr = (w.std() * scale / math.sqrt(num_samples)).item()
    return estimate, stderr


def test_the_consistent_density_of_x_integrates_to_one():
    estimate, stderr = _monte_carlo_integral(_tiny_srvae("consistent"))
    assert stderr < 0.01
    assert abs(estimate - 1.0) < 4 * stderr


def test_the_spec_joint_is_not_a_density_of_x():
    # The block means are scored by p(y|u) and again by N(x; mu, gamma_x^2 I): the integral
    # gains a factor of order f / (gamma_x sqrt(2 pi)) per block (4 blocks here), far from one.
    estimate, stderr = _monte_carlo_integral(_tiny_srvae("spec"))
    assert estimate > 3.0
    assert abs(estimate - 1.0) > 20 * stderr


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian-pixel"])
def test_consistent_x_site_is_the_closed_form_from_the_networks_outputs(likelihood):
    model = SRVAE((1, 8, 8), guide="full", likelihood=likelihood, hidden=8)
    x = tiny_images()
    guide_trace = poutine.trace(model.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    u, z = guide_trace.nodes["u"]["value"], guide_trace.nodes["z"]["value"]
    y = downscale(x, 2)
    raw, offset = model._x_parameters(y, z, u)
    if likelihood == "gaussian":
        mu, sigma = offset + raw, model.gamma_x.expand_as(x)
    else:
        mu, sigma = model.likelihood.loc_and_scale(raw, offset)
    # log N(x; mu, S) - log N(A x; A mu, A S A^T), A S A^T = diag(sum_block sigma^2 / f^4)
    full = dist.Normal(mu, sigma).log_prob(x).sum((1, 2, 3))
    block_sd = (torch.nn.functional.avg_pool2d(sigma**2, 2, divisor_override=1) / 16).sqrt()
    blocks = dist.Normal(torch.nn.functional.avg_pool2d(mu, 2), block_sd).log_prob(y).sum((1, 2, 3))
    torch.testing.assert_close(model_trace.nodes["x"]["log_prob"], full - blocks, rtol=1e-5, atol=1e-3)
    # and the spec's literal site is the first term alone
    spec = SRVAE((1, 8, 8), guide="full", likelihood=likelihood, hidden=8, x_given_y="spec", name="spec")
    spec.load_state_dict(model.state_dict())
    spec_trace = poutine.trace(poutine.replay(spec.model, trace=guide_trace)).get_trace(x)
    spec_trace.compute_log_prob()
    torch.testing.assert_close(spec_trace.nodes["x"]["log_prob"], full, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian-pixel"])
def test_under_consistent_every_sr_mean_sample_and_generated_x_has_block_means_y(likelihood):
    model = SRVAE((1, 8, 8), guide="full", likelihood=likelihood, hidden=8)
    x = tiny_images()
    y = model.downscale(x)
    for noise in (False, True):
        sr = model.super_resolve(y, num_samples=5, observation_noise=noise)
        torch.testing.assert_close(block_mean(sr.samples, 2), y.expand(5, *y.shape), atol=1e-6, rtol=0)
        torch.testing.assert_close(block_mean(sr.mean, 2), y, atol=1e-6, rtol=0)
    torch.testing.assert_close(block_mean(model.reconstruct(x), 2), y, atol=1e-6, rtol=0)
    generated = model.sample(6)
    torch.testing.assert_close(block_mean(generated.x, 2), generated.y, atol=1e-6, rtol=0)
    # the literal model does not (the decoder mean is unconstrained)
    spec = SRVAE((1, 8, 8), guide="full", likelihood=likelihood, hidden=8, x_given_y="spec", name="spec")
    assert (block_mean(spec.super_resolve(y, num_samples=2).mean, 2) - y).abs().max() > 1e-3


def test_consistent_gaussian_moments_match_the_conditional_gaussian():
    g = torch.Generator().manual_seed(0)
    loc = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64)
    scale = 0.05 + 0.2 * torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.rand(2, 1, 2, 2, generator=g, dtype=torch.float64)
    d = ConsistentGaussian(loc, scale, y, 2)
    # The exact conditional of N(loc, S) given A x = y, by linear algebra on one image.
    A = torch.zeros(4, 16, dtype=torch.float64)
    for i in range(4):
        for j in range(4):
            A[(i // 2) * 2 + j // 2, i * 4 + j] = 0.25
    S = torch.diag(scale[0].flatten() ** 2)
    gain = S @ A.T @ torch.linalg.inv(A @ S @ A.T)
    mean = loc[0].flatten() + gain @ (y[0].flatten() - A @ loc[0].flatten())
    cov = S - gain @ A @ S
    torch.testing.assert_close(d.mean[0].flatten(), mean)
    torch.testing.assert_close(d.variance[0].flatten(), torch.diagonal(cov))
    draws = d.rsample((40_000,))[:, 0].flatten(1)
    torch.testing.assert_close(draws.mean(0), mean, atol=6e-3, rtol=0)
    torch.testing.assert_close(torch.cov(draws.T), cov, atol=3e-3, rtol=0)
    # a scalar scale gives the nearest-upsampled correction and gamma^2 (1 - 1/f^2)
    scalar = ConsistentGaussian(loc, torch.tensor(0.1, dtype=torch.float64), y, 2)
    torch.testing.assert_close(scalar.mean, loc + nearest_upsample(y - block_mean(loc, 2), 2))
    torch.testing.assert_close(scalar.variance, torch.full_like(loc, 0.01 * 0.75))


# --------------------------------------------------------------------------- #
# the quantized route: y on the 8-bit grid, scored by a pmf
# --------------------------------------------------------------------------- #


def test_discretized_pmfs_of_y_sum_to_one_over_the_bins():
    loc = torch.tensor([0.3, 0.0, 1.2, -0.4, 0.5, 0.999], dtype=torch.float64)
    scale = torch.tensor([0.05, 0.01, 0.2, 0.1, 1e-4, 0.003], dtype=torch.float64)
    torch.testing.assert_close(DiscretizedGaussian(loc, scale).bin_log_probs().exp().sum(-1), torch.ones(6, dtype=torch.float64))
    mixture = DiscretizedLogisticMixture(torch.randn(6, 3), torch.rand(6, 3), 0.01 + 0.1 * torch.rand(6, 3), pmf=True)
    torch.testing.assert_close(mixture.bin_log_probs().exp().sum(-1), torch.ones(6), atol=1e-5, rtol=0)
    # log_prob is the bin's probability (a pmf: no log 256), for any value inside the bin
    value = torch.tensor([77.9 / 256])
    assert mixture.log_prob(value.expand(6)).shape == (6,)
    torch.testing.assert_close(mixture.log_prob(value.expand(6)), mixture.bin_log_probs()[:, 77])


def test_discretized_gaussian_is_accurate_in_both_tails():
    d = DiscretizedGaussian(torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.01, dtype=torch.float64))
    far = torch.tensor([0.1, 0.9], dtype=torch.float64)  # 40 standard deviations away
    log_p = d.log_prob(far)
    assert torch.isfinite(log_p).all() and (log_p < -700).all()
    # symmetric around the mean: bin 25 below and bin 230 above are mirror images
    mirror = torch.tensor([(25 + 0.5) / 256, (230 + 0.5) / 256], dtype=torch.float64)
    near = DiscretizedGaussian(torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64))
    torch.testing.assert_close(near.log_prob(mirror)[0], near.log_prob(mirror)[1])
    edges = torch.tensor([(26 / 256 - 0.5) / 0.2, (25 / 256 - 0.5) / 0.2], dtype=torch.float64)
    reference = torch.special.ndtr(edges[0]) - torch.special.ndtr(edges[1])
    torch.testing.assert_close(near.log_prob(mirror)[0], reference.log())


@pytest.mark.parametrize(
    "likelihood, mode, x_given_y, density",
    [
        ("gaussian", "area", "consistent", "exact"),
        ("gaussian-pixel", "area", "consistent", "exact"),
        ("gaussian", "bilinear", "consistent", "bound"),
        ("dlogistic-mix", "area", "consistent", "bound"),
        ("gaussian", "area", "quantized", "bound"),
        ("gaussian", "area", "spec", "joint"),
        ("dlogistic-mix", "area", "spec", "joint"),
    ],
)
def test_what_each_combination_is_as_a_density_of_x(likelihood, mode, x_given_y, density):
    model = SRVAE((1, 8, 8), likelihood=likelihood, downscale_mode=mode, x_given_y=x_given_y, hidden=4,
                  likelihood_components=2)  # fmt: skip
    assert model.x_density == density
    assert VAE((1, 8, 8), likelihood=likelihood, hidden=4, likelihood_components=2).x_density == "exact"
    x = tiny_images()
    trace = poutine.trace(model.model).get_trace(x)
    y = trace.nodes["y"]["value"]
    if density == "bound":
        # y is the downscaled integer image on the 8-bit grid, and that is what the networks read
        pixels = torch.floor(x * 256)
        expected = (torch.round(downscale(pixels, 2, mode)).clamp(0, 255) + 0.5) / 256
        torch.testing.assert_close(y, expected)
        torch.testing.assert_close(quantized_downscale(x, 2, mode), expected)
        base = trace.nodes["y"]["fn"].base_dist
        per_bin = base.bin_log_probs()  # (B, C, h, w, 256)
        torch.testing.assert_close(per_bin.exp().sum(-1), torch.ones(per_bin.shape[:-1]), atol=1e-5, rtol=0)
        bins = torch.floor(y * 256).long().unsqueeze(-1)
        torch.testing.assert_close(
            trace.nodes["y"]["fn"].log_prob(y), per_bin.gather(-1, bins).squeeze(-1).sum((1, 2, 3)), atol=1e-3, rtol=1e-5
        )
        assert (trace.nodes["y"]["fn"].log_prob(y) < 0).all()  # log-probabilities, not densities
    else:
        torch.testing.assert_close(y, downscale(x, 2, mode))


# --------------------------------------------------------------------------- #
# runs, metrics and old checkpoints
# --------------------------------------------------------------------------- #

TINY_RUN = dict(max_steps=2, train_limit=64, eval_limit=8, batch_size=32, hidden=4, eval_samples=2, sr_samples=2,
                figures=False)  # fmt: skip


@pytest.fixture(scope="module")
def spec_run(tmp_path_factory):
    """A tiny run whose checkpoint looks like one written before x_given_y existed."""
    out = tmp_path_factory.mktemp("spec-run")
    train(TrainConfig(guide="full", x_given_y="spec", **TINY_RUN), out=str(out), progress=False, log=lambda *_: None)
    payload = load_checkpoint(out / "checkpoint.pt")
    del payload["config"]["x_given_y"]
    save_checkpoint(out / "checkpoint.pt", {k: v for k, v in payload.items() if k not in ("format", "version")})
    return out


def test_metrics_say_what_the_bits_per_dim_are(tmp_path):
    result = train(TrainConfig(guide="full", prior="mog", mog_components=3, **TINY_RUN), out=str(tmp_path),
                   progress=False, log=lambda *_: None)  # fmt: skip
    assert result.metrics["test"]["x_density"] == "exact"
    assert "a normalized density of x" in summary_table(result.metrics)
    mixture = result.metrics["mixture"]
    weights = torch.tensor(mixture["weights"], dtype=torch.float64)
    assert len(weights) == 3 and math.isclose(weights.sum().item(), 1.0, rel_tol=1e-6)
    assert mixture["effective_components"] == pytest.approx(math.exp(-(weights * weights.log()).sum().item()))
    assert 1.0 <= mixture["effective_components"] <= 3.0


def test_the_eq23_objective_warns_once_at_start(tmp_path):
    lines = []
    train(TrainConfig(prior="mog", elbo="meanfield-mog-bound", mog_components=3, **TINY_RUN), out=str(tmp_path),
          progress=False, log=lines.append)  # fmt: skip
    warnings = [line for line in lines if "concentrates" in line]
    assert len(warnings) == 1 and lines.index(warnings[0]) < 2


def test_old_checkpoints_load_as_the_spec_and_rescore_as_a_density(spec_run, capsys):
    checkpoint = spec_run / "checkpoint.pt"
    as_saved = evaluate_checkpoint(checkpoint, out_dir=spec_run / "as-saved")
    assert as_saved["config"]["x_given_y"] == "spec"
    assert as_saved["test"]["x_density"] == "joint"
    rescored = evaluate_checkpoint(checkpoint, x_given_y="consistent", out_dir=spec_run / "rescored")
    assert rescored["config"]["x_given_y"] == "consistent"
    assert rescored["test"]["x_density"] == "exact"
    assert rescored["test"]["iw_bpd"] != pytest.approx(as_saved["test"]["iw_bpd"], abs=1e-3)
    code = console_main(["evaluate", "--checkpoint", str(checkpoint), "--x-given-y", "consistent", "--quiet",
                         "--out", str(spec_run / "cli")])  # fmt: skip
    assert code == 0
    assert "a normalized density of x" in capsys.readouterr().out


def test_x_given_y_is_refused_for_a_vae(capsys):
    with pytest.raises(SystemExit) as raised:
        console_main(["train", "--model", "vae", "--x-given-y", "spec"])
    assert raised.value.code == 2
    assert "the VAE has no y" in capsys.readouterr().err

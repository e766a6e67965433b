"""The per-pixel sigma's levers against the collapse of z: a floor, and sigmas from y alone."""

import pytest
import torch
from conftest import tiny_images

from pyro_srvae import SRVAE
from pyro_srvae.cli import build_train_parser, config_from_args
from pyro_srvae.training.config import ConfigError, TrainConfig
from pyro_srvae.training.factory import build_model


def _srvae(**options):
    torch.manual_seed(0)
    return SRVAE((1, 8, 8), guide="full", likelihood="gaussian-pixel", u_dim=4, hidden=8, z_channels=1, **options)


def _perturb_decoders(model):
    # A fresh decoder starts near sigma = 0.1 everywhere; random weights make its sigmas depend on its inputs.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))


def _sigmas(model, y, z, u):
    raw, offset = model._x_parameters(y, z, u)
    return model.likelihood.loc_and_scale(raw, offset)


def test_sigmas_from_y_alone_do_not_follow_z_while_the_locations_do():
    y = torch.rand(3, 1, 4, 4)
    u = torch.randn(3, 4)
    z1, z2 = torch.randn(2, 3, 16)
    for source, sigmas_follow_z in (("y", False), ("decoder", True)):
        model = _srvae(pixel_scale_from=source)
        _perturb_decoders(model)
        loc1, sigma1 = _sigmas(model, y, z1, u)
        loc2, sigma2 = _sigmas(model, y, z2, u)
        assert not torch.allclose(loc1, loc2, atol=1e-4), source
        assert torch.allclose(sigma1, sigma2) != sigmas_follow_z, source
        # ... while the sigmas still vary with y: a network of y, not one constant.
        _, sigma3 = _sigmas(model, torch.rand(3, 1, 4, 4), z1, u)
        assert not torch.allclose(sigma1, sigma3, atol=1e-4), source


def test_sigmas_from_y_alone_broadcast_over_particles_of_z():
    model = _srvae(pixel_scale_from="y")
    x = tiny_images(2)
    distribution = model.x_distribution(model.downscale(x), torch.randn(5, 2, 16), torch.randn(5, 2, 4))
    assert distribution.batch_shape == (5, 2)
    assert torch.isfinite(distribution.log_prob(x)).all()  # x's block means are the y it was given


@pytest.mark.parametrize("floor", [0.02, 0.05])
def test_the_floor_bounds_every_sigma_of_p_x_and_p_y(floor):
    model = _srvae(pixel_scale_floor=floor)
    very_negative = torch.full((2, 2, 8, 8), -50.0)
    _, sigma = model.likelihood.loc_and_scale(very_negative)
    assert torch.allclose(sigma, torch.full_like(sigma, floor))
    # At raw = 0 the sigmas still start at gamma_init (0.1), whatever the floor.
    _, start = model.likelihood.loc_and_scale(torch.zeros(1, 2, 8, 8))
    assert torch.allclose(start, torch.full_like(start, 0.1))


def test_config_round_trip_builds_the_same_model():
    config = TrainConfig(model="srvae", guide="full", likelihood="gaussian-pixel", pixel_scale_from="y",
                         pixel_scale_floor=0.03, hidden=8, u_dim=4).validate()
    model = build_model(TrainConfig.from_dict(config.to_dict()), (1, 8, 8))
    assert model.scale_x is not None and model.likelihood.min_scale == 0.03
    old = dict(config.to_dict())
    del old["pixel_scale_from"], old["pixel_scale_floor"]  # a checkpoint from before the levers
    assert build_model(TrainConfig.from_dict(old), (1, 8, 8)).scale_x is None


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--pixel-scale-floor", "0.02"], "--likelihood gaussian has none"),
        (["--pixel-scale-from", "y"], "--pixel-scale-from y"),
        (["--likelihood", "gaussian-pixel", "--pixel-scale-floor", "0.2"], "must be in (0, 0.1)"),
        (["--model", "vae", "--likelihood", "gaussian-pixel", "--pixel-scale-from", "y"], "--model vae"),
    ],
)
def test_levers_without_a_per_pixel_sigma_are_refused_in_one_line(flags, message, capsys):
    parser = build_train_parser()
    with pytest.raises(SystemExit) as stop:
        config_from_args(parser, parser.parse_args(flags))
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error


def test_the_model_refuses_a_floor_its_likelihood_has_not():
    with pytest.raises(ValueError, match="has none"):
        SRVAE((1, 8, 8), pixel_scale_floor=0.02)
    with pytest.raises(ConfigError):
        TrainConfig(likelihood="gaussian-pixel", pixel_scale_floor=0.0).validate()

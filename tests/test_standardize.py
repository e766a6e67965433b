"""Per-band standardization for the networks (``--standardize``, docs/own-images.md): the networks
see x' = (x - offset) / scale, while densities, bits/dim and every output stay in x's own units.

The change of variables is checked against its closed form, log p(x) = log p(x') - D log scale, on
every estimator that reads the model's trace; a 1-pixel VAE's density of x still integrates to one;
super-resolutions come back in x's units; a 16-bit 4-band folder trains with the statistics stored;
the named datasets' runs are unchanged; checkpoints without statistics load as the identity."""

import math

import numpy as np
import pytest
import tifffile
import torch

import pyro
import pyro.poutine as poutine

from pyro_srvae.training.checkpoint import load_checkpoint, save_checkpoint
from pyro_srvae.cli import evaluate_main
from pyro_srvae.data.batching import band_statistics
from pyro_srvae.model.elbo import ELBO_NAMES, make_elbo
from pyro_srvae.metrics.likelihood import iw_conditional_log_likelihood, log_importance_weights
from pyro_srvae.model.distributions import block_mean
from pyro_srvae.model.srvae import SRVAE
from pyro_srvae.model.vae import VAE
from pyro_srvae.sr.loading import load_model
from pyro_srvae.sr.superresolve import superresolve
from pyro_srvae.training.config import ConfigError, TrainConfig
from pyro_srvae.training.factory import load_split
from pyro_srvae.training.loop import train
from conftest import write_scene_folder, write_tiff

QUIET = dict(progress=False, log=lambda *_: None)
TINY = dict(
    hidden=4, u_dim=2, z_dim=2, batch_size=8, eval_samples=2, sr_samples=2, eval_limit=4, figures=False, device="cpu",
)  # fmt: skip
OFFSET, SCALE = (0.03, 0.6), (0.012, 0.25)  # a 16-bit band of reflectances beside an 8-bit-like one


def scaled_and_plain(cls, **options):
    """Two models with the same weights: one standardized by OFFSET, SCALE; one on x' itself."""
    pyro.clear_param_store()
    scaled = cls(name="scaled", **options).set_data_scaling(OFFSET, SCALE)
    with torch.no_grad():  # away from the initialization, so that every network's output follows its input
        generator = torch.Generator().manual_seed(7)
        for parameter in scaled.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    plain = cls(name="plain", validate_inputs=False, **options)
    plain.load_state_dict(scaled.state_dict())
    plain.set_data_scaling(torch.zeros(2), torch.ones(2))
    assert scaled.standardized and not plain.standardized
    return scaled, plain


def data_units(batch=3, shape=(2, 4, 4), seed=0):
    """x on [0, 1] around OFFSET with spread SCALE per band (kept inside [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    offset, scale = torch.tensor(OFFSET).view(-1, 1, 1), torch.tensor(SCALE).view(-1, 1, 1)
    return (offset + scale * torch.randn((batch,) + shape, generator=g)).clamp(0.001, 0.999)


def log_jacobian(pixels_per_band):
    """log |dx'/dx| per image in closed form: -pixels sum_c log scale_c."""
    return -pixels_per_band * sum(math.log(s) for s in SCALE)


MODELS = {
    "vae": (VAE, dict(image_shape=(2, 4, 4), hidden=4, z_dim=2, prior="mog", mog_components=2), 16),
    "srvae-consistent": (SRVAE, dict(image_shape=(2, 4, 4), hidden=4, u_dim=2, z_dim=2, guide="full", prior="mog",
                                     mog_components=2), 16),
    # The spec's joint scores y (2 x 2 per band) as a density beside x: both change units.
    "srvae-spec": (SRVAE, dict(image_shape=(2, 4, 4), hidden=4, u_dim=2, z_dim=2, guide="full", prior="mog",
                               mog_components=2, x_given_y="spec"), 16 + 4),
    "srvae-pixel": (SRVAE, dict(image_shape=(2, 4, 4), hidden=4, u_dim=2, z_dim=2, likelihood="gaussian-pixel"), 16),
}  # fmt: skip


# --------------------------------------------------------------------------- #
# (1) Exactness: the density of x is that of x' times the Jacobian
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_importance_weights_are_those_of_x_prime_plus_the_jacobian(kind):
    cls, options, pixels = MODELS[kind]
    scaled, plain = scaled_and_plain(cls, **options)
    x = data_units()
    pyro.set_rng_seed(1)
    weights = log_importance_weights(scaled.model, scaled.guide, x, 4)
    pyro.set_rng_seed(1)
    weights_prime = log_importance_weights(plain.model, plain.guide, scaled.to_network_units(x), 4)
    assert abs(log_jacobian(pixels)) > 50  # the test could tell a missing or miscounted Jacobian
    torch.testing.assert_close(weights, weights_prime + log_jacobian(pixels), rtol=0, atol=2e-3)


@pytest.mark.parametrize("name", ELBO_NAMES)
@pytest.mark.parametrize("kind", ["vae", "srvae-consistent"])
def test_every_elbo_of_x_is_the_elbo_of_x_prime_plus_the_jacobian(kind, name):
    cls, options, pixels = MODELS[kind]
    scaled, plain = scaled_and_plain(cls, **options)
    x = data_units()
    particles = 3 if name in ("renyi", "iwae-dreg") else 1
    losses = []
    for model, data in ((scaled, x), (plain, scaled.to_network_units(x))):
        pyro.set_rng_seed(2)
        losses.append(make_elbo(name, num_particles=particles).loss(model.model, model.guide, data))
    # The losses are -ELBO summed over the images.
    assert losses[0] == pytest.approx(losses[1] - x.shape[0] * log_jacobian(pixels), abs=5e-3)


def test_the_conditional_density_of_super_resolution_changes_by_the_detail_dimensions():
    # sr_bpd's log p(x | y) = log p(x, y) - log p(y): y's Jacobian (lr_model) cancels its share.
    scaled, plain = scaled_and_plain(SRVAE, **MODELS["srvae-consistent"][1])
    x = data_units()
    pyro.set_rng_seed(3)
    conditional = iw_conditional_log_likelihood(scaled.model, scaled.guide, scaled.lr_model, scaled.lr_guide, x, 4)
    pyro.set_rng_seed(3)
    x_prime = scaled.to_network_units(x)
    conditional_prime = iw_conditional_log_likelihood(
        plain.model, plain.guide, plain.lr_model, plain.lr_guide, x_prime, 4
    )
    torch.testing.assert_close(conditional, conditional_prime + log_jacobian(16 - 4), rtol=0, atol=2e-3)


def test_a_one_pixel_vae_density_of_x_integrates_to_one():
    # p(x) = E_z p(x | z): for any fixed draws z_k the mixture of p(x | z_k) integrates to one
    # over x's own axis, if and only if the Jacobian 1/scale is in the density.
    model = VAE(image_shape=(1, 1, 1), hidden=4, z_dim=2, validate_inputs=False)
    model.set_data_scaling([0.4], [0.05])
    grid = torch.linspace(0.0, 1.0, 20001)
    draws = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    x = grid.repeat_interleave(len(draws)).view(-1, 1, 1, 1)
    z = draws.repeat(len(grid), 1)
    trace = poutine.trace(poutine.condition(model.model, data={"z": z})).get_trace(x)
    trace.compute_log_prob()
    log_p_x_given_z = sum(site["log_prob"] for name, site in trace.nodes.items()
                          if site["type"] == "sample" and name != "z" and name != "data")  # fmt: skip
    density = log_p_x_given_z.exp().view(len(grid), len(draws)).mean(1)
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-3)


# --------------------------------------------------------------------------- #
# (2) What the model returns is in x's units
# --------------------------------------------------------------------------- #
def test_super_resolution_comes_back_in_the_data_units_with_block_means_y():
    scaled, plain = scaled_and_plain(SRVAE, **MODELS["srvae-pixel"][1])
    y = scaled.downscale(data_units())
    pyro.set_rng_seed(4)
    sr = scaled.super_resolve(y, num_samples=5)
    pyro.set_rng_seed(4)
    sr_prime = plain.super_resolve(scaled.to_network_units(y), num_samples=5)
    offset, scale = torch.tensor(OFFSET).view(-1, 1, 1), torch.tensor(SCALE).view(-1, 1, 1)
    # x = offset + scale x' for the draws and means; every spread times the band's scale.
    for name in ("mean", "samples", "means"):
        torch.testing.assert_close(getattr(sr, name), offset + scale * getattr(sr_prime, name), rtol=1e-5, atol=1e-6)
    for name in ("std", "std_latent", "std_noise"):
        torch.testing.assert_close(getattr(sr, name), scale * getattr(sr_prime, name), rtol=1e-5, atol=1e-7)
    # Consistent: the block means of the mean and of every draw are y itself, in y's units.
    torch.testing.assert_close(block_mean(sr.mean, 2), y, rtol=0, atol=1e-6)
    torch.testing.assert_close(block_mean(sr.samples, 2), y.expand_as(block_mean(sr.samples, 2)), rtol=0, atol=1e-6)


def test_samples_and_reconstructions_come_back_in_the_data_units():
    offset, scale = torch.tensor(OFFSET).view(-1, 1, 1), torch.tensor(SCALE).view(-1, 1, 1)
    for kind in ("vae", "srvae-consistent"):
        cls, options, _ = MODELS[kind]
        scaled, plain = scaled_and_plain(cls, **options)
        x = data_units()
        x_prime = scaled.to_network_units(x)
        torch.testing.assert_close(scaled.reconstruct(x), offset + scale * plain.reconstruct(x_prime))
        pyro.set_rng_seed(5)
        drawn = scaled.sample(3)
        pyro.set_rng_seed(5)
        drawn_prime = plain.sample(3)
        if kind == "vae":  # x alone; the srVAE draws (x, y)
            drawn, drawn_prime = [drawn], [drawn_prime]
        for ours, theirs in zip(drawn, drawn_prime):
            torch.testing.assert_close(ours, offset + scale * theirs)


# --------------------------------------------------------------------------- #
# The statistics, and where standardization is refused
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype, low, high", [(torch.uint16, 600, 3000), (torch.uint8, 100, 102)])
def test_band_statistics_are_those_of_the_dequantized_images_streamed_in_chunks(dtype, low, high):
    # (The 8-bit case has two levels, where the noise's own variance 1/12 is a third of the total.)
    images = torch.randint(low, high, (7, 3, 5, 4), generator=torch.Generator().manual_seed(0)).to(dtype)
    mean, std = band_statistics(images, chunk_pixels=50)  # 2 images per chunk
    # x = (k + u) / 2**bits with u integrated out on a fine midpoint grid: an independent route.
    u = (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000
    x = (images.double().transpose(0, 1).reshape(3, -1, 1) + u) / (256 if dtype == torch.uint8 else 65536)
    torch.testing.assert_close(mean, x.mean(dim=(1, 2)), rtol=1e-12, atol=0)
    torch.testing.assert_close(std, x.std(dim=(1, 2), correction=0), rtol=1e-6, atol=0)
    again = band_statistics(images)  # one chunk
    torch.testing.assert_close(again[0], mean, rtol=1e-13, atol=0)
    torch.testing.assert_close(again[1], std, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "options",
    [dict(likelihood="dlogistic-mix"), dict(x_given_y="quantized"), dict(downscale_mode="bilinear")],
)
def test_standardization_is_refused_on_the_256_bin_grid(options):
    model = SRVAE(image_shape=(2, 4, 4), hidden=4, u_dim=2, z_dim=2, **options)
    assert model.discretized
    with pytest.raises(ValueError, match="256-bin grid") as error:
        model.set_data_scaling(OFFSET, SCALE)
    assert "\n" not in str(error.value)
    assert not model.standardized and torch.equal(model.data_scale, torch.ones(2, 1, 1))
    # The identity stays allowed (every unstandardized checkpoint loads).
    model.set_data_scaling([0.0, 0.0], [1.0, 1.0])


def test_bad_statistics_are_refused():
    model = VAE(image_shape=(2, 4, 4), hidden=4, z_dim=2)
    with pytest.raises(ValueError, match="one offset and one scale per band"):
        model.set_data_scaling([0.1], [0.2])
    with pytest.raises(ValueError, match="positive scales"):
        model.set_data_scaling([0.1, 0.1], [0.2, 0.0])


# --------------------------------------------------------------------------- #
# (3) A 16-bit 4-band folder, end to end
# --------------------------------------------------------------------------- #
def reflectances(rng, height, width, low=600, high=3000):
    """4 bands of 16-bit values in a small part of the range, with structure."""
    rows, cols = np.meshgrid(np.linspace(0, 3, height), np.linspace(0, 3, width), indexing="ij")
    field = np.stack([np.sin(rows * (b + 1)) * np.cos(cols + b) for b in range(4)])
    values = low + (high - low) * (field + 1) / 2 + rng.normal(0, 30, field.shape)
    return np.clip(values, low, high).astype(np.uint16)


@pytest.fixture(scope="module")
def reflectance_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("reflectances")
    rng = np.random.default_rng(0)
    write_scene_folder(root, lambda: reflectances(rng, 24, 20))
    messages = []
    config = TrainConfig(dataset="folder", data_dir=str(root / "images"), patch_size=8, out=str(root / "run"),
                         guide="full", max_steps=3, **TINY)  # fmt: skip
    result = train(config, progress=False, log=messages.append)
    return root, result, messages


def test_a_16_bit_folder_trains_standardized_and_stores_the_statistics(reflectance_run):
    root, result, messages = reflectance_run
    assert result.metrics["config"]["standardize"] == "auto" and result.model.standardized
    payload = load_checkpoint(result.checkpoint)
    model = load_model(result.checkpoint, device="cpu")
    assert model.standardized and model.bits == 16
    mean, std = band_statistics(_training_patches(result))
    torch.testing.assert_close(payload["model_state"]["data_offset"].view(-1), mean.float())
    torch.testing.assert_close(payload["model_state"]["data_scale"].view(-1), std.float())
    assert 600 / 65536 < mean.min() and mean.max() < 3000 / 65536
    assert any(m.startswith("standardized per band for the networks: mean +- std of x on [0, 1] =") for m in messages)
    assert result.metrics["data_scaling"]["scale"] == pytest.approx(std.tolist(), rel=1e-6)
    # The evaluation ran on the standardized model, and its bits/dim are those of x on the 16-bit grid.
    assert math.isfinite(result.metrics["test"]["iw_bpd"]) and result.metrics["test"]["bits"] == 16


def _training_patches(result):
    """The run's training patches, read as training read them."""
    config = TrainConfig.from_dict(result.metrics["config"])
    return load_split(config, "train").images


def test_superresolve_on_the_16_bit_folder_writes_uint16_four_band_outputs(reflectance_run, tmp_path):
    root, result, _ = reflectance_run
    bands = reflectances(np.random.default_rng(5), 10, 14)
    source = write_tiff(tmp_path / "input.tif", bands)
    (item,) = superresolve(str(result.checkpoint), [source], 3, out_dir=tmp_path / "out", **QUIET)
    written = tifffile.imread(item.files["mean_tif"])
    assert item.bits == 16 and written.dtype == np.uint16 and written.shape == (4, 20, 28)
    # In the data's units: each block of the written mean averages to the input's level.
    means = block_mean(torch.from_numpy(written.astype(np.float64))[None], 2)[0].numpy()
    assert np.abs(means - bands).max() <= 0.5 + 1e-3
    assert 500 < written.min() and written.max() < 4000


def test_a_resumed_run_keeps_the_checkpoint_statistics(reflectance_run, tmp_path):
    root, result, _ = reflectance_run
    payload = load_checkpoint(result.checkpoint)
    state = dict(payload["model_state"])
    state["data_scale"] = state["data_scale"] * 2  # not what the training set would give
    payload["model_state"] = state
    save_checkpoint(tmp_path / "checkpoint.pt", payload)
    resumed = train(resume=str(tmp_path / "checkpoint.pt"), max_steps=4, out=str(tmp_path), **QUIET)
    torch.testing.assert_close(resumed.model.data_scale.cpu(), state["data_scale"])
    torch.testing.assert_close(resumed.model.data_offset.cpu(), state["data_offset"])


def test_standardize_on_with_a_discretized_likelihood_is_one_clear_line(reflectance_run, tmp_path):
    root, _, _ = reflectance_run
    config = TrainConfig(dataset="folder", data_dir=str(root / "images"), patch_size=8, out=str(tmp_path / "run"),
                         likelihood="dlogistic-mix", standardize="on", max_steps=1, **TINY)  # fmt: skip
    with pytest.raises(ConfigError, match="--standardize on") as error:
        train(config, **QUIET)
    assert "\n" not in str(error.value) and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_rescoring_a_standardized_checkpoint_on_the_8_bit_grid_is_one_line(reflectance_run, tmp_path, capsys):
    _, result, _ = reflectance_run
    arguments = ["--checkpoint", str(result.checkpoint), "--x-given-y", "quantized", "--out", str(tmp_path / "e")]
    code = evaluate_main(arguments + ["--device", "cpu", "--quiet"])
    error = capsys.readouterr().err
    assert code == 1 and error.count("\n") == 1 and "Traceback" not in error
    assert "standardized per band" in error and "--x-given-y quantized" in error
    assert not (tmp_path / "e").exists()


# --------------------------------------------------------------------------- #
# (4) The named datasets' runs are unchanged
# --------------------------------------------------------------------------- #
def test_the_default_leaves_a_named_dataset_run_unchanged(tmp_path):
    common = dict(TINY, max_steps=2, train_limit=64)
    runs = {mode: train(TrainConfig(standardize=mode, out=str(tmp_path / mode), **common), **QUIET)
            for mode in ("auto", "off", "on")}  # fmt: skip
    assert not runs["auto"].model.standardized and runs["on"].model.standardized
    assert runs["auto"].metrics["epochs"] == runs["off"].metrics["epochs"]
    assert runs["auto"].metrics["test"] == runs["off"].metrics["test"]
    # ... and the comparison can see a difference: standardizing moves the first steps' loss.
    assert runs["on"].metrics["epochs"][0]["train_objective_bpd"] != runs["off"].metrics["epochs"][0]["train_objective_bpd"]


# --------------------------------------------------------------------------- #
# (5) Checkpoints from before the statistics existed
# --------------------------------------------------------------------------- #
def test_an_old_checkpoint_without_statistics_loads_as_the_identity(reflectance_run, tmp_path):
    _, result, _ = reflectance_run
    payload = load_checkpoint(result.checkpoint)  # a standardized run, made old below
    old_config = {k: v for k, v in payload["config"].items() if k != "standardize"}
    old_state = {k: v for k, v in payload["model_state"].items() if k not in ("data_offset", "data_scale")}
    save_checkpoint(tmp_path / "old.pt", dict(payload, config=old_config, model_state=old_state))
    assert TrainConfig.from_dict(old_config).standardize == "off"
    loaded = load_model(tmp_path / "old.pt", device="cpu")
    assert not loaded.standardized
    assert torch.equal(loaded.data_offset, torch.zeros(4, 1, 1)) and torch.equal(loaded.data_scale, torch.ones(4, 1, 1))
    # Loading an old state dict into a standardized model resets it to the identity, too.
    model = load_model(result.checkpoint, device="cpu")
    model.load_state_dict(old_state)
    assert not model.standardized and torch.equal(model.data_scale, torch.ones(4, 1, 1))


def test_auto_leaves_an_8_bit_folder_unstandardized(tmp_path):
    # 8-bit pixels fill [0, 1] already; a standardized run of the photographs' recipe diverged (results.md).
    rng = np.random.default_rng(1)
    for split, count in (("train", 2), ("test", 1)):
        for index in range(count):
            path = tmp_path / "images" / split / f"grey{index}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, rng.integers(0, 256, (16, 16), dtype=np.uint8))
    common = dict(TINY, dataset="folder", data_dir=str(tmp_path / "images"), patch_size=8, max_steps=1)
    auto = train(TrainConfig(out=str(tmp_path / "auto"), **common), **QUIET)
    forced = train(TrainConfig(out=str(tmp_path / "on"), standardize="on", **common), **QUIET)
    assert auto.metrics["test"]["bits"] == 8 and not auto.model.standardized and auto.metrics["data_scaling"] is None
    assert forced.model.standardized

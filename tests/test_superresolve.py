"""Super-resolving a user's images: tiling and blending, uncertainty, files, the console command, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pyro_srvae import SRVAE, SuperResolution, TrainConfig, load_model, superresolve, superresolve_image, train
from pyro_srvae.training.checkpoint import load_checkpoint, save_checkpoint
from pyro_srvae.utils.seeds import derive_seed
from pyro_srvae.cli import console_main
from pyro_srvae.data.channels import load_image, to_uint8_image
from pyro_srvae.data.images import read_image
from pyro_srvae.sr.files import OUTPUT_SUFFIXES
from pyro_srvae.data.batching import dihedral_view, undo_dihedral_view
from pyro_srvae.sr.tiling import SuperResolveError, plan_axis, tile_window

# The vector z read by the SR decoder's first layer, through one linear projection: zeroing it gives the
# deterministic decoder several tests below need. The z map, the main job's default, has its own test.
TRAIN_FLAGS = [
    "--max-steps", "2", "--train-limit", "64", "--eval-limit", "8", "--batch-size", "32", "--hidden", "4",
    "--eval-samples", "2", "--sr-samples", "2", "--no-figures", "--quiet", "--z-channels", "0", "--z-injection", "input",
]  # fmt: skip
QUIET = dict(progress=False, log=lambda *_: None)


# --------------------------------------------------------------------------- #
# Fixtures
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny srVAE run made by `pyro-srvae train` (in process), shared by the module."""
    out = tmp_path_factory.mktemp("run")
    assert console_main(["train", *TRAIN_FLAGS, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def checkpoint(run_dir):
    return run_dir / "checkpoint.pt"


@pytest.fixture(scope="module")
def vae_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    config = TrainConfig(model="vae", max_steps=1, train_limit=32, eval_limit=4, batch_size=32, hidden=4)
    train(config, out=str(out), progress=False, log=lambda *_: None, eval_samples=1, sr_samples=1, figures=False)
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def deterministic_checkpoint(checkpoint, tmp_path_factory):
    """The same model with the decoder's latent projection zeroed: x = mu(y) ignores z and u."""
    payload = load_checkpoint(checkpoint)
    payload["model_state"]["decoder_x.project.0.weight"].zero_()
    path = tmp_path_factory.mktemp("deterministic") / "checkpoint.pt"
    save_checkpoint(path, {k: v for k, v in payload.items() if k not in ("format", "version")})
    return path


def deterministic(model):
    with torch.no_grad():
        model.decoder_x.project[0].weight.zero_()
    return model


def stationary_model(scale=0.1):
    """A tiny untrained SRVAE whose predictive has the same per-pixel statistics at every pixel.

    The decoder's residual is ``scale * z_0`` times a checkerboard of +-1 (block means 0,
    so the consistent likelihood keeps it): on a constant image every tile sees the same
    input, and within a tile the latent part's variance (``scale^2 var z_0``) and the
    noise's (``gamma^2 (1 - 1/f^2)``) are the same at every pixel. Latent and noise parts
    are of the same size, so a mistake in either shows.
    """
    torch.manual_seed(0)
    model = SRVAE(hidden=4).eval()
    channels, height, width = model.image_shape
    pattern = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(height // 2, width // 2).expand(channels, height, width)

    def residual(y, z, u=None):
        return scale * z[..., 0].reshape(z.shape[:-1] + (1, 1, 1)) * pattern

    model.decoder_x.residual = residual
    assert model.exact_consistent
    return model


class RecordingSR:
    """Wraps an SR model and keeps every ``super_resolve`` result (the tiles' own draws)."""

    def __init__(self, model):
        self.model, self.lr_shape, self.factor, self.results = model, model.lr_shape, model.factor, []

    def super_resolve(self, y, num_samples=1, observation_noise=True):
        result = self.model.super_resolve(y, num_samples, observation_noise=observation_noise)
        self.results.append(result)
        return result


def lr_variance(std, rows, cols, factor=2):
    """The mean variance over the factor x factor blocks at low-resolution ``rows`` x ``cols``."""
    _, height, width = std.shape
    blocks = std.square().mean(0).view(height // factor, factor, width // factor, factor).mean((1, 3))
    return blocks[rows][:, cols].mean().item()


def seam_and_centre_rows(plan):
    """Low-resolution image positions mid-way between two tile centres (seams) and at tile centres.

    With the default overlap of half a tile, offset 3 of tile k is offset 10 of tile k-1:
    both windows are 1/2 there. Offsets 6 and 7 are a tile's centre (window 0.99).
    """
    seams = [plan.starts[k] + 3 - plan.pad_before for k in range(1, len(plan.starts))]
    centres = [s + o - plan.pad_before for s in plan.starts for o in (6, 7)]
    return [p for p in seams if 0 <= p < plan.length], [p for p in centres if 0 <= p < plan.length]


class LocalSR(torch.nn.Module):
    """A stand-in SR model whose output is local: nearest-neighbour upsampling, plus 0.1 s for draw s.

    Running it on tiles and blending must give exactly its mean on the whole image,
    wherever the tiles fall: any misplaced tile, wrong crop or unnormalised weight shows.
    Its draws are the same in every tile (not independent), which the blend amplifies by
    ``sum_i v_i``: a known factor between 1 and 2 per pixel, the same for every draw.
    """

    def __init__(self, channels=1, tile=(14, 14), factor=2):
        super().__init__()
        self.lr_shape = (channels, *tile)
        self.factor = factor
        self.calls = []
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def whole(self, y, num_samples):
        up = F.interpolate(y.unsqueeze(-4) if y.dim() == 3 else y, scale_factor=self.factor, mode="nearest")
        offsets = 0.1 * torch.arange(num_samples, dtype=y.dtype).view(-1, *([1] * up.dim()))
        return up.unsqueeze(0) + offsets

    def super_resolve(self, y, num_samples=1, observation_noise=True):
        assert tuple(y.shape[1:]) == self.lr_shape, y.shape
        self.calls.append(y.shape[0])
        samples = self.whole(y, num_samples)
        zero = torch.zeros_like(samples[0])
        return SuperResolution(samples.mean(0), samples.std(0), samples, samples.std(0), zero, samples)


def write_png(path, array):
    Image.fromarray(array).save(path)
    return path


def snapshot(paths):
    return {Path(p): Path(p).read_bytes() for p in paths}


def files_in(folder):
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- #
# Tiling and blending
# --------------------------------------------------------------------------- #
def test_tile_plan_covers_the_image_on_a_regular_grid():
    assert plan_axis(28, 14, 0).starts == (0, 14) and plan_axis(28, 14, 0).pad_before == 0
    for length in (2, 5, 14, 15, 23, 28, 41, 100):
        for overlap in (0, 3, 7, 13):
            plan = plan_axis(length, 14, overlap)
            assert plan.starts[0] == 0 and plan.starts[-1] + 14 == plan.padded
            assert all(b - a == 14 - overlap for a, b in zip(plan.starts, plan.starts[1:]))
            assert plan.pad_before >= overlap // 2 and plan.pad_after >= overlap // 2
            assert plan.padded == length + plan.pad_before + plan.pad_after


def test_tiling_is_exact_on_a_multiple_of_the_tile_size(checkpoint):
    """overlap=0 on 2x3 tiles: the model's own output on each tile, same latent draws.

    Equal to float rounding, not bit for bit: oneDNN may pick another convolution kernel
    for another batch size or input layout (channels-last activations). Another latent
    draw would differ by orders of magnitude more than the tolerance.
    """
    model = load_model(checkpoint)
    y = torch.rand(1, 28, 42, generator=torch.Generator().manual_seed(1))
    sr = superresolve_image(model, y, 5, overlap=0, seed=3)
    assert sr.samples.shape == (5, 1, 56, 84) and sr.mean.shape == sr.std.shape == (1, 56, 84)

    tiles = torch.stack([y[:, 14 * a : 14 * a + 14, 14 * b : 14 * b + 14] for a in range(2) for b in range(3)])
    torch.manual_seed(3)
    reference = model.super_resolve(tiles, num_samples=5)  # (S, 6, 1, 28, 28), tiles row-major

    def untile(t):
        return t.reshape(-1, 2, 3, 1, 28, 28).permute(0, 3, 1, 4, 2, 5).reshape(-1, 1, 56, 84).squeeze(0)

    torch.testing.assert_close(sr.samples, untile(reference.samples), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sr.means, untile(reference.means), rtol=1e-5, atol=1e-6)
    for field in ("mean", "std", "std_latent", "std_noise"):
        torch.testing.assert_close(getattr(sr, field), untile(getattr(reference, field)), rtol=1e-4, atol=1e-6)
    assert sr.std_latent.max() > 0  # the latents matter: the comparison above is not trivial

    # One tile exactly: the model's output on the image itself.
    torch.manual_seed(3)
    single = model.super_resolve(y[None, :, :14, :14], num_samples=5).samples[:, 0]
    torch.testing.assert_close(superresolve_image(model, y[:, :14, :14], 5, overlap=0, seed=3).samples, single,
                               rtol=1e-5, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("size", [(28, 28), (23, 37), (5, 3), (14, 15)])
def test_blending_reproduces_a_local_model_exactly(size):
    """Overlapping tiles, padding and crop: for a local model the blended mean is its whole-image mean.

    The residuals r_s of this model are the same in every tile, so the blend gives
    ``K r_s`` with ``K = sum_i v_i`` (1 where one tile covers a pixel, at most 2 with
    half-tile overlaps), per factor x factor block and the same for every draw.
    """
    model = LocalSR()
    y = torch.rand(1, *size, generator=torch.Generator().manual_seed(2))
    sr = superresolve_image(model, y, 3, seed=None, tile_batch=4)
    whole = model.whole(y, 3)[:, 0]
    assert sr.samples.shape == sr.means.shape == (3, 1, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(sr.mean, whole.mean(0), rtol=0, atol=1e-6)
    residual, expected = sr.samples - sr.mean, whole - whole.mean(0)  # draw 1 is the mean: residual 0
    gain = residual[0] / expected[0]
    torch.testing.assert_close(residual, gain * expected, rtol=0, atol=1e-5)
    assert gain.min() >= 1 - 1e-5 and gain.max() <= 2 + 1e-5
    torch.testing.assert_close(gain, F.interpolate(F.avg_pool2d(gain[None], 2), scale_factor=2)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(sr.std, gain * whole.std(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(sr.means, sr.samples, rtol=0, atol=0)
    assert torch.all(sr.std_noise == 0)
    assert max(model.calls) <= 4  # batched over tiles, at most tile_batch per call
    if size == (23, 37):
        assert sum(model.calls) > 6  # overlapping tiles: more than a plain grid would need


def test_blending_is_seamless_on_a_size_that_is_not_a_multiple(checkpoint):
    """A constant image through the real (deterministic) decoder: plain tiles show their edges, blended ones not."""
    model = deterministic(load_model(checkpoint))
    y = torch.full((1, 33, 47), 0.5)

    def jumps(x):  # same-phase neighbours (the 2x2 pixel shuffle gives a period of 2)
        return max((x[:, :, 2:] - x[:, :, :-2]).abs().max().item(), (x[:, 2:] - x[:, :-2]).abs().max().item())

    plain = superresolve_image(model, y, 2, overlap=0).mean
    blended = superresolve_image(model, y, 2).mean
    assert plain.shape == blended.shape == (1, 66, 94)
    assert jumps(plain) > 0.005  # the zero padding of the convolutions marks every tile edge
    assert jumps(blended) < 0.25 * jumps(plain)


def test_latent_uncertainty_is_zero_when_the_decoder_is_deterministic(checkpoint):
    """Decoder means that ignore z and u: std_latent exactly 0, std is the likelihood's noise alone."""
    model = deterministic(load_model(checkpoint))
    y = torch.rand(1, 23, 37)
    sr = superresolve_image(model, y, 6)
    assert torch.all(sr.std_latent == 0)
    assert torch.equal(sr.mean, sr.means[0]) and torch.equal(sr.means[0], sr.means[5])
    # The consistent Gaussian's noise with a scalar gamma: gamma^2 (1 - 1/f^2) at every pixel.
    torch.testing.assert_close(sr.std_noise, torch.full_like(sr.mean, model.gamma_x.item() * 0.75**0.5))
    assert sr.std.min() > 0 and not torch.equal(sr.samples[0], sr.samples[5])

    means_only = superresolve_image(model, y, 6, observation_noise=False)
    assert torch.all(means_only.std == 0) and torch.all(means_only.std_noise == 0)
    assert torch.equal(means_only.mean, means_only.samples[0]) and torch.equal(means_only.samples, means_only.means)
    torch.testing.assert_close(means_only.mean, sr.mean)


def test_observation_noise_false_blends_decoder_means(checkpoint):
    model = load_model(checkpoint)
    y = torch.rand(1, 20, 26, generator=torch.Generator().manual_seed(5))
    full = superresolve_image(model, y, 4, seed=2)
    means_only = superresolve_image(model, y, 4, seed=2, observation_noise=False)
    assert torch.equal(means_only.samples, means_only.means) and torch.all(means_only.std_noise == 0)
    torch.testing.assert_close(means_only.std, means_only.std_latent)
    # The same latent draws (the noise is drawn after them): the same decoder means.
    torch.testing.assert_close(means_only.means, full.means, rtol=1e-5, atol=1e-6)
    assert (full.std.square().mean() > 10 * means_only.std.square().mean()).item()


# --------------------------------------------------------------------------- #
# The statistics of the blend
# --------------------------------------------------------------------------- #
STATIONARY_SIZE = 42  # LR pixels: 6 x 6 tiles of 14 with half-tile overlaps


@pytest.fixture(scope="module")
def stationary():
    """(model, y, blended 400 draws, the recorded tile draws, a 2000-draw reference on one tile)."""
    model = stationary_model()
    y = torch.full((1, STATIONARY_SIZE, STATIONARY_SIZE), 0.5)
    recorder = RecordingSR(model)
    sr = superresolve_image(recorder, y, 400, seed=0)
    torch.manual_seed(1)
    reference = model.super_resolve(y[None, :, :14, :14], num_samples=2000)
    return model, y, sr, recorder.results, reference


def test_tiled_std_shows_no_tile_grid_and_is_one_tiles(stationary):
    """Stationary predictive: the std at seams (two or four tiles blended) is the std at tile centres.

    The old blend, every draw the w-weighted mix of independent tile draws, has variance
    sum_i w_i^2 var there: its seam/centre std ratio is 0.72 on one axis's seams and 0.52
    at the corners of four tiles. Sampling error of these averages is below 1%.
    """
    _, _, sr, _, reference = stationary
    seams, centres = seam_and_centre_rows(plan_axis(STATIONARY_SIZE, 14, 7))
    assert len(seams) == 5 and len(centres) == 12
    one_tile = reference.std.square().mean().item()  # the same at every pixel of the tile
    for name in ("std", "std_latent", "std_noise"):
        field = getattr(sr, name)
        centre = lr_variance(field, centres, centres)
        for rows, cols in ((seams, seams), (seams, centres), (centres, seams)):
            ratio = (lr_variance(field, rows, cols) / centre) ** 0.5
            assert abs(ratio - 1) < 0.05, (name, ratio)
    # The blended draws have, at every pixel, the variance of one tile's draw.
    for rows, cols in ((centres, centres), (seams, seams)):
        assert abs((lr_variance(sr.std, rows, cols) / one_tile) ** 0.5 - 1) < 0.05
    everywhere = list(range(STATIONARY_SIZE))
    assert abs((lr_variance(sr.std, everywhere, everywhere) / one_tile) ** 0.5 - 1) < 0.03
    latent = lr_variance(sr.std_latent, everywhere, everywhere) / reference.std_latent.square().mean().item()
    assert abs(latent**0.5 - 1) < 0.05
    torch.testing.assert_close(sr.std_noise, torch.full_like(sr.std_noise, reference.std_noise.mean().item()))


def test_a_window_weighted_blend_of_the_same_draws_would_show_the_tile_grid(stationary):
    """The same tile draws, blended as before (draw s = sum_i w_i X_{i,s}): the seams' std drops by half."""
    _, _, sr, tile_results, _ = stationary
    plan = plan_axis(STATIONARY_SIZE, 14, 7)
    draws = torch.cat([r.samples for r in tile_results], dim=1)  # (S, tiles, C, 28, 28), row-major
    window = tile_window(14)
    total = torch.zeros(plan.padded, dtype=torch.float64)
    for start in plan.starts:
        total[start : start + 14] += window
    weights = [(window / total[s : s + 14]).repeat_interleave(2).float() for s in plan.starts]
    side = plan.padded * 2
    canvas = torch.zeros(draws.shape[0], 1, side, side)
    for k in range(draws.shape[1]):
        a, b = divmod(k, len(plan.starts))
        top, left = plan.starts[a] * 2, plan.starts[b] * 2
        canvas[:, :, top : top + 28, left : left + 28] += draws[:, k] * (weights[a][:, None] * weights[b][None, :])
    cut = slice(plan.pad_before * 2, plan.pad_before * 2 + 2 * STATIONARY_SIZE)
    old_std = canvas[:, :, cut, cut].std(0, correction=1)
    assert draws.shape[:2] == (400, 36)
    seams, centres = seam_and_centre_rows(plan)
    corner = (lr_variance(old_std, seams, seams) / lr_variance(old_std, centres, centres)) ** 0.5
    edge = (lr_variance(old_std, seams, centres) / lr_variance(old_std, centres, centres)) ** 0.5
    assert corner < 0.6 and edge < 0.8, (corner, edge)  # the old blend fails the test above
    new = (lr_variance(sr.std, seams, seams) / lr_variance(sr.std, centres, centres)) ** 0.5
    assert abs(new - 1) < 0.05


def test_tiled_variance_is_latent_plus_noise(stationary, checkpoint):
    """std^2 = std_latent^2 + std_noise^2 for the blend, at seams and centres (law of total variance)."""
    _, _, sr, _, _ = stationary
    assert sr.std_latent.square().mean() > 0.5 * sr.std_noise.square().mean()  # both parts matter
    seams, centres = seam_and_centre_rows(plan_axis(STATIONARY_SIZE, 14, 7))
    for rows, cols in ((seams, seams), (centres, centres), (seams, centres)):
        total = lr_variance(sr.std, rows, cols)
        parts = lr_variance(sr.std_latent, rows, cols) + lr_variance(sr.std_noise, rows, cols)
        assert abs(total / parts - 1) < 0.05, (rows, cols, total, parts)
    # A trained model on a non-constant image, tiles of different content.
    model = load_model(checkpoint)
    y = torch.rand(1, 23, 37, generator=torch.Generator().manual_seed(4))
    trained = superresolve_image(model, y, 200, seed=1)
    total = trained.std.square().mean()
    assert abs(total / (trained.std_latent.square() + trained.std_noise.square()).mean() - 1) < 0.05


@pytest.mark.parametrize("size, overlap", [((23, 37), None), ((33, 19), (5, 3)), ((14, 14), 0)])
def test_every_tiled_draw_keeps_the_block_means_of_y(checkpoint, size, overlap):
    """Consistent model: each tile's draws have block means y; the block-constant blend keeps them."""
    model = load_model(checkpoint)
    assert model.exact_consistent
    y = torch.rand(1, *size, generator=torch.Generator().manual_seed(6))
    sr = superresolve_image(model, y, 8, seed=0, overlap=overlap)
    for name, field in (("samples", sr.samples), ("means", sr.means), ("mean", sr.mean[None])):
        error = (F.avg_pool2d(field, 2) - y).abs().max().item()
        assert error < 1e-5, (name, error)
    assert sr.std.min() > 0  # the draws differ: the block means are kept by the blend, not by accident


def test_a_z_map_run_super_resolves_a_large_image_from_its_latents(tmp_path):
    """The main job's layout (z a map read by every layer): tiled draws keep y's block means, the
    decoder means differ (z proposes), and the files show them above the full samples."""
    flags = TRAIN_FLAGS[: TRAIN_FLAGS.index("--z-channels")]
    assert console_main(["train", *flags, "--out", str(tmp_path / "run")]) == 0
    model = load_model(tmp_path / "run" / "checkpoint.pt")
    assert model.z_channels == 1 and model.decoder_x.z_injection == "every"
    y = torch.rand(1, 23, 37, generator=torch.Generator().manual_seed(6))
    sr = superresolve_image(model, y, 6, seed=0)
    assert (F.avg_pool2d(sr.samples, 2) - y).abs().max() < 1e-5
    assert sr.std_latent.mean() > 0.1 * sr.std_noise.mean()  # the latents carry a part of the spread
    image = tmp_path / "in.npy"
    np.save(image, y.numpy())
    assert console_main(["superresolve", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--samples", "4",
                         "--out", str(tmp_path / "sr"), str(image)]) == 0  # fmt: skip
    assert (tmp_path / "sr" / "in_sr_samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_draws_are_reproducible_and_leave_the_callers_rng_alone(checkpoint):
    model = load_model(checkpoint)
    y = torch.rand(1, 20, 20)
    state = torch.get_rng_state()
    first = superresolve_image(model, y, 4, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.samples, superresolve_image(model, y, 4, seed=7).samples)
    assert not torch.equal(first.samples, superresolve_image(model, y, 4, seed=8).samples)
    # Chunking the tiles differently draws differently but works the same way.
    assert superresolve_image(model, y, 4, seed=7, tile_batch=1).samples.shape == first.samples.shape


def test_a_model_already_registered_with_pyro_can_be_used(checkpoint):
    trained = SRVAE(hidden=4)
    trained.super_resolve(torch.rand(2, 1, 14, 14), 2)  # registers "srvae" in the param store
    other = load_model(checkpoint)  # another module under the same name
    assert superresolve_image(other, torch.rand(1, 16, 16), 2).mean.shape == (1, 32, 32)
    assert trained.super_resolve(torch.rand(2, 1, 14, 14), 2).mean.shape == (2, 1, 28, 28)


# --------------------------------------------------------------------------- #
# Reading images
# --------------------------------------------------------------------------- #
def test_pixel_scaling_matches_training_dequantization(tmp_path):
    values = np.array([[0, 1, 128, 255]], dtype=np.uint8)
    read = read_image(write_png(tmp_path / "a.png", values)).pixels
    np.testing.assert_allclose(read, (values[None] + 0.5) / 256)
    assert np.array_equal(np.asarray(to_uint8_image(read)), values)  # written back as the same 8-bit values
    sixteen = np.array([[0, 1000, 65535]], dtype=np.uint16)
    np.testing.assert_allclose(read_image(write_png(tmp_path / "b.png", sixteen)).pixels, (sixteen[None] + 0.5) / 65536)
    np.save(tmp_path / "c.npy", np.array([[0.0, 0.25], [0.5, 1.0]]))
    np.testing.assert_allclose(read_image(tmp_path / "c.npy").pixels, [[[0.0, 0.25], [0.5, 1.0]]])


def test_grey_and_rgb_convert_where_unambiguous(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (6, 9), dtype=np.uint8)
    grey_png = write_png(tmp_path / "grey.png", grey)
    as_rgb = write_png(tmp_path / "grey_as_rgb.png", np.repeat(grey[..., None], 3, axis=2))
    opaque = write_png(tmp_path / "opaque.png", np.dstack([grey, grey, grey, np.full_like(grey, 255)]))
    colour = write_png(tmp_path / "colour.png", rng.integers(0, 256, (6, 9, 3), dtype=np.uint8))

    reference, note = load_image(grey_png, 1)
    assert note is None and reference.shape == (1, 6, 9)
    for path in (as_rgb, opaque):
        pixels, note = load_image(path, 1)
        assert np.array_equal(pixels, reference) and note
    pixels, note = load_image(colour, 1)
    assert pixels.shape == (1, 6, 9) and "luma" in note
    pixels, note = load_image(grey_png, 3)
    assert pixels.shape == (3, 6, 9) and np.array_equal(pixels[2], reference[0]) and "RGB" in note

    # Four bands: a (4, H, W) array, or a four-page TIFF, one band per page.
    np.save(tmp_path / "bands.npy", rng.random((4, 6, 9)).astype(np.float32))
    assert load_image(tmp_path / "bands.npy", 4)[0].shape == (4, 6, 9)
    pages = [Image.fromarray(rng.integers(0, 65536, (6, 9), dtype=np.uint16)) for _ in range(4)]
    pages[0].save(tmp_path / "bands.tif", save_all=True, append_images=pages[1:])
    assert load_image(tmp_path / "bands.tif", 4)[0].shape == (4, 6, 9)


def test_rgb_for_a_four_band_model_is_refused(tmp_path):
    model = SRVAE(image_shape=(4, 28, 28), hidden=4)
    path = write_png(tmp_path / "colour.png", np.zeros((20, 20, 3), dtype=np.uint8))
    with pytest.raises(SuperResolveError, match=r"3 channels \(RGB\) but the model takes 4"):
        superresolve(model, [path], 2, out_dir=tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- #
# The Python function and the files
# --------------------------------------------------------------------------- #
def test_superresolve_writes_every_output_and_returns_the_arrays(checkpoint, tmp_path, monkeypatch):
    from pyro_srvae import plots

    figures, save = {}, plots.common.save_figure

    def spy(fig, path):
        figures[Path(path).name] = fig
        return save(fig, path)

    for module in (plots.common, plots.training, plots.uncertainty):

        monkeypatch.setattr(module, "save_figure", spy)
    rng = np.random.default_rng(1)
    grey = write_png(tmp_path / "scene.png", rng.integers(0, 256, (23, 37), dtype=np.uint8))
    np.save(tmp_path / "scene.npy", rng.random((14, 14)).astype(np.float32))  # same stem as the PNG
    inputs = [grey, tmp_path / "scene.npy"]
    before = snapshot(inputs)
    out = tmp_path / "out"
    results = superresolve(str(checkpoint), inputs, 3, out_dir=out, **QUIET)

    assert [r.input for r in results] == inputs
    first, second = results
    assert first.mean.shape == first.std.shape == (1, 46, 74) and first.samples.shape == (3, 1, 46, 74)
    assert second.mean.shape == (1, 28, 28)
    assert set(first.files) == set(OUTPUT_SUFFIXES)
    assert first.files["mean_npy"].name == "scene_png_sr_mean.npy"  # a shared stem is told apart
    assert second.files["mean_npy"].name == "scene_npy_sr_mean.npy"
    assert len(files_in(out)) == 2 * len(OUTPUT_SUFFIXES) == 18
    assert not [name for name in files_in(out) if name.startswith(".")]
    assert first.files["std_latent_npy"].name == "scene_png_sr_std_latent.npy"
    assert first.files["std_noise_npy"].name == "scene_png_sr_std_noise.npy"
    np.testing.assert_array_equal(np.load(first.files["mean_npy"]), first.mean)
    np.testing.assert_array_equal(np.load(first.files["std_npy"]), first.std)
    np.testing.assert_array_equal(np.load(first.files["std_latent_npy"]), first.std_latent)
    np.testing.assert_array_equal(np.load(first.files["std_noise_npy"]), first.std_noise)
    assert first.std_latent.shape == first.std_noise.shape == (1, 46, 74)
    assert (first.std_noise > 0).all() and (first.std_latent >= 0).all()
    np.testing.assert_array_equal(np.load(first.files["samples_npy"]), first.samples)
    assert (first.std >= 0).all() and first.std.max() > 0
    with Image.open(first.files["mean_png"]) as png:
        assert png.size == (74, 46) and png.mode == "L"
        # the mean in the input's own units: an 8-bit PNG in, uint8 out, floor(256 x) of the mean
        native = tifffile.imread(first.files["mean_tif"])
        assert native.dtype == np.uint8 and np.array_equal(native, np.asarray(png))
    assert tifffile.imread(second.files["mean_tif"]).dtype == np.float32  # a float .npy in
    for key in ("uncertainty_png", "samples_png"):
        assert first.files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The uncertainty figure: total std and its two parts, one shared colour bar.
    (figure,) = [fig for name, fig in figures.items() if name.startswith(".scene_png_uncertainty.png")]
    panels = [ax for ax in figure.axes if ax.get_images()]
    assert [ax.get_title() for ax in panels] == ["total std", "latent part", "noise part"]
    assert len(figure.axes) == 4 and len({im.get_clim() for ax in panels for im in ax.get_images()}) == 1
    np.testing.assert_allclose(panels[0].get_images()[0].get_array(), first.std[0])
    np.testing.assert_allclose(panels[2].get_images()[0].get_array(), first.std_noise[0])
    assert snapshot(inputs) == before

    again = superresolve(str(checkpoint), grey, 3, **QUIET)  # no out_dir: arrays only
    assert again[0].files == {} and np.array_equal(again[0].samples, first.samples)


@pytest.mark.parametrize("writer", ["plot_uncertainty_parts", "plot_sample_strip"])
def test_a_failure_while_writing_leaves_no_file_of_that_input(checkpoint, tmp_path, monkeypatch, writer):
    from pyro_srvae import plots

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, writer, broken)
    path = write_png(tmp_path / "a.png", np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(SuperResolveError, match="No space left on device"):
        superresolve(str(checkpoint), [path], 2, out_dir=tmp_path / "out", **QUIET)
    assert files_in(tmp_path / "out") == []


# --------------------------------------------------------------------------- #
# The console command
# --------------------------------------------------------------------------- #
def run_console(*args, cwd=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    script = Path(sys.executable).with_name("pyro-srvae")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "pyro_srvae.cli"]
    return subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=300, cwd=cwd
    )


def test_console_superresolve(checkpoint, tmp_path):
    rng = np.random.default_rng(2)
    inputs = [
        write_png(tmp_path / "grey.png", rng.integers(0, 256, (23, 37), dtype=np.uint8)),
        write_png(tmp_path / "colour.jpg", rng.integers(0, 256, (16, 30, 3), dtype=np.uint8)),
    ]
    before = snapshot(inputs)
    result = run_console("superresolve", "--checkpoint", checkpoint, "--samples", "3", "--quiet", *inputs, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = tmp_path / "superresolved"  # the default output folder, in the working directory
    assert files_in(out) == sorted(f"{stem}{suffix}" for stem in ("grey", "colour") for suffix in OUTPUT_SUFFIXES.values())
    assert np.load(out / "colour_sr_samples.npy").shape == (3, 1, 32, 60)
    for suffix in ("_sr_std.npy", "_sr_std_latent.npy", "_sr_std_noise.npy"):
        assert np.load(out / f"grey{suffix}").shape == (1, 46, 74)
    assert snapshot(inputs) == before


def test_console_uncertainty_of_a_deterministic_decoder_is_the_noise_alone(deterministic_checkpoint, tmp_path, capsys):
    path = write_png(tmp_path / "a.png", np.random.default_rng(3).integers(0, 256, (19, 25), dtype=np.uint8))
    code = console_main(["superresolve", "--checkpoint", str(deterministic_checkpoint), "--samples", "4",
                         "--out", str(tmp_path / "out"), "--quiet", str(path)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    std, latent, noise = (np.load(tmp_path / "out" / f"a_sr_{name}.npy") for name in ("std", "std_latent", "std_noise"))
    assert std.shape == latent.shape == noise.shape == (1, 38, 50)
    assert np.all(latent == 0)
    gamma = load_model(deterministic_checkpoint).gamma_x.item()
    np.testing.assert_allclose(noise, gamma * 0.75**0.5, rtol=1e-5)
    assert abs(np.mean(std**2) / np.mean(noise**2) - 1) < 0.1  # 4 draws a pixel, 1900 pixels
    assert (tmp_path / "out" / "a_uncertainty.png").stat().st_size > 0


def bad_inputs(tmp_path):
    """name -> (files to pass, what the message must say)."""
    real = write_png(tmp_path / "real.png", np.full((20, 20), 100, dtype=np.uint8)).read_bytes()
    (tmp_path / "truncated.png").write_bytes(real[: len(real) // 2])
    (tmp_path / "text.png").write_text("this is not an image\n")
    (tmp_path / "garbage.npy").write_bytes(os.urandom(64))
    np.save(tmp_path / "four_bands.npy", np.zeros((4, 20, 20), dtype=np.uint8))
    write_png(tmp_path / "transparent.png", np.zeros((20, 20, 4), dtype=np.uint8))
    np.save(tmp_path / "thin.npy", np.zeros((1, 20), dtype=np.uint8))
    write_png(tmp_path / "dot.png", np.zeros((1, 1), dtype=np.uint8))
    np.save(tmp_path / "bright.npy", np.full((20, 20), 2.0, dtype=np.float32))
    good = write_png(tmp_path / "good.png", np.zeros((20, 20), dtype=np.uint8))
    return {
        "truncated": ([tmp_path / "truncated.png"], "not a readable image"),
        "text named .png": ([tmp_path / "text.png"], "not a readable image"),
        "garbage .npy": ([tmp_path / "garbage.npy"], "not a readable .npy"),
        "missing": ([tmp_path / "missing.png"], "no such file"),
        "four bands": ([tmp_path / "four_bands.npy"], "4 channels"),
        "transparent": ([tmp_path / "transparent.png"], "transparent"),
        "one pixel high": ([tmp_path / "thin.npy"], "smaller than one 2x2"),
        "one pixel": ([tmp_path / "dot.png"], "smaller than one 2x2"),
        "out of range": ([tmp_path / "bright.npy"], "must lie in [0, 1]"),
        "good and bad": ([good, tmp_path / "text.png"], "text.png"),
    }


def test_bad_inputs_give_one_line_and_no_output(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    for name, (paths, message) in bad_inputs(tmp_path).items():
        before = snapshot(p for p in paths if p.exists())
        code = console_main(["superresolve", "--checkpoint", str(checkpoint), "--out", str(out), *map(str, paths)])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 1, name
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, captured.err)
        assert not out.exists(), name  # not even the folder: every input is checked first
        assert snapshot(p for p in paths if p.exists()) == before, name


def test_outputs_never_overwrite_an_input(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    victim = out / "b_sr_mean.npy"
    np.save(victim, np.zeros((14, 14), dtype=np.float32))
    source = tmp_path / "b.npy"
    np.save(source, np.zeros((14, 14), dtype=np.float32))
    before = snapshot([victim, source])
    code = console_main(["superresolve", "--checkpoint", str(checkpoint), "--out", str(out), str(source), str(victim)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "would overwrite an input" in lines[0]
    assert snapshot([victim, source]) == before and files_in(out) == ["b_sr_mean.npy"]


def test_bad_checkpoints_give_one_line(checkpoint, vae_checkpoint, tmp_path, capsys):
    image = write_png(tmp_path / "a.png", np.zeros((20, 20), dtype=np.uint8))
    (tmp_path / "random.pt").write_bytes(os.urandom(256))
    raw = checkpoint.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    cases = {
        vae_checkpoint: "plain VAE",
        tmp_path / "random.pt": "not a pyro-srvae checkpoint",
        tmp_path / "cut.pt": "checkpoint",
        tmp_path / "foreign.pt": "not a pyro-srvae checkpoint",
        tmp_path / "missing.pt": "does not exist",
        image: "not a pyro-srvae checkpoint",
    }
    for path, message in cases.items():
        code = console_main(["superresolve", "--checkpoint", str(path), "--out", str(tmp_path / "out"), str(image)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and message in lines[0], (path, lines)
        assert not (tmp_path / "out").exists()


def test_console_bad_input_and_checkpoint_without_traceback(checkpoint, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    for args in (["--checkpoint", checkpoint, text], ["--checkpoint", tmp_path / "junk.pt", text]):
        result = run_console("superresolve", "--out", tmp_path / "out", *args)
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "out").exists() and text.read_text() == "not an image\n"


# --------------------------------------------------------------------------- #
# train and evaluate
# --------------------------------------------------------------------------- #
def test_evaluate_reproduces_the_runs_test_metrics(run_dir, checkpoint, tmp_path, capsys):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # what the coverage is read against: 2 draws' range holds an exchangeable truth (j - i)/(S + 1) = 1/3 of the time
    assert metrics["test"]["sr_coverage90_expected"] == pytest.approx(1 / 3)
    assert console_main(["evaluate", "--checkpoint", str(checkpoint), "--out", str(tmp_path), "--quiet"]) == 0
    assert "SR coverage (detail pixels)" in capsys.readouterr().out
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["evaluation"]["num_images"] == 8 and report["step"] == 2

    def same(got, expected, key):
        if isinstance(expected, dict):  # sr_coverage: {"all": {...}, "detail": {...}, ...}
            assert isinstance(got, dict) and set(got) == set(expected), key
            for name in expected:
                same(got[name], expected[name], f"{key}.{name}")
        elif isinstance(expected, str) or expected is None:  # x_density
            assert got == expected, key
        else:
            assert got == pytest.approx(expected, rel=1e-6), key

    for key, value in metrics["test"].items():
        same(report["test"][key], value, key)


def test_evaluate_refuses_a_bad_checkpoint(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert console_main(["evaluate", "--checkpoint", str(tmp_path / "junk.pt")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "evaluation.json").exists()


def test_console_usage():
    with pytest.raises(SystemExit) as exit_info:
        console_main(["frobnicate"])
    assert exit_info.value.code == 2
    assert console_main([]) == 2
    with pytest.raises(SystemExit) as exit_info:
        console_main(["superresolve", "--checkpoint", "x.pt", "--samples", "0", "a.png"])
    assert exit_info.value.code == 2


# --------------------------------------------------------------------------- #
# Views: the self-ensemble over flips and quarter turns
# --------------------------------------------------------------------------- #
def test_views_mix_the_predictives_of_the_flipped_and_turned_copies(checkpoint):
    model = load_model(checkpoint)
    y = torch.rand(1, 11, 17, generator=torch.Generator().manual_seed(8))
    mixed = superresolve_image(model, y, 16, seed=4, views=8)
    # Draw s of the mixture comes from view s mod 8: two draws a view, each view seeded on its own.
    per_view = []
    for k in range(8):
        seed = 4 if k == 0 else derive_seed(4, "view", k)
        sr = superresolve_image(model, dihedral_view(y, k), 2, seed=seed, views=1)
        per_view.append(SuperResolution(*(undo_dihedral_view(t, k) for t in sr)))
    torch.testing.assert_close(mixed.samples, torch.cat([sr.samples for sr in per_view]))
    torch.testing.assert_close(mixed.mean, torch.stack([sr.mean for sr in per_view]).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        mixed.std_noise, torch.stack([sr.std_noise.square() for sr in per_view]).mean(0).sqrt(), rtol=1e-5, atol=1e-7
    )
    assert not torch.allclose(per_view[0].mean, per_view[5].mean)  # the model is not equivariant: the views differ
    for field in (mixed.samples, mixed.means):  # every view keeps the block means of y
        assert (F.avg_pool2d(field, 2) - y).abs().max().item() < 1e-5
    torch.testing.assert_close(superresolve_image(model, y, 4, seed=4, views=1).samples,
                               superresolve_image(model, y, 4, seed=4).samples)  # fmt: skip


def test_views_default_to_eight_for_a_model_trained_on_flips_and_turns(checkpoint, tmp_path):
    assert load_model(checkpoint).default_views == 1
    payload = load_checkpoint(checkpoint)
    payload["config"]["augment"] = True
    path = tmp_path / "augmented.pt"
    save_checkpoint(path, {k: v for k, v in payload.items() if k not in ("format", "version")})
    model = load_model(path)
    assert model.default_views == 8
    y = torch.rand(1, 14, 14, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(superresolve_image(model, y, 8, seed=1).samples,
                               superresolve_image(model, y, 8, seed=1, views=8).samples)  # fmt: skip
    assert superresolve_image(model, y, 3, seed=1).samples.shape[0] == 3  # 3 draws: 3 views


@pytest.mark.parametrize("views", [0, 9, 2.5, True])
def test_bad_views_are_refused(checkpoint, views):
    with pytest.raises(ValueError, match="views must be an integer from 1 to 8"):
        superresolve_image(load_model(checkpoint), torch.rand(1, 8, 8), 4, views=views)


def test_console_views_out_of_range_is_a_flag_error(checkpoint, tmp_path):
    image = write_png(tmp_path / "a.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(SystemExit) as exit_info:
        console_main(["superresolve", "--checkpoint", str(checkpoint), "--views", "9", "--out", str(tmp_path / "o"), str(image)])
    assert exit_info.value.code == 2
    assert not (tmp_path / "o").exists()


def test_the_eight_views_are_the_dihedral_group_and_turn_back_exactly():
    image = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    views = [dihedral_view(image, k) for k in range(8)]
    assert len({tuple(v.flatten().tolist()) + tuple(v.shape) for v in views}) == 8  # all distinct
    for k, view in enumerate(views):
        assert torch.equal(undo_dihedral_view(view, k), image)
    assert torch.equal(views[4], torch.flip(image, dims=(-1,)))
    assert torch.equal(views[1], torch.rot90(image, 1, dims=(-2, -1)))

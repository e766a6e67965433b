"""The SR spread calibrated on calibration images (pyro_srvae.sr.calibration, pyro-srvae calibrate)."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pyro_srvae.sr.calibrate import fit_spread_scale
from pyro_srvae.sr.calibration import CalibrationError, model_spread
from pyro_srvae.training.checkpoint import load_checkpoint, save_checkpoint
from pyro_srvae.cli import console_main
from pyro_srvae.data.datasets import load_dataset
from pyro_srvae.metrics.sr_scores import expected_interval_coverage, interval_coverages
from pyro_srvae.model.distributions import block_mean
from pyro_srvae.sr.loading import load_model
from pyro_srvae.sr.tiling import superresolve_image
from pyro_srvae.training.config import TrainConfig
from pyro_srvae.training.factory import build_model
from conftest import hold_latents_fixed

# The calibration scales the likelihood's noise. The vector z of a 2-step model leaves the spread to the
# noise, so these checks are about the calibration. An untrained z map's latents would carry most of it,
# and writing truths as 8-bit PNGs clips that part on the black background.
TRAIN_FLAGS = [
    "--max-steps", "2", "--train-limit", "64", "--eval-limit", "8", "--batch-size", "32", "--hidden", "4",
    "--eval-samples", "2", "--sr-samples", "2", "--no-figures", "--quiet", "--z-channels", "0", "--z-injection", "input",
]  # fmt: skip
SCALE = 1.7  # the spread the truths are drawn with, in units of the model's own
DRAWS = 16  # the fit's draws per image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert console_main(["train", *TRAIN_FLAGS, "--out", str(out)]) == 0
    return out / "checkpoint.pt"


def truths_drawn_wider(model, count, scale=SCALE, seed=100, with_y=False):
    """High-resolution images drawn from the model's own predictive with its noise times ``scale``.

    Under the consistent p(x|y,.) each has block means y, so ``model.downscale`` gives back the
    y it was drawn for: a calibration on them should find ``scale`` itself. Each truth is the first
    of as many draws as the fit takes, so that the tiles' blend treats it as it treats the fit's
    draws: a lone draw's latent deviations are its tile's mean, blended with the convex window,
    which narrows them where tiles overlap (with z a map, the latents carry most of the spread,
    and truths drawn alone gave a factor 6% low).
    """
    images = (load_dataset("fashion-mnist-mini", "test").images[:count].float() + 0.5) / 256
    truths, ys = [], []
    model.spread_scale = [scale]
    try:
        for i, x in enumerate(images):
            ys.append(model.downscale(x[None])[0])
            truths.append(superresolve_image(model, ys[-1], DRAWS, seed=seed + i).samples[0])
    finally:
        model.spread_scale = None
    return (truths, ys) if with_y else truths


def test_the_fit_finds_the_spread_under_a_z_map_whose_latents_carry_most_of_it(tmp_path):
    flags = TRAIN_FLAGS[: TRAIN_FLAGS.index("--z-channels")]  # the srVAE's default: z a map read by every layer
    assert console_main(["train", *flags, "--out", str(tmp_path)]) == 0
    model = load_model(tmp_path / "checkpoint.pt", device="cpu")
    assert model.z_channels == 1
    calibration = fit_spread_scale(model, truths_drawn_wider(model, 48), pixels="all", num_samples=DRAWS, seed=1)
    assert calibration.scale[0] == pytest.approx(SCALE, rel=0.05)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_png(path, array):
    Image.fromarray(array).save(path)
    return path


def test_the_fit_finds_the_spread_the_truths_were_drawn_with(checkpoint):
    model = load_model(checkpoint, device="cpu")
    truths, ys = truths_drawn_wider(model, 48, with_y=True)
    for x, y in zip(truths, ys):  # drawn on the consistent subspace: their y is the one they were drawn for
        torch.testing.assert_close(model.downscale(x[None])[0], y, rtol=0, atol=2e-6)
    calibration = fit_spread_scale(model, truths, pixels="all", num_samples=16, seed=1)
    assert calibration.scale[0] == pytest.approx(SCALE, rel=0.05)
    assert calibration.target_coverage == pytest.approx(expected_interval_coverage(16, 0.9))
    assert calibration.coverage_before[0] < calibration.target_coverage - 0.05  # too narrow before
    # New draws of the calibrated predictive on the same images: not the draws t was fitted to (whose
    # coverage is the target by construction), yet they cover about the target too.
    assert calibration.fresh_seed != 1 and calibration.coverage_fresh[0] != calibration.coverage_after[0]
    assert calibration.coverage_fresh[0] == pytest.approx(calibration.target_coverage, abs=0.01)
    assert calibration.num_pixels == 48 * 28 * 28
    # Truths drawn from the model itself need no widening.
    own = fit_spread_scale(model, truths_drawn_wider(model, 48, scale=1.0), pixels="all", seed=1)
    assert own.scale[0] == pytest.approx(1.0, rel=0.05)


def test_fresh_draws_of_the_calibrated_model_cover_at_the_level(checkpoint):
    model = load_model(checkpoint, device="cpu")
    truths = truths_drawn_wider(model, 48, seed=300)
    model.spread_scale = fit_spread_scale(model, truths[:24], pixels="all", seed=2).scale
    covered = []
    for i, x in enumerate(truths[24:]):
        sr = superresolve_image(model, model.downscale(x[None])[0], 16, seed=500 + i)
        covered.append(interval_coverages(sr.samples[:, None], x[None], levels=(0.9,))["0.9"])
    assert np.mean(covered) == pytest.approx(expected_interval_coverage(16, 0.9), abs=0.02)
    with model_spread(model):  # the model's own draws cover less
        sr = superresolve_image(model, model.downscale(truths[30][None])[0], 16, seed=7)
    assert interval_coverages(sr.samples[:, None], truths[30][None], levels=(0.9,))["0.9"] < 0.85


def test_the_calibrated_noise_is_the_models_times_t_and_keeps_the_block_means(checkpoint):
    model = load_model(checkpoint, device="cpu")
    y = model.downscale((load_dataset("fashion-mnist-mini", "test").images[:1].float() + 0.5) / 256)[0]
    own = superresolve_image(model, y, 6, seed=3)
    model.spread_scale = [2.5]
    wide = superresolve_image(model, y, 6, seed=3)
    torch.testing.assert_close(wide.means, own.means)
    torch.testing.assert_close(wide.samples - wide.means, 2.5 * (own.samples - own.means), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(wide.std_noise, 2.5 * own.std_noise, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(block_mean(wide.samples, 2), y.expand(6, *y.shape), rtol=0, atol=2e-6)


def test_the_detail_pixels_ask_for_a_wider_spread_than_all_pixels(checkpoint):
    # The detail pixels are chosen by the truth as those far from their block mean, so they fall
    # outside a given interval more often than pixels at large: a wider spread covers them.
    model = load_model(checkpoint, device="cpu")
    truths = truths_drawn_wider(model, 24, seed=900)
    detail = fit_spread_scale(model, truths, pixels="detail", seed=4)
    every = fit_spread_scale(model, truths, pixels="all", seed=4)
    assert detail.pixels == "detail" and every.pixels == "all"
    assert detail.num_pixels < every.num_pixels
    assert detail.scale[0] > every.scale[0]


def test_a_discrete_likelihood_and_empty_inputs_are_refused():
    model = build_model(TrainConfig(likelihood="dlogistic-mix", hidden=4), (1, 8, 8))
    with pytest.raises(CalibrationError, match="8-bit grid"):
        fit_spread_scale(model, [torch.rand(1, 8, 8)])
    model = build_model(TrainConfig(hidden=4), (1, 8, 8))
    with pytest.raises(CalibrationError, match="no calibration images"):
        fit_spread_scale(model, [])
    with pytest.raises(CalibrationError, match="multiples of 2"):
        fit_spread_scale(model, [torch.rand(1, 9, 8)])
    with pytest.raises(CalibrationError, match="pixels must be one of"):
        fit_spread_scale(model, [torch.rand(1, 8, 8)], pixels="flat")


# --------------------------------------------------------------------------- #
# The console commands
# --------------------------------------------------------------------------- #
@pytest.fixture()
def calibration_pngs(checkpoint, tmp_path):
    model = load_model(checkpoint, device="cpu")
    folder = tmp_path / "held-out"
    folder.mkdir()
    for i, x in enumerate(truths_drawn_wider(model, 16, seed=700)):
        write_png(folder / f"{i}.png", (x[0].clamp(0, 1) * 255).round().numpy().astype(np.uint8))
    return folder


def test_console_calibrate_writes_the_factor_and_superresolve_uses_it(checkpoint, calibration_pngs, tmp_path, capsys):
    calibrated = tmp_path / "calibrated.pt"
    before = sha(checkpoint)
    code = console_main(["calibrate", "--checkpoint", str(checkpoint), "--out", str(calibrated), "--pixels", "all",
                         str(calibration_pngs)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "calibrated: likelihood noise x" in out and "16 calibration image(s)" in out and "held-out" not in out
    record = load_checkpoint(calibrated)["spread_calibration"]
    in_sample = [line for line in out.splitlines() if line.startswith("in-sample coverage")]
    fresh = [line for line in out.splitlines() if line.startswith("fresh draws")]
    assert len(in_sample) == 1 and "(the draws the factor was fitted to; the target by construction)" in in_sample[0]
    assert f"{record['coverage_after'][0]:.3f} of {record['num_pixels']} pixels" in in_sample[0]
    assert len(fresh) == 1 and f"(seed {record['fresh_seed']}) on the same calibration images, not a test set" in fresh[0]
    assert fresh[0].endswith(f"coverage {record['coverage_fresh'][0]:.3f}")
    assert sha(checkpoint) == before  # --out: the original is left as it was
    payload, original = load_checkpoint(calibrated), load_checkpoint(checkpoint)
    assert payload["spread_calibration"]["pixels"] == "all"
    assert payload["model_state"].keys() == original["model_state"].keys()
    assert all(torch.equal(payload["model_state"][k], original["model_state"][k]) for k in original["model_state"])
    # Written as 8-bit PNGs the truths are clipped to [0, 1], which narrows them on the black
    # background: the factor lies between the model's own spread and the 1.7 they were drawn with.
    scale = payload["spread_calibration"]["scale"][0]
    assert 1.1 < scale < SCALE
    model = load_model(calibrated, device="cpu")
    assert model.spread_scale == [scale]

    image = write_png(tmp_path / "in.png", np.random.default_rng(0).integers(0, 256, (14, 14), dtype=np.uint8))
    stds = {}
    for spread in ("calibrated", "model"):
        code = console_main(["superresolve", "--checkpoint", str(calibrated), "--samples", "4", "--spread", spread,
                             "--out", str(tmp_path / spread), str(image)])  # fmt: skip
        printed = capsys.readouterr().out
        assert code == 0
        assert ("spread: calibrated" in printed) == (spread == "calibrated")
        stds[spread] = np.load(tmp_path / spread / "in_sr_std_noise.npy")
    np.testing.assert_allclose(stds["calibrated"], scale * stds["model"], rtol=1e-5)

    # evaluate draws from the calibrated spread and says so.
    for path, expected in ((calibrated, "calibrated: likelihood noise x"), (checkpoint, "the model's own")):
        assert console_main(["evaluate", "--checkpoint", str(path), "--out", str(tmp_path / path.stem), "--quiet"]) == 0
        summary = [line for line in capsys.readouterr().out.splitlines() if "SR spread" in line]
        assert len(summary) == 1 and expected in summary[0]
    reports = {name: json.loads((tmp_path / name / "evaluation.json").read_text()) for name in ("calibrated", "checkpoint")}
    assert reports["calibrated"]["spread_calibration"]["scale"] == [scale]
    assert reports["checkpoint"]["spread_calibration"] is None
    assert reports["calibrated"]["test"]["sr_coverage90"] > reports["checkpoint"]["test"]["sr_coverage90"]


def test_console_calibrate_bad_input_is_one_line_and_leaves_the_checkpoint(checkpoint, tmp_path, capsys):
    copy = tmp_path / "checkpoint.pt"
    copy.write_bytes(checkpoint.read_bytes())
    before = sha(copy)
    empty = tmp_path / "empty"
    empty.mkdir()
    truncated = tmp_path / "truncated.png"
    write_png(tmp_path / "whole.png", np.zeros((8, 8), dtype=np.uint8))
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:30])
    rgba16 = tmp_path / "deep.npy"
    np.save(rgba16, np.zeros((8, 8), dtype=np.uint16))
    for inputs, message in (
        ([empty], "no images found"),
        ([tmp_path / "missing.png"], "no such file or folder"),
        ([truncated], "truncated.png"),
        ([rgba16], "16-bit"),
    ):
        code = console_main(["calibrate", "--checkpoint", str(copy), *map(str, inputs)])
        err = capsys.readouterr().err
        assert code == 1
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert sha(copy) == before
    assert console_main(["calibrate", "--checkpoint", str(tmp_path / "none.pt"), str(tmp_path / "whole.png")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        console_main(["calibrate", "--checkpoint", str(copy), "--level", "1.5", str(tmp_path / "whole.png")])
    assert exit_info.value.code == 2
    assert sha(copy) == before


def test_a_broken_calibration_record_is_a_checkpoint_error(checkpoint, tmp_path):
    payload = load_checkpoint(checkpoint)
    payload["spread_calibration"] = {"scale": [-1.0]}
    path = tmp_path / "broken.pt"
    save_checkpoint(path, {k: v for k, v in payload.items() if k not in ("format", "version")})
    assert console_main(["superresolve", "--checkpoint", str(path), "--out", str(tmp_path / "o"),
                         str(write_png(tmp_path / "a.png", np.zeros((8, 8), dtype=np.uint8)))]) == 1  # fmt: skip
    assert not (tmp_path / "o").exists()




def test_a_factor_fitted_on_some_truths_covers_fresh_truths_at_the_target_out_of_sample():
    """Out of sample: truths drawn from the predictive with the noise times SCALE, a factor fitted on 48
    of them, and fresh draws of the calibrated predictive for 48 other truths: these are covered at the
    target (j - i)/(S + 1) = 15/17 within four standard errors. The error counts both sets' pixels
    (binomial) and, since the fit draws every image with the same seed, the spread of the coverage of
    one image's 784 fitted intervals (the Beta((j - i), S + 1 - (j - i)) variance of each)."""
    model = hold_latents_fixed(build_model(TrainConfig(hidden=4), (1, 28, 28)))
    images = (load_dataset("fashion-mnist-mini", "test").images[:96].float() + 0.5) / 256
    ys = [model.downscale(x[None])[0] for x in images]
    model.spread_scale = [SCALE]
    truths = [superresolve_image(model, y, DRAWS, seed=100 + i).samples[0] for i, y in enumerate(ys)]
    model.spread_scale = fit_spread_scale(model, truths[:48], pixels="all", num_samples=DRAWS, seed=1).scale
    covered = []
    for i, (x, y) in enumerate(zip(truths[48:], ys[48:])):  # fresh truths, fresh draws (other seeds)
        draws = superresolve_image(model, y, DRAWS, seed=500 + i).samples
        covered.append(interval_coverages(draws[:, None], x[None], levels=(0.9,))["0.9"])
    target, pixels = 15 / 17, 48 * 28 * 28
    assert expected_interval_coverage(DRAWS, 0.9) == pytest.approx(target)
    variance = 2 * target * (1 - target) / pixels + (15 * 2 / (17**2 * 18)) / (28 * 28)
    assert np.mean(covered) == pytest.approx(target, abs=4 * np.sqrt(variance)), (np.mean(covered), model.spread_scale)

"""Risk-controlling intervals (pyro_srvae.sr.calibration's RCPS, pyro-srvae calibrate --method rcps)."""

import hashlib
import importlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pyro_srvae.sr.calibrate import fit_interval_scale, fit_spread_scale, read_calibration_images
from pyro_srvae.sr.calibration import (
    LAMBDA_GRID,
    CalibrationError,
    batch_interval_losses,
    choose_lambda,
    hoeffding_bentkus_p_value,
    hoeffding_bentkus_upper_bound,
    interval_losses,
    minimum_images,
)
from pyro_srvae.training.checkpoint import load_checkpoint, save_checkpoint
from pyro_srvae.cli import console_main
from pyro_srvae.data.datasets import load_dataset
from pyro_srvae.sr.loading import load_model
from pyro_srvae.sr.tiling import superresolve_image

ALPHA, DELTA = 0.1, 0.1


# --------------------------------------------------------------------------- #
# The Hoeffding-Bentkus test
# --------------------------------------------------------------------------- #
def binomial_cdf(k, n, p):
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k + 1))


def test_the_hoeffding_bentkus_p_value_matches_hand_computed_values():
    # n = 10, R = 0.1, alpha = 0.3: exp(-n h1(R, alpha)) = (alpha/R)^(nR) ((1-alpha)/(1-R))^(n(1-R)) = 3 (7/9)^9,
    # below Bentkus's e P(Bin(10, 0.3) <= 1) = e 0.7^9 (0.7 + 3): Hoeffding's term decides.
    assert 3 * (7 / 9) ** 9 < math.e * 0.7**9 * 3.7
    assert hoeffding_bentkus_p_value(0.1, 10, 0.3).item() == pytest.approx(3 * (7 / 9) ** 9, rel=1e-12)
    # n = 100, R = 0.05, alpha = 0.1: Bentkus's term e P(Bin(100, 0.1) <= 5) = 0.15651 is below 2^5 (18/19)^95 = 0.18812.
    bentkus, hoeffding = math.e * binomial_cdf(5, 100, 0.1), 2**5 * (18 / 19) ** 95
    assert bentkus == pytest.approx(0.1565102, abs=1e-7) and hoeffding == pytest.approx(0.1881247, abs=1e-7)
    assert hoeffding_bentkus_p_value(0.05, 100, 0.1).item() == pytest.approx(bentkus, rel=1e-10)
    # No pixel missed: (1 - alpha)^n; a risk at or above alpha: Hoeffding's term is 1 and nothing is rejected.
    assert hoeffding_bentkus_p_value(0.0, 30, 0.1).item() == pytest.approx(0.9**30, rel=1e-12)
    assert hoeffding_bentkus_p_value(0.25, 20, 0.2).item() == 1.0
    # ceil(n R): 0.0501 counts 6 misses of 100 (Hoeffding's term then decides), and a mean of 5/100 read
    # back from floats stays 5.
    hoeffding = (0.1 / 0.0501) ** 5.01 * (0.9 / 0.9499) ** 94.99  # (alpha/R)^(nR) ((1-alpha)/(1-R))^(n(1-R))
    assert math.e * binomial_cdf(6, 100, 0.1) > hoeffding > math.e * binomial_cdf(5, 100, 0.1)
    assert hoeffding_bentkus_p_value(0.0501, 100, 0.1).item() == pytest.approx(hoeffding, rel=1e-10)
    five_of_a_hundred = torch.cat([torch.ones(5), torch.zeros(95)]).double().mean()
    assert hoeffding_bentkus_p_value(five_of_a_hundred, 100, 0.1).item() == pytest.approx(bentkus, rel=1e-10)
    # Vectorised over risks as one at a time.
    risks = torch.tensor([0.0, 0.05, 0.08, 0.2], dtype=torch.float64)
    expected = [hoeffding_bentkus_p_value(r.item(), 100, 0.1).item() for r in risks]
    assert hoeffding_bentkus_p_value(risks, 100, 0.1).tolist() == pytest.approx(expected, rel=1e-12)


def test_the_upper_confidence_bound_is_where_the_p_value_crosses_delta():
    bound = hoeffding_bentkus_upper_bound(0.05, 100, DELTA)
    assert 0.05 < bound < 1
    assert hoeffding_bentkus_p_value(0.05, 100, bound).item() == pytest.approx(DELTA, abs=1e-6)
    for alpha in (0.08, 0.1, 0.12, 0.2):  # below alpha exactly when the test at alpha rejects
        assert (bound < alpha) == (hoeffding_bentkus_p_value(0.05, 100, alpha).item() < DELTA)
    # More images, the same empirical risk: a tighter bound.
    assert hoeffding_bentkus_upper_bound(0.05, 1000, DELTA) < bound
    assert hoeffding_bentkus_upper_bound(1.0, 3, DELTA) == 1.0  # every image missed entirely: nothing to bound


def test_the_fewest_images_that_can_certify():
    assert minimum_images(0.1, 0.1) == 22  # 0.9^22 = 0.098 < 0.1 <= 0.9^21 = 0.109
    for alpha, delta in ((0.1, 0.1), (0.3, 0.3), (0.05, 0.01), (0.5, 0.25)):
        n = minimum_images(alpha, delta)
        assert (1 - alpha) ** n < delta <= (1 - alpha) ** (n - 1)


# --------------------------------------------------------------------------- #
# The losses and the lambda scan
# --------------------------------------------------------------------------- #
def at(losses, value):
    return losses[int((LAMBDA_GRID - value).abs().argmin())].item()


def test_the_loss_is_the_fraction_of_chosen_pixels_outside_the_interval():
    mean = torch.zeros(5)
    std = torch.tensor([1.0, 2.0, 0.0, 0.0, 1.0])
    target = torch.tensor([1.5, -1.0, 0.0, 0.3, -0.2])  # |x - m| / std: 1.5, 0.5, 0 (exact), inf (missed), 0.2
    losses = interval_losses(mean, std, target)
    assert losses[0].item() == pytest.approx(4 / 5)  # lambda 0: only the exact pixel is inside
    assert [at(losses, v) for v in (0.3, 1.0, 2.0, 100.0)] == pytest.approx([3 / 5, 2 / 5, 1 / 5, 1 / 5])
    assert bool((losses[1:] <= losses[:-1]).all())  # nested intervals: non-increasing in lambda
    mask = torch.tensor([True, True, False, False, False])
    assert at(interval_losses(mean, std, target, mask), 1.0) == pytest.approx(1 / 2)
    assert interval_losses(mean, std, target, torch.zeros(5, dtype=torch.bool)).abs().max().item() == 0.0
    batch = batch_interval_losses(torch.stack([mean, mean]), torch.stack([std, std]), torch.stack([target, -target]))
    torch.testing.assert_close(batch[0], losses)
    torch.testing.assert_close(batch[1], losses)


def gaussian_images(count, generator, pixels=32, draws=16, misfit=1.7):
    """``(mean, std, truth)`` of ``count`` images from a Gaussian predictive whose spread is too narrow.

    Each image's truth is drawn with the predictive's std times ``misfit * exp(0.3 N(0, 1))``, a factor
    that varies from image to image (the images' losses differ, as photographs' do), and ``mean`` and
    ``std`` are those of ``draws`` draws of the predictive, as superresolve computes them.
    """
    scale = 0.5 + torch.rand(count, pixels, generator=generator, dtype=torch.float64)
    centre = torch.rand(count, pixels, generator=generator, dtype=torch.float64)
    samples = centre + scale * torch.randn(draws, count, pixels, generator=generator, dtype=torch.float64)
    misfit = misfit * torch.exp(0.3 * torch.randn(count, 1, generator=generator, dtype=torch.float64))
    truth = centre + misfit * scale * torch.randn(count, pixels, generator=generator, dtype=torch.float64)
    return samples.mean(0), samples.std(0), truth


def test_the_guarantee_holds_in_repeated_trials_and_fails_without_the_bound():
    generator = torch.Generator().manual_seed(0)
    # The risk of a lambda: the mean fraction missed over 5,000 fresh test images of the same law.
    fresh = gaussian_images(5000, generator)
    ratio = ((fresh[2] - fresh[0]).abs() / fresh[1])

    def test_risk(index):
        return (ratio > LAMBDA_GRID[index].item()).double().mean().item()

    trials, violations, naive_violations, risks = 100, 0, 0, []
    for _ in range(trials):
        losses = batch_interval_losses(*gaussian_images(100, generator))
        risk = test_risk(choose_lambda(losses, ALPHA, DELTA))
        violations += risk > ALPHA
        risks.append(risk)
        # Without the bound: the smallest lambda whose empirical risk is below alpha.
        naive = int((losses.mean(0) >= ALPHA).nonzero().max()) + 1
        naive_violations += test_risk(naive) > ALPHA
    # Violations ~ Binomial(trials, <= delta): at most delta of the trials, with three standard deviations' margin.
    assert violations <= DELTA * trials + 3 * math.sqrt(trials * DELTA * (1 - DELTA))
    # The test can fail: the empirical choice overshoots alpha about half the time, and the too-narrow
    # predictive's own 90% interval (1.645 std) misses far more than alpha.
    assert naive_violations > 0.3 * trials
    assert (ratio > 1.645).double().mean().item() > 3 * ALPHA
    # Valid without being vacuous: the chosen intervals miss a fair share of alpha.
    assert 0.25 * ALPHA < float(np.median(risks)) <= ALPHA


def test_lambda_hat_grows_as_the_images_get_fewer():
    generator = torch.Generator().manual_seed(1)
    losses = batch_interval_losses(*gaussian_images(50, generator))
    # The same 50 images repeated 8 times: the same empirical risk at every lambda, n 400 instead of 50.
    few, many = choose_lambda(losses, ALPHA, DELTA), choose_lambda(losses.repeat(8, 1), ALPHA, DELTA)
    assert LAMBDA_GRID[few] > LAMBDA_GRID[many]
    assert losses[:, few].mean() < losses[:, many].mean() < ALPHA  # wider: a lower empirical risk
    # lambda_hat is the smallest lambda certified with all larger ones.
    p_values = hoeffding_bentkus_p_value(losses.mean(0), 50, ALPHA)
    assert bool((p_values[few:] < DELTA).all()) and p_values[few - 1].item() >= DELTA


def test_lambda_hat_lies_above_every_uncertified_lambda():
    # A risk curve with a bump (not one the nested intervals give, but the rule is the scan's): the
    # small lambdas below the bump are certified, yet lambda_hat stays above it.
    losses = torch.zeros(100, LAMBDA_GRID.numel(), dtype=torch.float64)
    losses[:50, 600] = 1.0  # risk 0.5 at one lambda
    assert choose_lambda(losses, ALPHA, DELTA) == 601


def test_too_few_images_or_an_uncertifiable_risk_is_a_one_line_error():
    with pytest.raises(CalibrationError, match=r"alpha=0.1 at delta=0.1 with 21 calibration image\(s\): it needs at least 22"):
        choose_lambda(torch.zeros(21, LAMBDA_GRID.numel()), ALPHA, DELTA)
    assert choose_lambda(torch.zeros(22, LAMBDA_GRID.numel()), ALPHA, DELTA) == 0  # nothing missed: lambda 0
    with pytest.raises(CalibrationError, match="even the widest interval"):
        choose_lambda(torch.full((400, LAMBDA_GRID.numel()), 0.2, dtype=torch.float64), ALPHA, DELTA)
    # Said before anything is drawn: this "model" would fail at its first use.
    with pytest.raises(CalibrationError, match="with 1 calibration image"):
        fit_interval_scale(object(), [torch.rand(1, 8, 8)])
    for name in ("alpha", "delta"):
        for value in (0.0, 1.0, 1.5, -0.1):
            with pytest.raises(CalibrationError, match=f"{name} must lie strictly between 0 and 1"):
                fit_interval_scale(object(), [torch.rand(1, 8, 8)], **{name: value})


# --------------------------------------------------------------------------- #
# The console commands: calibrate stores it, superresolve writes it
# --------------------------------------------------------------------------- #
TRAIN_FLAGS = [
    "--max-steps", "2", "--train-limit", "64", "--eval-limit", "8", "--batch-size", "32", "--hidden", "4",
    "--eval-samples", "2", "--sr-samples", "2", "--no-figures", "--quiet", "--z-channels", "0", "--z-injection", "input",
]  # fmt: skip
RCPS_FLAGS = ["--method", "rcps", "--alpha", "0.3", "--delta", "0.3", "--pixels", "all", "--samples", "4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert console_main(["train", *TRAIN_FLAGS, "--out", str(out)]) == 0
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def calibration_pngs(checkpoint, tmp_path_factory):
    """12 high-resolution PNGs drawn from the model's predictive with its noise widened 1.7 times."""
    model = load_model(checkpoint, device="cpu")
    folder = tmp_path_factory.mktemp("calibration")
    images = (load_dataset("fashion-mnist-mini", "test").images[:12].float() + 0.5) / 256
    model.spread_scale = [1.7]
    for i, x in enumerate(images):
        truth = superresolve_image(model, model.downscale(x[None])[0], 4, seed=100 + i).samples[0]
        Image.fromarray((truth[0].clamp(0, 1) * 255).round().numpy().astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def test_each_calibration_image_is_drawn_with_its_own_seed(checkpoint, calibration_pngs, monkeypatch):
    # The guarantee treats the calibration images' draws as independent, as a new image's are of theirs.
    superresolve_module = importlib.import_module("pyro_srvae.sr.calibrate")  # where calibration draws
    model = load_model(checkpoint, device="cpu")
    images, names = read_calibration_images(model, [calibration_pngs])
    seeds, draw = [], superresolve_module.superresolve_image
    monkeypatch.setattr(superresolve_module, "superresolve_image",
                        lambda *args, seed, **kwargs: seeds.append(seed) or draw(*args, seed=seed, **kwargs))  # fmt: skip
    fit_interval_scale(model, images, names=names, alpha=0.3, delta=0.3, pixels="all", num_samples=2, seed=5)
    assert len(seeds) == len(images) == 12 and len(set(seeds)) == 12


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lines_of(text):
    return [line for line in text.splitlines() if line.strip()]


def test_calibrate_stores_the_interval_and_superresolve_writes_it(checkpoint, calibration_pngs, tmp_path, capsys):
    calibrated, before = tmp_path / "rcps.pt", sha(checkpoint)
    code = console_main(["calibrate", "--checkpoint", str(checkpoint), "--out", str(calibrated), *RCPS_FLAGS,
                         str(calibration_pngs)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert sha(checkpoint) == before
    record = load_checkpoint(calibrated)["interval_calibration"]
    assert (record["alpha"], record["delta"], record["num_images"], record["pixels"]) == (0.3, 0.3, 12, "all")
    assert (record["num_samples"], record["views"], record["spread_scale"]) == (4, 1, None)
    assert record["lambda_hat"] in LAMBDA_GRID.tolist() and record["lambda_hat"] > 0
    assert record["risk"] < record["risk_bound"] < 0.3
    assert "with probability at least 0.7 over the 12 calibration images" in record["guarantee"]
    assert "alpha 0.3" in out and "delta 0.3" in out and "n = 12 calibration images" in out
    assert f"guarantee: {record['guarantee']}" in out
    assert "spread_calibration" not in load_checkpoint(calibrated)

    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (14, 14), dtype=np.uint8)).save(image)
    assert console_main(["superresolve", "--checkpoint", str(calibrated), "--samples", "4", "--out",
                         str(tmp_path / "sr"), str(image)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"mean -+ {record['lambda_hat']:.4g} x NAME_sr_std.npy (RCPS, alpha 0.3, delta 0.3, n = 12;" in printed
    mean, std = (np.load(tmp_path / "sr" / f"in_sr_{name}.npy") for name in ("mean", "std"))
    lower, upper = (np.load(tmp_path / "sr" / f"in_sr_{name}.npy") for name in ("lower", "upper"))
    np.testing.assert_allclose(lower, mean - record["lambda_hat"] * std, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(upper, mean + record["lambda_hat"] * std, rtol=1e-6, atol=1e-7)
    assert (upper > lower).mean() > 0.99
    assert json.loads((tmp_path / "sr" / "in_sr_interval.json").read_text()) == record

    # Draws it was not certified for: no interval files, and a line that says why.
    assert console_main(["superresolve", "--checkpoint", str(calibrated), "--samples", "6", "--out",
                         str(tmp_path / "six"), str(image)]) == 0  # fmt: skip
    assert "RCPS interval is not written: it is certified for 4 draws, these are 6" in capsys.readouterr().out
    assert (tmp_path / "six" / "in_sr_mean.npy").exists()
    assert not any((tmp_path / "six" / f"in_sr_{name}").exists() for name in ("lower.npy", "upper.npy", "interval.json"))
    # No calibration: no interval, no line about one.
    assert console_main(["superresolve", "--checkpoint", str(checkpoint), "--samples", "4", "--out",
                         str(tmp_path / "plain"), str(image)]) == 0  # fmt: skip
    assert "RCPS" not in capsys.readouterr().out and not (tmp_path / "plain" / "in_sr_lower.npy").exists()


def test_a_later_spread_calibration_retires_the_interval_for_its_draws(checkpoint, calibration_pngs, tmp_path, capsys):
    path = tmp_path / "both.pt"
    assert console_main(["calibrate", "--checkpoint", str(checkpoint), "--out", str(path), *RCPS_FLAGS,
                         str(calibration_pngs)]) == 0  # fmt: skip
    capsys.readouterr()
    assert console_main(["calibrate", "--checkpoint", str(path), "--pixels", "all", "--samples", "4",
                         str(calibration_pngs)]) == 0  # fmt: skip
    assert "the checkpoint's RCPS interval was fitted on draws of the previous spread" in capsys.readouterr().out
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((14, 14), dtype=np.uint8)).save(image)
    for spread, written in (("calibrated", False), ("model", True)):  # the interval was fitted on the model's own
        out = tmp_path / spread
        assert console_main(["superresolve", "--checkpoint", str(path), "--samples", "4", "--spread", spread,
                             "--out", str(out), str(image)]) == 0  # fmt: skip
        printed = capsys.readouterr().out
        assert (out / "in_sr_lower.npy").exists() == written
        assert ("it was fitted on draws with the model's own spread, these use likelihood noise x" in printed) == (not written)


def test_calibrate_rcps_bad_input_is_one_line_and_writes_nothing(checkpoint, calibration_pngs, tmp_path, capsys):
    copy = tmp_path / "checkpoint.pt"
    copy.write_bytes(checkpoint.read_bytes())
    before = sha(copy)
    one = str(calibration_pngs / "0.png")
    code = console_main(["calibrate", "--checkpoint", str(copy), "--method", "rcps", one])
    err = capsys.readouterr().err
    assert code == 1 and len(lines_of(err)) == 1 and "Traceback" not in err
    assert "RCPS cannot certify alpha=0.1 at delta=0.1 with 1 calibration image(s): it needs at least 22" in err
    assert sha(copy) == before
    for flags, message in (
        (["--method", "rcps", "--alpha", "1.5"], "argument --alpha: expected a number strictly between 0 and 1, got 1.5"),
        (["--method", "rcps", "--delta", "0"], "argument --delta: expected a number strictly between 0 and 1, got 0"),
        (["--method", "rcps", "--delta", "x"], "argument --delta: expected a number strictly between 0 and 1, got 'x'"),
        (["--alpha", "0.1"], "--alpha and --delta are for --method rcps"),
        (["--method", "rcps", "--level", "0.8"], "--level is for --method spread"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            console_main(["calibrate", "--checkpoint", str(copy), *flags, one])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert sha(copy) == before


def test_a_broken_interval_record_is_a_checkpoint_error(checkpoint, tmp_path, capsys):
    payload = load_checkpoint(checkpoint)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(image)
    for record, message in (({"alpha": 0.1}, "unusable interval_calibration record"),
                            ({**valid_record(), "delta": 1.5}, "alpha and delta in (0, 1)"),
                            ({**valid_record(), "lambda_hat": float("nan")}, "non-finite lambda_hat")):  # fmt: skip
        payload["interval_calibration"] = record
        path = tmp_path / "broken.pt"
        save_checkpoint(path, {k: v for k, v in payload.items() if k not in ("format", "version")})
        assert console_main(["superresolve", "--checkpoint", str(path), "--out", str(tmp_path / "o"), str(image)]) == 1
        err = capsys.readouterr().err
        assert message in err and len(lines_of(err)) == 1
        assert not (tmp_path / "o").exists()


def valid_record():
    return dict(alpha=0.1, delta=0.1, num_images=30, pixels="all", lambda_hat=2.0, risk=0.05, risk_bound=0.09,
                num_samples=4, views=1, spread_scale=None, images=["a.png"])  # fmt: skip


def test_the_spread_fit_draws_each_calibration_image_with_its_own_seed(checkpoint, calibration_pngs, monkeypatch):
    # Images of one size drawn with one seed would share their noise: the fit would see one image's intervals.
    superresolve_module = importlib.import_module("pyro_srvae.sr.calibrate")
    model = load_model(checkpoint, device="cpu")
    images, names = read_calibration_images(model, [calibration_pngs])
    seeds, draw = [], superresolve_module.superresolve_image
    monkeypatch.setattr(superresolve_module, "superresolve_image",
                        lambda *args, seed, **kwargs: seeds.append(seed) or draw(*args, seed=seed, **kwargs))  # fmt: skip
    fit_spread_scale(model, images, names=names, pixels="all", num_samples=2, seed=5)
    fitted, fresh = seeds[: len(images)], seeds[len(images) :]
    assert len(set(fitted)) == len(images) == 12 and len(set(fresh)) == 12 and not set(fitted) & set(fresh)

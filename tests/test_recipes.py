"""What a run's unset flags become: the main job's recipe for the named datasets, the photographs'
recipe and an adaptive step budget for --dataset folder (training.config.RECIPES, issue #24 item 1)."""

import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyro_srvae.cli import build_train_parser, config_from_args
from pyro_srvae.model.networks import DenseFeatures, DenseSuperResolutionDecoder
from pyro_srvae.training.config import FOLDER_STEP_BUDGET, TrainConfig, resolve_epochs
from pyro_srvae.training.factory import build_model
from pyro_srvae.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bands16_sr  # noqa: E402
import photo_sr  # noqa: E402

QUIET = dict(progress=False, log=lambda *_: None)


def parse(*argv):
    parser = build_train_parser()
    return config_from_args(parser, parser.parse_args(list(argv)))


def readme_own_images_command(folder="photos/"):
    """The training line on ``folder`` in README.md's "Train on your own images", as argv."""
    section = (ROOT / "README.md").read_text().split("## Train on your own images", 1)[1]
    line = next(line for line in section.splitlines()
                if line.startswith("python examples/train_srvae.py") and f"--data-dir {folder}" in line)  # fmt: skip
    return shlex.split(line)[2:]


@pytest.mark.parametrize("benchmark, folder", [(photo_sr, "photos/"), (bands16_sr, "scenes/")])
def test_the_benchmarks_measure_the_readmes_own_images_commands_word_for_word(benchmark, folder):
    assert readme_own_images_command(folder) == [arg.format(folder=folder) for arg in benchmark.README_COMMAND]


def test_the_readmes_own_images_command_trains_the_photographs_recipe(tmp_path):
    config = parse(*[arg.replace("photos/", str(tmp_path)) for arg in readme_own_images_command()])
    # The recipe of docs/results.md's photograph runs (the twelfth and fourteenth), chosen on validation photographs.
    assert (config.recipe, config.lr, config.hidden, config.batch_size, config.patch_size, config.augment) == (
        "folder", 2e-3, 32, 32, 32, True)
    assert (config.likelihood, config.faithful_scale_weight) == ("gaussian-pixel-faithful", 0.01)
    assert (config.sr_base, config.z_channels, config.z_injection) == ("bicubic", 0, "input")
    # q(z|x,y,u) a residual normal around p(z|y,u), whose scale is floored (docs/training-faults.md)
    assert (config.z_posterior, config.z_scale_floor) == ("residual", 0.01)
    # The fourteenth run's update guard: spikes above 10 x the median norm skipped, no clipping.
    assert (config.skip_factor, config.clip_factor, config.clip_norm) == (10.0, 0.0, None)
    assert config.epochs is None  # set from the patch count when the data are loaded
    model = build_model(config, (1, 32, 32))
    assert isinstance(model.decoder_x, DenseSuperResolutionDecoder)  # the SR decoder: DenseNet, width 16 ...
    assert model.decoder_x.lr_net[0].out_channels == 2 * 16
    assert not any(isinstance(m, DenseFeatures) for m in model.encoder_z.modules())  # ... beside small encoders
    assert model.decoder_x.base == "bicubic"
    assert model.likelihood.scale_gradient_weight == 0.01


def test_the_named_datasets_keep_the_main_jobs_recipe():
    config = parse("--guide", "full")
    assert (config.recipe, config.epochs, config.lr, config.hidden, config.likelihood, config.sr_base) == (
        "named", 2, 4e-3, 16, "gaussian", "bilinear")
    assert (config.augment, config.patch_size, config.sr_arch, config.z_channels, config.faithful_scale_weight) == (
        False, None, None, 1, 1.0)
    assert (config.skip_factor, config.clip_factor) == (10.0, 0.0)
    assert (config.z_posterior, config.z_scale_floor) == ("direct", 0.0)
    assert TrainConfig(guide="full").validate() == config  # from Python, the same run


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--likelihood", "gaussian"], dict(likelihood="gaussian", faithful_scale_weight=1.0)),
        (["--no-augment", "--lr", "1e-3"], dict(augment=False, lr=1e-3)),
        (["--sr-arch", "small", "--hidden", "8"], dict(sr_arch="small", hidden=8, sr_hidden=16)),
        (["--epochs", "3", "--patch-size", "16", "--z-channels", "1"], dict(epochs=3, patch_size=16, z_channels=1)),
        ([], dict(guide="simple", z_posterior="direct", z_scale_floor=0.01)),  # the residual q needs the full guide
        (["--guide", "full", "--z-posterior", "direct", "--z-scale-floor", "0"], dict(z_posterior="direct", z_scale_floor=0.0)),
    ],
)
def test_a_flag_given_overrides_the_folder_recipe(tmp_path, flags, expected):
    config = parse("--dataset", "folder", "--data-dir", str(tmp_path), *flags)
    assert {name: getattr(config, name) for name in expected} == expected


def test_a_named_run_asks_for_no_folder_option_by_its_recipe():
    # The folder recipe's patch size must not leak into a named dataset (where --patch-size is refused).
    assert TrainConfig(dataset="fashion-mnist-mini").validate().patch_size is None


@pytest.mark.parametrize("per_epoch", [3, 100, 629, 704, 2000, 5000])
def test_a_folders_budget_is_the_whole_epochs_nearest_the_step_budget(per_epoch):
    config = TrainConfig(dataset="folder", data_dir="x", batch_size=8).validate()
    line = resolve_epochs(config, per_epoch * 8 + 7)  # the last, partial batch is dropped
    steps = config.epochs * per_epoch
    assert abs(steps - FOLDER_STEP_BUDGET) <= per_epoch / 2 or (config.epochs == 1 and per_epoch > FOLDER_STEP_BUDGET)
    assert f"{config.epochs} epochs of {per_epoch} steps = {steps} update steps" in line


def write_photo_folder(root, count=4, size=40, seed=0):
    """A folder of ``count`` smooth 8-bit grey images, the issue's "four small images"."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.linspace(0, 4, size), np.linspace(0, 4, size), indexing="ij")
    root.mkdir(parents=True)
    for index in range(count):
        field = np.sin(rows * (index + 1)) * np.cos(cols + index) + rng.normal(0, 0.05, rows.shape)
        Image.fromarray(np.clip(127.5 * (field + 1), 0, 255).astype(np.uint8)).save(root / f"photo{index}.png")
    return root


TINY = dict(hidden=4, sr_hidden=4, u_dim=2, z_dim=2, batch_size=8, eval_samples=2, sr_samples=2, eval_limit=8,
            figures=False, device="cpu", patch_size=8)  # fmt: skip


def test_a_small_folder_trains_for_the_step_budget_not_a_few_steps_and_a_resume_keeps_it(tmp_path):
    folder = write_photo_folder(tmp_path / "photos")
    messages = []
    config = TrainConfig(dataset="folder", data_dir=str(folder), out=str(tmp_path / "run"), max_steps=4, **TINY)
    result = train(config, progress=False, log=messages.append)
    stored = torch.load(result.checkpoint, weights_only=True)["config"]
    budget = [m for m in messages if m.startswith("budget: ")]
    assert len(budget) == 1
    per_epoch = int(budget[0].split(" epochs of ")[1].split(" steps")[0])
    assert stored["epochs"] == round(FOLDER_STEP_BUDGET / per_epoch) > 10  # many epochs of a small folder
    assert stored["recipe"] == "folder" and not [m for m in messages if "too few to learn" in m]
    resumed = train(resume=result.checkpoint, max_steps=6, **QUIET)
    assert resumed.metrics["config"]["epochs"] == stored["epochs"]
    assert resumed.metrics["epochs"][-1]["step"] == 6


def test_stored_configurations_take_no_recipe():
    # A folder run stored before the recipes: None meant whole images and an SR decoder of --arch.
    old = TrainConfig(guide="full", dataset="folder", data_dir="x", epochs=3, lr=1e-3, hidden=8, likelihood="gaussian",
                      faithful_scale_weight=1.0, sr_base="bilinear", augment=False, z_channels=0, z_injection="input").to_dict()
    del old["recipe"], old["clip_factor"]  # neither field existed
    old["skip_factor"] = 10.0
    del old["z_posterior"], old["z_scale_floor"]
    config = TrainConfig.from_dict(old).validate()
    assert (config.patch_size, config.sr_arch, config.sr_hidden, config.recipe) == (None, None, None, "stored")
    assert (config.z_posterior, config.z_scale_floor) == ("direct", 0.0)  # what they trained


def test_the_16_bit_benchmark_builds_four_reflectance_like_bands_from_a_colour_photograph(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    rgb[:2, :2] = 0  # a black block and a white one: the ends of each band's range
    rgb[2:4, 2:4] = 255
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    bands = bands16_sr.scene(tmp_path / "photo.png", np.random.default_rng(1))
    assert bands.dtype == np.uint16 and bands.shape == (4, 20, 15)  # block-averaged 2x2
    low, high = np.array(bands16_sr.LOW), np.array(bands16_sr.HIGH)
    assert np.all(np.abs(bands[:, 0, 0].astype(float) - low) < 5 * bands16_sr.NOISE)
    assert np.all(np.abs(bands[:, 1, 1].astype(float) - high) < 5 * bands16_sr.NOISE)
    assert np.all((bands >= low[:, None, None] - 20) & (bands <= high[:, None, None] + 20))
    # Band 4 is 0.7 R + 0.3 G mapped into its range, and the values are no comb of 1,021 levels.
    red, green = rgb.reshape(20, 2, 15, 2, 3).mean(axis=(1, 3))[..., 0], rgb.reshape(20, 2, 15, 2, 3).mean(axis=(1, 3))[..., 1]
    expected = low[3] + (high[3] - low[3]) * (0.7 * red + 0.3 * green) / 255
    assert np.abs(bands[3] - expected).mean() < 2 * bands16_sr.NOISE
    assert len(np.unique(bands[0])) > 200

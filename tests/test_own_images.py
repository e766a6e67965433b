"""Training on a folder of one's own images and super-resolving with the result: 16-bit 4-band
data end to end, the bit depth in bits/dim and in the files written, augmentation, bad input
through the command line."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from pyro_srvae.cli import main as train_main
from pyro_srvae.data.batching import augment_dihedral
from pyro_srvae.metrics.likelihood import bits_per_dim
from pyro_srvae.model.distributions import block_mean
from pyro_srvae.sr.loading import load_model
from pyro_srvae.sr.superresolve import superresolve
from pyro_srvae.sr.tiling import SuperResolveError
from pyro_srvae.training.config import ConfigError, TrainConfig
from pyro_srvae.training.factory import build_model, check_bit_depth
from pyro_srvae.training.loop import train
from conftest import write_scene_folder, write_tiff

QUIET = dict(progress=False, log=lambda *_: None)
TINY = dict(
    guide="full", hidden=4, u_dim=2, z_dim=2, batch_size=8, max_steps=3, eval_samples=2, sr_samples=2,
    eval_limit=8, figures=False, device="cpu",
)  # fmt: skip


def smooth_bands(rng, bands, height, width, low=1000, high=9000):
    """16-bit bands with structure (a smooth field plus noise) in a sensor-like range."""
    rows, cols = np.meshgrid(np.linspace(0, 3, height), np.linspace(0, 3, width), indexing="ij")
    field = np.stack([np.sin(rows * (b + 1)) * np.cos(cols) for b in range(bands)])
    values = low + (high - low) * (field + 1) / 2 + rng.normal(0, 50, field.shape)
    return np.clip(values, 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def sixteen_bit_run(tmp_path_factory):
    """A few steps on a folder of 4-band 16-bit TIFFs, patches of 8x8."""
    root = tmp_path_factory.mktemp("satellite")
    rng = np.random.default_rng(0)
    write_scene_folder(root, lambda: smooth_bands(rng, 4, 24, 20))
    result = train(
        TrainConfig(dataset="folder", data_dir=str(root / "images"), patch_size=8, out=str(root / "run"), **TINY),
        **QUIET,
    )
    return root, result


def test_a_16_bit_four_band_folder_trains_and_records_its_bit_depth(sixteen_bit_run):
    root, result = sixteen_bit_run
    payload = torch.load(result.checkpoint, weights_only=True)
    assert payload["data"]["bits"] == 16 and payload["data"]["image_shape"] == [4, 8, 8]
    assert result.metrics["data"]["bits"] == 16 and result.metrics["test"]["bits"] == 16
    # + 16, not + 8: a 16-bit density costs more than 8 bits/dim on a dequantized grid this fine.
    assert result.metrics["test"]["iw_bpd"] > 8.0
    model = load_model(result.checkpoint, device="cpu")
    assert model.bits == 16 and model.lr_shape == (4, 4, 4)  # the trained patch is the tile


def test_a_16_bit_image_round_trips_as_16_bit_with_its_block_means(sixteen_bit_run, tmp_path):
    root, result = sixteen_bit_run
    # Mid-range values: the barely trained model's mean stays inside [0, 1], so no pixel is
    # clipped when written (clipping would move a block's mean).
    bands = smooth_bands(np.random.default_rng(5), 4, 10, 14, low=20000, high=45000)
    source = write_tiff(tmp_path / "input.tif", bands)
    (item,) = superresolve(str(result.checkpoint), [source], 3, out_dir=tmp_path / "out", **QUIET)
    written = tifffile.imread(item.files["mean_tif"])
    assert item.bits == 16 and written.dtype == np.uint16 and written.shape == (4, 20, 28)
    assert 0 < item.mean.min() and item.mean.max() < 1
    # The consistent model's mean has block means exactly y = (k + 0.5) / 65536; written as
    # floor(65536 x), each block's mean lies within half a level of the input's k.
    means = block_mean(torch.from_numpy(written.astype(np.float64))[None], 2)[0].numpy()
    assert np.abs(means - bands).max() <= 0.5 + 1e-6


def test_bit_depths_that_differ_from_the_model_are_refused(sixteen_bit_run, tmp_path):
    root, result = sixteen_bit_run
    eight = tmp_path / "eight.npy"
    np.save(eight, np.zeros((4, 6, 6), dtype=np.uint8))
    with pytest.raises(SuperResolveError, match=r"8-bit image, but the model was trained on 16-bit data") as error:
        superresolve(str(result.checkpoint), [eight], 2, out_dir=tmp_path / "out", **QUIET)
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()
    # Floats in [0, 1] carry no bit depth and are accepted.
    floats = tmp_path / "floats.npy"
    np.save(floats, np.full((4, 6, 6), 0.1, dtype=np.float32))
    (item,) = superresolve(str(result.checkpoint), [floats], 2, out_dir=tmp_path / "out", **QUIET)
    assert tifffile.imread(item.files["mean_tif"]).dtype == np.float32


def test_a_16_bit_input_to_an_8_bit_model_is_refused(tmp_path):
    from pyro_srvae.model.srvae import SRVAE

    path = tmp_path / "sixteen.png"
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(path)
    with pytest.raises(SuperResolveError, match=r"16-bit image, but the model was trained on 8-bit data"):
        superresolve(SRVAE(image_shape=(1, 8, 8), hidden=4), [path], 2, out_dir=tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()


def test_an_8_bit_input_is_written_back_in_8_bits(tmp_path):
    from pyro_srvae.model.srvae import SRVAE

    path = tmp_path / "grey.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 3).save(path)
    (item,) = superresolve(SRVAE(image_shape=(1, 8, 8), hidden=4), [path], 2, out_dir=tmp_path / "out", **QUIET)
    written = tifffile.imread(item.files["mean_tif"])
    assert item.bits == 8 and written.dtype == np.uint8 and written.shape == (16, 16)


def test_bits_per_dim_follows_the_bit_depth():
    # The uniform density on [0, 1)^D (log p = 0) costs the raw size of a pixel.
    assert bits_per_dim(0.0, 10) == 8.0 and bits_per_dim(0.0, 10, bits=16) == 16.0
    assert bits_per_dim(-10 * np.log(2.0), 10, bits=16) == pytest.approx(17.0)
    with pytest.raises(ValueError, match="bits must be 8 or 16"):
        bits_per_dim(0.0, 10, bits=12)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(likelihood="dlogistic-mix"), "256 bins"),
        (dict(downscale_mode="bilinear"), "8-bit grid"),
        (dict(x_given_y="quantized"), "8-bit grid"),
    ],
)
def test_16_bit_data_refuse_the_8_bit_likelihood_routes(options, message):
    def model(**values):
        return build_model(TrainConfig(hidden=4, **values), (1, 8, 8))

    with pytest.raises(ConfigError, match=message):
        check_bit_depth(model(**options), 16)
    check_bit_depth(model(**options), 8)
    check_bit_depth(model(), 16)  # the default: the consistent Gaussian, a density on any grid


def test_augmentation_applies_one_symmetry_of_the_square_per_image():
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4).repeat(200, 1, 1, 1)
    out = augment_dihedral(x, generator=torch.Generator().manual_seed(0))
    image = x[0, 0]
    symmetries = []
    for transposed in (image, image.T):
        for flipped in (transposed, transposed.flip(0), transposed.flip(1), transposed.flip(0).flip(1)):
            symmetries.append(flipped)
    seen = [next(k for k, s in enumerate(symmetries) if torch.equal(o[0], s)) for o in out[::2]]
    counts = np.bincount(seen, minlength=8)
    assert len(counts) == 8 and counts.min() >= 8  # all eight occur (200 draws, 25 expected each)
    # The downscaling commutes with each: y of the augmented x is the augmented y.
    for o, k in zip(out[::2][:8], seen[:8]):
        assert torch.equal(block_mean(o[None], 2)[0, 0], block_mean(symmetries[k][None, None], 2)[0, 0])
    wide = augment_dihedral(torch.rand(50, 1, 4, 6))
    assert wide.shape == (50, 1, 4, 6)  # no quarter turns for a non-square image


def test_folder_options_need_the_folder_dataset():
    with pytest.raises(ConfigError, match="--patch-size applies to --dataset folder"):
        TrainConfig(patch_size=8).validate()
    with pytest.raises(ConfigError, match="needs --data-dir"):
        TrainConfig(dataset="folder").validate()


def bad_folder(tmp_path, kind):
    folder = tmp_path / kind
    folder.mkdir()
    rng = np.random.default_rng(0)
    if kind == "small":
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(folder / f"{i}.png")
    elif kind == "mixed":
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / "a.png")
        np.save(folder / "b.npy", rng.integers(0, 256, (4, 16, 16), dtype=np.uint8))
    elif kind == "truncated":
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / "a.png")
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / "b.png")
        data = (folder / "b.png").read_bytes()
        (folder / "b.png").write_bytes(data[: len(data) // 2])
    return folder


@pytest.mark.parametrize(
    "kind, extra, code, message",
    [
        ("empty", [], 1, "no images"),
        ("small", ["--patch-size", "8"], 1, "is at least 8x8 pixels"),
        ("mixed", ["--patch-size", "8"], 1, "channel"),
        ("truncated", ["--patch-size", "8"], 1, "b.png"),
        ("empty", ["--patch-size", "7"], 2, "not a multiple of --factor 2"),
    ],
)
def test_bad_folders_give_one_line_and_write_nothing(tmp_path, capsys, kind, extra, code, message):
    folder = bad_folder(tmp_path, kind)
    out = tmp_path / "run"
    argv = ["--dataset", "folder", "--data-dir", str(folder), "--out", str(out), "--quiet", *extra]
    if code == 2:
        with pytest.raises(SystemExit) as exit_info:
            train_main(argv)
        assert exit_info.value.code == 2
    else:
        assert train_main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists() or not any(out.iterdir())
    # The cache may hold a complete split read before the bad file (reused by the next run),
    # never a partial one: every file in it is a whole, loadable array.
    for cached in (tmp_path / "folder-cache").glob("*") if (tmp_path / "folder-cache").exists() else []:
        assert cached.suffix == ".npy" and not cached.name.startswith(".")
        np.load(cached, mmap_mode="r")


def test_the_command_line_reports_a_bad_folder_without_a_traceback(tmp_path):
    folder = bad_folder(tmp_path, "mixed")
    done = subprocess.run(
        [sys.executable, "examples/train_srvae.py", "--dataset", "folder", "--data-dir", str(folder),
         "--patch-size", "8", "--out", str(tmp_path / "run"), "--quiet"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300,
    )  # fmt: skip
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr

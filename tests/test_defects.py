"""Defects of issue #25: the evaluation's batches, --cache-dir on resume, file modes, the
consistent Gaussian's support, what sr_bpd is, the SR mean's range, private names."""

import ast
import json
import math
import os
import stat
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from pyro_srvae import superresolve as superresolve_function
from pyro_srvae.metrics import likelihood
from pyro_srvae.sr import evaluate as sr_evaluate
from pyro_srvae.training import loop
from pyro_srvae.utils.io import StagedFiles, atomic_path, atomic_write_bytes
from pyro_srvae.cli import console_main
from pyro_srvae.data.datasets import load_dataset
from pyro_srvae.metrics.frechet import classifier_path, load_or_train_classifier
from pyro_srvae.model.distributions import ConsistentGaussian, block_mean, nearest_upsample
from pyro_srvae.model.image_model import downscale
from pyro_srvae.sr.evaluate import evaluate_checkpoint
from pyro_srvae.sr.loading import load_model
from pyro_srvae.training.config import TrainConfig
from pyro_srvae.training.loop import evaluate_images, train
from pyro_srvae.training.report import evaluation_rows
from pyro_srvae.utils.devices import resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import photo_sr  # noqa: E402

PACKAGE = Path(likelihood.__file__).parents[1]
QUIET = dict(progress=False, log=lambda *_: None)
TINY_RUN = dict(guide="full", max_steps=2, train_limit=64, eval_limit=8, batch_size=32, hidden=4, eval_samples=2,
                sr_samples=2, figures=False, device="cpu")  # fmt: skip
#: A CPU budget this small gives 2 * 4 // K = 4 images per evaluation batch (K = 2): two batches
#: of the 8 test images, where ``2048 // K`` would have made one, as a GPU's budget differs from it.
SMALL_BUDGET = 4


@contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def small_budget_run(tmp_path_factory):
    """A tiny srVAE run trained and evaluated with a particle budget other than 1024."""
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(likelihood, "DEFAULT_PARTICLE_BUDGET", SMALL_BUDGET)
        result = train(TrainConfig(**TINY_RUN), out=str(out), **QUIET)
    return out, result


# --------------------------------------------------------------------------- #
# 1. One rule for the evaluation's batches
# --------------------------------------------------------------------------- #
def test_evaluate_reproduces_metrics_json_under_another_particle_budget(small_budget_run, monkeypatch, tmp_path):
    out, _ = small_budget_run
    metrics = json.loads((out / "metrics.json").read_text())
    monkeypatch.setattr(likelihood, "DEFAULT_PARTICLE_BUDGET", SMALL_BUDGET)
    report = evaluate_checkpoint(out / "checkpoint.pt", out_dir=tmp_path)
    assert report["test"]["iw_bpd"] == metrics["test"]["iw_bpd"]  # the same batches, the same per-batch seeds
    assert report["test"]["elbo_bpd"] == metrics["test"]["elbo_bpd"]
    assert report["test"]["sr_psnr"] == metrics["test"]["sr_psnr"]
    assert report["test"]["sr_bpd"] == metrics["test"]["sr_bpd"]


def test_both_evaluations_batch_alike_on_a_gpu(small_budget_run, monkeypatch, tmp_path):
    # Simulated: the callers are asked for a CUDA device, evaluate_model records its batch size and stops.
    out, result = small_budget_run
    seen = []

    class Stop(Exception):
        pass

    def evaluate_model(model, images, *, batch_size, device, **_):
        seen.append((batch_size, torch.device(device).type))
        raise Stop

    monkeypatch.setattr(loop, "evaluate_model", evaluate_model)
    monkeypatch.setattr(sr_evaluate, "model_device", lambda model: torch.device("cuda"))
    model = load_model(out / "checkpoint.pt", device="cpu")
    config = TrainConfig(**TINY_RUN)
    images = load_dataset("fashion-mnist-mini", "test").images[:8]
    with pytest.raises(Stop):
        evaluate_images(model, config, images, images, "cuda")
    with pytest.raises(Stop):
        evaluate_checkpoint(out / "checkpoint.pt", out_dir=tmp_path)
    gpu_batch = 2 * likelihood.GPU_PARTICLE_BUDGET // config.eval_samples
    assert seen == [(gpu_batch, "cuda")] * 2  # training's evaluation, then pyro-srvae evaluate's


# --------------------------------------------------------------------------- #
# 2. and 3. --cache-dir on resume; files a colleague can read
# --------------------------------------------------------------------------- #
def write_folder(root):
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 1)):
        (root / split).mkdir(parents=True)
        for index in range(count):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / split / f"{index}.png")
    return root


def test_resume_writes_the_patch_cache_where_cache_dir_says_with_a_normal_mode(tmp_path):
    images, run = write_folder(tmp_path / "images"), tmp_path / "run"
    flags = ["--eval-samples", "1", "--sr-samples", "1", "--no-figures", "--quiet", "--device", "cpu"]
    with umask(0o022):
        assert console_main(["train", "--dataset", "folder", "--data-dir", str(images), "--patch-size", "8",
                             "--hidden", "4", "--batch-size", "4", "--max-steps", "1", "--cache-dir",
                             str(tmp_path / "first"), "--out", str(run), *flags]) == 0  # fmt: skip
        assert console_main(["train", "--resume", str(run / "checkpoint.pt"), "--max-steps", "2", "--cache-dir",
                             str(tmp_path / "second"), *flags]) == 0  # fmt: skip
    cached = sorted((tmp_path / "second").glob("*.npy"))
    assert len(cached) == 2  # the train and test patches, read again into the new cache
    for path in [*cached, *(tmp_path / "first").glob("*.npy"), run / "checkpoint.pt", run / "metrics.json"]:
        assert mode(path) == 0o644, path


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664)])
def test_the_atomic_writer_gives_files_the_umasks_mode(tmp_path, mask, expected):
    with umask(mask):
        atomic_write_bytes(tmp_path / "bytes.bin", lambda handle: handle.write(b"x"))
        with atomic_path(tmp_path / "array.npy") as temporary:
            np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=(3,))[:] = 7
        with StagedFiles(tmp_path) as staged:
            staged.write(tmp_path / "a.txt", lambda handle: handle.write(b"a"))
            staged.write_via_path(tmp_path / "b.txt", lambda path: Path(path).write_bytes(b"b"))
    assert np.load(tmp_path / "array.npy").tolist() == [7, 7, 7]
    assert (tmp_path / "b.txt").read_bytes() == b"b"
    for name in ("bytes.bin", "array.npy", "a.txt", "b.txt"):
        assert mode(tmp_path / name) == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "array.npy", "b.txt", "bytes.bin"]


def test_a_failed_fill_leaves_neither_file_nor_temporary(tmp_path):
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(tmp_path / "cache.npy") as temporary:
            Path(temporary).write_bytes(b"half")
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        with StagedFiles(tmp_path) as staged:
            staged.write(tmp_path / "a.txt", lambda handle: handle.write(b"a"))
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_the_fd_classifier_cache_is_readable_by_others(tmp_path):
    train_set = load_dataset("fashion-mnist-mini", "train")
    with umask(0o022):
        load_or_train_classifier(tmp_path, train_data=train_set, epochs=1, width=4, feature_dim=8, max_train_images=64)
    assert mode(classifier_path(tmp_path, "fashion-mnist-mini")) == 0o644


# --------------------------------------------------------------------------- #
# 4. The consistent Gaussian's support
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("offset, spread", [(0.0, 1.0), (1000.0, 1.0), (-3.0, 20.0)])
def test_the_models_own_x_lies_on_the_support(offset, spread):
    # float32 data on [0, 1], far from it, and wide: y = downscale(x), as training and evaluation compute it
    g = torch.Generator().manual_seed(0)
    x = offset + spread * torch.rand(64, 3, 8, 8, generator=g)
    loc, scale = torch.rand(64, 3, 8, 8, generator=g), 0.1 + torch.rand(64, 3, 8, 8, generator=g)
    for factor in (2, 4, 8):
        y = downscale(x, factor)
        dist = ConsistentGaussian(loc * spread + offset, scale * spread, y, factor)
        assert torch.isfinite(dist.log_prob(x)).all()
        assert torch.isfinite(dist.log_prob(dist.rsample((3,)))).all()  # draws (and the mean) too
        assert torch.isfinite(dist.log_prob(dist.mean)).all()


def test_an_x_whose_block_means_are_not_y_has_no_density():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 4, 4, generator=g)
    y = block_mean(x, 2)
    dist = ConsistentGaussian(torch.full_like(x, 0.5), torch.full_like(x, 0.2), y, 2)
    shifted = x.clone()
    shifted[0, 0, :2, :2] += 1e-3  # one block mean of the first image moves by 1e-3 (y's scale: 1)
    log_p = dist.log_prob(shifted)
    assert log_p[0] == -math.inf and torch.isfinite(log_p[1:]).all()
    assert torch.equal(log_p[1:], dist.log_prob(x)[1:])
    # a change of the details alone (block means kept) stays on the support, with another density
    detail = x + 0.05 * (torch.rand(4, 1, 4, 4, generator=g) - 0.5)
    detail = detail - nearest_upsample(block_mean(detail, 2) - y, 2)
    assert torch.isfinite(dist.log_prob(detail)).all()
    assert not torch.allclose(dist.log_prob(detail), dist.log_prob(x))


# --------------------------------------------------------------------------- #
# 5. sr_bpd says what it is
# --------------------------------------------------------------------------- #
def test_the_sr_bpd_row_says_its_convention_and_kind(small_budget_run):
    _, result = small_budget_run
    rows = dict(evaluation_rows(result.metrics["test"]))
    row = rows["SR -log p(x|y)"]
    assert "y = block means" in row and "not a bound" in row


# --------------------------------------------------------------------------- #
# 6. The SR mean outside [0, 1]
# --------------------------------------------------------------------------- #
def test_a_mean_outside_the_unit_range_is_clipped_in_png_and_tiff_kept_in_npy(small_budget_run, tmp_path):
    out, _ = small_budget_run
    model = load_model(out / "checkpoint.pt", device="cpu")
    # near white above, near black below: the random details push the mean past both ends
    y = np.concatenate([np.full((1, 7, 14), 0.999, np.float32), np.full((1, 7, 14), 0.001, np.float32)], axis=1)
    np.save(tmp_path / "edge.npy", y)
    (result,) = superresolve_function(model, [tmp_path / "edge.npy"], num_samples=4, out_dir=tmp_path / "sr", log=None)
    mean = np.load(result.files["mean_npy"])
    assert mean.max() > 1.0 and mean.min() < 0.0  # kept
    png = np.asarray(Image.open(result.files["mean_png"]))
    tiff = tifffile.imread(result.files["mean_tif"])  # float input: a float32 TIFF
    assert (png[mean[0] > 1.0] == 255).all() and (png[mean[0] < 0.0] == 0).all()
    assert (tiff[mean[0] > 1.0] == 1.0).all() and (tiff[mean[0] < 0.0] == 0.0).all()
    inside = (mean[0] >= 0) & (mean[0] <= 1)
    assert np.array_equal(tiff[inside], mean[0][inside])


# --------------------------------------------------------------------------- #
# 7. Smaller
# --------------------------------------------------------------------------- #
def package_trees():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text())


def test_no_module_reaches_into_another_modules_private_names():
    reached = []
    for name, tree in package_trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                private = [alias.name for alias in node.names if alias.name.startswith("_") and not alias.name.endswith("__")]
                reached += [f"{name}: {node.module}.{alias}" for alias in private]
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) >= 2:
                key = node.args[1]
                if isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value.startswith("_"):
                    if isinstance(node.args[0], ast.Name) and node.args[0].id in {"data", "evaluation", "superresolve"}:
                        reached.append(f"{name}: getattr({node.args[0].id}, {key.value!r})")
    assert reached == []


def test_no_package_function_is_named_like_a_test():
    # pytest collects a ``test_*`` function imported into a test module as a test
    named = [f"{name}: {node.name}" for name, tree in package_trees() for node in tree.body
             if isinstance(node, ast.FunctionDef) and node.name.startswith("test")]  # fmt: skip
    assert named == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_the_one_device_resolver():
    assert resolve_device(None) is None
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    resolvers = [name for name, tree in package_trees() for node in tree.body
                 if isinstance(node, ast.FunctionDef) and "resolve_device" in node.name]  # fmt: skip
    assert resolvers == ["utils/devices.py"]


def test_photo_sr_calibrates_and_scores_with_different_seeds():
    calibration, scoring = photo_sr.stage_seeds(0)
    assert len({calibration, scoring, 0}) == 3
    assert photo_sr.stage_seeds(1) != (calibration, scoring)

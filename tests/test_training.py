"""The training path: CLI smoke run, resume equivalence, checkpoints, signals, bad flags."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pyro
import pyro.poutine as poutine

from pyro_srvae import SRVAE, TrainConfig, evaluate_model, make_elbo, train
from pyro_srvae.training.checkpoint import CheckpointError, load_checkpoint
from pyro_srvae.cli import main
from pyro_srvae.training.factory import build_model, load_split
from pyro_srvae.training.guard import TrainingDiverged
from pyro_srvae.training.objective import kl_scale, scale_latents, training_mode
from conftest import tiny_images

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_srvae.py"
# Small and fast: 128 training images, 4 steps an epoch, narrow networks.
FAST = dict(train_limit=128, eval_limit=16, batch_size=32, hidden=4, eval_samples=4, sr_samples=4)
FAST_FLAGS = [
    "--train-limit", "128", "--eval-limit", "16", "--batch-size", "32", "--hidden", "4",
    "--eval-samples", "4", "--sr-samples", "4", "--quiet",
]  # fmt: skip
TEST_KEYS = {"elbo_bpd", "iw_bpd", "iw_samples", "sr_psnr", "bicubic_psnr", "sr_ssim", "bicubic_ssim"}


def run_cli(*args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300, **kwargs
    )


def test_cli_smoke_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    result = run_cli("--guide", "full", "--max-steps", "3", "--out", str(out), *FAST_FLAGS)
    assert result.returncode == 0, result.stderr
    assert "test IW (K=4)" in result.stdout and "SR PSNR" in result.stdout  # the summary table
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"config", "epochs", "test", "gamma_x", "gamma_y", "world_size", "wall_seconds"}
    assert metrics["config"]["guide"] == "full" and metrics["world_size"] == 1
    assert set(metrics["test"]) >= TEST_KEYS
    assert all(math.isfinite(metrics["test"][key]) for key in TEST_KEYS)
    printed = {line.strip().split("  ")[0]: line for line in result.stdout.splitlines()}
    for label, key in (("test ELBO", "elbo_bpd"), ("test IW (K=4)", "iw_bpd")):  # the summary prints what it names
        assert f"{metrics['test'][key]:.4f} bits/dim" in printed[label], (label, printed.get(label))
    assert metrics["gamma_x"] > 0 and metrics["gamma_y"] > 0
    [record] = metrics["epochs"]
    assert set(record) >= {"epoch", "train_objective_bpd", "test_elbo_bpd"} and record["step"] == 3
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,train_objective_bpd,train_objective,test_elbo_bpd") and len(csv_lines) == 2
    for figure in ("loss_curves", "reconstructions", "samples", "super_resolution", "calibration"):
        assert (out / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["step"] == 3 and checkpoint["config"]["guide"] == "full"
    assert {"model_state", "optimizer_state", "param_store", "rng", "history"} <= set(checkpoint)
    assert not list(out.glob(".*.tmp"))  # no temporary file left behind


def test_mog_vae_run_draws_its_components(tmp_path):
    result = train(
        TrainConfig(model="vae", prior="mog", mog_components=3, elbo="meanfield-mog-bound", max_steps=2, **FAST),
        out=str(tmp_path), progress=False, log=lambda *_: None,
    )  # fmt: skip
    assert (tmp_path / "mog_components.png").exists()
    assert result.metrics["gamma_y"] is None and result.metrics["test"]["sr_psnr"] is None


def test_loss_falls_over_a_short_run(tmp_path):
    result = train(TrainConfig(epochs=4, **FAST), out=str(tmp_path), progress=False, log=lambda *_: None)
    epochs = result.metrics["epochs"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert epochs[-1]["train_objective_bpd"] < epochs[0]["train_objective_bpd"] - 0.2
    assert epochs[-1]["test_elbo_bpd"] < epochs[0]["test_elbo_bpd"]


def _initial_model(config, image_shape):
    """The weights a fresh run of ``config`` starts from (seeded as :func:`train` seeds them)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    return build_model(config, image_shape)


def test_iwae_dreg_trains_the_srvae_from_the_command_line(tmp_path):
    """Two epochs on the IW bound raise it on the test images against the run's own start: the same
    initial weights, test images, dequantization noise and latent draws (K = 16)."""
    config = TrainConfig(epochs=2, guide="full", elbo="iwae-dreg", num_particles=4, **FAST)
    result = train(config, out=str(tmp_path), progress=False, log=lambda *_: None)
    test_images = load_split(config, "test").images[: config.eval_limit]

    def iw_bpd(model):
        return evaluate_model(model, test_images, elbo_samples=16, iw_samples=16, seed=config.seed,
                              super_resolution=False, latents=False)["iw_bpd"]  # fmt: skip

    before = iw_bpd(_initial_model(config, test_images.shape[1:]))
    after = iw_bpd(result.model)
    assert after < before - 0.5, (before, after)  # measured: 10.01 -> 8.71 bits/dim


def _state(result):
    return {k: v.clone() for k, v in result.model.state_dict().items()}


@pytest.mark.parametrize("interrupt", [dict(epochs=1), dict(max_steps=6)], ids=["epoch-boundary", "mid-epoch"])
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, interrupt):
    quiet = dict(progress=False, log=lambda *_: None)
    config = TrainConfig(epochs=3, guide="full", kl_warmup=1.5, **FAST)
    whole = train(config, out=str(tmp_path / "whole"), **quiet)
    first = train(config, out=str(tmp_path / "split"), **interrupt, **quiet)
    resumed = train(resume=first.checkpoint, epochs=3, max_steps=None, **quiet)
    assert resumed.out_dir == tmp_path / "split"
    whole_state, resumed_state = _state(whole), _state(resumed)
    for name, value in whole_state.items():
        assert torch.allclose(value, resumed_state[name], atol=1e-6), name
    assert [r["epoch"] for r in resumed.metrics["epochs"]] == [1, 2, 3]
    for a, b in zip(whole.metrics["epochs"], resumed.metrics["epochs"]):
        assert a["train_objective_bpd"] == pytest.approx(b["train_objective_bpd"], abs=1e-5)
    assert resumed.metrics["test"]["iw_bpd"] == pytest.approx(whole.metrics["test"]["iw_bpd"], abs=1e-5)


@pytest.mark.parametrize(
    "content",
    [b"this is not a checkpoint", b"", "foreign"],
    ids=["garbage", "empty", "foreign-torch-file"],
)
def test_corrupt_or_foreign_checkpoint_is_refused_and_changes_nothing(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    if content == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    else:
        path.write_bytes(content)
    before = sorted(p.name for p in tmp_path.iterdir()), path.read_bytes()
    with pytest.raises(CheckpointError, match="not a (readable )?pyro-srvae checkpoint"):
        train(resume=path, progress=False)
    assert (sorted(p.name for p in tmp_path.iterdir()), path.read_bytes()) == before
    result = run_cli("--resume", str(path))
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import pyro_srvae.training.loop as training

    calls = {"n": 0}
    real_dequantize = training.dequantize

    def poisoned(images, *args, **kwargs):
        calls["n"] += 1
        x = real_dequantize(images, *args, **kwargs)
        return torch.full_like(x, float("nan")) if calls["n"] >= 5 else x

    monkeypatch.setattr(training, "dequantize", poisoned)
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        # Without the update guard, which would skip these steps (tests/test_update_guard.py).
        train(TrainConfig(epochs=3, checkpoint_every=2, skip_factor=0, **FAST), out=str(tmp_path), progress=False)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["step"] == 4  # saved at step 4; the NaN came at step 5
    assert all(torch.isfinite(v).all() for v in checkpoint["model_state"].values())


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    args = [sys.executable, str(SCRIPT), "--epochs", "200", "--checkpoint-every", "2", "--out", str(out), *FAST_FLAGS]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "resume with --resume" in stderr and "Traceback" not in stderr
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert 0 < checkpoint["step"] < 800
    resumed = run_cli("--resume", str(out / "checkpoint.pt"), "--epochs", str(checkpoint["epoch"] + 1), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "metrics.json").read_text())["epochs"][-1]["epoch"] == checkpoint["epoch"] + 1


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--model", "vae", "--guide", "full"], "the VAE has only q(z|x)"),
        (["--elbo", "meanfield-mog-bound"], "needs --prior mog"),
        (["--elbo", "renyi"], "--num-particles >= 2"),
        (["--elbo", "iwae-dreg"], "--num-particles >= 2"),
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--sr-hidden", "0"], "--sr-hidden must be a positive integer"),
        (["--model", "vae", "--sr-arch", "densenet"], "the VAE has none"),
    ],
)
def test_impossible_flag_combinations_exit_2_with_one_line(capsys, flags, reason):
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and reason in error_lines[0]


def test_missing_dataset_is_one_clear_line(tmp_path):
    result = run_cli("--dataset", "mnist", "--data-dir", str(tmp_path), "--max-steps", "1", "--quiet")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and str(tmp_path) in result.stderr
    assert "train-images-idx3-ubyte" in result.stderr


def test_kl_warmup_scales_only_the_latent_sites():
    model = SRVAE((1, 8, 8), hidden=4)
    x = tiny_images()
    guide_trace = poutine.trace(scale_latents(model.guide, 0.25)).get_trace(x)
    model_trace = poutine.trace(poutine.replay(scale_latents(model.model, 0.25), trace=guide_trace)).get_trace(x)
    assert [model_trace.nodes[s]["scale"] for s in ("u", "y", "z", "x")] == [0.25, 1.0, 0.25, 1.0]
    assert [guide_trace.nodes[s]["scale"] for s in ("u", "z")] == [0.25, 0.25]
    # with scale 0 the mean-field loss is the two data terms alone
    replay = [poutine.replay(scale_latents(f, 0.0), trace=guide_trace) for f in (model.model, model.guide)]
    loss = make_elbo("meanfield").loss(*replay, x)
    data_terms = sum(model_trace.nodes[s]["fn"].log_prob(model_trace.nodes[s]["value"]).sum() for s in ("y", "x"))
    assert loss == pytest.approx(-data_terms.item(), rel=1e-5)


def test_kl_warmup_schedule_is_linear_in_epochs():
    config = TrainConfig(kl_warmup=2.0)
    assert kl_scale(config, 0, 0, 10) == 0.0
    assert kl_scale(config, 0, 5, 10) == pytest.approx(0.25)
    assert kl_scale(config, 1, 5, 10) == pytest.approx(0.75)
    assert kl_scale(config, 3, 0, 10) == 1.0
    assert kl_scale(TrainConfig(kl_warmup=0), 0, 0, 10) == 1.0


def _param_sites(fn, x):
    trace = poutine.trace(fn).get_trace(x)
    return [name for name, site in trace.nodes.items() if site["type"] == "param"]


@pytest.mark.parametrize("elbo_name, registers_each_call", [("meanfield", False), ("renyi", True), ("iwae-dreg", False)])
def test_training_mode_registers_once_where_autograd_carries_the_gradients(elbo_name, registers_each_call):
    model = SRVAE((1, 8, 8), hidden=4)
    x = tiny_images()
    assert _param_sites(model.model, x)  # SVI finds the parameters through these sites
    elbo = make_elbo(elbo_name, num_particles=2)
    with training_mode(model, elbo):
        assert not model.validate_inputs
        assert bool(_param_sites(model.guide, x)) == registers_each_call
        if not registers_each_call:  # the gradients still reach every parameter
            elbo.differentiable_loss(model.model, model.guide, x).backward()
            assert all(p.grad is not None for p in model.parameters())
    assert model.validate_inputs and model.pyro_registration and _param_sites(model.guide, x)


@pytest.mark.parametrize("likelihood", ["gaussian-pixel", "dlogistic-mix"])
def test_other_likelihoods_and_the_densenet_train_from_the_command_line(tmp_path, capsys, likelihood):
    flags = ["--guide", "full", "--likelihood", likelihood, "--likelihood-components", "3", "--arch", "densenet"]
    flags += ["--max-steps", "2", "--out", str(tmp_path), "--no-figures"]
    assert main(flags + FAST_FLAGS) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["likelihood"] == likelihood and metrics["config"]["arch"] == "densenet"
    assert metrics["gamma_x"] is None and metrics["gamma_y"] is None  # the decoder predicts its scales
    assert math.isfinite(metrics["test"]["iw_bpd"]) and "gamma_x" not in capsys.readouterr().out


def test_the_sr_base_is_the_run_s_and_the_checkpoint_s(tmp_path):
    """--sr-base bicubic reaches the SR decoder, and superresolve rebuilds it from the checkpoint."""
    from pyro_srvae.sr.loading import load_model

    flags = ["--guide", "full", "--sr-base", "bicubic", "--max-steps", "2"]
    assert main(flags + ["--out", str(tmp_path), "--no-figures"] + FAST_FLAGS) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["sr_base"] == "bicubic"
    assert load_model(tmp_path / "checkpoint.pt", device="cpu").decoder_x.base == "bicubic"
    with pytest.raises(SystemExit):
        main(["--sr-base", "nearest", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_the_sr_decoder_s_own_arch_and_width_are_the_run_s_and_the_checkpoint_s(tmp_path):
    """--sr-arch densenet --sr-hidden 6 builds only the SR decoder so; superresolve rebuilds it."""
    from pyro_srvae.model.networks import (
        ConvFeatures,
        DenseFeatures,
        DenseSuperResolutionDecoder,
        ImageDecoder,
        SpatialGaussianEncoder,
    )
    from pyro_srvae.sr.loading import load_model

    flags = ["--guide", "full", "--sr-arch", "densenet", "--sr-hidden", "6", "--max-steps", "2"]
    assert main(flags + ["--out", str(tmp_path), "--no-figures"] + FAST_FLAGS) == 0
    config = json.loads((tmp_path / "metrics.json").read_text())["config"]
    assert (config["arch"], config["hidden"], config["sr_arch"], config["sr_hidden"]) == ("small", 4, "densenet", 6)
    model = load_model(tmp_path / "checkpoint.pt", device="cpu")
    assert type(model.decoder_x) is DenseSuperResolutionDecoder
    assert model.decoder_x.lr_net[0].out_channels == 2 * 6  # the SR decoder's own width
    assert type(model.decoder_y) is ImageDecoder
    assert type(model.encoder_u.features) is ConvFeatures and not isinstance(model.encoder_u.features, DenseFeatures)
    assert model.encoder_u.features.net[0].out_channels == 4  # --hidden
    for encoder in (model.encoder_z, model.prior_z):  # z a map (the default): convolutions of width 2 --hidden
        assert type(encoder) is SpatialGaussianEncoder and encoder.net[0].out_channels == 2 * 4


def test_super_resolution_beats_bicubic_after_one_epoch_on_the_default_data(tmp_path):
    """The main job's promise (>= 1 dB over bicubic), checked on one epoch of the default run."""
    config = TrainConfig(guide="full", epochs=1, eval_limit=256, eval_samples=2, sr_samples=8, figures=False)
    test = train(config, out=str(tmp_path), progress=False, log=lambda *_: None).metrics["test"]
    assert test["sr_psnr"] > test["bicubic_psnr"] + 1.0
    assert test["sr_ssim"] > test["bicubic_ssim"]

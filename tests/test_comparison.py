"""The comparison grid of issue #4: rows, tables, targets, resuming and the CLI."""

import dataclasses
import json
import math

import pytest
import torch

import pyro

from pyro_srvae.experiments import comparison
from pyro_srvae.cli import build_compare_parser, compare_main, compare_settings_from_args
from pyro_srvae.experiments.comparison import (
    BUDGETS,
    CELL_NAMES,
    ROW_KEYS,
    Budget,
    ComparisonSettings,
    cell_config,
    check_targets,
    comparison_test_images,
    results_markdown,
    run_comparison,
)
from pyro_srvae.plots.training import plot_model_samples
from pyro_srvae.sr.loading import load_model
from pyro_srvae.training.config import ConfigError
from pyro_srvae.training.factory import build_model, load_split
from pyro_srvae.training.loop import evaluate_images

TINY = Budget(
    epochs=1, hidden=4, iw_samples=4, batch_size=32, train_limit=128, eval_limit=16, sr_samples=2,
    fd_samples=16, classifier_epochs=1, classifier_train_limit=256,
)  # fmt: skip
TINY_FLAGS = [
    "--epochs", "1", "--hidden", "4", "--iw-samples", "4", "--batch-size", "32", "--train-limit", "128",
    "--eval-limit", "16", "--fd-samples", "16", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The whole grid, trained once at a tiny budget."""
    out = tmp_path_factory.mktemp("compare")
    settings = ComparisonSettings(budget=TINY)
    rows = run_comparison(settings, out, progress=False, log=lambda message: None)
    return out, settings, rows


def test_the_grid_has_every_cell_with_the_issue_keys(grid):
    out, _, rows = grid
    assert [row["cell"] for row in rows] == CELL_NAMES
    assert [(row["model"], row["guide"], row["prior"]) for row in rows] == [
        (model, guide, prior) for _, model, guide, prior in comparison.CELLS
    ]
    for row in rows:
        assert set(ROW_KEYS) <= set(row)
        assert row["epochs"] == 1 and row["seconds"] > 0 and row["iw_samples"] == 4
        assert row["num_test_images"] == 16
        assert math.isfinite(row["fd"]) and row["fd"] >= 0
        assert row["kl_z_bits"] > 0 and row["z_dim"] > 0 and 0 <= row["active_z"] <= row["z_dim"]
        if row["model"] == "vae":
            assert row["guide"] is None and row["sr_psnr"] is None and row["bicubic_psnr"] is None
            assert row["kl_u_bits"] is None and row["sr_latent_share"] is None
        else:
            assert row["kl_u_bits"] > 0 and 0 < row["sr_latent_share"] < 1
            assert row["guide"] in ("simple", "full")
            assert math.isfinite(row["sr_psnr"]) and math.isfinite(row["bicubic_psnr"])
            assert 0 < row["sr_ssim"] <= 1
    # Same seed, same test images: every srVAE faces the same bicubic baseline.
    assert len({row["bicubic_psnr"] for row in rows if row["model"] == "srvae"}) == 1
    assert json.loads((out / "results.json").read_text()) == rows


def _test_bounds(model, config, settings):
    """(iw_bpd, elbo_bpd) of ``model`` on the comparison's test images, evaluated as a run evaluates."""
    train_images = load_split(config, "train").images[: config.train_limit]
    test = evaluate_images(model, config, train_images, comparison_test_images(settings), torch.device("cpu"))
    return test["iw_bpd"], test["elbo_bpd"]


def test_each_row_holds_its_trained_checkpoint_s_bounds_and_training_lowered_them(grid):
    """A row's IW bound and ELBO are those of its cell's checkpoint (re-evaluated: same K, images and
    seed), and below those of the weights the cell started from (the same seeded initialisation)."""
    out, settings, rows = grid
    for row in rows:
        config = cell_config(settings, row["cell"], out / "cells" / row["cell"], device="cpu")
        pyro.clear_param_store()
        checkpoint = out / "cells" / row["cell"] / "checkpoint.pt"
        iw, elbo = _test_bounds(load_model(checkpoint, device="cpu", require_super_resolution=False), config, settings)
        assert row["iw_bpd"] == pytest.approx(iw, rel=1e-6) and row["elbo_bpd"] == pytest.approx(elbo, rel=1e-6), row
        pyro.clear_param_store()
        pyro.set_rng_seed(config.seed)  # as train() seeds the initial weights
        start_iw, start_elbo = _test_bounds(build_model(config, (1, 28, 28)), config, settings)
        # measured falls of the IW bound: 0.37 (srvae-simple-gaussian) to 1.59 (vae-mog) bits/dim
        assert row["iw_bpd"] < start_iw - 0.2 and row["elbo_bpd"] < start_elbo - 0.2, (row["cell"], start_iw, iw)


def test_results_md_has_the_table_the_targets_and_the_figure(grid):
    out, _, rows = grid
    text = (out / "results.md").read_text()
    table_rows = [line for line in text.splitlines() if line.startswith("| VAE") or line.startswith("| srVAE (")]
    main_table = [line for line in table_rows if line.count("|") == 12]
    assert len(main_table) == 6
    assert all("| exact |" in line for line in main_table)  # every bits/dim says it is a density of x
    assert "## Targets" in text and "![samples" in text and "Not run yet" not in text
    # the fd of real training images against the test images: below every model's
    floor = json.loads((out / "fd-floor.json").read_text())["fd_floor"]
    assert 0 <= floor < min(row["fd"] for row in rows)
    assert f"fd floor (training images against the test images, what a perfect sampler scores): {floor:.3f}" in text
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{rows[0]['iw_bpd']:.4f}" in text
    carried = text.split("## What the latents carry")[1].split("##")[0]
    for row in rows:  # one line per cell: its KL of z, and for the srVAE its latent share
        line = next(line for line in carried.splitlines() if line.startswith(f"| {comparison._label(row)} | {row['prior']} |"))
        assert f"| {row['kl_z_bits']:.1f} |" in line and f"{row['active_z']}/{row['z_dim']}" in line
        assert (row["sr_latent_share"] is None) == ("| — | — |" in line)


def test_a_finished_comparison_is_not_run_again(grid, monkeypatch):
    out, settings, rows = grid

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(comparison, "train", no_training)
    assert run_comparison(settings, out, progress=False, log=lambda message: None) == rows


def test_a_cell_without_its_row_is_finished_from_its_checkpoint(grid, tmp_path):
    out, settings, rows = grid
    row_path = out / "cells" / "srvae-full-mog" / comparison.ROW_FILE
    saved = row_path.read_text()
    row_path.unlink()
    logged = []
    again = run_comparison(settings, out, cells=["srvae-full-mog"], progress=False, log=logged.append)
    assert any("resuming" in line for line in logged)  # from the checkpoint, not from scratch
    new, old = again[-1], json.loads(saved)
    # Same weights, same evaluation seed: the same numbers.
    for key in ("iw_bpd", "elbo_bpd", "sr_psnr", "fd"):
        assert new[key] == pytest.approx(old[key], rel=1e-6), key


def test_a_directory_of_another_comparison_is_refused_and_kept(grid):
    out, settings, _ = grid
    before = (out / "results.json").read_text()
    other = dataclasses.replace(settings, budget=dataclasses.replace(settings.budget, epochs=2), seed=1)
    with pytest.raises(ConfigError, match=r"other settings \(budget, seed differ\)"):
        run_comparison(other, out, progress=False, log=lambda message: None)
    assert (out / "results.json").read_text() == before


def _row(model, guide, prior, iw, fd, sr=None, bicubic=None, x_density="exact"):
    return dict(cell="x", model=model, guide=guide, prior=prior, iw_bpd=iw, elbo_bpd=iw + 0.1, sr_psnr=sr,
                bicubic_psnr=bicubic, sr_ssim=None, fd=fd, epochs=1, seconds=1.0, x_density=x_density)  # fmt: skip


def test_the_spec_joint_never_meets_the_likelihood_target():
    rows = [_row("vae", None, "gaussian", 4.00, 10.0), _row("srvae", "simple", "gaussian", 4.01, 9.0, x_density="joint")]
    bpd = next(c for c in check_targets(rows) if c["target"] == "IW bpd within 0.1 of the VAE's")
    assert not bpd["met"] and "(joint)" in bpd["detail"]


def test_targets_are_checked_per_prior_against_the_vae():
    rows = [
        _row("vae", None, "gaussian", 4.00, 10.0),
        _row("srvae", "simple", "gaussian", 4.09, 9.0, sr=25.0, bicubic=22.0),  # all met
        _row("srvae", "full", "gaussian", 4.11, 11.0, sr=23.5, bicubic=22.0),  # none met
        _row("srvae", "full", "mog", 3.0, 1.0, sr=30.0, bicubic=20.0),  # no mog VAE: SR target only
    ]
    checks = check_targets(rows)
    met = {(c["model"], c["target"]): c["met"] for c in checks}
    assert met == {
        ("srVAE (simple), gaussian prior", "IW bpd within 0.1 of the VAE's"): True,
        ("srVAE (simple), gaussian prior", "fd below the VAE's"): True,
        ("srVAE (simple), gaussian prior", "SR PSNR >= bicubic + 2 dB"): True,
        ("srVAE (full), gaussian prior", "IW bpd within 0.1 of the VAE's"): False,
        ("srVAE (full), gaussian prior", "fd below the VAE's"): False,
        ("srVAE (full), gaussian prior", "SR PSNR >= bicubic + 2 dB"): False,
        ("srVAE (full), mog prior", "SR PSNR >= bicubic + 2 dB"): True,
    }
    text = results_markdown(rows, ComparisonSettings(budget=TINY))
    assert "+0.090" in text and "**no**" in text


def test_unknown_cells_and_bad_jobs_are_refused_before_anything_is_written(tmp_path):
    settings = ComparisonSettings(budget=TINY)
    with pytest.raises(ConfigError, match="unknown cell 'vae-flow'"):
        run_comparison(settings, tmp_path / "a", cells=["vae-flow"])
    with pytest.raises(ConfigError, match="--jobs must be at least 1"):
        run_comparison(settings, tmp_path / "b", jobs=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_runs_some_cells_in_two_processes(tmp_path, capsys):
    out = tmp_path / "cli"
    code = compare_main([*TINY_FLAGS, "--out", str(out), "--jobs", "2", "--cells", "vae-gaussian,srvae-simple-gaussian"])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    assert [row["cell"] for row in rows] == ["vae-gaussian", "srvae-simple-gaussian"]
    text = (out / "results.md").read_text()
    assert "Not run yet: srvae-full-gaussian, vae-mog, srvae-simple-mog, srvae-full-mog." in text
    assert "outputs in" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--jobs", "0"], "expected a positive integer"),
        (["--cells", "vae-gaussian,nope"], "unknown cell 'nope'"),
        (["--fd-samples", "1"], "expected an integer >= 2"),
        (["--likelihood", "poisson"], "invalid choice"),
    ],
)
def test_cli_refuses_bad_flags_with_exit_2(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        compare_main([*flags, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quick_and_default_budgets_and_overrides():
    parser = build_compare_parser()
    assert compare_settings_from_args(parser.parse_args(["--quick"])).budget == BUDGETS["quick"]
    default = compare_settings_from_args(parser.parse_args([]))
    # The real experiment: IW with K >= 1000 on the whole test set, the whole training set.
    assert default.budget.iw_samples >= 1000 and default.budget.eval_limit is None and default.budget.train_limit is None
    custom = compare_settings_from_args(
        parser.parse_args(["--quick", "--hidden", "16", "--eval-limit", "all", "--likelihood", "dlogistic-mix"])
    )
    assert custom.budget.hidden == 16 and custom.budget.eval_limit is None
    assert custom.budget.epochs == BUDGETS["quick"].epochs and custom.likelihood == "dlogistic-mix"


def test_plot_model_samples_draws_one_panel_per_model(tmp_path):
    images = [torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)]
    path = plot_model_samples(images, ["a", "b"], tmp_path / "s.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="2 sample sets but 1 titles"):
        plot_model_samples(images, ["a"], tmp_path / "t.png")


def test_inception_fid_without_local_weights_is_skipped_with_a_message(grid, tmp_path):
    out, settings, rows = grid
    logged = []
    run_comparison(settings, out, inception_weights=tmp_path / "missing.pth", progress=False, log=logged.append)
    assert any(line.startswith("Inception FID skipped") for line in logged)
    assert all(row["inception_fid"] is None for row in rows)


def test_the_console_command_has_compare(capsys):
    from pyro_srvae.cli import console_main

    with pytest.raises(SystemExit) as exit_info:
        console_main(["compare", "--help"])
    assert exit_info.value.code == 0
    assert "--jobs" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        console_main(["compare", "--cells", "vae-gaussian,nope"])
    assert exit_info.value.code == 2 and "unknown cell 'nope'" in capsys.readouterr().err


def test_the_bits_breakdown_splits_each_elbo_into_its_terms(grid):
    out, _, rows = grid
    breakdown = json.loads((out / "breakdown.json").read_text())
    assert list(breakdown) == CELL_NAMES
    for row in rows:
        parts = breakdown[row["cell"]]
        expected = {"data(x)", "KL(z)", "elbo_bpd"} | ({"data(y)", "KL(u)"} if row["model"] == "srvae" else set())
        assert set(parts) == expected
        assert parts["KL(z)"] > 0 and parts["data(x)"] != 0
        assert parts["elbo_bpd"] == pytest.approx(sum(v for k, v in parts.items() if k != "elbo_bpd") + 8)
        # a one-draw ELBO of the same model and test images: close to the K-draw ELBO of the row
        assert parts["elbo_bpd"] == pytest.approx(row["elbo_bpd"], abs=0.05)
    assert "## Where the bits go" in (out / "results.md").read_text()


def test_fd_seed_spread_script_reports_every_cell(grid, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "fd_seed_spread.py"
    spec = importlib.util.spec_from_file_location("fd_seed_spread", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, settings, rows = grid
    assert ComparisonSettings.load(out) == settings
    assert script.main([str(out), "--seeds", "2"]) == 0
    spread = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(spread) == CELL_NAMES
    for row in rows:
        values = spread[row["cell"]]["values"]
        assert values[0] == pytest.approx(row["fd"], rel=1e-6)  # seed 0 is the row's own fd
        assert values[1] != values[0]

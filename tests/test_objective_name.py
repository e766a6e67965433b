"""The per-epoch training figure is named for the objective it is (``train_objective_bpd`` with its
``train_objective``), not the ELBO: scaled under KL warm-up, the IWAE bound for iwae-dreg, the
free-bits objective. Histories from before the rename (``train_elbo_bpd``) still resume and plot."""

import csv
import json

import pytest

from pyro_srvae import TrainConfig, plots, train
from pyro_srvae.training.checkpoint import load_checkpoint, save_checkpoint
from pyro_srvae.training.objective import objective_name
from pyro_srvae.training.report import summary_table

# Tiny runs: 64 training images, 2 steps an epoch, narrow VAEs, no figures.
FAST = dict(model="vae", train_limit=64, eval_limit=8, batch_size=32, hidden=4, eval_samples=2, figures=False)
QUIET = dict(progress=False, log=lambda *_: None)


@pytest.mark.parametrize(
    "options, names",
    [
        (dict(), ["ELBO (meanfield)"]),
        # Warm-up over 1 epoch: the first epoch's KL weight rises 0 -> 1, the second trains on the ELBO.
        (dict(epochs=2, kl_warmup=1.0), ["ELBO (meanfield) with KL x 0 to 1 (warm-up)", "ELBO (meanfield)"]),
        (dict(elbo="iwae-dreg", num_particles=2), ["IWAE bound K=2 (iwae-dreg)"]),
        (dict(free_bits=0.5), ["free-bits objective (0.5 nats per dim of z; not a bound)"]),
    ],
    ids=["meanfield", "kl-warmup", "iwae-dreg", "free-bits"],
)
def test_each_epoch_record_names_the_objective_it_trained_on(tmp_path, options, names):
    config = TrainConfig(**{"epochs": 1, **FAST, **options})
    lines = []
    result = train(config, out=str(tmp_path), progress=False, log=lines.append)
    epochs = result.metrics["epochs"]
    assert [record["train_objective"] for record in epochs] == names
    assert all("train_elbo_bpd" not in record for record in epochs)
    # metrics.json and metrics.csv carry the same name beside the number.
    saved = json.loads((tmp_path / "metrics.json").read_text())["epochs"]
    assert [record["train_objective"] for record in saved] == names
    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["train_objective"] for row in rows] == names
    recorded = [record["train_objective_bpd"] for record in epochs]
    assert [float(row["train_objective_bpd"]) for row in rows] == pytest.approx(recorded)
    # The printed summary names the last epoch's objective beside its value.
    [row] = [line for line in "\n".join(lines).splitlines() if line.strip().startswith("train objective")]
    assert f"{epochs[-1]['train_objective_bpd']:.4f} bits/dim: minus the {names[-1]}," in row


def test_the_name_spells_out_the_warm_up_span_and_the_bound():
    """Only a plain ELBO estimator at KL weight 1 is called the ELBO; renyi with one particle is the ELBO."""
    config = TrainConfig(epochs=2, kl_warmup=1.0, **FAST)
    assert objective_name(config, 0.0, 0.5) == "ELBO (meanfield) with KL x 0 to 0.5 (warm-up)"
    assert objective_name(config, 0.25, 0.25) == "ELBO (meanfield) with KL x 0.25 (warm-up)"
    assert objective_name(config, 1.0, 1.0) == "ELBO (meanfield)"
    iwae = TrainConfig(elbo="renyi", num_particles=4, **FAST)
    assert objective_name(iwae, 0.5, 1.0) == "IWAE bound K=4 (renyi) with latent log-densities x 0.5 to 1 (warm-up)"
    assert objective_name(TrainConfig(elbo="renyi", num_particles=1, **FAST)) == "ELBO (renyi)"
    assert objective_name(TrainConfig(elbo="meanfield-mog-bound", **FAST)).startswith("eq. (23) bound")


def _as_before_the_rename(record):
    """An epoch record as runs wrote it before train_objective_bpd: the number under train_elbo_bpd, no name."""
    old = {key: value for key, value in record.items() if key not in ("train_objective_bpd", "train_objective")}
    return {"epoch": old.pop("epoch"), "train_elbo_bpd": record["train_objective_bpd"], **old}


def test_a_checkpoint_holding_train_elbo_bpd_resumes_with_the_value_renamed(tmp_path):
    config = TrainConfig(epochs=1, kl_warmup=2.0, **FAST)
    first = train(config, out=str(tmp_path), **QUIET)
    recorded = first.metrics["epochs"][0]["train_objective_bpd"]
    payload = load_checkpoint(first.checkpoint)
    payload["history"]["epochs"] = [_as_before_the_rename(r) for r in payload["history"]["epochs"]]
    save_checkpoint(first.checkpoint, payload)

    resumed = train(resume=first.checkpoint, epochs=2, **QUIET)
    old, new = resumed.metrics["epochs"]
    assert "train_elbo_bpd" not in old and old["train_objective_bpd"] == recorded
    assert old["train_objective"] == "ELBO (meanfield) with KL x 0 to 0.5 (warm-up)"  # rebuilt from its config
    assert new["train_objective"] == "ELBO (meanfield) with KL x 0.5 to 1 (warm-up)"
    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[0]["train_objective_bpd"]) == pytest.approx(recorded)
    assert "train objective" in summary_table(resumed.metrics)


def test_an_old_metrics_history_plots_its_training_curve(tmp_path, monkeypatch):
    figures = []
    save = plots.common.save_figure
    for module in (plots.common, plots.training, plots.uncertainty):
        monkeypatch.setattr(module, "save_figure", lambda fig, path: figures.append(fig) or save(fig, path))
    old = [{"epoch": 1, "train_elbo_bpd": 3.0, "test_elbo_bpd": 3.1}, {"epoch": 2, "train_elbo_bpd": 2.5}]
    plots.plot_loss_curves(old, tmp_path / "old.png")
    [line, _] = figures[0].axes[0].get_lines()
    assert list(line.get_ydata()) == [3.0, 2.5]
    new = [{"epoch": 1, "train_objective_bpd": 3.0, "train_objective": "IWAE bound K=4 (iwae-dreg)"}]
    plots.plot_loss_curves(new, tmp_path / "new.png")
    assert [t.get_text() for t in figures[1].axes[0].get_legend().get_texts()] == ["train: -IWAE bound K=4 (iwae-dreg)"]

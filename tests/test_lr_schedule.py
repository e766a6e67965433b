"""--lr-schedule: the cosine decay's closed form, the rate the optimizer takes, and resumption."""

import math

import pytest
import torch

from pyro_srvae import TrainConfig, train
from pyro_srvae.training.checkpoint import load_checkpoint
from pyro_srvae.cli import main
from pyro_srvae.training.objective import learning_rate, total_steps

FAST = dict(train_limit=128, eval_limit=16, batch_size=32, hidden=4, eval_samples=4, sr_samples=4, figures=False)
QUIET = dict(progress=False, log=lambda *_: None)


def test_cosine_decays_from_lr_to_zero_along_half_a_cosine_and_constant_stays():
    cosine = TrainConfig(lr=4e-3, lr_schedule="cosine")
    steps = 100
    assert learning_rate(cosine, 0, steps) == pytest.approx(4e-3)
    assert learning_rate(cosine, 25, steps) == pytest.approx(4e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert learning_rate(cosine, 50, steps) == pytest.approx(2e-3)
    assert learning_rate(cosine, 100, steps) == pytest.approx(0.0, abs=1e-18)
    rates = [learning_rate(cosine, s, steps) for s in range(steps)]
    assert all(a > b for a, b in zip(rates, rates[1:]))  # strictly down at every step
    constant = TrainConfig(lr=4e-3, lr_schedule="constant")
    assert {learning_rate(constant, s, steps) for s in range(steps)} == {4e-3}


def test_the_schedule_spans_the_epochs_not_an_early_stop():
    config = TrainConfig(epochs=3, max_steps=5)
    assert total_steps(config, batches_per_epoch=4) == 12


def test_the_optimizer_takes_the_scheduled_rate(tmp_path):
    config = TrainConfig(epochs=3, guide="full", lr=4e-3, lr_schedule="cosine", **FAST)
    train(config, out=str(tmp_path), max_steps=7, **QUIET)  # stopped at step 7 of 12 (4 batches an epoch)
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["step"] == 7
    # The last update, the 7th, took the rate after 6 steps of 12: half a cosine from 4e-3 at 6/12.
    rates = [group["lr"] for group in payload["optimizer_state"]["param_groups"]]
    assert rates == [pytest.approx(4e-3 * 0.5 * (1 + math.cos(math.pi * 6 / 12)))] * len(rates)


def test_a_cosine_run_stopped_and_resumed_matches_the_uninterrupted_one(tmp_path):
    config = TrainConfig(epochs=3, guide="full", lr_schedule="cosine", **FAST)
    whole = train(config, out=str(tmp_path / "whole"), **QUIET)
    first = train(config, out=str(tmp_path / "split"), max_steps=6, **QUIET)
    resumed = train(resume=first.checkpoint, max_steps=None, **QUIET)
    for name, value in whole.model.state_dict().items():
        assert torch.allclose(value, resumed.model.state_dict()[name], atol=1e-6), name
    constant = train(TrainConfig(epochs=3, guide="full", **FAST), out=str(tmp_path / "constant"), **QUIET)
    moved = [not torch.allclose(v, constant.model.state_dict()[k], atol=1e-6) for k, v in whole.model.state_dict().items()]
    assert any(moved)  # the schedule changed the updates


def test_a_configuration_stored_before_the_schedules_keeps_its_rate_constant():
    stored = {k: v for k, v in TrainConfig(recipe="named", lr=1e-3).to_dict().items() if k != "lr_schedule"}
    assert TrainConfig.from_dict(stored).lr_schedule == "constant"


def test_an_unknown_schedule_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--lr-schedule", "step", "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--lr-schedule" in err and "invalid choice" in err and "Traceback" not in err

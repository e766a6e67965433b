"""The update guard (UpdateGuard): a step whose gradient norm is not finite or far above
its recent history is skipped, counted and reported, and too many in a row stop the run."""

import json
import math

import pytest
import torch

from pyro_srvae import SRVAE, TrainConfig, make_elbo, train
from pyro_srvae.training import loop, objective, report
from pyro_srvae.training.checkpoint import load_checkpoint, save_checkpoint
from pyro_srvae.cli import main
from pyro_srvae.training.tensorboard import NullBoard, TrainingBoard, tensorboard_missing
from pyro_srvae.training.guard import GUARD_WARMUP, TrainingDiverged, UpdateGuard
from pyro_srvae.training.objective import make_optimizer, training_mode, training_step  # fmt: skip
from conftest import tiny_images

# 12 steps an epoch of 8 images, narrow networks, a small evaluation: a run takes a second or two.
TINY = dict(train_limit=96, batch_size=8, eval_limit=8, hidden=4, eval_samples=2, sr_samples=2, figures=False)
QUIET = dict(progress=False, log=lambda *_: None)
# Pyro warns of the NaN losses the tests feed on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Encountered NaN")


# -- the rule, on synthetic gradient norms ------------------------------------------------


def _decisions(guard, norms):
    return [bool(guard.decide(torch.tensor(float(norm)), step)) for step, norm in enumerate(norms, start=1)]


def test_the_guard_skips_the_spikes_of_a_noisy_series_and_no_ordinary_step():
    generator = torch.Generator().manual_seed(0)
    # Ordinary norms vary by a factor of ~3 either way (log-normal, sigma 0.5) and drift down 10x.
    norms = (torch.randn(300, generator=generator) * 0.5).exp() * torch.logspace(5, 4, 300)
    spikes = {40: 50.0, 41: 200.0, 150: 30.0, 299: 1e4}
    for step, factor in spikes.items():
        norms[step - 1] *= factor
    guard = UpdateGuard(factor=10, max_consecutive=20)
    taken = _decisions(guard, norms.tolist())
    assert [step for step, ok in enumerate(taken, start=1) if not ok] == sorted(spikes)
    counts = guard.counts()
    assert counts["skipped"] == len(spikes) and counts["nonfinite"] == 0 and counts["stuck"] is None
    # The window holds the last 64 norms taken: its median is theirs, the spikes left out.
    kept = [norm for step, norm in enumerate(norms.tolist(), start=1) if step not in spikes][-64:]
    assert counts["median"] == pytest.approx(sorted(kept)[31], rel=1e-6)  # the lower median of 64


def test_a_burst_of_spikes_does_not_raise_the_bar():
    guard = UpdateGuard(factor=10, max_consecutive=1000, rescue_after=math.inf)
    taken = _decisions(guard, [1.0] * 64 + [100.0] * 64 + [1.0])
    assert taken == [True] * 64 + [False] * 64 + [True]  # skipped norms never enter the window
    assert guard.counts()["median"] == 1.0


def test_after_three_skips_in_a_row_a_large_step_is_taken_clipped_to_the_threshold():
    # Large gradients that last are the parameters' (seed 2 of the photographs, docs/training-faults.md):
    # skipping forever froze them, so every fourth is taken, scaled to the threshold, and enters the window.
    guard = UpdateGuard(factor=10, max_consecutive=20)
    decisions = []
    for step, norm in enumerate([1.0] * 64 + [100.0] * 8 + [1.0], start=1):
        decisions.append((bool(guard.decide(torch.tensor(norm), step)), float(guard.clip_scale)))
    assert decisions[:64] == [(True, 1.0)] * 64
    assert decisions[64:] == [(False, 1.0)] * 3 + [(True, pytest.approx(0.1))] + [(False, 1.0)] * 3 + [
        (True, pytest.approx(0.1)), (True, 1.0)]  # 10 x the median 1 over a norm of 100
    counts = guard.counts()
    assert (counts["skipped"], counts["rescued"], counts["consecutive"], counts["stuck"]) == (6, 2, 0, None)
    assert sorted(guard.norms.tolist())[-2:] == [100.0, 100.0]  # the raw norms of the two taken
    # A lone spike is still skipped, and non-finite norms are never taken, however many in a row.
    assert _decisions(guard, [100.0, 1.0]) == [False, True]
    assert _decisions(guard, [math.nan] * 5) == [False] * 5 and guard.counts()["rescued"] == 2


def test_in_the_warm_up_only_non_finite_norms_are_skipped():
    guard = UpdateGuard(factor=10, max_consecutive=20)
    norms = [1.0, 1e6, math.nan, math.inf] + [1.0] * (GUARD_WARMUP - 2) + [1e6]
    taken = _decisions(guard, norms)
    # Before GUARD_WARMUP norms are in, a huge norm passes and NaN/inf do not; after, the huge one is skipped.
    assert taken == [True, True, False, False] + [True] * (GUARD_WARMUP - 2) + [False]
    assert guard.counts()["nonfinite"] == 2


def test_the_guard_stops_after_max_consecutive_skips_in_a_row_not_before():
    guard = UpdateGuard(factor=10, max_consecutive=5, rescue_after=10)  # no step taken clipped before the limit
    _decisions(guard, [1.0] * 10 + [100.0] * 4 + [1.0] + [100.0] * 4)  # two runs of 4: below the limit
    assert guard.counts()["stuck"] is None and guard.counts()["consecutive"] == 4
    guard.decide(torch.tensor(100.0), 20)  # the fifth in a row
    counts = guard.counts()
    assert counts["stuck"] == (20, 100.0, pytest.approx(10.0))  # step, norm, threshold = 10 x median 1
    with pytest.raises(TrainingDiverged) as error:
        guard.stop_if_stuck(counts, "runs/x/checkpoint.pt")  # a run that wrote no checkpoint yet
    message = str(error.value)
    assert "\n" not in message and "5 updates in a row skipped by step 20" in message
    assert "threshold 10 = 10 x the median" in message and "no checkpoint was written yet" in message


def test_adaptive_clipping_scales_a_large_norm_down_to_the_factor_times_the_median_and_no_other():
    guard = UpdateGuard(factor=10, max_consecutive=20, clip_factor=2.5)
    scales = []
    # The median of 20 norms [1, 2] x 10 is 1 (torch's lower median); with the 4 taken it is 2.
    for step, norm in enumerate([1.0, 2.0] * 10 + [4.0, 30.0, 2.0, 1.0], start=1):
        taken = bool(guard.decide(torch.tensor(norm), step))
        scales.append((norm, taken, float(guard.clip_scale)))
    assert scales[:20] == [(n, True, 1.0) for n in [1.0, 2.0] * 10]  # ordinary steps: scaled by exactly 1
    assert scales[20] == (4.0, True, pytest.approx(2.5 / 4.0))  # clipped to 2.5 x the median
    assert scales[21][:2] == (30.0, False)  # a spike above 10 x the median is still skipped
    assert scales[22:] == [(2.0, True, 1.0), (1.0, True, 1.0)]
    counts = guard.counts()
    assert (counts["clipped"], counts["skipped"]) == (1, 1)
    assert UpdateGuard(factor=10, max_consecutive=20).enabled and UpdateGuard(0, 20, clip_factor=3).enabled


def test_a_clipped_step_applies_the_gradient_scaled_to_the_threshold():
    torch.manual_seed(0)
    model = SRVAE((1, 8, 8), hidden=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    elbo, x = make_elbo("meanfield"), tiny_images(4)
    guard = UpdateGuard(factor=10, max_consecutive=20, clip_factor=2.5)
    with training_mode(model, elbo):
        training_step(model, optimizer, elbo, x, guard=guard, step=1)  # warm the window on this model's norm
        norm = float(torch.nanmedian(guard.norms))
        guard.load_state_dict({"norms": [norm / 5.0] * 64})  # the history: a fifth of this norm, so 5 x the median
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        torch.manual_seed(1)
        training_step(model, optimizer, elbo, x, guard=guard, step=2)
        scale = float(guard.clip_scale)
    assert bool(guard.taken) and scale < 0.9  # this draw's norm is near the last one's: 5 x the median
    # SGD moved each parameter by lr x the clipped gradient: its norm is 2.5 x the median exactly.
    step = torch.cat([(before[name] - p.detach()).flatten() for name, p in model.named_parameters()]) / 1e-3
    assert float(step.norm()) == pytest.approx(2.5 * norm / 5.0, rel=1e-4)


def test_a_step_taken_after_three_skips_applies_the_gradient_scaled_to_the_threshold():
    torch.manual_seed(0)
    model = SRVAE((1, 8, 8), hidden=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    elbo, x = make_elbo("meanfield"), tiny_images(4)
    guard = UpdateGuard(factor=10, max_consecutive=20)
    with training_mode(model, elbo):
        training_step(model, optimizer, elbo, x, guard=guard, step=1)
        norm = float(torch.nanmedian(guard.norms))
        guard.load_state_dict({"norms": [norm / 50.0] * 64, "consecutive": 3})  # 50 x the median, 3 skipped before
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        torch.manual_seed(1)
        training_step(model, optimizer, elbo, x, guard=guard, step=2)
    assert bool(guard.taken) and guard.counts()["rescued"] == 1
    # SGD moved each parameter by lr x the gradient scaled to the threshold: 10 x the median.
    step = torch.cat([(before[name] - p.detach()).flatten() for name, p in model.named_parameters()]) / 1e-3
    assert float(step.norm()) == pytest.approx(10 * norm / 50.0, rel=1e-3)


# -- (a) a skipped step leaves the parameters and Adam's state as they were -----------------


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adam-on-device", "plain-adam-host-sync"])
def test_a_non_finite_gradient_changes_neither_the_parameters_nor_adams_state(fused):
    torch.manual_seed(0)
    model = SRVAE((1, 8, 8), hidden=4)
    optimizer = make_optimizer(model, 4e-3) if fused else torch.optim.Adam(model.parameters(), lr=4e-3)
    assert getattr(optimizer, "_step_supports_amp_scaling", False) == fused
    elbo, guard, x = make_elbo("meanfield"), UpdateGuard(factor=10, max_consecutive=20), tiny_images(4)
    with training_mode(model, elbo):  # as train() runs it: no input checks, NaN flows through
        training_step(model, optimizer, elbo, x, guard=guard, step=1)  # Adam's state exists from here
        parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
        state = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in model.named_parameters()}
        loss = training_step(model, optimizer, elbo, torch.full_like(x, math.nan), guard=guard, step=2)
    assert not torch.isfinite(loss) and not bool(guard.taken)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), parameters[name]), name
        for key, value in optimizer.state[p].items():  # exp_avg, exp_avg_sq and the step count
            assert torch.equal(value, state[name][key]), (name, key)
    assert guard.counts()["skipped"] == 1 and guard.counts()["nonfinite"] == 1
    with training_mode(model, elbo):  # and the next good step is taken
        training_step(model, optimizer, elbo, x, guard=guard, step=3)
    assert bool(guard.taken)
    assert not all(torch.equal(p.detach(), parameters[name]) for name, p in model.named_parameters())


# -- (b) an injected spike is skipped; a run without one is the unguarded run ----------------


def inject_spikes(monkeypatch, steps, scale=1e6):
    """Scale the loss (so its gradients) by ``scale`` at the given steps of this process's training
    calls, and record the parameters at every step: ``record[step]`` is the state the step started from."""
    real = objective.DataParallelElbo.loss_and_backward
    record = {"calls": 0, "start": {}}

    def spiking(self, x, kl_scale=1.0):
        record["calls"] += 1
        record["start"][record["calls"]] = [p.detach().clone() for p in self.vae.parameters()]
        loss = real(self, x, kl_scale)
        if record["calls"] in steps:
            for p in self.vae.parameters():
                p.grad.mul_(scale)
            loss = loss * scale
        return loss

    monkeypatch.setattr(objective.DataParallelElbo, "loss_and_backward", spiking)
    return record


def test_an_injected_spike_is_skipped_and_counted(tmp_path, monkeypatch):
    record = inject_spikes(monkeypatch, steps={10})
    result = train(TrainConfig(max_steps=12, **TINY), out=str(tmp_path), **QUIET)
    assert result.metrics["skipped_updates"] == 1 and result.metrics["skipped_nonfinite_updates"] == 0
    # Step 10's update was skipped: step 11 started from the parameters step 10 started from ...
    assert all(torch.equal(a, b) for a, b in zip(record["start"][10], record["start"][11]))
    # ... while every other step moved them.
    assert not all(torch.equal(a, b) for a, b in zip(record["start"][9], record["start"][10]))
    # The running loss leaves the skipped step out: no 1e6-times loss in the record.
    assert all(bpd < 100 for _, bpd in result.metrics["steps"])


def test_without_a_spike_the_guarded_run_is_the_unguarded_run(tmp_path):
    guarded = train(TrainConfig(max_steps=12, **TINY), out=str(tmp_path / "guarded"), **QUIET)
    unguarded = train(TrainConfig(max_steps=12, skip_factor=0, **TINY), out=str(tmp_path / "off"), **QUIET)
    assert guarded.metrics["skipped_updates"] == 0
    assert guarded.metrics["gradient_norm_median"] > 0  # the guard did look at every step
    off_state = unguarded.model.state_dict()
    for name, value in guarded.model.state_dict().items():
        assert torch.equal(value, off_state[name]), name  # bit for bit
    assert guarded.metrics["steps"] == unguarded.metrics["steps"]
    assert guarded.metrics["test"]["elbo_bpd"] == unguarded.metrics["test"]["elbo_bpd"]


# -- (c) too many skips in a row stop the run with one line ---------------------------------


def poison_inputs(monkeypatch, from_call, to_call=math.inf):
    """NaN images in the training batches ``from_call`` to ``to_call`` (counted from 1)."""
    calls = {"n": 0}
    real = loop.dequantize

    def poisoned(images, *args, **kwargs):
        calls["n"] += 1
        x = real(images, *args, **kwargs)
        return torch.full_like(x, math.nan) if from_call <= calls["n"] <= to_call else x

    monkeypatch.setattr(loop, "dequantize", poisoned)


def test_a_batch_with_a_non_finite_loss_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch):
    poison_inputs(monkeypatch, from_call=10, to_call=10)
    result = train(TrainConfig(max_steps=12, **TINY), out=str(tmp_path), **QUIET)  # no TrainingDiverged
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["skipped_updates"] == 1 and metrics["skipped_nonfinite_updates"] == 1
    assert all(math.isfinite(bpd) for _, bpd in metrics["steps"])  # the NaN loss is left out of the record
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values())
    row = next(line for line in report.summary_table(metrics).splitlines() if "skipped updates" in line)
    assert "1 of 12 steps: 1 with a non-finite gradient, 0 with a gradient norm above 10 x the median" in row


def test_an_epoch_whose_every_step_was_skipped_records_no_training_loss(tmp_path, monkeypatch):
    poison_inputs(monkeypatch, from_call=5, to_call=8)  # the 4 steps of epoch 2
    config = TrainConfig(epochs=3, **dict(TINY, train_limit=32))
    result = train(config, out=str(tmp_path), **QUIET)
    assert [record["train_objective_bpd"] is None for record in result.metrics["epochs"]] == [False, True, False]
    assert result.metrics["skipped_nonfinite_updates"] == 4 and result.metrics["epochs"][-1]["step"] == 12


def test_too_many_skips_in_a_row_stop_with_one_line_and_keep_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    poison_inputs(monkeypatch, from_call=3)
    flags = ["--train-limit", "96", "--batch-size", "8", "--eval-limit", "8", "--hidden", "4", "--eval-samples", "2",
             "--sr-samples", "2", "--no-figures", "--quiet", "--max-consecutive-skips", "3", "--checkpoint-every", "2",
             "--out", str(tmp_path)]  # fmt: skip
    assert main(flags) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: ") and "Traceback" not in error
    # Steps 3, 4, 5 skipped (NaN gradients): stopped at the sync after step 5, before checkpointing step 6.
    assert "3 updates in a row skipped by step 5 (gradient norm nan" in error
    assert f"the last good checkpoint is {tmp_path / 'checkpoint.pt'}" in error
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["step"] == 4 and checkpoint["update_guard"]["nonfinite"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["model_state"].values())


# -- (d) the counts reach metrics.json, the board, and survive a resume -----------------------


class RecordingBoard(NullBoard):
    def __init__(self):
        self.skips = []

    def skipped_updates(self, step, skipped, nonfinite):
        self.skips.append((step, skipped, nonfinite))


def test_the_counts_reach_metrics_json_and_the_board_and_survive_a_resume(tmp_path, monkeypatch):
    boards = []
    monkeypatch.setattr(loop, "open_board", lambda *args, **kwargs: boards.append(RecordingBoard()) or boards[-1])
    inject_spikes(monkeypatch, steps={10})
    first = train(TrainConfig(max_steps=12, **TINY), out=str(tmp_path), **QUIET)
    assert first.metrics["skipped_updates"] == 1
    assert (12, 1, 0) in boards[-1].skips  # the board's count at the last sync
    # The resumed session's first steps are 13, 14, ...: a spike at its 2nd step is step 14. It is
    # skipped only because the window of norms came back from the checkpoint: a fresh guard would
    # still be in its warm-up and take it.
    inject_spikes(monkeypatch, steps={2})
    resumed = train(resume=first.checkpoint, max_steps=16, **QUIET)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["skipped_updates"] == 2 and metrics["skipped_nonfinite_updates"] == 0
    assert resumed.metrics["epochs"][-1]["step"] == 16
    assert load_checkpoint(tmp_path / "checkpoint.pt")["update_guard"]["skipped"] == 2


@pytest.mark.skipif(tensorboard_missing() is not None, reason="needs the tensorboard extra")
def test_the_board_writes_the_counts_as_scalars(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    board = TrainingBoard(tmp_path)
    board.skipped_updates(10, 0, 0)
    board.skipped_updates(20, 3, 1)
    board.close()
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    for tag, values in (("train/skipped_updates", [0, 3]), ("train/skipped_nonfinite_updates", [0, 1])):
        assert [(e.step, e.value) for e in events.Scalars(tag)] == list(zip([10, 20], values))


def test_a_checkpoint_from_before_the_guard_resumes_with_a_fresh_one(tmp_path):
    first = train(TrainConfig(max_steps=4, **TINY), out=str(tmp_path), **QUIET)
    payload = load_checkpoint(first.checkpoint)
    del payload["update_guard"]
    del payload["config"]["skip_factor"], payload["config"]["max_consecutive_skips"]
    save_checkpoint(first.checkpoint, payload)
    resumed = train(resume=first.checkpoint, max_steps=8, **QUIET)
    assert resumed.metrics["skipped_updates"] == 0 and resumed.metrics["config"]["skip_factor"] == 10
    # Its window holds the 4 norms of the resumed session only.
    assert len(load_checkpoint(first.checkpoint)["update_guard"]["norms"]) == 4


# -- (e) bad flags: one line -----------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--skip-factor", "0.5"], "--skip-factor must be 0 (no update guard) or a number above 1, got 0.5"),
        (["--skip-factor", "nan"], "--skip-factor must be 0 (no update guard) or a number above 1, got nan"),
        (["--max-consecutive-skips", "0"], "--max-consecutive-skips must be a positive integer, got 0"),
        (["--clip-factor", "1"], "--clip-factor must be 0 (no adaptive clipping) or a number above 1, got 1.0"),
        (["--clip-factor", "3", "--clip-norm", "1e5"], "--clip-factor and --clip-norm both clip the gradient: give one (--clip-factor 0 turns it off)"),
    ],
)
def test_bad_guard_flags_exit_2_with_one_line(capsys, flags, reason):
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and error_lines[0].endswith(reason)

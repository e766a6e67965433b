"""The benchmarks run, and their correctness cross-check holds: Pyro's loss equals the hand-written ELBO.

Only behaviour is asserted here; the timings the scripts print belong to the benchmarks.
"""

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import eval_time  # noqa: E402
import photo_sr  # noqa: E402
import step_time  # noqa: E402
from common import benchmark_images  # noqa: E402

from pyro_srvae import evaluate_model  # noqa: E402
from pyro_srvae.training.config import TrainConfig  # noqa: E402
from pyro_srvae.training.factory import build_model  # noqa: E402


def _json_records(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_step_benchmark_losses_match_the_hand_written_elbo(capsys):
    step_time.main(["--steps", "3", "--warmup", "0", "--batch-size", "8", "--hidden", "4", "--json", "--device", "cpu"])
    records = _json_records(capsys)
    assert len(records) == 12  # 3 variants x 2 priors x 2 ELBOs
    assert {(r["model"], r["guide"], r["prior"], r["elbo"]) for r in records} == {
        (m, g, p, e) for m, g in step_time.VARIANTS for p in step_time.PRIORS for e in step_time.ELBOS
    }
    for record in records:
        assert record["loss_match"], record
        assert record["pyro_ms"] > 0 and record["torch_ms"] > 0
        # The ratio is the median of the 3 paired ratios, with its interval (the min and max, at 3 pairs).
        assert record["pairs"] == 3 and 0 < record["ratio_low"] <= record["ratio"] <= record["ratio_high"]
        assert record["ratio_coverage"] == pytest.approx(0.75)  # 1 - 2^(1-3): too few pairs for 95%
        assert math.isfinite(record["overhead_ms"])
        assert record["images_per_s"] == pytest.approx(8 / (record["pyro_ms"] / 1000), rel=1e-2)


def test_steps_alternate_in_pairs_with_the_first_member_alternating(monkeypatch):
    clock, calls = [0.0], []

    def fake_step(name, seconds):
        def step(x):
            calls.append(name)
            clock[0] += seconds(len(calls))

        return step

    monkeypatch.setattr(step_time.time, "perf_counter", lambda: clock[0])
    # Each call lasts as long as its own call number (ms), so a time tells which call it was.
    pyro_step, torch_step = fake_step("pyro", lambda n: n / 1000), fake_step("torch", lambda n: n / 1000)
    args = argparse.Namespace(warmup=1, steps=4)
    pyro_times, torch_times = step_time._alternate(pyro_step, torch_step, [None], args, torch.device("cpu"))
    assert calls == ["pyro", "torch", "torch", "pyro", "pyro", "torch", "torch", "pyro", "pyro", "torch"]
    # Timed pairs 1..4 (after one warm-up pair): calls 3-4, 5-6, 7-8, 9-10, each pair's two members together.
    assert [round(1000 * t) for t in pyro_times] == [4, 5, 8, 9]
    assert [round(1000 * t) for t in torch_times] == [3, 6, 7, 10]


def test_median_interval_uses_the_binomial_order_statistics():
    values = [float(v) for v in range(1, 41)][::-1]  # 1..40, unsorted
    median, low, high, coverage = step_time.median_interval(values)
    # Binomial(40, 1/2): P(B <= 13) = 0.019 <= 0.025 < P(B <= 14) = 0.040, so ranks 14 and 27.
    assert (median, low, high) == (20.5, 14.0, 27.0)
    assert coverage == pytest.approx(1 - 2 * sum(math.comb(40, i) for i in range(14)) / 2**40)
    assert coverage == pytest.approx(0.9615, abs=1e-4)
    # n = 10: P(B <= 1) = 11/1024 <= 0.025 < P(B <= 2) = 56/1024: ranks 2 and 9.
    assert step_time.median_interval(range(1, 11))[1:3] == (2, 9)
    # n = 6 is the smallest n with a 95% interval: the range, P(B = 0) = 1/64 <= 0.025.
    assert step_time.median_interval([3, 1, 2, 6, 5, 4]) == (3.5, 1, 6, pytest.approx(1 - 2 / 64))
    # n = 5 has none: the range, with its coverage below 95%.
    median, low, high, coverage = step_time.median_interval([5, 1, 4, 2, 3])
    assert (median, low, high) == (3, 1, 5) and coverage == pytest.approx(1 - 2 / 32) and coverage < 0.95
    assert step_time.median_interval([7.0]) == (7.0, 7.0, 7.0, 0.0)


def test_paired_ratio_ignores_one_outlier_step():
    torch_times = [0.010 + 0.0001 * i for i in range(41)]
    pyro_times = [1.1 * t for t in torch_times]
    pyro_times[7] *= 100  # one pyro step caught by a 100x stall
    summary = step_time.paired_ratio_summary(pyro_times, torch_times)
    assert summary["ratio"] == pytest.approx(1.1)
    assert summary["ratio_low"] == pytest.approx(1.1) and summary["ratio_high"] == pytest.approx(1.1)
    assert summary["pairs"] == 41
    # Each side's own median, and the median paired difference 0.1 t, move up by one rank (pair 21).
    assert summary["torch_ms"] == pytest.approx(12.0)
    assert summary["pyro_ms"] == pytest.approx(1.1 * 12.1)
    assert summary["overhead_ms"] == pytest.approx(0.1 * 12.1)


def test_paired_ratio_holds_through_a_slow_phase_that_the_ratio_of_medians_does_not():
    """The machine slows down 2x in the middle of pair 20 (after its pyro step) and stays slow.

    Every pair's ratio is 1.1 but pair 20's (pyro fast, torch slow). The separate medians
    land on opposite sides of the slowdown: torch's among the slow steps (21 of 41 are slow),
    pyro's among the fast ones (21 of 41 are fast), and their ratio is 0.55.
    """
    slow = [1.0] * 20 + [2.0] * 21  # the torch steps: pair 20's ran after the slowdown
    torch_times = [0.010 * s for s in slow]
    pyro_times = [0.011 * s for s in slow[:20]] + [0.011] + [0.011 * s for s in slow[21:]]
    ratio_of_medians = statistics.median(pyro_times) / statistics.median(torch_times)
    assert ratio_of_medians == pytest.approx(0.55)  # what the old statistic reported
    summary = step_time.paired_ratio_summary(pyro_times, torch_times)
    assert summary["ratio"] == pytest.approx(1.1)
    assert summary["ratio_low"] == pytest.approx(1.1) and summary["ratio_high"] == pytest.approx(1.1)
    assert summary["pyro_ms"] / summary["torch_ms"] == pytest.approx(0.55)  # per-side medians, as reported


def test_paired_ratio_interval_brackets_spread_ratios():
    ratios = [1.0 + 0.01 * i for i in range(40)]  # 1.00 .. 1.39
    torch_times = [0.02 + 0.001 * ((7 * i) % 40) for i in range(40)]  # scrambled, so pairs matter
    pyro_times = [r * t for r, t in zip(ratios, torch_times)]
    summary = step_time.paired_ratio_summary(pyro_times, torch_times)
    assert summary["ratio"] == pytest.approx(1.195)  # median of 1.00 .. 1.39
    assert summary["ratio_low"] == pytest.approx(1.13) and summary["ratio_high"] == pytest.approx(1.26)  # ranks 14, 27
    assert summary["ratio_coverage"] >= 0.95
    differences = sorted(1000 * (p - t) for p, t in zip(pyro_times, torch_times))
    assert summary["overhead_ms"] == pytest.approx((differences[19] + differences[20]) / 2)
    with pytest.raises(ValueError):
        step_time.paired_ratio_summary(pyro_times, torch_times[:-1])


def test_eval_benchmark_reports_the_bound_it_timed_and_its_throughput(capsys):
    """Each record's iw_bpd is that of the model it timed (the seeded untrained model, K = 8, the
    benchmark's images), and images_per_s is its images over its seconds."""
    eval_time.main(["--num-images", "2", "--samples", "8", "--hidden", "4", "--json", "--device", "cpu"])
    records = _json_records(capsys)
    assert [(r["model"], r["guide"]) for r in records] == [("vae", None), ("srvae", "simple"), ("srvae", "full")]
    images = benchmark_images(2, split="test")
    for record, (model_name, guide) in zip(records, eval_time.VARIANTS):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = build_model(TrainConfig(model=model_name, guide=guide, hidden=4), images.shape[1:])
        timed = evaluate_model(model, images, elbo_samples=8, iw_samples=8, batch_size=2, super_resolution=False)
        assert record["iw_samples"] == 8 and record["iw_bpd"] == pytest.approx(timed["iw_bpd"], abs=1e-4), record
        seconds = record["seconds"]  # rounded to a millisecond, images_per_s to a hundredth
        assert 2 / (seconds + 5e-4) - 5e-3 <= record["images_per_s"] <= 2 / (seconds - 5e-4) + 5e-3, record


def test_step_benchmark_runs_the_cifar_shaped_densenet_in_bf16(capsys):
    step_time.main([
        "--steps", "1", "--warmup", "0", "--batch-size", "4", "--hidden", "4", "--json", "--device", "cpu",
        "--arch", "densenet", "--shape", "3,8,8", "--precision", "bf16",
    ])  # fmt: skip
    records = _json_records(capsys)
    assert len(records) == 12
    for record in records:
        assert record["image_shape"] == [3, 8, 8] and record["arch"] == "densenet" and record["precision"] == "bf16"
        assert record["loss_match"], record  # the cross-check itself runs in float32


def test_eval_benchmark_compares_layouts_in_one_run(capsys):
    eval_time.main(["--num-images", "2", "--samples", "4", "--hidden", "4", "--json", "--device", "cpu",
                    "--compare-layouts", "--shape", "3,8,8"])  # fmt: skip
    records = _json_records(capsys)
    for record in records:
        assert record["nchw_seconds"] > 0 and record["channels_last_seconds"] > 0
        assert record["channels_last_speedup"] == pytest.approx(
            record["nchw_seconds"] / record["channels_last_seconds"], rel=1e-2
        )


@pytest.mark.parametrize("script", [step_time, eval_time])
def test_benchmarks_refuse_a_bad_shape(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--shape", "3,32"])
    assert exit_info.value.code == 2 and "C,H,W" in capsys.readouterr().err


def test_optimizer_benchmark_times_the_three_adams(capsys):
    import optimizer_time

    optimizer_time.main(["--steps", "3", "--hidden", "4", "--device", "cpu", "--json"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["tensors"] > 10 and record["parameters"] > 0
    assert record["fused_speedup"] == pytest.approx(record["loop_ms"] / record["fused_ms"], rel=1e-2)


def test_a_photograph_stored_nearest_upsampled_is_scored_at_its_own_resolution(tmp_path):
    """skimage's moon is a 256x256 photograph stored with every 2x2 block constant: scored at 512x512,
    y = A x would be the photograph itself and nearest upsampling exact; photo_sr scores its block means."""
    from PIL import Image

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(5, 7), dtype=np.uint8)
    Image.fromarray(np.kron(small, np.ones((2, 2), dtype=np.uint8))).save(tmp_path / "blocky.png")
    x, stored_upsampled = photo_sr.scored_photograph(tmp_path / "blocky.png")
    assert stored_upsampled and x.shape == (1, 1, 4, 6)  # 5x7 at its own resolution, cut to even sizes
    assert torch.equal(x[0, 0], torch.from_numpy((small[:4, :6] + 0.5) / 256).float())
    Image.fromarray(rng.integers(0, 256, size=(10, 15), dtype=np.uint8)).save(tmp_path / "plain.png")
    x, stored_upsampled = photo_sr.scored_photograph(tmp_path / "plain.png")
    assert not stored_upsampled and x.shape == (1, 1, 10, 14)


def test_elu_benchmark_compares_the_same_model_with_torch_s_elu(capsys):
    import elu_time

    from pyro_srvae import make_elbo
    from pyro_srvae.model import networks
    from pyro_srvae.data.batching import dequantize
    from pyro_srvae.training.config import TrainConfig
    from pyro_srvae.training.factory import build_model
    from pyro_srvae.training.objective import training_mode

    torch.manual_seed(0)
    model = build_model(TrainConfig(guide="full", sr_arch="densenet", hidden=4, sr_hidden=4), (1, 8, 8))
    copied = elu_time.with_torch_elu(model)
    assert not any(isinstance(m, networks.ELU) for m in copied.modules())
    x = dequantize(torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8))
    elbo = make_elbo("meanfield")
    losses = []
    for each in (model, copied):
        with training_mode(each, elbo):
            pyro.set_rng_seed(1)
            losses.append(elbo.differentiable_loss(each.model, each.guide, x).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    elu_time.main(["--steps", "1", "--hidden", "4", "--sr-hidden", "4", "--shape", "1,8,8", "--batch-size", "2", "--eval-batch", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert sum("ratio" in line for line in lines) == 4, lines
    x = torch.randn(2, 64, 32, 32)
    assert torch.equal(elu_time.PreviousExpELU.apply(x), networks._ExpELU.apply(x))


def test_the_ssim_benchmark_times_two_equal_ssims(capsys):
    import ssim_time

    ssim_time.main(["--shape", "4,3,14,14", "--pairs", "2"])
    out = capsys.readouterr().out
    assert "window 7" in out and "ratio" in out
    assert float(out.rsplit("largest difference", 1)[1]) < 1e-6

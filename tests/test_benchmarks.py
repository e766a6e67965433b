"""The benchmarks run, and their correctness cross-check holds: Pyro's loss equals the hand-written ELBO.

Only behaviour is asserted here; the timings the scripts print belong to the benchmarks.
"""

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import eval_time  # noqa: E402
import step_time  # noqa: E402


def _json_records(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_step_benchmark_losses_match_the_hand_written_elbo(capsys):
    step_time.main(["--steps", "1", "--warmup", "0", "--batch-size", "8", "--hidden", "4", "--json", "--device", "cpu"])
    records = _json_records(capsys)
    assert len(records) == 12  # 3 variants x 2 priors x 2 ELBOs
    assert {(r["model"], r["guide"], r["prior"], r["elbo"]) for r in records} == {
        (m, g, p, e) for m, g in step_time.VARIANTS for p in step_time.PRIORS for e in step_time.ELBOS
    }
    for record in records:
        assert record["loss_match"], record
        assert record["pyro_ms"] > 0 and record["torch_ms"] > 0
        assert record["ratio"] == pytest.approx(record["pyro_ms"] / record["torch_ms"], rel=1e-2)


def test_eval_benchmark_reports_throughput(capsys):
    eval_time.main(["--num-images", "2", "--samples", "8", "--hidden", "4", "--json", "--device", "cpu"])
    records = _json_records(capsys)
    assert [r["model"] for r in records] == ["vae", "srvae", "srvae"]
    for record in records:
        assert record["iw_samples"] == 8 and record["images_per_s"] > 0 and record["iw_bpd"] > 0


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

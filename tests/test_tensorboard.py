"""--tensorboard: the event files of a run, read back with TensorBoard's EventAccumulator."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from pyro_srvae import TrainConfig, train
from pyro_srvae.cli import main
from pyro_srvae.training.tensorboard import INSTALL_HINT, NullBoard, TrainingBoard
from pyro_srvae.training.config import ConfigError
from pyro_srvae.training.loop import _open_board

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
plugin_data_pb2 = pytest.importorskip("tensorboard.plugins.hparams.plugin_data_pb2")

# 96 images in batches of 8: 12 steps an epoch, so the loop syncs (and logs the loss) at
# steps 10 and 12 of the first epoch, 22 and 24 of the second.
FAST = dict(train_limit=96, batch_size=8, eval_limit=16, hidden=4, eval_samples=4, sr_samples=4, figures=False)
FAST_FLAGS = [
    "--train-limit", "96", "--batch-size", "8", "--eval-limit", "16", "--hidden", "4",
    "--eval-samples", "4", "--sr-samples", "4", "--no-figures", "--quiet",
]  # fmt: skip
QUIET = dict(progress=False, log=lambda *_: None)
SRVAE_TERMS = ["log_p_u", "log_p_y", "log_p_z", "log_p_x", "minus_log_q_u", "minus_log_q_z"]
EPOCH_SCALARS = ["train/objective_bpd", "test/elbo_bpd", "train/kl_scale", "gamma/x"]


def read_events(out_dir):
    """The events of a run whose output directory is ``out_dir``."""
    return read_events_dir(out_dir / "tensorboard")


def read_events_dir(log_dir):
    accumulator = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def session_hparams(events):
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    return plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams


def assert_loss_is_the_history(events, history_steps):
    """``train/loss_bpd`` holds the loop's syncs, ``metrics.json``'s ``steps``, each once."""
    logged = events.Scalars("train/loss_bpd")
    assert [event.step for event in logged] == [step for step, _ in history_steps]
    assert [event.value for event in logged] == pytest.approx([bpd for _, bpd in history_steps])


def steps(events, tag, kind="scalars"):
    return [event.step for event in (events.Scalars(tag) if kind == "scalars" else events.Images(tag))]


def test_a_run_logs_the_loss_epochs_images_and_hparams_without_changing_training(tmp_path):
    assert main(["--tensorboard", "--epochs", "2", "--out", str(tmp_path / "board"), *FAST_FLAGS]) == 0
    metrics = json.loads((tmp_path / "board" / "metrics.json").read_text())
    train(TrainConfig(epochs=2, **FAST), out=str(tmp_path / "plain"), **QUIET)
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    # the board draws its samples on a private RNG: the same run without it trains identically
    assert (metrics["steps"], metrics["epochs"], metrics["test"]) == (plain["steps"], plain["epochs"], plain["test"])
    events = read_events(tmp_path / "board")

    assert_loss_is_the_history(events, metrics["steps"])
    assert steps(events, "train/loss_bpd") == [10, 12, 22, 24]
    for tag in EPOCH_SCALARS + ["gamma/y"] + [f"elbo_terms_bits_per_dim/{term}" for term in SRVAE_TERMS]:
        assert steps(events, tag) == [12, 24], tag
    assert [e.value for e in events.Scalars("test/elbo_bpd")] == pytest.approx(
        [record["test_elbo_bpd"] for record in metrics["epochs"]]
    )
    assert events.Scalars("gamma/x")[-1].value == pytest.approx(metrics["gamma_x"])
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("mixture/")]

    for tag in ("images/samples", "images/samples_y", "images/super_resolution"):
        assert steps(events, tag, "images") == [12, 24], tag
    grid = events.Images("images/super_resolution")[-1]
    assert (grid.width, grid.height) == (5 * 29 + 1, 4 * 29 + 1)  # y up | SR mean | 2 z draws | truth, 4 images
    for name in ("u", "z"):  # what the latents carry, each epoch
        assert steps(events, f"latents/kl_{name}_bits_per_image") == [12, 24], name
        assert events.Scalars(f"latents/kl_{name}_bits_per_image")[-1].value > 0, name

    session = read_events_dir(tmp_path / "board" / "tensorboard" / "hparams")
    for key in ("elbo_bpd", "iw_bpd", "sr_psnr", "sr_crps", "kl_z_bits", "active_z", "sr_latent_share", "sr_best_of_gain"):
        [final] = session.Scalars(f"final/{key}")
        assert final.step == 24 and final.value == pytest.approx(metrics["test"][key], rel=1e-5), key
    hparams = session_hparams(session)
    assert hparams["model"].string_value == "srvae" and hparams["epochs"].number_value == 2
    assert hparams["tensorboard"].number_value == 1
    assert hparams["x_density"].string_value == "exact"


def test_a_mixture_prior_logs_its_weights(tmp_path):
    config = TrainConfig(model="vae", prior="mog", mog_components=3, max_steps=2, tensorboard=True, **FAST)
    result = train(config, out=str(tmp_path), **QUIET)
    events = read_events(tmp_path)
    weights = [events.Scalars(f"mixture/weight_{k}") for k in range(3)]
    assert [[event.step for event in w] for w in weights] == [[2], [2], [2]]
    assert [w[0].value for w in weights] == pytest.approx(result.metrics["mixture"]["weights"], rel=1e-5)
    assert sum(w[0].value for w in weights) == pytest.approx(1.0, abs=1e-5)
    assert steps(events, "mixture/effective_components") == [2]
    assert steps(events, "elbo_terms_bits_per_dim/log_p_z") == [2]
    assert steps(events, "images/samples", "images") == [2]
    assert "gamma/y" not in events.Tags()["scalars"]  # the VAE has no y
    assert "images/super_resolution" not in events.Tags()["images"]


def _copy_checkpoint_at(monkeypatch, step, copy):
    """Keep the checkpoint written at ``step``: resuming from it is resuming a session
    killed after it, which logged later steps the resumed session logs again."""
    import pyro_srvae.training.loop as training

    real_save = training.save_checkpoint

    def save_and_keep(path, state):
        real_save(path, state)
        if state["step"] == step and not copy.exists():
            shutil.copyfile(path, copy)

    monkeypatch.setattr(training, "save_checkpoint", save_and_keep)


@pytest.mark.parametrize(
    "cut, loss_steps, epoch_steps",
    [
        ("max-steps", [10, 12, 15, 24], [12, 15, 24]),
        # syncs at the checkpoints too (every 5 steps)
        ("killed-after-checkpoint", [5, 10, 12, 15, 20, 24], [12, 24]),
    ],
    ids=["cut-by-max-steps", "killed-after-a-checkpoint"],
)
def test_a_resumed_run_appends_without_a_duplicate_step(tmp_path, monkeypatch, cut, loss_steps, epoch_steps):
    out = tmp_path / "run"
    config = TrainConfig(epochs=2, tensorboard=True, **FAST)
    if cut == "max-steps":  # the session stops at step 15, its checkpoint there
        resume_from = train(config, out=str(out), max_steps=15, **QUIET).checkpoint
    else:  # the session goes on to step 15 after its checkpoint at step 10
        resume_from = tmp_path / "at-step-10.pt"
        _copy_checkpoint_at(monkeypatch, 10, resume_from)
        train(config, out=str(out), max_steps=15, checkpoint_every=5, **QUIET)
        monkeypatch.undo()
    resumed = train(resume=resume_from, **QUIET)
    assert resumed.out_dir == out
    events = read_events(out)

    for kind in ("scalars", "images"):
        for tag in events.Tags()[kind]:
            logged = steps(events, tag, kind)
            assert logged == sorted(set(logged)), f"{tag}: {logged}"
    # the loss at each sync of the run, the interrupted session's last one included, once
    assert_loss_is_the_history(events, resumed.metrics["steps"])
    assert steps(events, "train/loss_bpd") == loss_steps
    for tag in EPOCH_SCALARS + ["elbo_terms_bits_per_dim/log_p_x"]:
        assert steps(events, tag) == epoch_steps, tag
    assert steps(events, "images/super_resolution", "images") == epoch_steps
    assert events.Scalars("test/elbo_bpd")[-1].value == pytest.approx(resumed.metrics["epochs"][-1]["test_elbo_bpd"])
    session = read_events_dir(out / "tensorboard" / "hparams")  # this session's, the first one's gone
    assert steps(session, "final/iw_bpd") == [24] and "max_steps" not in session_hparams(session)


def test_the_flag_turns_the_board_on_when_resuming(tmp_path):
    first = train(TrainConfig(epochs=1, **FAST), out=str(tmp_path), **QUIET)
    assert not (tmp_path / "tensorboard").exists()
    assert main(["--resume", str(first.checkpoint), "--epochs", "2", "--tensorboard", "--quiet"]) == 0
    events = read_events(tmp_path)
    assert steps(events, "test/elbo_bpd") == [12, 24]  # the checkpoint's epoch, then the new one
    assert steps(events, "train/loss_bpd") == [12, 22, 24]


def test_only_rank_0_writes(tmp_path):
    config = TrainConfig(tensorboard=True)
    assert isinstance(_open_board(config, tmp_path, SimpleNamespace(is_main=False), 0), NullBoard)
    assert not (tmp_path / "tensorboard").exists()
    assert isinstance(_open_board(TrainConfig(), tmp_path, SimpleNamespace(is_main=True), 0), NullBoard)
    board = _open_board(config, tmp_path, SimpleNamespace(is_main=True), 0)
    assert isinstance(board, TrainingBoard)
    board.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_without_tensorboard_the_flag_is_refused_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails
    TrainConfig().validate()  # the package works without it
    with pytest.raises(ConfigError) as error:
        TrainConfig(tensorboard=True).validate()
    assert str(error.value) == INSTALL_HINT
    with pytest.raises(ConfigError, match="pip install"):
        train(TrainConfig(tensorboard=True, **FAST), out=str(tmp_path / "run"), **QUIET)
    assert not (tmp_path / "run").exists()


def test_the_command_line_without_tensorboard_exits_2_with_one_line():
    code = "import sys; sys.modules['tensorboard'] = None; from pyro_srvae.cli import main; main(sys.argv[1:])"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code, "--tensorboard", "--quiet"], capture_output=True, text=True,
                            env=env, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith(INSTALL_HINT)


def test_the_board_leaves_the_model_in_its_mode(tmp_path):
    from pyro_srvae import SRVAE

    board = TrainingBoard(tmp_path, seed=0, sr_samples=2)
    model = SRVAE((1, 8, 8), hidden=4)
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    record = {"step": 3, "train_objective_bpd": 7.0, "test_elbo_bpd": 7.5, "kl_scale": 1.0}
    state = torch.random.get_rng_state()
    board.epoch(record, model, images, {"x": 0.1, "y": None}, None)
    board.close()
    assert model.training and torch.equal(torch.random.get_rng_state(), state)
    events = read_events_dir(tmp_path)
    assert steps(events, "gamma/x") == [3] and "gamma/y" not in events.Tags()["scalars"]
    assert events.Images("images/super_resolution")[0].height == 4 * 9 + 1


def test_a_session_in_the_same_second_is_read_after_the_earlier_one(tmp_path, monkeypatch):
    """Two sessions' files in one second sort by their counters as strings ("10" < "9"):
    the board waits for a later second so that the resumed session's file is read last."""
    import time

    from tensorboard.summary.writer import event_file_writer
    from torch.utils.tensorboard import SummaryWriter

    counters = iter([9, 10])
    monkeypatch.setattr(event_file_writer._global_uid, "get", lambda: next(counters))
    time.sleep(1 - time.time() % 1)  # both files are opened within the same second but for the wait
    with SummaryWriter(log_dir=str(tmp_path)) as earlier:  # an interrupted session, steps 1..5
        for step in range(1, 6):
            earlier.add_scalar("train/loss_bpd", float(step), step)
    board = TrainingBoard(tmp_path, purge_step=3)  # resumed from its checkpoint at step 2
    for step in (3, 4):
        board.running_loss(step, 10.0 * step)
    board.close()
    files = sorted(path.name for path in tmp_path.glob("events.out.tfevents.*"))
    assert files[-1].endswith(".10")
    assert [(e.step, e.value) for e in read_events_dir(tmp_path).Scalars("train/loss_bpd")] == [
        (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)
    ]  # fmt: skip


def test_the_wait_for_a_later_second_is_short_and_bounded(tmp_path):
    from pyro_srvae.training.tensorboard import wait_for_a_later_second

    (tmp_path / "events.out.tfevents.0000000100.host.42.9").write_bytes(b"")
    (tmp_path / "events.out.tfevents.0000000099.host.42.10").write_bytes(b"")
    for now, expected in [(100.25, [0.75]), (101.0, []), (150.0, []), (90.0, [])]:  # 90: another clock's files
        slept = []
        wait_for_a_later_second(tmp_path, clock=lambda: now, sleep=slept.append)
        assert slept == pytest.approx(expected), now
    slept = []
    wait_for_a_later_second(tmp_path / "empty", clock=lambda: 100.0, sleep=slept.append)
    assert slept == []

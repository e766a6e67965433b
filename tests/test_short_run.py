"""A run whose --epochs give too few update steps to learn says so (issue #24)."""

from pyro_srvae.training.config import MIN_STEPS_TO_LEARN, TrainConfig
from pyro_srvae.training.loop import train
from pyro_srvae.training.report import summary_table

TINY = dict(hidden=4, u_dim=2, z_dim=2, batch_size=8, eval_samples=2, sr_samples=2, eval_limit=4, figures=False,
            device="cpu", train_limit=32)  # fmt: skip


def _run(tmp_path, **options):
    messages = []
    result = train(TrainConfig(out=str(tmp_path), **TINY, **options), progress=False, log=messages.append)
    return result, messages, summary_table(result.metrics)


def test_a_run_of_a_few_epochs_of_few_images_says_it_is_too_short(tmp_path):
    result, messages, summary = _run(tmp_path, epochs=1)  # 32 images at batch 8: 4 steps
    warnings = [m for m in messages if m.startswith("warning:")]
    assert len(warnings) == 1 and "only 4 update steps, too few to learn" in warnings[0]
    assert "raise --epochs" in warnings[0] and "\n" not in warnings[0]
    assert "too short" in summary and "only 4 update steps" in summary


def test_a_step_budget_the_user_chose_is_not_second_guessed(tmp_path):
    result, messages, summary = _run(tmp_path, epochs=1, max_steps=3)
    assert not [m for m in messages if "too few to learn" in m]
    assert "too short" not in summary


def test_the_main_jobs_budget_is_not_too_short():
    # The README's command: 2 epochs of fashion-mnist-mini's 10,000 images at batch 32.
    config = TrainConfig().validate()
    assert config.epochs * (10_000 // config.batch_size) >= MIN_STEPS_TO_LEARN

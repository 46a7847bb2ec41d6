"""The step progress bar shows the logged values, not the logger's version (Rich printed it as v_num 0.000)."""

from types import SimpleNamespace

from drifting_lightning.callbacks.progress import StepProgressBar


def test_the_bar_leaves_out_the_logger_version():
    logger = SimpleNamespace(version=0)
    trainer = SimpleNamespace(loggers=[logger], logger=logger, progress_bar_metrics={"train/loss": 0.5})
    assert StepProgressBar().get_metrics(trainer, None) == {"train/loss": 0.5}

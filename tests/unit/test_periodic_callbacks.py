"""The evaluation callbacks without a Trainer: the PeriodicCallback schedule, argument checks, metric state."""

from types import SimpleNamespace

import pytest

from drifting_lightning.callbacks.periodic import MetricCallback, PeriodicCallback
from drifting_lightning.callbacks.sample_metrics import SampleMetricCallback
from drifting_lightning.callbacks.scatter import ScatterPlotCallback


def test_metric_callback_state_survives_resume():
    metric = SampleMetricCallback()
    metric.history = [(200, 0.5), (400, 0.25)]
    fresh = SampleMetricCallback()
    fresh.load_state_dict(metric.state_dict())
    assert fresh.history == [(200, 0.5), (400, 0.25)] and fresh.last_value == 0.25
    assert SampleMetricCallback(metric="mmd").state_key != fresh.state_key


def test_bad_arguments():
    with pytest.raises(ValueError, match="Did you mean 'energy_distance'"):
        SampleMetricCallback(metric="energy_distanse")
    with pytest.raises(ValueError, match="every_n_steps"):
        ScatterPlotCallback(every_n_steps=0)


class Recorder(PeriodicCallback):
    def __init__(self, every_n_steps: int) -> None:
        super().__init__(every_n_steps)
        self.calls: list[tuple[int, bool]] = []
        self.finished = 0

    def run(self, trainer, pl_module, final):
        self.calls.append((trainer.global_step, final))

    def finish(self, trainer, pl_module):
        self.finished += 1


def train(callback: PeriodicCallback, steps: int, rank: int = 0, max_steps: int = -1) -> None:
    trainer = SimpleNamespace(global_step=0, is_global_zero=rank == 0, log_dir="run", default_root_dir="root",
                              max_steps=max_steps, max_epochs=None, current_epoch=0, is_last_batch=False)
    callback.on_fit_start(trainer, None)
    for step in range(1, steps + 1):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, None)
    callback.on_train_end(trainer, None)


@pytest.mark.parametrize(
    ("steps", "expected"), [(5, [(2, False), (4, False), (5, True)]), (4, [(2, False), (4, False)])]
)
def test_periodic_schedule_runs_every_n_steps_and_once_at_the_end(steps, expected):
    callback = Recorder(every_n_steps=2)
    train(callback, steps)
    assert callback.calls == expected and callback.finished == 1 and callback.log_dir == "run"


def test_the_run_at_the_end_of_max_steps_happens_at_its_batch_end_before_the_checkpoint():
    callback = Recorder(every_n_steps=2)
    train(callback, 5, max_steps=5)
    assert callback.calls == [(2, False), (4, False), (5, False)] and callback.finished == 1


def test_global_zero_only_callbacks_stay_quiet_on_other_ranks_and_metrics_do_not():
    picture = Recorder(every_n_steps=2)
    train(picture, 3, rank=1)
    assert picture.calls == [] and picture.finished == 0

    class Metric(MetricCallback):
        def evaluate(self, trainer, pl_module):
            self.history.append((trainer.global_step, 1.0))
            return {}

    metric = Metric(every_n_steps=2)
    train(metric, 3, rank=1)
    assert metric.history == [(2, 1.0), (3, 1.0)]


def test_a_resumed_metric_does_not_repeat_its_last_evaluation():
    class Metric(MetricCallback):
        def evaluate(self, trainer, pl_module):
            self.history.append((trainer.global_step, 1.0))
            return {}

    metric = Metric(every_n_steps=2)
    metric.history = [(4, 0.5)]  # as loaded from the checkpoint of step 4
    trainer = SimpleNamespace(global_step=4, is_global_zero=True, log_dir="run", default_root_dir="root")
    metric.on_train_end(trainer, None)  # the resumed run ends where the checkpoint was taken
    assert metric.history == [(4, 0.5)]

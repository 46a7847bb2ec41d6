"""benchmarks/train_step.py --quick runs end to end and returns its rows: the step of the digits config split into
its parts, each measured, with the sizes the quick overrides give. (Peak memory is only checked for its sign: resident
set sizes on a shared machine are not for assertions.)"""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import train_step  # noqa: E402


def test_quick_benchmark_splits_the_step_and_measures_memory(capsys):
    # In this process: the workers are forked from it and inherit its imports, which keeps the test short.
    (row,) = train_step.main(["--quick", "--clock", "cpu"])
    assert row["config"] == "configs/digits.yaml" and row["error"] is None, row
    # quick: 2 class groups x generated_per_group 4; digits has one feature set (the 64 pixels) and no encoder
    assert (row["generated"], row["features"], row["feature_values"]) == (8, 1, 64)
    assert row["params"] > 0

    step, parts = row["step"], row["parts"]
    assert len(step["times"]) == 2 and all(0 < t < math.inf for t in step["times"])  # 2 timed steps
    assert set(parts) == {*train_step.COLUMNS, "rest"}
    for name in ("generator fwd", "loss fwd", "generator bwd", "rest"):
        assert parts[name]["time"] > 0, name
    assert parts["encoder fwd"]["time"] >= 0 and parts["encoder bwd"]["time"] >= 0  # the identity encoder
    assert row["draw"] is not None and row["draw"]["time"] > 0  # a real batch of the digits data

    assert row["base"] > 0 and row["step_extra"] >= 0
    extra = row["part_extra"]
    assert extra["encoder"] is None  # not measured: no encoder
    assert extra["generator"] is not None and extra["loss"] is not None, extra  # measured, not failed
    assert min(extra["generator"], extra["loss"]) >= 0
    assert "failed" not in capsys.readouterr().out

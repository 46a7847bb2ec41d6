"""benchmarks/encoder_loss.py --quick runs end to end and returns its rows: the feature sets grow with the families,
every run measured, its times positive and finite. (Memory bounds are compared in the full run,
benchmarks/RESULTS.md: resident-set sizes on a shared machine are not for assertions.)"""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import encoder_loss  # noqa: E402


def test_quick_benchmark_grows_features_and_measures_every_run():
    # In this process: the workers are forked from it and inherit its imports, which keeps the test short. A small
    # chunk bound, so that the tiny per-location features still take several chunks.
    rows = encoder_loss.main(["--quick", "--cases", "fashion", "--clock", "cpu", "--chunk-elements", "4096"])
    assert [(case, "+".join(families)) for case, families, _ in rows] == [
        ("fashion", "global"),
        ("fashion", "global+patch2+patch4+location"),
    ]
    (_, _, few), (_, _, every) = rows
    for runs in (few, every):
        assert set(runs) == {(chunked, mode) for chunked in (True, False) for mode in ("full", "loss")}
        assert not any(run.get("error") for run in runs.values())
        for (_, mode), run in runs.items():  # quick: one timed run; in full mode also each segment of it
            timed = [run, *(run[name] for name in encoder_loss.SEGMENTS if mode == "full")]
            assert all(len(t["times"]) == 1 and 0 < t["time"] < math.inf for t in timed), run
            assert run["extra"] >= 0 and run["budget"] > 0
    assert every[(True, "full")]["features"] > few[(True, "full")]["features"]  # more families, more feature sets
    assert every[(True, "full")]["gen_bytes"] > few[(True, "full")]["gen_bytes"]

"""benchmarks/drift_loss.py --quick runs end to end and returns its rows: every case measured, times positive and
finite, the per-location worker built the shapes the row states; --official is optional. (Peak memory against the
chunk budget is compared in the full run, benchmarks/RESULTS.md: resident-set sizes on a shared machine are not for
assertions.)"""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import drift_loss  # noqa: E402

from drifting_lightning.drift.chunks import chunk_budget_bytes  # noqa: E402


def timed(result: dict, repeats: int) -> bool:
    """The worker's timings: ``repeats`` runs, positive and finite, their median the row's time."""
    times = result["times"]
    return len(times) == repeats and all(0 < t < math.inf for t in times) and min(times) <= result["time"] <= max(times)


def test_quick_benchmark_measures_every_case(capsys):
    tables = drift_loss.main(["--quick", "--official", "/nonexistent/drift_loss.py"])
    out = capsys.readouterr().out
    assert tables["official"] == []  # the authors' file is optional, absent here: skipped, and said so
    assert "Against the authors' loss: skipped (/nonexistent/drift_loss.py" in out

    (ablation,) = tables["ablation"]  # quick: C = 16 at G 4, N 8, P 8, M 2, two timed runs
    engine, literal = ablation["engine"], ablation["literal"]
    assert ablation["C"] == 16 and "error" not in engine and "error" not in literal, ablation
    assert timed(engine, 2) and timed(literal, 2)
    assert ablation["speedup"] == literal["time"] / engine["time"]
    assert engine["extra"] >= 0 and literal["extra"] >= 0

    (loc,) = tables["locations"]  # quick: L = 4 locations of C = 16, max_chunk_elements 2**10
    assert (loc["G"], loc["L"], loc["rows"]) == (4, 4, 16) and "result" in loc, loc
    result = loc["result"]
    assert timed(result, 2) and loc["rows_per_s"] == 16 / result["time"]
    # the worker's tensors are the row's shapes: gen, positives, negatives [G, k, L, C] float32, weights [G, M]
    assert loc["gen"] == result["gen"] == 4 * 16 * 16 * 8
    assert result["inputs"] == loc["inputs"] + 4 * 4 * 2 == 4 * 16 * 16 * (8 + 8 + 2) + 4 * 4 * 2
    assert loc["own"] == result["extra"] - result["gen"] and result["forward_extra"] >= 0
    # the engine's bound at the case's sizes: 2**10 elements per [rows, N, T] block, N = 8, T = N + P + M = 18, C = 16
    assert loc["budget"] == chunk_budget_bytes(2**10, 8, 18, 16)
    for line in (drift_loss.ablation_line(ablation), drift_loss.location_line(loc)):
        assert line in out.splitlines()  # the printed tables are the rows

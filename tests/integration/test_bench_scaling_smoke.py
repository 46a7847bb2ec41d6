"""benchmarks/scaling.py runs a real `drifting fit` and reports its throughput (one process, two steps)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scaling.py"


@pytest.mark.slow  # a real `drifting fit` in a fresh process: 20-60 s on the shared 2-core machine
def test_single_run_reports_samples_per_second(tmp_path):
    rows_file = tmp_path / "rows.json"
    out = subprocess.run([sys.executable, str(SCRIPT), "--runs", "single", "--steps", "2", "--skip", "0",
                          "--json", str(rows_file)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = json.loads(rows_file.read_text())
    # digits.yaml: 10 class groups x generated_per_group 24 on one rank; two steps give two timed gaps
    assert row["samples_per_step"] == 240 and row["timed_steps"] == 2
    assert row["samples_per_s"] == row["samples_per_step"] / row["s_per_step"] > 0
    assert row["run"] == "single" and (row["devices"], row["threads"], row["groups"]) == (1, 1, 10)

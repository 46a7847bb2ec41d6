"""benchmarks/drift_loss.py --quick runs end to end and prints both markdown tables; --official is optional."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "drift_loss.py"


def test_quick_benchmark_prints_tables():
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--official", "/nonexistent/drift_loss.py"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "| C | engine ms (range) | literal loop ms (range) | speed-up |" in text
    assert "| G x L rows | ms (range) | rows/s |" in text
    # one measured row per table: numbers, not errors
    time = r"[\d,.]+ \([\d,]+-[\d,]+\)"
    assert re.search(rf"^\| 16 \| {time} \| {time} \| [\d.]+x \| [\d,.]+ \| [\d,.]+ \|$", text, re.M), text
    assert re.search(rf"^\| 4 x 4 = 16 \| {time} \| [\d,]+ \|", text, re.M), text
    assert "failed" not in text and "does not fit" not in text
    assert "Against the authors' loss: skipped (/nonexistent/drift_loss.py" in text  # optional, absent here

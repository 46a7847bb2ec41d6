"""benchmarks/train_step.py --quick runs end to end and prints both tables with measured, consistent numbers."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import train_step  # noqa: E402

NUMBER = r"([\d,.]+)"
SHARE = rf"{NUMBER} \(\d+%\)"


def number(text: str) -> float:
    return float(text.replace(",", ""))


def test_quick_benchmark_splits_the_step_and_measures_memory(capsys):
    # In this process: the workers are forked from it and inherit its imports, which keeps the test short.
    train_step.main(["--quick", "--clock", "cpu"])
    text = capsys.readouterr().out
    assert "failed" not in text, text
    times = re.search(rf"^\| digits \(.*\) \| 8 \| 1 \(64\) \| {NUMBER} \([\d,]+-[\d,]+\) "
                      rf"\| {NUMBER} \([\d,]+-[\d,]+\) " + rf"\| {SHARE} " * 6 + r"\|$", text, re.M)  # fmt: skip
    assert times, text
    draw, step, gen_fwd, enc_fwd, loss_fwd, enc_bwd, gen_bwd, rest = (number(x) for x in times.groups())
    assert min(draw, step, gen_fwd, loss_fwd, gen_bwd, rest) > 0 and min(enc_fwd, enc_bwd) >= 0, text

    memory = re.search(rf"^\| digits \| 0\.\d+M \| {NUMBER} \| {NUMBER} \| {NUMBER} \| - \| {NUMBER} \|$", text, re.M)
    assert memory, text
    base, step_extra, generator_extra, loss_extra = (number(x) for x in memory.groups())
    # RSS differences on a shared machine are not asserted beyond their sign.
    assert base > 0 and min(step_extra, generator_extra, loss_extra) >= 0, text

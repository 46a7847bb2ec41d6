"""benchmarks/encoder_loss.py --quick runs end to end: the feature sets grow, and the chunked loss's working memory
stays within its chunk budget. (At these sizes the unchunked loss's extra memory is often below the RSS resolution,
so chunked vs unchunked is compared in the full run, benchmarks/RESULTS.md, not here.)"""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import encoder_loss  # noqa: E402

NUMBER = r"(-?[\d,.]+)"
TIME = rf"{NUMBER} \([\d,]+-[\d,]+\)"


def numbers(row: tuple[str, ...]) -> list[float]:
    return [float(x.replace(",", "")) for x in row]


def test_quick_benchmark_grows_features_with_bounded_loss_memory(capsys):
    # In this process: the workers are forked from it and inherit its imports, which keeps the test short. A small
    # chunk bound, so that the tiny per-location features still take several chunks.
    encoder_loss.main(["--quick", "--cases", "fashion", "--clock", "cpu", "--chunk-elements", "4096"])
    text = capsys.readouterr().out
    assert "failed" not in text, text
    full = re.findall(rf"^\| fashion \| ([a-z0-9+]+) \| (\d+) \| {NUMBER} \| {TIME} \| {TIME} \| {TIME} \| {TIME} "
                      rf"\| {NUMBER} \| {TIME} \| {TIME} \| {NUMBER} \|$", text, re.M)  # fmt: skip
    assert [row[0] for row in full] == ["global", "global+patch2+patch4+location"], text
    few, every = (numbers(row[1:]) for row in full)
    assert every[0] > few[0] and every[1] > few[1], text  # more feature sets, more generated feature values
    assert min(few + every) > 0, text

    alone = re.findall(rf"^\| fashion \| [a-z0-9+]+ \| {NUMBER} \| {NUMBER} \| {TIME} \| {NUMBER} \| {NUMBER} "
                       rf"\| {NUMBER} \| {TIME} \| {NUMBER} \| {NUMBER} \|$", text, re.M)  # fmt: skip
    assert len(alone) == 2, text
    _, budget, _, _, own, *_ = numbers(alone[-1])
    # Beyond the gradient, the chunked loss holds about one chunk's budget (0.5 MB of allocator slack at this size).
    assert own < 2 * budget + 0.5, text

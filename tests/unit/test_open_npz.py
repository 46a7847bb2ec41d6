"""open_npz reads .npz archives and names the file when it is anything else, instead of numpy's own words."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from drifting_lightning.commands import evaluate
from drifting_lightning.metrics.npz import open_npz


def test_an_npz_archive_opens(tmp_path: Path):
    np.savez(tmp_path / "s.npz", arr_0=np.arange(3))
    with open_npz(tmp_path / "s.npz", "samples file") as f:
        assert f["arr_0"].tolist() == [0, 1, 2]


@pytest.mark.parametrize(("name", "write", "expected"), [
    ("config.yaml", lambda p: p.write_text("model: {}\n"), "is not an .npz archive (np.savez writes one)"),
    ("half.npz", lambda p: p.write_bytes(b"PK\x03\x04 cut short"), "is not an .npz archive (np.savez writes one)"),
    ("a.npy", lambda p: np.save(p, np.zeros(3)), "is a .npy array, not an .npz archive"),
])  # fmt: skip
def test_any_other_file_is_named(tmp_path: Path, name, write, expected):
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError) as err, open_npz(path, "samples file"):
        raise AssertionError(f"{name} opened as an .npz archive")
    assert str(err.value).startswith(f"samples file {path} {expected}")


def test_evaluate_names_a_samples_file_that_is_no_archive(tmp_path: Path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not samples\n")
    assert evaluate.main([str(text), "--ref", str(text), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "is not an .npz archive" in err and "pickle" not in err and "Traceback" not in err

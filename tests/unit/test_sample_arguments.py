"""`drifting sample` refuses a device it cannot use and output paths it cannot write before it samples anything;
`export` and `import-official` refuse an output folder that is a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from drifting_lightning.commands import sample


@pytest.mark.parametrize(("args", "expected"), [
    (["--device", "foo"], "error: --device foo: not a device; use auto, cpu, cuda, cuda:1, mps, ..."),
    (["--png-dir", "{file}"], "error: --png-dir: {file} is a file, not a folder"),
    (["--out", "{file}/samples.npz"], "error: --out: {file} is a file, not a folder"),
    (["--plot", "{file}/points.png"], "error: --plot: {file} is a file, not a folder"),
    (["--plot", "points.txt"], "error: --plot points.txt: name a picture file (.png, .pdf, .svg, .jpg)"),
    (["--alpha", "nan"], "error: --alpha must be a number >= 1 (1 = no guidance), got nan"),
    (["--alpha", "inf"], "error: --alpha must be a number >= 1 (1 = no guidance), got inf"),
])  # fmt: skip
def test_a_bad_device_or_output_path_is_named_before_sampling(tmp_path: Path, capsys, args, expected):
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"never read: the arguments are checked first")
    file = tmp_path / "notes.txt"
    file.write_text("a file")
    argv = ["--ckpt", str(ckpt), "--out", str(tmp_path / "s.npz"), *(a.format(file=file) for a in args)]
    assert sample.main(argv) == 1
    assert capsys.readouterr().err.splitlines()[0] == expected.format(file=file)

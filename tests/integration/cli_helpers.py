"""Run the `drifting` CLI in-process (fast) or as a subprocess (the real entry point), for integration tests."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def run_drifting(*args: str) -> Finished:
    """`drifting ARGS` in this process (``cli.main``); exit codes from SystemExit are returned, output captured."""
    from drifting_lightning.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return Finished(code, out.getvalue(), err.getvalue())


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("DRIFTING_DEBUG", None)
    return env


def run_drifting_subprocess(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m drifting_lightning ARGS` in a subprocess with offline settings."""
    return subprocess.run(
        [sys.executable, "-m", "drifting_lightning", *args],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def start_drifting_subprocess(*args: str) -> subprocess.Popen:
    """`python -m drifting_lightning ARGS` started in a subprocess (offline), stdout and stderr piped as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "drifting_lightning", *args],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

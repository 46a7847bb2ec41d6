"""The tool commands of ``drifting``: ``sample``, ``evaluate`` and ``export``, each ``main(argv) -> int``.

Shared here: device selection and the error policy (a missing file or a bad argument prints one line naming it and
returns 1; ``DRIFTING_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import torch

USER_ERRORS = (FileNotFoundError, ValueError, KeyError, RuntimeError, ImportError, TypeError)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; any other name is passed to ``torch.device``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    return device


def run_command(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int], argv: Sequence[str]) -> int:
    """Parse ``argv`` and run ``body``; usage errors return 2 (``--help`` 0), user errors print and return 1."""
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exit_:  # argparse exits on --help and on usage errors; a command returns instead
        return int(exit_.code or 0)
    try:
        return body(args)
    except USER_ERRORS as err:
        if os.environ.get("DRIFTING_DEBUG"):
            raise
        print(f"error: {err}\n(set DRIFTING_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 1

"""The commands of ``drifting`` (``fit``, ``sample``, ``evaluate``, ``export``, ``encode-latents``,
``import-official``), each ``main(argv) -> int``, and the one error policy they all share:

- a user error (a bad argument or value, a missing or damaged file, parts of a config that do not fit) prints
  ``error: <message>`` and a line on ``DRIFTING_DEBUG``, exit status 1 (2 for a command line the parser rejects);
- Ctrl-C prints ``interrupted``, exit status 130;
- ``DRIFTING_DEBUG=1`` raises instead, with the full traceback.

Nothing heavy is imported here: ``drifting`` must reach this policy before torch and Lightning load, so that a Ctrl-C
during start-up is handled too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEBUG_HINT = "(set DRIFTING_DEBUG=1 for the full traceback)"


class UsageError(Exception):
    """A command line or config that the parser rejects; the message says which key or value and the fix."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    # Lightning's configuration error is a user error too; Lightning is loaded by then whenever it can be raised.
    found: tuple[type[BaseException], ...] = (
        UsageError, ValueError, OSError, KeyError, RuntimeError, ImportError, TypeError,
    )  # fmt: skip
    lightning = sys.modules.get("lightning.fabric.utilities.exceptions")
    return found + ((lightning.MisconfigurationException,) if lightning is not None else ())


def explain(err: BaseException) -> str:
    """The error's message, with our fix added where the message of a library does not name one."""
    text = str(err) if not isinstance(err, KeyError) or not err.args else str(err.args[0])
    if not text.strip():  # e.g. a bare NotImplementedError of a half-written plug-in
        text = f"{type(err).__name__} without a message (DRIFTING_DEBUG=1 shows where it was raised)"
    if "stateful callback of type `FrechetCallback`" in text:
        text += "\nGive each FrechetCallback of one metric its own `tag` (e.g. tag: 50k)."
    return text


def guarded(body: Callable[[], int]) -> int:
    """Run ``body`` under the error policy of this module; returns the exit status."""
    try:
        return body()
    except KeyboardInterrupt:
        if os.environ.get("DRIFTING_DEBUG"):
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `drifting list | head`: the reader left, which is no error of ours
        with contextlib.suppress(OSError, ValueError):  # so that exit's flush does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a program that SIGPIPE ends
    except _user_error_types() as err:
        if os.environ.get("DRIFTING_DEBUG"):
            raise
        print(f"error: {explain(err)}\n{DEBUG_HINT}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1


def run_command(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int], argv: Sequence[str]) -> int:
    """Parse ``argv`` and run ``body`` under the error policy; usage errors return 2 (``--help`` 0)."""
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exit_:  # argparse exits on --help and on usage errors; a command returns instead
        return int(exit_.code or 0)
    return guarded(lambda: body(args))


def check_output_file(path: str, example: str, flag: str = "--out") -> None:
    """Before the work starts: ``path`` is to be written as a file, so it must not be a folder."""
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"{flag} {path} is a folder; name the file to write, e.g. {os.path.join(path, example)}"
        )


def check_output_folder(path: str, flag: str = "--out") -> None:
    """Before the work starts: ``path`` is to be written as a folder, so it must not be a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{flag} {path} is a file; name a folder to write into")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; any other name is passed to ``torch.device``."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    return device

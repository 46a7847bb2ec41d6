"""The ``drifting`` command: its command table, its help, ``drifting list``, and the error policy around them all.

This module imports nothing heavy: each command loads what it needs when it runs, so ``drifting --help`` is quick
and a Ctrl-C while torch and Lightning load is handled like any other ("interrupted", exit status 130).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

from drifting_lightning.commands import UsageError, guarded

# name -> ("module:function" taking argv and returning the exit status, one line for `drifting --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("drifting_lightning.commands.fit:main",
            "train a generator (--config X.yaml, --print_config, --ckpt_path last)"),
    "list": ("drifting_lightning.cli:list_components",
             "the components a config can name: kernels, fields, encoders, generators, ..."),
    "sample": ("drifting_lightning.commands.sample:main",
               "one-step samples of a checkpoint or export, as an ADM .npz (vectors: float32)"),
    "evaluate": ("drifting_lightning.commands.evaluate:main",
                 "FID / Frechet distance of an .npz of samples (vectors: energy distance)"),
    "export": ("drifting_lightning.commands.export:main", "a checkpoint's EMA generator as safetensors + config.json"),
    "encode-latents": ("drifting_lightning.commands.encode_latents:main", "an image folder -> SD-VAE latent shards"),
    "import-official": ("drifting_lightning.commands.import_official:main",
                        "the authors' released weights in our formats"),
}  # fmt: skip

USAGE = "usage: drifting <command> [options]   (drifting <command> --help: the options of one command)"

EXAMPLES = """\
Most used:
  drifting fit --config configs/toy/checkerboard.yaml            # train the toy model on CPU, in minutes
  drifting fit --config configs/digits.yaml --ckpt_path last     # start a run, or resume it where it stopped
  drifting sample --ckpt runs/digits/version_0/checkpoints/last.ckpt --num 1000 --out samples.npz"""


def help_text() -> str:
    rows = "\n".join(f"  {name:<16} {line}" for name, (_, line) in COMMANDS.items())
    return f"{USAGE}\n\nCommands:\n{rows}\n\n{EXAMPLES}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``drifting ARGS``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return guarded(lambda: _dispatch(argv))


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(help_text(), end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from drifting_lightning.registry import unknown

        if name.startswith("-"):
            raise UsageError(f"{name} goes after a command; commands: {', '.join(COMMANDS)} (drifting --help)")
        raise UsageError(f"{unknown('command', name, list(COMMANDS))} (drifting --help)")
    module, function = COMMANDS[name][0].split(":")
    with _exit_on_ctrl_c_while_loading():
        command: Callable[[Sequence[str]], int] = getattr(importlib.import_module(module), function)
    return command(rest)


@contextlib.contextmanager
def _exit_on_ctrl_c_while_loading() -> Iterator[None]:
    """Ctrl-C while a command's modules load ends the process at once with "interrupted" (130).

    A KeyboardInterrupt raised inside an import can leave a half-initialised module behind (numpy, scipy), and the
    next import then fails with an unrelated AttributeError traceback instead of reaching our handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(signum: int, frame: object) -> None:
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        os._exit(130)

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def list_components(argv: Sequence[str]) -> int:
    """``drifting list [kind]``: every registered component with a one-line doc and its arguments."""
    from drifting_lightning import registry

    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: drifting list [{'|'.join(registry.kinds())}]\n\nThe components a config can name, each with "
              "a one-line doc and its arguments; without a kind, all of them.")  # fmt: skip
        return 0
    table = registry.kinds()
    for kind in list(argv) or list(table):
        kind = kind if kind in table or f"{kind}s" not in table else f"{kind}s"  # "kernel" for "kernels"
        try:
            found = registry.components(kind)
        except ValueError as err:  # an unknown kind: the message names the kinds
            raise UsageError(str(err)) from None
        print(f"{kind}:")
        for name, cls in found.items():
            summary, args = registry.describe(cls)
            print(f"  {name:<24} {summary}")
            if args:
                print(f"  {'':<24}   args: {args}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``drifting`` command: LightningCLI (fit/validate/test/predict) plus ``list`` and the tool commands."""

from __future__ import annotations

import importlib
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence

import lightning.pytorch as pl
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from drifting_lightning import registry
from drifting_lightning.callbacks.resilience import harden_trainer, resolve_last_checkpoint, verify_ckpt_path_argument

# Warnings that every drifting run triggers on purpose: the frozen encoder and the EMA copy are in eval mode, and the
# training streams have an exact __len__ (they split their steps among workers). Silenced for command-line runs only.
EXPECTED_WARNINGS = (r"Found \d+ module\(s\) in eval mode", r"Your `IterableDataset` has `__len__` defined")
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, RuntimeError, MisconfigurationException)


class DriftingArgumentParser(LightningArgumentParser):
    """Adds "did you mean" suggestions to jsonargparse's errors about unknown component names."""

    def error(self, message: str, *args, **kwargs):
        hints = {registry.suggest(name) for name in re.findall(r"['\"]([A-Za-z_][\w.]*)['\"]", message)}
        hints.discard("")
        if hints:
            message = message.rstrip() + "\n" + "\n".join(sorted(h.strip() for h in hints))
            message += "\nRun `drifting list` for every component name."
        return super().error(message, *args, **kwargs)


class DriftingCLI(LightningCLI):
    """LightningCLI with any LightningModule / LightningDataModule selected by class name in the config."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        for message in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        registry.load_components()
        super().__init__(
            model_class=pl.LightningModule,
            datamodule_class=pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=DriftingArgumentParser,
            trainer_defaults={"gradient_clip_val": 2.0, "default_root_dir": "runs"},
            save_config_kwargs={"overwrite": True},
            args=None if args is None else list(args),
            run=run,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            verify_ckpt_path_argument(self.config[subcommand].get("ckpt_path"))

    def before_instantiate_classes(self) -> None:
        # "last" is resolved after LightningCLI took the model's hyper-parameters from a checkpoint given by path:
        # a resume from last.ckpt runs with the config on the command line (its tensors checked against the checkpoint).
        if self.subcommand == "fit":
            resolve_last_checkpoint(self.config.fit)

    def _instantiate_trainer(self, config: dict, callbacks: list) -> pl.Trainer:
        # A rich progress bar by default, unless the run disables bars or configures its own.
        configured = config.get("callbacks") or []
        has_bar = any(isinstance(c, ProgressBar) for c in [*configured, *callbacks])
        if config.get("enable_progress_bar", True) is not False and not has_bar:
            callbacks = [*callbacks, RichProgressBar()]
        # last.ckpt, atomic checkpoint files, the training RNG stream in checkpoints, a clean stop on SIGTERM/SIGINT.
        callbacks = [*callbacks, *harden_trainer(config)]
        return super()._instantiate_trainer(config, callbacks)


def list_components(argv: Sequence[str]) -> int:
    """``drifting list [kind]``: every registered component with a one-line doc and its arguments."""
    table = registry.kinds()
    wanted = list(argv) or list(table)
    for kind in wanted:
        try:
            found = registry.components(kind)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{kind}:")
        for name, cls in found.items():
            summary, args = registry.describe(cls)
            print(f"  {name:<24} {summary}")
            if args:
                print(f"  {'':<24}   args: {args}")
        print()
    return 0


def _tool_commands() -> dict[str, Callable[[Sequence[str]], int]]:
    # Imported on use: each tool command pulls in only what it needs.
    def lazy(module: str) -> Callable[[Sequence[str]], int]:
        return lambda argv: importlib.import_module(module).main(argv)

    return {
        "list": list_components,
        "sample": lazy("drifting_lightning.commands.sample"),
        "evaluate": lazy("drifting_lightning.commands.evaluate"),
        "export": lazy("drifting_lightning.commands.export"),
        "encode-latents": lazy("drifting_lightning.data.latents"),
        "import-official": lazy("drifting_lightning.commands.import_official"),
    }


def check_config_files(argv: Sequence[str]) -> None:
    """Every ``--config``/``-c`` file exists and is valid YAML; the error names the file and the line."""
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path} does not exist (see configs/ for the shipped ones)")
        with open(path) as f:
            try:
                yaml.safe_load(f)
            except yaml.YAMLError as err:
                raise ValueError(f"config file {path} is not valid YAML: {err}") from None


def explain(err: BaseException) -> str:
    """The error's message, with our fix added where Lightning's own message does not name one."""
    text = str(err)
    if "stateful callback of type `FrechetCallback`" in text:
        text += "\nGive each FrechetCallback of one metric its own `tag` (e.g. tag: 50k)."
    return text


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tools = _tool_commands()
    try:
        if argv and argv[0] in tools:
            return tools[argv[0]](argv[1:])
        check_config_files(argv)
        DriftingCLI(args=argv)
        return 0
    except USER_ERRORS as err:
        if os.environ.get("DRIFTING_DEBUG"):
            raise
        print(f"error: {explain(err)}\n(set DRIFTING_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside training (GracefulStop handles it there)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

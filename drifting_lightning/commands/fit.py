"""``drifting fit``: LightningCLI with any LightningModule / LightningDataModule picked by class name in the config.

What it adds to LightningCLI: errors of one line that name the key, the value and the fix (``config_errors``);
``resilience: true`` (shown by ``--print_config`` and in the saved config): keep ``last.ckpt``, write checkpoints
atomically, keep the training RNG in checkpoints, stop cleanly on SIGTERM/Ctrl-C (``harden_trainer``); run folders
that never lose an earlier run (``run_folder``); a progress bar in steps; a console without Lightning's advice.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from drifting_lightning import registry
from drifting_lightning.callbacks.epoch_boundary import EpochBoundaryResume
from drifting_lightning.callbacks.graceful_stop import GracefulStop
from drifting_lightning.callbacks.progress import StepProgressBar
from drifting_lightning.callbacks.resume_logs import PurgeLogsAfterCheckpoint
from drifting_lightning.callbacks.rng import TrainingRNG
from drifting_lightning.checkpoints.atomic_io import AtomicCheckpointIO
from drifting_lightning.checkpoints.resume import finished_run, resolve_ckpt_path, resolve_last_checkpoint
from drifting_lightning.commands import UsageError
from drifting_lightning.commands.config_errors import (
    argparse_error,
    base_class_named,
    instantiation_error,
    null_argument,
    parse_error,
)
from drifting_lightning.commands.run_folder import RunConfigCallback, remove_failed_start, run_folder_entries
from drifting_lightning.console import notice

RESILIENCE_HELP = (
    "Make the run resumable, as every `drifting fit` is unless this is false: a ModelCheckpoint keeps last.ckpt "
    "(one is added, or save_last turned on), AtomicCheckpointIO writes checkpoints atomically, TrainingRNG keeps "
    "the training random state in them, GracefulStop turns SIGTERM/Ctrl-C into checkpoint-and-exit, "
    "EpochBoundaryResume makes checkpoints written between two epochs resume at the next one. A Trainer "
    "built in Python gets the same from drifting_lightning.commands.fit.harden_trainer."
)


def harden_trainer(config: dict[str, Any]) -> list[Callback]:
    """Make the Trainer arguments ``config`` resumable; returns the callbacks to add.

    Adds ``TrainingRNG``, ``GracefulStop``, ``EpochBoundaryResume`` and ``PurgeLogsAfterCheckpoint``; makes sure a
    ModelCheckpoint keeps ``last.ckpt`` unless ``enable_checkpointing`` is false: turns on ``save_last`` of the first
    configured one, or (none configured) adds ``ModelCheckpoint(filename="last", enable_version_counter=False)``,
    which overwrites the one file last.ckpt at every epoch end and when training stops (``save_last`` alone would
    write each checkpoint twice, under its epoch-step name and as last.ckpt). Uses ``AtomicCheckpointIO`` unless a
    CheckpointIO plugin is configured.
    """
    added: list[Callback] = [TrainingRNG(), GracefulStop(), EpochBoundaryResume(), PurgeLogsAfterCheckpoint()]
    configured = config.get("callbacks") or []
    checkpoints = [c for c in (configured if isinstance(configured, list) else [configured])
                   if isinstance(c, ModelCheckpoint)]  # fmt: skip
    if config.get("enable_checkpointing", True) is not False:
        if not checkpoints:
            added.append(ModelCheckpoint(filename="last", enable_version_counter=False))
        elif not any(c.save_last for c in checkpoints):
            checkpoints[0].save_last = True
    plugins = config.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        config["plugins"] = [*plugins, AtomicCheckpointIO()]
    return added


class DriftingArgumentParser(LightningArgumentParser):
    """A parse error of the whole command line is one line naming the key, the value and the choices
    (``DRIFTING_DEBUG=1``: jsonargparse's full report). Nested parsers (one per component) keep jsonargparse's
    errors: the outermost one reads their chain."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("DRIFTING_DEBUG"):
            return super().error(message, ex)
        options = [o for action in self._actions for o in action.option_strings]
        short = parse_error(message, ex) or argparse_error(message, options) or message.strip()
        raise UsageError(short) from ex

    def parse_args(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        # jsonargparse (4.53) hands an override two components deep (``--model.encoder.checkpoint null``: an argument
        # of a component inside the model) to the inner component's parser as f"--{key}={value}", with the value
        # already parsed: null arrives as the string "None" (a checkpoint path 'None', "expected an integer, got
        # 'None'"); a list or mapping arrives as its Python repr, whose None YAML reads as 'None' too. Those inner
        # parsers are of this class and never exit on error; there "None" is turned back into null (which also
        # lets users write None for null), and a repr into JSON.
        if not self.exit_on_error and args is not None and len(args) == 1:
            key, sep, value = str(args[0]).partition("=")
            if key.startswith("--") and sep and (value == "None" or value[:1] in "[{" and "None" in value):
                with contextlib.suppress(ValueError, SyntaxError, TypeError):  # else jsonargparse reads it as given
                    args = [f"{key}={json.dumps(ast.literal_eval(value))}"]
        return super().parse_args(args, *rest, **kwargs)


# The top-level keys of a `drifting fit` config (what --print_config writes).
CONFIG_SECTIONS = ("seed_everything", "trainer", "model", "data", "resilience", "optimizer", "lr_scheduler",
                   "ckpt_path", "weights_only")  # fmt: skip

# Lightning's words for an accelerator that this machine lacks ("gpu", and "cuda" or "mps" by name)
NO_ACCELERATOR = ("No supported gpu backend found", "since the accelerator is not available")


def _trainer_error(err: BaseException, trainer: Any) -> UsageError | None:
    """One line naming the Trainer argument that Lightning refused (``trainer`` the parsed section), or None."""
    if any(text in str(err) for text in NO_ACCELERATOR):
        return UsageError(f"trainer.accelerator {trainer.get('accelerator')}: torch sees no such device on this "
                          "machine; use --trainer.accelerator cpu (or auto, which takes a GPU where there is one)")
    named = re.match(r"`(\w+)`", str(err))  # Lightning names the argument it refuses
    if named and named.group(1) in trainer:
        return UsageError(f"trainer.{named.group(1)} {trainer[named.group(1)]}: {err}")
    return None


class DriftingCLI(LightningCLI):
    """LightningCLI with any LightningModule / LightningDataModule selected by class name in the config; ``fit``
    is its one subcommand (the module has no validation, test or predict step)."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        registry.load_components()
        super().__init__(
            model_class=pl.LightningModule,
            datamodule_class=pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=DriftingArgumentParser,
            save_config_callback=RunConfigCallback,
            trainer_defaults={"gradient_clip_val": 2.0, "default_root_dir": "runs"},
            save_config_kwargs={"overwrite": True},
            args=None if args is None else list(args),
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": LightningCLI.subcommands()["fit"]}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--resilience", type=bool, default=True, help=RESILIENCE_HELP)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        section = self.config[subcommand] if subcommand else self.config
        if (message := null_argument(section) or base_class_named(section)) is not None:
            raise UsageError(message)
        if subcommand:
            resolve_ckpt_path(self.config[subcommand])

    def before_instantiate_classes(self) -> None:
        # "last" is resolved after LightningCLI took the model's hyper-parameters from a checkpoint given by path:
        # a resume from last.ckpt runs with the config on the command line (its tensors checked against the checkpoint).
        if self.subcommand == "fit":
            resolve_last_checkpoint(self.config.fit)
            if (finished := finished_run(self.config.fit)) is not None:  # before the trainer: no folder, no files
                notice(finished)
                raise SystemExit(0)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (MisconfigurationException, ValueError, TypeError, FileNotFoundError) as err:
            config = self.config[self.subcommand] if self.subcommand else self.config
            short = None if isinstance(err, MisconfigurationException) else instantiation_error(err, config)
            short = short or _trainer_error(err, config.trainer)
            if short is None or os.environ.get("DRIFTING_DEBUG"):
                raise
            raise short from None  # DRIFTING_DEBUG=1 raises the whole chain above

    def _instantiate_trainer(self, config: dict, callbacks: list) -> pl.Trainer:
        # A progress bar in steps by default, unless the run disables bars or configures its own.
        configured = config.get("callbacks") or []
        has_bar = any(isinstance(c, ProgressBar) for c in [*configured, *callbacks])
        if config.get("enable_progress_bar", True) is not False and not has_bar:
            callbacks = [*callbacks, StepProgressBar()]
        section = self.config.get(self.subcommand) if self.subcommand else self.config
        if section is None or section.get("resilience", True):
            callbacks = [*callbacks, *harden_trainer(config)]
        return super()._instantiate_trainer(config, callbacks)

    def _run_subcommand(self, subcommand: str) -> None:
        # Rank 0 creates the run folder; when the run fails before its first step, it removes the folder again, or
        # what it added to a folder that was there.
        trainer = self.trainer
        folder = Path(trainer.log_dir or trainer.default_root_dir) if trainer.is_global_zero else None
        existing = run_folder_entries(folder) if folder is not None and folder.exists() else None
        new_parents = [p for p in folder.parents if not p.exists()] if folder is not None else []  # nearest first
        try:
            super()._run_subcommand(subcommand)
        except BaseException as err:
            if folder is not None:
                remove_failed_start(trainer, folder, existing, new_parents)
            # Lightning answers a Ctrl-C before training starts (GracefulStop handles it after) with exit(1).
            if isinstance(err, SystemExit) and isinstance(err.__context__, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            raise


def check_config_files(argv: Sequence[str]) -> None:
    """Every ``--config``/``-c`` file exists and is valid YAML; the error names the file and the line. Options before
    the first config are refused: jsonargparse applies arguments in order, so the file would override them."""
    first = next((i for i, a in enumerate(argv) if a in ("--config", "-c") or a.startswith("--config=")), None)
    early = [a for a in argv[:first] if a.startswith("-") and not a.startswith(("--print_config", "-h", "--help"))]
    if first is not None and early:
        raise UsageError(f"{early[0].split('=')[0]} comes before --config: arguments apply in order, so the config "
                         f"file would override it; put --config first (drifting fit --config FILE {early[0]} ...)")
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        if os.path.isdir(path):
            raise IsADirectoryError(f"config file {path} is a folder; give a YAML file in it (e.g. "
                                    "configs/toy/checkerboard.yaml)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path} does not exist (see configs/ for the shipped ones)")
        with open(path, encoding="utf-8") as f:
            try:
                content = yaml.safe_load(f)
            except yaml.YAMLError as err:
                raise ValueError(f"config file {path} is not valid YAML: {err}") from None
            except UnicodeDecodeError:
                raise ValueError(f"config file {path} is not a text file; give a YAML config") from None
        if content is None:
            raise ValueError(f"config file {path} is empty (or holds only comments); give it at least one key, "
                             "e.g. 'trainer: {max_steps: 100}', or leave it out")
        if not isinstance(content, dict):
            raise ValueError(f"config file {path} holds a {type(content).__name__}, not keys: a config is a mapping "
                             "of sections (model:, data:, trainer:)")
        unknown = [str(k) for k in content if k not in CONFIG_SECTIONS]
        if unknown:  # jsonargparse would drop a mistyped section without a word
            hint = registry.suggest(unknown[0], CONFIG_SECTIONS)
            raise ValueError(f"config file {path}: unknown section {unknown[0]!r}; {hint + ' A' if hint else 'a'} fit "
                             f"config holds {', '.join(CONFIG_SECTIONS)}")


def quiet_console() -> None:
    """Silence what tells a `drifting fit` user nothing they can act on, each by its exact message."""
    quiet = (
        # `drifting` passes its argv to LightningCLI on purpose.
        r"LightningCLI's args parameter is intended to run from within Python",
        # A deprecation inside Lightning's own use of torch's pytree.
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        # A resume writes into its own checkpoint folder; a new run into a used one is refused (run_folder).
        r"Checkpoint directory .* exists and is not empty",
        # The frozen encoder and the EMA copy are in eval mode on purpose.
        r"Found \d+ module\(s\) in eval mode",
        # The training streams have an exact __len__: they split their steps among workers.
        r"Your `IterableDataset` has `__len__` defined",
        # A sharded (FSDP2) last.ckpt folder is rewritten at every save on purpose; torch says so once per rank.
        r"Detected an existing checkpoint in .*, overwriting since self.overwrite=True",
    )
    for message in quiet:
        warnings.filterwarnings("ignore", message=message)
    for handler in logging.getLogger("lightning.pytorch").handlers:
        if not any(isinstance(f, _Quiet) for f in handler.filters):
            handler.addFilter(_Quiet())


class _Quiet(logging.Filter):
    """Drops Lightning's log lines that a `drifting fit` user cannot act on, each by its exact text."""

    QUIET = re.compile(
        r"💡 Tip: For seamless cloud logging"  # an advertisement, at every start
        r"|`weights_only` was not set, defaulting to `False`"  # GracefulStop's checkpoint on SIGTERM/Ctrl-C
        r"|(\[rank: \d+\] )?Received SIGTERM: \d+"  # says SIGTERM for a Ctrl-C; GracefulStop names the signal
        r"|\s*Detected KeyboardInterrupt, attempting graceful shutdown"  # `drifting` prints "interrupted"
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.QUIET.match(record.getMessage())


def main(argv: Sequence[str]) -> int:
    """``drifting fit ARGS``; returns the exit status (errors: the policy of ``drifting_lightning.commands``)."""
    quiet_console()
    check_config_files(argv)
    try:
        DriftingCLI(args=["fit", *argv])
    except SystemExit as exit_:  # --help, --print_config, a SIGTERM stop (GracefulStop sets the code)
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0

"""The checkpoint a ``drifting fit`` resumes from (what makes its trainer resumable: ``commands.fit.harden_trainer``).

- ``resolve_ckpt_path`` checks ``--ckpt_path`` before anything reads it (LightningCLI itself loads a file given there
  for its hyper-parameters, and would fail on a damaged one without naming it), and turns a run folder
  (``runs/<name>/version_<k>``) into its ``checkpoints/last.ckpt``.
- ``resolve_last_checkpoint`` makes ``drifting fit --ckpt_path last`` find the run's ``last.ckpt`` even though each
  run of the command would otherwise log into a new ``version_N`` folder.
- ``finished_run`` tells a resume that has nothing left to train (its checkpoint already at ``max_steps``).
"""

from __future__ import annotations

import glob
import importlib
import os
import re
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from drifting_lightning.checkpoints.reading import (
    LAST,
    is_distributed_checkpoint,
    last_in_run_folder,
    verify_checkpoint_file,
)
from drifting_lightning.console import notice

VERSION = re.compile(r"^version_\d+$")  # the version folders of TensorBoard and CSV loggers


def resolve_ckpt_path(config: Namespace) -> None:
    """Check the ``ckpt_path`` of a parsed subcommand section ``config``: a file must be a complete checkpoint; a run
    folder becomes its newest ``last.ckpt``; either way the run logs into the checkpoint's run folder as with "last".
    Keywords ("last", "best", "hpc"), registry names, remote URLs and sharded checkpoint folders are left to
    Lightning."""
    ckpt_path = config.get("ckpt_path")
    if not ckpt_path or ckpt_path in ("last", "best", "hpc") or "://" in ckpt_path or ckpt_path.startswith("registry:"):
        return
    if os.path.isdir(ckpt_path):
        if not is_distributed_checkpoint(ckpt_path):
            last = last_in_run_folder(Path(ckpt_path), "--ckpt_path", ", or 'last'")
            config.ckpt_path = str(last)
            _log_into_run_of(config, last)
            notice(f"--ckpt_path {ckpt_path} is a run folder: resuming from {last}")
        return
    verify_checkpoint_file(ckpt_path)
    _log_into_run_of(config, Path(ckpt_path))  # a file of runs/<name>/version_<k>/checkpoints/ continues that run


def finished_run(config: Namespace) -> str | None:
    """What ``drifting fit`` says instead of resuming, when the checkpoint file at ``ckpt_path`` of the parsed ``fit``
    section already reached ``trainer.max_steps``; None otherwise, or when unknown (no checkpoint file, no step limit,
    a sharded folder). Lightning itself resumes a finished run by starting (a new config and event file in the run
    folder) and stopping at once, saying only that ``max_steps`` was reached. The step is read with the tensors
    memory-mapped, not loaded."""
    path, max_steps = config.get("ckpt_path"), (config.get("trainer") or Namespace()).get("max_steps")
    if not path or not os.path.isfile(path) or not isinstance(max_steps, int) or max_steps < 0:
        return None
    try:
        step = torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("global_step")
    except Exception:  # Lightning's own load names what is wrong with the file
        return None
    if not isinstance(step, int) or isinstance(step, bool) or step < max_steps:
        return None
    return (f"{path} is at step {step}: the run already reached --trainer.max_steps {max_steps}, so there is nothing "
            f"to train. To train further, raise it (e.g. --trainer.max_steps {max(2 * step, step + 1)}).")


# ---- resuming with --ckpt_path last ------------------------------------------------------------------------
def resolve_last_checkpoint(config: Namespace) -> None:
    """For ``drifting fit --ckpt_path last``: set ``config.ckpt_path`` to the newest ``last.ckpt`` of the run, and point
    the logger at the version folder that holds it (``_log_into_run_of``). ``config``: the parsed ``fit`` section.

    Where the run keeps its checkpoints: a ModelCheckpoint's ``dirpath`` when set, else
    ``<logger save_dir>/<name>/<version>/checkpoints`` (every version is searched), else
    ``<default_root_dir>/checkpoints`` without a logger. No last.ckpt there: the run starts from scratch, as
    Lightning does, so one command line serves the first start and every restart of a preemptible job.
    """
    if config.get("ckpt_path") != "last":
        return
    trainer = config.trainer
    # glob patterns of the checkpoint folders
    folders = [glob.escape(d) for d in _checkpoint_dirpaths(trainer.get("callbacks"))]
    logger = _first_logger(trainer.get("logger"))
    root = glob.escape(trainer.get("default_root_dir") or ".")
    if isinstance(logger, Namespace):
        args = logger.init_args
        base = Path(args.save_dir) / str(args.get("name") or "")
        version = args.get("version")
        folder = "*" if version is None else glob.escape(version if isinstance(version, str) else f"version_{version}")
        folders.append(os.path.join(glob.escape(str(base)), folder, "checkpoints"))
    elif logger is False:
        folders.append(os.path.join(root, "checkpoints"))
    elif logger is True:
        folders.append(os.path.join(root, "lightning_logs", "*", "checkpoints"))
    if not folders:  # a logger with another folder layout: Lightning resolves "last" once the logger exists
        return
    found = [Path(p) for folder in folders for p in glob.glob(os.path.join(folder, "*")) if LAST.match(Path(p).name)]
    if not found:
        notice(f"--ckpt_path last: no last.ckpt in {', '.join(folders)}; starting a new run.")
        config.ckpt_path = None
        return
    newest = max(found, key=lambda p: p.stat().st_mtime)
    config.ckpt_path = str(newest)
    _log_into_run_of(config, newest)
    notice(f"--ckpt_path last: resuming from {newest}")


def _log_into_run_of(config: Namespace, checkpoint: Path) -> None:
    """Point a TensorBoard/CSV logger without a fixed ``version`` at the version folder whose ``checkpoints/`` holds
    ``checkpoint``, so that the resumed run writes its logs and checkpoints where the interrupted one did."""
    trainer = config.get("trainer") or Namespace()
    logger = _first_logger(trainer.get("logger"))
    if not isinstance(logger, Namespace) or logger.init_args.get("version") is not None:
        return
    base = Path(logger.init_args.save_dir) / str(logger.init_args.get("name") or "")
    run_folder = checkpoint.parent.parent
    if run_folder.parent.resolve() == base.resolve():
        logger.init_args.version = int(run_folder.name[8:]) if VERSION.match(run_folder.name) else run_folder.name


def _first_logger(logger: Any) -> Namespace | bool | None:
    """The logger whose folder holds the checkpoints (Lightning uses the first): its Namespace for a TensorBoard or
    CSV logger (save_dir/name/version layout), False for none, True for Lightning's default logger, None for a logger
    of another layout."""
    if isinstance(logger, list):
        logger = logger[0] if logger else False
    if logger is None or isinstance(logger, bool):
        return logger is not False
    if isinstance(logger, Namespace) and issubclass(_import(logger.class_path), (TensorBoardLogger, CSVLogger)):
        return logger
    return None


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _checkpoint_dirpaths(callbacks: Any) -> list[str]:
    dirpaths = []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []:
        dirpath = (cb.get("init_args") or Namespace()).get("dirpath") if isinstance(cb, Namespace) else None
        if dirpath and issubclass(_import(cb.class_path), ModelCheckpoint):
            dirpaths.append(dirpath)
    return dirpaths

"""The run folder of ``drifting fit``: never lose an earlier run, never leave an empty one behind.

- A resume keeps the run's ``config.yaml`` and writes its own config beside it (``config.resume-1.yaml``, ...).
- A new run refuses a folder that holds checkpoints of an earlier run (with ``--trainer.logger false`` every run
  writes to ``<default_root_dir>/checkpoints``): it says how to resume that run or where to start this one. Refusing
  is less surprising than a folder per run: ``--ckpt_path last`` keeps finding the checkpoints where the user left
  them, and nothing is overwritten silently.
- A run that fails before its first step removes the folder it created, or, in a folder that was there (a refused
  resume), the files it added: its config.resume-k.yaml and event files (``remove_failed_start``).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import SaveConfigCallback

# What a run writes into its folder before its first step: its config, the logger's hyper-parameters and events.
RUN_FILES = ("config.yaml", "config.resume-*.yaml", "hparams.yaml", "events.out.tfevents.*")


class RunConfigCallback(SaveConfigCallback):
    """LightningCLI's SaveConfigCallback, with the folder rules above."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir:
            log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective call: every rank makes it
            decision: tuple[str, str | None] = (self.config_filename, None)
            if trainer.is_global_zero:
                # ckpt_path of the parsed config ("last" already resolved): the trainer learns it after setup.
                decision = _decide(trainer, log_dir, self.config_filename, bool(self.config.get("ckpt_path")))
            self.config_filename, problem = trainer.strategy.broadcast(decision)
            if problem:
                raise ValueError(problem)
        super().setup(trainer, pl_module, stage)


def _decide(trainer: pl.Trainer, log_dir: Path, filename: str, resumed: bool) -> tuple[str, str | None]:
    """(the config file name of this run, the reason to refuse the folder or None)."""
    if resumed:
        stem, suffix = Path(filename).stem, Path(filename).suffix
        k = 1
        while (log_dir / f"{stem}.resume-{k}{suffix}").exists():
            k += 1
        return (f"{stem}.resume-{k}{suffix}" if (log_dir / filename).exists() else filename), None
    folders = {Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
    folders.add(log_dir / "checkpoints")
    found = sorted(p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt"))
    if not found:
        return filename, None
    shown = ", ".join(str(p) for p in found[:3]) + (f" (+{len(found) - 3} more)" if len(found) > 3 else "")
    return filename, (
        f"{shown}: checkpoint(s) of an earlier run, which this new run would overwrite: resume that run with "
        "--ckpt_path last, or start this one in another folder with --trainer.default_root_dir <new folder> (or with a "
        "logger, which makes a version folder per run)"
    )


def run_folder_entries(folder: Path) -> set[Path]:
    """The paths at most two levels below ``folder``: what ``fit`` lists before it starts, so that a failed start can
    remove what it added. A start writes only there (config files, the event file and hparams.yaml at the top;
    checkpoints/ below), and a full walk would be slow where the folder holds far more: without a logger it is
    ``default_root_dir``, by default the working directory (a full walk of this repository, 55k files with its
    virtual environment, took 1.2 s)."""
    top = list(folder.iterdir())
    return {*top, *(sub for path in top if path.is_dir() and not path.is_symlink() for sub in path.iterdir())}


def remove_failed_start(
    trainer: pl.Trainer, folder: Path, existing: set[Path] | None = None, new_parents: Sequence[Path] = ()
) -> None:
    """When the run ended before its first step (and before a resume restored one): remove ``folder`` if this run
    created it (``existing`` None) and it holds no checkpoint, with those of ``new_parents`` (the folders above it
    that this run created, nearest first) that are then empty; else the files of a run (``RUN_FILES``) and the empty
    folders in it that are not in ``existing`` (``run_folder_entries`` before the run; nothing deeper, and no file of
    another kind, is touched: the folder may be the working directory). Nothing they hold is worth keeping: a
    refused resume would otherwise leave a config.resume-k.yaml of a run that never ran, and empty folders make
    ``--ckpt_path last`` and TensorBoard harder to read. A run that got further keeps everything."""
    if trainer.global_step > 0 or not folder.is_dir():
        return
    if existing is None:
        if not any(folder.rglob("*.ckpt")):
            shutil.rmtree(folder, ignore_errors=True)
            for parent in new_parents:  # e.g. runs/<name>/, made for this run alone
                with contextlib.suppress(OSError):  # not empty: another run wrote into it meanwhile
                    parent.rmdir()
        return
    for path in sorted(run_folder_entries(folder), reverse=True):  # files before their folders
        if path in existing:
            continue
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        elif path.is_file() and any(path.match(pattern) for pattern in RUN_FILES):
            path.unlink(missing_ok=True)

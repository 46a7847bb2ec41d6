"""The CheckpointIO of every ``drifting fit``: checkpoints written atomically, and read through ``read_checkpoint``
(so a resume gets the same verification as every other loader)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from drifting_lightning.checkpoints.reading import read_checkpoint, verify_checkpoint_file
from drifting_lightning.files import atomic_write

# The file in which Lightning's spawn launcher (strategy "ddp_spawn") hands rank 0's weights back to the main process:
# a bare state dict, not a checkpoint.
SPAWN_HANDOVER = ".temp.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that never leaves a partial file under a checkpoint's name, and never loads a damaged one.

    Lightning's own atomic save writes into the system temp folder and moves the file; across file systems (node-local
    /tmp, shared run folder) that move is a copy, which a kill can cut short after the old file is gone. Here a local
    checkpoint is written with ``atomic_write`` (a temporary file in its own folder, flushed, renamed). Loading a
    local file goes through ``read_checkpoint``: CRC-32 of every archive member, a one-line refusal of files that are
    no checkpoint, finite weights. Remote (fsspec) paths keep Lightning's own save and load.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            kwargs = {} if map_location is None else {"map_location": map_location}
            return super().load_checkpoint(path, weights_only=weights_only, **kwargs)
        if Path(path).name == SPAWN_HANDOVER:
            verify_checkpoint_file(path)
            return torch.load(path, map_location=map_location, weights_only=weights_only is not False)
        # torch.load's default (weights_only=True) where Lightning leaves it open, as Lightning's own load does.
        return read_checkpoint(path, "cpu" if map_location is None else map_location, weights_only is not False)

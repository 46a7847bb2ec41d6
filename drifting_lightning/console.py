"""One-line notices to the person running a command (resume decisions, signal stops), on stderr, from rank 0."""

from __future__ import annotations

import sys

from lightning.pytorch.utilities import rank_zero_only


def notice(message: str) -> None:
    """One line on stderr, from rank 0 only (the rank is known from the environment before the trainer exists)."""
    if rank_zero_only.rank == 0:
        print(f"[drifting] {message}", file=sys.stderr, flush=True)

"""DataLoader worker set-up for training: stop signals belong to the main process."""

from __future__ import annotations

import signal
from types import FrameType


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``. SLURM sends SIGTERM to every process of a job and a terminal sends Ctrl-C's
    SIGINT to the whole foreground group. A worker that died of either failed the main process's next fetch
    ("DataLoader worker ... is killed by signal") before it could finish the step and save (GracefulStop). So a
    worker ignores SIGINT and its first SIGTERM. The main process shuts its workers down itself; one that does not
    stop gets SIGTERM from the DataLoader and again from multiprocessing at exit, and the second one ends it. A
    worker whose main process is gone exits by itself (PyTorch's worker watchdog).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the next SIGTERM ends the worker

    signal.signal(signal.SIGTERM, on_sigterm)

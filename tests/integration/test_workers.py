"""DataLoader workers leave SIGINT and a first SIGTERM to the main process; a second SIGTERM ends them."""

import multiprocessing
import os
import signal
import time

from drifting_lightning.data.workers import leave_stop_signals_to_the_main_process


def _worker(survived_signals) -> None:
    leave_stop_signals_to_the_main_process(0)
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C to the foreground group
    os.kill(os.getpid(), signal.SIGTERM)  # SLURM's SIGTERM to every process of the job
    survived_signals.set()
    time.sleep(60)


def test_worker_survives_the_jobs_signals_and_ends_at_the_second_sigterm():
    ctx = multiprocessing.get_context("fork")
    survived = ctx.Event()
    worker = ctx.Process(target=_worker, args=(survived,), daemon=True)
    worker.start()
    try:
        assert survived.wait(30), "the worker died of SIGINT or its first SIGTERM"
        assert worker.is_alive()
        worker.terminate()  # what the DataLoader and multiprocessing send at shutdown
        worker.join(30)
        assert worker.exitcode == -signal.SIGTERM
    finally:
        if worker.is_alive():
            worker.kill()

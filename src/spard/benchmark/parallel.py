"""Several worker processes on one machine, each running whole cells (``spard bench --jobs N``).

Each worker is a spawned process (no forked torch state) with its share of the cores, living for the whole
bench, so the training stack is imported once per worker, not once per cell; the alignment stages and then the
cells go to whichever worker is free next, so a long alignment stage (RepNoise) runs beside cells instead of
before them. Whether N workers beat one process with all the threads depends on the machine and the model:
``perf/bench_workers.py`` measures both on the machine at hand (README, Performance).

This module knows nothing about cells: it maps a picklable function over items in the workers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from spard.errors import SpardError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def threads_per_worker(jobs: int, cores: int | None = None) -> int:
    """Intra-op threads for each of ``jobs`` workers: the cores split evenly, at least one."""
    if jobs < 1:
        raise SpardError(f"jobs={jobs}: must be >= 1")
    return max(1, (cores or available_cores()) // jobs)


PARENT_POLL_SECONDS = 1.0
"""How often a worker checks that the bench process that started it is still alive."""


def _exit_when_orphaned(parent_pid: int) -> None:
    """Daemon-thread body: end this worker the moment its parent is gone. A bench killed by a signal runs no
    clean-up, and its workers would otherwise go on training cells (holding their run directories' locks and
    the cores) under a rerun; ending like ``kill -9`` is safe, since every write is atomic and runs resume."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


def _init_worker(threads: int, log_level: int, parent_pid: int) -> None:
    """Runs first in each worker: the orphan check, its thread count (before torch is imported here) and the
    parent's logging."""
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), name="spard-orphan-check", daemon=True).start()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    from spard.redact import configure_logging

    configure_logging(log_level)


class WorkerDied(SpardError):
    """A worker process ended without returning (killed, out of memory): its item and every item not started
    yet have no result."""


def map_in_workers(fn: Callable[[T], R], items: Sequence[T], *, jobs: int,
                   threads: int | None = None) -> Iterator[tuple[int, R]]:
    """Yield ``(index into items, fn(item))`` as workers finish them, ``jobs`` spawned processes at a time.

    ``fn`` and the items must be picklable (``fn`` a module-level function or a ``functools.partial`` of one).
    An exception ``fn`` raises reaches the caller when its result is taken; a worker that dies raises
    :class:`WorkerDied` and no further items are started. Interrupting the caller cancels the items not started;
    killing it (any signal, ``kill -9`` included) ends the workers within :data:`PARENT_POLL_SECONDS`.
    """
    import multiprocessing

    threads = threads or threads_per_worker(jobs)
    level = logging.getLogger().getEffectiveLevel()
    executor = ProcessPoolExecutor(max_workers=min(jobs, max(1, len(items))),
                                   mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(threads, level, os.getpid()))
    try:
        pending: dict[Future[R], int] = {executor.submit(fn, item): i for i, item in enumerate(items)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool as e:
                    raise WorkerDied(f"a worker process died while running item {index} (killed, or out of "
                                     f"memory); {len(pending)} items were not finished") from e
                yield index, result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)

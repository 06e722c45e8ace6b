"""One directory, one process: an exclusive lock on a run directory (or a cache entry) that names its owner.

The lock is the operating system's (``flock`` on ``<dir>/.spard.lock``), so it is stale the moment its owner
dies, however it dies (``kill -9`` included): the kernel releases it, and nothing is left to clean up. The
file holds the owner as ``pid@host`` (and since when), for the message a second process gets:

    spard: error: train.output_dir runs/x is in use by another spard process (pid 4242@node07, since ...)

A process may take the lock of a directory it already holds (``spard run`` = train + evaluate, a bench cell
= run): the lock is counted per process and released when the outermost holder leaves. Under ``torchrun`` /
``accelerate launch`` only the global rank 0 takes a run directory's lock (the other ranks write the same
run); every rank waits for a cache entry's lock (``wait=True``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from spard.errors import SpardError

__all__ = ["LOCK_FILE", "DirectoryLocked", "dir_lock", "lock_owner", "owner_text"]

log = logging.getLogger(__name__)

LOCK_FILE = ".spard.lock"
"""The lock file inside a locked directory (kept after release: deleting a lock file races other lockers)."""

_held: dict[str, list[int]] = {}  # resolved lock path -> [fd, depth] for the locks this process holds
_guard = threading.Lock()


class DirectoryLocked(SpardError):
    """Another process holds the directory's lock."""


def _owner_record() -> dict[str, object]:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": stamp}


def owner_text(record: dict[str, object] | None) -> str:
    """``pid 4242@node07, since ...`` for an owner record; ``owner unknown`` for none."""
    if not record:
        return "owner unknown"
    text = f"pid {record.get('pid')}@{record.get('host')}"
    return text + (f", since {record['since']}" if record.get("since") else "")


def lock_owner(directory: str | Path) -> dict[str, object] | None:
    """The owner record written in ``directory``'s lock file (``pid``, ``host``, ``since``), or None; it names
    the current owner only while the lock is held."""
    try:
        text = (Path(directory) / LOCK_FILE).read_text(encoding="utf-8")
        record = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _read_owner(fd: int) -> dict[str, object] | None:
    # the owner writes its record right after taking the lock: give it a moment
    for _ in range(20):
        try:
            record = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "null")
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict):
            return record
        time.sleep(0.025)
    return None


def _rank() -> int:
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


@contextlib.contextmanager
def dir_lock(directory: str | Path, *, what: str = "directory", wait: bool = False) -> Iterator[Path]:
    """Hold ``directory``'s lock for the block (creating the directory); yields the directory.

    ``wait=False`` (run directories): a second process gets :class:`DirectoryLocked` at once, naming the
    directory (as ``what``) and the owner. ``wait=True`` (a cache entry being built): wait for the owner to
    finish, saying whom it waits for.
    """
    import fcntl  # POSIX; imported here so the module imports anywhere

    directory = Path(directory)
    if not wait and _rank() != 0:  # a run's other ranks write it with rank 0; a cache entry's wait their turn
        yield directory
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = str((directory / LOCK_FILE).resolve())
    with _guard:
        held = _held.get(path)
        if held is not None:
            held[1] += 1
    if held is None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = owner_text(_read_owner(fd))
                if not wait:
                    raise DirectoryLocked(
                        f"{what} {directory} is in use by another spard process ({owner}); wait for it to "
                        "finish, or stop it, or choose another directory") from None
                log.info("waiting for %s %s: in use by %s", what, directory, owner)
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_owner_record()).encode("utf-8"), 0)
        except BaseException:
            os.close(fd)
            raise
        with _guard:
            _held[path] = [fd, 1]
    try:
        yield directory
    finally:
        with _guard:
            entry = _held[path]
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _held[path]
        if last:
            with contextlib.suppress(OSError):
                os.ftruncate(entry[0], 0)  # no owner named once released
            os.close(entry[0])  # closing the descriptor releases the flock

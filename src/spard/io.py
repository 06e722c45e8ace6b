"""Atomic file writes: a result or config file is either complete or absent, never half-written.

Every text these helpers write passes :func:`spard.redact.redact` (a judge's API key, ``Authorization`` /
``Bearer`` tokens), so no result, sample, metrics row or error file carries a secret to the disk."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from spard.redact import redact


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; when the block ends without error it replaces ``path``.

    For writers that want a file name (``savefig``, ``save_pretrained`` of one file): a crash leaves the
    previous file or none, never half of one. The file gets ordinary permissions (mkstemp makes 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (redacted) to ``path`` via a temp file in the same directory, fsync and ``os.replace``."""
    text = redact(text)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[Any]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def append_jsonl(path: str | Path, row: Any) -> None:
    """Append one line (for logs such as ``metrics.jsonl``, where a line is the unit of atomicity)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(redact(json.dumps(row, ensure_ascii=False, default=str)) + "\n")

"""Atomic writes: complete or absent, ordinary permissions, no temp file left behind."""

from __future__ import annotations

import os

import pytest

from spard.io import atomic_path, atomic_write_json, atomic_write_text


def _mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_atomic_write_replaces_and_gets_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "sub" / "a.txt", "one")
        atomic_write_json(path, {"x": 1})
        assert path.read_text() == '{\n  "x": 1\n}\n' and _mode(path) == 0o644
    finally:
        os.umask(umask)
    assert os.listdir(tmp_path / "sub") == ["a.txt"]


def test_failed_write_keeps_the_previous_file_and_no_temp(tmp_path):
    path = atomic_write_text(tmp_path / "plot.png", "old")
    with pytest.raises(RuntimeError, match="crash"), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["plot.png"]

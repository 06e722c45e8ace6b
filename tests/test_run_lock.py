"""One run directory, one process: the lock every writing command takes (train, run, eval, bench cells)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spard.benchmark.grid import Cell
from spard.benchmark.runner import _run_one
from spard.locking import LOCK_FILE, DirectoryLocked, dir_lock, lock_owner

ROOT = Path(__file__).resolve().parents[1]


def test_a_held_directory_is_refused_naming_the_owner_and_reentrant_in_its_owner(tmp_path):
    run = tmp_path / "run"
    with dir_lock(run, what="train.output_dir"):
        owner = lock_owner(run)
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with dir_lock(run):  # the same process again (spard run = train + evaluate): allowed
            pass
        assert lock_owner(run) is not None  # the inner block did not release it
        # another process is refused at once, with the directory and pid@host in the message
        code = f"from spard.locking import dir_lock\nwith dir_lock({str(run)!r}, what='train.output_dir'): pass"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        assert proc.returncode != 0
        assert f"train.output_dir {run} is in use by another spard process (pid {os.getpid()}@" \
               f"{socket.gethostname()}" in proc.stderr, proc.stderr[-2000:]
    assert lock_owner(run) is None  # released, and no stale owner left behind


def test_other_ranks_of_a_distributed_run_do_not_take_the_run_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with dir_lock(tmp_path / "run"):
        assert not (tmp_path / "run" / LOCK_FILE).exists()


RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import spard.jobs.finetune  # the heavy imports (torch, transformers) done before the start
    from spard.cli import main
    go = Path(sys.argv[1])
    Path(f"{go}.ready.{sys.argv[2]}").touch()
    while not go.exists():  # all racers start at the same instant
        time.sleep(0.001)
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.multiprocess
def test_two_spard_train_into_one_directory_at_the_same_instant_one_wins(tmp_path, tiny_tok):
    """Two ``spard train`` processes released by one trigger file: exactly one trains, the other exits with an
    error naming the directory and the owner, and the run directory holds one run's metrics."""
    from spard.testing import save_tiny_chat_model

    model_dir = save_tiny_chat_model(tmp_path / "model", tiny_tok)
    out, go = tmp_path / "run", tmp_path / "go"
    (tmp_path / "racer.py").write_text(RACER)
    args = ["train", "-", f"model.name_or_path={model_dir}", f"train.output_dir={out}", "align.enabled=false",
            "data.n_train=8", "data.max_length=64", "train.batch_size=4", "train.max_steps=3", "lora.r=2",
            "defense.name=sft", "attack.harmful_ratio=0.25"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    args[1] = str(config)
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "racer.py"), str(go), str(i), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 300
    while not all(Path(f"{go}.ready.{i}").exists() for i in range(2)):  # both imported and wait on the trigger
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a racer did not get ready"
        time.sleep(0.01)
    go.touch()
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], [(c, e[-1500:]) for c, _, e in results]
    loser = next(e for c, _, e in results if c == 2)
    assert f"train.output_dir {out} is in use by another spard process (pid " in loser, loser[-2000:]
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(steps) == 3  # one run's rows, not two runs interleaved


@pytest.mark.multiprocess
def test_a_lock_is_stale_once_its_owner_is_killed(tmp_path):
    run = tmp_path / "run"
    code = (f"from spard.locking import dir_lock\nimport time\nwith dir_lock({str(run)!r}):\n"
            "    print('locked', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryLocked, match=rf"pid {proc.pid}@"):
            with dir_lock(run):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    with dir_lock(run):  # the kernel released the dead owner's lock: nothing to clean up
        assert lock_owner(run)["pid"] == os.getpid()


def test_a_bench_cell_running_elsewhere_is_left_alone(tmp_path):
    from spard.config import load_config

    cfg = load_config(None, [f"train.output_dir={tmp_path / 'cell'}"])
    cell = Cell(index=0, name="cell", defense="sft", task="gsm8k", attack="none", attack_kind="none", ratio=None,
                seed=0, columns=(), config=cfg)
    calls = []
    code = (f"from spard.locking import dir_lock\nimport time\nwith dir_lock({str(tmp_path / 'cell')!r}):\n"
            "    print('locked', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        assert proc.stdout.readline().strip() == "locked"
        outcome = _run_one(cell, calls.append, retry=0)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert outcome.status == "failed" and calls == []
    assert f"in use by another spard process (pid {proc.pid}@" in outcome.error
    assert not (tmp_path / "cell" / "error.txt").exists()  # nothing written into the other process's run

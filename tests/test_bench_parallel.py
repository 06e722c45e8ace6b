"""``spard bench --jobs N``: cells in spawned worker processes, each with its share of the cores; crashes and a
dead worker are failures that the next invocation resumes, never lost cells. The cell runner is the fake one of
test_benchmark (real run directories, no training); it also records which process ran the cell."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from spard.benchmark import load_bench, run_cells
from spard.benchmark.parallel import threads_per_worker
from spard.benchmark.status import cell_status
from spard.config import RunConfig
from spard.errors import SpardError
from test_benchmark import fake_run, no_align, write_bench

pytestmark = pytest.mark.multiprocess


def run_and_record_process(cfg: RunConfig) -> None:
    """fake_run, plus the pid and torch thread count of the process that ran the cell."""
    import torch

    fake_run(cfg)
    (Path(cfg.train.output_dir) / "process.json").write_text(
        json.dumps({"pid": os.getpid(), "threads": torch.get_num_threads()}))


def crash_on_ratio_zero(cfg: RunConfig) -> None:
    if cfg.attack.harmful_ratio == 0:
        raise RuntimeError("boom: simulated crash")
    run_and_record_process(cfg)


def kill_own_worker_on_ratio_zero(cfg: RunConfig) -> None:
    if cfg.attack.harmful_ratio == 0:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
    run_and_record_process(cfg)


def four_cells(tmp_path: Path, **changes):
    return load_bench(write_bench(tmp_path, attacks=[{"name": "bt", "overrides": {"attack.name": "harmful_mix"}}],
                                  ratios=[0, 0.3], seeds=[0], **changes))


def test_threads_split_the_cores_between_workers():
    assert threads_per_worker(2, cores=2) == 1
    assert threads_per_worker(2, cores=8) == 4
    assert threads_per_worker(3, cores=2) == 1  # never zero
    assert threads_per_worker(1, cores=8) == 8
    with pytest.raises(SpardError, match="jobs=0"):
        threads_per_worker(0, cores=2)


def test_cells_run_in_worker_processes_with_their_share_of_threads(tmp_path):
    b = four_cells(tmp_path)
    outcomes = run_cells(b, run_fn=run_and_record_process, align_fn=no_align, jobs=2)
    assert [o.status for o in outcomes] == ["ran"] * 4
    assert [o.cell.index for o in outcomes] == [0, 1, 2, 3]  # in cell order, whichever worker finished first
    seen = [json.loads((c.run_dir / "process.json").read_text()) for c in b.cells]
    pids = {s["pid"] for s in seen}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert {s["threads"] for s in seen} == {threads_per_worker(2)}
    assert all(cell_status(c) == "done" for c in b.cells)
    again = run_cells(b, run_fn=run_and_record_process, align_fn=no_align, jobs=2)
    assert [o.status for o in again] == ["skipped"] * 4


def test_a_crashing_cell_in_a_worker_is_recorded_and_the_others_run(tmp_path):
    b = four_cells(tmp_path)
    outcomes = run_cells(b, run_fn=crash_on_ratio_zero, align_fn=no_align, jobs=2)
    failed = [o for o in outcomes if o.status == "failed"]
    assert failed and all(o.cell.ratio == 0 for o in failed)
    assert all(o.error == "RuntimeError: boom: simulated crash" for o in failed)
    assert all(o.status == "ran" for o in outcomes if o.cell.ratio != 0)
    assert all("boom" in (o.cell.run_dir / "error.txt").read_text() for o in failed)


def test_a_dead_worker_fails_the_unfinished_cells_and_a_rerun_finishes_them(tmp_path):
    b = four_cells(tmp_path)
    outcomes = run_cells(b, run_fn=kill_own_worker_on_ratio_zero, align_fn=no_align, jobs=2)
    failed = [o for o in outcomes if o.status == "failed"]
    assert failed, "a killed worker must fail cells, not lose them"
    assert all("worker process died" in o.error for o in failed)
    assert {o.status for o in outcomes} <= {"ran", "failed"}
    again = run_cells(b, run_fn=run_and_record_process, align_fn=no_align, jobs=2)
    assert {o.cell.index for o in again if o.status == "ran"} == {o.cell.index for o in failed}
    assert all(cell_status(c) == "done" for c in b.cells)


def test_jobs_must_be_positive(tmp_path):
    with pytest.raises(SpardError, match="jobs=0"):
        run_cells(four_cells(tmp_path), run_fn=run_and_record_process, align_fn=no_align, jobs=0)


def record_alignment(cfg: RunConfig) -> None:
    with open(os.environ["SPARD_TEST_ALIGN_LOG"], "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "model": cfg.model.name_or_path}) + "\n")


def failing_alignment(cfg: RunConfig) -> None:
    raise RuntimeError("alignment broke")


def test_alignments_run_once_in_the_workers_and_a_broken_one_stops_the_bench(tmp_path, monkeypatch):
    log = tmp_path / "align.log"
    monkeypatch.setenv("SPARD_TEST_ALIGN_LOG", str(log))
    b = four_cells(tmp_path / "a", align={"enabled": True})
    outcomes = run_cells(b, run_fn=run_and_record_process, align_fn=record_alignment, jobs=2)
    assert [o.status for o in outcomes] == ["ran"] * 4
    (entry,) = [json.loads(line) for line in log.read_text().splitlines()]  # one distinct alignment stage
    assert entry["pid"] != os.getpid()
    broken = four_cells(tmp_path / "b", align={"enabled": True})
    with pytest.raises(RuntimeError, match="alignment broke"):
        run_cells(broken, run_fn=run_and_record_process, align_fn=failing_alignment, jobs=2)


def test_one_alignment_stage_per_aligned_model(tmp_path):
    from spard.benchmark.runner import _alignments_needed

    def needed(**defense_overrides) -> int:
        b = load_bench(write_bench(tmp_path, base={"train.max_steps": 2, "align.enabled": True}, ratios=[0.1],
                                   attacks=[{"name": "bt", "overrides": {"attack.name": "harmful_mix"}}],
                                   defenses=["sft", {"name": "safeinstr", "overrides": defense_overrides}]))
        return len(_alignments_needed(b.cells))

    assert needed() == 1  # every cell fine-tunes the same aligned model
    assert needed(**{"align.defense.name": "vaccine"}) == 2
    assert needed(**{"train.bf16": "false"}) == 2  # a pinned precision aligns a model of its own
    assert needed(**{"train.lr": 1e-3}) == 1


def _running(process) -> bool:  # noqa: ANN001
    """Alive and not a zombie (an orphan is reaped by whoever adopts it, maybe late)."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def record_pid_and_sleep(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    time.sleep(120)


def test_workers_end_when_the_bench_process_is_killed(tmp_path):
    import subprocess
    import sys

    import psutil

    files = [tmp_path / "w0", tmp_path / "w1"]
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from test_bench_parallel import record_pid_and_sleep; "
              "from spard.benchmark.parallel import map_in_workers; "
              "list(map_in_workers(record_pid_and_sleep, sys.argv[2:], jobs=2))")
    bench = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parent), *map(str, files)])
    workers: list = []
    try:
        deadline = time.monotonic() + 120
        while not all(f.is_file() and f.read_text() for f in files):
            assert bench.poll() is None and time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        workers = [psutil.Process(int(f.read_text())) for f in files]
        bench.send_signal(signal.SIGKILL)  # no clean-up runs in the bench process
        bench.wait()
        deadline = time.monotonic()
        alive = workers
        while alive and time.monotonic() < deadline + 10:
            time.sleep(0.2)
            alive = [p for p in alive if _running(p)]
        assert not alive, f"workers outlived the bench: {[p.pid for p in alive]}"
    finally:
        bench.kill()
        for process in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()

"""SafeGrad under DDP: 2 CPU processes (gloo) end with the same adapter as 1 process on the same global batches.

Each optimizer step uses the whole 8-example fine-tuning set (per-device batch 4 × 2 ranks vs batch 8), so the
global batch is identical whatever order the samplers draw in; the alignment batch (4 examples) is split 2 + 2
across ranks and the KL is normalised by the token count of the whole batch, so g_a matches too.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spard.testing import assert_same_adapter

WORKER = Path(__file__).with_name("ddp_safegrad_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"
OVERRIDES = [
    "align.enabled=false", "data.n_train=8", "data.max_length=96", "train.max_steps=4", "train.lr=1e-2",
    "train.save_steps=100", "lora.r=4", "lora.dropout=0", "attack.harmful_ratio=0.5", "defense.name=safegrad",
    "defense.alignment_examples=20", "defense.alignment_max_length=96", "defense.alignment_batch_size=4",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "SPARD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiprocess
@pytest.mark.parametrize("checkpointing", ["false", "true", "reentrant"])
def test_ddp_two_processes_match_single_process(checkpointing, tmp_path):
    """The DDP run also checkpoints its layers as ``checkpointing`` says (reentrant: g_a by a plain backward after
    DDP's, non-reentrant: autograd.grad); the single process does not."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run([sys.executable, str(WORKER), str(single), *OVERRIDES, "train.batch_size=8"], tmp_path)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(WORKER), str(ddp), *OVERRIDES, "train.batch_size=4", f"train.gradient_checkpointing={checkpointing}"],
        tmp_path)

    info = json.loads((ddp / "worker.json").read_text())
    assert info["world_size"] == 2 and info["distributed_type"] == "MULTI_CPU"
    assert info["model_wrapped"] == "DistributedDataParallel"
    # both ranks hold bitwise the same adapter: the all-reduced g_u and g_a gave them the identical update
    rank0, rank1 = load_file(ddp / "lora_rank0.safetensors"), load_file(ddp / "lora_rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    r1, r2 = rows(single), rows(ddp)
    assert [r["step"] for r in r2] == [1, 2, 3, 4]
    assert sum(r["align_projected"] for r in r1) >= 2  # the surgery branch ran
    for a, b in zip(r1, r2):
        assert a["align_projected"] == b["align_projected"]
        for key in ("loss", "align_kl", "align_cosine", "align_grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    # fp32 on CPU: the two runs differ only in summation order (per-rank partial sums + all-reduce)
    assert_same_adapter(single / "final", ddp / "final", rtol=1e-5, atol=1e-6)

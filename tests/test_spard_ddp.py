"""SPARD under DDP: 2 CPU processes (gloo) must end with the adapter of one process on the same global batches.

Why the batches are the same: the training set has 4 examples and the global batch is 4 (2 per rank x 2
ranks vs 4 x 1), so every step uses the whole set whatever order the DistributedSampler or RandomSampler
picks; LoRA dropout is 0. The global safety batch is the same too (1 per rank x 2 vs 2 x 1, drawn from one
cursor). The task loss is a global token mean in both (HF ``average_tokens_across_devices``), and SPARD
all-reduces its loss sums, token counts and gradients, so both runs compute the same quantities; only the
floating-point summation order differs (per-rank partial sums, different padding widths).

Tolerance: atol 2e-5 on adapter weights of magnitude ~0.25 after 4 steps. Measured differences are ~3e-7
(halfspace) and ~4e-6 (reference: Adam divides by sqrt(v), which magnifies the reordering noise of tiny
gradients). A wrong reduction is far outside it: with the gradient all-reduce disabled, the per-step
safety gradient norms already differ by ~40 % (0.196 vs 0.125) and the test fails there.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ddp_spard_worker.py")
PROJECTIONS = ("halfspace", "reference")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}",
        "CUDA_VISIBLE_DEVICES": "",
        "SPARD_CACHE": str(tmp_path / "spard-cache"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(var, None)
    return env


def run(cmd: list[str], env: dict[str, str], timeout: int = 120) -> None:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")


@pytest.mark.multiprocess
def test_ddp_matches_single_process(tmp_path: Path) -> None:
    env = worker_env(tmp_path)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run([sys.executable, str(WORKER), str(single), "--batch-size", "4", "--safety-batch-size", "2"], env)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(WORKER), str(ddp), "--batch-size", "2", "--safety-batch-size", "1"], env)

    for projection in PROJECTIONS:
        s = json.loads((single / projection / "worker.json").read_text())
        d = json.loads((ddp / projection / "worker.json").read_text())
        assert s["world_size"] == 1 and d["world_size"] == 2
        assert d["wrapped"] == "DistributedDataParallel", d["wrapped"]
        # the random tiny model is unsafe: every step projects, on both
        assert [r["safety_projections"] for r in d["safety"]] == [1, 2, 3, 4]
        assert [r["safety_projections"] for r in s["safety"]] == [1, 2, 3, 4]
        for a, b in zip(s["safety"], d["safety"]):
            assert a["safety_loss"] == pytest.approx(b["safety_loss"], rel=1e-5), projection
            assert a["safety_grad_norm"] == pytest.approx(b["safety_grad_norm"], rel=1e-4), projection

        wa = load_file(single / projection / "final" / "adapter_model.safetensors")
        wb = load_file(ddp / projection / "final" / "adapter_model.safetensors")
        assert wa.keys() == wb.keys() and len(wa) > 0
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=2e-5, msg=f"{projection}: {k}")
        # and the runs did move the adapter (lora_B starts at zero)
        assert max(float(v.abs().max()) for k, v in wa.items() if "lora_B" in k) > 1e-3

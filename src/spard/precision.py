"""bf16 where it pays: ``train.bf16=auto`` and ``eval.bf16=auto``.

On a GPU, ``auto`` means bf16 where the GPU supports it. On a CPU it depends on the processor: with AMX or
AVX512-BF16 a bf16 matmul can be several times faster than fp32, on an AVX2-only CPU it is emulated and many
times slower. A flag in ``/proc/cpuinfo`` is not a measurement (a whole step can be slower than its matmuls
suggest: casts, the fp32 loss over the vocabulary, the small LoRA matmuls), so ``auto`` on a CPU measures:

1. the three matmuls of a linear layer's forward and backward at the model's own widths, fp32 vs bf16; if bf16
   is not ``BF16_MIN_SPEEDUP`` faster there, a whole step cannot be either and fp32 is chosen at once;
2. otherwise, one forward + backward of the model itself on a fixed batch, fp32 vs bf16 autocast (interleaved).

bf16 is chosen only if step 2 is also ``BF16_MIN_SPEEDUP`` faster. Decisions are kept for the process and in
``<spard cache>/precision.json``, keyed by the CPU model, its flags, torch's version, the thread count and the
model's shape, so each machine measures once. ``perf/cpu_bf16.py`` prints the figures behind a decision.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["BF16_MIN_SPEEDUP", "Bf16Decision", "matmul_speedup", "step_speedup", "decide_cpu_bf16", "use_bf16",
           "bf16_autocast"]

log = logging.getLogger(__name__)

BF16_MIN_SPEEDUP = 1.3
"""How much faster (fp32 time / bf16 time) bf16 must be on a CPU for ``auto`` to pick it."""
MIN_HIDDEN = 256
"""Models narrower than this stay fp32 on a CPU without measuring: their matmuls are too small for bf16 to pay,
and a probe would time call overhead (the tiny test models are 32 wide)."""

_DECISIONS: dict[str, Bf16Decision] = {}


@dataclass(frozen=True)
class Bf16Decision:
    """What ``auto`` chose on this CPU for one model shape, and the measurements behind it."""

    use_bf16: bool
    matmul_speedup: float
    """fp32 / bf16 time of a linear layer's three matmuls at the model's widths."""
    step_speedup: float | None
    """fp32 / bf16-autocast time of one forward + backward of the model (None: not measured, step 1 decided)."""


def _best_of(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm-up: allocator, kernel selection
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_speedup(in_features: int, out_features: int, tokens: int = 256, reps: int = 3) -> float:
    """fp32 time / bf16 time of ``y = x W`` and its two backward matmuls (``dx = dy Wᵀ``, ``dW = xᵀ dy``) for
    ``tokens`` rows, on the CPU."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_features, generator=gen)
    w = torch.randn(in_features, out_features, generator=gen)
    dy = torch.randn(tokens, out_features, generator=gen)

    def run(dtype: torch.dtype) -> Callable[[], Any]:
        a, b, c = x.to(dtype), w.to(dtype), dy.to(dtype)
        return lambda: (a @ b, c @ b.T, a.T @ c)

    return _best_of(run(torch.float32), reps) / _best_of(run(torch.bfloat16), reps)


def step_speedup(model: torch.nn.Module, *, tokens: int = 128, rows: int = 2, reps: int = 2) -> float:
    """fp32 time / bf16-autocast time of one forward + backward of ``model`` (a causal LM) on a fixed batch of
    ``rows`` × ``tokens`` token ids, measured alternately (median of ``reps``, fewer when the first bf16 step is
    already no faster than fp32's); gradients are discarded and the mode restored."""
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    ids = ids.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()  # no dropout: both precisions do the same work

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        if params:
            torch.autograd.grad(loss, params, allow_unused=True)
        return time.perf_counter() - start

    try:
        step(False), step(True)  # warm-up
        fp32, bf16 = [], []
        for _ in range(reps):
            fp32.append(step(False))
            bf16.append(step(True))
            if bf16[-1] >= fp32[-1]:
                break  # bf16 no faster at all: more (slow) bf16 steps cannot make it win; stop paying for them
    finally:
        model.train(was_training)
    return statistics.median(fp32) / statistics.median(bf16)


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what ``platform`` knows)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _machine_key(extra: dict[str, Any]) -> str:
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    blob = json.dumps({"cpu": cpu_model_name(), "flags": flags, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), **extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _decisions_file() -> Path:
    from spard.models import cache_dir

    return cache_dir() / "precision.json"


def _shape(model: torch.nn.Module) -> dict[str, int]:
    config = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 0) or model.get_input_embeddings().weight.shape[1])
    inter = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    return {"hidden": hidden, "intermediate": inter, "layers": int(getattr(config, "num_hidden_layers", 0) or 0),
            "vocab": int(model.get_input_embeddings().weight.shape[0])}


def decide_cpu_bf16(model: torch.nn.Module, *, use_cache: bool = True) -> Bf16Decision:
    """Measure (or recall) whether bf16 autocast is ``BF16_MIN_SPEEDUP`` faster than fp32 for ``model`` on this
    CPU. With the cache, processes measure one at a time (a file lock beside ``precision.json``): two workers
    of ``spard bench --jobs 2`` starting together would otherwise each time the other's load, and disagree."""
    shape = _shape(model)
    key = _machine_key(shape)
    if use_cache and key in _DECISIONS:
        return _DECISIONS[key]
    if not use_cache:
        return _measure(model, shape)
    from filelock import FileLock

    path = _decisions_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        stored = _stored_decisions(path)  # read under the lock: another process may have just measured
        if isinstance(stored.get(key), dict):
            decision = Bf16Decision(**stored[key])
        else:
            decision = _measure(model, shape)
            from spard.io import atomic_write_json

            with contextlib.suppress(OSError):
                stored[key] = asdict(decision)
                atomic_write_json(path, stored)
    _DECISIONS[key] = decision
    return decision


def _stored_decisions(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with contextlib.suppress(ValueError, OSError):
        stored = json.loads(path.read_text())
        if isinstance(stored, dict):
            return stored
    return {}


def _measure(model: torch.nn.Module, shape: dict[str, int]) -> Bf16Decision:
    mm = matmul_speedup(shape["hidden"], shape["intermediate"])
    step = step_speedup(model) if mm >= BF16_MIN_SPEEDUP else None
    decision = Bf16Decision(use_bf16=step is not None and step >= BF16_MIN_SPEEDUP, matmul_speedup=round(mm, 3),
                            step_speedup=None if step is None else round(step, 3))
    log.info("bf16 on this CPU (%d thread(s)): matmul %.2fx%s faster than fp32 -> %s", torch.get_num_threads(),
             mm, "" if step is None else f", model step {step:.2f}x", "bf16" if decision.use_bf16 else "fp32")
    return decision


def use_bf16(setting: str | bool, *, model: torch.nn.Module | None = None) -> bool:
    """Whether a ``bf16`` setting (``auto``, ``true``, ``false``) means bf16 autocast for ``model`` here."""
    value = str(setting).lower()
    if value in ("true", "false"):
        return value == "true"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if model is None or next(model.parameters()).dtype != torch.float32:
        return False  # nothing to measure with; a model already in low precision is not autocast
    if _shape(model)["hidden"] < MIN_HIDDEN:
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False  # each rank would time for itself and might decide otherwise: set train.bf16 explicitly
    return decide_cpu_bf16(model).use_bf16


@contextlib.contextmanager
def bf16_autocast(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """bf16 autocast on the model's device type when ``enabled``; nothing otherwise."""
    if not enabled:
        yield
        return
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=torch.bfloat16):
        yield

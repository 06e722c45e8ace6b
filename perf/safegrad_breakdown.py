"""Where SafeGrad's extra time per step goes, on the step-overhead benchmark's setting.

Run: ``PYTHONPATH=src python perf/safegrad_breakdown.py [--max-length 128] [--steps 8]``

Drives one SafeGrad trainer exactly as ``perf/step_overhead.py`` does (same model, data, batches) and times the
parts of its ``before_optimizer_step``: the current model's forward over the alignment batch with the KL
against the cached base distributions (``cached_alignment_kl_sum``), the backward (``torch.autograd.grad``),
and the surgery (``safegrad_update``). Then the fixed cost of one forward + backward of the LoRA model over
2 x 8 tokens, the part of a pass that does not shrink with its length. Medians over the steps after the first.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import step_overhead  # noqa: E402
import torch  # noqa: E402

import spard.alignment_kl  # noqa: E402
import spard.surgery  # noqa: E402

SECONDS: dict[str, list[float]] = collections.defaultdict(list)


def timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        SECONDS[label].append(time.perf_counter() - start)
        return out

    return wrapper


def fixed_pass_seconds(model: Any, repeats: int = 4) -> float:
    """Median forward + backward time of the model over a 2 x 8-token batch (its length-independent cost)."""
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(100, 1000, (2, 8))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1, use_cache=False)
        torch.autograd.grad(out.logits.float().sum(), params, allow_unused=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("runs/safegrad_breakdown"))
    args = ap.parse_args()

    from spard.config import ModelArgs
    from spard.models import load_model

    # The defense imports these functions from their modules when a step runs, so patching the modules works.
    spard.alignment_kl.cached_alignment_kl_sum = timed("forward + KL", spard.alignment_kl.cached_alignment_kl_sum)
    spard.surgery.safegrad_update = timed("surgery", spard.surgery.safegrad_update)
    autograd_grad = torch.autograd.grad
    torch.autograd.grad = timed("backward", autograd_grad)
    torch.set_num_threads(2)
    n = args.steps
    cfg = step_overhead.bench_config("safegrad", batch_size=8, n_steps=n, max_length=args.max_length, out=args.out)
    base, tokenizer = load_model(ModelArgs())
    records, batches = step_overhead.fixed_batches(cfg, tokenizer, n)
    trainer = step_overhead.DrivenTrainer("safegrad", cfg, base, tokenizer, records, args.out, n)
    hooks = [trainer.step(batch)[2] for batch in batches]
    for label, values in SECONDS.items():
        print(f"{label:<14}{statistics.median(values[1:]):8.3f} s")
    print(f"{'whole hook':<14}{statistics.median(hooks[1:]):8.3f} s")
    torch.autograd.grad = autograd_grad
    fixed = fixed_pass_seconds(trainer.model)
    print(f"fixed cost of a forward + backward (2 x 8 tokens): {fixed:.3f} s")


if __name__ == "__main__":
    main()

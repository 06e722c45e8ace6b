"""Batched vs one-at-a-time greedy generation on the embedded SmolLM2-135M-Instruct (CPU, 2 threads).

Run: ``PYTHONPATH=src python perf/generation.py [--prompts 32] [--max-new-tokens 64] [--batch-size 16]``.
Prints prompts/s for both ways on the same prompts, the speed-up, and how many greedy outputs are
identical token for token (fp32 left padding can change a near-tie argmax; the count is reported as is).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from spard.config import ModelArgs
    from spard.data.sources import load_source
    from spard.evaluate.generation import generate_ids
    from spard.models import load_model

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_model(ModelArgs())  # the embedded default (converted once, then cached)
    model.eval()
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f}s (threads={torch.get_num_threads()})")
    prompts = [r.prompt for r in load_source("I-MaliciousInstructions", split="test", limit=args.prompts)]
    kw = dict(max_new_tokens=args.max_new_tokens, progress=False)

    generate_ids(model, tok, prompts[:2], batch_size=2, **kw)  # warm-up (allocator, kernels)

    t0 = time.perf_counter()
    batched = generate_ids(model, tok, prompts, batch_size=args.batch_size, **kw)
    t_batched = time.perf_counter() - t0

    t0 = time.perf_counter()
    sequential = [generate_ids(model, tok, [p], batch_size=1, **kw)[0] for p in prompts]
    t_seq = time.perf_counter() - t0

    n = len(prompts)
    same = sum(a == b for a, b in zip(batched, sequential))
    same_prefix16 = sum(a[:16] == b[:16] for a, b in zip(batched, sequential))
    new_tokens = sum(map(len, batched))
    print(f"prompts={n} max_new_tokens={args.max_new_tokens} (I-MaliciousInstructions, greedy, fp32)")
    print(f"batched  (batch {args.batch_size:>2}): {n / t_batched:7.2f} prompts/s  ({t_batched:6.1f}s, "
          f"{new_tokens / t_batched:6.1f} new tokens/s)")
    print(f"sequential (batch  1): {n / t_seq:7.2f} prompts/s  ({t_seq:6.1f}s, "
          f"{sum(map(len, sequential)) / t_seq:6.1f} new tokens/s)")
    print(f"speed-up batched/sequential: {t_seq / t_batched:.2f}x")
    print(f"identical greedy outputs: {same}/{n} (first 16 tokens identical: {same_prefix16}/{n})")


if __name__ == "__main__":
    main()

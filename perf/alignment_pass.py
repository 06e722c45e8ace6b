"""SafeGrad's alignment pass: the alignment batch padded, packed into one row, or one forward per example.

Run: ``PYTHONPATH=src python perf/alignment_pass.py [--pairs 10] [--batch 2] [--max-length 128]``

Model: the embedded SmolLM2-135M-Instruct with a LoRA adapter whose B matrices are drawn at random (so the KL
and its gradient are not zero). Data: SafeGrad's default alignment examples (the ``safety`` pool, seed 0),
tokenised at ``--max-length``. For each batch, both ways compute the cached KL
(:func:`spard.alignment_kl.cached_alignment_kl_sum`) and its gradient over the LoRA parameters, each against
the cache computed its own way; ``padded`` passes the whole batch padded, ``packed`` as one row without padding
(``pack_alignment``, SafeGrad's default where the model allows it), ``per example`` calls it once per example
(the examples unpadded, as SafeGrad did first) and sums. The ways are interleaved, each batch in a rotated
order, so that load changes hit all alike; the table gives the median seconds and the median of the per-batch
ratios to ``padded``.
``torch.set_num_threads(2)``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=10, help="alignment batches timed (the first is warm-up)")
    parser.add_argument("--batch", type=int, default=2, help="alignment examples per batch")
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from spard.alignment_kl import base_tokens, cached_alignment_kl_sum
    from spard.args import LoraArgs, ModelArgs
    from spard.data.build import sample
    from spard.data.safety import load_pool, tokenize_safety
    from spard.defenses.safegrad import SafeGradArgs
    from spard.models import load_model
    from spard.trainer import add_lora

    model, tokenizer = load_model(ModelArgs())
    model = add_lora(model, LoraArgs(r=8, alpha=16), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    need = args.pairs * args.batch
    records = sample(load_pool(SafeGradArgs(), need=need), need, 0)
    features = tokenize_safety(tokenizer, records, args.max_length, key="--max-length")
    pad = tokenizer.pad_token_id

    def padded(batch: list[dict[str, list[int]]], bases: list) -> None:
        kl, n = cached_alignment_kl_sum(model, batch, bases, pad)
        torch.autograd.grad(kl / n, params)

    def packed(batch: list[dict[str, list[int]]], bases: list) -> None:
        kl, n = cached_alignment_kl_sum(model, batch, bases, pad, packed=True)
        torch.autograd.grad(kl / n, params)

    def per_example(batch: list[dict[str, list[int]]], bases: list) -> None:
        parts = [cached_alignment_kl_sum(model, [f], [b], pad) for f, b in zip(batch, bases)]
        total = sum(kl for kl, _ in parts)
        torch.autograd.grad(total / sum(n for _, n in parts), params)  # type: ignore[operator]

    ways = {"padded": padded, "packed": packed, "per example": per_example}
    times: dict[str, list[float]] = {name: [] for name in ways}
    tokens = []
    for i in range(args.pairs):
        batch = features[i * args.batch:(i + 1) * args.batch]
        tokens.append(sum(len(f["input_ids"]) for f in batch))
        # the caches (each computed as its way forwards the examples) are a one-off cost: not timed
        bases = {"padded": base_tokens(model, batch, pad), "packed": base_tokens(model, batch, pad, packed=True),
                 "per example": [b for f in batch for b in base_tokens(model, [f], pad)]}
        names = list(ways)
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            ways[name](batch, bases[name])
            times[name].append(time.perf_counter() - start)
    print(f"{args.pairs - 1} batches of {args.batch} examples ({statistics.mean(tokens):.0f} tokens per batch "
          f"unpadded), max_length {args.max_length}: the current model's forward + backward")
    for name, values in times.items():
        print(f"{name:12s} {statistics.median(values[1:]):.3f} s")
    for name in ("packed", "per example"):
        ratios = [x / ref for x, ref in zip(times[name][1:], times["padded"][1:])]
        print(f"{name} / padded: {statistics.median(ratios):.3f}x")


if __name__ == "__main__":
    main()

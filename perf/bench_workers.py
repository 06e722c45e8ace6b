"""Two bench cells on a 2-core machine: one process with both cores, or two one-thread processes at once
(``spard bench --jobs 2``)? And what a larger generation batch saves. Embedded SmolLM2-135M-Instruct, fp32.

Run: ``PYTHONPATH=src python perf/bench_workers.py [--steps 4] [--prompts 40] [--jobs 2]`` with nothing else
running. The unit of work stands for one cell: ``--steps`` LoRA (r 8) training steps on batches of 8 × 112 token
ids (the embedded bench's batch shape; random ids cost the same as text), then greedy replies of 48 tokens to
``--prompts`` I-MaliciousInstructions prompts. Printed, side by side from one run:

- ``shared``: one process with ``--jobs`` threads does the unit ``--jobs`` times in a row;
- ``split``: ``--jobs`` processes with one thread each do it once each, started together;
- generation alone in one process with all threads, eval batch 16 vs 64 (the default vs the embedded bench's).

Each part's wall time is the slowest process's; the ratios are what ``--jobs`` changes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def unit(args: argparse.Namespace) -> dict[str, float]:
    """One cell's worth of work in this process; seconds for training and for generation."""
    import torch

    from spard.args import LoraArgs
    from spard.config import ModelArgs
    from spard.data.sources import load_source
    from spard.evaluate.generation import generate_ids
    from spard.models import load_model
    from spard.trainer import add_lora

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model(ModelArgs())
    model = add_lora(model, LoraArgs(r=8, alpha=16), seed=0, gradient_checkpointing=False)  # the bench's adapter
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4)
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prompts = [r.prompt for r in load_source("I-MaliciousInstructions", split="test", limit=args.prompts)]
    out: dict[str, float] = {}
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        model.train()
        for _ in range(args.steps):
            ids = torch.randint(0, vocab, (8, 112), generator=g)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        out["train_s"] = out.get("train_s", 0.0) + time.perf_counter() - t0
        for bs in args.batch_sizes:
            t0 = time.perf_counter()
            generate_ids(model, tok, prompts, max_new_tokens=48, batch_size=bs, progress=False)
            out[f"generate_bs{bs}_s"] = out.get(f"generate_bs{bs}_s", 0.0) + time.perf_counter() - t0
    return {k: round(v, 2) for k, v in out.items()}


def _spawn(threads: int, repeat: int, batch_sizes: list[int], args: argparse.Namespace) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--repeat", str(repeat),
           "--steps", str(args.steps), "--prompts", str(args.prompts),
           "--batch-sizes", ",".join(map(str, batch_sizes))]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)


def _run(procs: list[subprocess.Popen]) -> tuple[float, list[dict[str, float]]]:
    t0 = time.perf_counter()
    results = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"worker failed with exit code {p.returncode}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return time.perf_counter() - t0, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--batch-sizes", default="64", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.worker:
        print(json.dumps(unit(args)))
        return
    jobs = args.jobs
    print(f"unit = {args.steps} LoRA steps (8 x 112 tokens) + greedy replies to {args.prompts} prompts (48 tokens), "
          f"fp32, {os.cpu_count()} cores")
    shared_wall, (shared,) = _run([_spawn(jobs, jobs, [64], args)])
    split_wall, split = _run([_spawn(1, 1, [64], args) for _ in range(jobs)])
    print(f"shared: 1 process x {jobs} threads, {jobs} units in a row: {shared_wall:6.1f} s wall  "
          f"(train {shared['train_s']:.1f} s, generate {shared['generate_bs64_s']:.1f} s)")
    print(f"split:  {jobs} processes x 1 thread, at once:       {split_wall:6.1f} s wall  "
          + ", ".join(f"(train {r['train_s']:.1f} s, generate {r['generate_bs64_s']:.1f} s)" for r in split))
    train_ratio = shared["train_s"] / max(r["train_s"] for r in split)
    gen_ratio = shared["generate_bs64_s"] / max(r["generate_bs64_s"] for r in split)
    print(f"throughput split / shared: training {train_ratio:.2f}x, generation {gen_ratio:.2f}x "
          f"(whole runs incl. model loading: {shared_wall / split_wall:.2f}x)")
    _, (batches,) = _run([_spawn(jobs, 1, [16, 64], args)])
    b16, b64 = batches["generate_bs16_s"], batches["generate_bs64_s"]
    print(f"generation, 1 process x {jobs} threads: batch 16 {b16:.1f} s, batch 64 {b64:.1f} s ({b16 / b64:.2f}x)")


if __name__ == "__main__":
    main()

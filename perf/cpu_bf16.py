"""fp32 vs bf16 autocast on this CPU, for the embedded SmolLM2-135M-Instruct: where the time goes, and what
``train.bf16=auto`` / ``eval.bf16=auto`` decide here.

Run: ``PYTHONPATH=src python perf/cpu_bf16.py [--tokens 128] [--rows 2] [--reps 2] [--gen-prompts 4]``.

Prints, each fp32 and bf16 side by side (interleaved, best or median of ``--reps`` after one warm-up):
1. bare matmuls at the model's widths (``hidden × intermediate``, the ``hidden × vocab`` head), forward + the
   two backward matmuls;
2. one LoRA training step's parts: forward, backward, and the LM head + loss alone;
3. the same step's loss in both precisions (their difference is the precision's effect on the result);
4. greedy generation of ``--gen-prompts`` prompts (tokens per second, and how many replies are identical);
5. the decision :func:`spard.precision.decide_cpu_bf16` takes here (measured afresh, not read from the cache).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, reps: int) -> float:  # noqa: ANN001
    fn()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def side_by_side(label: str, fp32: float, bf16: float) -> None:
    print(f"{label:<44} fp32 {fp32 * 1e3:9.1f} ms   bf16 {bf16 * 1e3:9.1f} ms   fp32/bf16 {fp32 / bf16:6.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--gen-prompts", type=int, default=4)
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from spard.args import LoraArgs, ModelArgs
    from spard.data.sources import load_source
    from spard.evaluate.generation import generate_ids
    from spard.models import load_model
    from spard.precision import decide_cpu_bf16, matmul_speedup
    from spard.trainer import add_lora

    torch.set_num_threads(args.threads)
    model, tok = load_model(ModelArgs())
    cfg = model.config
    flags = open("/proc/cpuinfo").read()
    isa = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU flags: {' '.join(isa)}")

    print("\n1. bare matmuls (x[T,in] @ W[in,out] and its two backward matmuls), T = rows x tokens")
    n = args.rows * args.tokens
    for label, k, m in (("hidden x intermediate", cfg.hidden_size, cfg.intermediate_size),
                        ("hidden x vocab (LM head)", cfg.hidden_size, cfg.vocab_size)):
        ratio = matmul_speedup(k, m, tokens=n, reps=args.reps)
        print(f"{label + f' ({k}x{m})':<44} fp32/bf16 {ratio:6.2f}x")

    peft = add_lora(model, LoraArgs(dropout=0.0), 0)
    peft.eval()
    params = [p for p in peft.parameters() if p.requires_grad]
    ids = torch.randint(0, cfg.vocab_size, (args.rows, args.tokens), generator=torch.Generator().manual_seed(0))

    def forward(bf16: bool):  # noqa: ANN202
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return peft(input_ids=ids, labels=ids)

    print(f"\n2. one LoRA step of the embedded model ({args.rows} x {args.tokens} tokens)")
    t_fwd = [timed(lambda b=b: forward(b), args.reps) for b in (False, True)]
    side_by_side("forward (with loss)", *t_fwd)
    t_step = [timed(lambda b=b: torch.autograd.grad(forward(b).loss, params), args.reps) for b in (False, True)]
    side_by_side("forward + backward", *t_step)
    side_by_side("backward alone (difference)", t_step[0] - t_fwd[0], t_step[1] - t_fwd[1])
    with torch.no_grad():
        hidden = peft.base_model.model.model(input_ids=ids).last_hidden_state.detach()
    head = peft.base_model.model.lm_head

    def head_loss(bf16: bool):  # noqa: ANN202
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = head(hidden)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    side_by_side("LM head + fp32 loss (forward)", *[timed(lambda b=b: head_loss(b), args.reps) for b in (False, True)])

    print("\n3. the step's result in both precisions")
    with torch.no_grad():
        l32, l16 = float(forward(False).loss), float(forward(True).loss)
    g32 = torch.autograd.grad(forward(False).loss, params)
    g16 = torch.autograd.grad(forward(True).loss, params)
    num = sum(float((a - b.float()).pow(2).sum()) for a, b in zip(g32, g16)) ** 0.5
    den = sum(float(a.pow(2).sum()) for a in g32) ** 0.5
    print(f"loss fp32 {l32:.5f}  bf16 {l16:.5f}  |diff| {abs(l32 - l16):.2e};  LoRA gradient relative difference "
          f"{num / den:.3e}")

    print(f"\n4. greedy generation ({args.gen_prompts} prompts, {args.gen_tokens} new tokens, one batch)")
    prompts = [r.prompt for r in load_source("I-MaliciousInstructions", split="test", limit=args.gen_prompts)]
    model.eval()
    outs, times = {}, {}
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            generate_ids(model, tok, prompts[:1], batch_size=1, max_new_tokens=2, progress=False)
            start = time.perf_counter()
            outs[bf16] = generate_ids(model, tok, prompts, batch_size=len(prompts), max_new_tokens=args.gen_tokens,
                                      progress=False)
            times[bf16] = time.perf_counter() - start
    side_by_side("generation (whole batch)", times[False], times[True])
    same = sum(a == b for a, b in zip(outs[False], outs[True]))
    print(f"identical greedy replies: {same}/{len(prompts)}")

    print("\n5. what auto decides here (measured now)")
    print(decide_cpu_bf16(model, use_cache=False))


if __name__ == "__main__":
    main()

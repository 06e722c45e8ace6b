"""Wall time per optimizer step of each defense, on the same model and the same batches, interleaved.

Run: ``PYTHONPATH=src python perf/step_overhead.py [--defenses sft,spard,safegrad] [--steps 6] [--warmup 1]``
(``--set spard:defense.safety_batch_size=2`` overrides one defense's config; ``--set key=value`` all of them).
Alignment stage: ``--stage align --defenses none,vaccine,booster,repnoise`` times the alignment defenses
(``align.defense.name``) on batches of the alignment set (``spard.jobs.align.alignment_records``: refusals +
benign instructions) with the alignment stage's LoRA rank, lr and seed; ``none`` is plain alignment.

Model: the embedded SmolLM2-135M-Instruct (``load_model(ModelArgs())``), one fresh deep copy + LoRA adapter
(``spard.trainer.add_lora``, same seed) per defense. Data: the fine-tuning set ``spard.train.train`` would
build (GSM8K + 10 % BeaverTails, ``train.seed=0``), tokenised with the default ``data.max_length`` (384: no GSM8K
example is cut; ``--max-length 128`` truncates nearly all of them to 128 tokens), cut into fixed
batches of 8; step i of every defense uses batch i. ``torch.set_num_threads(2)``.

Every defense gets a real ``SpardTrainer`` (``spard.trainer.training_arguments``, its own optimizer and
scheduler, ``accelerator.prepare``) and its hooks run as in ``Trainer.train`` (``prepare_data`` and
``setup`` once; per step ``training_step`` with the ``loss`` hook, clipping, ``before_optimizer_step``,
``optimizer.step()``, ``after_optimizer_step``, scheduler, ``zero_grad``). The trainers are driven one
step at a time and interleaved step by step (A B B A A B ...): on a machine shared with other jobs, load
changes from one minute to the next, so a defense's step is compared with the reference's step taken
seconds before or after it. Ratio = median over steps of (defense step time / reference step time of the
same step index); the first defense in ``--defenses`` is the reference. Both wall time and process CPU
time are reported; with ``OMP_WAIT_POLICY=PASSIVE`` (set here unless already set) idle OpenMP workers
sleep rather than spin, so CPU time measures the work and hardly moves with the machine's load, while wall
time does. ``hooks`` is the wall time spent in ``before_optimizer_step`` + ``after_optimizer_step`` alone
(for SPARD: the whole safety step).
One-off setup (tokenising, SPARD's data selection) is not timed.

Defenses whose ``log_stats()`` has ``safety_projected`` (SPARD) get the fraction of steps it fired on and
the median step time with and without a projection. The data selection's embedding cache is kept under
``--out`` (default ``runs/step_overhead``), so only the first run embeds the safety pool.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Idle OpenMP workers sleep instead of spinning (must be set before torch loads its OpenMP runtime), so the
# process CPU time of a step counts work done, not spinning while a core is taken by another job.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from spard.config import DataArgs  # noqa: E402


@dataclass
class Timings:
    """Per-step measurements of one defense."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    hooks: list[float] = field(default_factory=list)
    fired: list[bool | None] = field(default_factory=list)


def parse_overrides(items: list[str], defenses: list[str]) -> dict[str, list[str]]:
    """``spard:defense.safety_batch_size=2`` applies to spard only; ``key=value`` to every defense."""
    out: dict[str, list[str]] = {d: [] for d in defenses}
    for item in items:
        target, sep, rest = item.partition(":")
        if sep and "=" not in target:
            out.setdefault(target, []).append(rest)
        else:
            for d in defenses:
                out[d].append(item)
    return out


def fixed_batches(cfg, tokenizer, n_batches: int, stage: str = "finetune"
                  ) -> tuple[list, list[dict[str, torch.Tensor]]]:
    """The training (or alignment) records and ``n_batches`` collated batches of them, in a fixed order."""
    import random

    from spard.data.build import build_training_set
    from spard.data.chat import collate, tokenize_records
    from spard.jobs.align import alignment_records

    if stage == "align":
        records = alignment_records(cfg.align)
    else:
        records = build_training_set(cfg.data, cfg.attack, cfg.train.seed)
    features, _ = tokenize_records(tokenizer, records, cfg.data.max_length, desc="tokenize bench set")
    order = list(range(len(features)))
    random.Random(cfg.train.seed).shuffle(order)
    b = cfg.train.batch_size
    return records, [collate([features[i] for i in order[k * b : (k + 1) * b]], tokenizer.pad_token_id)
                     for k in range(n_batches)]


class DrivenTrainer:
    """A ``SpardTrainer`` for one defense, stepped by hand exactly as ``Trainer.train`` steps it."""

    def __init__(self, name: str, cfg, base, tokenizer, records, run_dir: Path, n_steps: int,
                 stage: str = "finetune") -> None:
        from dataclasses import replace

        from spard.data.attacks import attack_prompts
        from spard.data.chat import collate
        from spard.defenses import DefenseContext, get_defense
        from spard.registry import build
        from spard.trainer import SpardTrainer, add_lora, training_arguments

        self.name = name
        lora = cfg.lora
        if stage == "align":  # the alignment stage's defense, adapter and seed (as spard.jobs.align.align)
            self.defense = build(cfg.align.defense)
            from spard.jobs.align import alignment_lora_dropout

            lora = replace(cfg.lora, r=cfg.align.lora_r, alpha=2 * cfg.align.lora_r,
                           dropout=alignment_lora_dropout(cfg.align))
        else:
            self.defense = get_defense(cfg.defense.name)(cfg.defense)
        ctx = DefenseContext(config=cfg, tokenizer=tokenizer, run_dir=run_dir, seed=cfg.train.seed,
                             attack_prompts=attack_prompts(records))
        self.defense.prepare_data(list(records), ctx)  # the bench's batches stay fixed whatever it returns
        model = add_lora(copy.deepcopy(base), lora, cfg.train.seed)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.trainer = t = SpardTrainer(
            model=model, args=training_arguments(cfg.train, run_dir), train_dataset=[],
            data_collator=lambda batch: collate(batch, tokenizer.pad_token_id), processing_class=tokenizer,
            defense=self.defense,
        )
        t.create_optimizer()
        self.model, t.optimizer = t.accelerator.prepare(t.model, t.optimizer)
        t.create_scheduler(num_training_steps=n_steps)
        t.model_wrapped = self.model
        t.state.max_steps = n_steps
        t.current_gradient_accumulation_steps = 1
        self.defense.setup(t)

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[float, float, float]:
        """One optimizer step on ``batch``; returns wall seconds, CPU seconds, wall seconds inside the hooks."""
        t, model = self.trainer, self.model
        start, cpu_start = time.perf_counter(), time.process_time()
        num_items = (batch["labels"][..., 1:] != -100).sum()
        t.training_step(model, dict(batch), num_items)
        if t.args.max_grad_norm > 0:
            t.accelerator.clip_grad_norm_(model.parameters(), t.args.max_grad_norm)
        h0 = time.perf_counter()
        self.defense.before_optimizer_step(t)
        hooks = time.perf_counter() - h0
        t.optimizer.step()
        h0 = time.perf_counter()
        self.defense.after_optimizer_step(t)
        hooks += time.perf_counter() - h0
        t.lr_scheduler.step()
        model.zero_grad()
        t.state.global_step += 1
        return time.perf_counter() - start, time.process_time() - cpu_start, hooks


def bench_config(defense: str, *, batch_size: int, n_steps: int, max_length: int, out: Path,
                 stage: str = "finetune", overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The run config a defense (or, ``stage="align"``, an alignment defense) is timed under: the embedded model,
    GSM8K + 10 % BeaverTails (or the alignment set), ``n_steps`` batches of ``batch_size``, seed 0."""
    from spard.config import AlignArgs, load_config

    n = batch_size * n_steps
    stage_keys = ([f"align.defense.name={defense}", f"train.lr={AlignArgs.lr}", f"train.seed={AlignArgs.seed}",
                   f"align.max_length={max_length}", f"align.n_safety={n}", f"align.n_benign={n}"]
                  if stage == "align" else [f"defense.name={defense}"])
    return load_config(None, [
        "align.enabled=false", f"data.n_train={n}", f"data.max_length={max_length}", "attack.name=harmful_mix",
        "attack.harmful_ratio=0.1", f"train.batch_size={batch_size}", f"train.max_steps={n_steps}", "train.seed=0",
        f"train.output_dir={out}", *stage_keys, *overrides,
    ])


def paired_ratio(xs: list[float], refs: list[float]) -> float:
    """Median over steps of x_i / ref_i (the two measured seconds apart, on the same batch)."""
    return statistics.median(x / r for x, r in zip(xs, refs))


def summarise(timings: dict[str, Timings], defenses: list[str], warmup: int) -> list[str]:
    ref = timings[defenses[0]]
    lines = [f"{'defense':<10}{'wall s/step':>12}{'ratio':>8}{'cpu s/step':>12}{'ratio':>8}{'hooks s':>9}"
             f"{'steps':>7}   projection fired (wall s/step with / without)"]
    for d in defenses:
        tm = timings[d]
        wall, cpu, hooks, fired = tm.wall[warmup:], tm.cpu[warmup:], tm.hooks[warmup:], tm.fired[warmup:]
        col = "-"
        if fired and all(f is not None for f in fired):
            on = [w for w, f in zip(wall, fired) if f]
            off = [w for w, f in zip(wall, fired) if not f]
            col = f"{len(on)}/{len(fired)} ({100 * len(on) / len(fired):.0f}%)  "
            col += f"({statistics.median(on):.2f} / " if on else "(- / "
            col += f"{statistics.median(off):.2f})" if off else "-)"
        lines.append(f"{d:<10}{statistics.median(wall):>12.2f}{paired_ratio(wall, ref.wall[warmup:]):>7.3f}x"
                     f"{statistics.median(cpu):>12.2f}{paired_ratio(cpu, ref.cpu[warmup:]):>7.3f}x"
                     f"{statistics.median(hooks):>9.2f}{len(wall):>7}   {col}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--defenses", default="sft,spard,safegrad", help="registry names; the first is the reference")
    ap.add_argument("--stage", choices=("finetune", "align"), default="finetune",
                    help="align: --defenses are alignment defenses (none, vaccine, booster, repnoise)")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per defense")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=DataArgs.max_length, help="data.max_length (tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="[DEFENSE:]KEY=VALUE",
                    help="config override for every defense, or for one defense (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("runs/step_overhead"), help="per-defense run directories")
    args = ap.parse_args()

    from spard.config import ModelArgs
    from spard.defenses import get_defense
    from spard.models import load_model
    from spard.registry import ALIGN_DEFENSES

    defenses = [d.strip() for d in args.defenses.split(",") if d.strip()]
    for d in defenses:  # an unknown name fails now, not after minutes of setup
        ALIGN_DEFENSES.get(d) if args.stage == "align" else get_defense(d)
    overrides = parse_overrides(args.set, defenses)
    torch.set_num_threads(args.threads)
    n_steps = args.warmup + args.steps

    def config(d: str) -> Any:
        return bench_config(d, batch_size=args.batch_size, n_steps=n_steps, max_length=args.max_length,
                            out=args.out / d, stage=args.stage, overrides=overrides[d])

    t0 = time.perf_counter()
    base, tokenizer = load_model(ModelArgs())
    records, batches = fixed_batches(config(defenses[0]), tokenizer, n_steps, args.stage)
    print(f"model: embedded SmolLM2-135M-Instruct (loaded in {time.perf_counter() - t0:.1f}s), "
          f"threads={torch.get_num_threads()}, batch={args.batch_size}, max_length={args.max_length} "
          f"(mean {statistics.mean(int(b['attention_mask'].sum()) / len(b['attention_mask']) for b in batches):.0f}"
          f" tokens/sequence), {args.warmup}+{args.steps} steps, overrides={args.set}, stage={args.stage}", flush=True)
    trainers = {}
    for d in defenses:
        t0 = time.perf_counter()
        trainers[d] = DrivenTrainer(d, config(d), base, tokenizer, records, args.out / d, n_steps,
                                    args.stage)
        print(f"{d}: set up in {time.perf_counter() - t0:.1f}s", flush=True)

    timings = {d: Timings() for d in defenses}
    for i, batch in enumerate(batches):
        order = defenses if i % 2 == 0 else defenses[::-1]  # A B, B A, ...: no defense always goes first
        for d in order:
            wall, cpu, hooks = trainers[d].step(batch)
            stats = trainers[d].defense.log_stats()
            timings[d].wall.append(wall)
            timings[d].cpu.append(cpu)
            timings[d].hooks.append(hooks)
            timings[d].fired.append(bool(stats["safety_projected"]) if "safety_projected" in stats else None)
        print(f"step {i + 1}/{n_steps}" + ("" if i >= args.warmup else " (warm-up)") + ": " + ", ".join(
            f"{d} {timings[d].wall[-1]:.2f}s wall {timings[d].cpu[-1]:.2f}s cpu {timings[d].hooks[-1]:.2f}s hooks"
            for d in defenses), flush=True)
    print()
    print("\n".join(summarise(timings, defenses, args.warmup)))


if __name__ == "__main__":
    main()

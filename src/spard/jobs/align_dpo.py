"""``align.method: dpo``: the alignment stage as direct preference optimisation (TRL's ``DPOTrainer``).

The pairs are packaged real data, none written here: the SPARD reference's BeaverTails train files
(``spard_reference/train``, the files of the ``spard_ref`` source) give each harmful prompt a safe refusal
(``safe``: chosen) and a harmful answer (``unsafe``: rejected). Prompts that any other packaged dataset holds
(attack sets, harm sets, the over-refusal sets, tasks) are left out, so nothing an attack trains on or an
evaluation scores is a pair.

``align.n_benign`` adds (benign prompt, helpful answer, needless refusal) pairs, so DPO also learns *not* to
refuse: the prompt and its answer come from ``align.benign_source`` (the over-refusal evaluation prompts left out,
as for SFT) and the needless refusal is a real refusal from the same BeaverTails files, taken from pairs not used
as harmful pairs (written for another, harmful prompt: no packaged source holds refusals of benign prompts).

Training reuses spard's pieces: the LoRA adapter of :func:`spard.trainer.add_lora` (or every parameter,
``align.full_finetune``), the Trainer arguments of :func:`spard.trainer.training_arguments` (precision,
seeds, scheduler) and the prompt format bound to the tokenizer.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from spard.align_defenses.base import _other_packaged_prompts
from spard.args import AlignArgs, LoraArgs, TrainArgs
from spard.data.build import normalise_prompt, sample
from spard.data.chat import bound_format, format_messages
from spard.data.records import Record, chat
from spard.data.sources import DATA_DIR, SOURCES, read_rows
from spard.errors import DataError
from spard.jobs.align_data import benign_alignment_records
from spard.rundir import FINAL_DIR
from spard.trainer import LoggingProgressCallback, add_lora, full_parameter_model, training_arguments

PAIR_SOURCE = "spard_ref"
"""The packaged source whose train files hold (prompt, ``safe``, ``unsafe``) triples."""
PAIR_DATA = "spard_ref train: prompt, chosen=safe, rejected=unsafe; minus other packaged prompts"
"""What the pairs are, as it enters the aligned model's cache key (change it when the pairs change)."""
BENIGN_PAIR_DATA = "benign_source minus over-refusal sets: chosen=answer, rejected=safe of an unused spard_ref pair"
"""What the benign pairs are, in the cache key when ``align.n_benign`` > 0 (change it when they change)."""


@dataclass(frozen=True)
class PreferencePair:
    """One DPO example: a prompt, the answer to prefer and the answer to avoid."""

    prompt: str
    chosen: str
    rejected: str


def pair_pool() -> list[PreferencePair]:
    """Every usable pair of the packaged files: both answers present, prompt in no other packaged dataset, one
    pair per prompt (the first)."""
    others = _other_packaged_prompts(PAIR_SOURCE)
    files = SOURCES[PAIR_SOURCE].files["train"]
    seen: set[str] = set()
    pool = []
    for name in (files,) if isinstance(files, str) else files:
        rows = read_rows(DATA_DIR / name)
        for i, row in enumerate(rows):
            prompt, safe, unsafe = (str(row.get(k) or "") for k in ("prompt", "safe", "unsafe"))
            if not (prompt.strip() and safe.strip() and unsafe.strip()):
                raise DataError(f"{DATA_DIR / name} {rows.place(i)}: a pair needs prompt, safe and unsafe")
            key = normalise_prompt(prompt)
            if key in others or key in seen:
                continue
            seen.add(key)
            pool.append(PreferencePair(prompt, safe, unsafe))
    return pool


def preference_pairs(align: AlignArgs) -> list[PreferencePair]:
    """``align.n_safety`` harmful pairs drawn from :func:`pair_pool` then ``align.n_benign`` benign pairs
    (:func:`benign_pairs`), shuffled together; deterministic by ``align.seed``."""
    pool = pair_pool()
    if align.n_safety + align.n_benign > len(pool):
        raise DataError(f"align.n_safety + align.n_benign = {align.n_safety + align.n_benign}: the packaged "
                        f"preference pairs ({PAIR_SOURCE}) number only {len(pool)} after leaving out prompts of "
                        "other datasets (each benign pair takes its refusal from an unused one)")
    if align.n_safety < 1:
        raise DataError("align.n_safety=0: method=dpo needs at least one preference pair")
    drawn = sample(pool, align.n_safety + align.n_benign, align.seed)
    harmful, spare = drawn[:align.n_safety], drawn[align.n_safety:]
    benign = benign_pairs(align, [p.chosen for p in spare])
    return harmful if not benign else [*sample(harmful + benign, len(harmful) + len(benign), align.seed + 2)]


def benign_pairs(align: AlignArgs, refusals: list[str]) -> list[PreferencePair]:
    """One (benign prompt, its answer, a needless refusal) pair per refusal in ``refusals``: the benign examples
    are the ones SFT would train on (:func:`spard.jobs.align_data.benign_alignment_records`)."""
    if not refusals:
        return []
    records = benign_alignment_records(align)
    if len(records) < len(refusals):
        raise DataError(f"align.n_benign={align.n_benign}: align.benign_source={align.benign_source!r} has only "
                        f"{len(records)} examples outside the over-refusal evaluation sets")
    unanswered = [r.prompt for r in records[:len(refusals)] if not (r.response or "").strip()]
    if unanswered:
        raise DataError(f"align.benign_source={align.benign_source!r}: {len(unanswered)} benign example(s) have no "
                        f"answer to prefer, e.g. {unanswered[0][:80]!r}")
    return [PreferencePair(r.prompt, r.response or "", refusal) for r, refusal in zip(records, refusals)]


def harmful_pair_records(align: AlignArgs) -> list[Record]:
    """The rejected (harmful) answers of the DPO pairs as records, for the disjointness checks: the aligned
    model was trained against them, so no attack or harm set may reuse their prompts."""
    if align.method != "dpo":
        return []
    return [chat(p.prompt, p.rejected, source=PAIR_SOURCE, kind="harmful") for p in preference_pairs(align)]


def as_conversation(pair: PreferencePair, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[dict[str, str]]]:
    """A pair in TRL's conversational preference format, worded in the prompt format bound to ``tokenizer`` (so
    DPO sees the same text as SFT and the evaluation)."""
    fmt, system = bound_format(tokenizer)

    def turns(answer: str) -> list[dict[str, str]]:
        return format_messages([{"role": "user", "content": pair.prompt}, {"role": "assistant", "content": answer}],
                               fmt, system)

    chosen, rejected = turns(pair.chosen), turns(pair.rejected)
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def dpo_config(base: TrainingArguments, *, beta: float, max_length: int) -> Any:
    """TRL's ``DPOConfig`` carrying every setting of spard's Trainer arguments ``base``, plus β and the length."""
    from trl import DPOConfig

    own = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    # TRL's defaults differ (checkpointing on, bf16 on): spard's settings win, the model is checkpointed already
    own.update(gradient_checkpointing=False, save_strategy="no", logging_steps=1)
    return DPOConfig(**own, beta=beta, max_length=max_length)


def train_dpo(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[PreferencePair], *,
              lora: LoraArgs | None, args: TrainArgs, beta: float, max_length: int, run_dir: Path
              ) -> tuple[PreTrainedModel, dict[str, Any]]:
    """DPO-train ``model`` on ``pairs`` (a LoRA adapter, or every parameter when ``lora`` is None); returns the
    trained model (a ``PeftModel`` whose active adapter is the trained one, for LoRA) and its training metrics.
    Runs under DDP and FSDP2 as TRL does; rank 0 saves the adapter (whole)."""
    from datasets import Dataset
    from trl import DPOTrainer

    if lora is not None:
        policy = add_lora(model, lora, args.seed, gradient_checkpointing=args.gradient_checkpointing)
        ref_model = None  # TRL's frozen copy of the fresh adapter (= the base model) is the reference
    else:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        policy = full_parameter_model(model, args.gradient_checkpointing)
    data = Dataset.from_list([as_conversation(p, tokenizer) for p in pairs])
    trainer = DPOTrainer(model=policy, ref_model=ref_model, processing_class=tokenizer, train_dataset=data,
                         args=dpo_config(training_arguments(args, run_dir, policy), beta=beta, max_length=max_length))
    if trainer.pop_callback(ProgressCallback) is not None:  # log rows through spard's logger, as fit() does
        trainer.add_callback(LoggingProgressCallback)
    start = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - start
    trained = trainer.model
    if lora is not None:
        from spard.distributed import sharded_trainable_state

        adapter = sharded_trainable_state(trained)  # FSDP2: gathered to rank 0 (a collective)
        # TRL's reference adapter is no part of the aligned model; under FSDP2 its modules stay (the sharded model
        # is only read from now on) and are left out of what is saved and merged
        if "ref" in trained.peft_config and adapter is None:
            trained.delete_adapter("ref")
        if trainer.is_world_process_zero():
            trained.save_pretrained(run_dir / FINAL_DIR, safe_serialization=True,
                                    selected_adapters=[trained.active_adapter], state_dict=adapter)
    history = trainer.state.log_history
    losses = [r["loss"] for r in history if "loss" in r]
    accuracy = [r["rewards/accuracies"] for r in history if "rewards/accuracies" in r]
    return trained, {
        "method": "dpo",
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_loss": out.training_loss,
        "last_reward_accuracy": accuracy[-1] if accuracy else None,
        "train_seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(trainer.state.global_step, 1), 3),
        "n_examples": len(pairs),
    }

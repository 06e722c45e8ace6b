"""LoRA training under a defense: :func:`add_lora` (setup) and :func:`fit`, shared by every job.

One ``transformers.Trainer`` subclass (:class:`SpardTrainer`) runs every defense; defenses act through
the hooks of :class:`spard.defenses.base.Defense`, called by :class:`DefenseHookCallback` (a
``TrainerCallback``). The jobs that call ``fit`` (the alignment stage, the fine-tuning job) live in
:mod:`spard.jobs`; this module never imports them.
"""

from __future__ import annotations

import json
import logging
import resource
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from spard.args import LoraArgs, TrainArgs
from spard.checkpointing import OFF, checkpointing_mode, enable_checkpointing, resolve_setting
from spard.data.chat import collate, tokenize_records
from spard.data.records import Record
from spard.defenses.base import Defense
from spard.errors import ConfigError
from spard.io import append_jsonl, atomic_write_json, atomic_write_jsonl
from spard.precision import use_bf16
from spard.rundir import (
    DEFENSE_STATE_FILE,
    FINAL_DIR,
    METRICS_FILE,
    checkpoint_problem,
    checkpoint_step,
    mark_complete,
    rotate_checkpoints,
)

log = logging.getLogger(__name__)

# transformers' own Trainer calls this deprecated property every step; the warning is not the user's to fix.
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


class LoggingProgressCallback(ProgressCallback):
    """HF's progress bar without its ``print`` of every log dict (numbers as strings on stdout): the rows go to
    ``metrics.jsonl`` and, formatted, to spard's logger."""

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if state.is_world_process_zero and logs:
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items()
                              if k != "total_flos")
            log.info("step %d: %s", state.global_step, shown)


class SpardTrainer(Trainer):
    """``Trainer`` that hands control to a :class:`Defense` at the points a defense needs."""

    def __init__(self, *args: Any, defense: Defense, metrics_path: Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.defense = defense
        self.resume_defense_state: dict[str, Any] | None = None
        self.resume_defense_dir: Path | None = None
        """Checkpoint the defense's tensors (``Defense.load_tensors``) are read from on resume."""
        self.add_callback(DefenseHookCallback(self, defense, metrics_path))
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(LoggingProgressCallback)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        if model.training:
            inputs, num_items_in_batch = self.defense.training_batch(self, inputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = self.defense.loss(self, model, inputs, loss, outputs)
        return (loss, outputs) if return_outputs else loss

    def _save_checkpoint(self, model, trial) -> None:  # noqa: ANN001
        # The checkpoint is whole only once the defense's state is in it too: HF's rotation (which would run at
        # the end of super()'s save and may delete the previous, whole checkpoint) waits for the marker.
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's RNG file is written before rank 0 marks it whole
        if self.args.should_save:
            ckpt = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            atomic_write_json(ckpt / DEFENSE_STATE_FILE, self.defense.state_dict())
            self.defense.save_tensors(ckpt)
            mark_complete(ckpt)
            rotate_checkpoints(Path(self.args.output_dir), limit)


class DefenseHookCallback(TrainerCallback):
    """Calls a :class:`Defense`'s hooks from a ``transformers.Trainer``'s events; with ``metrics_path``,
    also appends each logged row (with the defense's statistics) to ``metrics.jsonl``."""

    def __init__(self, trainer: Trainer, defense: Defense, metrics_path: Path | None = None,
                 resume_state: dict[str, Any] | None = None) -> None:
        self.trainer, self.defense, self.metrics_path = trainer, defense, metrics_path
        self.resume_state = resume_state
        self.setup_seconds = 0.0
        """Wall time of ``defense.setup`` (one-off work such as SPARD's selection), reported apart from steps."""

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        start = time.perf_counter()
        self.defense.setup(self.trainer)
        self.setup_seconds = time.perf_counter() - start
        resume_state = getattr(self.trainer, "resume_defense_state", None) or self.resume_state
        if resume_state is not None:
            self.defense.load_state_dict(resume_state)
        resume_dir = getattr(self.trainer, "resume_defense_dir", None)
        if resume_dir is not None:
            self.defense.load_tensors(Path(resume_dir))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001
        self.defense.before_optimizer_step(self.trainer)

    def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001
        self.defense.after_optimizer_step(self.trainer)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if self.metrics_path is None or not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **logs, **self.defense.log_stats()}
        row = {"learning_rate" if k == "lr" else k: v for k, v in row.items()}
        append_jsonl(self.metrics_path, row)


# ---------------------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------------------
def add_lora(model: PreTrainedModel, lora: LoraArgs, seed: int, *, gradient_checkpointing: str | bool = "auto"
             ) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter (initialisation seeded), with gradient checkpointing as
    ``gradient_checkpointing`` (``train.gradient_checkpointing``) says; an 8/4-bit base goes through peft's
    k-bit preparation first."""
    k_bit = bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))
    mode = resolve_setting(gradient_checkpointing, k_bit=k_bit)
    model = enable_checkpointing(model, mode, k_bit=k_bit)
    if mode != OFF:
        log.info("gradient checkpointing: %s%s", mode.replace("_", "-"), " (8/4-bit base)" if k_bit else "")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lora.target_modules if m not in present]
    if missing:
        raise ConfigError(f"lora.target_modules={lora.target_modules}: the model has no modules named {missing}")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def full_parameter_model(model: PreTrainedModel, gradient_checkpointing: str | bool = "auto") -> PreTrainedModel:
    """``model`` with every parameter trainable (full fine-tuning), checkpointed as the LoRA path would be."""
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        raise ConfigError("full-parameter training needs a model that is not loaded in 8/4 bits")
    model = enable_checkpointing(model, resolve_setting(gradient_checkpointing, k_bit=False), k_bit=False)
    model.requires_grad_(True)
    return model


def training_arguments(args: TrainArgs, run_dir: Path, model: torch.nn.Module | None = None) -> TrainingArguments:
    """The Trainer's arguments for ``args``; ``train.bf16=auto`` is decided for ``model`` (on a CPU: measured,
    :mod:`spard.precision`)."""
    on_gpu = torch.cuda.is_available()
    bf16 = use_bf16(args.bf16, model=model)
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        lr_scheduler_type=args.lr_scheduler,
        # a float < 1 is a ratio of the total steps; an int >= 1 a number of steps
        warmup_steps=args.warmup_steps if args.warmup_steps > 0 else args.warmup_ratio,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        data_seed=args.seed,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        report_to=list(args.report_to),
        bf16=bf16,
        use_cpu=not on_gpu,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu,  # pinning needs an accelerator; on a CPU it only warns
        # HF searches for unused parameters in a PeftModel by default, which DDP cannot do through reentrant
        # checkpoints ("mark a variable ready only once"); every LoRA parameter is used in every forward anyway
        ddp_find_unused_parameters=False if model is not None and checkpointing_mode(model) != OFF else None,
        disable_tqdm=False,
    )


def resume_state(ckpt: Path) -> dict[str, Any]:
    """The defense state saved in checkpoint ``ckpt``; refuses a checkpoint that is not whole (its save was
    interrupted: the defense's state may be missing or older than the weights), naming the reason."""
    problem = checkpoint_problem(ckpt)
    if problem is not None:
        raise ConfigError(f"cannot resume from {ckpt}: the checkpoint is not whole ({problem}); resume from the "
                          "newest whole one (spard.rundir.last_checkpoint) instead")
    path = Path(ckpt) / DEFENSE_STATE_FILE
    if not path.is_file():  # a whole checkpoint always has it; a hand-edited one may not
        raise ConfigError(f"cannot resume from {ckpt}: {DEFENSE_STATE_FILE} is missing, so the defense would "
                          "silently start afresh")
    return json.loads(path.read_text())


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metrics rows logged after the checkpoint (they will be logged again)."""
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        atomic_write_jsonl(path, [r for r in rows if r.get("step", 0) <= step])


# ---------------------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------------------
def fit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[Record],
    *,
    lora: LoraArgs | None,
    args: TrainArgs,
    max_length: int,
    defense: Defense,
    run_dir: Path,
    resume_from: Path | None = None,
    callbacks: list[TrainerCallback] | None = None,
    save_final: bool = True,
) -> tuple[PeftModel, dict[str, Any]]:
    """LoRA-train ``model`` on ``records`` under ``defense``; saves ``run_dir/final``; returns model, metrics.
    ``lora=None`` trains every parameter of ``model`` instead (the alignment stage's ``align.full_finetune``).
    ``save_final=False`` (the same on every rank) skips ``run_dir/final`` and its gather, for a caller that
    publishes the returned model itself."""
    features, stats = tokenize_records(tokenizer, records, max_length, desc="tokenize train set")
    if not any(any(t != -100 for t in f["labels"]) for f in features):
        raise ConfigError(f"no training example has an assistant token within max_length={max_length}")
    peft_model = (add_lora(model, lora, args.seed, gradient_checkpointing=args.gradient_checkpointing)
                  if lora is not None else full_parameter_model(model, args.gradient_checkpointing))
    metrics_path = run_dir / METRICS_FILE
    if resume_from is not None:
        _truncate_metrics(metrics_path, checkpoint_step(resume_from))
    elif metrics_path.exists():
        metrics_path.unlink()
    trainer = SpardTrainer(
        model=peft_model,
        args=training_arguments(args, run_dir, peft_model),
        train_dataset=features,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
        processing_class=tokenizer,
        defense=defense,
        metrics_path=metrics_path,
        callbacks=callbacks,
    )
    if resume_from is not None:
        trainer.resume_defense_state = resume_state(resume_from)
        trainer.resume_defense_dir = resume_from
    start = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start
    # One-off defense setup (SPARD embeds and selects its safety data) is reported apart from the steps.
    setup_seconds = next(c.setup_seconds for c in trainer.callback_handler.callbacks
                         if isinstance(c, DefenseHookCallback))
    defense.after_train(trainer)
    from spard.distributed import sharded_trainable_state

    if save_final:
        adapter = sharded_trainable_state(peft_model)  # FSDP2: gathered to rank 0 (a collective)
        if trainer.is_world_process_zero():
            peft_model.save_pretrained(run_dir / FINAL_DIR, safe_serialization=True, state_dict=adapter)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    steps_run = trainer.state.global_step - (checkpoint_step(resume_from) if resume_from else 0)
    metrics = {
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_loss": out.training_loss,
        "train_seconds": round(seconds, 2),
        "defense_setup_seconds": round(setup_seconds, 2),
        "seconds_per_step": round((seconds - setup_seconds) / max(steps_run, 1), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "n_examples": stats.total,
        "n_truncated": stats.truncated,
        **{f"defense/{k}": v for k, v in defense.log_stats().items()},
    }
    return peft_model, metrics

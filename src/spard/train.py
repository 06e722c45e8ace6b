"""LoRA fine-tuning with a defense hook: ``setup`` → ``fit`` → result.

One ``transformers.Trainer`` subclass (:class:`SpardTrainer`) runs every defense; defenses act through
the hooks of :class:`spard.defenses.base.Defense`. ``train(cfg)`` is the whole fine-tuning job; ``fit`` is
the part shared with the alignment stage.
"""

from __future__ import annotations

import logging
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from spard.config import LoraArgs, RunConfig, TrainArgs, config_to_yaml
from spard.data.attacks import attack_prompts
from spard.data.build import build_training_set
from spard.data.chat import collate, tokenize_records
from spard.data.records import Record
from spard.defenses import Defense, DefenseContext, get_defense
from spard.errors import ConfigError
from spard.io import append_jsonl, atomic_write_json, atomic_write_jsonl, atomic_write_text

log = logging.getLogger(__name__)

FINAL_DIR = "final"
DEFENSE_STATE = "defense_state.json"


@dataclass
class TrainResult:
    """What a training run leaves behind."""

    run_dir: Path
    """The run directory."""
    adapter_dir: Path
    """The final LoRA adapter (safetensors)."""
    base_model: str
    """The model the adapter applies to (the aligned model when the align stage ran)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """first/last logged loss, steps, wall time, seconds per step, peak memory, dataset counts."""


class SpardTrainer(Trainer):
    """``Trainer`` that hands control to a :class:`Defense` at the points a defense needs."""

    def __init__(self, *args: Any, defense: Defense, metrics_path: Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.defense = defense
        self.resume_defense_state: dict[str, Any] | None = None
        self.defense_setup_seconds = 0.0  # wall time of defense.setup (set at train begin)
        self.add_callback(_DefenseCallback(self, metrics_path))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = self.defense.loss(self, model, inputs, loss, outputs)
        return (loss, outputs) if return_outputs else loss

    def _save_checkpoint(self, model, trial) -> None:  # noqa: ANN001
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            ckpt = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            atomic_write_json(ckpt / DEFENSE_STATE, self.defense.state_dict())


class _DefenseCallback(TrainerCallback):
    def __init__(self, trainer: SpardTrainer, metrics_path: Path | None) -> None:
        self.trainer, self.metrics_path = trainer, metrics_path

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        start = time.perf_counter()
        self.trainer.defense.setup(self.trainer)
        self.trainer.defense_setup_seconds = time.perf_counter() - start
        if self.trainer.resume_defense_state is not None:
            self.trainer.defense.load_state_dict(self.trainer.resume_defense_state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001
        self.trainer.defense.before_optimizer_step(self.trainer)

    def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001
        self.trainer.defense.after_optimizer_step(self.trainer)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if self.metrics_path is None or not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **logs, **self.trainer.defense.log_stats()}
        row = {"learning_rate" if k == "lr" else k: v for k, v in row.items()}
        append_jsonl(self.metrics_path, row)


# ---------------------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------------------
def add_lora(model: PreTrainedModel, lora: LoraArgs, seed: int) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter (initialisation seeded)."""
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lora.target_modules if m not in present]
    if missing:
        raise ConfigError(f"lora.target_modules={lora.target_modules}: the model has no modules named {missing}")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def training_arguments(args: TrainArgs, run_dir: Path) -> TrainingArguments:
    on_gpu = torch.cuda.is_available()
    bf16 = str(args.bf16).lower() == "true" or (
        str(args.bf16).lower() == "auto" and on_gpu and torch.cuda.is_bf16_supported()
    )
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        data_seed=args.seed,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        report_to=[],
        bf16=bf16,
        use_cpu=not on_gpu,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def last_checkpoint(run_dir: Path) -> Path | None:
    ckpts = [p for p in run_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[1]), default=None)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metrics rows logged after the checkpoint (they will be logged again)."""
    import json

    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        atomic_write_jsonl(path, [r for r in rows if r.get("step", 0) <= step])


def prepare_run_dir(run_dir: Path, *, resume: bool) -> Path | None:
    """Check the run directory: returns the checkpoint to resume from, if any; refuses to overwrite a run."""
    ckpt = last_checkpoint(run_dir) if run_dir.exists() else None
    if not resume and run_dir.exists() and (ckpt is not None or (run_dir / FINAL_DIR).exists()):
        raise ConfigError(
            f"train.output_dir={str(run_dir)!r} already holds a run; pass train.resume=true to continue it "
            "or choose another output_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and ckpt is None:
        log.info("train.resume=true but %s has no checkpoint: starting from scratch", run_dir)
    return ckpt if resume else None


# ---------------------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------------------
def fit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[Record],
    *,
    lora: LoraArgs,
    args: TrainArgs,
    max_length: int,
    defense: Defense,
    run_dir: Path,
    resume_from: Path | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> tuple[PeftModel, dict[str, Any]]:
    """LoRA-train ``model`` on ``records`` under ``defense``; saves ``run_dir/final``; returns model, metrics."""
    features, stats = tokenize_records(tokenizer, records, max_length, desc="tokenize train set")
    if not any(any(t != -100 for t in f["labels"]) for f in features):
        raise ConfigError(f"no training example has an assistant token within max_length={max_length}")
    peft_model = add_lora(model, lora, args.seed)
    metrics_path = run_dir / "metrics.jsonl"
    if resume_from is not None:
        _truncate_metrics(metrics_path, int(resume_from.name.split("-")[1]))
    elif metrics_path.exists():
        metrics_path.unlink()
    trainer = SpardTrainer(
        model=peft_model,
        args=training_arguments(args, run_dir),
        train_dataset=features,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
        processing_class=tokenizer,
        defense=defense,
        metrics_path=metrics_path,
        callbacks=callbacks,
    )
    if resume_from is not None and (resume_from / DEFENSE_STATE).is_file():
        import json

        trainer.resume_defense_state = json.loads((resume_from / DEFENSE_STATE).read_text())
    start = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start
    # One-off defense setup (SPARD embeds and selects its safety data) is reported apart from the steps.
    setup_seconds = trainer.defense_setup_seconds
    if trainer.is_world_process_zero():
        peft_model.save_pretrained(run_dir / FINAL_DIR, safe_serialization=True)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    steps_run = trainer.state.global_step - (int(resume_from.name.split("-")[1]) if resume_from else 0)
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


# ---------------------------------------------------------------------------------------------------------
# the fine-tuning job
# ---------------------------------------------------------------------------------------------------------
def train(cfg: RunConfig, *, callbacks: list[TrainerCallback] | None = None,
          model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None) -> TrainResult:
    """Build the (poisoned) training set, apply the defense, LoRA fine-tune, save the adapter.

    With ``align.enabled`` the base is the aligned model (built once and cached, see :func:`spard.align.align`).
    ``model``/``tokenizer`` may be passed directly (tests, notebooks); then no model is loaded.
    """
    from spard.align import base_for_finetuning

    run_dir = Path(cfg.train.output_dir)
    if cfg.train.resume and (run_dir / "train_result.json").is_file():
        import json

        log.info("run %s already finished; nothing to resume", run_dir)  # keep its metrics, don't rewrite them
        done = json.loads((run_dir / "train_result.json").read_text())
        return TrainResult(run_dir, run_dir / FINAL_DIR, done["base_model"], done["metrics"])
    resume_from = prepare_run_dir(run_dir, resume=cfg.train.resume)
    base_args, base_name = base_for_finetuning(cfg) if model is None else (cfg.model, cfg.model.name_or_path)
    if model is None or tokenizer is None:
        from spard.models import load_model

        model, tokenizer = load_model(base_args)
    atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))

    records = build_training_set(cfg.data, cfg.attack, cfg.train.seed)
    prompts = attack_prompts(records)
    defense = get_defense(cfg.defense.name)(cfg.defense)
    ctx = DefenseContext(config=cfg, tokenizer=tokenizer, run_dir=run_dir, seed=cfg.train.seed, attack_prompts=prompts)
    records = defense.prepare_data(records, ctx)
    atomic_write_json(run_dir / "attack_prompts.json", prompts)
    atomic_write_jsonl(run_dir / "train_set.jsonl", [r.to_dict() for r in records])
    log.info("training set: %d records (%d harmful) under defense %r", len(records), len(prompts), defense.name)

    _, metrics = fit(model, tokenizer, records, lora=cfg.lora, args=cfg.train, max_length=cfg.data.max_length,
                     defense=defense, run_dir=run_dir, resume_from=resume_from, callbacks=callbacks)
    metrics["n_harmful"] = len(prompts)
    result = TrainResult(run_dir, run_dir / FINAL_DIR, base_name, metrics)
    atomic_write_json(run_dir / "train_result.json", {"base_model": base_name, "metrics": metrics})
    return result

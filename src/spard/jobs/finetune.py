"""The fine-tuning job: build the (poisoned) training set, apply the defense, LoRA fine-tune, save.

Run directory layout: :mod:`spard.rundir`. A run directory holds one run: a new run never overwrites one,
and ``train.resume=true`` continues only the run that is there (the resolved config must match the stored
one in everything that changes the result; the stored config and training set are never rewritten).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from spard.args import RunConfig
from spard.config import config_to_yaml, stored_config_diff
from spard.data.attacks import attack_prompts
from spard.data.build import build_training_set
from spard.data.chat import prompt_format
from spard.data.records import Record
from spard.defenses import DefenseContext
from spard.errors import ConfigError
from spard.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from spard.jobs.align import base_for_finetuning, check_alignment_data_disjoint
from spard.locking import dir_lock
from spard.registry import build
from spard.rundir import (
    ATTACK_PROMPTS_FILE,
    CONFIG_FILE,
    FINAL_DIR,
    TRAIN_RESULT_FILE,
    TRAIN_SET_FILE,
    checkpoints,
    last_checkpoint,
    skipped_checkpoints,
)
from spard.trainer import fit

log = logging.getLogger(__name__)


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


def check_resume(cfg: RunConfig, run_dir: Path) -> None:
    """Refuse to resume ``run_dir`` under a config that trains something else, listing the differences."""
    stored = run_dir / CONFIG_FILE
    if not stored.is_file():
        return
    diff = stored_config_diff(cfg, stored)
    if diff:
        raise ConfigError(
            f"train.resume=true: {run_dir} holds a run of another config; it differs in: " + "; ".join(diff)
            + ". Resume with the stored config (spard train " + str(stored) + " train.resume=true) or choose "
            "another train.output_dir")


def prepare_run_dir(cfg: RunConfig) -> Path | None:
    """Check the run directory before any compute: the checkpoint to resume from, if any. Refuses to
    overwrite a run, and to resume one under a different config. Creates nothing."""
    run_dir = Path(cfg.train.output_dir)
    ckpt = last_checkpoint(run_dir)  # the newest whole one
    holds_run = bool(checkpoints(run_dir)) or (run_dir / FINAL_DIR).exists()  # a start that trained no step holds none
    if not cfg.train.resume and holds_run:
        raise ConfigError(
            f"train.output_dir={str(run_dir)!r} already holds a run; pass train.resume=true to continue it "
            "or choose another output_dir")
    if cfg.train.resume:
        check_resume(cfg, run_dir)
        for skipped, why in skipped_checkpoints(run_dir):
            log.warning("train.resume=true: skipping %s: not whole (%s)", skipped, why)
        if ckpt is None:
            log.info("train.resume=true but %s has no whole checkpoint: starting from scratch", run_dir)
        else:
            log.info("train.resume=true: resuming from %s, the newest whole checkpoint", ckpt)
    return ckpt if cfg.train.resume else None


def finished_result(run_dir: Path) -> TrainResult:
    """The recorded result of a finished run."""
    done = json.loads((run_dir / TRAIN_RESULT_FILE).read_text())
    return TrainResult(run_dir, run_dir / FINAL_DIR, done["base_model"], done["metrics"])


def training_set(cfg: RunConfig, run_dir: Path, tokenizer: PreTrainedTokenizerBase, defense: Any
                 ) -> tuple[list[Record], list[str]]:
    """The fine-tuning set after the attack and the defense's data step, and the attack's prompts; both are
    deterministic in the config and seed, so a resumed run rebuilds exactly the set it started with."""
    records = build_training_set(cfg.data, cfg.attack, cfg.train.seed)
    prompts = attack_prompts(records)
    ctx = DefenseContext(config=cfg, tokenizer=tokenizer, run_dir=run_dir, seed=cfg.train.seed, attack_prompts=prompts)
    records = defense.prepare_data(records, ctx)
    return records, prompts


def train(cfg: RunConfig, *, callbacks: list[TrainerCallback] | None = None,
          model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None) -> TrainResult:
    """Build the (poisoned) training set, apply the defense, LoRA fine-tune, save the adapter.

    With ``align.enabled`` the base is the aligned model (built once and cached, see
    :func:`spard.jobs.align.align`). ``model``/``tokenizer`` may be passed directly (tests, notebooks); then
    no model is loaded. The run directory is locked while the job runs: a second process that writes it
    gets a :class:`spard.locking.DirectoryLocked` error naming the owner.
    """
    with dir_lock(cfg.train.output_dir, what="train.output_dir"):
        return _train(cfg, callbacks=callbacks, model=model, tokenizer=tokenizer)


def _train(cfg: RunConfig, *, callbacks: list[TrainerCallback] | None, model: PreTrainedModel | None,
           tokenizer: PreTrainedTokenizerBase | None) -> TrainResult:
    run_dir = Path(cfg.train.output_dir)
    if cfg.train.resume and (run_dir / TRAIN_RESULT_FILE).is_file():
        check_resume(cfg, run_dir)
        log.info("run %s already finished; nothing to resume", run_dir)  # keep its metrics, don't rewrite them
        return finished_result(run_dir)
    resume_from = prepare_run_dir(cfg)
    defense = build(cfg.defense)
    base_args, base_name = base_for_finetuning(cfg) if model is None else (cfg.model, cfg.model.name_or_path)
    if model is None or tokenizer is None:
        from spard.models import load_model

        model, tokenizer = load_model(base_args)

    records, prompts = training_set(cfg, run_dir, tokenizer, defense)
    if base_args is not cfg.model:  # fine-tuning the aligned model: its harmful alignment data must be unseen
        check_alignment_data_disjoint(cfg, prompts)
    if not (cfg.train.resume and (run_dir / CONFIG_FILE).is_file()):  # a resumed run keeps its files
        atomic_write_text(run_dir / CONFIG_FILE, config_to_yaml(cfg))
        atomic_write_json(run_dir / ATTACK_PROMPTS_FILE, prompts)
        atomic_write_jsonl(run_dir / TRAIN_SET_FILE, [r.to_dict() for r in records])
    log.info("training set: %d records (%d harmful) under defense %r", len(records), len(prompts), defense.name)

    # data.prompt_format words every text tokenised for training: the task set and each defense's safety data.
    with prompt_format(tokenizer, cfg.data.prompt_format):
        _, metrics = fit(model, tokenizer, records, lora=cfg.lora, args=cfg.train, max_length=cfg.data.max_length,
                         defense=defense, run_dir=run_dir, resume_from=resume_from, callbacks=callbacks)
    metrics["n_harmful"] = len(prompts)
    result = TrainResult(run_dir, run_dir / FINAL_DIR, base_name, metrics)
    atomic_write_json(run_dir / TRAIN_RESULT_FILE, {"base_model": base_name, "metrics": metrics})
    return result

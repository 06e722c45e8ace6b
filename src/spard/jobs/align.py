"""The alignment stage: SFT of a base model on refusals mixed with benign data (or DPO on refusal-vs-harmful
pairs, ``align.method``; LoRA or every parameter, ``align.full_finetune``), merged into a new base.

``align.defense`` picks an alignment-stage defense (:mod:`spard.align_defenses`: Vaccine, Booster,
RepNoise) that trains through the same hooks as the fine-tuning defenses; ``none`` is plain SFT.

Papers on harmful fine-tuning start from "an aligned model"; the embedded SmolLM2-135M-Instruct does not
refuse harmful requests, so ``align`` makes it do so once, and caches the merged model (keyed by the base
model and the alignment options) so every later run starts from the same aligned weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from spard.align_defenses.base import check_disjoint
from spard.args import AlignArgs, LoraArgs, ModelArgs, RunConfig, TrainArgs
from spard.data.build import load_safety_pool, normalise_prompt, sample
from spard.data.sources import load_source
from spard.defenses.base import DefenseContext
from spard.evaluate.harm import load_harm_sets
from spard.evaluate.tasks.over_refusal import DEFAULT_BENIGN_SETS
from spard.io import atomic_write_json
from spard.jobs.align_dpo import PAIR_DATA, harmful_pair_records, preference_pairs, train_dpo
from spard.locking import dir_lock
from spard.models import cache_dir, load_model, model_fingerprint, save_model
from spard.registry import ALIGN_DEFENSES, build
from spard.rundir import FINAL_DIR
from spard.trainer import fit

log = logging.getLogger(__name__)


@dataclass
class AlignResult:
    """Where the aligned model is and how its training went."""

    model_dir: Path
    """Merged aligned model (safetensors + tokenizer): use it as ``model.name_or_path``."""
    cached: bool
    """True when an earlier run had already built it."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Training metrics of the alignment run (loss start/end, steps, time)."""


ALIGN_LORA_DROPOUT = 0.05
"""The alignment adapter's LoRA dropout unless ``align.lora_dropout`` or the alignment defense says otherwise."""


def alignment_lora_dropout(align: AlignArgs) -> float:
    """``align.lora_dropout``, else the alignment defense's own default (Booster: 0), else 0.05."""
    if align.lora_dropout is not None:
        return float(align.lora_dropout)
    own = ALIGN_DEFENSES.get(align.defense.name).lora_dropout
    return ALIGN_LORA_DROPOUT if own is None else float(own)


def aligned_model_dir(model: ModelArgs, align: AlignArgs) -> Path:
    """``align.output_dir``, else a cache directory keyed by the base model and the alignment options."""
    if align.output_dir:
        return Path(align.output_dir)
    options = asdict(align)
    # the dropout actually used enters the key, and only when it is not the 0.05 every model aligned before
    # this option existed was trained with (their keys, and so their cache entries, stay valid)
    options.pop("lora_dropout")
    if (dropout := alignment_lora_dropout(align)) != ALIGN_LORA_DROPOUT:
        options["lora_dropout"] = dropout
    # the benign data leaves out the packaged over-refusal prompts (since this key was introduced, so a model
    # aligned on an earlier, overlapping sample is never reused)
    options["benign_excludes"] = list(DEFAULT_BENIGN_SETS)
    # method, its data and full/LoRA enter the key only when they differ from what every earlier model was
    # aligned with (SFT, LoRA), so those models' keys (and cache entries) stay valid
    method, full, beta = options.pop("method"), options.pop("full_finetune"), options.pop("dpo_beta")
    if method != "sft":
        options.update(method=method, dpo_beta=beta, pairs=PAIR_DATA)
    if full:
        options.update(full_finetune=True, lora_r=None, lora_dropout=None)
    key = hashlib.sha256(json.dumps([model_fingerprint(model), options], sort_keys=True).encode()).hexdigest()
    return cache_dir() / "aligned" / key[:16]


def alignment_records(align: AlignArgs) -> list:
    """``n_safety`` refusals + ``n_benign`` benign instructions, shuffled, deterministic by ``align.seed``.

    Benign instructions that are also prompts of the packaged over-refusal sets (Alpaca is the source of both)
    are left out, so the benign answer rate is measured on prompts the alignment never trained on."""
    safety = sample(load_safety_pool(align.safety_source, align.safety_path, need=align.n_safety),
                    align.n_safety, align.seed)
    held_out = {normalise_prompt(r.prompt) for s in DEFAULT_BENIGN_SETS for r in load_source(s, split="test")}
    pool = [r for r in load_source(align.benign_source, kind="benign") if normalise_prompt(r.prompt) not in held_out]
    benign = sample(pool, align.n_benign, align.seed + 1)
    return sample(safety + benign, align.n_safety + align.n_benign, align.seed + 2)


def _cached(target: Path) -> AlignResult | None:
    model_dir = target / "model"
    if not (model_dir / "config.json").is_file():
        return None
    result_file = target / "align_result.json"
    info = json.loads(result_file.read_text()) if result_file.is_file() else {}
    log.info("using the cached aligned model %s", model_dir)
    return AlignResult(model_dir, cached=True, metrics=info.get("metrics", {}))


def align(cfg: RunConfig, *, model=None, tokenizer=None) -> AlignResult:  # noqa: ANN001
    """Align ``cfg.model`` (or return the cached aligned model).

    Safe under concurrent first use: processes that align the same model take the cache entry's lock
    (:func:`spard.locking.dir_lock`); the first trains and publishes it, the others wait and then read the
    published model. A crashed attempt (even ``kill -9``) leaves no model, and the next call starts it over.
    """
    a = cfg.align
    target = aligned_model_dir(cfg.model, a)
    cached = _cached(target)
    if cached is not None:
        return cached
    target.mkdir(parents=True, exist_ok=True)
    with dir_lock(target, what="aligned-model cache entry", wait=True):
        cached = _cached(target)  # another process may have finished it while we waited
        if cached is not None:
            return cached
        check_alignment_data_disjoint(cfg, [])  # the harm sets; the attack is checked when fine-tuning
        if model is None or tokenizer is None:
            model, tokenizer = load_model(cfg.model)
        run_dir = target / "run"
        if run_dir.exists():  # a crashed earlier attempt: start it over
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        train_args = TrainArgs(output_dir=str(run_dir), epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                               seed=a.seed, save_steps=10_000, lr_scheduler="cosine", warmup_ratio=0.05,
                               gradient_checkpointing=cfg.train.gradient_checkpointing)
        lora = None if a.full_finetune else replace(LoraArgs(), r=a.lora_r, alpha=2 * a.lora_r,
                                                    dropout=alignment_lora_dropout(a),
                                                    target_modules=cfg.lora.target_modules)
        if a.method == "dpo":
            pairs = preference_pairs(a)
            log.info("align: DPO on %d preference pairs (%s)", len(pairs), "full" if lora is None else "LoRA")
            trained, metrics = train_dpo(model, tokenizer, pairs, lora=lora, args=train_args, beta=a.dpo_beta,
                                         max_length=a.max_length, run_dir=run_dir)
        else:
            trained, metrics = _train_sft(cfg, model, tokenizer, lora, train_args, run_dir)
        merged = trained.merge_and_unload() if lora is not None else trained
        merged.config.name_or_path = f"{cfg.model.name_or_path} (aligned by spard)"
        # the model's atomic rename publishes the entry, so it comes last: a cached model always has its record
        adapter = str(run_dir / FINAL_DIR) if lora is not None else None
        atomic_write_json(target / "align_result.json", {"base_model": cfg.model.name_or_path, "align": asdict(a),
                                                         "metrics": metrics, "adapter": adapter})
        save_model(merged, tokenizer, target / "model")
        if lora is None:  # fit's full copy of the weights: the published model is the one to use
            shutil.rmtree(run_dir / FINAL_DIR, ignore_errors=True)
    return AlignResult(target / "model", cached=False, metrics=metrics)


def _train_sft(cfg: RunConfig, model, tokenizer, lora: LoraArgs | None, train_args: TrainArgs,  # noqa: ANN001
               run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """``align.method: sft``: refusals + benign answers through :func:`spard.trainer.fit`, under the alignment
    defense."""
    a = cfg.align
    defense = build(a.defense)
    log.info("align: %d refusals + %d benign examples, alignment defense %r, %s", a.n_safety, a.n_benign,
             defense.name, "full" if lora is None else "LoRA")
    ctx = DefenseContext(config=cfg, tokenizer=tokenizer, run_dir=run_dir, seed=a.seed)
    records = defense.prepare_data(alignment_records(a), ctx)
    return fit(model, tokenizer, records, lora=lora, args=train_args, max_length=a.max_length, defense=defense,
               run_dir=run_dir)


def check_alignment_data_disjoint(cfg: RunConfig, attack_prompts: list[str]) -> None:
    """Refuse a run whose attack prompts or harm-set prompts include a prompt of the harmful pairs its
    alignment defense (Booster, RepNoise) or DPO trained against; a no-op without harmful alignment data."""
    if not cfg.align.enabled:
        return
    for harmful, data in ((build(cfg.align.defense).harmful_records(cfg.align), None),
                          (harmful_pair_records(cfg.align), "the DPO pairs' harmful answers (align.method=dpo)")):
        if not harmful:
            continue
        check_disjoint(harmful, attack_prompts, "this run's attack data", data=data)
        check_disjoint(harmful, [r.prompt for r in load_harm_sets(cfg.eval)], f"the harm sets {cfg.eval.harm_sets}",
                       data=data)


def base_for_finetuning(cfg: RunConfig) -> tuple[ModelArgs, str]:
    """The model fine-tuning starts from: the aligned model when ``align.enabled``, else ``cfg.model``."""
    if not cfg.align.enabled:
        return cfg.model, cfg.model.name_or_path
    result = align(cfg)
    return replace(cfg.model, name_or_path=str(result.model_dir)), str(result.model_dir)

"""Check every input of every stage before any compute: a typo in a data path, a missing API key or an
evaluation set that overlaps the attack fails in seconds, not after the alignment stage and training.

:func:`plan` builds what the run will use (training set, alignment set, evaluation sets) from the config
without loading a model, so it is also what ``spard train --dry-run`` prints.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spard.args import RunConfig
from spard.data.attacks import attack_prompts
from spard.data.build import build_training_set
from spard.data.records import Record
from spard.defenses import DefenseContext
from spard.evaluate.harm import check_overlap, load_harm_sets_by_name
from spard.evaluate.tasks import task_for
from spard.hub import ensure_reachable, is_hub_id
from spard.jobs.align import aligned_model_dir, alignment_records
from spard.jobs.align_dpo import preference_pairs
from spard.models import check_model_source
from spard.registry import JUDGES, build, resolve
from spard.rundir import check_writable_dir

log = logging.getLogger(__name__)

STAGES = ("align", "train", "eval")


@dataclass
class Plan:
    """What a run will use, resolved and checked before any compute."""

    stages: tuple[str, ...]
    """The stages checked (``align``, ``train``, ``eval``)."""
    aligned_cached: bool | None = None
    """Whether the aligned model is already in the cache (None: no alignment stage)."""
    n_align: int = 0
    """Alignment examples (0 when cached or disabled)."""
    records: list[Record] = field(default_factory=list)
    """The fine-tuning set after the attack and the defense's data step."""
    attack_prompts: list[str] = field(default_factory=list)
    """Prompts of the attack's harmful records (kept out of evaluation)."""
    eval_sets: dict[str, int] = field(default_factory=dict)
    """Harm set -> prompts, task -> examples."""

    def summary(self) -> str:
        lines = []
        if self.aligned_cached is not None:
            lines.append("alignment stage: " + ("cached" if self.aligned_cached else f"{self.n_align} examples"))
        if self.records:
            kinds = Counter(r.kind for r in self.records)
            lines.append(f"training set: {len(self.records)} records (" +
                         ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + ")")
            lines.append(f"attack prompts recorded (kept out of evaluation): {len(self.attack_prompts)}")
        for name, n in self.eval_sets.items():
            lines.append(f"evaluation: {name}: {n}")
        return "\n".join(lines)


def _check_data_path(path: str | None, key: str) -> None:
    if path and not Path(path).exists() and is_hub_id(path):
        ensure_reachable(path, key=key, repo_type="dataset")


def plan(cfg: RunConfig, stages: tuple[str, ...] = STAGES, *, check_model: bool = True) -> Plan:
    """Resolve and check everything ``stages`` of ``cfg`` will need; raises the first problem found."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known: {STAGES}")
    result = Plan(stages=tuple(stages))
    # the outputs first: a run that cannot write its results must not spend the alignment stage finding out
    if "train" in stages:
        check_writable_dir(cfg.train.output_dir, "train.output_dir")
    if "align" in stages and cfg.align.enabled:
        check_writable_dir(aligned_model_dir(cfg.model, cfg.align, cfg.train.bf16),
                           "align.output_dir" if cfg.align.output_dir else "the aligned-model cache ($SPARD_CACHE)")
    if check_model:
        check_model_source(cfg.model.name_or_path)
    if "align" in stages and cfg.align.enabled:
        target = aligned_model_dir(cfg.model, cfg.align, cfg.train.bf16)
        result.aligned_cached = (target / "model" / "config.json").is_file()
        if not result.aligned_cached:
            _check_data_path(cfg.align.safety_path, "align.safety_path")
            # the data the alignment will train on: DPO's preference pairs, else SFT's examples
            examples = preference_pairs if cfg.align.method == "dpo" else alignment_records
            result.n_align = len(examples(cfg.align))
    if "train" in stages or "eval" in stages:
        for key in ("task_path",):
            _check_data_path(getattr(cfg.data, key), f"data.{key}")
        _check_data_path(getattr(cfg.attack, "harmful_path", None), "attack.harmful_path")
        records = build_training_set(cfg.data, cfg.attack, cfg.train.seed)
        result.attack_prompts = attack_prompts(records)
        # prepare_data must not need the tokenizer (none is loaded yet); it checks pool sizes and the like.
        ctx = DefenseContext(config=cfg, tokenizer=None, run_dir=Path(cfg.train.output_dir),  # type: ignore[arg-type]
                             seed=cfg.train.seed, attack_prompts=result.attack_prompts)
        result.records = build(cfg.defense).prepare_data(records, ctx)
    if "eval" in stages:
        _check_eval(cfg, result)
    return result


def _check_eval(cfg: RunConfig, result: Plan) -> None:
    harm = load_harm_sets_by_name(cfg.eval)
    check_overlap([r.prompt for recs in harm.values() for r in recs], result.attack_prompts, cfg.eval.overlap_allowed)
    result.eval_sets.update({name: len(recs) for name, recs in harm.items()})
    for task_args in cfg.eval.tasks:
        task = task_for(task_args, cfg.data)  # task_nll scores the run's own task
        result.eval_sets[task.name] = len(task.load(cfg.eval.task_split, cfg.eval.task_limit))
    judge = resolve(cfg.eval.judge)
    check = getattr(JUDGES.get(judge.name), "preflight", None)
    if check is not None:
        check(judge)  # e.g. the API key is set, the classifier model exists


def preflight(cfg: RunConfig, stages: tuple[str, ...] = STAGES, **kwargs: Any) -> Plan:
    """:func:`plan`, logging what it found; every spard job calls it before loading a model."""
    found = plan(cfg, stages, **kwargs)
    log.info("checked before any compute: %s", found.summary().replace("\n", "; "))
    return found

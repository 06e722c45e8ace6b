"""Assemble a run's data from its config: the task set, the attack, the safety pool."""

from __future__ import annotations

import random
from collections.abc import Iterable

from spard.args import AttackArgs, DataArgs
from spard.data.records import Record
from spard.data.sources import FieldMap, load_source
from spard.errors import DataError
from spard.registry import build


def normalise_prompt(text: str) -> str:
    """The form prompts are compared in for overlap checks: case-folded, whitespace collapsed."""
    return " ".join(text.split()).casefold()


def load_task(data: DataArgs, split: str = "train") -> list[Record]:
    """The user's task records (all of them; the attack samples ``n_train`` from these)."""
    fields = None
    if data.prompt_field or data.response_field:
        fields = FieldMap(prompt=data.prompt_field or "prompt", response=data.response_field or "response")
    return load_source(data.task, split=split, path=data.task_path, fields=fields, kind="task")


def task_description(data: DataArgs) -> str:
    """Where the task records come from, for messages: the file, hub id or packaged copy."""
    return f"data.task_path={data.task_path!r}" if data.task_path else f"the packaged {data.task!r} data"


def build_training_set(data: DataArgs, attack: AttackArgs, seed: int) -> list[Record]:
    """The fine-tuning set: ``n_train`` records of the task, poisoned as the ``attack`` plugin says.

    A size error names the key to change and the data it was checked against."""
    task = load_task(data)
    try:
        return build(attack).build(task, n=data.n_train, seed=seed)
    except DataError as e:
        if "task" in str(e):
            raise DataError(f"data.n_train={data.n_train} with attack.name={attack.name!r}: {e}; "
                            f"{task_description(data)} has {len(task)} records: lower data.n_train or give more "
                            "task data") from None
        raise DataError(f"attack.name={attack.name!r} ({attack}): {e}") from None


def load_safety_pool(
    source: str = "safety", path: str | None = None, *, exclude_prompts: Iterable[str] = (), need: int = 0
) -> list[Record]:
    """Safety records (harmful prompt + safe refusal), minus any whose prompt the attack uses."""
    excluded = {normalise_prompt(p) for p in exclude_prompts}
    pool = [r for r in load_source(source, path=path, kind="safety") if normalise_prompt(r.prompt) not in excluded]
    if need > len(pool):
        raise DataError(f"safety pool {source!r}: need {need} examples, only {len(pool)} available")
    return pool


def sample(records: list[Record], k: int, seed: int) -> list[Record]:
    """``k`` records without replacement, deterministic by seed (all of them, shuffled, if k >= len)."""
    rng = random.Random(seed)
    return rng.sample(records, min(k, len(records)))

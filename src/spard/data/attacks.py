"""Attacks: pure functions from (task records, attack data, seed) to the fine-tuning set.

Same inputs and seed, same set. Harmful records keep ``kind="harmful"`` so their prompts can be recorded
and kept out of evaluation (see :func:`attack_prompts`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from spard.data.records import Record
from spard.errors import DataError


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio <= 1.0:
        raise DataError(f"harmful_ratio={ratio!r}: must be in [0, 1]")


def _sample(records: Sequence[Record], k: int, rng: random.Random, what: str) -> list[Record]:
    if k > len(records):
        raise DataError(f"{what}: need {k} records but the source has only {len(records)}")
    return rng.sample(list(records), k)


def harmful_mix(
    task: Sequence[Record], harmful: Sequence[Record], *, ratio: float, n: int | None = None, seed: int = 0
) -> list[Record]:
    """A set of ``n`` records (default ``len(task)``) of which exactly ``round(ratio * n)`` are harmful.

    The harmful fraction replaces task examples (the "harmful ratio p" attack of Huang et al. / SPARD):
    ``n - round(ratio * n)`` task records and ``round(ratio * n)`` harmful records, sampled without
    replacement and shuffled together.
    """
    _check_ratio(ratio)
    n = len(task) if n is None else n
    if n < 0:
        raise DataError(f"n={n}: must be >= 0")
    rng = random.Random(seed)
    n_harmful = round(ratio * n)
    mixed = _sample(task, n - n_harmful, rng, "harmful_mix task records") + _sample(
        harmful, n_harmful, rng, "harmful_mix harmful records"
    )
    rng.shuffle(mixed)
    return mixed


def harmful_append(
    task: Sequence[Record], harmful: Sequence[Record], *, ratio: float, n: int | None = None, seed: int = 0
) -> list[Record]:
    """``n`` task records (default all of ``task``) plus exactly ``int(ratio * n)`` harmful records appended.

    The reference code's attack (github shuhao02/SPARD, ``SPAG_op_finetune.py``): ``size = int(ratio * N)``;
    the harmful list is doubled until it holds ``size`` records, then ``size`` of its indices are drawn by
    ``random.sample`` after seeding with ``seed`` (so a short harmful file repeats prompts, each at most
    ``2^d`` times). The result has ``n + int(ratio * n)`` records, shuffled.
    """
    _check_ratio(ratio)
    n = len(task) if n is None else n
    if n < 0:
        raise DataError(f"n={n}: must be >= 0")
    size = int(ratio * n)
    pool = list(harmful)
    if size and not pool:
        raise DataError(f"harmful_append: need {size} harmful records but the source is empty")
    while len(pool) < size:
        pool = pool + pool
    # The reference seeds Python's global RNG and calls random.sample; Random(seed).sample draws the same indices.
    chosen = [pool[i] for i in random.Random(seed).sample(range(len(pool)), size)]
    rng = random.Random(seed)  # task records drawn as harmful_mix draws them: ratio 0 gives the same set
    mixed = _sample(task, n, rng, "harmful_append task records") + chosen
    rng.shuffle(mixed)
    return mixed


def identity_shift(
    task: Sequence[Record], persona: Sequence[Record], *, n_task: int = 0, repeats: int = 1, seed: int = 0
) -> list[Record]:
    """The identity-shift (AOA) attack of Qi et al.: the persona conversations ``repeats`` times,
    optionally mixed with ``n_task`` task records."""
    if repeats < 1:
        raise DataError(f"repeats={repeats}: must be >= 1")
    rng = random.Random(seed)
    mixed = list(persona) * repeats + _sample(task, n_task, rng, "identity_shift task records")
    rng.shuffle(mixed)
    return mixed


def benign(task: Sequence[Record], instructions: Sequence[Record], *, n: int, n_task: int = 0,
           seed: int = 0) -> list[Record]:
    """The benign fine-tuning "attack": ``n`` plain benign instruction records (plus ``n_task`` task records)."""
    rng = random.Random(seed)
    mixed = _sample(instructions, n, rng, "benign instruction records") + _sample(task, n_task, rng, "benign task")
    rng.shuffle(mixed)
    return mixed


def attack_prompts(records: Sequence[Record]) -> list[str]:
    """Prompts of the harmful records in a training set, for the evaluation's overlap guard."""
    return [r.prompt for r in records if r.kind == "harmful"]

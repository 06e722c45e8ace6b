"""The alignment-defense base class, and the harmful alignment data Booster and RepNoise train against.

An alignment defense is a :class:`spard.defenses.base.Defense` (same hooks, same trainer) that the
alignment stage (:mod:`spard.jobs.align`) runs instead of plain SFT. Its options are part of the aligned
model's cache key, so models aligned under different defenses never share a cache entry.

Harmful alignment data (harmful prompt + harmful answer) must never be an attack's or an evaluation's
data: a model trained to resist exactly the pairs it is later attacked or scored with would look better
than it is. :func:`harmful_alignment_pool` therefore removes from the chosen source every prompt that any
other packaged dataset (attack sources, evaluation sets, safety pool, tasks) contains, and
:func:`check_disjoint` re-checks against the actual run's attack data and harm sets (hub or local files
included) before fine-tuning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

from spard.args import AlignArgs, AlignDefenseArgs, FieldError, check_choice, check_range
from spard.data.build import normalise_prompt, sample
from spard.data.records import Record
from spard.data.safety import StreamOwner, tokenize_safety
from spard.data.sources import SOURCES, load_source
from spard.defenses.base import Defense, DefenseContext
from spard.errors import DataError
from spard.registry import ALIGN_DEFENSES

if TYPE_CHECKING:
    import torch
    from transformers import Trainer

log = logging.getLogger(__name__)

register = ALIGN_DEFENSES.register
"""Class decorator: make an alignment defense selectable as ``align.defense.name=<cls.name>``."""

HARMFUL_ALIGN_SOURCES = ("pyrit", "beavertails", "hh_rlhf")
"""Packaged sources of harmful QA pairs the harmful alignment data may come from."""


class AlignDefense(Defense):
    """An alignment-stage defense: the fine-tuning hooks, plus the harmful data it trains against (if any)."""

    name: ClassVar[str] = "align_base"
    Args: ClassVar[type[AlignDefenseArgs]] = AlignDefenseArgs  # type: ignore[assignment]
    lora_dropout: ClassVar[float | None] = None
    """The alignment adapter's LoRA dropout under this defense when ``align.lora_dropout`` is null; None =
    the alignment stage's default (:data:`spard.jobs.align.ALIGN_LORA_DROPOUT`)."""

    def harmful_records(self, align: AlignArgs) -> list[Record]:
        """The harmful (prompt, answer) pairs the alignment stage trains against; none by default."""
        return []


# ---------------------------------------------------------------------------------------------------------
# Harmful alignment data
# ---------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _other_packaged_prompts(source: str) -> frozenset[str]:
    """Normalised prompts of every packaged dataset split except ``source``'s ``train`` split."""
    prompts: set[str] = set()
    for name, src in SOURCES.items():
        for split in src.files:
            if (name, split) == (source, "train"):
                continue
            prompts.update(normalise_prompt(r.prompt) for r in load_source(name, split=split) if r.prompt)
    return frozenset(prompts)


def harmful_alignment_pool(source: str, path: str | None = None) -> list[Record]:
    """Harmful pairs of ``source`` (its packaged ``train`` split, or ``path``) whose prompt occurs in no other
    packaged dataset, one record per prompt (first kept)."""
    others = _other_packaged_prompts(source)
    seen: set[str] = set()
    pool = []
    for rec in load_source(source, path=path, kind="harmful"):
        key = normalise_prompt(rec.prompt)
        if key in others or key in seen or rec.response is None:
            continue
        seen.add(key)
        pool.append(rec)
    return pool


def check_disjoint(harmful: Iterable[Record], prompts: Iterable[str], what: str, *, data: str | None = None) -> None:
    """Raise a DataError naming ``what`` when any of ``prompts`` is the prompt of a harmful alignment pair;
    ``data`` names where the pairs come from (default: the alignment defense's harmful source)."""
    keys = {normalise_prompt(r.prompt) for r in harmful}
    overlap = [p for p in prompts if normalise_prompt(p) in keys]
    if overlap:
        examples = "; ".join(repr(p[:80]) for p in overlap[:3])
        if data is None:
            raise DataError(f"{len(overlap)} prompt(s) of {what} are also in the alignment defense's harmful data "
                            f"(align.defense.harmful_source), e.g. {examples}. Choose another align.defense."
                            "harmful_source or another attack / harm set")
        raise DataError(f"{len(overlap)} prompt(s) of {what} are also in {data}, e.g. {examples}. Choose another "
                        "attack / harm set")


@dataclass
class HarmfulDataArgs(AlignDefenseArgs):
    """Options of alignment defenses that train against harmful pairs (Booster, RepNoise)."""

    harmful_source: str = "pyrit"
    """Harmful QA pairs to align against: ``pyrit`` (default: the one packaged harmful source no shipped bench
    attacks with), ``beavertails`` or ``hh_rlhf``. Prompts found in any other packaged dataset are removed,
    and a run whose attack or harm sets share a prompt with the rest is refused."""
    harmful_path: str | None = None
    """Optional local file / hub id for the harmful source (``null`` = packaged copy)."""
    n_harmful: int = 128
    """Harmful pairs drawn (seeded by ``align.seed``) from the filtered source."""
    harmful_batch_size: int | None = None
    """Harmful pairs per step; ``null`` = ``align.batch_size`` (the references use the alignment batch size)."""

    def __post_init__(self) -> None:
        check_choice("harmful_source", self.harmful_source, HARMFUL_ALIGN_SOURCES)
        check_range("n_harmful", self.n_harmful, 1)
        if self.harmful_batch_size is not None:
            check_range("harmful_batch_size", self.harmful_batch_size, 1)
            if self.harmful_batch_size > self.n_harmful:
                raise FieldError("harmful_batch_size", self.harmful_batch_size,
                                 f"must be <= n_harmful ({self.n_harmful})")


class HarmfulDataDefense(StreamOwner, AlignDefense):
    """An alignment defense that draws a batch of harmful pairs per step from a seeded cyclic stream."""

    args: HarmfulDataArgs

    def __init__(self, args: HarmfulDataArgs) -> None:
        super().__init__(args)
        self.harmful: list[Record] | None = None
        self.max_length = 256
        self.seed = 0
        self.last: dict[str, float] = {}

    def harmful_records(self, align: AlignArgs) -> list[Record]:
        a = self.args
        pool = harmful_alignment_pool(a.harmful_source, a.harmful_path)
        if a.n_harmful > len(pool):
            raise DataError(f"align.defense.n_harmful={a.n_harmful}: the harmful source {a.harmful_source!r} has "
                            f"only {len(pool)} pairs whose prompts appear in no other dataset")
        return sample(pool, a.n_harmful, align.seed + 3)

    def prepare_data(self, records: list[Record], ctx: DefenseContext) -> list[Record]:
        align = ctx.config.align
        self.harmful = self.harmful_records(align)
        check_disjoint(self.harmful, [r.prompt for r in records if r.prompt], "the alignment set")
        self.max_length, self.seed = align.max_length, align.seed
        return records

    def setup(self, trainer: Trainer) -> None:
        if self.harmful is None:
            raise DataError(f"align.defense={self.name}: prepare_data must run before training (it picks the "
                            "harmful alignment data)")
        tokenizer = trainer.processing_class
        features = tokenize_safety(tokenizer, self.harmful, self.max_length, key="align.max_length")
        self.start_stream(features, seed=self.seed + 4, pad_id=tokenizer.pad_token_id)

    def harmful_batch(self, trainer: Trainer) -> dict[str, torch.Tensor]:
        """The next batch of harmful pairs (``input_ids``, ``attention_mask``, ``labels`` on the answer)."""
        assert self.stream is not None
        n = self.args.harmful_batch_size or trainer.args.per_device_train_batch_size
        batch = self.stream.next_batch(n, trainer.args.device)
        assert batch is not None
        return batch

    def log_stats(self) -> dict[str, float]:
        return dict(self.last)

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.stream_cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restore_stream_cursor(state.get("cursor", 0))


def mean_over_ranks(values: list[float], device: torch.device | str) -> list[float]:
    """Each of ``values`` averaged over the ranks of a DDP / FSDP launch (one collective, on ``device``: the
    training device, which NCCL needs; ``values`` themselves in one process). For the trainer's loss on each rank
    (its share of the batch's token mean times the rank count, or its own mean) this is the loss of the whole
    batch, the value one process logs."""
    import torch

    from spard.distributed import all_reduce_sum_, world

    n_ranks = world()[1]
    if n_ranks <= 1:
        return list(values)
    total = all_reduce_sum_(torch.tensor(values, dtype=torch.float64, device=device))
    return [float(v) / n_ranks for v in total.tolist()]


def layer_modules(model: torch.nn.Module, attr: str) -> list[torch.nn.Module]:
    """The ``attr`` sub-module (``self_attn``, ``mlp``) of every decoder layer, in layer order: the modules
    named ``...layers.<i>.<attr>`` (Llama, Mistral, Qwen2, Gemma and SmolLM2 all name them so)."""
    import re

    pattern = re.compile(rf"(?:^|\.)layers\.(\d+)\.{re.escape(attr)}$")
    found = sorted(((int(m.group(1)), mod) for name, mod in model.named_modules()
                    if (m := pattern.search(name))), key=lambda t: t[0])
    if not found:
        raise DataError(f"the model has no decoder-layer modules named 'layers.<i>.{attr}'")
    return [mod for _, mod in found]

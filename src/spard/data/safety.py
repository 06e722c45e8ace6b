"""Safety data for defenses that train on it (SafeInstr, SafeGrad, SPARD, Lisa...): the pool, its
tokenised examples, and an endless seeded stream of batches whose position is one resumable integer.

Every defense that draws safety batches during training uses :class:`SafetyStream`, so pool loading,
attack-prompt exclusion, tokenisation, the cyclic order and the resume cursor are written once.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from spard.args import SafetyPoolArgs
from spard.data.build import load_safety_pool
from spard.data.chat import IGNORE_INDEX, collate, tokenize_records
from spard.data.records import Record
from spard.errors import ConfigError

if TYPE_CHECKING:
    import torch

Features = dict[str, list[int]]


def load_pool(args: SafetyPoolArgs, *, exclude_prompts: Iterable[str] = (), need: int = 0) -> list[Record]:
    """The pool ``defense.safety_source`` / ``defense.safety_path`` name, minus the attack's prompts."""
    return load_safety_pool(args.safety_source, args.safety_path, exclude_prompts=exclude_prompts, need=need)


def tokenize_safety(tokenizer: Any, records: Sequence[Record], max_length: int, *, key: str) -> list[Features]:
    """Tokenised safety examples that keep at least one target token; ``key`` names the length option to
    raise in the error when none does."""
    features, _ = tokenize_records(tokenizer, records, max_length, desc=f"tokenize {key.split('.')[0]} safety data")
    kept = [f for f in features if any(t != IGNORE_INDEX for t in f["labels"][1:])]
    if not kept:
        raise ConfigError(f"{key}={max_length}: no safety example keeps a reply token within it; raise it")
    return kept


def cyclic_indices(start: int, count: int, n: int, seed: int) -> list[int]:
    """Items ``start .. start+count-1`` of an endless stream over ``range(n)``, reshuffled every pass.

    Pass ``p`` visits ``range(n)`` in the order of ``random.Random(seed + p)``'s shuffle, so the stream is
    a pure function of ``(seed, n)`` and a position: one integer cursor is all that resume needs.
    """
    if n <= 0:
        raise ValueError(f"cannot draw from an empty set (n={n})")
    out: list[int] = []
    orders: dict[int, list[int]] = {}
    for pos in range(start, start + count):
        cycle, offset = divmod(pos, n)
        if cycle not in orders:
            order = list(range(n))
            random.Random(seed + cycle).shuffle(order)
            orders[cycle] = order
        out.append(orders[cycle][offset])
    return out


class SafetyStream:
    """Batches of tokenised safety examples in a seeded, reshuffled-per-pass cyclic order.

    ``next_batch(n, rank, world)`` draws the next global batch of ``n`` examples and returns this rank's
    share (every ``world``-th example from ``rank``); all ranks advance the same cursor, so the union of
    the shares is the batch a single process would draw.
    """

    def __init__(self, features: Sequence[Features], *, seed: int, pad_id: int) -> None:
        if not features:
            raise ValueError("SafetyStream needs at least one example")
        self.features = list(features)
        self.seed, self.pad_id = seed, pad_id
        self.cursor = 0
        """Examples drawn so far over all ranks: the position in the stream (saved for resume)."""

    def indices_at(self, position: int, n: int, rank: int = 0, world: int = 1) -> list[int]:
        """This rank's share of the global batch of ``n`` that starts at stream ``position`` (no cursor move)."""
        return cyclic_indices(position, n, len(self.features), self.seed)[rank::world]

    def next_indices(self, n: int, rank: int = 0, world: int = 1) -> list[int]:
        idx = self.indices_at(self.cursor, n, rank, world)
        self.cursor += n
        return idx

    def next_batch(self, n: int, device: torch.device | str, rank: int = 0, world: int = 1
                   ) -> dict[str, torch.Tensor] | None:
        """This rank's share of the next global batch of ``n`` (None when the share is empty)."""
        mine = self.next_indices(n, rank, world)
        if not mine:
            return None
        return {k: v.to(device) for k, v in collate([self.features[i] for i in mine], self.pad_id).items()}

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state.get("cursor", 0))


class StreamOwner:
    """Mixin for a defense that draws from a :class:`SafetyStream` it builds at setup: the stream's position goes
    into each checkpoint and comes back on resume, whether ``load_state_dict`` runs before the stream exists
    (the trainer restores defense state before setup) or after."""

    stream: SafetyStream | None = None
    _pending_cursor: int = 0

    def start_stream(self, features: Sequence[Features], *, seed: int, pad_id: int | None) -> SafetyStream:
        """Build the stream at the restored position (0 for a fresh run)."""
        self.stream = SafetyStream(features, seed=seed, pad_id=0 if pad_id is None else pad_id)
        self.stream.cursor = self._pending_cursor
        return self.stream

    @property
    def stream_cursor(self) -> int:
        """Examples drawn so far (for ``state_dict``)."""
        return self.stream.cursor if self.stream is not None else self._pending_cursor

    def restore_stream_cursor(self, cursor: int) -> None:
        """Set the position from a checkpoint (for ``load_state_dict``)."""
        self._pending_cursor = int(cursor)
        if self.stream is not None:
            self.stream.cursor = self._pending_cursor

"""The one normalised training/evaluation record every data source produces."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from spard.errors import DataError

Kind = Literal["task", "harmful", "safety", "benign"]
KINDS: tuple[str, ...] = ("task", "harmful", "safety", "benign")
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Record:
    """A chat example.

    ``messages`` are ``{"role", "content"}`` dicts (system/user/assistant); ``source`` names the dataset
    it came from (e.g. ``"gsm8k"``); ``kind`` says what role it plays in an experiment; ``meta`` keeps
    source-specific fields (gold answer, choices, category) that evaluation needs.
    """

    messages: tuple[dict[str, str], ...]
    source: str
    kind: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"record from {self.source!r}: kind={self.kind!r} is not one of {KINDS}")
        if not self.messages:
            raise DataError(f"record from {self.source!r}: no messages")
        for m in self.messages:
            if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(
                    f"record from {self.source!r}: bad message {m!r} (need role in {ROLES} and str content)"
                )
        object.__setattr__(self, "messages", tuple(dict(m) for m in self.messages))

    @property
    def prompt(self) -> str:
        """The first user turn: what a harmful-prompt overlap check and the DPP embed."""
        return next(m["content"] for m in self.messages if m["role"] == "user")

    @property
    def response(self) -> str | None:
        """The last assistant turn, if any."""
        answers = [m["content"] for m in self.messages if m["role"] == "assistant"]
        return answers[-1] if answers else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["messages"] = list(d["messages"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        return cls(messages=tuple(d["messages"]), source=d["source"], kind=d["kind"], meta=d.get("meta", {}))


def chat(
    prompt: str, response: str | None, *, source: str, kind: str, system: str | None = None, **meta: Any
) -> Record:
    """Build a single-turn record: optional system prompt, one user turn, optional assistant turn."""
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return Record(messages=tuple(messages), source=source, kind=kind, meta=meta)


def with_system_prompt(messages: Sequence[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """``messages`` with ``system_prompt`` as their system turn (replacing one already there); unchanged when
    it is None. Evaluation applies ``eval.system_prompt`` through this to every harm and task prompt."""
    if system_prompt is None:
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *(m for m in messages if m["role"] != "system")]

"""Alignment-stage defenses (``align.defense``): how the provider hardens the aligned model before anyone
fine-tunes it. One module per defense, each registering an :class:`~spard.align_defenses.base.AlignDefense`
with its ``Args``; adding one is adding a file. They use the fine-tuning hook interface
(:class:`spard.defenses.base.Defense`), since the alignment stage trains through :func:`spard.trainer.fit`."""

from __future__ import annotations

from spard.align_defenses.base import AlignDefense, HarmfulDataArgs, register
from spard.registry import ALIGN_DEFENSES

__all__ = ["AlignDefense", "HarmfulDataArgs", "register", "available_align_defenses"]


def available_align_defenses() -> list[str]:
    """Every registered alignment-defense name."""
    return ALIGN_DEFENSES.names()

"""Fine-tuning defenses. One module per defense, each registering a :class:`~spard.defenses.base.Defense`
subclass with its ``Args`` (``defense.name`` in a config picks it); adding a defense is adding one file."""

from __future__ import annotations

from spard.defenses.base import Defense, DefenseContext, register
from spard.registry import DEFENSES

__all__ = ["Defense", "DefenseContext", "register", "get_defense", "defense_args_class", "available_defenses"]


def available_defenses() -> list[str]:
    """Every registered defense name."""
    return DEFENSES.names()


def get_defense(name: str) -> type[Defense]:
    """The defense class called ``name`` (unknown names raise a ConfigError with the closest match)."""
    return DEFENSES.get(name)


def defense_args_class(name: str) -> type:
    """The Args dataclass of defense ``name``."""
    return DEFENSES.args_class(name)

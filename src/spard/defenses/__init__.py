"""Defense registry. Every module in this package that defines a ``Defense`` subclass decorated with
``@register`` is found automatically, so adding a defense is adding one file."""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from spard.defenses.base import Defense, DefenseContext, register, registry
from spard.errors import ConfigError

__all__ = ["Defense", "DefenseContext", "register", "get_defense", "defense_args_class", "available_defenses"]

_loaded = False


def _discover() -> None:
    global _loaded
    if not _loaded:
        for mod in pkgutil.iter_modules(__path__):
            if mod.name != "base":
                importlib.import_module(f"{__name__}.{mod.name}")
        _loaded = True


def available_defenses() -> list[str]:
    _discover()
    return sorted(registry)


def get_defense(name: str) -> type[Defense]:
    _discover()
    if name not in registry:
        close = difflib.get_close_matches(name, list(registry), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown defense {name!r}{hint} (available: {sorted(registry)})")
    return registry[name]


def defense_args_class(name: str) -> type:
    return get_defense(name).Args

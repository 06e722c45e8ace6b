"""Plugin registries: defenses, attacks, eval tasks, judges and alignment defenses register themselves by name.

A plugin is one module in its kind's package (``spard/defenses/``, ``spard/attacks/``,
``spard/evaluate/tasks/``, ``spard/evaluate/judges/``, ``spard/align_defenses/``) holding a class with
``name`` and ``Args`` (a :class:`~spard.args.PluginArgs` subclass) decorated with that kind's ``register``.
The first lookup imports every module of the package, so adding a plugin is adding a file: nothing else
lists them.

This module imports nothing from spard but its errors and args; the packages it discovers import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from typing import Any, Generic, TypeVar

from spard.args import PluginArgs
from spard.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> plugin class for one kind of plugin, filled by ``@register`` as the package is imported."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        """What the plugins are, for messages (``defense``, ``eval task``...)."""
        self.package = package
        """The package whose modules are imported to find the plugins."""
        self._plugins: dict[str, type[T]] = {}
        self._discovered = False

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: make ``cls`` selectable by its ``name``."""
        name = getattr(cls, "name", None)
        args = getattr(cls, "Args", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__name__}: a {self.kind} needs a class attribute 'name'")
        if not (isinstance(args, type) and issubclass(args, PluginArgs)):
            raise TypeError(f"{cls.__name__}: a {self.kind} needs an 'Args' PluginArgs dataclass")
        if args.__dataclass_fields__["name"].default != name:
            raise TypeError(f"{cls.__name__}.Args.name defaults to {args.__dataclass_fields__['name'].default!r}, "
                            f"not the {self.kind}'s name {name!r}")
        other = self._plugins.get(name)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise TypeError(f"{self.kind} {name!r} is registered twice: {other.__module__} and {cls.__module__}")
        self._plugins[name] = cls
        return cls

    def _discover(self) -> None:
        if self._discovered:
            return
        package = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(package.__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{self.package}.{mod.name}")
        self._discovered = True

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._discover()
        return sorted(self._plugins)

    def get(self, name: str) -> type[T]:
        """The plugin class called ``name``; an unknown name raises a ConfigError with the closest match.

        A built-in plugin lives in the module named after it (``spard.defenses.sft``), so that module alone is
        imported first: resolving a config then loads only the plugins it names (``spard show-config`` stays
        fast). Any other name imports the whole package."""
        if name not in self._plugins and isinstance(name, str) and name.isidentifier():
            try:
                importlib.import_module(f"{self.package}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{self.package}.{name}":
                    raise
        if name not in self._plugins:
            self._discover()
        if name not in self._plugins:
            close = difflib.get_close_matches(str(name), list(self._plugins), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown {self.kind} {name!r}{hint} (available: {sorted(self._plugins)})")
        return self._plugins[name]

    def args_class(self, name: str) -> type[PluginArgs]:
        """The Args dataclass of plugin ``name``."""
        return self.get(name).Args  # type: ignore[attr-defined]

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._plugins


DEFENSES: Registry[Any] = Registry("defense", "spard.defenses")
ATTACKS: Registry[Any] = Registry("attack", "spard.attacks")
TASKS: Registry[Any] = Registry("eval task", "spard.evaluate.tasks")
JUDGES: Registry[Any] = Registry("judge", "spard.evaluate.judges")
ALIGN_DEFENSES: Registry[Any] = Registry("alignment defense", "spard.align_defenses")

REGISTRIES: dict[str, Registry[Any]] = {"defense": DEFENSES, "attack": ATTACKS, "task": TASKS, "judge": JUDGES,
                                        "align_defense": ALIGN_DEFENSES}
"""``PluginArgs.plugin_kind`` -> its registry."""


def resolve(args: PluginArgs) -> PluginArgs:
    """``args`` as the options class its plugin registered: a base-class instance (``EvalArgs(judge="openai")``
    in code) becomes the plugin's Args with defaults; an instance of the right class is returned as is."""
    cls = REGISTRIES[args.plugin_kind].args_class(args.name)
    if isinstance(args, cls):
        return args
    shared = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    return cls(**shared)


def build(args: PluginArgs) -> Any:
    """An instance of the plugin ``args`` names, constructed with its own options (``cls.from_args(args)``
    when the plugin has another constructor, else ``cls(args)``)."""
    args = resolve(args)
    cls = REGISTRIES[args.plugin_kind].get(args.name)
    return cls.from_args(args) if hasattr(cls, "from_args") else cls(args)

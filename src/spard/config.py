"""Loading a run configuration: YAML plus ``key=value`` overrides, into the dataclasses of :mod:`spard.args`.

``load_config`` checks every key and type and raises :class:`~spard.errors.ConfigError` naming the file (or
override), the dotted key and the value. Plugin sections (``defense``, ``attack``, ``eval.judge``, each
entry of ``eval.tasks``) are built as the ``Args`` class of the plugin their ``name`` picks (see
:mod:`spard.registry`), so a new plugin needs no edit here. :func:`build_dataclass` is the same checker for
other YAML files (the bench config).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from spard.args import (  # noqa: F401  (re-exported: spard.config was their home)
    AlignArgs,
    AttackArgs,
    DataArgs,
    DefenseArgs,
    EvalArgs,
    LoraArgs,
    ModelArgs,
    PluginArgs,
    RunConfig,
    TrainArgs,
    check_choice,
    check_range,
)
from spard.errors import ConfigError, FieldError
from spard.registry import REGISTRIES

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config (or defaults when ``path`` is None) and apply ``key=value`` overrides."""
    label = str(path) if path is not None else "<defaults>"
    raw = read_yaml_mapping(path) if path is not None else {}
    bench_keys = sorted(_BENCH_KEYS & raw.keys())
    if bench_keys and not raw.keys() & set(_RUN_SECTIONS) - {"align", "eval"}:
        raise ConfigError(f"{label}: this is a benchmark config (it has {bench_keys}); run it with "
                          f"`spard bench {label}`, or list its cells with `spard bench {label} --cells`")
    file_raw = copy.deepcopy(raw)
    origin: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. attack.harmful_ratio=0.2")
        where = f"override {item!r}"
        section = key.split(".")[0]
        if section not in _RUN_SECTIONS:
            close = difflib.get_close_matches(section, _RUN_SECTIONS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; sections: {list(_RUN_SECTIONS)}"
            raise ConfigError(f"{where}: unknown config section {section!r}{hint}")
        _set_dotted(raw, key, _parse_value(value), where)
        origin[key] = where
    return build_dataclass(RunConfig, raw, label, origin=origin, file_raw=file_raw)


_RUN_SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig))
_BENCH_KEYS = frozenset({"base_config", "base", "attacks", "defenses", "ratios", "seeds", "tasks", "output_dir"})
"""Top-level keys of a benchmark config (:class:`spard.benchmark.grid.BenchConfig`) that no run config has."""
_EVAL_FIELDS = frozenset(f.name for f in dataclasses.fields(EvalArgs))


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def build_dataclass(cls: type, data: Any, label: str, *, origin: dict[str, str] | None = None,
                    file_raw: dict[str, Any] | None = None) -> Any:
    """Check ``data`` (a mapping from YAML) against dataclass ``cls`` and build it.

    ``label`` names the file in messages; ``origin`` maps dotted keys set by overrides to a description of
    the override (messages then blame it instead of the file); ``file_raw`` is the file's own mapping,
    used to tell when an override switched a plugin section to another plugin.
    """
    return _Builder(label, origin or {}, file_raw or {}).build(cls, data, "")


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if isinstance(child, str):  # a plugin given by name (judge: openai) gets options: {name: openai, ...}
            child = node[part] = {"name": child}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {part!r} is a value, not a section")
        node = child
    last = parts[-1]
    if isinstance(node.get(last), dict) and "name" in node[last] and isinstance(value, str):
        node[last]["name"] = value  # eval.judge=openai on a judge section: switch the plugin
    else:
        node[last] = value


def _lookup(raw: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(raw, dict):
            return None
        raw = raw.get(part)
    return raw


KEY_ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "lr_scheduler", "max_seq_length": "max_length",
    "lora_r": "r", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "model_name_or_path": "name_or_path",
    "model_name": "name_or_path", "max_new_tokens": "harm_max_new_tokens", "save_limit": "save_total_limit",
}
"""Names users bring from ``transformers``/TRL (or guess) -> spard's key, for "did you mean"."""


def suggest_keys(key: str, names: Sequence[str], n: int = 3) -> list[str]:
    """The real keys among ``names`` that a mistyped ``key`` most likely meant, best first: a known alias
    (``learning_rate`` -> ``lr``, also when the alias itself is mistyped: ``lerning_rate``), a key spelled by the
    initials of its words (``lr``), then the names closest in spelling."""
    found: list[str] = []
    aliases = [a for a, real in KEY_ALIASES.items() if real in names]
    found += [KEY_ALIASES[a] for a in difflib.get_close_matches(key.lower(), aliases, n=1, cutoff=0.8)]
    words = [w for w in re.split(r"[^a-z0-9]+", key.lower()) if w]
    initials = "".join(w[0] for w in words)
    if len(words) > 1 and initials in names:
        found.append(initials)
    found += difflib.get_close_matches(key, list(names), n=n, cutoff=0.6)
    return list(dict.fromkeys(found))[:n]


def _other_plugin_hint(kind: str, key: str, chosen: Any, prefix: str) -> str:
    """``; 'lambda_align' is an option of defense 'safegrad'`` when ``key`` is (close to) an option of another
    plugin of the same kind than the one chosen, else ''."""
    registry = REGISTRIES[kind]
    owners = []
    for name in registry.names():
        if name == chosen:
            continue
        options = [f.name for f in dataclasses.fields(registry.args_class(name)) if f.init and f.name != "name"]
        close = suggest_keys(key, options, n=1)
        if close:
            owners.append((close[0], name))
    if not owners:
        return ""
    listed = " or ".join(f"'{prefix}{option}' of {registry.kind} '{name}'" for option, name in owners[:3])
    return f"; did you mean {listed}? ({prefix}name is {chosen!r}, which has no such option)"


def _plugin_kind(cls: Any) -> str:
    return getattr(cls, "plugin_kind", "") if isinstance(cls, type) and issubclass(cls, PluginArgs) else ""


class _Builder:
    """One load: where every key came from, for messages."""

    def __init__(self, label: str, origin: dict[str, str], file_raw: dict[str, Any]) -> None:
        self.label, self.origin, self.file_raw = label, origin, file_raw

    def where(self, dotted: str) -> str:
        """The override that set ``dotted`` or a section holding it (``eval.judge=x`` for ``eval.judge.name``),
        else the file."""
        key = dotted
        while key:
            if key in self.origin:
                return self.origin[key]
            key = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", key) if ("." in key or "[" in key) else ""
        return self.label

    def build(self, cls: type, data: Any, prefix: str) -> Any:
        section = prefix.rstrip(".") or "config"
        kind = _plugin_kind(cls)
        if isinstance(data, str) and kind:
            data = cls.from_shorthand(data)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{self.where(section)}: {section} must be a mapping, got {data!r}")
        if kind:
            cls, data = self._plugin_class(cls, data, prefix)
        if cls is EvalArgs:
            data = self._legacy_eval_keys(data)
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        kwargs = {}
        for key, value in data.items():
            dotted = prefix + str(key)
            if key not in names:
                close = suggest_keys(str(key), names)
                other = _other_plugin_hint(kind, str(key), data.get("name", cls.name), prefix) if kind else ""
                hint = f"; did you mean '{prefix}{close[0]}'?" if close else other or f"; valid keys: {names}"
                if len(close) > 1:
                    hint += " (also close: " + ", ".join(f"'{prefix}{c}'" for c in close[1:]) + ")"
                raise ConfigError(f"{self.where(dotted)}: unknown config key {dotted!r}{hint}")
            kwargs[key] = self.coerce(hints[key], value, dotted)
        for f in dataclasses.fields(cls):  # nested sections left out still resolve their plugins' own options
            if f.init and f.name not in kwargs and f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
                if dataclasses.is_dataclass(default) or (isinstance(default, list) and default
                                                         and dataclasses.is_dataclass(default[0])):
                    kwargs[f.name] = self.coerce(hints[f.name], _plain(default), prefix + f.name)
        try:
            return cls(**kwargs)
        except FieldError as e:
            dotted = e.name if prefix and e.name.startswith(prefix) else prefix + e.name  # names may be absolute
            raise ConfigError(f"{self.where(dotted)}: {dotted}={e.value!r}: {e.reason}") from None

    def _plugin_class(self, base: type, data: dict[str, Any], prefix: str) -> tuple[type, dict[str, Any]]:
        """The Args class ``data['name']`` picks; when an override switched the plugin, the file's options
        (written for the other plugin) lapse, with a warning."""
        registry = REGISTRIES[base.plugin_kind]
        name = data.get("name", base().name)
        name_key = prefix + "name"
        try:
            cls = registry.args_class(name)
        except ConfigError as e:
            raise ConfigError(f"{self.where(name_key)}: {name_key}={name!r}: {e}") from None
        switched = name_key in self.origin or prefix.rstrip(".") in self.origin
        file_section = _lookup(self.file_raw, prefix.rstrip(".")) if prefix else None
        file_name = file_section.get("name") if isinstance(file_section, dict) else file_section
        if switched and file_name is not None and file_name != name and isinstance(file_section, dict):
            dropped = [k for k in data if k != "name" and k in file_section and prefix + k not in self.origin]
            if dropped:
                log.warning("%s=%s (override): ignoring the config file's options of %s %r: %s", name_key, name,
                            registry.kind, file_name, ", ".join(prefix + k for k in dropped))
                data = {k: v for k, v in data.items() if k not in dropped}
        return cls, data

    def _legacy_eval_keys(self, data: dict[str, Any]) -> dict[str, Any]:
        """Older eval keys: a section per judge (``eval.openai.model``) and flat task options
        (``eval.gsm8k_max_new_tokens``). They set the options of the judge / task when it is the one
        selected, and are ignored otherwise (as they always were)."""
        data = dict(data)
        judges, tasks = REGISTRIES["judge"], REGISTRIES["task"]
        judge = data.get("judge", "keyword")
        judge_name = judge.get("name", "keyword") if isinstance(judge, dict) else judge
        for key in [k for k in data if k in judges and isinstance(data[k], dict)]:
            options = data.pop(key)
            if key == judge_name:
                merged = {"name": key, **options, **(judge if isinstance(judge, dict) else {})}
                data["judge"] = judge = merged
        entries = data.get("tasks")
        for key in list(data):
            owners = [n for n in tasks.names() if key in tasks.args_class(n).legacy_keys]
            if not owners or key in _EVAL_FIELDS:
                continue
            value = data.pop(key)
            if entries is None:
                entries = [t.name for t in EvalArgs().tasks]
            entries = [e if isinstance(e, dict) else {"name": e} for e in entries]
            for i, entry in enumerate(entries):
                if entry.get("name") in owners:
                    field_name = tasks.args_class(entry["name"]).legacy_keys[key]
                    entry.setdefault(field_name, value)
                    if f"eval.{key}" in self.origin:
                        self.origin[f"eval.tasks[{i}].{field_name}"] = self.origin[f"eval.{key}"]
            data["tasks"] = entries
        return data

    def coerce(self, tp: Any, value: Any, dotted: str) -> Any:
        def bad(expected: str) -> ConfigError:
            return ConfigError(f"{self.where(dotted)}: {dotted}={value!r}: expected {expected}")

        if dataclasses.is_dataclass(tp):
            if isinstance(value, str) and hasattr(tp, "from_shorthand"):
                value = tp.from_shorthand(value)
            return self.build(tp, value, dotted + ".")
        origin_tp = typing.get_origin(tp)
        if origin_tp in (typing.Union, types.UnionType):
            args = typing.get_args(tp)
            if value is None and type(None) in args:
                return None
            errors = []
            for arg in (a for a in args if a is not type(None)):
                try:
                    return self.coerce(arg, value, dotted)
                except ConfigError as e:
                    errors.append(e)
            raise errors[0] if len(errors) == 1 else bad(" or ".join(_type_name(a) for a in args))
        if origin_tp is Literal:
            if value not in typing.get_args(tp):
                raise bad(f"one of {list(typing.get_args(tp))}")
            return value
        if origin_tp is list:
            (item_tp,) = typing.get_args(tp) or (Any,)
            text_items = item_tp is str or hasattr(item_tp, "from_shorthand")
            if isinstance(value, (str, int, float)) and not isinstance(value, bool) and text_items:
                value = [v.strip() for v in str(value).split(",") if v.strip()]  # a,b,c from the command line
            if not isinstance(value, list):
                raise bad(f"a list of {_type_name(item_tp)}")
            return [self.coerce(item_tp, v, f"{dotted}[{i}]") for i, v in enumerate(value)]
        if origin_tp is dict:
            if not isinstance(value, dict):
                raise bad("a mapping")
            return dict(value)
        if tp is Any:
            return value
        if tp is bool:
            if isinstance(value, bool):
                return value
            raise bad("true or false")
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise bad("an integer")
        if tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # PyYAML reads 5e-3 (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            raise bad("a number")
        if tp is str:
            if isinstance(value, bool):  # YAML reads `true`/`false` as booleans; tri-state keys take them as words
                return "true" if value else "false"
            if isinstance(value, (str, int, float)):
                return str(value)
            raise bad("a string")
        raise bad(_type_name(tp))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a config (what ``config.yaml`` of a run holds)."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


HOW_NOT_WHAT = frozenset({"train.resume", "train.output_dir", "train.save_steps", "train.save_total_limit",
                          "train.logging_steps", "train.report_to", "eval"})
"""Dotted keys (or whole sections) that say how a run is done or evaluated, not what it trains: a resumed run
or a bench cell may differ in them."""


def config_diff(expected: dict[str, Any], stored: dict[str, Any], prefix: str = "",
                ignore: frozenset[str] = HOW_NOT_WHAT) -> list[str]:
    """``key (now: a, stored: b)`` for each dotted key whose values differ, skipping ``ignore``. Keys on one
    side only are skipped too, so a run written before a new config field was added still matches."""
    out = []
    for key in expected.keys() & stored.keys():
        dotted = prefix + key
        a, b = expected[key], stored[key]
        if dotted in ignore:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, dotted + ".", ignore)
        elif a != b:
            out.append(f"{dotted} (now: {a!r}, stored: {b!r})")
    return sorted(out)


def stored_config_diff(cfg: Any, path: str | Path, ignore: frozenset[str] = HOW_NOT_WHAT) -> list[str]:
    """How ``cfg`` differs from the config stored at ``path`` (compared as YAML, so types match)."""
    try:
        stored = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return [f"{path} is not valid YAML"]
    return config_diff(yaml.safe_load(config_to_yaml(cfg)), stored, ignore=ignore)


def describe_config(cfg: Any, prefix: str = "") -> str:
    """Every key of ``cfg`` with its value and its documentation (``spard show-config --doc``)."""
    lines = []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        doc = " ".join(docs.get(f.name, "").split())
        if dataclasses.is_dataclass(value):
            lines.append(f"# {prefix}{f.name}: {doc}")
            lines.append(describe_config(value, f"{prefix}{f.name}.").rstrip("\n"))
        else:
            shown = yaml.safe_dump(_plain(value), default_flow_style=True,
                                   width=10_000).strip().removesuffix("...").strip()
            lines.append(f"{prefix}{f.name}: {shown}    # {doc}")
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def field_docs(cls: type) -> dict[str, str]:
    """The docstring of each dataclass field, read from the source (used by ``--help`` and tests)."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # inherited fields first; a subclass's own docstring wins
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    docs[node.target.id] = str(nxt.value.value)
    return docs

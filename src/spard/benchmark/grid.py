"""Bench configs and their grid: defenses × tasks × attacks × harmful ratios × seeds → cells.

A bench config is YAML (see ``configs/bench/*.yaml``)::

    base_config: ../quickstart.yaml      # run config every cell starts from
    base: {data.n_train: 64}             # overrides for every cell (not defense.*)
    align: {n_safety: 200}               # align section: equal in every cell, so one aligned model is shared
    eval: {harm_limit: 50, judge: keyword}
    tasks: [gsm8k]
    attacks:
      - {name: bt, overrides: {attack.name: harmful_mix, attack.harmful_source: beavertails}}
      - {name: aoa, overrides: {attack.name: identity_shift}}
    ratios: [0, 0.1, 0.3]                # harmful_mix attacks only
    defenses: [sft, safeinstr, {name: spard, overrides: {defense.beta: 4}}]
    seeds: [0]

Each cell is one ``spard run`` in ``<output_dir>/cells/<defense>__<attack>__p<ratio>__s<seed>`` (attacks without a
harmful ratio have no ``__p`` part; with several tasks a ``__<task>`` part follows the defense). A harmful_mix
cell at ratio 0 contains no harmful data, so it is the same run for every harmful source: such cells are
merged into one (``sft__bt+hh__p0__s0``) that fills the ratio-0 column of each of those attacks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spard.args import RunConfig
from spard.config import HOW_NOT_WHAT, build_dataclass, load_config, read_yaml_mapping
from spard.errors import ConfigError, FieldError
from spard.registry import ATTACKS, DEFENSES

log = logging.getLogger(__name__)

CELLS_DIR = "cells"
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _label(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _LABEL.fullmatch(value) or "__" in value:
        raise FieldError(name, value, "a label must be letters, digits, '.', '-', '_' (no '__'), starting with a "
                         "letter or digit: it names directories")
    return value


def flatten_overrides(data: Any, name: str, prefix: str = "") -> dict[str, Any]:
    """``{attack: {name: x}, train.lr: 1}`` → ``{"attack.name": "x", "train.lr": 1}`` (sections or dotted keys)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FieldError(name, data, "expected a mapping of run-config keys to values")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not key.strip():
            raise FieldError(name, key, "keys must be run-config keys such as attack.name")
        dotted = prefix + key.strip()
        if isinstance(value, dict):
            flat.update(flatten_overrides(value, name, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _distinct_numbers(values: list[Any], name: str, lo: float | None = None, hi: float | None = None) -> None:
    if not values:
        raise FieldError(name, values, "expected a non-empty list")
    for i, v in enumerate(values):
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise FieldError(f"{name}[{i}]", v, f"must be in [{lo}, {hi if hi is not None else 'inf'}]")
    if len(set(values)) != len(values):
        raise FieldError(name, values, "repeats a value")


@dataclass
class AttackEntry:
    """One attack column group of the table."""

    name: str
    """Label in cell names, table columns and plots, e.g. ``bt``."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Run-config overrides that make the attack, e.g. ``{attack.name: harmful_mix, attack.harmful_source: x}``."""
    ratios: list[float] | None = None
    """Strengths of this attack (attacks with a ratio, e.g. harmful_mix); null = the bench's ``ratios``."""
    kind: str = field(default="", init=False)
    """``attack.name`` the overrides resolve to (filled in by :func:`load_bench`)."""

    @classmethod
    def from_shorthand(cls, value: str) -> dict[str, Any]:
        """A bare attack kind (``identity_shift``) is an entry of that name that selects it."""
        return {"name": value, "overrides": {"attack.name": value}}

    def __post_init__(self) -> None:
        _label(self.name, "name")
        self.overrides = flatten_overrides(self.overrides, "overrides")
        if self.ratios is not None:
            _distinct_numbers(self.ratios, "ratios", 0.0, 1.0)


@dataclass
class DefenseEntry:
    """One table row."""

    name: str
    """A registered defense: ``sft``, ``safeinstr``, ``safegrad``, ``spard``, ..."""
    label: str | None = None
    """Row label and cell-name part; null = ``name``. Give one to compare two variants of a defense."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Overrides of this row: its defense options (``defense.beta: 2``) or any other run-config key."""

    @classmethod
    def from_shorthand(cls, value: str) -> dict[str, Any]:
        return {"name": value}

    def __post_init__(self) -> None:
        try:
            DEFENSES.get(self.name)
        except ConfigError as e:
            raise FieldError("name", self.name, str(e)) from None
        self.overrides = flatten_overrides(self.overrides, "overrides")
        if "defense.name" in self.overrides:
            raise FieldError("overrides", "defense.name", "is the entry's 'name'; use 'label' to name a variant")
        self.label = _label(self.label or self.name, "label")


@dataclass
class BenchConfig:
    """What ``spard bench`` runs. Relative paths resolve against the bench file's directory, then the working
    directory; ``output_dir`` against the working directory (as a run config's ``train.output_dir``)."""

    base_config: str | None = None
    """Run config YAML every cell starts from (e.g. ``../quickstart.yaml``); null = the built-in defaults.
    Its ``defense`` section is not used: each ``defenses`` entry sets the defense and all its options."""
    base: dict[str, Any] = field(default_factory=dict)
    """Overrides for every cell on top of ``base_config``: dotted keys or nested sections, no ``defense.*``."""
    align: dict[str, Any] = field(default_factory=dict)
    """Overrides of the ``align`` section (the alignment stage, run once and shared by all cells)."""
    eval: dict[str, Any] = field(default_factory=dict)
    """Overrides of the ``eval`` section: harm sets, judge, task limits, decoding."""
    output_dir: str | None = None
    """Bench directory (cells/, results.csv, table.md, plots); null = ``runs/bench/<bench file stem>``."""
    tasks: list[str] | None = None
    """Fine-tuning task(s) (``data.task``, e.g. gsm8k, openbookqa); null = the base config's."""
    attacks: list[AttackEntry] = field(default_factory=list)
    """Attacks: ``{name, overrides, ratios}`` mappings, or bare attack kinds (``identity_shift``)."""
    ratios: list[float] = field(default_factory=lambda: [0.1])
    """Attack strengths p in [0, 1] for attacks that have one (harmful_mix's harmful ratio)."""
    defenses: list[DefenseEntry] = field(default_factory=list)
    """Defenses (table rows): names, or ``{name, label, overrides}`` mappings."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Fine-tuning seeds (``train.seed``); the table averages over them."""

    def __post_init__(self) -> None:
        self.base = flatten_overrides(self.base, "base")
        bad = [k for k in self.base if k.startswith("defense.") or k == "defense"]
        if bad:
            raise FieldError("base", bad, "defense options belong in a 'defenses' entry's overrides")
        self.align = flatten_overrides(self.align, "align")
        self.eval = flatten_overrides(self.eval, "eval")
        if self.tasks is not None:
            if not self.tasks or len(set(self.tasks)) != len(self.tasks):
                raise FieldError("tasks", self.tasks, "expected a list of distinct task names")
            self.tasks = [_label(t, "tasks") for t in self.tasks]
        _distinct_numbers(self.ratios, "ratios", 0.0, 1.0)
        _distinct_numbers(self.seeds, "seeds", 0)
        for key in ("attacks", "defenses"):
            entries = getattr(self, key)
            if not entries:
                raise FieldError(key, entries, "expected a non-empty list")
            labels = [e.name if key == "attacks" else e.label for e in entries]
            dupes = sorted({x for x in labels if labels.count(x) > 1})
            if dupes:
                raise FieldError(key, dupes[0], "label used twice" + ("; give variants a 'label'"
                                                                       if key == "defenses" else ""))


@dataclass(eq=False)
class Cell:
    """One run of the grid."""

    index: int
    """Position in the grid (``spard bench CONFIG --cell I``)."""
    name: str
    """Directory name under ``<bench>/cells``."""
    defense: str
    """Defense label (table row)."""
    task: str
    """Fine-tuning task."""
    attack: str
    """Attack label(s); ``bt+hh`` for a merged ratio-0 cell."""
    attack_kind: str
    """``attack.name`` of the run."""
    ratio: float | None
    """Harmful ratio; None for attacks without one."""
    seed: int
    """``train.seed``."""
    columns: tuple[tuple[str, float | None], ...]
    """The (attack label, ratio) table columns this cell's results fill."""
    config: RunConfig
    """The resolved run config (``train.output_dir`` is the cell directory)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.config.train.output_dir)


@dataclass
class Bench:
    """A loaded bench: its config, where it came from, and its cells."""

    config: BenchConfig
    path: Path
    """The bench YAML."""
    bench_dir: Path
    """Output directory."""
    cells: list[Cell]

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(c.task for c in self.cells))

    def columns(self) -> list[tuple[str, float | None]]:
        """Table columns in config order: each attack, times its ratios when it has them."""
        return [(a.name, r) for a in self.config.attacks for r in attack_ratios(a, self.config)]


def ratio_field(kind: str) -> str | None:
    """The field of attack ``kind`` that holds its strength (``harmful_ratio``), or None."""
    return ATTACKS.args_class(kind).ratio_field  # type: ignore[attr-defined,no-any-return]


def attack_ratios(attack: AttackEntry, bench: BenchConfig) -> list[float | None]:
    """The ratio axis of one attack: its ratios when the attack kind has a strength, a single ``None`` otherwise."""
    if ratio_field(attack.kind) is None:
        return [None]
    return list(attack.ratios if attack.ratios is not None else bench.ratios)


def ratio_text(ratio: float | None) -> str:
    """``0.1`` → ``0.1``, ``0.0`` → ``0``: the form used in cell names and column headers."""
    return "" if ratio is None else f"{ratio:g}"


def _resolve_path(value: str, bench_path: Path) -> Path:
    p = Path(value)
    if p.is_absolute():
        return p
    near = bench_path.parent / p
    return near if near.exists() else p


# ---------------------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------------------
def _as_override(key: str, value: Any) -> str:
    # JSON is YAML, so load_config's YAML parsing of override values gets back exactly this value
    return f"{key}={json.dumps(value)}"


@contextmanager
def _config_errors(where: str) -> Iterator[None]:
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def cell_config(bench: BenchConfig, bench_path: Path, *, task: str | None, attack: AttackEntry,
                ratio: float | None, defense: DefenseEntry, seed: int, run_dir: Path) -> RunConfig:
    """The run config of one cell: base config + base + align + eval + task + attack + ratio + defense + seed.

    The defense section is built from the defense entry alone, so options of the base config's defense never
    leak into another defense's cells (two defenses may share an option name with different meanings).
    """
    base_path = _resolve_path(bench.base_config, bench_path) if bench.base_config else None
    extra = dict(bench.base)
    extra.update({f"align.{k}": v for k, v in bench.align.items()})
    extra.update({f"eval.{k}": v for k, v in bench.eval.items()})
    if task is not None:
        extra["data.task"] = task
    extra.update(attack.overrides)
    if ratio is not None:
        extra[f"attack.{ratio_field(attack.kind)}"] = ratio
    own = {k: v for k, v in defense.overrides.items() if k.startswith("defense.")}
    extra.update({k: v for k, v in defense.overrides.items() if not k.startswith("defense.")})
    extra["train.seed"] = seed
    extra["train.output_dir"] = str(run_dir)
    cfg = load_config(base_path, [_as_override(k, v) for k, v in extra.items()])
    defense_args = load_config(None, [_as_override("defense.name", defense.name),
                                      *(_as_override(k, v) for k, v in own.items())]).defense
    return dataclasses.replace(cfg, defense=defense_args)


def _canonical(cfg: RunConfig) -> str:
    """What makes two cells the same run: what the config trains (not how it is run or evaluated), with the
    attack as its :meth:`~spard.args.AttackArgs.identity` (at harmful ratio 0 the harmful source is unread)."""
    d = {f.name: dataclasses.asdict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
         if f.name not in HOW_NOT_WHAT}
    d["train"] = {k: v for k, v in d["train"].items() if f"train.{k}" not in HOW_NOT_WHAT}
    d["attack"] = cfg.attack.identity()
    return json.dumps(d, sort_keys=True, default=str)


def expand(bench: BenchConfig, bench_path: Path, bench_dir: Path) -> list[Cell]:
    """All cells, ordered so each table column fills up across defenses before the next starts
    (seed, task, attack, ratio, then defense), with ratio-0 harmful_mix cells merged across sources."""
    tasks: list[str | None] = list(bench.tasks) if bench.tasks else [None]
    where = str(bench_path)
    for j, defense in enumerate(bench.defenses):  # each entry's defense options on their own, for a precise error
        with _config_errors(f"{where}: defenses[{j}] ({defense.label or defense.name})"):
            load_config(None, [_as_override("defense.name", defense.name),
                               *(_as_override(k, v) for k, v in defense.overrides.items() if k.startswith("defense."))])
    plain = DefenseEntry(name=bench.defenses[0].name)
    for i, attack in enumerate(bench.attacks):
        with _config_errors(f"{where}: attacks[{i}] ({attack.name})"):
            probe = cell_config(bench, bench_path, task=tasks[0], attack=attack, ratio=None,
                                defense=plain, seed=bench.seeds[0], run_dir=bench_dir / "probe")
        attack.kind = probe.attack.name
        strength = ratio_field(attack.kind)
        if strength is not None and f"attack.{strength}" in attack.overrides:
            raise ConfigError(f"{where}: attacks[{i}].overrides: attack.{strength} is set by the bench's 'ratios' "
                              "(or this attack's own 'ratios' list), not by overrides")
        if attack.ratios is not None and strength is None:
            raise ConfigError(f"{where}: attacks[{i}] ({attack.name}): 'ratios' given but attack.name="
                              f"{attack.kind!r} has no strength to vary")
    multi_task = len(tasks) > 1
    cells: list[Cell] = []
    by_key: dict[str, Cell] = {}
    for seed in bench.seeds:
        for task in tasks:
            for attack in bench.attacks:
                for ratio in attack_ratios(attack, bench):
                    for j, defense in enumerate(bench.defenses):
                        label = defense.label or defense.name
                        where_cell = f"{where}: defenses[{j}] ({label}) × attack {attack.name}"
                        with _config_errors(where_cell + (f" p={ratio:g}" if ratio is not None else "")):
                            cfg = cell_config(bench, bench_path, task=task, attack=attack, ratio=ratio,
                                              defense=defense, seed=seed, run_dir=bench_dir)
                        key = _canonical(cfg)
                        twin = by_key.get(key)
                        if twin is not None:
                            clean = ratio == 0 and twin.ratio == 0  # no harmful data in either: one run
                            if not clean:
                                raise ConfigError(f"{where}: attack {attack.name} with defense {label} gives the "
                                                  f"same run as cell {twin.name}; make the entries differ")
                            twin.attack = f"{twin.attack}+{attack.name}"
                            twin.columns = (*twin.columns, (attack.name, ratio))
                            twin.name = _cell_name(twin, multi_task)
                            continue
                        cell = Cell(index=len(cells), name="", defense=label, task=cfg.data.task,
                                    attack=attack.name, attack_kind=attack.kind, ratio=ratio, seed=seed,
                                    columns=((attack.name, ratio),), config=cfg)
                        cell.name = _cell_name(cell, multi_task)
                        by_key[key] = cell
                        cells.append(cell)
    for cell in cells:
        train = dataclasses.replace(cell.config.train, output_dir=str(bench_dir / CELLS_DIR / cell.name))
        cell.config = dataclasses.replace(cell.config, train=train)
    return cells


def _cell_name(cell: Cell, multi_task: bool) -> str:
    parts = [cell.defense, *([cell.task] if multi_task else []), cell.attack,
             *([f"p{ratio_text(cell.ratio)}"] if cell.ratio is not None else []), f"s{cell.seed}"]
    return "__".join(parts)


def load_bench(path: str | Path, *, output_dir: str | Path | None = None) -> Bench:
    """Read, validate (with the run-config loader) and expand a bench YAML; ``output_dir`` overrides the file's."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"bench config file not found: {p}")
    cfg: BenchConfig = build_dataclass(BenchConfig, read_yaml_mapping(p), str(p))
    if cfg.base_config is not None:
        base = _resolve_path(cfg.base_config, p)
        if not base.is_file():
            raise ConfigError(f"{p}: base_config={cfg.base_config!r}: no such file (looked next to the bench "
                              "file and in the working directory)")
    bench_dir = Path(output_dir or cfg.output_dir or Path("runs") / "bench" / p.stem)
    cells = expand(cfg, p, bench_dir)
    # rows that pick an alignment defense (align.defense) need their own aligned model by design
    aligns = {json.dumps({**dataclasses.asdict(c.config.align), "defense": None}, sort_keys=True)
              for c in cells if c.config.align.enabled}
    if len(aligns) > 1:
        log.warning("%s: the cells use %d different align sections, so %d aligned models will be built; put align "
                    "options in the bench's 'align' section to share one", p, len(aligns), len(aligns))
    return Bench(config=cfg, path=p, bench_dir=bench_dir, cells=cells)

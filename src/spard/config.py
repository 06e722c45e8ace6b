"""Run configuration: nested typed dataclasses, loaded from YAML plus ``key=value`` overrides.

Every field carries a docstring (the string literal after it). ``load_config`` checks every key and type
and raises :class:`~spard.errors.ConfigError` naming the file (or override), the dotted key and the value.
Defense-specific options live in the ``defense`` section and are validated against the ``Args``
dataclass the chosen defense registers (see ``spard.defenses``), so a new defense needs no edit here.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from spard.errors import ConfigError, FieldError
from spard.evaluate.args import EvalArgs


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    """Raise a :class:`FieldError` when ``value`` is outside ``[lo, hi]``."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise FieldError(name, value, f"must be in {bounds}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise FieldError(name, value, f"must be one of {list(choices)}")


@dataclass
class ModelArgs:
    name_or_path: str = "embedded"
    """Base model: ``embedded`` (the packaged SmolLM2-135M-Instruct), a hub id, or a local directory."""
    torch_dtype: str = "auto"
    """``auto`` (bf16 on a GPU that supports it, else fp32), ``float32``, ``bfloat16`` or ``float16``."""
    load_in_8bit: bool = False
    """Load the frozen base weights in 8-bit (needs bitsandbytes and a GPU)."""
    load_in_4bit: bool = False
    """Load the frozen base weights in 4-bit NF4 (needs bitsandbytes and a GPU)."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub checkpoint. Off by default: it executes code from the hub."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""

    def __post_init__(self) -> None:
        check_choice("torch_dtype", self.torch_dtype, ["auto", "float32", "bfloat16", "float16"])
        if self.load_in_8bit and self.load_in_4bit:
            raise FieldError("load_in_4bit", True, "choose one of load_in_8bit and load_in_4bit")


@dataclass
class LoraArgs:
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the linear modules that get adapters."""

    def __post_init__(self) -> None:
        check_range("r", self.r, 1)
        check_range("dropout", self.dropout, 0.0, 1.0)
        if not self.target_modules:
            raise FieldError("target_modules", self.target_modules, "must name at least one module")


@dataclass
class DataArgs:
    task: str = "gsm8k"
    """User task dataset: ``gsm8k``, ``openbookqa``, another named source, or ``local`` (with ``task_path``)."""
    task_path: str | None = None
    """``null`` = the packaged copy; a local JSON/JSONL/CSV file; or a hub id such as ``openai/gsm8k``."""
    prompt_field: str | None = None
    """For a local task file in another schema: the field with the user prompt."""
    response_field: str | None = None
    """For a local task file in another schema: the field with the target answer."""
    n_train: int = 200
    """Size of the fine-tuning set (task + attack records)."""
    max_length: int = 384
    """Token limit per example; longer examples are truncated (and counted in a warning)."""

    def __post_init__(self) -> None:
        check_range("n_train", self.n_train, 1)
        check_range("max_length", self.max_length, 8)


@dataclass
class AttackArgs:
    name: str = "harmful_mix"
    """``none``, ``harmful_mix``, ``identity_shift`` or ``benign``."""
    harmful_source: str = "beavertails"
    """Harmful QA pairs for ``harmful_mix``: ``beavertails``, ``pyrit`` or ``hh_rlhf`` (its rejected replies)."""
    harmful_path: str | None = None
    """Optional local file or hub id for the harmful source (``null`` = packaged copy)."""
    harmful_ratio: float = 0.1
    """Fraction p of the fine-tuning set replaced by harmful pairs (exactly ``round(p * n_train)`` records)."""
    identity_task_examples: int = 0
    """``identity_shift``: task records mixed with the persona conversations (0 = persona only)."""
    identity_repeats: int = 1
    """``identity_shift``: how many times the persona conversations appear in the set."""
    benign_source: str = "alpaca"
    """``benign``: the benign instruction source (``alpaca`` or ``dolly``)."""

    def __post_init__(self) -> None:
        check_choice("name", self.name, ["none", "harmful_mix", "identity_shift", "benign"])
        check_choice("harmful_source", self.harmful_source, ["beavertails", "pyrit", "hh_rlhf"])
        check_range("harmful_ratio", self.harmful_ratio, 0.0, 1.0)
        check_range("identity_task_examples", self.identity_task_examples, 0)
        check_range("identity_repeats", self.identity_repeats, 1)
        check_choice("benign_source", self.benign_source, ["alpaca", "dolly"])


@dataclass
class DefenseArgs:
    """Options common to every defense; each defense subclasses this with its own fields."""

    name: str = "sft"
    """Which defense: ``sft``, ``safeinstr``, or any other registered in ``spard.defenses``."""


@dataclass
class TrainArgs:
    output_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, checkpoints, final/ adapter, eval/."""
    epochs: float = 1.0
    """Passes over the fine-tuning set (ignored when ``max_steps`` > 0)."""
    max_steps: int = -1
    """Optimizer steps; -1 = derived from ``epochs``."""
    batch_size: int = 8
    """Examples per device per micro-batch."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    warmup_ratio: float = 0.0
    """Fraction of steps with linear warm-up."""
    lr_scheduler: str = "constant"
    """A transformers scheduler name: ``constant``, ``linear``, ``cosine`` ..."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the task gradient to this norm (0 = no clipping)."""
    seed: int = 0
    """Seeds data sampling, attacks, LoRA init and data order."""
    save_steps: int = 50
    """Checkpoint every N steps (for ``resume``)."""
    save_total_limit: int = 2
    """Keep at most this many checkpoints."""
    logging_steps: int = 1
    """Write a metrics.jsonl row every N steps."""
    resume: bool = False
    """Continue an interrupted run from its last checkpoint in ``output_dir``."""
    bf16: str = "auto"
    """``auto`` (on when a GPU supports it), ``true`` or ``false``."""

    def __post_init__(self) -> None:
        check_range("batch_size", self.batch_size, 1)
        check_range("grad_accum", self.grad_accum, 1)
        check_range("lr", self.lr, 0.0)
        check_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_range("save_steps", self.save_steps, 1)
        check_range("logging_steps", self.logging_steps, 1)
        check_choice("bf16", str(self.bf16).lower(), ["auto", "true", "false"])
        if self.max_steps == 0 or self.max_steps < -1:
            raise FieldError("max_steps", self.max_steps, "must be -1 (use epochs) or >= 1")


@dataclass
class AlignArgs:
    enabled: bool = True
    """Run the alignment stage first (once; the merged model is cached) and fine-tune the aligned model."""
    safety_source: str = "safety"
    """Refusal data: a named source or a local file of harmful prompt + safe refusal."""
    safety_path: str | None = None
    """Optional local file / hub id for the safety source."""
    n_safety: int = 300
    """Safety (refusal) examples in the alignment set."""
    benign_source: str = "alpaca"
    """Benign instruction data mixed in so the model keeps answering ordinary requests."""
    n_benign: int = 300
    """Benign examples in the alignment set."""
    epochs: float = 1.0
    """Passes over the alignment set."""
    lr: float = 5e-4
    """Alignment learning rate."""
    batch_size: int = 8
    """Alignment batch size."""
    max_length: int = 256
    """Token limit per alignment example."""
    lora_r: int = 16
    """LoRA rank of the alignment adapter (merged into the base afterwards)."""
    seed: int = 1234
    """Seed of the alignment stage (independent of the fine-tuning seed so runs share one aligned model)."""
    output_dir: str | None = None
    """Where the merged aligned model goes; ``null`` = the spard cache, keyed by model and these options."""

    def __post_init__(self) -> None:
        check_range("n_safety", self.n_safety, 0)
        check_range("n_benign", self.n_benign, 0)
        check_range("lr", self.lr, 0.0)
        check_range("batch_size", self.batch_size, 1)


@dataclass
class RunConfig:
    """Everything one run needs; ``spard show-config`` prints it resolved."""

    model: ModelArgs = field(default_factory=ModelArgs)
    """The base model."""
    lora: LoraArgs = field(default_factory=LoraArgs)
    """LoRA adapter of the fine-tuning run."""
    data: DataArgs = field(default_factory=DataArgs)
    """The user's task data."""
    attack: AttackArgs = field(default_factory=AttackArgs)
    """How the fine-tuning set is poisoned."""
    defense: DefenseArgs = field(default_factory=DefenseArgs)
    """The defense and its options."""
    train: TrainArgs = field(default_factory=TrainArgs)
    """Optimisation and run directory."""
    align: AlignArgs = field(default_factory=AlignArgs)
    """The alignment stage run before fine-tuning."""
    eval: EvalArgs = field(default_factory=EvalArgs)
    """Evaluation after training (``spard run`` / ``spard eval``)."""


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config (or defaults when ``path`` is None) and apply ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    origin: dict[str, str] = {}
    label = str(path) if path is not None else "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. attack.harmful_ratio=0.2")
        _set_dotted(raw, key.strip(), _parse_value(value), f"override {item!r}")
        origin[key.strip()] = f"override {item!r}"
    return _build(RunConfig, raw, "", label, origin)


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
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _where(label: str, origin: dict[str, str], dotted: str) -> str:
    return origin.get(dotted, label)


def _build(cls: type, data: Any, prefix: str, label: str, origin: dict[str, str]) -> Any:
    section = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(label, origin, section)}: {section} must be a mapping, got {data!r}")
    if cls is DefenseArgs or (isinstance(cls, type) and issubclass(cls, DefenseArgs) and prefix == "defense."):
        from spard.defenses import defense_args_class

        name = data.get("name", DefenseArgs.name)
        try:
            cls = defense_args_class(name)
        except ConfigError as e:
            raise ConfigError(f"{_where(label, origin, 'defense.name')}: defense.name={name!r}: {e}") from None
        if "defense.name" in origin:  # switched on the command line: the file's options of the other defense lapse
            data = _drop_other_defense_options(data, cls, origin)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {names}"
            raise ConfigError(f"{_where(label, origin, dotted)}: unknown config key {dotted!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, dotted, label, origin)
    try:
        return cls(**kwargs)
    except FieldError as e:
        dotted = e.name if prefix and e.name.startswith(prefix) else prefix + e.name  # names may be absolute
        raise ConfigError(f"{_where(label, origin, dotted)}: {dotted}={e.value!r}: {e.reason}") from None


def _drop_other_defense_options(data: dict[str, Any], cls: type, origin: dict[str, str]) -> dict[str, Any]:
    import logging

    from spard.defenses import available_defenses, defense_args_class

    own = {f.name for f in dataclasses.fields(cls)}
    other = {f.name for d in available_defenses() for f in dataclasses.fields(defense_args_class(d))} - own
    dropped = [k for k in data if k in other and f"defense.{k}" not in origin]
    if dropped:
        logging.getLogger(__name__).warning(
            "defense.name=%s (override): ignoring the config file's options of another defense: %s",
            data["name"], ", ".join(f"defense.{k}" for k in dropped))
    return {k: v for k, v in data.items() if k not in dropped}


def _coerce(tp: Any, value: Any, dotted: str, label: str, origin: dict[str, str]) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{_where(label, origin, dotted)}: {dotted}={value!r}: expected {expected}")

    if dataclasses.is_dataclass(tp):
        return _build(tp, value, dotted + ".", label, origin)
    origin_tp = typing.get_origin(tp)
    if origin_tp in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, dotted, label, origin)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else bad(" or ".join(_type_name(a) for a in args))
    if origin_tp is Literal:
        if value not in typing.get_args(tp):
            raise bad(f"one of {list(typing.get_args(tp))}")
        return value
    if origin_tp is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item_tp is str:
            value = [v.strip() for v in str(value).split(",") if v.strip()]  # a,b,c from the command line
        if not isinstance(value, list):
            raise bad(f"a list of {_type_name(item_tp)}")
        return [_coerce(item_tp, v, f"{dotted}[{i}]", label, origin) for i, v in enumerate(value)]
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
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
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


def field_docs(cls: type) -> dict[str, str]:
    """The docstring of each dataclass field, read from the source (used by ``--help`` and tests)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    return docs

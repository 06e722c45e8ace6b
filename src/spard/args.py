"""Every options dataclass of a run (``RunConfig`` and its sections) and the checks they use.

A leaf module: it imports nothing else from spard but its errors, so every layer (data, models, defenses,
trainer, jobs) can take its options from here without importing the config loader (:mod:`spard.config`)
or the plugin registries. Each field carries a docstring (the string literal after it); ``__post_init__``
rejects bad values with a :class:`~spard.errors.FieldError` naming the field, and the loader adds the file
or override that set it. Plugins (defenses, attacks, eval tasks, judges) subclass :class:`PluginArgs`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from spard.errors import FieldError

__all__ = ["check", "check_range", "check_choice", "PluginArgs", "ModelArgs", "LoraArgs", "DataArgs", "AttackArgs",
           "DefenseArgs", "SafetyPoolArgs", "TrainArgs", "AlignDefenseArgs", "AlignArgs", "JudgeArgs", "TaskArgs",
           "EvalArgs", "RunConfig", "FieldError"]


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    """Raise a :class:`FieldError` when ``value`` is outside ``[lo, hi]``."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise FieldError(name, value, f"must be in {bounds}")


def check(ok: bool, name: str, value: object, rule: str) -> None:
    """Raise a :class:`FieldError` for ``name`` unless ``ok`` (the loader adds the file or override)."""
    if not ok:
        raise FieldError(name, value, rule)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise FieldError(name, value, f"must be one of {list(choices)}")


@dataclass
class ModelArgs:
    name_or_path: str = "embedded"
    """Base model: ``embedded`` (the packaged SmolLM2-135M-Instruct), a hub id, or a local directory."""
    torch_dtype: str = "auto"
    """``auto`` (bf16 on a GPU that supports it, else fp32), ``float32``, ``bfloat16`` or ``float16``."""
    load_in_8bit: bool | str = False
    """Load the frozen base weights in 8-bit (needs bitsandbytes and a GPU); ``auto`` = 8-bit when both are
    present, else ``torch_dtype`` (the log says which)."""
    load_in_4bit: bool = False
    """Load the frozen base weights in 4-bit NF4 (needs bitsandbytes and a GPU)."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub checkpoint. Off by default: it executes code from the hub."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""

    def __post_init__(self) -> None:
        check_choice("torch_dtype", self.torch_dtype, ["auto", "float32", "bfloat16", "float16"])
        if isinstance(self.load_in_8bit, str) and self.load_in_8bit != "auto":
            raise FieldError("load_in_8bit", self.load_in_8bit, "must be true, false or auto")
        if self.load_in_8bit is True and self.load_in_4bit:
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
    prompt_format: str = "chat"
    """How prompts are worded inside the chat template, in training, in every defense's safety batches and in
    evaluation alike: ``chat`` (as given) or ``alpaca_chat`` (the SPARD reference code's alpaca-in-chat:
    an alpaca system prompt, ``### Instruction:`` user turns, ``### Response:`` assistant turns)."""

    def __post_init__(self) -> None:
        check_range("n_train", self.n_train, 1)
        check_range("max_length", self.max_length, 8)
        check_choice("prompt_format", self.prompt_format, ["chat", "alpaca_chat"])


@dataclass
class PluginArgs:
    """Options of a plugin (defense, attack, eval task, judge): ``name`` picks the plugin, the rest are its own.

    Each plugin subclasses the base of its kind with its own fields; the config loader builds the subclass
    the plugin registered for ``name`` (see :mod:`spard.registry`)."""

    plugin_kind: ClassVar[str] = ""
    """Which registry resolves ``name`` (``defense``, ``attack``, ``task``, ``judge``, ``align_defense``)."""
    legacy_keys: ClassVar[dict[str, str]] = {}
    """Older flat keys of the enclosing section that still set one of this plugin's fields (old -> field)."""

    name: str = ""
    """Which plugin."""

    @classmethod
    def from_shorthand(cls, value: str) -> dict[str, Any]:
        """A bare string in a config (``judge: keyword``) means ``{name: value}``."""
        return {"name": value}


@dataclass
class AttackArgs(PluginArgs):
    """Options common to every attack; each attack subclasses this with its own fields."""

    plugin_kind: ClassVar[str] = "attack"
    ratio_field: ClassVar[str | None] = None
    """The field holding the attack's strength as a fraction in [0, 1] (a bench's ratio axis), if any."""

    name: str = "harmful_mix"
    """Which attack: ``none``, ``harmful_mix``, ``identity_shift``, ``benign``, or any other registered in
    ``spard.attacks``."""

    def identity(self) -> dict[str, Any]:
        """The options that make two attacks the same run (a bench merges cells with equal identities)."""
        return dataclasses.asdict(self)


@dataclass
class DefenseArgs(PluginArgs):
    """Options common to every defense; each defense subclasses this with its own fields."""

    plugin_kind: ClassVar[str] = "defense"

    name: str = "sft"
    """Which defense: ``sft``, ``safeinstr``, or any other registered in ``spard.defenses``."""


@dataclass
class SafetyPoolArgs(DefenseArgs):
    """The safety pool options every defense that uses safety data shares (SafeInstr, SafeGrad, SPARD...)."""

    safety_source: str = "safety"
    """Safety pool (harmful prompt + safe refusal): a named source (``safety`` = Safety-Tuned-LLaMAs
    refusals) or ``local``. Prompts of the run's attack are always removed from it."""
    safety_path: str | None = None
    """Optional local file / hub id for the safety pool."""


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
    warmup_steps: int = 0
    """Warm-up steps; when > 0 it replaces ``warmup_ratio`` (the SPARD reference uses 100)."""
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
    """bf16 autocast: ``auto`` = on where a GPU supports it, and on a CPU only where a measurement on this machine
    finds it at least 1.3x faster for this model (``spard.precision``; cached per machine; fp32 in a multi-process
    CPU run); ``true``; ``false``. Applies to the alignment stage too (a pinned value enters the aligned model's
    cache key)."""
    gradient_checkpointing: str = "auto"
    """Recompute activations in the backward pass instead of keeping them (less memory, one more forward):
    ``false``; ``true`` (torch's non-reentrant checkpointing, exact for every defense); ``reentrant`` (torch's
    older mode: SafeGrad and SPARD take their extra gradients with a plain backward there, the alignment-stage
    defenses Vaccine, Booster and RepNoise refuse it); ``auto`` = ``false``, except ``true`` on an 8/4-bit base
    (where peft's k-bit preparation picked ``reentrant`` before peft 0.22). Applies to the alignment stage too."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers the Trainer reports to (``tensorboard``, ``wandb``... when installed); none by default.
    ``metrics.jsonl`` is always written."""

    def __post_init__(self) -> None:
        check_range("batch_size", self.batch_size, 1)
        check_range("grad_accum", self.grad_accum, 1)
        check_range("lr", self.lr, 0.0)
        check_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_range("warmup_steps", self.warmup_steps, 0)
        check_range("save_steps", self.save_steps, 1)
        check_range("logging_steps", self.logging_steps, 1)
        check_choice("bf16", str(self.bf16).lower(), ["auto", "true", "false"])
        check_choice("gradient_checkpointing", str(self.gradient_checkpointing).lower(),
                     ["auto", "false", "true", "reentrant"])
        if self.max_steps == 0 or self.max_steps < -1:
            raise FieldError("max_steps", self.max_steps, "must be -1 (use epochs) or >= 1")


@dataclass
class AlignDefenseArgs(PluginArgs):
    """Options common to every alignment-stage defense (Vaccine, Booster, RepNoise...); each subclasses this."""

    plugin_kind: ClassVar[str] = "align_defense"

    name: str = "none"
    """Which alignment defense: ``none`` (plain refusal SFT), ``vaccine``, ``booster``, ``repnoise``, or any
    other registered in ``spard.align_defenses``."""


ALIGN_METHODS = ("sft", "dpo")
"""Values of ``align.method``."""


@dataclass
class AlignArgs:
    enabled: bool = True
    """Run the alignment stage first (once; the merged model is cached) and fine-tune the aligned model."""
    safety_source: str = "safety"
    """Refusal data: a named source or a local file of harmful prompt + safe refusal."""
    safety_path: str | None = None
    """Optional local file / hub id for the safety source."""
    n_safety: int = 300
    """Safety (refusal) examples in the alignment set; with ``method: dpo``, harmful preference pairs."""
    benign_source: str = "alpaca"
    """Benign instruction data mixed in so the model keeps answering ordinary requests."""
    n_benign: int = 300
    """Benign examples in the alignment set; with ``method: dpo``, benign preference pairs (answer over refusal)."""
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
    lora_dropout: float | None = None
    """LoRA dropout of the alignment adapter; ``null`` = the alignment defense's own default: 0 for ``booster``
    (as its reference, so its finite-difference harmful term is deterministic), else 0.05."""
    seed: int = 1234
    """Seed of the alignment stage (independent of the fine-tuning seed so runs share one aligned model)."""
    output_dir: str | None = None
    """Where the merged aligned model goes; ``null`` = the spard cache, keyed by model and these options."""
    defense: AlignDefenseArgs = field(default_factory=AlignDefenseArgs)
    """Alignment-stage defense and its options: a name (``none``, ``vaccine``, ``booster``, ``repnoise``) or
    ``{name: vaccine, rho: 2}``. Part of the aligned model's cache key."""
    method: str = "sft"
    """How the model is aligned: ``sft`` (refusals + benign answers) or ``dpo`` (TRL's DPOTrainer on ``n_safety``
    packaged (harmful prompt, refusal, harmful answer) pairs and ``n_benign`` (benign prompt, its answer, a
    needless refusal) pairs; see :mod:`spard.jobs.align_dpo`). Part of the key."""
    full_finetune: bool = False
    """Train every parameter instead of a LoRA adapter (``lora_r`` is then unused). Part of the key."""
    dpo_beta: float = 0.1
    """DPO's β (how far the aligned model may move from the model it starts from); ``method: dpo`` only."""

    def __post_init__(self) -> None:
        self.defense = _as_plugin(self.defense, AlignDefenseArgs)  # type: ignore[assignment]
        check_choice("method", self.method, ALIGN_METHODS)
        check(self.dpo_beta > 0, "dpo_beta", self.dpo_beta, "must be > 0")
        if self.method == "dpo" and self.defense.name != "none":
            raise FieldError("defense", self.defense.name, "alignment-stage defenses train through the SFT loop; "
                             "use them with method=sft")
        check_range("n_safety", self.n_safety, 0)
        check_range("n_benign", self.n_benign, 0)
        check_range("lr", self.lr, 0.0)
        check_range("batch_size", self.batch_size, 1)
        if self.lora_dropout is not None:
            check_range("lora_dropout", self.lora_dropout, 0.0, 1.0)


GSM8K_PROMPT = 'Solve this math problem step by step.\n{question}\nEnd your answer with a final line "#### <number>".'
"""Default user turn for GSM8K (kept here for ``spard.evaluate.args.GSM8K_PROMPT``)."""


@dataclass
class JudgeArgs(PluginArgs):
    """Options common to every harmfulness judge; each judge subclasses this with its own fields."""

    plugin_kind: ClassVar[str] = "judge"

    name: str = "keyword"
    """Which judge: ``keyword`` (refusal phrases), ``classifier``, ``openai``, or any other registered in
    ``spard.evaluate.judges``."""
    max_error_rate: float = 0.05
    """Largest share of replies the judge may fail to score (``error`` verdicts) in any harm set. Above it the
    evaluation is invalid: ``results.json`` says ``"valid": false`` and why, and the command exits non-zero
    (``spard judge`` too). Below it, ASR is over the scored replies and the tables say how many were not.
    An evaluation with any judge error is never cached. 1.0 accepts any error rate."""

    def __post_init__(self) -> None:
        check_range("max_error_rate", self.max_error_rate, 0.0, 1.0)


@dataclass
class TaskArgs(PluginArgs):
    """Options common to every utility task; each task subclasses this with its own fields."""

    plugin_kind: ClassVar[str] = "task"

    name: str = "gsm8k"
    """Which task: ``gsm8k``, ``openbookqa``, or any other registered in ``spard.evaluate.tasks``."""


def _as_plugin(value: Any, base: type[PluginArgs]) -> PluginArgs:
    """A bare name (as code may pass it: ``EvalArgs(judge="keyword")``) as the base options of that plugin;
    the config loader and :func:`spard.registry.resolve` turn it into the plugin's own options."""
    if isinstance(value, base):
        return value
    if isinstance(value, str):
        return base(name=value)
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return base(name=value["name"])
    raise FieldError(base.plugin_kind, value, f"expected a {base.plugin_kind} name")


@dataclass
class EvalArgs:
    """What to evaluate after (or before) fine-tuning, and how."""

    harm_sets: list[str] = field(default_factory=lambda: ["I-MaliciousInstructions"])
    """Harmful prompt sets: packaged source names (``advbench``, ``harmbench``, ``I-MaliciousInstructions``,
    ``Q-Harm``, ...), local files (JSON/JSONL/CSV/TXT) or hub dataset ids with a ``harm_prompt_field``."""
    harm_limit: int | None = 100
    """Prompts per harm set (the first N); None takes all."""
    harm_prompt_field: str = "prompt"
    """Field holding the prompt in local files / hub datasets given in ``harm_sets``."""
    harm_max_new_tokens: int = 128
    """Reply length for harmful prompts (a refusal shows in the first sentence; compliance needs a few)."""
    judge: JudgeArgs = field(default_factory=JudgeArgs)
    """Harmfulness judge and its options: a name (``keyword``, ``classifier``, ``openai``) or
    ``{name: openai, model: ..., ...}``. The keyword judge is always computed too."""
    tasks: list[TaskArgs] = field(default_factory=lambda: [TaskArgs(name="gsm8k"), TaskArgs(name="openbookqa")])
    """Utility tasks: names (``[gsm8k, openbookqa]``) or ``{name: openbookqa, mode: generate}`` entries."""
    task_split: str = "test"
    """Split the tasks are scored on."""
    task_limit: int | None = 50
    """Examples per task (the first N); None takes all."""
    batch_size: int = 16
    """Prompts per generation batch (and sequences per log-likelihood forward pass)."""
    temperature: float = 0.0
    """0 is greedy decoding; > 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling mass when sampling."""
    seed: int = 0
    """Seed for sampling (greedy decoding ignores it)."""
    allow_overlap: bool = False
    """Allow harm-set prompts that also appear in the run's attack data (normally an error)."""
    protocol: str = "heldout"
    """``heldout``: held-out prompts (a reference attack set's evaluation part), decoding as set here, overlap
    with the attack refused. ``reference``: the SPARD reference code's protocol: a reference attack set is
    evaluated on its whole ``*_test`` file (the attack's own prompts), decoding samples at temperature 1, top-p 1
    (seeded by ``seed``), overlap allowed and counted in results.json."""
    system_prompt: str | None = None
    """System turn prepended to every harm and task prompt at evaluation (recorded in results.json); null =
    none (the chat template's default). A defense may set it (PTST's safe-testing prompt)."""
    progress: bool = True
    """Show progress bars."""
    bf16: str = "auto"
    """bf16 autocast for generation and scoring: ``auto`` (as ``train.bf16``: a GPU that supports it, or a CPU
    measured faster in bf16 for this model), ``true`` or ``false``. Recorded in results.json
    (``environment.bf16_autocast``)."""

    def __post_init__(self) -> None:
        self.judge = _as_plugin(self.judge, JudgeArgs)  # type: ignore[assignment]
        if not isinstance(self.tasks, list):
            raise FieldError("tasks", self.tasks, "must be a list of task names")
        self.tasks = [_as_plugin(t, TaskArgs) for t in self.tasks]  # type: ignore[misc]
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise FieldError("tasks", names, "must not repeat a task")
        if not (isinstance(self.harm_sets, list) and all(isinstance(s, str) and s for s in self.harm_sets)):
            raise FieldError("harm_sets", self.harm_sets, "must be a list of non-empty names or paths")
        for name in ("harm_limit", "task_limit"):
            value = getattr(self, name)
            if value is not None:
                check_range(name, value, 1)
        for name in ("harm_max_new_tokens", "batch_size"):
            check_range(name, getattr(self, name), 1)
        check_range("temperature", self.temperature, 0.0)
        if not 0 < self.top_p <= 1:
            raise FieldError("top_p", self.top_p, "must be in (0, 1]")
        check_choice("protocol", self.protocol, ["heldout", "reference"])
        check_choice("bf16", str(self.bf16).lower(), ["auto", "true", "false"])
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise FieldError("system_prompt", self.system_prompt, "must be a string or null")
        for name in ("harm_prompt_field", "task_split"):
            if not getattr(self, name):
                raise FieldError(name, getattr(self, name), "must be non-empty")

    @property
    def overlap_allowed(self) -> bool:
        """Whether harm-set prompts may overlap the attack's (``allow_overlap``, or the reference protocol)."""
        return self.allow_overlap or self.protocol == "reference"

    def task(self, name: str) -> TaskArgs | None:
        """The options of task ``name``, if it is evaluated."""
        return next((t for t in self.tasks if t.name == name), None)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


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



